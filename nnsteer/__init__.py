"""nnsteer: find and control reasoning behaviours in thinking language models with steering vectors."""

__version__ = "0.1.0"

from nnsteer.errors import BadInput, NnsteerError
from nnsteer.models import Architecture, LoadedModel, load_model, wrap_model
from nnsteer.store import RunDir

__all__ = [
    "Architecture",
    "BadInput",
    "LoadedModel",
    "NnsteerError",
    "RunDir",
    "__version__",
    "load_model",
    "wrap_model",
]
