"""``nnsteer plan``: its figures against what torch and a real tiny run measure.

- weights: the sum of a tiny model's parameter ``nbytes``, in every tested family;
- KV cache: the ``nbytes`` of the real cache tensors after a generate at that batch and
  length (grouped-query and latent attention, sliding windows; recurrent layers left out);
- attribution: the ``nbytes`` of the block outputs its probe passes keep for the gradient;
- chains, tokens, forward and backward passes: a real run of every stage on a tiny model,
  counted in its files and by hooks on the model;
- every shipped config prints its table, offline; ``nnsteer run`` prints the summary first.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import FAMILY_CONFIGS, build_tiny_hf, make_tiny
from test_attribution import _annotations, _chain, _sequence, _vectors
from test_pipeline import reciting_model, write_config

from nnsteer.cli import cli
from nnsteer.pipeline import plan as planning
from nnsteer.pipeline import run as pipeline_run
from nnsteer.pipeline.plan import (
    ModelShape,
    attribution_passes,
    ndif_distinct,
    ndif_jobs,
    ndif_upload,
    plan_study,
)
from nnsteer.pipeline.run import read_config, run_pipeline
from nnsteer.runs.registry import STAGE_NAMES
from nnsteer.selection.attribution import find_probes, probe_effects

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILIES = ["llama", "qwen2", "qwen3", *FAMILY_CONFIGS]


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_and_kv_cache_are_the_real_tensors_sizes(family):
    hf = build_tiny_hf(family, 300)
    shape = ModelShape.from_config(hf.config)
    assert shape.parameters == sum(p.numel() for p in hf.parameters())
    assert shape.weight_bytes(4) == sum(p.nbytes for p in hf.parameters())
    batch, prompt, new = 3, 6, 5  # 10 cached positions: more than the tiny sliding windows keep
    ids = torch.randint(3, 300, (batch, prompt), generator=torch.Generator().manual_seed(0))
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                      pad_token_id=2)
    cache = out.past_key_values
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if isinstance(getattr(layer, "keys", None), torch.Tensor))
    assert shape.kv_cache_bytes(batch, prompt + new - 1, 4) == real  # the last token is not cached
    assert shape.kv_cache_bytes(batch, prompt + new - 1, 2) * 2 == real  # linear in the dtype's bytes
    if family in ("qwen3_next", "nemotron_h"):
        assert shape.recurrent_layers > 0


@pytest.mark.parametrize("family", ["llama", "mistral"])  # a plain KV cache, and none (sliding window)
def test_attribution_keeps_the_block_outputs_the_plan_counts(family, tokenizer):
    lm = make_tiny(family, tokenizer)
    shape = ModelShape.from_config(lm.hf_model.config)
    assert shape.plain_kv_cache == (family == "llama")
    chain = _chain(tokenizer)
    labels = ["backtracking", "uncertainty-estimation", "example-testing", "adding-knowledge"]
    probes = find_probes(pl.DataFrame([chain]), _annotations([chain]), tokenizer, labels)
    batch = 3
    assert len(probes) > batch  # two traces: a full one and the rest
    passes: list[list[torch.Tensor]] = []
    lm.hf_model.register_forward_pre_hook(lambda module, args: passes.append([]))
    for block in lm.arch.layers(lm.hf_model):
        block.register_forward_hook(lambda module, args, out: passes[-1].append(
            out[0] if isinstance(out, tuple) else out))
    probe_effects(lm, {chain["chain_id"]: _sequence(chain)}, probes, _vectors(lm, labels),
                  "nll", batch, progress=False)
    kept = [sum(h.nbytes for h in outputs) for outputs in passes
            if outputs and all(h.requires_grad for h in outputs)]
    assert len(kept) == math.ceil(len(probes) / batch)  # one gradient pass per trace
    positions = 1 if shape.plain_kv_cache else max(p.position for p in probes[:batch]) + 1
    assert kept[0] == shape.activation_bytes(batch, positions, 4)
    assert max(kept) == kept[0]


TINY_STUDY = """
[model]
name = "{model}"
batch_size = 4

[tasks]
per_category = 1
eval_per_category = 1
validation_per_category = 1

[generate]
max_new_tokens = 46
limit = 6

[annotate]
annotator = "rules"

[attribute]
batch_size = 3

[select]
labels = ["backtracking", "uncertainty-estimation"]
coefficient = "auto"
grid = [0.5, 2.0]
validation_limit = 2
max_new_tokens = 6

[steer]
max_new_tokens = 12
limit = 2
batch_size = 16

[evaluate]
n_boot = 200
"""


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, tokenizer):
    """A real run of every stage on the reciting tiny model (it never stops early), with
    the model's forward passes and the gradients taken counted per stage."""
    root = tmp_path_factory.mktemp("plan-study")
    model_dir = root / "reciting-llama"
    reciting_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = read_config(write_config(root / "tiny.toml", TINY_STUDY.format(model=model_dir)))
    forward, backward, stage = Counter(), Counter(), {"name": None}
    load, grad = pipeline_run.load_model, torch.autograd.grad

    def counted_load(*args, **kwargs):
        lm = load(*args, **kwargs)
        lm.hf_model.register_forward_pre_hook(lambda module, a: forward.update([stage["name"]]))
        return lm

    def counted_grad(*args, **kwargs):
        backward.update([stage["name"]])
        return grad(*args, **kwargs)

    def log(line: str) -> None:
        found = re.match(r"\[\d+/\d+\] (\w+)\s+running", line)
        if found:
            stage["name"] = found[1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_run, "load_model", counted_load)
        patch.setattr(torch.autograd, "grad", counted_grad)
        run = run_pipeline(config, run_dir=root / "run", log=log)
    return config, run, forward, backward


def test_counts_match_a_real_tiny_run(tiny_study):
    config, run, forward, backward = tiny_study
    plan = plan_study(config)
    value = {(f.stage, f.name): f.value for f in plan.figures}
    chains, steered = pl.read_parquet(run.chains), pl.read_parquet(run.steered)
    sweep = pl.read_parquet(run.path("sweep.parquet"))
    assert value["tasks", "tasks"] == pl.read_parquet(run.tasks).height
    for stage, table in (("generate", chains), ("select", sweep), ("steer", steered)):
        assert (table["finish_reason"] == "length").all()  # so the bounds are reached
        assert value[stage, "chains"] == table.height
        assert value[stage, "new tokens"] == table["output_ids"].list.len().sum()
    planned = plan.values("forward passes")
    for stage in ("generate", "extract", "select", "steer", "evaluate", "report"):
        assert planned[stage] == forward[stage], stage
    assert forward["tasks"] == forward["annotate"] == 0
    for stage in ("generate", "extract", "select", "steer", "evaluate"):
        assert backward[stage] == 0
    # attribution's passes by the plan's formula, given the probes the run found per chain
    spans = pl.read_parquet(run.path("attribution_spans.parquet"))
    per_chain = spans.group_by("chain_id").len()["len"].to_list()
    assert plan.shape.n_layers == 4
    assert attribution_passes(per_chain, config.options["attribute"]["batch_size"], "nll", 4) == \
        (forward["attribute"], backward["attribute"])
    # the estimated prompt length bounds the real ones
    for split, table in (("train", chains), ("eval", steered), ("validation", sweep)):
        assert table["prompt_ids"].list.len().max() <= plan.prompt_tokens[split]


def test_an_llm_annotator_is_one_call_per_chain_and_priced(tiny_study, tmp_path):
    config, run, _, _ = tiny_study
    text = config.path.read_text().replace('annotator = "rules"', 'annotator = "openai:gpt-4o-mini"')
    plan = plan_study(read_config(write_config(tmp_path / "llm.toml", text)), price_per_mtok=0.6)
    value = {(f.stage, f.name): f.value for f in plan.figures}
    assert value["annotate", "annotator calls"] == pl.read_parquet(run.chains).height
    assert value["evaluate", "annotator calls"] == pl.read_parquet(run.steered).height
    assert value["select", "annotator calls"] == pl.read_parquet(run.path("sweep.parquet")).height
    for stage in ("annotate", "select", "evaluate"):
        assert value[stage, "annotator cost"] == pytest.approx(
            value[stage, "annotator tokens"] * 0.6 / 1e6)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_prints_its_plan_offline(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["plan", "--config", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"plan for {path}: ")
    assert "model config not available" not in result.output  # each shipped model is known
    assert {line.split()[0] for line in lines[2:-1]} == set(STAGE_NAMES)
    assert re.search(r"  (count|formula|measured)  ", lines[3])
    assert lines[-1].startswith("plan: ") and "peak memory ≈" in lines[-1]


def test_an_unknown_hub_model_offline_still_gets_its_counts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = write_config(tmp_path / "other.toml",
                          '[model]\nname = "some-org/some-model"\n[tasks]\nper_category = 2\n')
    result = CliRunner().invoke(cli, ["plan", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "model config not available offline" in result.output.splitlines()[0]
    assert re.search(r"generate +chains +20 ", result.output)
    assert "memory unknown" in result.output.splitlines()[-1]


def test_run_prints_the_plans_summary_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--run-dir", "demo", "run", "--config",
                                      str(CONFIGS / "demo.toml"), "--only", "tasks"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("nnsteer plan: 0 chains, ≤ 0 new tokens")
    assert "`nnsteer plan --config " in result.output.splitlines()[0]


def test_ndif_formulas_are_the_bench_s():
    """The bench's paper-sized study (bench/bench_ndif.py, STUDY) through the plan's formulas:
    the jobs and the distinct data by hand."""
    assert ndif_jobs("generate", 300, 8) == 38
    assert ndif_jobs("extract", 300, 8) == 5  # 38 batches, 8 per request
    assert ndif_jobs("attribute", 300, per_request=planning.chains_per_request(12)) == 1
    assert ndif_jobs("steer", 500, 8) == 63
    assert ndif_distinct("generate", chains=300, prompt=60) == 4 * 300 * 60
    assert ndif_distinct("extract", chains=300, prompt=60, tokens=500, spans=12) == \
        4 * 300 * 560 + 8 * 300 * 13
    assert ndif_distinct("attribute", chains=300, prompt=60, tokens=500, spans=12, vectors=4,
                         n_layers=32, d_model=4096) == 4 * 300 * 560 + 8 * 300 * 12 + 4 * 32 * 4096 * 2
    up = ndif_upload("attribute", 3, 1000.0, 64, 4096, vector_bytes=10.0, excess={"attribute": 5.0})
    assert up == 3 * 5.0 * 2 + 1000.0 + 2 * 10.0  # the vectors travel with every job
