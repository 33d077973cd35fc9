"""Where a model name points: an embedded model, a local directory or ``.gguf`` file, or a
Hugging Face id (from the hub, or from the local cache when the hub is offline or
unreachable), and the transformers config it has.

Example:
    >>> resolve_source("model.gguf")
    ModelSource(name='/abs/path/model.gguf', path='/abs/path', gguf_file='model.gguf', ...)
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnsteer.errors import BadInput, first_line
from nnsteer.modeling.embedded import EMBEDDED_MODELS, embedded_dir, embedded_revision


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
        check_gguf(path)
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


def check_gguf(path: Path) -> None:
    """:class:`BadInput` unless ``path`` is a GGUF file the ``gguf`` reader can open."""
    from gguf import GGUFReader

    try:
        GGUFReader(str(path))
    except Exception as exc:  # the reader raises many kinds on damaged files
        raise BadInput(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def model_config(source: ModelSource) -> Any:
    """The transformers config of a model, without loading weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **source.load_kwargs)
    except OSError as exc:
        raise BadInput(f"cannot load the config of {source.name!r}: {first_line(exc)}") from None
    except ValueError as exc:
        raise BadInput(f"{source.name}: {first_line(exc)}") from None
