"""Did steering change the behaviour, and what did it cost: behaviour shares with paired intervals,
per-chain metrics, the answer grader, and the ``evaluate`` stage (``evaluation.parquet``)."""

from nnsteer.evaluation.grader import grade_offline
from nnsteer.evaluation.stage import evaluate

__all__ = ["evaluate", "grade_offline"]
