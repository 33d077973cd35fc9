"""Candidate steering vectors: mean residual activations and difference-of-means vectors at every
layer (``vectors.safetensors``)."""

from nnsteer.vectors.extract import VectorSet, extract_vectors, load_vectors

__all__ = ["VectorSet", "extract_vectors", "load_vectors"]
