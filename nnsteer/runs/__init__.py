"""Run directories: their files, locks, resumable checkpoints, and the stage registry."""

from nnsteer.runs.registry import STAGE_NAMES, STAGES, Stage
from nnsteer.runs.store import RunDir, run_lock

__all__ = ["STAGES", "STAGE_NAMES", "RunDir", "Stage", "run_lock"]
