"""nnsteer: find and control reasoning behaviours in thinking language models with steering vectors."""

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

from nnsteer.errors import BadInput, NnsteerError

__version__ = version("nnsteer")

if TYPE_CHECKING:
    from nnsteer.modeling.architecture import Architecture
    from nnsteer.modeling.models import LoadedModel, load_model, wrap_model
    from nnsteer.runs.store import RunDir
    from nnsteer.steer.hooks import steering

#: Imported on first use, so that ``nnsteer`` (the command) starts without torch.
_LAZY = {"Architecture": "nnsteer.modeling.architecture", "LoadedModel": "nnsteer.modeling.models",
         "load_model": "nnsteer.modeling.models", "wrap_model": "nnsteer.modeling.models", "RunDir": "nnsteer.runs.store",
         "steering": "nnsteer.steer.hooks"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nnsteer' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "Architecture",
    "BadInput",
    "LoadedModel",
    "NnsteerError",
    "RunDir",
    "__version__",
    "load_model",
    "steering",
    "wrap_model",
]
