"""Export to llama.cpp control vectors and .pt, import from them: files checked with the gguf
reader and written plainly as llama.cpp's ``cvector-generator`` writes them; an imported
vector steers as forward hooks adding each ``direction.N`` at block N."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from test_generation import hf_greedy, write_tasks
from test_steer import LAYERS, NEW, write_vectors

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.labels import OVERALL
from nnsteer.modeling.identity import application, model_fingerprint
from nnsteer.runs.store import RunDir, write_json
from nnsteer.steer.chains import random_like, steer_chains
from nnsteer.steer.export import export_vector, import_vector, read_control_vector
from nnsteer.vectors.extract import VectorSet, load_vectors, save_vectors


@pytest.fixture
def run(tmp_path, tiny_llama) -> RunDir:
    run = RunDir(tmp_path / "run")
    write_tasks(run, n_train=1, n_eval=2)
    write_json(run.layers, LAYERS)
    return run


def cvector_generator_file(path, directions: dict[int, np.ndarray], hint="llama"):
    """A control vector written as llama.cpp's cvector-generator writes one."""
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_int32("controlvector.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_export_is_what_steer_adds(run, tmp_path):
    vectors = write_vectors(run, 4, 64)
    out = tmp_path / "et.gguf"
    export_vector(run, "example-testing", "gguf", out, layers=[1, 2, 3])
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.layer_count"].contents() == 3
    assert json.loads(reader.fields["nnsteer.layers"].contents()) == [1, 2, 3]
    assert reader.fields["nnsteer.hook_site"].contents().startswith("output of decoder block l")
    expected = 3.0 / 3 * vectors["example-testing"][2]  # layers.json: coefficient 3, vector layer 2
    for tensor in reader.tensors:
        assert tensor.name in {"direction.1", "direction.2", "direction.3"}
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        torch.testing.assert_close(torch.from_numpy(np.array(tensor.data)), expected, rtol=0, atol=0)
    negative = tmp_path / "neg.gguf"
    export_vector(run, "backtracking", "gguf", negative, coefficient=2.0, direction="negative")
    [(layer, vector)] = read_control_vector(negative)[0].items()
    assert layer == 1 and torch.equal(vector, -2.0 * vectors["backtracking"][1])


def test_layer_zero_is_one_line(run, tmp_path):
    write_vectors(run, 4, 64)
    with pytest.raises(BadInput, match=r"^layer 0: llama.cpp cannot steer the output of block 0"):
        export_vector(run, "example-testing", "gguf", tmp_path / "x.gguf")  # layers.json has 0
    assert not (tmp_path / "x.gguf").exists()


def test_pt_export(run, tmp_path):
    vectors = write_vectors(run, 4, 64)
    out = tmp_path / "et.pt"
    export_vector(run, "example-testing", "pt", out)
    saved = torch.load(out, weights_only=True)
    assert sorted(saved) == [0, 1, 2]
    assert torch.equal(saved[0], vectors["example-testing"][2])  # 3.0 / 3 layers
    assert json.loads(out.with_suffix(".json").read_text())["behaviour"] == "example-testing"


def test_import_steers_each_direction_at_its_block(run, tmp_path, tiny_llama):
    gen = torch.Generator().manual_seed(3)
    directions = {n: torch.randn(64, generator=gen).numpy() for n in (1, 3)}
    path = tmp_path / "other.gguf"
    cvector_generator_file(path, directions)
    import_vector(run, tiny_llama, path, "backtracking")
    table = steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=NEW)
    rows = table.filter(pl.col("task_id") == table["task_id"][0])
    task_prompt = _task_prompt(run, rows["task_id"][0])
    added = {n: torch.from_numpy(v) for n, v in directions.items()}
    for direction, sign in (("positive", 1), ("negative", -1)):
        row = rows.filter((pl.col("direction") == direction) & (pl.col("vector") == "behaviour"))
        expected = hf_greedy(tiny_llama, [task_prompt], NEW, add={n: sign * v for n, v in added.items()})
        assert row["output_ids"][0].to_list() == expected[0]
    random_row = rows.filter((pl.col("direction") == "positive") & (pl.col("vector") == "random"))
    stacked = torch.stack([added[1], added[3]])
    control = random_like(stacked, 0, "backtracking")
    expected = hf_greedy(tiny_llama, [task_prompt], NEW, add={1: control[0], 3: control[1]})
    assert random_row["output_ids"][0].to_list() == expected[0]


def _task_prompt(run, task_id):
    tasks = pl.read_parquet(run.tasks)
    return tasks.filter(pl.col("task_id") == task_id)["prompt"][0]


def test_round_trip_export_import(run, tmp_path, tiny_llama):
    vectors = write_vectors(run, 4, 64)
    out = tmp_path / "bt.gguf"
    export_vector(run, "example-testing", "gguf", out, layers=[2, 3], coefficient=4.0)
    other = RunDir(tmp_path / "other")
    vs = import_vector(other, tiny_llama, out, "example-testing")
    assert vs.metadata["imported"]["example-testing"]["nnsteer.behaviour"] == "example-testing"
    spec = {2: 2.0 * vectors["example-testing"][2], 3: 2.0 * vectors["example-testing"][2]}
    for layer, vector in spec.items():
        assert torch.equal(vs["example-testing"][layer], vector)
    assert json.loads(other.layers.read_text())["example-testing"]["coefficient"] == 2.0


@pytest.mark.parametrize("directions, message", [
    ({1: np.ones(32)}, r"width 32, tiny-llama has width 64$"),
    ({2: np.ones(64), 4: np.ones(64)}, r"has layer 4 \(2 layers up to 4\), tiny-llama has layers 0..3$"),
])
def test_import_refuses_a_vector_that_does_not_fit(run, tmp_path, tiny_llama, directions, message):
    path = tmp_path / "bad.gguf"
    cvector_generator_file(path, directions)
    with pytest.raises(BadInput, match=message):
        import_vector(run, tiny_llama, path, "backtracking")
    assert not run.vectors.exists()


def test_import_keeps_extracted_vectors(run, tmp_path, tiny_llama):
    write_vectors(run, 4, 64)
    path = tmp_path / "v.gguf"
    cvector_generator_file(path, {2: np.ones(64)})
    with pytest.raises(BadInput, match="already has an extracted 'backtracking' vector"):
        import_vector(run, tiny_llama, path, "backtracking")
    vs = import_vector(run, tiny_llama, path, "mine")
    assert set(vs.vectors) >= {"backtracking", "mine", OVERALL}
    assert torch.equal(vs["mine"][2], torch.ones(64)) and vs["mine"][[0, 1, 3]].abs().sum() == 0


def test_cli_export_import(run, tmp_path, tiny_llama):
    write_vectors(run, 4, 64)
    out = tmp_path / "bt.gguf"
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "export", "--behaviour", "backtracking",
                                      "--out", str(out), "--layers", "1,3"])
    assert result.exit_code == 0, result.output
    assert sorted(read_control_vector(out)[0]) == [1, 3]
    bad = CliRunner().invoke(cli, ["--run-dir", str(run.root), "export", "--behaviour", "backtracking",
                                   "--out", str(out), "--layers", "0,1"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "layer 0: llama.cpp" in bad.output
    model_dir = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    other = tmp_path / "other"
    result = CliRunner().invoke(cli, ["--run-dir", str(other), "import", str(out), "--as", "backtracking",
                                      "--model", str(model_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_vectors(other / "vectors.safetensors").metadata["per_layer_labels"] == ["backtracking"]


def test_read_control_vector_follows_llama_cpp_rules(tmp_path):
    path = tmp_path / "zero.gguf"
    cvector_generator_file(path, {0: np.zeros(8)})
    with pytest.raises(BadInput, match="direction.0: llama.cpp has no layer 0"):
        read_control_vector(path)
    save_vectors(VectorSet({"x": torch.zeros(2, 2)}), tmp_path / "v.safetensors")
    with pytest.raises(BadInput):
        read_control_vector(tmp_path / "v.safetensors")


def _export(run, out, *extra):
    return CliRunner().invoke(cli, ["--run-dir", str(run.root), "export", "--behaviour",
                                    "backtracking", "--out", str(out), *extra])


@pytest.mark.parametrize("name, fmt, message", [
    ("layers.pt", "pt", "would write {run}/layers.json, a file of the run directory"),
    ("vectors.safetensors", "gguf", "would write {run}/vectors.safetensors, a file of the run"),
    ("tasks.parquet", "pt", "would write {run}/tasks.parquet, a file of the run directory"),
    (".nnsteer.lock", "gguf", "would write {run}/.nnsteer.lock, a file of the run directory"),
    ("pipeline.json", "gguf", "would write {run}/pipeline.json, a file of the run directory"),
    (".extract.partial.pt", "pt", "would write {run}/.extract.partial.pt, a file of the run"),
])
def test_export_never_writes_over_the_runs_own_files(run, name, fmt, message):
    """Not even with --force: the run directory is byte for byte as it was."""
    write_vectors(run, 4, 64)
    for own in ("pipeline.json", ".extract.partial.pt"):
        run.path(own).write_text("{}")
    before = {p.name: p.read_bytes() for p in run.root.iterdir()}
    result = _export(run, run.path(name), "--format", fmt, "--layers", "1", "--force")
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert message.format(run=run.root.resolve()) in result.output
    assert {p.name: p.read_bytes() for p in run.root.iterdir()} == before


def test_export_replaces_an_existing_file_only_with_force(run, tmp_path):
    write_vectors(run, 4, 64)
    tensors, metadata = tmp_path / "bt.pt", tmp_path / "bt.json"
    metadata.write_text("mine")
    result = _export(run, tensors, "--format", "pt", "--layers", "1")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"{metadata} exists: choose another name, or pass --force" in result.output
    assert metadata.read_text() == "mine" and not tensors.exists()
    assert _export(run, tensors, "--format", "pt", "--layers", "1", "--force").exit_code == 0
    assert json.loads(metadata.read_text())["behaviour"] == "backtracking"
    gguf_file = tmp_path / "bt.gguf"
    gguf_file.write_text("mine")
    assert _export(run, gguf_file, "--layers", "1").exit_code == 2
    assert gguf_file.read_text() == "mine"
    same = _export(run, tmp_path / "x.json", "--format", "pt", "--layers", "1", "--force")
    assert same.exit_code == 2 and "which would replace the vectors" in same.output
    assert not (tmp_path / "x.json").exists()


def _vectors_made_on(run, lm, name: str, fingerprint: str | None) -> None:
    gen = torch.Generator().manual_seed(0)
    vectors = {label: torch.randn(4, 64, generator=gen) for label in ("backtracking", OVERALL)}
    save_vectors(VectorSet(vectors, {"model": {"model": name}, **application(lm, fingerprint)}),
                 run.vectors)


@pytest.mark.parametrize("fmt", ["gguf", "pt"])
def test_import_refuses_a_file_made_on_another_model_unless_forced(run, tmp_path, tiny_llama, fmt):
    """The fingerprint a file carries is compared with the model's; --force imports it
    anyway and says so in the vectors' metadata."""
    _vectors_made_on(run, tiny_llama, "tiny-other", "0" * 64)
    out = tmp_path / f"bt.{fmt}"
    export_vector(run, "backtracking", fmt, out, layers=[1, 2], coefficient=2.0)
    fresh = RunDir(tmp_path / "fresh")
    with pytest.raises(BadInput, match=rf"^{out}: made on tiny-other \(weights fingerprint "
                                       r"000000000000\), but tiny-llama has fingerprint "
                                       r"[0-9a-f]{12}: .*pass --force"):
        import_vector(fresh, tiny_llama, out, "backtracking")
    assert not fresh.root.exists()
    vs = import_vector(fresh, tiny_llama, out, "backtracking", force=True)
    forced = vs.metadata["imported"]["backtracking"]["forced"]
    assert forced["made_on"] == {"model": {"model": "tiny-other"}, "fingerprint": "0" * 64}
    assert forced["imported_into"] == "tiny-llama"
    assert forced["fingerprint"] == vs.metadata["fingerprint"] == model_fingerprint(tiny_llama)


def test_import_accepts_a_file_made_on_the_same_model(run, tmp_path, tiny_llama):
    _vectors_made_on(run, tiny_llama, "tiny-llama", model_fingerprint(tiny_llama))
    out = tmp_path / "bt.pt"
    export_vector(run, "backtracking", "pt", out, layers=[1], coefficient=1.0)
    vs = import_vector(RunDir(tmp_path / "fresh"), tiny_llama, out, "backtracking")
    assert "forced" not in vs.metadata["imported"]["backtracking"]


def _sparse() -> torch.Tensor:
    return torch.ones(64).to_sparse()


@pytest.mark.parametrize("content, message", [
    ({1: torch.ones(2, 32)}, "layer 1: has shape [2, 32], not one vector (1-D)"),
    ({1: torch.ones(8, 8)}, "layer 1: has shape [8, 8], not one vector (1-D)"),
    ({1.0: torch.ones(64)}, "key 1.0 is not a layer number"),
    ({True: torch.ones(64)}, "key True is not a layer number"),
    ({"1a": torch.ones(64)}, "key '1a' is not a layer number"),
    ({2: torch.ones(64), "2": torch.ones(64)}, "layer 2 appears more than once among its keys"),
    ({1: torch.ones(64, dtype=torch.complex64)}, "layer 1: holds complex64 values, not real"),
    ({1: torch.ones(64, dtype=torch.int64)}, "layer 1: holds int64 values, not real"),
    ({1: torch.zeros(64)}, "layer 1: is all zeros"),
    ({1: torch.full((64,), 1e39, dtype=torch.float64)}, "layer 1: holds NaN or inf (in float32)"),
    ({1: "sparse"}, "layer 1: a sparse tensor"),
    ({}, "holds no direction tensors"),
    ([torch.ones(64)], "expected a {layer: tensor} dict"),
])
def test_pt_import_is_checked_like_gguf(run, tmp_path, tiny_llama, content, message):
    path = tmp_path / "v.pt"
    if isinstance(content, dict):
        content = {k: _sparse() if isinstance(v, str) else v for k, v in content.items()}
    torch.save(content, path)
    with pytest.raises(BadInput, match=rf"^{path}: " + re.escape(message)):
        import_vector(run, tiny_llama, path, "mine")
    assert not run.vectors.exists()


def test_gguf_import_is_checked_by_the_same_rules(tmp_path, tiny_llama):
    path = tmp_path / "zero.gguf"
    cvector_generator_file(path, {1: np.ones(64), 2: np.zeros(64)})
    with pytest.raises(BadInput, match=rf"^{path}: layer 2: is all zeros"):
        import_vector(RunDir(tmp_path / "run"), tiny_llama, path, "mine")
