"""Loading a model as an nnsight ``TransformersModel``, and what it is.

One entry point, :func:`load_model`, serves every stage. It accepts a Hugging Face id,
a local directory, a ``.gguf`` file or the name of an embedded model (``smollm2-135m``),
runs locally or on NDIF (``remote=True``), and returns a :class:`LoadedModel` whose
``remote`` flag stage code passes unchanged to every nnsight trace.
:func:`describe_model` says what a model is and where it would run, from its config alone.

Example:
    >>> lm = load_model("smollm2-135m")
    >>> lm.arch.n_layers, lm.arch.d_model
    (30, 576)
"""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from nnsteer.errors import BadInput, NnsteerError, first_line
from nnsteer.modeling.architecture import Architecture
from nnsteer.modeling.embedded import (
    EMBEDDED_MODELS,
    cache_dir,
    embedded_provenance,
    embedded_revision,
)
from nnsteer.modeling.placement import check_placement, resolve_device, resolve_dtype
from nnsteer.modeling.sources import ModelSource, model_config, resolve_source
from nnsteer.ndif.remote import (
    check_remote,
    check_route,
    remote_model_key,
)

Remote = bool | Literal["local"]

DEFAULT_MODEL = "smollm2-135m"


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
    (:func:`nnsteer.modeling.placement.check_placement`): a model larger than one GPU is
    then spread over GPUs, the CPU and the disk (offloaded weights in
    ``<cache>/offload/<model>``).
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
    config = model_config(source)
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
        config = model_config(source)
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
