"""``report.html``: one self-contained page with every result of a run, plus chart files.

The page inlines the Vega, Vega-Lite and vega-embed JavaScript (from ``vl-convert``),
so it renders with no network. Each stage's section shows "not run yet" until the
stage's file exists. Every chart is also written to ``charts/<name>.png`` and ``.svg``.

Example:
    >>> write_report(RunDir("runs/demo"))
    PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import functools
import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.annotation.learned import measured_agreement
from nnsteer.errors import BadInput
from nnsteer.evaluation.costs import (
    broken_conditions,
    chain_figures,
    costs_text,
    summarise_costs,
    tradeoff_chart,
    tradeoff_rows,
)
from nnsteer.evaluation.shares import steering_chart, summarise, summary_text
from nnsteer.labels import LABELS
from nnsteer.runs.registry import STAGES, producer
from nnsteer.runs.store import (
    RunDir,
    nnsteer_version,
    now_iso,
    read_metadata,
    read_parquet,
    write_text,
)
from nnsteer.selection.layers import first_allowed_layer, rank_layers
from nnsteer.selection.strength import sweep_frame
from nnsteer.steer.choices import read_layers
from nnsteer.vectors.extract import (
    cosine_similarity,
    load_vectors,
    missing_vectors_note,
)

#: Chart name → section title, in page order.
CHARTS = {
    "attribution": "Attribution per layer (Figure 3)",
    "validation": "Does the attribution metric track real patching?",
    "similarity": "Cosine similarity of the vectors",
    "steering": "Steering on unseen tasks (Figure 4)",
    "forest": "Steering effects against the baseline, with the random control",
    "costs": "Costs: what steering broke beside what it changed",
}
#: One colour per condition kind, the same in every steering chart.
CONDITION_COLOURS = {"baseline": "#888888", "behaviour": "#1f77b4", "random": "#ff7f0e"}
#: One colour per attribution metric in the validation chart (``exact`` is the truth).
METRIC_COLOURS = {"exact": "#222222", "nll": "#1f77b4", "kl2": "#2ca02c",
                  "released-code": "#d62728"}


@dataclass
class Section:
    """A titled part of the page: HTML, and optionally a Vega-Lite chart below it."""

    title: str
    body: str
    chart: str | None = None
    spec: dict[str, Any] | None = None


class _Unavailable(Exception):
    """A section cannot be built yet; the message says why."""


def write_report(run: RunDir) -> Path:
    """Write ``report.html`` and the PNG/SVG chart files of ``run``; return the page's path."""
    if not run.root.is_dir():
        raise BadInput(f"{run.root}: no such run directory")
    sections = [_section(title, build, run) for title, build in _BUILDERS]
    charts = {s.chart: s.spec for s in sections if s.spec is not None}
    save_charts(charts, run.charts)
    write_text(run.report, render_page(f"nnsteer report: {run.root.name}", sections))
    return run.report


def chart_spec(run: RunDir, name: str) -> dict[str, Any]:
    """The Vega-Lite spec of one report chart (a key of :data:`CHARTS`); :class:`BadInput`
    if the stage it shows has not run."""
    if name not in CHARTS:
        raise BadInput(f"unknown chart {name!r}: expected one of {', '.join(CHARTS)}")
    build = next(build for title, build in _BUILDERS if title == CHARTS[name])
    try:
        return build(run).spec
    except _Unavailable as exc:
        raise BadInput(str(exc)) from None


def save_charts(charts: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """Write each Vega-Lite spec as ``<name>.png`` (2x) and ``<name>.svg`` in ``folder``."""
    import vl_convert as vlc

    written: list[Path] = []
    if charts:
        folder.mkdir(parents=True, exist_ok=True)
    for name, spec in charts.items():
        png, svg = folder / f"{name}.png", folder / f"{name}.svg"
        png.write_bytes(vlc.vegalite_to_png(spec, scale=2))
        svg.write_text(vlc.vegalite_to_svg(spec))
        written += [png, svg]
    return written


def render_page(title: str, sections: list[Section]) -> str:
    """The HTML page: sections in order, charts embedded with the JavaScript inlined."""
    specs = {s.chart: s.spec for s in sections if s.spec is not None}
    body = "\n".join(
        f'<section><h2>{html.escape(s.title)}</h2>\n{s.body}\n'
        + (f'<div class="chart" id="chart-{s.chart}"></div>' if s.spec is not None else "")
        + "</section>"
        for s in sections
    )
    return _PAGE.format(
        title=html.escape(title),
        body=body,
        bundle=_script_safe(_javascript_bundle()),
        specs=_script_safe(json.dumps(specs)),
    )


@functools.cache
def _javascript_bundle() -> str:
    import vl_convert as vlc

    return vlc.javascript_bundle()


def _script_safe(text: str) -> str:
    """Text that cannot close the ``<script>`` element it is inlined in."""
    return re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)


def _section(title: str, build: Callable[[RunDir], Section], run: RunDir) -> Section:
    try:
        return build(run)
    except _Unavailable as exc:
        return Section(title, f'<p class="missing">{html.escape(str(exc))}</p>')


def _need(path: Path) -> Path:
    if not path.exists():
        raise _Unavailable(f"Not run yet: {path.name} is missing (run `nnsteer {producer(path.name)}`).")
    return path


def _table(df: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
        for row in df.iter_rows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return "" if value is None else str(value)


def overview_section(run: RunDir) -> Section:
    """The first lines: behaviours that got no vector (so were not steered), and the
    verdicts of the evaluation."""
    lines = []
    if run.vectors.exists():
        metadata = read_metadata(run.vectors)
        if metadata.get("skipped_labels"):
            note = missing_vectors_note
            text = note(metadata, run.annotations.name)
            lines.append(text[:1].upper() + text[1:] + ".")
    if run.evaluation.exists():
        summary = steering_summary(run)
        text = summary_text(summary)
        lines += [line for line in text.splitlines() if line.endswith("conditions.")]
        lines += broken_conditions(summary, cost_summary(run))
    if not lines:
        raise _Unavailable("Nothing to say yet: run the vectors and steering stages.")
    return Section("At a glance", "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
                   + "</ul>")


def provenance_section(run: RunDir) -> Section:
    """Who made each file: stage, model and revision, options, nnsteer version, time."""
    rows = []
    for name, stage in ((name, s.name) for s in STAGES for name in s.output_files()):
        path = run.path(name)
        if not path.exists() or path.suffix not in (".parquet", ".safetensors", ".json"):
            continue
        meta = _file_provenance(run, path)
        model = meta.get("model") or {}
        rows.append({
            "file": name, "stage": meta.get("stage", stage),
            "model": model.get("model", ""), "revision": str(model.get("revision") or ""),
            "options": json.dumps(meta.get("options", {}), sort_keys=True, default=str),
            "nnsteer": meta.get("nnsteer", ""), "time": meta.get("time", ""),
        })
    if not rows:
        raise _Unavailable("Not run yet: the run directory holds no stage outputs.")
    intro = (f"<p>Run directory <code>{html.escape(str(run.root))}</code>; report written "
             f"{now_iso()} by nnsteer {nnsteer_version()}.</p>")
    return Section("Provenance", intro + _table(pl.DataFrame(rows)))


def _file_provenance(run: RunDir, path: Path) -> dict[str, Any]:
    """A stage output's provenance: file metadata, or for ``layers.json`` its entries' own."""
    if path.suffix != ".json":
        return read_metadata(path)
    return _select_provenance(_layer_choices(run)) if path == run.layers else {}


def _select_provenance(entries: dict[str, Any]) -> dict[str, Any]:
    """The provenance ``select`` wrote into every entry of ``layers.json`` ({} if none)."""
    return next(iter(entries.values())).provenance if entries else {}


def _layer_choices(run: RunDir) -> dict[str, Any]:
    """``layers.json`` read and checked by ``select``'s reader ({} if ``select`` has not run)."""
    if not run.layers.exists():
        return {}
    return read_layers(run.layers)


def label_counts_section(run: RunDir) -> Section:
    """Spans and chains per label in the training annotations, by alignment status."""
    spans = read_parquet(_need(run.annotations), columns=["chain_id", "label", "status", "annotator"])
    counts = (
        spans.group_by("label")
        .agg(
            spans=(pl.col("status") == "ok").sum(),
            chains=pl.col("chain_id").filter(pl.col("status") == "ok").n_unique(),
            unaligned=(pl.col("status") == "unaligned").sum(),
            unknown_label=(pl.col("status") == "unknown-label").sum(),
        )
    )
    every_label = pl.DataFrame({"label": list(LABELS)})  # labels never found show as 0
    counts = every_label.join(counts, on="label", how="full", coalesce=True, maintain_order="left")
    counts = counts.fill_null(0)
    n_chains = spans["chain_id"].n_unique()
    annotators = sorted(spans["annotator"].drop_nulls().unique())
    by = ", ".join(f"<code>{html.escape(a)}</code>" for a in annotators)
    note = (f"<p>{n_chains} chains annotated by {by}; spans counted with status <code>ok</code>; "
            "unaligned and unknown-label spans are reported and skipped.</p>")
    if "rules" in annotators:
        note += ("<p><strong>Approximate labels:</strong> the offline <code>rules</code> annotator "
                 "labels sentences from their wording; on R1-distill chains it agrees with a "
                 "GPT-4-class annotator at a word-level macro-F1 of about 0.55–0.6 (docs/benchmarks.md, "
                 "Measured figures). Use an LLM annotator for results.</p>")
    if "learned" in annotators:
        note += (f"<p><strong>Approximate labels:</strong> {html.escape(measured_agreement())} "
                 "Use an LLM annotator for results.</p>")
    return Section("Behaviour labels", note + _table(counts))


def attribution_section(run: RunDir) -> Section:
    """Figure 3: mean |ΔL| per layer and label, with the layers ``select`` skipped,
    chose and ranked second."""
    df = read_parquet(_need(run.attribution))
    metric = ", ".join(sorted(df["metric"].unique().to_list())) if "metric" in df.columns else "?"
    marks = layer_marks(run, df)
    skipped = marks.first_allowed
    aggregate = read_metadata(run.attribution).get("options", {}).get("aggregate", "spans")
    over, unit = (("the label's spans", "spans") if aggregate == "spans"
                  else ("the chains of each chain's mean over its spans", "chains"))
    body = (f"<p>Metric: <code>{html.escape(metric)}</code>; averaged over "
            f"<code>{html.escape(str(aggregate))}</code> (<code>attribute --aggregate</code>). "
            f"Line: mean |ΔL| over {over} at each layer; band: ±1 standard deviation over "
            f"those {unit}, clipped at 0 "
            f"(|ΔL| cannot be negative): the spread of single {unit}, not an interval of the mean. "
            "Every panel has the same y scale, so the labels' effects compare directly; "
            "each panel's title gives its number of spans.")
    if marks.chosen:
        body += (" Solid rule: the layer <code>select</code> chose; dashed: the runner-up"
                 + (f"; grey: layers 0–{skipped - 1}, which select skipped "
                    f"(<code>skip_fraction</code> {marks.skip_fraction:g})" if skipped else "")
                 + ".")
    else:
        body += " Run <code>nnsteer select</code> to mark the chosen layers."
    return Section(CHARTS["attribution"], body + "</p>", "attribution",
                   figure3_chart(df, marks).to_dict())


@dataclass(frozen=True)
class LayerMarks:
    """What ``select`` made of the attribution: per label the chosen layers and runner-up,
    and the first layer it could choose (0 when it skipped none or is unknown)."""

    chosen: dict[str, list[int]]
    runner_up: dict[str, int]
    first_allowed: int = 0
    skip_fraction: float = 0.0


def layer_marks(run: RunDir, attribution: pl.DataFrame) -> LayerMarks:
    """The :class:`LayerMarks` of ``layers.json`` (none if ``select`` has not run)."""
    entries = _layer_choices(run)
    if not entries:
        return LayerMarks({}, {})
    options = _select_provenance(entries).get("options", {})
    skip_fraction = float(options.get("skip_fraction") or 0.0)
    n_layers = int(attribution["layer"].max()) + 1 if attribution.height else 0
    first = first_allowed_layer(n_layers, skip_fraction) if n_layers else 0
    chosen, runner_up = {}, {}
    for label, entry in entries.items():
        chosen[label] = list(entry.layers)
        if entry.chosen_by == "attribution" and label in attribution["label"].to_list():
            ranked = rank_layers(attribution, label, first, int(options.get("top_k") or 1))
            if ranked.runner_up is not None:
                runner_up[label] = ranked.runner_up
    return LayerMarks(chosen, runner_up, first, skip_fraction)


def figure3_chart(df: pl.DataFrame, marks: LayerMarks) -> Any:
    """One panel per label, two per row: line, ±1 SD band, skipped layers shaded,
    chosen layer (solid rule) and runner-up (dashed); one y scale for all panels."""
    import altair as alt

    data = df.with_columns(low=(pl.col("effect") - pl.col("std")).clip(lower_bound=0),
                           high=pl.col("effect") + pl.col("std"))
    metric = data["metric"][0] if "metric" in data.columns and data.height else ""
    top = float(data["high"].max() or 1.0) * 1.08
    n_layers = int(data["layer"].max()) + 1 if data.height else 1
    x_scale = alt.Scale(domain=[-0.5, n_layers - 0.5], nice=False)
    y = alt.Y("effect:Q", title=f"mean |ΔL| ({metric})", scale=alt.Scale(domain=[0, top]))
    panels = []
    for label in dict.fromkeys(data["label"].to_list()):
        rows = data.filter(pl.col("label") == label)
        base = alt.Chart(rows).encode(x=alt.X("layer:Q", title="layer", scale=x_scale,
                                              axis=alt.Axis(tickMinStep=1, format="d")))
        layers = [
            base.mark_area(opacity=0.25, color="#1f77b4").encode(y=y, y2="high:Q")
            .transform_calculate(effect="datum.low"),
            base.mark_line(point=True, color="#1f77b4").encode(
                y=y, tooltip=["label", "layer", alt.Tooltip("effect:Q", format=".4g"),
                              alt.Tooltip("std:Q", format=".4g"), "n_spans"]),
        ]
        if marks.first_allowed:
            layers.insert(0, alt.Chart(pl.DataFrame({"x": [-0.5], "x2": [marks.first_allowed - 0.5]}))
                          .mark_rect(color="#999999", opacity=0.18)
                          .encode(x=alt.X("x:Q", scale=x_scale), x2="x2:Q"))
        rules = [{"layer": layer, "mark": "chosen"} for layer in marks.chosen.get(label, [])]
        if label in marks.runner_up:
            rules.append({"layer": marks.runner_up[label], "mark": "runner-up"})
        if rules:
            picked = alt.Chart(pl.DataFrame(rules)).encode(x=alt.X("layer:Q", scale=x_scale))
            layers += [
                picked.mark_rule(color="black").encode(
                    strokeDash=alt.StrokeDash("mark:N", scale=alt.Scale(
                        domain=["chosen", "runner-up"], range=[[1, 0], [5, 3]]), legend=None),
                    tooltip=["mark", "layer"]),
                picked.mark_text(align="left", dx=3, dy=-2, baseline="top", fontSize=10).encode(
                    y=alt.value(2), text=alt.Text("label_text:N"))
                .transform_calculate(label_text="datum.mark + ' ' + datum.layer"),
            ]
        n_spans = int(rows["n_spans"].max()) if "n_spans" in rows.columns else 0
        panels.append(alt.layer(*layers).properties(
            width=300, height=170, title=f"{label} ({n_spans} spans)"))
    return alt.concat(*panels, columns=2).properties(
        title=alt.Title(f"Attribution per layer ({metric})",
                        subtitle="line: mean over spans; band: ±1 SD over spans, clipped at 0"))


def validation_section(run: RunDir) -> Section:
    """The attribution metrics against exact patching on the same spans (``--validate``)."""
    meta = read_metadata(_need(run.attribution))
    detail = meta.get("validation_detail")
    if not detail:
        raise _Unavailable("Not run: attribution was run without validation (run "
                           "`nnsteer attribute --validate 8`, or set [attribute] validate in the config).")
    profiles = pl.DataFrame(detail["profiles"])
    rows = [{"label": label, "metric": name, "Spearman ρ vs exact": rho}
            for name, by_label in detail["spearman"].items() for label, rho in by_label.items()]
    n = meta.get("options", {}).get("validate")
    body = (f"<p>On {n} spans per label, the per-layer profile of each first-order metric "
            "against <code>exact</code> (the vector really added at each layer, KL of the "
            "next-token distributions), each scaled to its largest layer so that the shapes "
            "compare. Spearman ρ over layers: near 1 means the metric ranks the layers as real "
            "patching does; the layer choice is only as good as this agreement.</p>"
            + _table(pl.DataFrame(rows)))
    return Section(CHARTS["validation"], body, "validation",
                   validation_chart(profiles, detail["spearman"]).to_dict())


def validation_chart(profiles: pl.DataFrame, spearmans: dict[str, dict[str, float]]) -> Any:
    """Per label: each metric's mean |ΔL| per layer, scaled to its maximum, with ``exact``
    in black; the legend gives each metric's Spearman ρ against ``exact``."""
    import altair as alt

    scaled = profiles.with_columns(
        scaled=pl.col("effect") / pl.col("effect").abs().max().over("label", "metric"))
    metrics = [m for m in METRIC_COLOURS if m in set(scaled["metric"])]
    panels = []
    for label in dict.fromkeys(scaled["label"].to_list()):
        rows = scaled.filter(pl.col("label") == label)
        names = {m: m if m == "exact" else _rho_name(m, spearmans.get(m, {}).get(label))
                 for m in metrics}
        rows = rows.with_columns(series=pl.col("metric").replace_strict(names, default=None))
        n_spans = int(rows["n_spans"].max())
        panels.append(alt.Chart(rows).mark_line(point=True).encode(
            x=alt.X("layer:Q", title="layer", axis=alt.Axis(tickMinStep=1, format="d")),
            y=alt.Y("scaled:Q", title="effect / its largest", scale=alt.Scale(domain=[0, 1.05])),
            color=alt.Color("series:N", title=None, sort=list(names.values()), scale=alt.Scale(
                domain=list(names.values()), range=[METRIC_COLOURS[m] for m in metrics]),
                legend=alt.Legend(orient="bottom", columns=1)),
            strokeDash=alt.condition(alt.datum.metric == "exact", alt.value([1, 0]), alt.value([4, 2])),
            tooltip=["metric", "layer", alt.Tooltip("effect:Q", format=".4g")],
        ).properties(width=300, height=160, title=f"{label} ({n_spans} spans)"))
    return alt.concat(*panels, columns=2).resolve_scale(color="independent").properties(
        title=alt.Title("Attribution metrics against exact patching",
                        subtitle="each curve scaled to its largest layer; ρ: Spearman over layers vs exact"))


def _rho_name(metric: str, rho: float | None) -> str:
    if rho is None or rho != rho:  # NaN: one profile is constant
        return f"{metric} (ρ undefined)"
    return f"{metric} (ρ = {rho:+.2f})"


def similarity_section(run: RunDir) -> Section:
    """Cosine similarity between the labels' vectors, one layer at a time (slider)."""
    vs = load_vectors(_need(run.vectors))
    if not vs.labels:
        raise _Unavailable(f"{run.vectors.name} holds only the overall mean: no behaviour to compare.")
    df = cosine_similarity(vs)
    chosen = sorted({v.vector_layer for v in _layer_choices(run).values()}) or [vs.n_layers // 2]
    return Section(CHARTS["similarity"],
                   f"<p>Drag the slider to change the layer (starts at layer {chosen[0]}).</p>",
                   "similarity", similarity_chart(df, chosen[0]).to_dict())


def similarity_chart(df: pl.DataFrame, layer: int) -> Any:
    """Heatmap of ``cosine`` between ``label_a`` and ``label_b``, with a layer slider."""
    import altair as alt

    layers = df["layer"]
    pick = alt.param(name="layer", value=int(layer), bind=alt.binding_range(
        min=int(layers.min()), max=int(layers.max()), step=1, name="layer "))
    base = alt.Chart(df.filter(pl.col("layer").is_not_null())).transform_filter(
        alt.datum.layer == pick)
    cells = base.mark_rect().encode(
        x=alt.X("label_a:N", title=None), y=alt.Y("label_b:N", title=None),
        color=alt.Color("cosine:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue", reverse=True),
                        title="cosine"),
        tooltip=["label_a", "label_b", "layer", alt.Tooltip("cosine:Q", format=".3f")],
    )
    text = base.mark_text(fontSize=10).encode(
        x="label_a:N", y="label_b:N", text=alt.Text("cosine:Q", format=".2f"))
    return (cells + text).add_params(pick).properties(width=320, height=320)


def layers_section(run: RunDir) -> Section:
    """The steering layers chosen per behaviour (``layers.json``), and every coefficient
    the steered chains were generated with."""
    _need(run.layers)
    chosen = _layer_choices(run)
    steered = _coefficients_steered(run)
    rows = [{"behaviour": label, "vector_layer": v.vector_layer, "layers": list(v.layers),
             "coefficient": v.coefficient, "chosen by": v.chosen_by,
             "coefficients steered": ", ".join(f"{c:g}" for c in steered.get(label, [])) or "—"}
            for label, v in chosen.items()]
    return Section("Selected layers", _table(pl.DataFrame(rows)))


def _coefficients_steered(run: RunDir) -> dict[str, list[float]]:
    """Per behaviour, the coefficients of its steered chains (from the evaluation, or the
    steered chains if not evaluated yet)."""
    path = run.evaluation if run.evaluation.exists() else run.steered
    if not path.exists():
        return {}
    table = read_parquet(path, columns=["behaviour", "direction", "coefficient"])
    steered = table.filter(pl.col("direction") != "none").unique(["behaviour", "coefficient"])
    return {b: sorted(g["coefficient"].to_list())
            for (b,), g in steered.group_by(["behaviour"], maintain_order=True)}


def steering_summary(run: RunDir) -> pl.DataFrame:
    """:func:`nnsteer.evaluation.shares.summarise` of the run's evaluation, with the draws it used."""
    return _summary_of_evaluation(run, summarise)


def _summary_of_evaluation(run: RunDir, summary: Callable[..., pl.DataFrame]) -> pl.DataFrame:
    """``summary(evaluation, n_boot=..., seed=...)`` with the draws ``evaluate`` used."""
    evaluation = read_parquet(_need(run.evaluation))
    options = read_metadata(run.evaluation).get("options", {})
    same_draws = {k: options[k] for k in ("n_boot", "seed") if k in options}
    return summary(evaluation, **same_draws)


def steering_section(run: RunDir) -> Section:
    """Behaviour shares with and without steering, with intervals, and the plain summary;
    with several coefficients, share against signed coefficient (dose-response)."""
    summary = steering_summary(run)
    text = summary_text(summary)
    table = _table(conditions_table(summary, _steering_layers(run)))
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
            "behaviour": r["behaviour"], "condition": _condition(r),
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
    if low is None:
        return f"{100 * value:{fmt}} (too few tasks for an interval)"
    return f"{100 * value:{fmt}} [{100 * low:{fmt}}, {100 * high:{fmt}}]"


def _steering_layers(run: RunDir) -> dict[str, list[int]]:
    return {label: list(v.layers) for label, v in _layer_choices(run).items()}


def _n_coefficients(summary: pl.DataFrame) -> int:
    return summary.filter(pl.col("direction") != "none")["coefficient"].n_unique()


def _condition(row: dict[str, Any]) -> str:
    """``baseline``, ``positive``, ``negative``, ``random positive``, ``random negative``,
    then ``[mode]`` for a steering mode other than ``all``."""
    if row["direction"] == "none":
        return "baseline"
    name = row["direction"] if row["vector"] == "behaviour" else f"random {row['direction']}"
    return name if row.get("mode", "all") == "all" else f"{name} [{row['mode']}]"


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
    import altair as alt

    steered = summary.filter(pl.col("direction") != "none")
    rows = [{"behaviour": r["behaviour"], "vector": r["vector"], "mode": r.get("mode", "all"),
             "condition": f"{_condition(r)} ×{r['coefficient']:g} (n={r['n_pairs']})",
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
    import altair as alt

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
        raise _Unavailable("Not measured: this evaluation.parquet has no cost columns (rerun "
                           "`nnsteer evaluate`).")
    grader = read_metadata(run.evaluation).get("options", {}).get("grader", "offline")
    rows = tradeoff_rows(steering_summary(run), costs)
    text = costs_text(costs, grader)
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
    entries = _layer_choices(run)
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
            "nats/token).</p>" + _table(frame))


def example_chains_section(run: RunDir) -> Section:
    """One eval task's chains, unsteered and steered each way per behaviour, spans coloured by label.

    The task is the first with a baseline and both directions of every behaviour's own
    vector (not the random control); the text shown is each chain's whole response.
    """
    colours = dict(zip(LABELS, ["#dbe9f6", "#e2f0d9", "#fff2cc", "#e4dcf3", "#fde0c8", "#f8cbcb"]))
    chains = read_parquet(_need(run.steered),
                          columns=["chain_id", "task_id", "behaviour", "direction", "vector", "response"])
    spans = read_parquet(_need(run.steered_annotations),
                         columns=["chain_id", "label", "start", "end", "status"])
    chains = chains.filter(pl.col("vector").is_null() | pl.col("vector").is_in(["none", "behaviour"]))
    wanted = {("none", None)} | {(d, b) for b in chains["behaviour"].drop_nulls().unique()
                                 for d in ("positive", "negative")}
    task_ids = [t for (t,), group in chains.group_by("task_id", maintain_order=True)
                if {(d, b) for d, b in group.select("direction", "behaviour").iter_rows()} >= wanted]
    if not task_ids:
        raise _Unavailable("no eval task has an unsteered chain and both steering directions")
    task_id = sorted(task_ids)[0]
    figures_of = _chain_figures(run, task_id)
    rows = chains.filter(pl.col("task_id") == task_id).sort(
        pl.col("behaviour").fill_null(""), pl.col("direction") != "none", pl.col("direction") != "positive")
    cells = []
    for row in rows.iter_rows(named=True):
        text, pieces, at = row["response"], [], 0
        chain_spans = spans.filter((pl.col("chain_id") == row["chain_id"]) & (pl.col("status") == "ok"))
        for span in chain_spans.sort("start").iter_rows(named=True):
            if span["start"] < at or span["label"] not in colours:
                continue
            pieces.append(html.escape(text[at:span["start"]]))
            pieces.append(f'<span title="{span["label"]}" style="background:{colours[span["label"]]}">'
                          f'{html.escape(text[span["start"]:span["end"]])}</span>')
            at = span["end"]
        pieces.append(html.escape(text[at:]))
        name = "unsteered" if row["direction"] == "none" else f'{row["behaviour"]}, {row["direction"]}'
        figures = f'<div class="figures">{html.escape(figures_of[row["chain_id"]])}</div>' \
            if row["chain_id"] in figures_of else ""
        cells.append(f'<tr><th>{html.escape(name)}{figures}</th>'
                     f'<td style="white-space:pre-wrap">{"".join(pieces)}</td></tr>')
    legend = " ".join(f'<span style="background:{c};padding:0 0.3em">{label}</span>'
                      for label, c in colours.items())
    return Section("Example chains", f"<p>Eval task <code>{html.escape(task_id)}</code>, greedy chains; "
                   f"annotated spans: {legend}</p><table>{''.join(cells)}</table>")


def _chain_figures(run: RunDir, task_id: str) -> dict[str, str]:
    """Per chain of ``task_id``, its cost figures from ``evaluation.parquet`` (if measured)."""
    if not run.evaluation.exists():
        return {}
    evaluation = read_parquet(run.evaluation)
    if "nll_unsteered" not in evaluation.columns:
        return {}
    rows = evaluation.filter(pl.col("task_id") == task_id).unique("chain_id")
    return {row["chain_id"]: chain_figures(row) for row in rows.iter_rows(named=True)}


_BUILDERS: list[tuple[str, Callable[[RunDir], Section]]] = [
    ("At a glance", overview_section),
    ("Provenance", provenance_section),
    ("Behaviour labels", label_counts_section),
    (CHARTS["attribution"], attribution_section),
    (CHARTS["validation"], validation_section),
    (CHARTS["similarity"], similarity_section),
    ("Selected layers", layers_section),
    (CHARTS["steering"], steering_section),
    (CHARTS["forest"], forest_section),
    (CHARTS["costs"], costs_section),
    ("Example chains", example_chains_section),
]

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }}
td {{ max-width: 520px; overflow-wrap: break-word; }}
.missing {{ color: #888; font-style: italic; }}
.chart {{ margin: 1em 0; }}
pre {{ white-space: pre-wrap; }}
.figures {{ font-weight: normal; font-size: 0.85em; color: #555; max-width: 220px; }}
#errors:empty {{ display: none; }}
#errors {{ color: #b00; border: 1px solid #b00; padding: 0.5em; }}
</style>
<script>
window.addEventListener("error", function (e) {{
  var box = document.getElementById("errors");
  if (box) {{ var p = document.createElement("p"); p.className = "js-error"; p.textContent = String(e.message); box.appendChild(p); }}
}});
</script>
</head>
<body>
<h1>{title}</h1>
<div id="errors"></div>
{body}
<script>{bundle}</script>
<script>
(function () {{
  var specs = {specs};
  var names = Object.keys(specs);
  Promise.all(names.map(function (name) {{
    return vegaEmbed("#chart-" + name, specs[name], {{ renderer: "svg", actions: false }});
  }})).then(function () {{
    document.body.setAttribute("data-charts-rendered", String(names.length));
  }}).catch(function (err) {{
    var p = document.createElement("p"); p.className = "js-error"; p.textContent = "chart: " + err;
    document.getElementById("errors").appendChild(p);
  }});
}})();
</script>
</body>
</html>
"""
