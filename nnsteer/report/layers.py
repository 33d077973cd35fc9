"""The report's sections on vectors and layers: Figure 3 with what ``select`` chose, whether the
attribution metric tracks real patching, the vectors' cosine similarity, the chosen layers."""

from __future__ import annotations

import html
from typing import Any

import altair as alt
import polars as pl

from nnsteer.report.blocks import (
    CHARTS,
    Section,
    Unavailable,
    html_table,
    layer_choices,
    need,
    select_provenance,
)
from nnsteer.runs.store import RunDir, read_metadata, read_parquet
from nnsteer.selection.figure3 import FIGURE3_COLUMNS, LayerMarks, figure3_chart
from nnsteer.selection.layers import first_allowed_layer, rank_layers
from nnsteer.vectors.extract import cosine_similarity, load_vectors

#: One colour per attribution metric in the validation chart (``exact`` is the truth).
METRIC_COLOURS = {"exact": "#222222", "nll": "#1f77b4", "kl2": "#2ca02c",
                  "released-code": "#d62728"}


def attribution_section(run: RunDir) -> Section:
    """Figure 3: mean |ΔL| per layer and label, with the layers ``select`` skipped,
    chose and ranked second."""
    df = read_parquet(need(run.attribution), columns=FIGURE3_COLUMNS)
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


def layer_marks(run: RunDir, attribution: pl.DataFrame) -> LayerMarks:
    """The :class:`LayerMarks` of ``layers.json`` (none if ``select`` has not run)."""
    entries = layer_choices(run)
    if not entries:
        return LayerMarks()
    options = select_provenance(entries).get("options", {})
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


def validation_section(run: RunDir) -> Section:
    """The attribution metrics against exact patching on the same spans (``--validate``)."""
    meta = read_metadata(need(run.attribution))
    detail = meta.get("validation_detail")
    if not detail:
        raise Unavailable("Not run: attribution was run without validation (run "
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
            + html_table(pl.DataFrame(rows)))
    return Section(CHARTS["validation"], body, "validation",
                   validation_chart(profiles, detail["spearman"]).to_dict())


def validation_chart(profiles: pl.DataFrame, spearmans: dict[str, dict[str, float]]) -> Any:
    """Per label: each metric's mean |ΔL| per layer, scaled to its maximum, with ``exact``
    in black; the legend gives each metric's Spearman ρ against ``exact``."""

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
    vs = load_vectors(need(run.vectors))
    if not vs.labels:
        raise Unavailable(f"{run.vectors.name} holds only the overall mean: no behaviour to compare.")
    df = cosine_similarity(vs)
    chosen = sorted({v.vector_layer for v in layer_choices(run).values()}) or [vs.n_layers // 2]
    return Section(CHARTS["similarity"],
                   f"<p>Drag the slider to change the layer (starts at layer {chosen[0]}).</p>",
                   "similarity", similarity_chart(df, chosen[0]).to_dict())


def similarity_chart(df: pl.DataFrame, layer: int) -> Any:
    """Heatmap of ``cosine`` between ``label_a`` and ``label_b``, with a layer slider."""

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
    need(run.layers)
    chosen = layer_choices(run)
    steered = _coefficients_steered(run)
    rows = [{"behaviour": label, "vector_layer": v.vector_layer, "layers": list(v.layers),
             "coefficient": v.coefficient, "chosen by": v.chosen_by,
             "coefficients steered": ", ".join(f"{c:g}" for c in steered.get(label, [])) or "—"}
            for label, v in chosen.items()]
    return Section("Selected layers", html_table(pl.DataFrame(rows)))


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
