"""Behaviour shares of steered chains (paper Figure 4, with the statistics).

:func:`chain_fractions` counts per chain the tokens of each label and their share of a
denominator (all labelled tokens, or the four steered labels as the released code does).
:func:`summarise` aggregates per behaviour and condition (direction, vector, coefficient,
mode) the share of *that* behaviour's label: its mean over tasks with a percentile-bootstrap
95% interval, and the paired difference against the unsteered chain of the same task with
its own interval (:mod:`nnsteer.evaluation.paired`).

Example:
    >>> print(summary_text(summarise(read_parquet(RunDir("runs/demo").evaluation))))
"""

from __future__ import annotations

from typing import Any

import altair as alt
import polars as pl
from tqdm.auto import tqdm

from nnsteer.annotation.stage import spans_by_chain, token_label_counts
from nnsteer.errors import BadInput
from nnsteer.evaluation.paired import (
    CONDITION,
    MIN_TASKS_FOR_INTERVAL,
    condition_name,
    condition_order,
    diff_text,
    holm_note,
    ordered_behaviours,
    share_stats,
    share_text,
    verdict,
    with_holm,
    with_mode,
)
from nnsteer.labels import LABELS, STEERED_LABELS
from nnsteer.modeling.positions import token_offsets
from nnsteer.stats import ALPHA

#: The labels whose tokens make up the denominator of a share.
DENOMINATORS: dict[str, tuple[str, ...]] = {"labelled": LABELS, "steered": STEERED_LABELS}
#: What a share is a share of, named in every table, chart and sentence.
UNITS: dict[str, str] = {
    "labelled": "share of labelled tokens",
    "steered": "share of tokens with one of the four steered labels",
}


def chain_fractions(
    chains: pl.DataFrame, spans: pl.DataFrame, tokenizer: Any,
    denominator: str = "labelled", progress: bool = False,
) -> pl.DataFrame:
    """One row per (chain, label of the denominator): ``tokens``, ``total``, ``fraction``.

    ``tokens`` are the generated tokens the label's ``ok`` spans cover, counted on the
    stored ``output_ids``; ``total`` sums them over the denominator's labels (as the
    released code sums its segments), so a chain's fractions add up to 1; ``fraction``
    is null for a chain with no such token.
    """
    labels = denominator_labels(denominator)
    grouped = spans_by_chain(spans)
    chains = with_mode(chains)
    keep = ["chain_id", "task_id", "behaviour", "direction", "vector", "coefficient", "mode"]
    rows = []
    for chain in tqdm(chains.iter_rows(named=True), total=chains.height, desc="token shares",
                      unit="chain", disable=not progress):
        counts = token_label_counts(grouped.get(chain["chain_id"], []),
                                    token_offsets(tokenizer, chain["output_ids"]))
        total = sum(counts.get(label, 0) for label in labels)
        for label in labels:
            tokens = counts.get(label, 0)
            rows.append({**{k: chain[k] for k in keep}, "label": label, "tokens": tokens,
                         "total": total, "fraction": tokens / total if total else None,
                         "denominator": denominator})
    schema = {"chain_id": pl.String, "task_id": pl.String, "behaviour": pl.String,
              "direction": pl.String, "vector": pl.String, "coefficient": pl.Float64,
              "mode": pl.String, "label": pl.String, "tokens": pl.Int64, "total": pl.Int64,
              "fraction": pl.Float64, "denominator": pl.String}
    return pl.DataFrame(rows, schema=schema)


#: The columns of ``evaluation.parquet`` that :func:`summarise` reads.
SHARE_COLUMNS = ["task_id", "behaviour", "direction", "vector", "coefficient", "label",
                 "fraction", "denominator"]


def summarise(evaluation: pl.DataFrame, n_boot: int = 2000, seed: int = 0,
              min_tasks: int = MIN_TASKS_FOR_INTERVAL) -> pl.DataFrame:
    """Per behaviour and condition: the share of that behaviour's label over tasks.

    Columns: ``behaviour``, ``direction``, ``vector``, ``coefficient`` (null for the
    baseline), ``n_tasks``, ``mean``, ``ci_low``, ``ci_high`` (bootstrap over tasks),
    ``n_pairs`` (tasks that also have a baseline), ``diff``, ``diff_low``, ``diff_high``
    (paired difference steered − baseline on the same task; null for the baseline),
    ``n_unlabelled`` (chains with no labelled token, left out), ``unit``. Intervals are
    null below :data:`MIN_TASKS_FOR_INTERVAL` tasks (or pairs). Several
    chains of one task and condition are averaged first. Shares are fractions (0–1). ``p``
    is the bootstrap p-value of the paired difference (:func:`nnsteer.stats.bootstrap_p`, at
    least :data:`nnsteer.stats.P_DRAWS` resamples; null without an interval), ``p_holm``
    its Holm adjustment over every steered condition of every behaviour in the table: the
    verdicts use ``p_holm``.
    """
    denominators = evaluation["denominator"].unique().to_list()
    if not denominators:
        raise BadInput("evaluation has no rows to summarise: run `nnsteer evaluate` first")
    if len(denominators) != 1:
        raise BadInput(f"evaluation mixes denominators {sorted(denominators)}: summarise one at a time")
    unit = UNITS[denominators[0]]
    evaluation = with_mode(evaluation)
    conditions = list(CONDITION)
    baseline_chains = evaluation.filter(pl.col("direction") == "none")
    steered_chains = evaluation.filter(pl.col("direction") != "none")
    rows = []
    for behaviour in ordered_behaviours(steered_chains["behaviour"].drop_nulls().unique().to_list()):
        baseline = _per_task(baseline_chains, behaviour)
        rows.append({"behaviour": behaviour, "direction": "none", "vector": "none",
                     "coefficient": None, "mode": "none", **share_stats(baseline, n_boot, seed, min_tasks),
                     "n_unlabelled": _unlabelled(baseline_chains, behaviour)})
        steered = steered_chains.filter(pl.col("behaviour") == behaviour)
        for key, group in sorted(steered.group_by(conditions), key=lambda kv: condition_order(*kv[0])):
            shares = _per_task(group, behaviour)
            rows.append({"behaviour": behaviour, **dict(zip(conditions, key)),
                         **share_stats(shares, n_boot, seed, min_tasks, baseline),
                         "n_unlabelled": _unlabelled(group, behaviour)})
    schema = {"behaviour": pl.String, "direction": pl.String, "vector": pl.String,
              "coefficient": pl.Float64, "mode": pl.String, "n_tasks": pl.Int64,
              "mean": pl.Float64,
              "ci_low": pl.Float64, "ci_high": pl.Float64, "n_pairs": pl.Int64,
              "diff": pl.Float64, "diff_low": pl.Float64, "diff_high": pl.Float64,
              "n_unlabelled": pl.Int64, "p": pl.Float64}
    return with_holm(pl.DataFrame(rows, schema=schema)).with_columns(unit=pl.lit(unit))


def summary_text(summary: pl.DataFrame) -> str:
    """Plain sentences: per behaviour, did positive steering raise it, negative lower it,
    and the random-vector control leave it alone, with the intervals."""
    if summary.is_empty():
        return "No steered chains to summarise.\n"
    unit = summary["unit"][0]
    baselines = summary.filter(pl.col("direction") == "none")
    lines = [
        f"Unit: {unit}. Means over eval tasks with percentile-bootstrap 95% intervals; "
        "differences are paired with the unsteered chain of the same task, in percentage points (pp). "
        f"Intervals and verdicts need at least {MIN_TASKS_FOR_INTERVAL} tasks. "
        f"{holm_note(summary)}",
    ]
    verdicts: dict[str, list[bool]] = {"positive": [], "negative": []}
    for base in baselines.iter_rows(named=True):
        behaviour = base["behaviour"]
        lines.append("")
        lines.append(f"{behaviour}: baseline {share_text(base)} ({base['n_tasks']} tasks"
                     f"{_unlabelled_note(base)})")
        steered = summary.filter((pl.col("behaviour") == behaviour) & (pl.col("direction") != "none"))
        for row in steered.iter_rows(named=True):
            sentence, achieved = verdict(row)
            if row["vector"] == "behaviour" and row["diff_low"] is not None:
                verdicts[row["direction"]].append(achieved)
            lines.append(f"  {condition_name(row)}: {share_text(row)}; {diff_text(row)} vs baseline over "
                         f"{row['n_pairs']} tasks: {sentence}{_unlabelled_note(row)}")
    lines.append("")
    for direction, verb in (("positive", "raised"), ("negative", "lowered")):
        results = verdicts[direction]
        if results:
            lines.append(f"{direction.capitalize()} steering {verb} the target behaviour "
                         f"(Holm-adjusted p < {ALPHA:g}) in {sum(results)} of {len(results)} conditions.")
    return "\n".join(lines) + "\n"


def steering_chart(summary: pl.DataFrame) -> alt.LayerChart:
    """Figure 4: grouped bars (baseline, positive, negative, controls) per behaviour,
    with 95% bootstrap intervals; the y axis names the unit."""
    unit = summary["unit"][0] if summary.height else UNITS["labelled"]
    several = _several_coefficients(summary)
    data = summary.with_columns(
        condition=pl.Series([condition_name(r, several) for r in summary.iter_rows(named=True)],
                            dtype=pl.String),
        share=pl.col("mean") * 100, share_low=pl.col("ci_low") * 100,
        share_high=pl.col("ci_high") * 100, change=pl.col("diff") * 100,
    ).drop("unit")
    conditions = list(dict.fromkeys(data["condition"].to_list()))
    behaviours = list(dict.fromkeys(data["behaviour"].to_list()))
    x = alt.X("behaviour:N", sort=behaviours, title="behaviour", axis=alt.Axis(labelAngle=0))
    offset = alt.XOffset("condition:N", sort=conditions)
    bars = alt.Chart(data).mark_bar().encode(
        x=x, xOffset=offset,
        y=alt.Y("share:Q", title=f"{unit} (%)"),
        color=alt.Color("condition:N", sort=conditions, title="condition"),
        tooltip=[alt.Tooltip("behaviour:N"), alt.Tooltip("condition:N"),
                 alt.Tooltip("share:Q", format=".1f", title=f"{unit} (%)"),
                 alt.Tooltip("share_low:Q", format=".1f", title="95% low"),
                 alt.Tooltip("share_high:Q", format=".1f", title="95% high"),
                 alt.Tooltip("change:Q", format="+.1f", title="paired change (pp)"),
                 alt.Tooltip("n_tasks:Q", title="tasks")],
    )
    intervals = alt.Chart(data).mark_errorbar(ticks=True, color="black").encode(
        x=x, xOffset=offset,
        y=alt.Y("share_low:Q", title=f"{unit} (%)"), y2=alt.Y2("share_high:Q"),
    )
    ticks = alt.Chart(data).mark_tick(color="black", thickness=2).encode(  # shows a 0% bar
        x=x, xOffset=offset, y=alt.Y("share:Q", title=f"{unit} (%)"))
    return (bars + ticks + intervals).properties(
        title=alt.Title("Behaviour shares with and without steering",
                        subtitle=f"{unit}; bars and ticks: mean over eval tasks; whiskers: 95% bootstrap interval"),
        width=alt.Step(16),
    )


def denominator_labels(denominator: str) -> tuple[str, ...]:
    """The labels whose tokens make up the shares' denominator (``--denominator``); a name not in
    :data:`DENOMINATORS` is bad input."""
    if denominator not in DENOMINATORS:
        raise BadInput(f"--denominator must be one of {', '.join(DENOMINATORS)}, got {denominator!r}")
    return DENOMINATORS[denominator]


def _per_task(chains: pl.DataFrame, behaviour: str) -> pl.DataFrame:
    """``task_id``, ``share``: the mean share of ``behaviour`` per task (labelled chains only)."""
    return (chains.filter((pl.col("label") == behaviour) & pl.col("fraction").is_not_null())
            .group_by("task_id").agg(share=pl.col("fraction").mean()).sort("task_id"))


def _unlabelled(chains: pl.DataFrame, behaviour: str) -> int:
    return chains.filter((pl.col("label") == behaviour) & pl.col("fraction").is_null()).height


def _several_coefficients(summary: pl.DataFrame) -> bool:
    steered = summary.filter(pl.col("direction") != "none")
    return steered.select(pl.col("coefficient").n_unique()).item() > 1 if steered.height else False


def _unlabelled_note(row: dict[str, Any]) -> str:
    n = row["n_unlabelled"]
    return f"; {n} chain(s) with no labelled token left out" if n else ""
