"""``report.html``: every result of a run on one self-contained page, with chart files."""

from nnsteer.report.page import write_report

__all__ = ["write_report"]
