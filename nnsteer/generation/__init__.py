"""Greedy chains, unsteered or steered: the steering spec and its modes, prompts, the nnsight
generation loop, and the ``generate`` stage (``chains.parquet``)."""

from nnsteer.generation.chains import generate_chains
from nnsteer.generation.loop import generate
from nnsteer.generation.spec import Condition, SteeringSpec

__all__ = ["Condition", "SteeringSpec", "generate", "generate_chains"]
