"""``nnsteer attribute``: per-layer attribution of each label's vectors (attribution.parquet)."""

from __future__ import annotations

import click

from nnsteer.cli.common import model_options, open_model, run_dir
from nnsteer.runs.store import atomic_path, read_metadata
from nnsteer.selection.attribution import attribute
from nnsteer.selection.figure3 import figure3_chart


@click.command(name="attribute")
@model_options
@click.option("--metric", type=click.Choice(["released-code", "nll", "kl2", "exact"]),
              default="nll", show_default=True,
              help="nll: first-order change of the span token's NLL; kl2: second-order KL; "
                   "exact: really patch and measure KL; released-code: the authors' metric.")
@click.option("--spans", type=click.Choice(["own", "others"]), default="own", show_default=True,
              help="Probe a label's vector before its own spans, or before every other "
                   "label's spans (what the released code does).")
@click.option("--aggregate", type=click.Choice(["spans", "chains"]), default="spans",
              show_default=True,
              help="Average |ΔL| over all spans pooled, or per chain then over chains "
                   "(std with ddof 0: the released code's figure).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the first N chains (the released code attributes 50).")
@click.option("--validate", type=click.IntRange(min=0), default=0, metavar="N",
              help="Also run exact on N spans per label; print the rank correlation per label.")
@click.option("--label", "labels", multiple=True,
              help="Label to attribute (repeatable). Default: the steered labels with a vector.")
@click.pass_context
def command(ctx: click.Context, model: str, remote: bool, device: str | None, dtype: str,
            batch_size: int, metric: str, spans: str, aggregate: str, limit: int | None,
            validate: int, labels: tuple[str, ...]) -> None:
    """Attribution patching per layer and label (attribution.parquet, charts/attribution.html)."""
    run = run_dir(ctx, model)
    lm = open_model(model, remote, device, dtype)
    df = attribute(run, lm, metric=metric, batch_size=batch_size, validate=validate,
                   spans=spans, labels=list(labels) or None, aggregate=aggregate, limit=limit)
    with atomic_path(run.charts / "attribution.html") as tmp:
        figure3_chart(df).save(str(tmp), format="html", inline=True)
    best = df.sort("effect", descending=True).group_by("label", maintain_order=True).first()
    for row in best.sort("label").iter_rows(named=True):
        click.echo(f"{row['label']}: largest mean |ΔL| at layer {row['layer']} "
                   f"({row['effect']:.4g}, {row['n_spans']} spans, {row['n_chains']} chains, "
                   f"averaged over {aggregate})")
    for label, rho in read_metadata(run.attribution).get("validation", {}).items():
        click.echo(f"{label}: Spearman({metric}, exact) over layers = {rho:.3f}")
    click.echo(f"wrote {run.attribution} and {run.charts / 'attribution.html'}")
