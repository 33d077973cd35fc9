"""``nnsteer export`` and ``nnsteer import``: vectors to and from llama.cpp and plain files."""

from __future__ import annotations

from pathlib import Path

import click

from nnsteer.cli.common import model_choice_options, open_model, run_dir
from nnsteer.errors import BadInput
from nnsteer.steer.export import export_vector, import_vector


def _layer_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--layers {value!r}: expected comma-separated layer numbers") from None


@click.command(name="export")
@click.option("--model", default=None, help="Model whose run directory to use (runs/<slug>).")
@click.option("--behaviour", required=True, help="The label whose vector to export.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "pt"]), default="gguf", show_default=True,
              help="gguf: a llama.cpp control vector (--control-vector); pt: {layer: tensor}.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="File to write.")
@click.option("--coefficient", type=float, default=None,
              help="Steering strength, split evenly over the layers. Default: layers.json's.")
@click.option("--layers", callback=_layer_list, default=None,
              help="Comma-separated layers. Default: layers.json's.")
@click.option("--direction", type=click.Choice(["positive", "negative"]), default="positive",
              show_default=True, help="negative writes the subtracted vector.")
@click.option("--force", is_flag=True,
              help="Replace an existing file (never one of the run directory's own).")
@click.pass_context
def export_command(ctx: click.Context, model: str | None, behaviour: str, fmt: str, out: Path,
                   coefficient: float | None, layers: list[int] | None, direction: str,
                   force: bool) -> None:
    """Write a behaviour's steering as a llama.cpp control vector or a plain .pt file
    (with its metadata in a .json file beside it)."""
    run = run_dir(ctx, model)
    added = export_vector(run, behaviour, fmt, out, coefficient=coefficient, layers=layers,
                          direction=direction, force=force)
    click.echo(f"wrote {out}: layers {', '.join(map(str, sorted(added)))}")


@click.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--as", "name", required=True, help="Label to store it under (a behaviour label to evaluate it).")
@click.option("--replace", is_flag=True, help="Replace an extracted vector of the same label.")
@click.option("--force", is_flag=True,
              help="Import a file made on another model, or add to vectors made on another "
                   "model (recorded in the vectors' metadata).")
@model_choice_options
@click.pass_context
def import_command(ctx: click.Context, file: Path, name: str, replace: bool, force: bool, model: str,
                   remote: bool, device: str | None, dtype: str) -> None:
    """Read a control vector (.gguf from llama.cpp, repeng, EasySteer; or a .pt) into the run's vectors."""
    run = run_dir(ctx, model)
    lm = open_model(model, remote, device, dtype)
    vs = import_vector(run, lm, file, name, replace=replace, force=force)
    layers = vs.metadata["imported"][name]["layers"]
    click.echo(f"{run.vectors}: imported {name!r} at layers {', '.join(map(str, layers))}; "
               f"{run.layers}: coefficient {len(layers)} (llama.cpp strength 1)")


COMMANDS = [export_command, import_command]
