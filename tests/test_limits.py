"""Absurd strengths are refused in one line by every command that steers or writes
additions: coefficients beyond 1e6, and additions beyond 100 times the model's residual
norm (the overall mean of the vectors, or measured on the model and compared here with
the model's own hidden states)."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from test_export import cvector_generator_file
from test_steer import LAYERS, NEW, write_vectors
from test_steer import run as steer_run  # noqa: F401  (the fixture)

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.labels import OVERALL
from nnsteer.runs.store import RunDir, write_json, write_parquet
from nnsteer.selection.layers import select_layers
from nnsteer.steer.chains import steer_chains
from nnsteer.steer.export import import_vector
from nnsteer.steer.limits import (
    MAX_ADDITION_RATIO,
    PROBE_TEXT,
    check_additions,
    measure_residual_norms,
)
from nnsteer.vectors.extract import VectorSet, save_vectors


def test_the_bound_is_the_ratio_to_the_residual_norm():
    check_additions({1: torch.tensor([3.0, 4.0]) * MAX_ADDITION_RATIO}, [0.0, 5.0], "x")
    with pytest.raises(BadInput, match=r"^x: the addition at layer 1 has norm 501, 100 times the "
                                       r"model's residual norm there \(5; at most 100 times\): "
                                       r"lower the coefficient$"):
        check_additions({1: torch.tensor([3.0, 4.0]) * 100.2}, [0.0, 5.0], "x")
    check_additions({0: torch.full((2,), 1e30)}, [0.0, 5.0], "x")  # unknown norm: overflow only
    with pytest.raises(BadInput, match="^x: the addition at layer 0 overflows float32: do less$"):
        check_additions({0: torch.full((2,), 1e38, dtype=torch.float64) * 10}, None, "x",
                        advice="do less")


def test_measured_residual_norms_are_the_models_mean_block_output(tiny_llama):
    """Against forward hooks on the decoder blocks (the last hidden state HF returns is
    after the final norm)."""
    outputs = []
    hooks = [block.register_forward_hook(
        lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        for block in tiny_llama.hf_model.model.layers]
    try:
        with torch.no_grad():
            tiny_llama.hf_model(torch.tensor([tiny_llama.tokenizer.encode(PROBE_TEXT)]))
    finally:
        for hook in hooks:
            hook.remove()
    expected = [float(h[0, 1:].double().mean(0).norm()) for h in outputs]
    assert measure_residual_norms(tiny_llama) == pytest.approx(expected, rel=1e-4)


def test_export_refuses_an_absurd_coefficient(tmp_path, tiny_llama):
    run = RunDir(tmp_path / "run")
    write_json(run.layers, LAYERS)
    write_vectors(run, 4, 64)
    base = ["--run-dir", str(run.root), "export", "--behaviour", "backtracking", "--layers", "1",
            "--out", str(tmp_path / "bt.gguf")]
    result = CliRunner().invoke(cli, [*base, "--coefficient", "1e38"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "coefficient: 1e+38 is more than 1e6, far beyond any useful strength" in result.output
    result = CliRunner().invoke(cli, [*base, "--coefficient", "1e5"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "backtracking at --coefficient 100000: the addition at layer 1 has norm" in result.output
    assert not (tmp_path / "bt.gguf").exists()


def test_steer_refuses_an_absurd_coefficient(steer_run, tiny_llama):  # noqa: F811
    with pytest.raises(BadInput, match=r"^--coefficients: 1e\+39 is more than 1e6"):
        steer_chains(steer_run, tiny_llama, behaviours=["backtracking"], coefficients=[1.0, 1e39])
    with pytest.raises(BadInput, match=r"^--coefficients: backtracking at coefficient 5000: the "
                                       r"addition at layer 1 has norm .* times the model's "
                                       r"residual norm there"):
        steer_chains(steer_run, tiny_llama, behaviours=["backtracking"], coefficients=[5000.0],
                     max_new_tokens=NEW)
    assert not steer_run.steered.exists()


def test_select_refuses_an_absurd_coefficient_or_grid(tmp_path):
    run = RunDir(tmp_path / "run")
    save_vectors(VectorSet({label: torch.ones(6, 8) for label in ("backtracking", OVERALL)}),
                 run.vectors)
    write_parquet(pl.DataFrame({"label": "backtracking", "layer": list(range(6)),
                                "effect": [float(i) for i in range(6)]}), run.attribution, {})
    with pytest.raises(BadInput, match=r"^--grid: 1e\+39 is more than 1e6"):
        select_layers(run, coefficient="auto", grid=[1.0, 1e39])
    with pytest.raises(BadInput, match=r"^--coefficient: backtracking at coefficient 1000: the "
                                       r"addition at layer 5 has norm 2.83e\+03, 1e\+03 times"):
        select_layers(run, coefficient=1000.0)
    select_layers(run, coefficient=100.0)
    assert not run.path("sweep.parquet").exists()


def test_import_refuses_enormous_values_and_records_the_norms_it_measured(tmp_path, tiny_llama):
    run = RunDir(tmp_path / "run")
    path = tmp_path / "big.gguf"
    cvector_generator_file(path, {1: torch.full((64,), 7e30).numpy()})
    with pytest.raises(BadInput, match=rf"^{path}: the addition at layer 1 has norm 5.6e\+31, "
                                       r".* times the model's residual norm there .*: scale the "
                                       r"vectors down$"):
        import_vector(run, tiny_llama, path, "mine")
    assert not run.root.exists()
    cvector_generator_file(path, {1: torch.ones(64).numpy()})
    vs = import_vector(run, tiny_llama, path, "mine")
    assert vs.metadata["residual_norms"] == measure_residual_norms(tiny_llama)
