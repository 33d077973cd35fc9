"""Models: loading (embedded, hub, GGUF; local or NDIF) and placement, their architecture,
thinking formats, token positions, adapters and fingerprints."""

from nnsteer.modeling.architecture import Architecture
from nnsteer.modeling.models import LoadedModel, load_model, load_tokenizer, wrap_model
from nnsteer.modeling.thinking import ThinkingFormat

__all__ = ["Architecture", "LoadedModel", "ThinkingFormat", "load_model", "load_tokenizer", "wrap_model"]
