"""Paper Figure 3: the attribution of each label's vector per layer, with what ``select`` chose.

``attribute`` writes it as ``charts/attribution.html``; the report draws it with the chosen
layers, the runner-up and the skipped early layers marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import altair as alt
import polars as pl


@dataclass(frozen=True)
class LayerMarks:
    """What ``select`` made of the attribution: per label the chosen layers and runner-up,
    and the first layer it could choose (0 when it skipped none or is unknown)."""

    chosen: dict[str, list[int]] = field(default_factory=dict)
    runner_up: dict[str, int] = field(default_factory=dict)
    first_allowed: int = 0
    skip_fraction: float = 0.0


#: The columns of ``attribution.parquet`` that Figure 3 draws.
FIGURE3_COLUMNS = ["label", "layer", "effect", "std"]


def figure3_chart(df: pl.DataFrame, marks: LayerMarks | None = None) -> Any:
    """One panel per label, two per row: line, ±1 SD band, skipped layers shaded,
    chosen layer (solid rule) and runner-up (dashed) when ``marks`` has them; one y scale
    for all panels."""
    marks = marks or LayerMarks()

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
