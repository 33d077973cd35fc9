"""The authors' released attribution next to a run's, per label and layer.

The released ``layer_effects_<model>.pt`` files (``vector-layer-attribution/results/vars/``
in ``cvenhoff/steering-thinking-llms``) hold, per label, one list per chain of its mean
``|ΔL|`` at every layer. Their figure is the mean over chains with the std (ddof 0), NaN
counted as 0; this script computes that and puts the run's ``attribution.parquet`` beside
it, with each label's rank correlation over layers and both argmax layers. For a faithful
comparison the run should use ``nnsteer run --released-code`` (released metric, spans of
the other labels, 50 chains, chain aggregation).

Usage: python analysis/compare_released_attribution.py LAYER_EFFECTS.pt RUN_DIR [--out FILE.csv]
"""

from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import click
import polars as pl
import torch

from nnsteer.errors import BadInput, NnsteerError
from nnsteer.runs.store import RunDir, read_metadata, read_parquet
from nnsteer.selection.attribution import spearman


def released_profile(path: Path) -> pl.DataFrame:
    """Per (label, layer) of a released file: ``released_effect``, ``released_std``, ``released_chains``."""
    try:
        effects = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise BadInput(f"{path}: cannot read it as a torch file ({type(exc).__name__})") from None
    if not isinstance(effects, dict):
        raise BadInput(f"{path}: expected a dict of label -> per-chain lists of per-layer effects")
    rows = []
    for label, chains in effects.items():
        if not chains:  # the released plot skips labels without effects too
            continue
        try:
            values = torch.tensor(chains, dtype=torch.float64)
        except (TypeError, ValueError):
            raise BadInput(f"{path}: {label!r} is not a list of equally long per-layer lists") from None
        if values.ndim != 2:
            raise BadInput(f"{path}: {label!r} is not a list of equally long per-layer lists")
        values = values.nan_to_num(nan=0.0)
        mean, std = values.mean(0), values.std(0, correction=0)
        rows += [{"label": label, "layer": layer, "released_effect": mean[layer].item(),
                  "released_std": std[layer].item(), "released_chains": len(values)}
                 for layer in range(values.shape[1])]
    return pl.DataFrame(rows, schema={"label": pl.String, "layer": pl.Int64,
                                      "released_effect": pl.Float64, "released_std": pl.Float64,
                                      "released_chains": pl.Int64})


def side_by_side(released: pl.DataFrame, run: RunDir) -> pl.DataFrame:
    """The released profile joined with the run's attribution on (label, layer)."""
    ours = read_parquet(run.attribution).select(
        "label", "layer", pl.col("effect").alias("run_effect"), pl.col("std").alias("run_std"))
    table = released.join(ours, on=["label", "layer"], how="inner").sort("label", "layer")
    if table.is_empty():
        raise BadInput(f"{run.attribution}: no (label, layer) in common with the released file")
    return table.with_columns(ratio=pl.col("run_effect") / pl.col("released_effect"))


def summary_lines(table: pl.DataFrame, aggregate: str) -> list[str]:
    """Per label: rank correlation over layers, argmax layers, median ratio of the effects."""
    lines = [f"run averaged over {aggregate} (the released figure: chains)"]
    for label in table["label"].unique(maintain_order=True):
        rows = table.filter(pl.col("label") == label)
        released, ours = rows["released_effect"].to_list(), rows["run_effect"].to_list()
        rho = spearman(released, ours)
        best = (rows["layer"][released.index(max(released))], rows["layer"][ours.index(max(ours))])
        ratio = rows["ratio"].median()
        lines.append(f"{label}: Spearman over {len(rows)} layers {rho:.3f}; argmax layer "
                     f"released {best[0]}, run {best[1]}; median run/released "
                     f"{'n/a' if ratio is None or math.isnan(ratio) else f'{ratio:.3g}'}")
    return lines


@click.command(help=__doc__)
@click.argument("layer_effects", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the per-layer table as CSV.")
def main(layer_effects: Path, run_dir: Path, out: Path | None) -> None:
    run = RunDir(run_dir)
    try:
        table = side_by_side(released_profile(layer_effects), run)
        aggregate = read_metadata(run.attribution).get("options", {}).get("aggregate", "spans")
    except NnsteerError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=4):
        click.echo(table)
    for line in summary_lines(table, aggregate):
        click.echo(line)
    if out is not None:
        table.write_csv(out)
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
