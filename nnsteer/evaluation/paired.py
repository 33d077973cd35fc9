"""The paired vocabulary of a steering study: conditions, their order and names, and the
statistics every table of it uses (a mean over tasks with its interval, the paired difference
against the unsteered chain of the same task, its bootstrap p-value, Holm, and the verdict).

:mod:`nnsteer.evaluation.shares` (behaviour shares) and :mod:`nnsteer.evaluation.costs`
(what steering cost) both build on it; the report shows its names and intervals.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from nnsteer.generation.spec import STEERING_DIRECTIONS
from nnsteer.labels import LABELS, STEERED_LABELS
from nnsteer.stats import ALPHA, P_DRAWS, bootstrap_interval, bootstrap_p, holm

#: Fewest tasks for an interval and a verdict. A percentile bootstrap over n tasks is
#: no 95% interval for small n: simulated on normal data, its coverage is 50% at n = 2,
#: 76% at 3, 83% at 5, 86% at 6 and 89% at 8 (and still 89% at 10). Below this, means
#: are shown without intervals and no verdict is drawn.
MIN_TASKS_FOR_INTERVAL = 8
#: The ``direction`` of a chain: ``none`` is the unsteered baseline.
CHAIN_DIRECTIONS = ("none", *STEERING_DIRECTIONS)
VECTORS = ("none", "behaviour", "random")
#: One colour per condition kind, the same in every steering chart.
CONDITION_COLOURS = {"baseline": "#888888", "behaviour": "#1f77b4", "random": "#ff7f0e"}
#: What makes a condition: chains that agree on these were steered the same way.
CONDITION = ("direction", "vector", "coefficient", "mode")


def ordered_behaviours(behaviours: list[str]) -> list[str]:
    """The paper's order first, then any other label."""
    order = list(STEERED_LABELS) + [label for label in LABELS if label not in STEERED_LABELS]
    return sorted(behaviours, key=order.index)


def condition_order(direction: str, vector: str, coefficient: float, mode: str) -> tuple:
    """The sort key of a condition in tables and charts: mode ``all`` (the paper's setting) first,
    then by mode, vector, direction and coefficient."""
    return mode != "all", mode, VECTORS.index(vector), CHAIN_DIRECTIONS.index(direction), coefficient


def with_mode(chains: pl.DataFrame) -> pl.DataFrame:
    """``chains`` with a ``mode`` column: as written, or for a table from before steering
    modes, ``none`` for baselines and ``all`` (the paper's setting) for steered chains."""
    if "mode" in chains.columns:
        return chains
    return chains.with_columns(mode=pl.when(pl.col("direction") == "none").then(pl.lit("none"))
                               .otherwise(pl.lit("all")))


def share_stats(shares: pl.DataFrame, n_boot: int, seed: int, min_tasks: int,
                 baseline: pl.DataFrame | None = None) -> dict[str, Any]:
    """The mean of one condition's per-task ``shares`` with its bootstrap interval and, given the
    ``baseline``'s, the paired difference, its interval and p-value; no interval or p below
    ``min_tasks`` tasks."""
    values = shares["share"].to_numpy()
    low, high = _interval(values, n_boot, seed, min_tasks)
    stats = {"n_tasks": len(values), "mean": float(values.mean()) if len(values) else None,
             "ci_low": _finite(low), "ci_high": _finite(high),
             "n_pairs": None, "diff": None, "diff_low": None, "diff_high": None, "p": None}
    if baseline is not None:
        paired = shares.join(baseline, on="task_id", suffix="_baseline")
        diffs = (paired["share"] - paired["share_baseline"]).to_numpy()
        diff_low, diff_high = _interval(diffs, n_boot, seed, min_tasks)
        stats.update(n_pairs=len(diffs), diff=float(diffs.mean()) if len(diffs) else None,
                     diff_low=_finite(diff_low), diff_high=_finite(diff_high),
                     p=bootstrap_p(diffs, max(n_boot, P_DRAWS), seed)
                     if len(diffs) >= min_tasks else None)
    return stats


def _interval(values: np.ndarray, n_boot: int, seed: int, min_tasks: int) -> tuple[float, float]:
    """The bootstrap interval, or NaNs below ``min_tasks`` values."""
    if len(values) < min_tasks:
        return math.nan, math.nan
    return bootstrap_interval(values, n_boot, seed)


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def with_holm(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` with ``p_holm``: its ``p`` column Holm-adjusted over all its rows."""
    return table.with_columns(p_holm=pl.Series(holm(table["p"].to_list()), dtype=pl.Float64))


def condition_name(row: dict[str, Any], with_coefficient: bool = True) -> str:
    """A condition's name in tables and charts (``baseline``, ``positive ×4``, ``random negative
    [thinking] ×4``)."""
    if row["direction"] == "none":
        return "baseline"
    name = row["direction"] if row["vector"] == "behaviour" else f"random {row['direction']}"
    if row.get("mode", "all") != "all":
        name = f"{name} [{row['mode']}]"
    return f"{name} ×{row['coefficient']:g}" if with_coefficient else name


def interval_text(value: float, low: float | None, high: float | None, fmt: str, *,
                  scale: float = 100.0, unit: str = "") -> str:
    """``value`` and, when known, its interval ``[low, high]``, each times ``scale`` in the
    format ``fmt``; ``unit`` follows the value (``12.3% [4.0, 20.1]``)."""
    text = f"{scale * value:{fmt}}{unit}"
    return text if low is None else f"{text} [{scale * low:{fmt}}, {scale * high:{fmt}}]"


def share_text(row: dict[str, Any]) -> str:
    """A summary row's mean share in percent, with its interval where there is one."""
    if row["mean"] is None:
        return "no chain with labelled tokens"
    return interval_text(row["mean"], row["ci_low"], row["ci_high"], ".1f", unit="%")


def diff_text(row: dict[str, Any]) -> str:
    """A summary row's paired difference from the baseline in percentage points, with its
    interval where there is one."""
    if row["diff"] is None:
        return "no paired difference"
    return interval_text(row["diff"], row["diff_low"], row["diff_high"], "+.1f", unit=" pp")


def verdict(row: dict[str, Any]) -> tuple[str, bool]:
    """A sentence on the paired change, and whether the intended change happened."""
    if row["diff"] is None:
        return "no paired task to tell", False
    if row["diff_low"] is None:
        return f"too few tasks for an interval ({row['n_pairs']}): no verdict", False
    excludes = row["diff_low"] > 0 or row["diff_high"] < 0
    held = row.get("p_holm") is not None and row["p_holm"] < ALPHA
    up, down = held and row["diff"] > 0, held and row["diff"] < 0
    adjusted = f"Holm-adjusted p = {row['p_holm']:.2g}" if held else ""
    if excludes and not held:
        p_holm = row.get("p_holm")
        return ("no clear change after Holm's adjustment for the study's many tests "
                f"(adjusted p = {p_holm if p_holm is None else f'{p_holm:.2g}'}; the unadjusted "
                "interval excludes 0)"), False
    if row["vector"] == "random":
        if up or down:
            return (f"the random control {'raised' if up else 'lowered'} it too "
                    f"(interval excludes 0; {adjusted}): the behaviour vector's effect is not "
                    "specific"), False
        return "no clear change, as a control should", False
    wanted = up if row["direction"] == "positive" else down
    if wanted:
        return ("raised" if up else "lowered") + f" (interval excludes 0; {adjusted})", True
    if up or down:
        return (("raised" if up else "lowered") + " it, the opposite of the intended change "
                f"({adjusted})"), False
    return "no clear change (interval includes 0)", False


def holm_note(summary: pl.DataFrame) -> str:
    """How the verdicts allow for the study's many tests."""
    n = summary["p"].drop_nulls().len() if "p" in summary.columns else 0
    if not n:
        return "No condition has the tasks for a test."
    return (f"Verdicts use bootstrap tests Holm-adjusted across all {n} steered conditions "
            f"of the study (p < {ALPHA:g}); the intervals shown are unadjusted.")
