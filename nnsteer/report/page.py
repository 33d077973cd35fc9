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
from pathlib import Path
from typing import Any

from nnsteer.errors import BadInput
from nnsteer.report.blocks import CHARTS, Section, Unavailable
from nnsteer.report.examples import example_chains_section
from nnsteer.report.layers import (
    attribution_section,
    layers_section,
    similarity_section,
    validation_section,
)
from nnsteer.report.overview import (
    label_counts_section,
    overview_section,
    provenance_section,
)
from nnsteer.report.steering import costs_section, forest_section, steering_section
from nnsteer.runs.store import (
    RunDir,
    write_text,
)


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
    except Unavailable as exc:
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
    toc = "".join(f'<li><a href="#section-{i}">{html.escape(s.title)}</a></li>'
                  for i, s in enumerate(sections, start=1))
    body = "\n".join(_section_html(i, s) for i, s in enumerate(sections, start=1))
    return _PAGE.format(
        title=html.escape(title),
        body=f'<nav class="toc"><h2>Contents</h2><ol>{toc}</ol></nav>\n{body}',
        bundle=_script_safe(_javascript_bundle()),
        specs=_script_safe(json.dumps(specs)),
    )


def _section_html(number: int, section: Section) -> str:
    content = section.body + (f'<div class="chart" id="chart-{section.chart}"></div>'
                              if section.spec is not None else "")
    if section.folded:
        content = f"<details><summary>Show</summary>\n{content}\n</details>"
    return (f'<section id="section-{number}"><h2>{html.escape(section.title)}</h2>\n'
            f"{content}\n</section>")


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
    except Unavailable as exc:
        return Section(title, f'<p class="missing">{html.escape(str(exc))}</p>')


#: The sections in page order: the results first, then how they were reached, then the
#: reference material.
_BUILDERS: list[tuple[str, Callable[[RunDir], Section]]] = [
    ("At a glance", overview_section),
    (CHARTS["forest"], forest_section),
    (CHARTS["costs"], costs_section),
    (CHARTS["steering"], steering_section),
    (CHARTS["attribution"], attribution_section),
    (CHARTS["validation"], validation_section),
    (CHARTS["similarity"], similarity_section),
    ("Selected layers", layers_section),
    ("Example chains", example_chains_section),
    ("Behaviour labels", label_counts_section),
    ("Provenance", provenance_section),
]


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; max-width: 100%; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }}
td {{ max-width: 520px; overflow-wrap: anywhere; }}
.toc ol {{ columns: 2; font-size: 0.9em; }}
details > summary {{ cursor: pointer; color: #555; }}
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
    var widest = 0;
    document.querySelectorAll("details").forEach(function (d) {{ d.open = true; }});
    document.querySelectorAll("table").forEach(function (t) {{ widest = Math.max(widest, t.scrollWidth); }});
    document.querySelectorAll("details").forEach(function (d) {{ d.open = false; }});
    document.body.setAttribute("data-widest-table", String(widest));
    document.body.setAttribute("data-page-width", String(document.body.clientWidth));
  }}).catch(function (err) {{
    var p = document.createElement("p"); p.className = "js-error"; p.textContent = "chart: " + err;
    document.getElementById("errors").appendChild(p);
  }});
}})();
</script>
</body>
</html>
"""
