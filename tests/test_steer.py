"""The steer stage: steered rows against forward-hook references, controls, resume, bad input."""

from __future__ import annotations

import re

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import FaultAfter
from test_generation import PROMPTS, hf_greedy, write_tasks

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.generation import loop as generation
from nnsteer.labels import OVERALL, STEERED_LABELS
from nnsteer.runs.store import RunDir, read_metadata, write_json, write_parquet
from nnsteer.steer.chains import random_like, steer_chains
from nnsteer.vectors.extract import VectorSet, save_vectors

NEW = 6
LAYERS = {
    "backtracking": {"vector_layer": 1, "layers": [1], "coefficient": 1.5},
    "example-testing": {"vector_layer": 2, "layers": [0, 1, 2], "coefficient": 3.0},
}


def write_vectors(run: RunDir, n_layers: int, d_model: int, labels=STEERED_LABELS, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vectors = {label: torch.randn(n_layers, d_model, generator=gen) for label in [*labels, OVERALL]}
    save_vectors(VectorSet(vectors, {"variant": "paper"}), run.vectors)
    return vectors


@pytest.fixture
def run(tmp_path, tiny_llama) -> RunDir:
    run = RunDir(tmp_path)
    write_tasks(run, n_train=1, n_eval=2)
    write_json(run.layers, LAYERS)
    write_vectors(run, tiny_llama.arch.n_layers, tiny_llama.arch.d_model)
    return run


def hook_reference(lm, prompt, vector, layers, coefficient, direction):
    """The paper's steering written as forward hooks: ±coefficient/n × vector at each layer."""
    sign = 1 if direction == "positive" else -1
    return hf_greedy(
        lm,
        [prompt],
        NEW,
        add={layer: sign * coefficient / len(layers) * vector for layer in layers},
    )[0]


def test_steered_rows(run, tiny_llama):
    vectors = write_vectors(run, 4, 64)
    table = steer_chains(run, tiny_llama, behaviours=list(LAYERS), max_new_tokens=NEW, batch_size=7)
    # Per task: one baseline, then 2 behaviours x 2 directions x (behaviour, random) vectors.
    assert table.height == 2 * (1 + 2 * 2 * 2)
    assert table["chain_id"].n_unique() == table.height
    assert set(table["task_id"]) == {"e0", "e1"} and set(table["split"]) == {"eval"}
    baseline = table.filter(pl.col("chain_id") == "e0|baseline").row(0, named=True)
    assert (
        baseline["behaviour"],
        baseline["direction"],
        baseline["coefficient"],
        baseline["layers"],
        baseline["vector"],
    ) == (None, "none", 0.0, [], "none")
    assert baseline["output_ids"] == hf_greedy(tiny_llama, [PROMPTS[0]], NEW)[0]

    for row in table.filter(pl.col("behaviour").is_not_null()).iter_rows(named=True):
        choice = LAYERS[row["behaviour"]]
        assert row["chain_id"] == (
            f"{row['task_id']}|{row['behaviour']}|{row['direction']}|"
            f"{choice['coefficient']:g}|{row['vector']}"
        )
        assert row["layers"] == choice["layers"] and row["coefficient"] == choice["coefficient"]
        vector = vectors[row["behaviour"]][choice["vector_layer"]]
        if row["vector"] == "random":
            vector = random_like(vector, 0, row["behaviour"])
        prompt = PROMPTS[int(row["task_id"][1:])]
        assert row["output_ids"] == hook_reference(
            tiny_llama, prompt, vector, choice["layers"], choice["coefficient"], row["direction"]
        ), row["chain_id"]
    per_task = table.filter(pl.col("task_id") == "e0")["output_ids"].to_list()
    assert len({tuple(ids) for ids in per_task}) > len(per_task) // 2, "steering too weak to test"
    assert read_metadata(run.steered)["options"]["behaviours"] == list(LAYERS)


def test_random_control_matches_norm_and_seed():
    vector = torch.randn(64)
    control = random_like(vector, 0, "backtracking")
    torch.testing.assert_close(control.norm(), vector.norm())
    assert abs(torch.cosine_similarity(control, vector, dim=0)) < 0.5
    assert torch.equal(control, random_like(vector, 0, "backtracking"))
    assert not torch.equal(control, random_like(vector, 1, "backtracking"))
    assert not torch.equal(control, random_like(vector, 0, "example-testing"))


def test_coefficient_sweep(run, tiny_llama):
    vectors = write_vectors(run, 4, 64)
    table = steer_chains(
        run,
        tiny_llama,
        behaviours=["example-testing"],
        coefficients=[0.5, 2.0],
        random_control=False,
        limit=1,
        max_new_tokens=NEW,
    )
    assert table["chain_id"].to_list() == [
        "e0|baseline",
        "e0|example-testing|positive|0.5|behaviour",
        "e0|example-testing|negative|0.5|behaviour",
        "e0|example-testing|positive|2|behaviour",
        "e0|example-testing|negative|2|behaviour",
    ]
    row = table.row(4, named=True)
    assert row["coefficient"] == 2.0 and row["layers"] == [0, 1, 2]
    assert row["output_ids"] == hook_reference(
        tiny_llama, PROMPTS[0], vectors["example-testing"][2], [0, 1, 2], 2.0, "negative"
    )


def test_a_sweep_after_a_default_steer_keeps_the_first_coefficient(run, tiny_llama, capfd):
    options = dict(behaviours=["backtracking"], random_control=False, limit=1, max_new_tokens=NEW)
    first = steer_chains(run, tiny_llama, **options)
    capfd.readouterr()
    swept = steer_chains(run, tiny_llama, coefficients=[0.5, 2.0], **options)
    assert "dropping" not in capfd.readouterr().err
    assert swept["coefficient"].to_list() == [0.0, 0.5, 0.5, 1.5, 1.5, 2.0, 2.0]
    kept = swept.filter(pl.col("coefficient") == 1.5)
    assert kept["output_ids"].to_list() == first.filter(pl.col("coefficient") == 1.5)["output_ids"].to_list()
    again = steer_chains(run, tiny_llama, **options)  # the default again drops no sweep chain
    assert again["coefficient"].to_list() == swept["coefficient"].to_list()


def test_resume_keeps_chains_until_the_vectors_change(run, tiny_llama):
    options = dict(behaviours=["backtracking"], random_control=False, limit=1, max_new_tokens=NEW)
    first = steer_chains(run, tiny_llama, **options)
    write_parquet(
        first.with_columns(pl.lit("kept").alias("response")),
        run.steered,
        read_metadata(run.steered),
    )
    assert set(steer_chains(run, tiny_llama, **options)["response"]) == {"kept"}
    write_vectors(run, 4, 64, seed=1)
    assert "kept" not in steer_chains(run, tiny_llama, **options)["response"].to_list()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda run: write_vectors(run, 4, 64, labels=["backtracking"]),
            "no steering vector for 'example-testing'",
        ),
        (
            lambda run: write_json(run.layers, {"backtracking": LAYERS["backtracking"]}),
            "layers.json: no layers for 'example-testing'",
        ),
        (
            lambda run: write_json(
                run.layers, {**LAYERS, "backtracking": {**LAYERS["backtracking"], "layers": [7]}}
            ),
            "backtracking: layer 7 is out of range",
        ),
        (
            lambda run: write_json(run.layers, {**LAYERS, "backtracking": {"layers": [1]}}),
            "vector_layer must be an integer",
        ),
        (
            lambda run: write_json(
                run.layers, {**LAYERS, "backtracking": {**LAYERS["backtracking"], "coefficient": -1}}
            ),
            "entry 'backtracking': coefficient: -1 is not a number >= 0",
        ),
        (
            lambda run: write_vectors(run, 4, 32),
            r"\[4, 32\] per label but tiny-llama has 4 layers of width 64",
        ),
        (lambda run: write_tasks(run, n_train=2, n_eval=0), "no tasks in the 'eval' split"),
        (lambda run: run.layers.unlink(), r"layers.json not found: run `nnsteer --run-dir \S+ select` first"),
    ],
)
def test_bad_input(run, tiny_llama, change, message):
    change(run)
    with pytest.raises(BadInput, match=message):
        steer_chains(run, tiny_llama, behaviours=list(LAYERS), max_new_tokens=NEW)
    assert not run.steered.exists()


def test_cli_steer(run, tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    base = [
        "--run-dir",
        str(run.root),
        "steer",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--max-new-tokens",
        "3",
        "--limit",
        "1",
    ]
    result = CliRunner().invoke(
        cli, base + ["--behaviours", "backtracking", "--coefficients", "1,2", "--no-random-control"]
    )
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(run.steered)["coefficient"].to_list() == [0.0, 1.0, 1.0, 2.0, 2.0]
    bad = CliRunner().invoke(cli, base + ["--behaviours", "deduction"])
    assert bad.exit_code == 2 and "no layers for 'deduction'" in bad.output


def test_interrupted_steer_is_refused_by_evaluate_until_finished(run, tiny_llama, monkeypatch):
    from nnsteer.evaluation.stage import evaluate

    options = dict(behaviours=["backtracking"], limit=1, max_new_tokens=3, batch_size=2)
    FaultAfter(monkeypatch, generation, "generate_batch", after=1)
    with pytest.raises(KeyboardInterrupt):
        steer_chains(run, tiny_llama, **options)
    assert pl.read_parquet(run.steered).height == 2
    message = f"{run.steered} is incomplete (2 of 5 chains): rerun `nnsteer steer` to finish it"
    with pytest.raises(BadInput, match=re.escape(message)):
        evaluate(run, annotator="rules", tokenizer=tiny_llama.tokenizer)
    assert not run.evaluation.exists()

    FaultAfter(monkeypatch, generation, "generate_batch")
    assert steer_chains(run, tiny_llama, **options).height == 5
    assert read_metadata(run.steered)["complete"] is True
    evaluate(run, annotator="rules", tokenizer=tiny_llama.tokenizer, n_boot=10)
    assert pl.read_parquet(run.evaluation)["chain_id"].n_unique() == 5
