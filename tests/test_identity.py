"""Vector files say where they apply and which model made them; steer refuses another model's."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from conftest import build_tiny_hf
from test_steer import LAYERS, NEW, run, write_vectors  # noqa: F401  (the run fixture)

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.modeling.identity import (
    application,
    check_made_on,
    model_fingerprint,
    weights_fingerprint,
)
from nnsteer.steer.chains import steer_chains
from nnsteer.vectors.extract import VectorSet, save_vectors


def test_fingerprint_ignores_the_load_dtype_and_sees_a_fine_tune(tokenizer):
    model = build_tiny_hf("llama", len(tokenizer)).to(torch.bfloat16).float()  # bf16-exact weights
    same = copy.deepcopy(model).to(torch.bfloat16)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.model.layers[2].mlp.down_proj.weight[0, 5] += 0.5  # the embedding is untouched
    assert weights_fingerprint(model) == weights_fingerprint(same)
    assert weights_fingerprint(model) != weights_fingerprint(tuned)
    with torch.device("meta"):
        meta = build_tiny_hf("llama", 128)
    assert weights_fingerprint(meta) is None


def test_application_metadata(tiny_llama):
    meta = application(tiny_llama)
    assert meta["fingerprint"] == model_fingerprint(tiny_llama) and len(meta["fingerprint"]) == 64
    assert meta["hook_site"].endswith("hidden_states[l + 1])")
    assert meta["family"] == "llama" and meta["model_dtype"] == "float32"


def _other_model_vectors(run, lm, fingerprint="0" * 64, name="tiny-llama"):
    gen = torch.Generator().manual_seed(0)
    vectors = {label: torch.randn(4, 64, generator=gen) for label in LAYERS}
    metadata = {"model": {"model": name}, **application(lm, fingerprint=fingerprint)}
    save_vectors(VectorSet(vectors, metadata), run.vectors)


def test_steer_refuses_vectors_of_another_model_in_one_line(run, tiny_llama):  # noqa: F811
    _other_model_vectors(run, tiny_llama)
    with pytest.raises(BadInput, match=r"^\S+vectors.safetensors: made on tiny-llama \(weights fingerprint "
                                       r"000000000000\), but tiny-llama has fingerprint [0-9a-f]{12}: "):
        steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=NEW)
    table = steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=2, limit=1,
                         random_control=False, force=True)
    assert table.height == 3


def test_without_fingerprints_the_model_ids_are_compared(tiny_llama):
    with pytest.raises(BadInput, match="made on org/other, not tiny-llama"):
        check_made_on({"model": {"model": "org/other"}, "fingerprint": None}, tiny_llama, "v")
    check_made_on({"model": {"model": "tiny-llama"}, "fingerprint": None}, tiny_llama, "v")
    check_made_on({"variant": "paper"}, tiny_llama, "v")  # older files recorded neither


def test_cli_force(run, tiny_llama, tmp_path):  # noqa: F811
    model_dir = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    _other_model_vectors(run, tiny_llama, name=str(model_dir))
    base = ["--run-dir", str(run.root), "steer", "--model", str(model_dir), "--device", "cpu",
            "--max-new-tokens", "2", "--limit", "1", "--behaviours", "backtracking", "--no-random-control"]
    refused = CliRunner().invoke(cli, base)
    last = refused.output.splitlines()[-1]  # after the weight-loading progress bar
    assert refused.exit_code == 2 and last.startswith("nnsteer: error: ") and last.endswith("--force to use them anyway")
    assert CliRunner().invoke(cli, [*base, "--force"]).exit_code == 0


def test_extracted_vectors_describe_themselves(tmp_path, tokenizer, tiny_llama):
    from test_vectors import make_chains, write_run

    from nnsteer.runs.store import read_metadata
    from nnsteer.vectors.extract import extract_vectors

    run = write_run(tmp_path, tiny_llama.name, make_chains(tokenizer, thinking=False)[3:5])
    extract_vectors(run, tiny_llama, variant="paper")
    meta = read_metadata(run.vectors)
    assert {k: meta[k] for k in ("hook_site", "family", "fingerprint", "vector_dtype")} == {
        "hook_site": application(tiny_llama)["hook_site"], "family": "llama",
        "fingerprint": weights_fingerprint(tiny_llama.hf_model), "vector_dtype": "float32"}
    check_made_on(meta, tiny_llama, str(run.vectors))
