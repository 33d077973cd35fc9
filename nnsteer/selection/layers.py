"""Choosing the steering layer(s) of each label from the attribution table.

By default the layer with the largest mean ``|ΔL|`` outside the earliest layers (which
mostly encode token identity; the authors excluded them too), or the ``top_k`` best
there, or layers given by hand. Writes ``layers.json`` (CONTRACTS.md):
``{"<label>": {"vector_layer": int, "layers": [int], "coefficient": float}}``, each entry
also with ``chosen_by`` (``attribution`` or ``hand``) and ``provenance`` (the stage's
options, nnsteer version, time; JSON has no file metadata to carry it).

Example:
    >>> choice = select_layers(RunDir("runs/smollm2-135m"), skip_fraction=0.25)
    >>> {k: choice["backtracking"][k] for k in ("vector_layer", "layers", "coefficient")}
    {'vector_layer': 17, 'layers': [17], 'coefficient': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from nnsteer.errors import BadInput
from nnsteer.generation.spec import check_coefficient
from nnsteer.labels import STEERED_LABELS
from nnsteer.modeling.models import LoadedModel
from nnsteer.runs.store import RunDir, damaged, provenance, read_parquet, write_json
from nnsteer.selection.strength import auto_coefficients, check_auto
from nnsteer.steer.chains import check_plan
from nnsteer.steer.choices import LayerChoice
from nnsteer.vectors.extract import VectorSet, load_vectors

#: ``coefficient`` that asks for a dose-response on the validation tasks (:mod:`nnsteer.selection.strength`).
AUTO = "auto"


@dataclass(frozen=True)
class Choice:
    """The layers chosen for one label, and how clearly they won."""

    label: str
    layers: list[int]  # best first
    effects: list[float]  # their mean |ΔL|, same order
    runner_up: int | None = None  # best layer not chosen
    runner_up_effect: float | None = None

    @property
    def margin(self) -> float | None:
        """Effect of the weakest chosen layer minus the runner-up's."""
        if self.runner_up_effect is None or not self.effects:
            return None
        return self.effects[-1] - self.runner_up_effect

    def describe(self) -> str:
        """One line: the choice, the runner-up and the margin."""
        if not self.effects:
            return f"{self.label}: layer(s) {_join(self.layers)} (given by hand)"
        chosen = ", ".join(f"{layer} ({effect:.4g})" for layer, effect in zip(self.layers, self.effects))
        if self.runner_up is None:
            return f"{self.label}: layer {chosen}; no runner-up"
        relative = self.margin / self.effects[-1] if self.effects[-1] else float("nan")
        return (f"{self.label}: layer {chosen}; runner-up {self.runner_up} "
                f"({self.runner_up_effect:.4g}), margin {self.margin:.4g} ({relative:.1%})")


def _join(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def first_allowed_layer(n_layers: int, skip_fraction: float) -> int:
    """Index of the first layer not skipped: layers ``< ceil(skip_fraction × n_layers)`` are."""
    if not 0 <= skip_fraction < 1:
        raise BadInput(f"--skip-fraction {skip_fraction}: expected a fraction in [0, 1)")
    return math.ceil(skip_fraction * n_layers)


def rank_layers(table: pl.DataFrame, label: str, first: int, top_k: int = 1) -> Choice:
    """The ``top_k`` layers ``>= first`` with the largest effect for ``label``, and the runner-up."""
    rows = (table.filter((pl.col("label") == label) & (pl.col("layer") >= first))
            .sort(["effect", "layer"], descending=[True, False]))
    if len(rows) < top_k:
        raise BadInput(f"{label}: only {len(rows)} layer(s) from layer {first} on to choose "
                       f"{top_k} from; lower --skip-fraction or --top-k")
    layers, effects = rows["layer"].to_list(), rows["effect"].to_list()
    runner = (layers[top_k], effects[top_k]) if len(layers) > top_k else (None, None)
    return Choice(label, layers[:top_k], effects[:top_k], *runner)


def no_steered_vector(run: RunDir) -> str:
    """Why there is nothing to attribute or select: no steered behaviour got a vector."""
    return (f"{run.vectors} has no vector for any steered behaviour ({', '.join(STEERED_LABELS)}): "
            f"no usable span of them in {run.annotations.name}")


def read_attribution(run: RunDir, n_layers: int) -> pl.DataFrame:
    """``attribution.parquet``'s label, layer and effect columns; :class:`BadInput` naming
    the file for a row whose layer is not one of the model's ``n_layers`` or whose effect
    is not a finite number."""
    table = read_parquet(run.attribution, ["label", "layer", "effect"])
    try:
        table = table.select(pl.col("label").cast(pl.String, strict=True),
                             pl.col("layer").cast(pl.Int64, strict=True),
                             pl.col("effect").cast(pl.Float64, strict=True))
    except pl.exceptions.PolarsError:
        raise damaged(run.attribution, "label, layer or effect of the wrong type") from None
    bad = table.with_row_index("row").filter(
        pl.any_horizontal(pl.all().exclude("row").is_null()) | ~pl.col("effect").is_finite()
        | (pl.col("layer") < 0) | (pl.col("layer") >= n_layers))
    if len(bad):
        row = bad.row(0, named=True)
        raise damaged(run.attribution, f"row {row['row']}: layer {row['layer']}, effect "
                      f"{row['effect']} (layers 0..{n_layers - 1}, finite effects)")
    return table


def _choices(run: RunDir, vs: VectorSet, labels: Sequence[str] | None,
             by_hand: dict[str, list[int]], skip_fraction: float, top_k: int) -> list[Choice]:
    """Each wanted label's :class:`Choice`: its layers by hand, else ranked by attribution."""
    first = first_allowed_layer(vs.n_layers, skip_fraction)
    wanted = list(labels) if labels else [label for label in STEERED_LABELS if label in vs.vectors]
    if not wanted and not by_hand:
        raise BadInput(no_steered_vector(run))
    for label in list(wanted) + list(by_hand):
        vs[label]  # BadInput naming the labels that have vectors
    _check_hand_layers(by_hand, vs.n_layers)
    wanted += [label for label in by_hand if label not in wanted]
    ranked = [label for label in wanted if label not in by_hand]
    table = read_attribution(run, vs.n_layers) if ranked else None
    choices = []
    for label in wanted:
        if label in by_hand:
            choices.append(Choice(label, [int(layer) for layer in by_hand[label]], []))
            continue
        if table.filter(pl.col("label") == label).is_empty():
            raise BadInput(f"{run.attribution}: no attribution for {label!r}; "
                           "rerun `nnsteer attribute` or give its layers by hand")
        choices.append(rank_layers(table, label, first, top_k))
    return choices


def _check_hand_layers(by_hand: dict[str, list[int]], n_layers: int) -> None:
    for label, given in by_hand.items():
        if not given:
            raise BadInput(f"layers for {label!r}: give at least one layer")
        bad = [layer for layer in given if not 0 <= layer < n_layers]
        if bad:
            raise BadInput(f"layers for {label!r}: {_join(bad)} out of range 0..{n_layers - 1}")


def select_layers(
    run: RunDir,
    *,
    skip_fraction: float = 0.2,
    top_k: int = 1,
    layers: dict[str, list[int]] | None = None,
    coefficient: float | str = 1.0,
    labels: Sequence[str] | None = None,
    lm: LoadedModel | None = None,
    grid: list[float] | None = None,
    max_coherence_cost: float = 0.5,
    max_repetition_cost: float = 10.0,
    max_accuracy_cost: float = 10.0,
    validation_limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> dict:
    """Write ``layers.json`` and return it; print each label's choice with runner-up and margin.

    ``labels`` defaults to the steered labels that have a vector. ``layers`` gives some or
    all labels' layers by hand (the first one is the vector layer); the others come from
    ``attribution.parquet``.

    ``coefficient="auto"`` chooses each label's coefficient by a dose-response on the
    first ``validation_limit`` validation tasks with ``lm`` (:mod:`nnsteer.selection.strength`): the
    largest of ``grid`` whose effect is positive and whose costs stay within the
    ``max_*_cost`` bounds (nats/token, pp, pp), generating ``max_new_tokens`` per chain in
    batches of ``batch_size``; the sweep and the reason go into the entry's provenance
    (``coefficient_sweep``). The other options are ignored without ``auto``.
    """
    if top_k < 1:
        raise BadInput(f"--top-k {top_k}: expected at least 1")
    auto = coefficient == AUTO
    if auto:
        bounds, grid = check_auto(run, grid, max_coherence_cost, max_repetition_cost,
                                  max_accuracy_cost)
        coefficient = min(grid)
    coefficient = check_coefficient(coefficient, "--coefficient")
    by_hand = dict(layers or {})
    vs = load_vectors(run.vectors)
    choices = _choices(run, vs, labels, by_hand, skip_fraction, top_k)
    check_plan(vs, {c.label: LayerChoice(c.layers[0], tuple(c.layers), coefficient) for c in choices},
               {c.label: grid if auto else [coefficient] for c in choices}, lm,
               "--grid" if auto else "--coefficient")
    options = {"skip_fraction": skip_fraction, "top_k": top_k, "layers": by_hand,
               "coefficient": AUTO if auto else coefficient, "labels": labels}
    made = provenance("select", options)
    swept: dict[str, dict[str, Any]] = {}
    if auto:
        swept = auto_coefficients(
            run, lm, {c.label: LayerChoice(c.layers[0], tuple(c.layers), 1.0) for c in choices},
            bounds, grid, limit=validation_limit, max_new_tokens=max_new_tokens,
            batch_size=batch_size)
    result = {c.label: {"vector_layer": c.layers[0], "layers": c.layers,
                        "coefficient": swept.get(c.label, {}).get("coefficient", coefficient),
                        "chosen_by": "attribution" if c.effects else "hand",
                        "provenance": {**made, **{k: v for k, v in swept.get(c.label, {}).items()
                                                  if k != "coefficient"}}}
              for c in choices}
    write_json(run.layers, result)
    for choice in choices:
        print(choice.describe())
    for label, entry in swept.items():
        print(f"{label}: coefficient ×{entry['coefficient']:g}: "
              f"{entry['coefficient_sweep']['reason']}")
    return result
