"""Does steering change the behaviour it targets? (paper Figure 4, with the statistics).

:func:`evaluate` annotates the steered chains with the annotator used in training,
counts per chain the tokens of each label and their share of a denominator (all
labelled tokens, or the four steered labels as the released code does), and writes
``evaluation.parquet``, the Figure 4 chart and a plain-text summary.

:func:`summarise` aggregates per behaviour and condition (direction, vector,
coefficient) the share of *that* behaviour's label: its mean over tasks with a
percentile-bootstrap 95% interval, and the paired difference against the unsteered
chain of the same task with its own interval.

Example:
    >>> evaluation = evaluate(RunDir("runs/smollm2-135m"))
    >>> print(summary_text(summarise(evaluation)))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import altair as alt
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from nnsteer.annotation.stage import annotate_chains, resolve_annotator, spans_by_chain, token_label_counts
from nnsteer.errors import BadInput, public_url
from nnsteer.labels import LABELS, STEERED_LABELS
from nnsteer.modeling.positions import decode_response, token_offsets
from nnsteer.stats import ALPHA, P_DRAWS, bootstrap_means, bootstrap_p, holm
from nnsteer.runs.store import (
    RunDir, atomic_path, provenance, read_complete, read_metadata, read_parquet, write_parquet,
    write_text,
)

if TYPE_CHECKING:
    from nnsteer.modeling.models import LoadedModel

#: The labels whose tokens make up the denominator of a share.
DENOMINATORS: dict[str, tuple[str, ...]] = {"labelled": LABELS, "steered": STEERED_LABELS}
#: What a share is a share of, named in every table, chart and sentence.
UNITS: dict[str, str] = {
    "labelled": "share of labelled tokens",
    "steered": "share of tokens with one of the four steered labels",
}
#: Fewest tasks for an interval and a verdict. A percentile bootstrap over n tasks is
#: no 95% interval for small n: simulated on normal data, its coverage is 50% at n = 2,
#: 76% at 3, 83% at 5, 86% at 6 and 89% at 8 (and still 89% at 10). Below this, means
#: are shown without intervals and no verdict is drawn.
MIN_TASKS_FOR_INTERVAL = 8
DIRECTIONS = ("none", "positive", "negative")
VECTORS = ("none", "behaviour", "random")
#: What makes a condition: chains that agree on these were steered the same way.
CONDITION = ("direction", "vector", "coefficient", "mode")
SUMMARY_FILE = "summary.txt"
CHART_FILE = "steering.html"

_STEERED_COLUMNS = ["chain_id", "task_id", "model", "output_ids", "response", "behaviour",
                    "direction", "coefficient", "vector", "thinking_start", "thinking_end"]
_SPAN_COLUMNS = ["chain_id", "label", "start", "end", "text", "annotator", "status"]


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
    labels = _denominator_labels(denominator)
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


def bootstrap_interval(
    values: Sequence[float] | np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (NaNs if there are none)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan
    means = bootstrap_means(values, n_boot, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


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
    for behaviour in _ordered(steered_chains["behaviour"].drop_nulls().unique().to_list()):
        baseline = _per_task(baseline_chains, behaviour)
        rows.append({"behaviour": behaviour, "direction": "none", "vector": "none",
                     "coefficient": None, "mode": "none", **_share_stats(baseline, n_boot, seed, min_tasks),
                     "n_unlabelled": _unlabelled(baseline_chains, behaviour)})
        steered = steered_chains.filter(pl.col("behaviour") == behaviour)
        for key, group in sorted(steered.group_by(conditions), key=lambda kv: _condition_order(*kv[0])):
            shares = _per_task(group, behaviour)
            rows.append({"behaviour": behaviour, **dict(zip(conditions, key)),
                         **_share_stats(shares, n_boot, seed, min_tasks, baseline),
                         "n_unlabelled": _unlabelled(group, behaviour)})
    schema = {"behaviour": pl.String, "direction": pl.String, "vector": pl.String,
              "coefficient": pl.Float64, "mode": pl.String, "n_tasks": pl.Int64,
              "mean": pl.Float64,
              "ci_low": pl.Float64, "ci_high": pl.Float64, "n_pairs": pl.Int64,
              "diff": pl.Float64, "diff_low": pl.Float64, "diff_high": pl.Float64,
              "n_unlabelled": pl.Int64, "p": pl.Float64}
    return with_holm(pl.DataFrame(rows, schema=schema)).with_columns(unit=pl.lit(unit))


def with_holm(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` with ``p_holm``: its ``p`` column Holm-adjusted over all its rows."""
    return table.with_columns(p_holm=pl.Series(holm(table["p"].to_list()), dtype=pl.Float64))


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
        f"{_holm_note(summary)}",
    ]
    verdicts: dict[str, list[bool]] = {"positive": [], "negative": []}
    for base in baselines.iter_rows(named=True):
        behaviour = base["behaviour"]
        lines.append("")
        lines.append(f"{behaviour}: baseline {_pct(base)} ({base['n_tasks']} tasks"
                     f"{_unlabelled_note(base)})")
        steered = summary.filter((pl.col("behaviour") == behaviour) & (pl.col("direction") != "none"))
        for row in steered.iter_rows(named=True):
            verdict, achieved = _verdict(row)
            if row["vector"] == "behaviour" and row["diff_low"] is not None:
                verdicts[row["direction"]].append(achieved)
            lines.append(f"  {_condition_name(row)}: {_pct(row)}; {_diff(row)} vs baseline over "
                         f"{row['n_pairs']} tasks: {verdict}{_unlabelled_note(row)}")
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
        condition=pl.Series([_condition_name(r, several) for r in summary.iter_rows(named=True)],
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


def evaluate(
    run: RunDir, *, annotator: str | None = None, base_url: str | None = None,
    workers: int = 8, denominator: str = "labelled", n_boot: int = 2000, seed: int = 0,
    tokenizer: Any = None, timeout: float | None = None, retries: int | None = None,
    annotator_prompt: str | None = None, lm: LoadedModel | None = None, grader: str = "offline",
    batch_size: int = 8,
) -> pl.DataFrame:
    """Annotate the steered chains, write ``evaluation.parquet``, the chart and the summary.

    Every chain also gets what steering cost (:func:`nnsteer.evaluation.costs.cost_table`: the
    answer graded by ``grader``, ``offline`` or ``openai:<model>``; ``nll_unsteered`` under
    ``lm``, the unsteered model, in batches of ``batch_size``), joined onto its rows, and
    the summary their paired differences (:func:`nnsteer.evaluation.costs.summarise_costs`).

    ``annotator`` defaults to the one that annotated the training chains, and
    ``annotator_prompt`` (a prompt file, see ``annotate_chains``) to the training
    annotation's prompt file when the annotator is the same. Chains already
    in ``steered_annotations.parquet`` by that annotator are not annotated again.
    ``tokenizer`` defaults to the tokenizer of the steered chains' model. ``timeout`` and
    ``retries`` are the LLM annotator's (:func:`nnsteer.annotation.stage.annotate_chains`).
    """
    labels = _denominator_labels(denominator)
    if n_boot < 1:
        raise BadInput(f"--n-boot must be positive, got {n_boot}")
    from nnsteer.evaluation import costs as tradeoffs  # builds on this module

    tradeoffs.resolve_grader(grader)
    chains = _read_steered(run, labels)
    annotator = resolve_annotator(annotator or _training_annotator(run))
    if annotator_prompt is None and run.annotations.exists():
        recorded = read_metadata(run.annotations).get("options", {})
        if recorded.get("annotator") == annotator:
            annotator_prompt = recorded.get("annotator_prompt")
    tokenizer = tokenizer if tokenizer is not None else _chain_tokenizer(run, chains)
    _check_responses(run, chains, tokenizer)
    annotate_chains(run, annotator=annotator, base_url=base_url, workers=workers,
                    source="steered", tokenizer=tokenizer, timeout=timeout, retries=retries,
                    annotator_prompt=annotator_prompt)
    spans = read_parquet(run.steered_annotations, _SPAN_COLUMNS)

    evaluation = chain_fractions(chains, spans, tokenizer, denominator, progress=True)
    evaluation = evaluation.join(
        tradeoffs.cost_table(run, tokenizer, lm, grader=grader, base_url=base_url, workers=workers,
                             batch_size=batch_size, timeout=timeout, retries=retries),
        on="chain_id", how="left")
    options = {"annotator": annotator, "base_url": public_url(base_url), "denominator": denominator,
               "n_boot": n_boot, "seed": seed, "annotator_prompt": annotator_prompt,
               "grader": grader}
    meta = provenance("evaluate", options, read_metadata(run.steered).get("model"))
    meta["unit"] = UNITS[denominator]
    costs = tradeoffs.summarise_costs(evaluation, n_boot, seed)
    meta.update(tradeoffs.cost_metadata(costs, lm))
    write_parquet(evaluation, run.evaluation, meta)

    summary = summarise(evaluation, n_boot, seed)
    with atomic_path(run.charts / CHART_FILE) as tmp:
        steering_chart(summary).save(tmp, format="html", inline=True)
    write_text(run.root / SUMMARY_FILE, summary_text(summary) + tradeoffs.costs_text(costs, grader)
               + _unsteered_note(run))
    return evaluation


def _unsteered_note(run: RunDir) -> str:
    """A closing line naming the steered behaviours that got no vector, and why; or ``""``."""
    if not run.vectors.exists():
        return ""
    from nnsteer.vectors.extract import missing_vectors_note  # loads the model code: only when needed

    metadata = read_metadata(run.vectors)
    if not set(metadata.get("skipped_labels", [])) & set(STEERED_LABELS):
        return ""
    return f"\nNot steered: {missing_vectors_note(metadata, run.annotations.name)}.\n"


def _denominator_labels(denominator: str) -> tuple[str, ...]:
    if denominator not in DENOMINATORS:
        raise BadInput(f"--denominator must be one of {', '.join(DENOMINATORS)}, got {denominator!r}")
    return DENOMINATORS[denominator]


def _read_steered(run: RunDir, labels: tuple[str, ...]) -> pl.DataFrame:
    """The steered chains of a finished ``steer`` stage, checked row by row."""
    chains = read_complete(run.steered, _STEERED_COLUMNS)
    if chains.is_empty():
        raise BadInput(f"{run.steered}: no chains: the eval split had no tasks "
                       "(add eval tasks with `nnsteer tasks`, then run `nnsteer steer`)")
    for row, chain in enumerate(chains.iter_rows(named=True)):
        where = f"{run.steered}: row {row} (chain {chain['chain_id']})"
        if chain["direction"] not in DIRECTIONS:
            raise BadInput(f"{where}: direction {chain['direction']!r} is not one of {', '.join(DIRECTIONS)}")
        if chain["vector"] not in VECTORS:
            raise BadInput(f"{where}: vector {chain['vector']!r} is not one of {', '.join(VECTORS)}")
        steered = chain["direction"] != "none"
        if steered and chain["behaviour"] not in labels:
            raise BadInput(f"{where}: behaviour {chain['behaviour']!r} is not among the labels "
                           f"counted by this denominator ({', '.join(labels)})")
    if not (chains["direction"] == "none").any():
        raise BadInput(f"{run.steered}: no baseline chains (direction 'none') to compare with: "
                       "rerun `nnsteer steer`")
    if (chains["direction"] == "none").all():
        raise BadInput(f"{run.steered}: only baseline chains, none steered: rerun `nnsteer steer`")
    return chains


def _training_annotator(run: RunDir) -> str:
    """The annotator of ``annotations.parquet``: evaluation must annotate the same way."""
    if not run.annotations.exists():
        raise BadInput(f"{run.annotations} not found: pass --annotator, or run `nnsteer annotate` "
                       "so that steered chains are annotated like the training chains")
    annotator = read_metadata(run.annotations).get("options", {}).get("annotator")
    if annotator:
        return annotator
    names = read_parquet(run.annotations, ["annotator"])["annotator"].drop_nulls().unique().to_list()
    if len(names) != 1:
        raise BadInput(f"{run.annotations}: annotators {sorted(names)}: pass --annotator to choose one")
    return names[0]


def _chain_tokenizer(run: RunDir, chains: pl.DataFrame) -> Any:
    from nnsteer.modeling.models import load_tokenizer

    models = chains["model"].unique().to_list()
    if len(models) != 1:
        raise BadInput(f"{run.steered}: chains of several models {sorted(models)}")
    return load_tokenizer(models[0])


def _check_responses(run: RunDir, chains: pl.DataFrame, tokenizer: Any) -> None:
    """Spans are offsets into ``response``: it must be the decoding of ``output_ids``."""
    for row, chain in enumerate(chains.iter_rows(named=True)):
        if decode_response(tokenizer, chain["output_ids"]) != chain["response"]:
            raise BadInput(f"{run.steered}: row {row} (chain {chain['chain_id']}): response is not "
                           "the decoding of output_ids with this tokenizer (wrong model?)")


def _ordered(behaviours: list[str]) -> list[str]:
    """The paper's order first, then any other label."""
    order = list(STEERED_LABELS) + [label for label in LABELS if label not in STEERED_LABELS]
    return sorted(behaviours, key=order.index)


def _condition_order(direction: str, vector: str, coefficient: float, mode: str) -> tuple:
    return mode != "all", mode, VECTORS.index(vector), DIRECTIONS.index(direction), coefficient


def with_mode(chains: pl.DataFrame) -> pl.DataFrame:
    """``chains`` with a ``mode`` column: as written, or for a table from before steering
    modes, ``none`` for baselines and ``all`` (the paper's setting) for steered chains."""
    if "mode" in chains.columns:
        return chains
    return chains.with_columns(mode=pl.when(pl.col("direction") == "none").then(pl.lit("none"))
                               .otherwise(pl.lit("all")))


def _per_task(chains: pl.DataFrame, behaviour: str) -> pl.DataFrame:
    """``task_id``, ``share``: the mean share of ``behaviour`` per task (labelled chains only)."""
    return (chains.filter((pl.col("label") == behaviour) & pl.col("fraction").is_not_null())
            .group_by("task_id").agg(share=pl.col("fraction").mean()).sort("task_id"))


def _unlabelled(chains: pl.DataFrame, behaviour: str) -> int:
    return chains.filter((pl.col("label") == behaviour) & pl.col("fraction").is_null()).height


def _share_stats(shares: pl.DataFrame, n_boot: int, seed: int, min_tasks: int,
                 baseline: pl.DataFrame | None = None) -> dict[str, Any]:
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


def _several_coefficients(summary: pl.DataFrame) -> bool:
    steered = summary.filter(pl.col("direction") != "none")
    return steered.select(pl.col("coefficient").n_unique()).item() > 1 if steered.height else False


def _condition_name(row: dict[str, Any], with_coefficient: bool = True) -> str:
    if row["direction"] == "none":
        return "baseline"
    name = row["direction"] if row["vector"] == "behaviour" else f"random {row['direction']}"
    if row.get("mode", "all") != "all":
        name = f"{name} [{row['mode']}]"
    return f"{name} ×{row['coefficient']:g}" if with_coefficient else name


def _pct(row: dict[str, Any]) -> str:
    if row["mean"] is None:
        return "no chain with labelled tokens"
    if row["ci_low"] is None:
        return f"{100 * row['mean']:.1f}%"
    return f"{100 * row['mean']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def _diff(row: dict[str, Any]) -> str:
    if row["diff"] is None:
        return "no paired difference"
    if row["diff_low"] is None:
        return f"{100 * row['diff']:+.1f} pp"
    return f"{100 * row['diff']:+.1f} pp [{100 * row['diff_low']:+.1f}, {100 * row['diff_high']:+.1f}]"


def _verdict(row: dict[str, Any]) -> tuple[str, bool]:
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


def _holm_note(summary: pl.DataFrame) -> str:
    """How the verdicts allow for the study's many tests."""
    n = summary["p"].drop_nulls().len() if "p" in summary.columns else 0
    if not n:
        return "No condition has the tasks for a test."
    return (f"Verdicts use bootstrap tests Holm-adjusted across all {n} steered conditions "
            f"of the study (p < {ALPHA:g}); the intervals shown are unadjusted.")


def _unlabelled_note(row: dict[str, Any]) -> str:
    n = row["n_unlabelled"]
    return f"; {n} chain(s) with no labelled token left out" if n else ""
