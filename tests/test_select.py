"""Layer selection on hand-written attribution tables."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.runs.store import RunDir, write_parquet
from nnsteer.selection.layers import first_allowed_layer, select_layers
from nnsteer.vectors.extract import VectorSet, save_vectors

N_LAYERS = 10
#: Per label, effect by layer. backtracking peaks at layer 1 (skipped by default) and 6.
EFFECTS = {
    "backtracking": [0.1, 9.0, 0.2, 0.3, 0.4, 0.5, 3.0, 2.5, 1.0, 0.1],
    "adding-knowledge": [5.0, 4.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.5, 0.5],
}


@pytest.fixture()
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path)
    vectors = {label: torch.zeros(N_LAYERS, 8) for label in [*EFFECTS, "deduction", "overall"]}
    save_vectors(VectorSet(vectors, {}), run.vectors)
    rows = [{"label": label, "layer": layer, "effect": effect, "std": 0.0, "n_spans": 3,
             "metric": "nll"} for label, effects in EFFECTS.items() for layer, effect in enumerate(effects)]
    write_parquet(pl.DataFrame(rows), run.attribution, {})
    return run


def contract(choice: dict) -> dict:
    """The CONTRACTS.md keys of each entry of ``layers.json``."""
    return {label: {k: entry[k] for k in ("vector_layer", "layers", "coefficient")}
            for label, entry in choice.items()}


def test_best_layer_outside_the_earliest(run, capsys):
    choice = select_layers(run)  # skips ceil(0.2 × 10) = 2 layers
    assert contract(choice) == {
        "backtracking": {"vector_layer": 6, "layers": [6], "coefficient": 1.0},
        "adding-knowledge": {"vector_layer": 4, "layers": [4], "coefficient": 1.0},
    }
    assert json.loads(run.layers.read_text()) == choice
    entry = choice["backtracking"]
    assert entry["chosen_by"] == "attribution"
    assert entry["provenance"]["stage"] == "select"
    assert entry["provenance"]["options"]["skip_fraction"] == 0.2
    out = capsys.readouterr().out
    assert "backtracking: layer 6 (3); runner-up 7 (2.5), margin 0.5 (16.7%)" in out
    # A tie at the top: the earlier layer wins, the margin is zero.
    assert "adding-knowledge: layer 4 (2); runner-up 5 (2), margin 0 (0.0%)" in out


def test_no_skipping_top_k_and_coefficient(run):
    assert select_layers(run, skip_fraction=0)["backtracking"]["layers"] == [1]
    choice = select_layers(run, top_k=3, coefficient=2.0, labels=["backtracking"])
    assert contract(choice) == {"backtracking": {"vector_layer": 6, "layers": [6, 7, 8], "coefficient": 2.0}}


def test_layers_by_hand_need_no_attribution(run, capsys):
    run.attribution.unlink()
    choice = select_layers(run, layers={"backtracking": [3, 4], "adding-knowledge": [5]})
    assert contract(choice)["backtracking"] == {"vector_layer": 3, "layers": [3, 4], "coefficient": 1.0}
    assert choice["backtracking"]["chosen_by"] == "hand"
    assert "given by hand" in capsys.readouterr().out


def test_first_allowed_layer():
    assert [first_allowed_layer(28, f) for f in (0, 0.2, 0.5)] == [0, 6, 14]


@pytest.mark.parametrize("kwargs, message", [
    ({"skip_fraction": 1.0}, "--skip-fraction 1.0"),
    ({"top_k": 9}, "only 8 layer"),
    ({"layers": {"backtracking": [10]}}, "out of range 0..9"),
    ({"labels": ["initializing"]}, "no steering vector for 'initializing'"),
    ({"labels": ["deduction"]}, "no attribution for 'deduction'"),
    ({"coefficient": float("nan")}, "--coefficient: nan is not a number >= 0"),
    ({"coefficient": -1.0}, r"--coefficient: -1.0 is not a number >= 0 \(the direction gives the sign\)"),
])
def test_bad_input(run, kwargs, message):
    before = run.layers.exists()
    with pytest.raises(BadInput, match=message):
        select_layers(run, **kwargs)
    assert run.layers.exists() == before


def test_cli(run):
    runner = CliRunner()
    result = runner.invoke(cli, ["--run-dir", str(run.root), "select", "--layers", "backtracking=2,3"])
    assert result.exit_code == 0, result.output
    assert json.loads(run.layers.read_text())["backtracking"]["layers"] == [2, 3]
    result = runner.invoke(cli, ["--run-dir", str(run.root), "select", "--layers", "backtracking"])
    assert result.exit_code == 2 and "LABEL=LAYER" in result.output
