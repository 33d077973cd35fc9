"""Steering with the chosen vectors: the ``steer`` stage (``steered.parquet``), conditional thresholds,
plain forward hooks, and vectors to and from llama.cpp and ``.pt`` files."""

from nnsteer.steer.chains import steer_chains
from nnsteer.steer.export import export_vector, import_vector
from nnsteer.steer.hooks import steering

__all__ = ["export_vector", "import_vector", "steer_chains", "steering"]
