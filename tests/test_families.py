"""Every tested decoder family (``nnsteer.modeling.architecture.SUPPORTED_FAMILIES``) on a tiny
random-weight model built in memory from its config (``conftest.FAMILY_CONFIGS``), against
the same independent references as the Llama/Qwen2 tests, whose helpers are reused here:

- the decoder blocks nnsteer reads are ``output_hidden_states`` exactly (float32);
- ``nll`` attribution equals ``torch.autograd`` on the whole chain, and ``exact`` equals
  really patching the block's output (families whose cache is not plain keys and values run
  attribution's no-cache path);
- steered generation equals a plain forward hook, and batched (left-padded) generation
  equals one prompt at a time;
- the quirks table names what each family departs in, and a family that cannot be
  supported is refused in one line.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch
from conftest import make_tiny
from test_attribution import (
    _annotations,
    _chain,
    _nll,
    _patched_kls,
    _reference_gradients,
    _sequence,
    _vectors,
)
from test_generation import PROMPTS, hf_greedy, ids, random_vectors
from test_models import _layer_outputs

from nnsteer.errors import BadInput
from nnsteer.generation.loop import generate
from nnsteer.generation.spec import SteeringSpec
from nnsteer.modeling.architecture import SUPPORTED_FAMILIES, Architecture
from nnsteer.selection.attribution import (
    ATTRIBUTION_METRICS,
    find_probes,
    probe_effects,
)

#: Families whose cache is not plain keys and values: attribution's no-cache path.
NO_PLAIN_CACHE = {"gpt_oss", "olmo3", "mistral", "gemma2", "gemma3_text", "exaone4",
                  "qwen3_next", "nemotron_h", "minimax"}
NEW = 6

_MODELS: dict[str, object] = {}


@pytest.fixture(params=SUPPORTED_FAMILIES)
def family_model(request, tokenizer):
    """Each tested family's tiny model in turn, built once per session."""
    if request.param not in _MODELS:
        _MODELS[request.param] = make_tiny(request.param, tokenizer)
    return _MODELS[request.param]


def test_blocks_are_the_hidden_states(family_model):
    lm = family_model
    enc = lm.tokenizer(["The cat sat on the mat.", "Hi"], return_tensors="pt", padding=True,
                       padding_side="left")
    outs = _layer_outputs(lm, enc["input_ids"], enc["attention_mask"])
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = lm.hf_model(**enc, position_ids=position_ids, output_hidden_states=True).hidden_states
    n = lm.arch.n_layers
    for layer in range(n - 1):
        torch.testing.assert_close(outs[layer], ref[layer + 1], rtol=0, atol=0)
    torch.testing.assert_close(lm.arch.final_norm(lm.hf_model)(outs[n - 1]), ref[n], rtol=0, atol=0)
    assert lm.arch.plain_kv_cache == (lm.arch.family not in NO_PLAIN_CACHE)


def test_attribution_equals_autograd_and_patching(family_model):
    lm = family_model
    chain = _chain(lm.tokenizer)
    probes = find_probes(pl.DataFrame([chain]), _annotations([chain]), lm.tokenizer,
                         ["backtracking"])
    sequence = _sequence(chain)
    vectors = _vectors(lm, ["backtracking"], scale=0.3)
    nll = probe_effects(lm, {"c0": sequence}, probes, vectors, "nll", progress=False)
    exact = probe_effects(lm, {"c0": sequence}, probes[:1], vectors, "exact", batch_size=64,
                          progress=False)
    for row, probe in enumerate(probes):
        grads = _reference_gradients(lm.hf_model, sequence, probe.position, _nll(probe.target))
        expected = (grads * vectors[probe.label]).sum(-1)
        torch.testing.assert_close(nll[row], expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    want = _patched_kls(lm, sequence, probes[0], vectors[probes[0].label])
    assert exact[0].tolist() == pytest.approx(want, rel=1e-3, abs=1e-7)
    assert exact.abs().max() > 0


def test_steering_equals_forward_hook_and_batched_equals_one_by_one(family_model):
    lm = family_model
    last = lm.arch.n_layers - 1
    vectors = random_vectors(lm.arch.d_model, [0, last], seed=1, scale=4.0)
    spec = SteeringSpec(vectors, 2.0, "positive")
    added = {layer: 2.0 / len(vectors) * v for layer, v in vectors.items()}
    specs = [spec, None, SteeringSpec(vectors, 2.0, "negative")]
    single = [generate(lm, [p], steering=s, max_new_tokens=NEW, progress=False)[0]
              for p, s in zip(PROMPTS[:3], specs)]
    assert single[0].output_ids == hf_greedy(lm, PROMPTS[:1], NEW, add=added)[0]
    assert single[0].output_ids != hf_greedy(lm, PROMPTS[:1], NEW)[0], "steering too weak to test"
    batched = generate(lm, PROMPTS[:3], steering=specs, max_new_tokens=NEW, batch_size=3,
                       progress=False)
    assert ids(batched) == ids(single)


@pytest.mark.parametrize("metric", ATTRIBUTION_METRICS)
def test_no_cache_path_equals_the_cache_path(tiny_llama, metric):
    """On a model with a plain KV cache both attribution paths give the same effects."""
    import dataclasses

    chain = _chain(tiny_llama.tokenizer)
    probes = find_probes(pl.DataFrame([chain]), _annotations([chain]), tiny_llama.tokenizer,
                         ["backtracking", "example-testing"])
    args = ({"c0": _sequence(chain)}, probes, _vectors(tiny_llama, ["backtracking", "example-testing"]),
            metric)
    cached = probe_effects(tiny_llama, *args, batch_size=16, progress=False)
    without = dataclasses.replace(tiny_llama, arch=dataclasses.replace(tiny_llama.arch, plain_kv_cache=False))
    torch.testing.assert_close(probe_effects(without, *args, batch_size=16, progress=False), cached,
                               rtol=1e-4, atol=1e-6)


def test_no_cache_path_passes_ndif_allow_lists(tokenizer):
    """The no-cache path runs as one request through the strict stand-in for NDIF."""
    from strict_remote import strict_remote

    lm = _MODELS.get("nemotron_h") or make_tiny("nemotron_h", tokenizer)
    chain = _chain(tokenizer)
    probes = find_probes(pl.DataFrame([chain]), _annotations([chain]), tokenizer, ["backtracking"])
    args = ({"c0": _sequence(chain)}, probes, _vectors(lm, ["backtracking"]), "exact")
    local = probe_effects(lm, *args, progress=False)
    with strict_remote(lm, bf16=False) as server:
        remote = probe_effects(lm, *args, progress=False)
    torch.testing.assert_close(remote, local, rtol=0, atol=0)
    assert len(server.requests) == 1


@pytest.mark.parametrize("family, quirks", [
    ("gemma2", {"scaled-embeddings", "logit-softcapping", "sliding-window"}),
    ("granite", {"multipliers"}),
    ("gpt_oss", {"attention-sinks", "mixture-of-experts", "sliding-window"}),
    ("deepseek_v3", {"mixture-of-experts"}),
    ("nemotron_h", {"mixture-of-experts", "hybrid-cache"}),
    ("qwen3_next", {"mixture-of-experts", "hybrid-cache"}),
    ("minimax", {"mixture-of-experts", "hybrid-cache", "padded-decode"}),
    ("llama", set()),
])
def test_quirks_named_per_family(tokenizer, family, quirks):
    lm = _MODELS.get(family) or make_tiny(family, tokenizer)
    assert set(lm.arch.quirks) == quirks


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_router_logits_leave_the_blocks_the_residual_stream(tokenizer, family):
    """With ``output_router_logits`` the model returns router logits and an aux loss, and
    its blocks still return the residual stream (the discovery check passes)."""
    from conftest import build_tiny_hf

    hf = build_tiny_hf(family, len(tokenizer), output_router_logits=True)
    assert "mixture-of-experts" in Architecture.discover(hf).quirks
    with torch.no_grad():
        out = hf(torch.tensor([[5, 6, 7]]))
    assert out.router_logits is not None and out.aux_loss is not None


def test_softcapped_logits_are_what_attribution_differentiates(tokenizer):
    """Gemma's logits are capped: unembed(norm(h)) is not the model's output."""
    lm = _MODELS.get("gemma2") or make_tiny("gemma2", tokenizer)
    hf, ids_ = lm.hf_model, torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = hf(ids_, output_hidden_states=True)
        raw = lm.arch.unembed(hf)(out.hidden_states[-1])
    cap = hf.config.final_logit_softcapping
    torch.testing.assert_close(out.logits, torch.tanh(raw / cap) * cap)
    assert out.logits.abs().max() < cap < raw.abs().max()  # the cap bites


def test_a_model_without_a_final_norm_is_refused_in_one_line(tokenizer):
    hf = make_tiny("llama", tokenizer).hf_model
    hf.model.norm = torch.nn.Identity()
    with pytest.raises(BadInput, match=r"^unsupported architecture 'llama': found 0 norms") as err:
        Architecture.discover(hf)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("hook, message", [
    (lambda module, args, out: out + 1.0, "decoder block 0's output is not output_hidden_states"),
    (lambda module, args, out: (out,), "a forward pass with its blocks found failed"),
])
def test_a_block_that_is_not_the_residual_stream_is_refused(tokenizer, hook, message):
    hf = make_tiny("llama", tokenizer).hf_model
    hf.model.layers[0].register_forward_hook(hook)
    with pytest.raises(BadInput, match=message) as err:
        Architecture.discover(hf)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])
def test_cli_study_on_a_saved_model(tokenizer, tmp_path, family):
    """tasks → generate → annotate → extract → attribute → select → steer → evaluate from
    the CLI, on a saved directory of a tiny model that recites a chain with behaviours."""
    from click.testing import CliRunner
    from conftest import reciting_hf
    from test_pipeline import PIPELINE_CONFIG, RECITED

    from nnsteer.cli import cli

    model_dir = tmp_path / family
    reciting_hf(family, tokenizer, tokenizer.encode(RECITED, add_special_tokens=False)
                ).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = tmp_path / "study.toml"
    config.write_text(PIPELINE_CONFIG.format(model=model_dir).replace("limit = 6", "limit = 3"))
    stages = ["tasks", "generate", "annotate", "extract", "attribute", "select", "steer", "evaluate"]
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path / "run"), "run", "--config",
                                      str(config), *[f"--only={s}" for s in stages]])
    assert result.exit_code == 0, result.output[-3000:]
    evaluation = pl.read_parquet(tmp_path / "run" / "evaluation.parquet")
    assert evaluation.height > 0
    spans = pl.read_parquet(tmp_path / "run" / "attribution_spans.parquet")
    assert spans.height > 0 and len(spans["effects"][0]) == make_tiny(family, tokenizer).arch.n_layers


@pytest.fixture(scope="module")
def saved_gpt_oss(tokenizer, tmp_path_factory):
    """A tiny gpt-oss saved as a local model directory."""
    model_dir = tmp_path_factory.mktemp("models") / "gpt-oss"
    (_MODELS.get("gpt_oss") or make_tiny("gpt_oss", tokenizer)).hf_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_models_command_prints_family_quirks_and_experts(saved_gpt_oss):
    from click.testing import CliRunner

    from nnsteer.cli import cli

    result = CliRunner().invoke(cli, ["models", "--model", str(saved_gpt_oss), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(None, 1) if not line.startswith("attribution") else
                 ("attribution", line.removeprefix("attribution cache").strip())
                 for line in result.output.splitlines())
    assert lines["family"] == "gpt_oss" and lines["layers"] == "2" and lines["width"] == "32"
    assert lines["quirks"] == "attention-sinks, mixture-of-experts, sliding-window"
    assert lines["experts"] == "4 routed per MoE layer, 2 per token"
    assert lines["attribution"].startswith("none")


def test_explicit_device_map_with_disk_offload_gives_the_same_numbers(saved_gpt_oss, tmp_path,
                                                                      monkeypatch):
    """On a CPU-only machine accelerate places modules on ``cpu`` and ``disk``: a map that
    puts one decoder block on disk loads, and gives the block outputs of the plain model
    exactly. ``auto`` there is all-or-nothing: everything on cpu, or (too little
    max_memory) everything on disk, which is refused in one line."""
    from nnsteer.modeling.models import load_model

    monkeypatch.setenv("NNSTEER_CACHE", str(tmp_path))
    plain = load_model(str(saved_gpt_oss), device="cpu")
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    split = load_model(str(saved_gpt_oss), device_map=placement)
    auto = load_model(str(saved_gpt_oss), device_map="auto")
    assert split.hf_model.hf_device_map == placement
    assert split.device == torch.device("cpu") and split.arch == plain.arch
    enc = plain.tokenizer(["Steer this model.", "Hi"], return_tensors="pt", padding=True,
                          padding_side="left")
    want = _layer_outputs(plain, enc["input_ids"], enc["attention_mask"])
    for lm in (split, auto):
        torch.testing.assert_close(_layer_outputs(lm, enc["input_ids"], enc["attention_mask"]),
                                   want, rtol=0, atol=0)
    assert (tmp_path / "offload").is_dir()
    with pytest.raises(BadInput, match="puts the first module on disk"):
        load_model(str(saved_gpt_oss), device_map="auto", max_memory={"cpu": "1MB"})


@pytest.mark.parametrize("device_map, max_memory, message", [
    ("everywhere", None, "device_map 'everywhere': expected auto"),
    ({"model": "gpu"}, None, "device 'gpu': expected a GPU index"),
    (None, {"cpu": "1GiB"}, "max_memory needs a device_map"),
    ("auto", ["1GiB"], "max_memory .*expected a table"),
])
def test_bad_placement_is_one_line(device_map, max_memory, message):
    from nnsteer.modeling.placement import check_placement

    with pytest.raises(BadInput, match=message):
        check_placement(device_map, max_memory)


def test_config_placement_reaches_the_loader(tmp_path, saved_gpt_oss):
    from nnsteer.pipeline.run import check_model, read_config

    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nname = "{saved_gpt_oss}"\ndevice_map = {{"model" = "cpu", '
                      f'"lm_head" = "disk"}}\nmax_memory = {{"cpu" = "2GiB"}}\n')
    parsed = read_config(config)
    assert parsed.model.device_map == {"model": "cpu", "lm_head": "disk"}
    check_model(parsed)
    config.write_text(f'[model]\nname = "{saved_gpt_oss}"\ndevice_map = "nowhere"\n')
    with pytest.raises(BadInput, match=r"c.toml: \[model\] device_map 'nowhere'"):
        check_model(read_config(config))


def test_padding_probe_keeps_padding_safe_families_batched(family_model):
    """Discovery's padding probe (a left-padded batch against its row alone, for a forward
    pass and for cached decode steps) flags MiniMax's decoding only: every other tested
    family, hybrids included, keeps its padded batches."""
    arch = family_model.arch
    assert arch.pads_forward
    assert arch.pads_decode == (arch.family != "minimax")
    lengths = [9, 4, 9, 6]
    assert arch.batches(lengths, 8) == [[0, 2, 3, 1]]
    assert arch.batches(lengths, 8, decode=True) == (
        [[0, 2], [3], [1]] if arch.family == "minimax" else [[0, 2, 3, 1]])


def _without_padding_quirks(lm):
    """``lm`` as if discovery had not probed its padding (the code before the probe)."""
    import dataclasses

    quirks = tuple(q for q in lm.arch.quirks if not q.startswith("padded-"))
    return dataclasses.replace(lm, arch=dataclasses.replace(lm.arch, quirks=quirks))


def test_minimax_steered_chains_do_not_depend_on_the_batch_size(tokenizer, capsys):
    """The finding: MiniMax's lightning attention carries left pads into its cached state,
    so a padded batch of steered chains differs from each prompt steered alone with plain
    forward hooks. With the probe's ``padded-decode`` prompts of equal length only share a
    batch, with one line saying so, and every chain equals the hooks'."""
    lm = _MODELS.get("minimax") or make_tiny("minimax", tokenizer)
    last = lm.arch.n_layers - 1
    vectors = random_vectors(lm.arch.d_model, [0, last], seed=1, scale=2.0)
    spec = SteeringSpec(vectors, 1.0, "positive")
    added = {layer: 1.0 / len(vectors) * v for layer, v in vectors.items()}
    want = [hf_greedy(lm, [p], 10, add=added)[0] for p in PROMPTS]
    assert want != [hf_greedy(lm, [p], 10)[0] for p in PROMPTS], "steering too weak to test"
    padded = generate(_without_padding_quirks(lm), PROMPTS, steering=spec, max_new_tokens=10,
                      progress=False)
    assert ids(padded) != want, "left padding no longer changes MiniMax: the probe is moot"
    capsys.readouterr()
    assert ids(generate(lm, PROMPTS, steering=spec, max_new_tokens=10, progress=False)) == want
    assert capsys.readouterr().err.splitlines() == [
        "nnsteer: minimax: left padding changes its outputs (padded-decode), so only sequences "
        "of equal length share a batch: 4 batches instead of 1"]


def test_padded_decode_is_known_without_weights(tokenizer):
    """On meta weights (NDIF, ``nnsteer models``) the probe cannot run: the family table says."""
    from conftest import FAMILY_CONFIGS
    from transformers import AutoConfig

    config = AutoConfig.for_model("minimax", vocab_size=len(tokenizer), **FAMILY_CONFIGS["minimax"])
    assert "padded-decode" in Architecture.from_config(config).quirks
    config = AutoConfig.for_model("qwen3_next", vocab_size=len(tokenizer),
                                  **FAMILY_CONFIGS["qwen3_next"])
    assert not {"padded-decode", "padded-forward"} & set(Architecture.from_config(config).quirks)


def _pad_reading_llama(tokenizer):
    """A tiny Llama whose first block also reads the running mean of the positions before
    it, pads included: causal, but left padding changes its forward pass."""
    from conftest import build_tiny_hf

    from nnsteer.modeling.models import wrap_model

    hf = build_tiny_hf("llama", len(tokenizer))

    def running_mean(module, args):
        h = args[0]
        seen = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        return (h + h.cumsum(1) / seen, *args[1:])

    hf.model.layers[0].register_forward_pre_hook(running_mean)
    return wrap_model(hf, tokenizer, name="tiny-pad-reading", revision="test")


def test_a_model_whose_forward_reads_the_pads_runs_unpadded(tokenizer):
    """``padded-forward``: generation, the residual means of ``extract`` and the NLL cost
    give batched what they give one sequence at a time (and would not, padded)."""
    from test_costs import _chain
    from test_residuals import GROUPS, random_selections

    from nnsteer.evaluation.metrics import nll_unsteered
    from nnsteer.vectors.residuals import sum_sample_means

    lm = _pad_reading_llama(tokenizer)
    assert {"padded-forward", "padded-decode"} <= set(lm.arch.quirks)
    assert not lm.arch.pads_forward and not lm.arch.pads_decode
    alone = [generate(lm, [p], max_new_tokens=NEW, progress=False)[0] for p in PROMPTS]
    assert ids(generate(lm, PROMPTS, max_new_tokens=NEW, batch_size=4, progress=False)) == ids(alone)
    selections = random_selections(len(tokenizer), 6)
    one = sum_sample_means(lm, selections, GROUPS, batch_size=1, progress=False)
    for model in (lm, _without_padding_quirks(lm)):
        six = sum_sample_means(model, selections, GROUPS, batch_size=6, progress=False)
        same = all(torch.allclose(one.sums[g], six.sums[g], atol=1e-5, rtol=1e-5) for g in GROUPS)
        assert same == (model is lm)
    chains = [_chain(tokenizer, "Question one: how many legs?", "Four legs per cow, so 7.", "7"),
              _chain(tokenizer, "A much longer question about trains and stations?",
                     "Sixty times three is 180 km.", "180 km")]
    assert nll_unsteered(lm, chains, batch_size=2) == pytest.approx(
        nll_unsteered(lm, chains, batch_size=1), abs=1e-5)


def test_attribution_of_a_model_whose_forward_reads_the_pads_is_unpadded(tokenizer):
    """Attribution's no-cache path runs each probe's prefix left-padded to its trace's
    widest: with ``padded-forward`` a trace holds probes of one position, and the effects
    do not depend on the batch size (they would, padded)."""
    import dataclasses

    lm = _pad_reading_llama(tokenizer)
    lm = dataclasses.replace(lm, arch=dataclasses.replace(lm.arch, plain_kv_cache=False))
    chain = _chain(tokenizer)
    probes = find_probes(pl.DataFrame([chain]), _annotations([chain]), tokenizer,
                         ["backtracking", "example-testing"])
    assert len({p.position for p in probes}) > 1
    args = ({"c0": _sequence(chain)}, probes, _vectors(lm, ["backtracking", "example-testing"]),
            "nll")
    one = probe_effects(lm, *args, batch_size=1, progress=False)
    for model in (lm, _without_padding_quirks(lm)):
        eight = probe_effects(model, *args, batch_size=8, progress=False)
        assert torch.allclose(eight, one, rtol=1e-4, atol=1e-6) == (model is lm)


def test_a_padded_batch_that_fails_counts_as_padding_dependent(tokenizer, capsys):
    """transformers' generate fails on a left-padded batch of a MoE model that returns its
    router logits (their load-balancing loss reads the mask): the probe then counts the
    decode as changed by padding, in one line; the model still loads."""
    from conftest import build_tiny_hf

    arch = Architecture.discover(build_tiny_hf("qwen3_moe", len(tokenizer), output_router_logits=True))
    assert arch.pads_forward and not arch.pads_decode
    [note] = capsys.readouterr().err.splitlines()
    assert note.startswith("nnsteer: qwen3_moe: a left-padded batch failed (RuntimeError: ")
    assert note.endswith("): counted as padded-decode")
