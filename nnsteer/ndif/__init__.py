"""NDIF, nnsight's remote backend: whether a model can run there, and requests that survive long jobs."""

from nnsteer.ndif.remote import check_remote, ndif_backend

__all__ = ["check_remote", "ndif_backend"]
