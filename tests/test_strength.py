"""select --coefficient auto: the rule on recorded sweeps, the validation split, and the
whole sweep from the CLI on a tiny random model."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from nnsteer.annotation.stage import ANNOTATION_SCHEMA
from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.runs.store import RunDir, provenance, write_parquet
from nnsteer.selection.strength import (
    DEFAULT_GRID,
    SWEEP_FILE,
    Bounds,
    check_grid,
    choose_coefficient,
)
from nnsteer.tasks.stage import carve_validation, load_builtin_tasks, write_tasks
from nnsteer.vectors.extract import VectorSet, save_vectors


def row(coefficient, effect, coherence=0.0, repetition=0.0, accuracy=0.0):
    return {"coefficient": coefficient, "effect": effect, "coherence": coherence,
            "repetition": repetition, "accuracy": accuracy}


#: A recorded dose-response: the effect grows with the coefficient, and so do the costs,
#: until repetition (at 4) and coherence and accuracy (at 8) break their bounds.
RECORDED = [row(0.25, 0.5), row(0.5, 1.5, 0.05, 1.0), row(1, 3.0, 0.1, 2.0, -1.0),
            row(2, 6.0, 0.3, 8.0, -5.0), row(4, 9.0, 0.45, 14.0, -8.0),
            row(8, 12.0, 1.2, 30.0, -25.0)]


def test_largest_coefficient_within_bounds():
    coefficient, reason = choose_coefficient(RECORDED, Bounds())
    assert coefficient == 2
    assert "+6.0 pp" in reason and "×4: repetition +14.0 pp > 10" in reason
    assert "×8: coherence +1.20 nats/token > 0.5, repetition +30.0 pp > 10, accuracy -25.0 pp < -10" \
        in reason
    # looser bounds let 4 through; tighter ones stop at 1; order of the rows does not matter
    assert choose_coefficient(RECORDED[::-1], Bounds(repetition=20))[0] == 4
    assert choose_coefficient(RECORDED, Bounds(coherence=0.2, repetition=5, accuracy=2))[0] == 1


def test_no_positive_effect_falls_back_to_the_smallest():
    sweep = [row(0.25, 0.0), row(1, -2.0), row(4, None)]
    coefficient, reason = choose_coefficient(sweep, Bounds())
    assert coefficient == 0.25
    assert reason.startswith("no coefficient qualified (×0.25: effect +0.0 pp is not positive")
    assert "×4: no effect measured" in reason and reason.endswith("smallest of the grid, ×0.25")
    # positive effects everywhere, but every coefficient breaks a bound
    coefficient, reason = choose_coefficient([row(1, 5.0, accuracy=-11.0), row(2, 5.0, 0.6)],
                                             Bounds())
    assert coefficient == 1 and "no coefficient qualified" in reason


def test_ties_and_edges():
    # equal effects: the larger coefficient; a cost exactly at its bound is within it
    assert choose_coefficient([row(1, 4.0), row(2, 4.0, 0.5, 10.0, -10.0)], Bounds())[0] == 2
    # an unmeasured cost (no gradable answer) does not count against a coefficient
    assert choose_coefficient([row(1, 1.0), row(2, 2.0, None, None, None)], Bounds())[0] == 2
    # a bad effect at a high coefficient does not hide a good one below it
    assert choose_coefficient([row(1, 1.0), row(2, -1.0), row(4, 3.0, repetition=50.0)],
                              Bounds())[0] == 1
    assert choose_coefficient([row(3, 1.0)], Bounds(0, 0, 0))[0] == 3
    with pytest.raises(BadInput, match="no coefficient"):
        choose_coefficient([], Bounds())


@pytest.mark.parametrize("make, message", [
    (lambda: Bounds(coherence=-1), "--max-coherence-cost -1: expected a finite number >= 0"),
    (lambda: Bounds(repetition=float("nan")), "--max-repetition-cost nan"),
    (lambda: Bounds(accuracy="x"), "--max-accuracy-cost 'x'"),
    (lambda: check_grid([]), "--grid: give at least one coefficient"),
    (lambda: check_grid([1, 0]), "--grid 0: expected numbers > 0"),
    (lambda: check_grid([1, float("inf")]), "--grid inf"),
    (lambda: check_grid([1, 2, 1]), "a coefficient repeats"),
])
def test_bad_bounds_and_grids(make, message):
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("+", r"\+")) as exc:
        make()
    assert "\n" not in str(exc.value)


def test_default_grid_is_log_spaced():
    assert check_grid(None) == [0.25, 0.5, 1, 2, 4, 8] == list(DEFAULT_GRID)
    assert check_grid([4, 0.5]) == [0.5, 4]


def test_validation_never_overlaps_eval_or_train():
    tasks = load_builtin_tasks()
    carved = carve_validation(tasks, 4)
    split = dict(zip(carved["task_id"], carved["split"]))
    assert carved.filter(pl.col("split") == "validation").group_by("category").len()["len"].to_list() \
        == [4] * 10
    assert all(split[t] == "eval" for t in tasks.filter(pl.col("split") == "eval")["task_id"])
    # the last train tasks of each category: the first ones stay for training (--per-category)
    first = tasks.filter(pl.col("split") == "train").group_by("category", maintain_order=True).head(26)
    assert all(split[t] == "train" for t in first["task_id"])
    with pytest.raises(BadInput, match="--validation-per-category 30: category '.*' has only 30 train task"):
        carve_validation(tasks, 30)


def test_tasks_cli_writes_a_validation_split(tmp_path):
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "tasks", "--per-category", "5",
                                      "--eval-per-category", "3", "--validation-per-category", "2"])
    assert result.exit_code == 0, result.output
    assert "50 train" in result.output and "20 validation" in result.output
    tasks = pl.read_parquet(RunDir(tmp_path).tasks)
    assert set(tasks.filter(pl.col("split") == "validation")["task_id"]).isdisjoint(
        tasks.filter(pl.col("split") != "validation")["task_id"])


@pytest.fixture()
def auto_run(tmp_path, tiny_llama, tokenizer):
    """A saved tiny model and a run directory with validation tasks, vectors made on it and
    a rules annotation."""
    model_dir = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = RunDir(tmp_path / "run")
    source = tmp_path / "tasks.jsonl"
    source.write_text("\n".join(json.dumps(t) for t in [
        {"prompt": "What is 3 + 4?", "category": "sums", "answer": "7"},
        {"prompt": "What is 2 + 2?", "category": "sums", "answer": "4"},
        {"prompt": "What is 5 + 1?", "category": "sums", "answer": "6"},
        {"prompt": "What is 1 + 1?", "category": "sums", "answer": "2", "split": "eval"}]))
    write_tasks(run, source="file", path=source, validation_per_category=2)
    torch.manual_seed(0)
    arch = tiny_llama.arch
    save_vectors(VectorSet({"backtracking": 4 * torch.randn(arch.n_layers, arch.d_model)},
                           {"model": {"model": str(model_dir)}}), run.vectors)
    write_parquet(pl.DataFrame(schema=ANNOTATION_SCHEMA), run.annotations,
                  provenance("annotate", {"annotator": "rules"}))
    return run, model_dir


def test_cli_select_auto_writes_the_sweep(auto_run):
    run, model_dir = auto_run
    result = CliRunner().invoke(cli, [
        "--run-dir", str(run.root), "select", "--model", str(model_dir), "--device", "cpu",
        "--layers", "backtracking=2", "--coefficient", "auto", "--grid", "0.5,4",
        "--max-new-tokens", "6", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    entry = json.loads(run.layers.read_text())["backtracking"]
    record = entry["provenance"]["coefficient_sweep"]
    assert record["grid"] == [0.5, 4] and record["bounds"] == {
        "coherence": 0.5, "repetition": 10.0, "accuracy": 10.0}
    assert [r["coefficient"] for r in record["sweep"]] == [0.5, 4]
    assert all(r["n_pairs"] == 2 and r["coherence"] is not None for r in record["sweep"])
    # the choice is the rule's on the recorded sweep, and says why in one line
    assert (entry["coefficient"], record["reason"]) == choose_coefficient(record["sweep"], Bounds())
    assert f"backtracking: coefficient ×{entry['coefficient']:g}: {record['reason']}" in result.output
    assert entry["provenance"]["options"]["coefficient"] == "auto"
    # the sweep's chains are on the validation tasks only, one baseline each
    chains = pl.read_parquet(run.path(SWEEP_FILE))
    assert set(chains["split"]) == {"validation"} and chains.height == 2 * (1 + 2)
    tasks = pl.read_parquet(run.tasks)
    assert set(chains["task_id"]) == set(tasks.filter(pl.col("split") == "validation")["task_id"])


@pytest.mark.parametrize("args, message", [
    (["--grid", "1,x"], "expected comma-separated numbers"),
    (["--grid", "0,1"], "--grid 0.0: expected numbers > 0"),
    (["--max-accuracy-cost", "-5"], "--max-accuracy-cost -5.0: expected a finite number >= 0"),
    (["--coefficient", "strong"], "expected a number or auto"),
])
def test_cli_bad_values_are_one_line(auto_run, args, message):
    run, model_dir = auto_run
    base = ["--run-dir", str(run.root), "select", "--model", str(model_dir), "--layers",
            "backtracking=2"]
    result = CliRunner().invoke(cli, base + (["--coefficient", "auto"] if "--coefficient" not in args
                                             else []) + args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert not run.layers.exists()


def test_report_costs_section_shows_the_sweep_with_its_bounds(tmp_path):
    from test_report import write_synthetic_run

    from nnsteer.report.steering import costs_section

    run = write_synthetic_run(tmp_path)
    assert "coefficient sweep" not in costs_section(run).body  # fixed coefficients: no sweep
    layers = json.loads(run.layers.read_text())
    chosen, reason = choose_coefficient(RECORDED, Bounds())
    layers["backtracking"]["provenance"]["coefficient_sweep"] = {
        "grid": [r["coefficient"] for r in RECORDED], "bounds": vars(Bounds()),
        "sweep": RECORDED, "chosen": chosen, "reason": reason}
    run.layers.write_text(json.dumps(layers))
    body = costs_section(run).body
    assert "coefficient sweep" in body and "coherence (NLL) at most +0.5 nats/token" in body
    assert "<td>backtracking</td><td>2</td><td>6</td><td>0.3</td><td>8</td><td>-5</td><td>chosen</td>" \
        in body
    assert "<td>4</td><td>9</td><td>0.45</td><td>14</td><td>-8</td><td>repetition +14.0 pp &gt; 10" \
        in body
    assert "<td>1</td><td>3</td><td>0.1</td><td>2</td><td>-1</td><td>qualifies</td>" in body


def test_auto_without_validation_tasks_is_one_line(auto_run):
    run, model_dir = auto_run
    write_tasks(run, source="builtin", per_category=1, eval_per_category=1)
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "select", "--model", str(model_dir),
                                      "--layers", "backtracking=2", "--coefficient", "auto"])
    assert result.exit_code != 0 and not run.layers.exists()
    assert "no validation tasks for --coefficient auto: run `nnsteer tasks " \
           "--validation-per-category N`" in result.output
    assert result.output.strip().count("\n") == 0, result.output
