"""``nnsteer select``: choose each label's steering layer(s) (layers.json)."""

from __future__ import annotations

import click

from nnsteer.errors import BadInput


def _parse_layers(values: tuple[str, ...]) -> dict[str, list[int]]:
    """``("backtracking=17", "adding-knowledge=18,19")`` → ``{label: [layers]}``."""
    given: dict[str, list[int]] = {}
    for value in values:
        label, sep, layers = value.partition("=")
        try:
            given[label.strip()] = [int(x) for x in layers.split(",")]
        except ValueError:
            sep = ""
        if not sep or not label.strip():
            raise BadInput(f"--layers {value!r}: expected LABEL=LAYER[,LAYER...]")
    return given


@click.command(name="select")
@click.option("--model", default=None, help="Model whose run directory to use (runs/<slug>).")
@click.option("--skip-fraction", type=float, default=0.2, show_default=True,
              help="Skip the earliest layers: the first ceil(fraction × n_layers).")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steer at the k best layers (the best one is the vector layer).")
@click.option("--layers", "by_hand", multiple=True, metavar="LABEL=L[,L...]",
              help="Layers given by hand for a label (repeatable).")
@click.option("--coefficient", type=float, default=1.0, show_default=True,
              help="Steering strength written to layers.json: steer adds ± coefficient × the "
                   "vector, split evenly over the layers (steer --coefficients sweeps others).")
@click.option("--label", "labels", multiple=True,
              help="Label to choose layers for (repeatable). Default: the steered labels.")
@click.option("--calibrate-conditions", is_flag=True,
              help="Also pick each label's threshold for steer --when at every layer on the "
                   "training chains (best F1; needs the model: --remote, --device, --dtype, "
                   "--batch-size).")
@click.option("--remote", is_flag=True, help="Calibrate on NDIF (needs NDIF_API_KEY).")
@click.option("--device", default=None, help="Device to calibrate on. Default: best available.")
@click.option("--dtype", default="auto", show_default=True, help="Model dtype to calibrate in.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Chains per calibration forward pass.")
@click.pass_context
def command(ctx: click.Context, model: str | None, skip_fraction: float, top_k: int,
            by_hand: tuple[str, ...], coefficient: float, labels: tuple[str, ...],
            calibrate_conditions: bool, remote: bool, device: str | None, dtype: str,
            batch_size: int) -> None:
    """Choose steering layers from the attribution table, or by hand (layers.json)."""
    from nnsteer.cli.common import run_dir
    from nnsteer.select import select_layers

    run = run_dir(ctx, model)
    select_layers(run, skip_fraction=skip_fraction, top_k=top_k, layers=_parse_layers(by_hand),
                  coefficient=coefficient, labels=list(labels) or None)
    if calibrate_conditions:
        import polars as pl

        from nnsteer.calibration import calibrate_conditions as calibrate
        from nnsteer.cli.common import open_model
        from nnsteer.store import read_parquet

        name = model or read_parquet(run.chains, ["model"]).get_column("model").cast(pl.String)[0]
        calibrate(run, open_model(name, remote, device, dtype), batch_size=batch_size)
    click.echo(f"wrote {run.layers}")
