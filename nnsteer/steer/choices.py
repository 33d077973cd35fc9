"""``layers.json``: each behaviour's vector layer, steered layers and coefficient, as
:class:`LayerChoice` records, checked entry by entry.

``select`` writes the file (:mod:`nnsteer.selection.layers`); ``steer``, ``export`` and the
report read it through :func:`read_layers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnsteer.errors import BadInput
from nnsteer.generation.spec import check_coefficient
from nnsteer.runs.store import damaged, read_json


@dataclass(frozen=True)
class LayerChoice:
    """One behaviour's entry of ``layers.json``."""

    vector_layer: int
    layers: tuple[int, ...]
    coefficient: float
    chosen_by: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)


def read_layers(path: Path) -> dict[str, LayerChoice]:
    """Every entry of a ``layers.json``, by behaviour; :class:`BadInput` naming the file and
    the entry for one that is not ``{vector_layer, layers, coefficient}`` of the right types.
    Layers are checked against a model by the stage that has one."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise damaged(path, "expected an object keyed by behaviour label")
    return {label: _layer_choice(entry, path, label) for label, entry in raw.items()}


def _layer_choice(entry: Any, path: Path, label: str) -> LayerChoice:
    def is_index(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    def bad(why: str) -> BadInput:
        return damaged(path, f"entry {label!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("expected {vector_layer, layers, coefficient}")
    layers = entry.get("layers")
    if not is_index(entry.get("vector_layer")):
        raise bad("vector_layer must be an integer >= 0")
    if not isinstance(layers, list) or not layers or not all(is_index(x) for x in layers):
        raise bad("layers must be a non-empty list of integers >= 0")
    if len(set(layers)) != len(layers):
        raise bad("layers repeat a layer")
    try:
        coefficient = check_coefficient(entry.get("coefficient"), "coefficient")
    except BadInput as exc:
        raise bad(str(exc)) from None
    made = entry.get("provenance")
    return LayerChoice(entry["vector_layer"], tuple(layers), coefficient,
                       str(entry.get("chosen_by", "")), made if isinstance(made, dict) else {})
