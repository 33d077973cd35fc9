"""What every report section is built from: :class:`Section`, the chart titles, tables, and
the one exception that says a section cannot be built yet."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.runs.registry import producer
from nnsteer.runs.store import RunDir
from nnsteer.steer.choices import read_layers

#: Chart name → section title, in page order.
CHARTS = {
    "attribution": "Attribution per layer (Figure 3)",
    "validation": "Does the attribution metric track real patching?",
    "similarity": "Cosine similarity of the vectors",
    "steering": "Steering on unseen tasks (Figure 4)",
    "forest": "Steering effects against the baseline, with the random control",
    "costs": "Costs: what steering broke beside what it changed",
}


@dataclass
class Section:
    """A titled part of the page: HTML, and optionally a Vega-Lite chart below it."""

    title: str
    body: str
    chart: str | None = None
    spec: dict[str, Any] | None = None
    #: Shown closed (``<details>``): reference material rather than a result.
    folded: bool = False


class Unavailable(Exception):
    """A section cannot be built yet; the message says why."""


def need(path: Path) -> Path:
    """``path``, or :class:`Unavailable` naming the stage to run if the file is missing."""
    if not path.exists():
        raise Unavailable(f"Not run yet: {path.name} is missing (run `nnsteer {producer(path.name)}`).")
    return path


def html_table(df: pl.DataFrame) -> str:
    """``df`` as an HTML table, every cell escaped (floats to 4 significant digits)."""
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


def layer_choices(run: RunDir) -> dict[str, Any]:
    """``layers.json`` read and checked by ``select``'s reader ({} if ``select`` has not run)."""
    if not run.layers.exists():
        return {}
    return read_layers(run.layers)


def select_provenance(entries: dict[str, Any]) -> dict[str, Any]:
    """The provenance ``select`` wrote into every entry of ``layers.json`` ({} if none)."""
    return next(iter(entries.values())).provenance if entries else {}
