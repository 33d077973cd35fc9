"""``nnsteer extract``: difference-of-means candidate vectors at every layer."""

from __future__ import annotations

import click

from nnsteer.cli.common import model_options, open_model, run_dir
from nnsteer.labels import OVERALL
from nnsteer.vectors.extract import VARIANTS, extract_vectors, read_inputs


@click.command(name="extract")
@model_options
@click.option("--variant", type=click.Choice(VARIANTS), default="paper",
              show_default=True,
              help="paper: per-chain means over each label's positions; released-code: per-span "
                   "means over a span's first tokens, rescaled to the overall mean's norm.")
@click.option("--min-spans", type=click.IntRange(min=1), default=1, show_default=True,
              help="A label needs at least this many annotated spans for a vector (a mean "
                   "of fewer is noise); labels with fewer get none and are not steered.")
@click.pass_context
def command(ctx: click.Context, model: str, remote: bool, device: str | None, dtype: str,
            batch_size: int, variant: str, min_spans: int) -> None:
    """Candidate steering vectors of every label at every layer (vectors.safetensors)."""
    run = run_dir(ctx, model)
    read_inputs(run, model)  # bad input fails here, before the model loads
    lm = open_model(model, remote, device, dtype)
    vs = extract_vectors(run, lm, variant=variant, batch_size=batch_size, min_spans=min_spans)
    counts = vs.metadata["counts"]
    click.echo(f"{'label':<24} {'chains':>7} {'spans':>7} {'positions':>10}")
    for label in [*vs.labels, OVERALL]:
        c = counts[label]
        click.echo(f"{label:<24} {c['chains']:>7} {c['spans']:>7} {c['positions']:>10}")
    click.echo(f"wrote {run.vectors} ({vs.n_layers} layers x {vs.d_model}, variant {variant})")
