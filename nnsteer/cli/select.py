"""``nnsteer select``: choose each label's steering layer(s) (layers.json)."""

from __future__ import annotations

import functools

import click

from nnsteer.cli.common import number_list, open_model, run_dir
from nnsteer.errors import BadInput
from nnsteer.runs.store import read_parquet
from nnsteer.selection.layers import AUTO, select_layers
from nnsteer.selection.strength import check_auto
from nnsteer.steer.calibration import calibrate_conditions as calibrate


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


def _coefficient(ctx: click.Context, param: click.Parameter, value: str) -> float | str:
    if value.strip() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected a number or auto, got {value!r}") from None


@click.command(name="select")
@click.option("--model", default=None, help="Model whose run directory to use (runs/<slug>).")
@click.option("--skip-fraction", type=float, default=0.2, show_default=True,
              help="Skip the earliest layers: the first ceil(fraction × n_layers).")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True,
              help="Steer at the k best layers (the best one is the vector layer).")
@click.option("--layers", "by_hand", multiple=True, metavar="LABEL=L[,L...]",
              help="Layers given by hand for a label (repeatable).")
@click.option("--coefficient", callback=_coefficient, default="1.0", show_default=True,
              help="Steering strength written to layers.json: steer adds ± coefficient × the "
                   "vector, split evenly over the layers (steer --coefficients sweeps others). "
                   "auto: the largest of --grid that moves the behaviour with costs within the "
                   "--max-*-cost bounds on the validation tasks (needs the model; docs/costs.md).")
@click.option("--grid", callback=number_list, default=None,
              help="Comma-separated coefficients --coefficient auto tries. "
                   "Default: 0.25,0.5,1,2,4,8.")
@click.option("--max-coherence-cost", type=float, default=0.5, show_default=True,
              help="auto: most the NLL under the unsteered model may rise (nats/token).")
@click.option("--max-repetition-cost", type=float, default=10.0, show_default=True,
              help="auto: most the repeated n-grams may rise (pp).")
@click.option("--max-accuracy-cost", type=float, default=10.0, show_default=True,
              help="auto: most the accuracy may fall (pp).")
@click.option("--validation-limit", type=click.IntRange(min=1), default=None,
              help="auto: sweep on the first N validation tasks only.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="auto: tokens generated per sweep chain.")
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
              help="Chains per calibration forward pass or sweep batch.")
@click.pass_context
def command(ctx: click.Context, model: str | None, skip_fraction: float, top_k: int,
            by_hand: tuple[str, ...], coefficient: float | str, grid: list[float] | None,
            max_coherence_cost: float, max_repetition_cost: float, max_accuracy_cost: float,
            validation_limit: int | None, max_new_tokens: int, labels: tuple[str, ...],
            calibrate_conditions: bool, remote: bool, device: str | None, dtype: str,
            batch_size: int) -> None:
    """Choose steering layers from the attribution table, or by hand (layers.json)."""
    run = run_dir(ctx, model)

    @functools.cache
    def lm():  # the model, opened once, only when a step needs it
        import polars as pl


        name = model or read_parquet(run.chains, ["model"]).get_column("model").cast(pl.String)[0]
        return open_model(name, remote, device, dtype)

    if coefficient == AUTO:  # before the model loads

        check_auto(run, grid, max_coherence_cost, max_repetition_cost, max_accuracy_cost)
    select_layers(run, skip_fraction=skip_fraction, top_k=top_k, layers=_parse_layers(by_hand),
                  coefficient=coefficient, labels=list(labels) or None,
                  lm=lm() if coefficient == AUTO else None, grid=grid,
                  max_coherence_cost=max_coherence_cost, max_repetition_cost=max_repetition_cost,
                  max_accuracy_cost=max_accuracy_cost, validation_limit=validation_limit,
                  max_new_tokens=max_new_tokens, batch_size=batch_size)
    if calibrate_conditions:
        calibrate(run, lm(), batch_size=batch_size)
    click.echo(f"wrote {run.layers}")
