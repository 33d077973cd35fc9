"""Behaviour spans of reasoning chains: the span parser, the offline and LLM annotators, agreement,
and the ``annotate`` stage (``annotations.parquet``)."""

from nnsteer.annotation.spans import Span, parse_annotation
from nnsteer.annotation.stage import annotate_chains

__all__ = ["Span", "annotate_chains", "parse_annotation"]
