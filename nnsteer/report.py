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
import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.errors import BadInput
from nnsteer.labels import LABELS
from nnsteer.store import (
    PRODUCERS,
    RunDir,
    now_iso,
    nnsteer_version,
    read_json,
    read_metadata,
    read_parquet,
    write_text,
)

#: Chart name → section title, in page order.
CHARTS = {
    "attribution": "Attribution per layer (Figure 3)",
    "similarity": "Cosine similarity of the vectors",
    "steering": "Steering on unseen tasks (Figure 4)",
}


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
        raise _Unavailable(f"Not run yet: {path.name} is missing (run `nnsteer {PRODUCERS[path.name]}`).")
    return path


def _stage_function(module: str, name: str) -> Callable[..., Any]:
    try:
        return getattr(importlib.import_module(module), name)
    except (ModuleNotFoundError, AttributeError):
        raise _Unavailable(f"{module}.{name} is not available in this install.") from None


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


def provenance_section(run: RunDir) -> Section:
    """Who made each file: stage, model and revision, options, nnsteer version, time."""
    rows = []
    for name, stage in PRODUCERS.items():
        path = run.path(name)
        if not path.exists() or path.suffix not in (".parquet", ".safetensors", ".json"):
            continue
        meta = _json_provenance(path) if path.suffix == ".json" else read_metadata(path)
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


def _json_provenance(path: Path) -> dict[str, Any]:
    """The provenance ``select`` keeps in each entry of ``layers.json`` ({} if none)."""
    entries = read_json(path)
    first = next(iter(entries.values()), {}) if isinstance(entries, dict) else {}
    return first.get("provenance", {}) if isinstance(first, dict) else {}


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
                 "GPT-4-class annotator at a word-level macro-F1 of about 0.55–0.6 (README, "
                 "Measured figures). Use an LLM annotator for results.</p>")
    return Section("Behaviour labels", note + _table(counts))


def attribution_section(run: RunDir) -> Section:
    """The per-layer attribution chart (mean |ΔL| per label)."""
    df = read_parquet(_need(run.attribution), columns=["label", "layer", "effect"])
    chart = _stage_function("nnsteer.attribution", "attribution_chart")(df)
    metric = ", ".join(sorted(df["metric"].unique().to_list())) if "metric" in df.columns else "?"
    return Section(CHARTS["attribution"], f"<p>Metric: <code>{html.escape(metric)}</code>.</p>",
                   "attribution", chart.to_dict())


def similarity_section(run: RunDir) -> Section:
    """Cosine similarity between the labels' vectors, one layer at a time (slider)."""
    vs = _stage_function("nnsteer.vectors", "load_vectors")(_need(run.vectors))
    df = _stage_function("nnsteer.vectors", "cosine_similarity")(vs)
    layers = read_json(run.layers) if run.layers.exists() else {}
    chosen = sorted({v["vector_layer"] for v in layers.values()}) or [vs.n_layers // 2]
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
    """The steering layers chosen per behaviour (``layers.json``)."""
    chosen = read_json(_need(run.layers))
    rows = [{"behaviour": label, "vector_layer": v["vector_layer"], "layers": v["layers"],
             "coefficient": float(v["coefficient"]), "chosen by": v.get("chosen_by", "")}
            for label, v in chosen.items()]
    return Section("Selected layers", _table(pl.DataFrame(rows)))


def steering_section(run: RunDir) -> Section:
    """Behaviour shares with and without steering, with intervals, and the plain summary."""
    evaluation = read_parquet(_need(run.evaluation))
    options = read_metadata(run.evaluation).get("options", {})
    same_draws = {k: options[k] for k in ("n_boot", "seed") if k in options}
    summary = _stage_function("nnsteer.evaluate", "summarise")(evaluation, **same_draws)
    text = _stage_function("nnsteer.evaluate", "summary_text")(summary)
    chart = _stage_function("nnsteer.evaluate", "steering_chart")(summary)
    return Section(CHARTS["steering"], f"<pre>{html.escape(text)}</pre>", "steering", chart.to_dict())


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
    chains = chains.filter((pl.col("vector").is_null()) | (pl.col("vector") == "behaviour"))
    wanted = {("none", None)} | {(d, b) for b in chains["behaviour"].drop_nulls().unique()
                                 for d in ("positive", "negative")}
    task_ids = [t for (t,), group in chains.group_by("task_id", maintain_order=True)
                if {(d, b) for d, b in group.select("direction", "behaviour").iter_rows()} >= wanted]
    if not task_ids:
        raise _Unavailable("no eval task has an unsteered chain and both steering directions")
    task_id = sorted(task_ids)[0]
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
        cells.append(f'<tr><th>{html.escape(name)}</th><td style="white-space:pre-wrap">{"".join(pieces)}</td></tr>')
    legend = " ".join(f'<span style="background:{c};padding:0 0.3em">{label}</span>'
                      for label, c in colours.items())
    return Section("Example chains", f"<p>Eval task <code>{html.escape(task_id)}</code>, greedy chains; "
                   f"annotated spans: {legend}</p><table>{''.join(cells)}</table>")


_BUILDERS: list[tuple[str, Callable[[RunDir], Section]]] = [
    ("Provenance", provenance_section),
    ("Behaviour labels", label_counts_section),
    (CHARTS["attribution"], attribution_section),
    (CHARTS["similarity"], similarity_section),
    ("Selected layers", layers_section),
    (CHARTS["steering"], steering_section),
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
td {{ max-width: 520px; overflow-wrap: anywhere; }}
.missing {{ color: #888; font-style: italic; }}
.chart {{ margin: 1em 0; }}
pre {{ white-space: pre-wrap; }}
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
