"""What steering cost beside what it changed: the per-chain cost table of ``evaluate`` and
its paired summary.

:func:`cost_table` gives every steered and baseline chain ``correct`` (its final answer
against its task's ``answer``, by :mod:`nnsteer.evaluation.grader`) and the metrics of
:mod:`nnsteer.evaluation.metrics`. ``evaluate`` joins it onto ``evaluation.parquet``'s (chain, label)
rows by ``chain_id``, so each of a chain's rows carries its chain's figures (take one row
per ``chain_id`` to count chains).

:func:`summarise_costs` pairs each steered chain's figures with the unsteered chain of
the same task, per behaviour and condition (:data:`nnsteer.evaluation.paired.CONDITION`), as the
behaviour shares are: mean, paired difference, bootstrap 95% intervals, and a bootstrap
p-value Holm-adjusted per metric across all steered conditions of the study.
:func:`broken_conditions` names the conditions that moved their behaviour but made a
cost worse (Holm-adjusted).

Example:
    >>> costs = summarise_costs(pl.read_parquet("runs/demo/evaluation.parquet"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.errors import BadInput, say
from nnsteer.evaluation import metrics as chain_metrics
from nnsteer.evaluation.grader import (
    OFFLINE,
    gradable_offline,
    grade_answers,
    resolve_grader,
)
from nnsteer.evaluation.paired import (
    CONDITION,
    CONDITION_COLOURS,
    MIN_TASKS_FOR_INTERVAL,
    condition_name,
    condition_order,
    interval_text,
    share_stats,
    verdict,
    with_holm,
    with_mode,
)
from nnsteer.modeling.embedded import cache_dir
from nnsteer.modeling.models import LoadedModel
from nnsteer.runs.store import RunDir, read_complete, read_parquet
from nnsteer.stats import ALPHA

#: The figures every chain gets, in column order (``grader`` names how ``correct`` was found).
COLUMNS = ("correct", *chain_metrics.CHAIN_METRICS)
#: Per metric: its name in sentences, its unit, the factor to that unit, and which way is
#: worse (+1: higher is worse, -1: lower is worse, 0: neither).
METRIC_DISPLAY: dict[str, tuple[str, str, float, int]] = {
    "correct": ("accuracy", "pp", 100.0, -1),
    "reasoning_tokens": ("reasoning tokens", "tokens", 1.0, 0),
    "closed_thinking": ("closed thinking", "pp", 100.0, -1),
    "answered": ("answered", "pp", 100.0, -1),
    "repetition": (f"repeated {chain_metrics.NGRAM}-grams", "pp", 100.0, +1),
    "compression_ratio": ("compression ratio", "", 1.0, +1),
    "nll_unsteered": ("NLL under the unsteered model", "nats/token", 1.0, +1),
}

_CHAIN_COLUMNS = ["chain_id", "task_id", "prompt_ids", "output_ids", "response",
                  "thinking_start", "thinking_end", "finish_reason"]


def cost_table(
    run: RunDir, tokenizer: Any, lm: LoadedModel | None = None, *, grader: str = OFFLINE,
    base_url: str | None = None, workers: int = 8, batch_size: int = 8,
    timeout: float | None = None, retries: int | None = None, chains: Path | None = None,
) -> pl.DataFrame:
    """One row per chain of ``run.steered`` (or of the chains file ``chains``):
    ``chain_id``, :data:`COLUMNS` and ``grader``.

    ``nll_unsteered`` needs ``lm`` (the chains' model, run unsteered; null without it).
    Tasks with no reference answer, or one the offline grader cannot check, get a null
    ``correct``; the run says so once.
    """
    grader = resolve_grader(grader)
    chains = read_parquet(chains or run.steered, _CHAIN_COLUMNS)
    tasks = task_answers(run)
    rows = chains.join(tasks, on="task_id", how="left").to_dicts()
    references = [row["answer"] for row in rows]
    _say_ungraded(list({row["task_id"]: row["answer"] for row in rows}.values()), grader)
    options = {k: v for k, v in {"timeout": timeout, "retries": retries}.items() if v is not None}
    correct = grade_answers([chain_metrics.answer_text(row) for row in rows], references,
                            [row["prompt"] or "" for row in rows], grader=grader, base_url=base_url,
                            workers=workers, cache_dir=cache_dir() / "grades", **options)
    texts = [chain_metrics.text_costs(row, tokenizer) for row in rows]
    if lm is None:
        say("no model given: nll_unsteered is left empty")
        nll = [None] * len(rows)
    else:
        nll = chain_metrics.nll_unsteered(lm, rows, batch_size=batch_size, progress=True)
    table = [{"chain_id": row["chain_id"], "correct": ok, **vars(text), "nll_unsteered": value,
              "grader": grader} for row, ok, text, value in zip(rows, correct, texts, nll)]
    schema = {"chain_id": pl.String, "correct": pl.Boolean, "reasoning_tokens": pl.Int64,
              "closed_thinking": pl.Boolean, "answered": pl.Boolean, "repetition": pl.Float64,
              "compression_ratio": pl.Float64, "nll_unsteered": pl.Float64, "grader": pl.String}
    return pl.DataFrame(table, schema=schema)


def steered_model(run: RunDir) -> str | None:
    """The model that wrote ``run.steered`` (the one ``nll_unsteered`` runs unsteered);
    None if it has no chain."""

    models = read_complete(run.steered, ["model"])["model"].unique().to_list()
    if not models:
        return None
    if len(models) != 1:
        raise BadInput(f"{run.steered}: chains of {len(models)} models {sorted(models)}: "
                       "expected one")
    return models[0]


def cost_metadata(cost_summary: pl.DataFrame, lm: LoadedModel | None) -> dict[str, Any]:
    """What ``evaluation.parquet``'s metadata records of the costs: the paired summary
    (unadjusted and Holm-adjusted p), the n of the repetition n-grams, and the NLL's model."""
    return {"costs": cost_summary.to_dicts(), "repetition_ngram": chain_metrics.NGRAM,
            "nll_model": None if lm is None else lm.identity()}


def task_answers(run: RunDir) -> pl.DataFrame:
    """``task_id``, ``prompt``, ``answer`` of ``tasks.parquet`` (empty if there is none)."""
    if not run.tasks.exists():
        return pl.DataFrame(schema={"task_id": pl.String, "prompt": pl.String, "answer": pl.String})
    tasks = read_parquet(run.tasks, ["task_id", "prompt"])
    if "answer" not in tasks.columns:
        tasks = tasks.with_columns(answer=pl.lit(None, dtype=pl.String))
    return tasks.select("task_id", "prompt", "answer")


def _say_ungraded(answers: list[str | None], grader: str) -> None:
    """One line naming how many of the eval tasks' ``answers`` give no accuracy, and why."""
    missing = sum(1 for a in answers if not a)
    free = sum(1 for a in answers if a and grader == OFFLINE and not gradable_offline(a))
    if missing or free:
        parts = [f"{missing} have no reference answer"] if missing else []
        if free:
            parts.append(f"{free} have free-text answers the offline grader cannot check "
                         "(--grader openai:<model> can)")
        say(f"no accuracy for some eval tasks: of {len(answers)}, {' and '.join(parts)}")


def summarise_costs(evaluation: pl.DataFrame, n_boot: int = 2000, seed: int = 0,
                    min_tasks: int = MIN_TASKS_FOR_INTERVAL) -> pl.DataFrame:
    """Per metric, behaviour and condition: the metric's mean over tasks and its paired
    difference from the unsteered chain of the same task, with bootstrap intervals.

    Columns: ``metric``, ``behaviour`` (null for the baseline), the condition columns,
    ``n_tasks``, ``mean``, ``ci_low``, ``ci_high``, ``n_pairs``, ``diff``, ``diff_low``,
    ``diff_high``, ``p``, ``p_holm`` (Holm over all steered conditions, per metric) and
    ``unit``; the values are in the chain table's units (shares as fractions).
    Empty if ``evaluation`` has no cost columns.
    """
    present = [m for m in COLUMNS if m in evaluation.columns]
    chains = with_mode(evaluation).unique("chain_id", keep="first", maintain_order=True)
    baseline = chains.filter(pl.col("direction") == "none")
    steered = chains.filter(pl.col("direction") != "none")
    tables = []
    for metric in present:
        per_task = _per_task_metric(baseline, metric)
        rows = [{"metric": metric, "behaviour": None, "direction": "none", "vector": "none",
                 "coefficient": None, **share_stats(per_task, n_boot, seed, min_tasks)}]
        groups = steered.group_by(["behaviour", *CONDITION])
        for key, group in sorted(groups, key=lambda kv: (kv[0][0], condition_order(*kv[0][1:]))):
            shares = _per_task_metric(group, metric)
            if shares.is_empty():
                continue
            rows.append({"metric": metric, **dict(zip(["behaviour", *CONDITION], key)),
                         **share_stats(shares, n_boot, seed, min_tasks, per_task)})
        tables.append(with_holm(pl.DataFrame(rows, infer_schema_length=None)))
    if not tables:
        return pl.DataFrame()
    table = pl.concat(tables, how="diagonal_relaxed")
    return table.with_columns(unit=pl.col("metric").replace_strict(
        {m: METRIC_DISPLAY[m][1] for m in METRIC_DISPLAY}, default=""))


def _per_task_metric(chains: pl.DataFrame, metric: str) -> pl.DataFrame:
    """``task_id``, ``share``: the mean of ``metric`` per task (nulls left out)."""
    return (chains.filter(pl.col(metric).is_not_null())
            .group_by("task_id").agg(share=pl.col(metric).cast(pl.Float64).mean()).sort("task_id"))


def worse(row: dict[str, Any]) -> bool:
    """Whether a cost row's Holm-adjusted paired difference goes the bad way."""
    direction = METRIC_DISPLAY[row["metric"]][3]
    return (direction != 0 and row["p_holm"] is not None and row["p_holm"] < ALPHA
            and row["diff"] * direction > 0)


def broken_conditions(behaviour_summary: pl.DataFrame, cost_summary: pl.DataFrame) -> list[str]:
    """One sentence per behaviour-vector condition that moved its behaviour as intended
    (Holm-adjusted) but made some cost worse (Holm-adjusted)."""

    if cost_summary.is_empty():
        return []
    sentences = []
    for row in behaviour_summary.filter(pl.col("vector") == "behaviour").iter_rows(named=True):
        if not verdict(row)[1]:
            continue
        mine = cost_summary.filter(
            (pl.col("behaviour") == row["behaviour"])
            & pl.all_horizontal([pl.col(c).eq_missing(row[c]) for c in CONDITION]))
        harms = [cost_phrase(cost) for cost in mine.iter_rows(named=True) if worse(cost)]
        if harms:
            sentences.append(f"{row['behaviour']}, {condition_name(row)}: moved the behaviour "
                             f"but broke something: {'; '.join(harms)}.")
    return sentences


def cost_phrase(row: dict[str, Any]) -> str:
    """``accuracy -20.0 pp [-35.0, -5.0]``: a cost row's paired difference in its unit."""
    name, unit, scale, _ = METRIC_DISPLAY[row["metric"]]
    if row["diff"] is None:
        return f"{name}: no paired task"
    return f"{name} " + interval_text(row["diff"], row["diff_low"], row["diff_high"],
                                      f"+.{_digits(unit)}f", scale=scale,
                                      unit=f" {unit}" if unit else "")


def _digits(unit: str) -> int:
    return 1 if unit in ("pp", "tokens") else 2


def costs_text(cost_summary: pl.DataFrame, grader: str) -> str:
    """The costs part of ``summary.txt``: per condition, each metric's paired difference."""
    if cost_summary.is_empty():
        return ""
    lines = ["", f"Costs: paired differences from the unsteered chain of the same task, with "
             f"95% bootstrap intervals (unadjusted); 'worse' marks a Holm-adjusted p < {ALPHA:g} "
             f"across all steered conditions, per metric. Accuracy by the {grader} grader; "
             f"repetition counts token {chain_metrics.NGRAM}-grams."]
    baseline = cost_summary.filter(pl.col("direction") == "none")
    lines.append("  baseline: " + "; ".join(_mean_phrase(r) for r in baseline.iter_rows(named=True)))
    steered = cost_summary.filter(pl.col("direction") != "none")
    keys = steered.select("behaviour", *CONDITION).unique(maintain_order=True)
    for key in keys.iter_rows(named=True):
        mine = steered.filter(pl.all_horizontal([pl.col(c).eq_missing(v) for c, v in key.items()]))
        phrases = [cost_phrase(r) + (" worse" if worse(r) else "") for r in mine.iter_rows(named=True)]
        lines.append(f"  {key['behaviour']}, {condition_name(key)}: {'; '.join(phrases)}")
    return "\n".join(lines) + "\n"


def _mean_phrase(row: dict[str, Any]) -> str:
    name, unit, scale, _ = METRIC_DISPLAY[row["metric"]]
    if row["mean"] is None:
        return f"{name}: none"
    value = scale * row["mean"]
    unit = {"pp": "%"}.get(unit, f" {unit}" if unit else "")
    return f"{name} {value:.{_digits(METRIC_DISPLAY[row['metric']][1])}f}{unit}"


def unvaried_metrics(cost_summary: pl.DataFrame) -> list[str]:
    """The metrics of a :func:`summarise_costs` table that no condition moved: the same mean
    in every condition, every paired difference 0 (e.g. accuracy 0% everywhere)."""
    unvaried = []
    for (metric,), rows in cost_summary.group_by("metric", maintain_order=True):
        means = rows["mean"].drop_nulls()
        diffs = rows["diff"].drop_nulls()
        if means.n_unique() <= 1 and (diffs == 0).all():
            unvaried.append(metric)
    return unvaried


def tradeoff_rows(behaviour_summary: pl.DataFrame, cost_summary: pl.DataFrame) -> pl.DataFrame:
    """Per steered condition and cost metric: the behaviour's paired change (pp) and the
    cost's (in the metric's unit), each with its interval (null below the tasks needed)."""
    rows = []
    behaviours = behaviour_summary.filter(pl.col("direction") != "none")
    for b in behaviours.iter_rows(named=True):
        mine = cost_summary.filter(
            (pl.col("behaviour") == b["behaviour"])
            & pl.all_horizontal([pl.col(c).eq_missing(b[c]) for c in CONDITION]))
        for c in mine.iter_rows(named=True):
            name, unit, scale, _ = METRIC_DISPLAY[c["metric"]]
            rows.append({
                "behaviour": b["behaviour"], "condition": condition_name(b), "vector": b["vector"],
                "metric": f"{name} ({unit})" if unit else name,
                **{f"change{k}": None if b[f"diff{k}"] is None else 100 * b[f"diff{k}"]
                   for k in ("", "_low", "_high")},
                **{f"cost{k}": None if c[f"diff{k}"] is None else scale * c[f"diff{k}"]
                   for k in ("", "_low", "_high")},
                "worse": worse(c)})
    schema = {"behaviour": pl.String, "condition": pl.String, "vector": pl.String,
              "metric": pl.String, "change": pl.Float64, "change_low": pl.Float64,
              "change_high": pl.Float64, "cost": pl.Float64, "cost_low": pl.Float64,
              "cost_high": pl.Float64, "worse": pl.Boolean}
    return pl.DataFrame(rows, schema=schema)


def tradeoff_chart(rows: pl.DataFrame) -> Any:
    """One panel per cost: each steered condition's behaviour change (y, pp) against its
    cost change (x), both paired with the baseline, with 95% intervals as whiskers."""
    import altair as alt

    colour = alt.Color("vector:N", title="vector", scale=alt.Scale(
        domain=["behaviour", "random"], range=[CONDITION_COLOURS["behaviour"], CONDITION_COLOURS["random"]]))
    x = alt.X("cost:Q", title="cost: steered − baseline")
    y = alt.Y("change:Q", title="behaviour: steered − baseline (pp)")
    tooltip = ["behaviour", "condition", "metric", alt.Tooltip("cost:Q", format="+.3g"),
               alt.Tooltip("cost_low:Q", format="+.3g"), alt.Tooltip("cost_high:Q", format="+.3g"),
               alt.Tooltip("change:Q", format="+.1f"), "worse"]
    layered = alt.layer(
        alt.Chart().mark_rule(strokeDash=[4, 3], color="#999999").encode(x=alt.datum(0)),
        alt.Chart().mark_rule(strokeDash=[4, 3], color="#999999").encode(y=alt.datum(0)),
        alt.Chart().mark_rule().encode(x=alt.X("cost_low:Q", title="cost: steered − baseline"),
                                       x2="cost_high:Q", y=y, color=colour),
        alt.Chart().mark_rule().encode(y=alt.Y("change_low:Q", title="behaviour: steered − baseline (pp)"),
                                       y2="change_high:Q", x=x, color=colour),
        alt.Chart().mark_point(filled=True, size=60, opacity=1).encode(
            x=x, y=y, color=colour, tooltip=tooltip,
            shape=alt.Shape("behaviour:N", title="behaviour")),
        data=rows,
    ).properties(width=230, height=180)
    metrics = list(dict.fromkeys(rows["metric"].to_list()))
    return layered.facet(facet=alt.Facet("metric:N", title=None, sort=metrics), columns=3
                         ).resolve_scale(x="independent").properties(title=alt.Title(
                             "What steering cost beside what it changed",
                             subtitle="paired with the unsteered chain of each task; whiskers: "
                                      "95% bootstrap intervals; dashed: no change"))


def chain_figures(row: dict[str, Any]) -> str:
    """One line of a chain's cost figures (a row of ``evaluation.parquet``)."""
    def pct(value: Any) -> str:
        return "—" if value is None else f"{100 * value:.0f}%"

    def yes(value: Any) -> str:
        return "—" if value is None else ("yes" if value else "no")

    def num(value: Any, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    return (f"correct: {yes(row.get('correct'))}; reasoning tokens: {row.get('reasoning_tokens')}; "
            f"closed thinking: {yes(row.get('closed_thinking'))}; answered: {yes(row.get('answered'))}; "
            f"repeated {chain_metrics.NGRAM}-grams: {pct(row.get('repetition'))}; compression ratio: "
            f"{num(row.get('compression_ratio'))}; NLL unsteered: {num(row.get('nll_unsteered'))} nats/token")

