"""How hard to steer: ``select --coefficient auto``.

A dose-response on the *validation* tasks (``tasks --validation-per-category N``; never
the eval tasks, never the training tasks): for each behaviour, at each coefficient of a
grid (default :data:`DEFAULT_GRID`, log-spaced 0.25–8), positive steering at the
behaviour's chosen layers against one unsteered chain per task. The chains
(``sweep.parquet``, resumable) are annotated with the run's annotator and measured as
``evaluate`` measures steered chains: the behaviour effect is the paired difference of
the behaviour's share (pp, :func:`nnsteer.evaluation.shares.summarise`), the costs the paired
differences of ``nll_unsteered`` (coherence, nats/token), ``repetition`` (pp) and
``correct`` (accuracy, pp) (:func:`nnsteer.evaluation.costs.summarise_costs`).

:func:`choose_coefficient` then takes the largest coefficient whose effect is positive
and whose costs stay within :class:`Bounds`; if none does, the smallest of the grid,
saying so. Decisions use the point estimates (the intervals are recorded beside them).

Example:
    >>> choose_coefficient([{"coefficient": 1.0, "effect": 2.0, "coherence": 0.1,
    ...                      "repetition": 1.0, "accuracy": 0.0}], Bounds())[0]
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from nnsteer.annotation.stage import annotate_frame, resolve_annotator
from nnsteer.errors import BadInput
from nnsteer.evaluation import costs as tradeoffs
from nnsteer.evaluation.shares import chain_fractions, summarise
from nnsteer.evaluation.stage import training_annotator
from nnsteer.generation.chains import run_chain_jobs, split_tasks
from nnsteer.generation.prompts import DEFAULT_PROMPT_TEMPLATE
from nnsteer.generation.spec import check_coefficient
from nnsteer.modeling.identity import check_made_on
from nnsteer.modeling.models import LoadedModel
from nnsteer.runs.store import RunDir, provenance, read_parquet
from nnsteer.steer.chains import (
    behaviour_vectors,
    steering_jobs,
    vector_digest,
)
from nnsteer.steer.choices import LayerChoice
from nnsteer.vectors.extract import load_vectors

#: The default grid: log-spaced from 0.25 to 8 (each twice the one before).
DEFAULT_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The validation chains of the sweep, in the run directory.
SWEEP_FILE = "sweep.parquet"
#: Sweep-row key → (its cost metric in ``summarise_costs``, factor to its unit).
_COSTS = {"coherence": ("nll_unsteered", 1.0), "repetition": ("repetition", 100.0),
          "accuracy": ("correct", 100.0)}


@dataclass(frozen=True)
class Bounds:
    """How much worse than unsteered a chosen coefficient may make each cost."""

    coherence: float = 0.5  # rise in nll_unsteered, nats/token
    repetition: float = 10.0  # rise in repeated n-grams, pp
    accuracy: float = 10.0  # fall in accuracy, pp

    def __post_init__(self) -> None:
        for key, option in (("coherence", "--max-coherence-cost"),
                            ("repetition", "--max-repetition-cost"),
                            ("accuracy", "--max-accuracy-cost")):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value < 0:
                raise BadInput(f"{option} {value!r}: expected a finite number >= 0")

    def exceeded(self, row: Mapping[str, Any]) -> list[str]:
        """The costs of a sweep row out of bounds, as phrases (``repetition +12.0 pp > 10``)."""
        out = []
        if _known(row.get("coherence")) and row["coherence"] > self.coherence:
            out.append(f"coherence {row['coherence']:+.2f} nats/token > {self.coherence:g}")
        if _known(row.get("repetition")) and row["repetition"] > self.repetition:
            out.append(f"repetition {row['repetition']:+.1f} pp > {self.repetition:g}")
        if _known(row.get("accuracy")) and row["accuracy"] < -self.accuracy:
            out.append(f"accuracy {row['accuracy']:+.1f} pp < -{self.accuracy:g}")
        return out


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def check_grid(grid: Sequence[float] | None) -> list[float]:
    """The grid sorted ascending (default :data:`DEFAULT_GRID`); :class:`BadInput` in one
    line for an empty grid, a repeat, or a value that is not a finite number > 0."""
    grid = list(DEFAULT_GRID if grid is None else grid)
    if not grid:
        raise BadInput("--grid: give at least one coefficient")
    for value in grid:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise BadInput(f"--grid {value!r}: expected numbers > 0")
        check_coefficient(value, "--grid")
    if len(set(grid)) != len(grid):
        raise BadInput(f"--grid {grid}: a coefficient repeats")
    return sorted(float(v) for v in grid)


def choose_coefficient(sweep: Sequence[Mapping[str, Any]], bounds: Bounds) -> tuple[float, str]:
    """The largest coefficient of ``sweep`` whose ``effect`` (pp) is positive and whose
    costs are within ``bounds`` (a cost exactly at its bound is within; an unmeasured,
    None, cost does not count against it), and why, in one phrase. If none qualifies,
    the smallest coefficient of the sweep, saying so.

    ``sweep``: rows with ``coefficient``, ``effect``, ``coherence`` (nats/token),
    ``repetition`` (pp) and ``accuracy`` (pp), each a paired difference from unsteered.
    """
    if not sweep:
        raise BadInput("the sweep has no coefficient to choose from")
    rows = sorted(sweep, key=lambda r: r["coefficient"], reverse=True)
    rejected = []
    for row in rows:
        effect = row.get("effect")
        why = [] if _known(effect) and effect > 0 else [
            "no effect measured" if not _known(effect) else f"effect {effect:+.1f} pp is not positive"]
        why += bounds.exceeded(row)
        if not why:
            reason = (f"the largest coefficient with a positive effect ({effect:+.1f} pp) and "
                      "costs within bounds")
            if rejected:
                reason += f"; above it: {'; '.join(rejected)}"
            return float(row["coefficient"]), reason
        rejected.append(f"×{row['coefficient']:g}: {', '.join(why)}")
    smallest = float(rows[-1]["coefficient"])
    return smallest, (f"no coefficient qualified ({'; '.join(reversed(rejected))}): fell back to "
                      f"the smallest of the grid, ×{smallest:g}")


def check_auto(run: RunDir, grid: Sequence[float] | None, max_coherence_cost: float,
               max_repetition_cost: float, max_accuracy_cost: float) -> tuple[Bounds, list[float]]:
    """The bounds and the sorted grid of ``--coefficient auto``, checked before any work:
    :class:`BadInput` in one line for a bad value, or a ``run.tasks`` with no validation task."""
    bounds = Bounds(max_coherence_cost, max_repetition_cost, max_accuracy_cost)
    grid = check_grid(grid)
    if "validation" not in read_parquet(run.tasks, ["split"])["split"].to_list():
        raise BadInput(f"{run.tasks}: no validation tasks for --coefficient auto: run "
                       "`nnsteer tasks --validation-per-category N` (then the stages after it)")
    return bounds, grid


def sweep_coefficients(
    run: RunDir,
    lm: LoadedModel,
    choices: dict[str, LayerChoice],
    grid: Sequence[float] | None = None,
    *,
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Per behaviour of ``choices``, one sweep row per coefficient of ``grid``: ``effect``
    (pp) with ``effect_low`` / ``effect_high``, ``coherence``, ``repetition``, ``accuracy``
    (paired differences, see the module) and ``n_pairs``, measured on the first ``limit``
    validation tasks."""
    grid = check_grid(grid)
    tasks = split_tasks(run, "validation", limit)
    vector_set = load_vectors(run.vectors)
    check_made_on(vector_set.metadata, lm, str(run.vectors), False)
    vectors = behaviour_vectors(vector_set, choices, lm, seed, control=False)
    jobs = steering_jobs(tasks, "validation", choices, vectors,
                         dict.fromkeys(choices, grid), directions=("positive",))
    options = {"grid": grid, "limit": limit, "max_new_tokens": max_new_tokens,
               "batch_size": batch_size, "prompt_template": prompt_template}
    used = {b: {"behaviour": vector_digest(v["behaviour"])} for b, v in vectors.items()}
    path = run.path(SWEEP_FILE)
    chains = run_chain_jobs(lm, jobs, path, provenance("select", options, lm.provenance()), used,
                            max_new_tokens=max_new_tokens, batch_size=batch_size,
                            prompt_template=prompt_template)
    annotator = resolve_annotator(training_annotator(run))
    spans = annotate_frame(chains, annotator=annotator, progress=False)
    evaluation = chain_fractions(chains, spans, lm.tokenizer).join(
        tradeoffs.cost_table(run, lm.tokenizer, lm, batch_size=batch_size, chains=path),
        on="chain_id", how="left")
    effects = summarise(evaluation, n_boot, seed).filter(pl.col("direction") == "positive")
    costs = tradeoffs.summarise_costs(evaluation, n_boot, seed).filter(
        pl.col("direction") == "positive")
    sweeps: dict[str, list[dict[str, Any]]] = {}
    for behaviour in choices:
        rows = []
        for c in grid:
            effect = effects.filter((pl.col("behaviour") == behaviour)
                                    & (pl.col("coefficient") == c)).to_dicts()
            effect = effect[0] if effect else {}
            row = {"coefficient": c, **{f"effect{k}": _scaled(effect.get(f"diff{k}"), 100.0)
                                        for k in ("", "_low", "_high")},
                   "n_pairs": effect.get("n_pairs")}
            for key, (metric, scale) in _COSTS.items():
                cost = costs.filter((pl.col("metric") == metric) & (pl.col("behaviour") == behaviour)
                                    & (pl.col("coefficient") == c))
                row[key] = _scaled(cost["diff"][0], scale) if cost.height else None
            rows.append(row)
        sweeps[behaviour] = rows
    return sweeps


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else float(value) * scale


def auto_coefficients(
    run: RunDir, lm: LoadedModel | None, choices: dict[str, LayerChoice], bounds: Bounds,
    grid: Sequence[float] | None = None, **settings: Any,
) -> dict[str, dict[str, Any]]:
    """Per behaviour: ``coefficient`` (:func:`choose_coefficient` on its sweep), and
    ``coefficient_sweep`` (what ``layers.json``'s provenance records: the grid, the bounds,
    the sweep rows, the reason). ``settings`` go to :func:`sweep_coefficients`."""
    grid = check_grid(grid)
    if lm is None:
        raise BadInput("--coefficient auto needs the model (--model, --device / --remote) to "
                       "sweep the validation tasks")
    sweeps = sweep_coefficients(run, lm, choices, grid, **settings)
    out = {}
    for behaviour, rows in sweeps.items():
        coefficient, reason = choose_coefficient(rows, bounds)
        out[behaviour] = {"coefficient": coefficient, "coefficient_sweep": {
            "grid": grid, "bounds": asdict(bounds), "sweep": rows, "chosen": coefficient,
            "reason": reason, "file": SWEEP_FILE, "settings": settings}}
    return out


def sweep_frame(provenances: Mapping[str, Mapping[str, Any]]) -> pl.DataFrame:
    """The recorded sweeps of ``layers.json`` entries' provenance, by behaviour, as one table:
    ``behaviour``, ``coefficient``, ``effect`` (pp), ``coherence``, ``repetition``,
    ``accuracy``, and ``verdict`` (chosen, qualifies, or why not); empty without a sweep."""
    rows = []
    for behaviour, made in provenances.items():
        record = made.get("coefficient_sweep")
        if not isinstance(record, dict):
            continue
        bounds = Bounds(**record["bounds"])
        for row in record["sweep"]:
            effect = row.get("effect")
            why = bounds.exceeded(row)
            if not (_known(effect) and effect > 0):
                why.insert(0, "no positive effect")
            verdict = ("chosen" if row["coefficient"] == record["chosen"]
                       else ", ".join(why) or "qualifies")
            rows.append({"behaviour": behaviour, "coefficient": float(row["coefficient"]),
                         **{k: row.get(k) for k in ("effect", *_COSTS)}, "verdict": verdict})
    schema = {"behaviour": pl.String, "coefficient": pl.Float64, "effect": pl.Float64,
              "coherence": pl.Float64, "repetition": pl.Float64, "accuracy": pl.Float64,
              "verdict": pl.String}
    return pl.DataFrame(rows, schema=schema)
