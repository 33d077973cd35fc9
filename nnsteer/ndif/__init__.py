"""NDIF, nnsight's remote backend: whether a model can run there (:mod:`~nnsteer.ndif.remote`), and
the backend whose requests survive long jobs (:mod:`~nnsteer.ndif.backend`, which imports nnsight)."""

from nnsteer.ndif.remote import check_remote, with_retries

__all__ = ["check_remote", "with_retries"]
