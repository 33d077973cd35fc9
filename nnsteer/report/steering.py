"""The report's sections on steering: behaviour shares (Figure 4), the forest plot of paired
differences beside the random control, the dose-response, and the costs with the coefficient sweep."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import altair as alt
import polars as pl

from nnsteer.evaluation.costs import (
    METRIC_DISPLAY,
    costs_text,
    summarise_costs,
    tradeoff_chart,
    tradeoff_rows,
    unvaried_metrics,
)
from nnsteer.evaluation.paired import CONDITION_COLOURS, condition_name, interval_text
from nnsteer.evaluation.shares import SHARE_COLUMNS, steering_chart, summarise, summary_text
from nnsteer.report.blocks import (
    CHARTS,
    Section,
    Unavailable,
    html_table,
    layer_choices,
    need,
)
from nnsteer.runs.store import RunDir, read_metadata, read_parquet
from nnsteer.selection.strength import sweep_frame


def steering_summary(run: RunDir) -> pl.DataFrame:
    """:func:`nnsteer.evaluation.shares.summarise` of the run's evaluation, with the draws it used."""
    return _summary_of_evaluation(run, summarise)


def _summary_of_evaluation(run: RunDir, summary: Callable[..., pl.DataFrame]) -> pl.DataFrame:
    """``summary(evaluation, n_boot=..., seed=...)`` with the draws ``evaluate`` used."""
    evaluation = read_parquet(need(run.evaluation), columns=SHARE_COLUMNS)
    options = read_metadata(run.evaluation).get("options", {})
    same_draws = {k: options[k] for k in ("n_boot", "seed") if k in options}
    return summary(evaluation, **same_draws)


def steering_section(run: RunDir) -> Section:
    """Behaviour shares with and without steering, with intervals, and the plain summary;
    with several coefficients, share against signed coefficient (dose-response)."""
    summary = steering_summary(run)
    text = summary_text(summary)
    table = html_table(conditions_table(summary, _steering_layers(run)))
    if _n_coefficients(summary) > 1:
        chart, note = dose_response_chart(summary), (
            "<p>Several coefficients were steered: share of each behaviour against the signed "
            "coefficient (positive steering right of 0, negative left, the baseline at 0), "
            "with 95% bootstrap intervals.</p>")
    else:
        chart = steering_chart(summary)
        note = "<p>Absolute shares; a black tick marks each bar's value, so a 0% bar shows.</p>"
    return Section(CHARTS["steering"], note + table + f"<pre>{html.escape(text)}</pre>",
                   "steering", chart.to_dict())


def conditions_table(summary: pl.DataFrame, layers: dict[str, list[int]]) -> pl.DataFrame:
    """One row per behaviour and condition: coefficient, layers, tasks, share and paired
    difference with their intervals (pp)."""
    rows = []
    for r in summary.iter_rows(named=True):
        steered = r["direction"] != "none"
        rows.append({
            "behaviour": r["behaviour"], "condition": condition_name(r, with_coefficient=False),
            "coefficient": f"{r['coefficient']:g}" if steered else "—",
            "layers": ", ".join(map(str, layers.get(r["behaviour"], []))) if steered else "—",
            "tasks": r["n_tasks"],
            "share %": _with_interval(r["mean"], r["ci_low"], r["ci_high"], ".1f"),
            "vs baseline (pp)": _with_interval(r["diff"], r["diff_low"], r["diff_high"], "+.1f")
            if steered else "—",
        })
    return pl.DataFrame(rows)


def _with_interval(value: float | None, low: float | None, high: float | None, fmt: str) -> str:
    if value is None:
        return "—"
    text = interval_text(value, low, high, fmt)
    return f"{text} (too few tasks for an interval)" if low is None else text


def _steering_layers(run: RunDir) -> dict[str, list[int]]:
    return {label: list(v.layers) for label, v in layer_choices(run).items()}


def _n_coefficients(summary: pl.DataFrame) -> int:
    return summary.filter(pl.col("direction") != "none")["coefficient"].n_unique()


def forest_section(run: RunDir) -> Section:
    """The paired differences the verdicts come from, next to the random control."""
    summary = steering_summary(run)
    unit = summary["unit"][0] if summary.height else ""
    body = (f"<p>Paired difference steered − baseline on the same tasks, in percentage points "
            f"of the {html.escape(unit)}, with its 95% bootstrap interval; the orange rows are "
            "the norm-matched random vector at the same layers and coefficient. A verdict needs "
            "an interval that excludes 0 (the dashed line) for the behaviour vector and not "
            "for the random one. Points without a bar had too few tasks for an interval.</p>")
    return Section(CHARTS["forest"], body, "forest",
                   forest_chart(summary, _steering_layers(run)).to_dict())


def forest_chart(summary: pl.DataFrame, layers: dict[str, list[int]]) -> Any:
    """Per behaviour: one row per steered condition, the paired difference (pp) as a point
    with its interval, the random control's rows beside the behaviour vector's."""

    steered = summary.filter(pl.col("direction") != "none")
    rows = [{"behaviour": r["behaviour"], "vector": r["vector"], "mode": r.get("mode", "all"),
             "condition": f"{condition_name(r, with_coefficient=False)} ×{r['coefficient']:g} (n={r['n_pairs']})",
             "diff": 100 * r["diff"] if r["diff"] is not None else None,
             "low": 100 * r["diff_low"] if r["diff_low"] is not None else None,
             "high": 100 * r["diff_high"] if r["diff_high"] is not None else None,
             "layers": ", ".join(map(str, layers.get(r["behaviour"], [])))}
            for r in steered.iter_rows(named=True)]
    data = pl.DataFrame(rows, schema={"behaviour": pl.String, "vector": pl.String,
                                      "mode": pl.String, "condition": pl.String, "diff": pl.Float64,
                                      "low": pl.Float64, "high": pl.Float64, "layers": pl.String})
    colour = alt.Color("vector:N", title="vector", scale=alt.Scale(
        domain=["behaviour", "random"], range=[CONDITION_COLOURS["behaviour"], CONDITION_COLOURS["random"]]))
    y = alt.Y("condition:N", title=None, sort=None)
    title = "steered − baseline (pp), 95% interval"
    layered = alt.layer(
        alt.Chart().mark_rule(strokeDash=[4, 3], color="#555555").encode(x=alt.datum(0)),
        alt.Chart().mark_rule(strokeWidth=2).encode(
            y=y, x=alt.X("low:Q", title=title), x2="high:Q", color=colour),
        alt.Chart().mark_point(filled=True, size=60, opacity=1).encode(
            y=y, x=alt.X("diff:Q", title=title), color=colour,
            tooltip=["behaviour", "condition", "layers", alt.Tooltip("diff:Q", format="+.1f"),
                     alt.Tooltip("low:Q", format="+.1f"), alt.Tooltip("high:Q", format="+.1f")]),
        data=data,
    ).properties(width=520)
    behaviours = list(dict.fromkeys(data["behaviour"].to_list()))
    modes = list(dict.fromkeys(data["mode"].to_list()))
    return layered.facet(row=alt.Row("behaviour:N", title=None, sort=behaviours, header=alt.Header(
        labelAngle=0, labelAlign="left", labelFontWeight="bold")),
        column=alt.Column("mode:N", title="steering mode", sort=modes)).resolve_scale(
        y="independent").properties(title=alt.Title(
            "Paired change against the baseline, behaviour vector and random control",
            subtitle="point: mean over tasks of steered − baseline; bar: 95% bootstrap interval; "
                     "dashed: no change"))


def dose_response_chart(summary: pl.DataFrame) -> Any:
    """Per behaviour: its share against the signed coefficient (negative steering < 0 <
    positive), one line for the behaviour vector and one for the random control, with
    95% bootstrap intervals; the baseline at 0 on both."""

    rows = []
    for r in summary.iter_rows(named=True):
        kinds = ["behaviour", "random"] if r["direction"] == "none" else [r["vector"]]
        sign = {"positive": 1, "negative": -1, "none": 0}[r["direction"]]
        for kind in kinds:
            rows.append({"behaviour": r["behaviour"], "vector": kind,
                         "signed coefficient": sign * (r["coefficient"] or 0.0),
                         "share": 100 * r["mean"] if r["mean"] is not None else None,
                         "low": 100 * r["ci_low"] if r["ci_low"] is not None else None,
                         "high": 100 * r["ci_high"] if r["ci_high"] is not None else None,
                         "tasks": r["n_tasks"]})
    data = pl.DataFrame(rows)
    unit = summary["unit"][0] if summary.height else ""
    colour = alt.Color("vector:N", title="vector", scale=alt.Scale(
        domain=["behaviour", "random"], range=[CONDITION_COLOURS["behaviour"], CONDITION_COLOURS["random"]]))
    base = alt.Chart(data).encode(x=alt.X("signed coefficient:Q", title="signed coefficient"))
    layered = alt.layer(
        base.mark_errorbar(ticks=True).encode(y=alt.Y("low:Q", title=f"{unit} (%)"), y2="high:Q",
                                              color=colour),
        base.mark_line(point=True).encode(
            y=alt.Y("share:Q", title=f"{unit} (%)"), color=colour,
            tooltip=["behaviour", "vector", "signed coefficient",
                     alt.Tooltip("share:Q", format=".1f"), alt.Tooltip("low:Q", format=".1f"),
                     alt.Tooltip("high:Q", format=".1f"), "tasks"]),
    ).properties(width=260, height=200)
    behaviours = list(dict.fromkeys(data["behaviour"].to_list()))
    return layered.facet(column=alt.Column("behaviour:N", title=None, sort=behaviours)).properties(
        title=alt.Title("Dose-response", subtitle="share against signed coefficient; "
                        "whiskers: 95% bootstrap interval"))


def cost_summary(run: RunDir) -> pl.DataFrame:
    """:func:`nnsteer.evaluation.costs.summarise_costs` of the run's evaluation, with the draws it used."""
    return _summary_of_evaluation(run, summarise_costs)


def costs_section(run: RunDir) -> Section:
    """Per steered condition, the behaviour change against each cost, with intervals."""
    costs = cost_summary(run)
    if costs.is_empty():
        raise Unavailable("Not measured: this evaluation.parquet has no cost columns (rerun "
                           "`nnsteer evaluate`).")
    grader = read_metadata(run.evaluation).get("options", {}).get("grader", "offline")
    unvaried = unvaried_metrics(costs)
    if len(unvaried) == costs["metric"].n_unique():  # nothing moved: chart every metric
        unvaried = []
    rows = tradeoff_rows(steering_summary(run), costs.filter(~pl.col("metric").is_in(unvaried)))
    text = costs_text(costs, grader)
    if unvaried:
        names = ", ".join(METRIC_DISPLAY[m][0] for m in unvaried)
        text += f"\nNot charted: {names} (the same in every condition)."
    body = ("<p>Each point is one steered condition: its paired change in the target behaviour "
            "(y) against its paired change in one cost (x), both against the unsteered chain of "
            "the same task, with 95% bootstrap intervals. Accuracy, closed thinking and answered "
            "are shares of chains (pp); repetition is the share of repeated token n-grams in the "
            "reasoning; compression ratio is zlib's on the reasoning (loops compress well); NLL is "
            "the reasoning's mean negative log-likelihood under the unsteered model (coherence). "
            "See docs/costs.md.</p>" + f"<pre>{html.escape(text.strip())}</pre>"
            + sweep_html(run))
    return Section(CHARTS["costs"], body, "costs",
                   tradeoff_chart(rows).to_dict())


def sweep_html(run: RunDir) -> str:
    """``select --coefficient auto``'s sweep with its bounds, from ``layers.json``
    (``""`` if the coefficients were fixed)."""
    entries = layer_choices(run)
    frame = sweep_frame(
        {label: entry.provenance for label, entry in entries.items()})
    if frame.is_empty():
        return ""
    record = next(e.provenance["coefficient_sweep"] for e in entries.values()
                  if "coefficient_sweep" in e.provenance)
    bounds = record["bounds"]
    return ("<h3>How hard to steer: the coefficient sweep</h3><p>"
            "<code>select --coefficient auto</code> steered the validation tasks positively at "
            "each coefficient and chose the largest whose behaviour effect was positive and "
            f"whose costs stayed within bounds: coherence (NLL) at most +{bounds['coherence']:g} "
            f"nats/token, repetition at most +{bounds['repetition']:g} pp, accuracy at most "
            f"−{bounds['accuracy']:g} pp. Effects and costs are paired differences from the "
            "unsteered chain of the same validation task (effect and costs in pp, coherence in "
            "nats/token).</p>" + html_table(frame))
