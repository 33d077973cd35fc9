"""Attribution patching against plain PyTorch references on the full chain.

Every reference below runs the plain transformers model on the whole chain, one span at
a time, with forward hooks (to read or patch a decoder block's output) and
``torch.autograd``: no KV cache, no batching, no nnsight.
"""

from __future__ import annotations

import copy

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import FaultAfter, make_tiny

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.modeling.positions import decode_response
from nnsteer.runs.store import RunDir, read_metadata, write_parquet
from nnsteer.selection import attribution
from nnsteer.selection.attribution import (
    ATTRIBUTION_METRICS,
    SPANS_FILE,
    attribute,
    check_vectors,
    find_probes,
    probe_effects,
    spearman,
)
from nnsteer.selection.figure3 import figure3_chart
from nnsteer.vectors.extract import VectorSet, save_vectors

#: The KV cache goes in and out under the name the model's output uses (decided inside
#: the traced block, from what the model returns): the deprecated one fails the tests.
pytestmark = pytest.mark.filterwarnings("error:`past_key_values` is deprecated:FutureWarning")

REASONING = (
    "Okay, so I need to find the number. Let me think. Wait, maybe it is seven. "
    "For example, if x is 3 then 2x is 6. Hmm, I am not sure about that. "
    "Actually, let me check again. A prime has two divisors. So the answer is 7."
)
SENTENCES = {
    "backtracking": ["Wait, maybe it is seven.", "Actually, let me check again."],
    "example-testing": ["For example, if x is 3 then 2x is 6."],
    "uncertainty-estimation": ["Hmm, I am not sure about that."],
    "adding-knowledge": ["A prime has two divisors."],
}


def _chain(tok, chain_id: str = "c0") -> dict:
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 7?"}],
                                     add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    output_ids = tok(REASONING, add_special_tokens=False)["input_ids"]
    response = decode_response(tok, output_ids)
    return {"chain_id": chain_id, "task_id": "t0", "prompt_ids": prompt_ids,
            "output_ids": output_ids, "response": response, "direction": "none"}


def _annotations(chains: list[dict]) -> pl.DataFrame:
    rows = []
    for chain in chains:
        for label, sentences in SENTENCES.items():
            for sentence in sentences:
                start = chain["response"].index(sentence)
                rows.append({"chain_id": chain["chain_id"], "label": label, "start": start,
                             "end": start + len(sentence), "text": sentence,
                             "annotator": "test", "status": "ok"})
    return pl.DataFrame(rows)


def _vectors(lm, labels=tuple(SENTENCES), seed: int = 3, scale: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {label: scale * torch.randn(lm.arch.n_layers, lm.arch.d_model, generator=gen)
            for label in labels}


@pytest.fixture(scope="module")
def llama(tokenizer):
    return make_tiny("llama", tokenizer)


@pytest.fixture(scope="module")
def chain(tokenizer):
    return _chain(tokenizer)


@pytest.fixture(scope="module")
def probes(llama, chain):
    return find_probes(pl.DataFrame([chain]), _annotations([chain]), llama.tokenizer, list(SENTENCES))


def _sequence(chain) -> list[int]:
    return list(chain["prompt_ids"]) + list(chain["output_ids"])


# ----------------------------------------------------------------- plain references

def _block_outputs(hf, ids, patch=None):
    """Logits of the whole chain and every block's output (retaining grad).

    ``patch=(layer, position, delta)`` adds ``delta`` to that block's output at that position.
    """
    outputs = []

    def hook(layer):
        def fn(module, args, out):
            if patch is not None and patch[0] == layer:
                out = out.clone()
                out[0, patch[1]] = out[0, patch[1]] + patch[2].to(out.dtype)
            outputs.append(out)
            return out
        return fn

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(hf.model.layers)]
    try:
        logits = hf(torch.tensor([ids])).logits[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, outputs


def _reference_gradients(hf, ids, position, loss_of_logits):
    """``∂ loss(logits[position]) / ∂ a_l(position)`` for every layer, on the full chain."""
    hf.get_input_embeddings().weight.requires_grad_(True)
    try:
        logits, outputs = _block_outputs(hf, ids)
        grads = torch.autograd.grad(loss_of_logits(logits[position]), outputs)
    finally:
        hf.get_input_embeddings().weight.requires_grad_(False)
    return torch.stack([g[0, position] for g in grads])


def _nll(target):
    return lambda z: -torch.log_softmax(z, -1)[target]


def _released_code_loss(z):
    """The authors' metric, as written in their analyze_layer_effects.py."""
    probs = F.log_softmax(z[None].mean(dim=0), dim=-1)
    detached_probs = F.log_softmax(z[None].mean(dim=0).detach(), dim=-1)
    return F.kl_div(probs, detached_probs, reduction="batchmean")


def _patched_kls(lm, ids, probe, vector) -> list[float]:
    """KL(clean ‖ patched) at the probe of really adding ``vector[l]`` there, per layer ``l``."""
    clean, _ = _block_outputs(lm.hf_model, ids)
    return [_kl(clean[probe.position],
                _block_outputs(lm.hf_model, ids, (layer, probe.position, vector[layer]))[0][probe.position]
                ).item() for layer in range(lm.arch.n_layers)]


def _kl(clean_logits, patched_logits):
    clean = torch.log_softmax(clean_logits.double(), -1)
    return (clean.exp() * (clean - torch.log_softmax(patched_logits.double(), -1))).sum()


# ----------------------------------------------------------------------------- tests

def test_probes_are_the_tokens_before_each_span(llama, chain, probes):
    assert len(probes) == 5 and {p.label for p in probes} == set(SENTENCES)
    tok, output_ids, prompt_len = llama.tokenizer, chain["output_ids"], len(chain["prompt_ids"])
    starts = sorted(chain["response"].index(s) for group in SENTENCES.values() for s in group)
    for probe, start in zip(probes, starts):  # probes are ordered by position
        first = probe.position + 1 - prompt_len  # the span's first generated token
        assert len(tok.decode(output_ids[:first])) <= start < len(tok.decode(output_ids[:first + 1]))
        assert probe.target == output_ids[first]


def test_others_uses_every_other_labels_spans(llama, chain):
    chains, annotations = pl.DataFrame([chain]), _annotations([chain])
    others = find_probes(chains, annotations, llama.tokenizer, ["backtracking"], spans="others")
    assert sorted(p.span_label for p in others) == sorted(
        label for label, s in SENTENCES.items() if label != "backtracking" for _ in s)
    assert {p.label for p in others} == {"backtracking"}


@pytest.mark.parametrize("metric", ["nll", "released-code"])
def test_first_order_equals_autograd_per_span(llama, chain, probes, metric):
    vectors = _vectors(llama)
    ids = _sequence(chain)
    got = probe_effects(llama, {"c0": ids}, probes, vectors, metric, batch_size=3, progress=False)
    for row, probe in enumerate(probes):
        loss = _nll(probe.target) if metric == "nll" else _released_code_loss
        grads = _reference_gradients(llama.hf_model, ids, probe.position, loss)
        u = vectors[probe.label]
        if metric == "released-code":  # the released code scales each vector to unit norm
            u = u / u.norm(dim=-1, keepdim=True)
        expected = (grads * u).sum(-1)
        torch.testing.assert_close(got[row], expected, rtol=1e-3, atol=1e-4 * expected.abs().max())
    assert got.abs().min() > 0


def test_released_code_value_is_nan_but_its_gradient_is_not(llama, chain, probes):
    logits, _ = _block_outputs(llama.hf_model, _sequence(chain))
    assert torch.isnan(_released_code_loss(logits[probes[0].position]))


def test_nll_estimate_matches_finite_difference(llama, chain, probes):
    hf64 = copy.deepcopy(llama.hf_model).double()
    vectors = _vectors(llama, scale=0.05)
    ids = _sequence(chain)
    got = probe_effects(llama, {"c0": ids}, probes, vectors, "nll", progress=False)
    step = 1e-3
    for row, probe in enumerate(probes[:2]):
        for layer in range(llama.arch.n_layers):
            u = vectors[probe.label][layer].double()
            losses = [
                _nll(probe.target)(_block_outputs(hf64, ids, (layer, probe.position, s * u))[0][probe.position])
                for s in (step, -step)
            ]
            finite_difference = ((losses[0] - losses[1]) / (2 * step)).item()
            assert abs(got[row, layer].item() - finite_difference) <= 1e-2 * abs(finite_difference)


def test_exact_is_the_real_patched_kl(llama, chain, probes):
    vectors = _vectors(llama, scale=0.3)
    ids = _sequence(chain)
    got = probe_effects(llama, {"c0": ids}, probes[:3], vectors, "exact", batch_size=64,
                        progress=False)
    for row, probe in enumerate(probes[:3]):
        expected = _patched_kls(llama, ids, probe, vectors[probe.label])
        assert got[row].tolist() == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_kl2_is_the_second_order_term(llama, chain, probes):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vectors = _vectors(llama)
    ids = _sequence(chain)
    got = probe_effects(llama, {"c0": ids}, probes[:2], vectors, "kl2", batch_size=64, progress=False)
    hf = llama.hf_model
    for row, probe in enumerate(probes[:2]):
        for layer in range(llama.arch.n_layers):
            u = vectors[probe.label][layer]

            def logits_at(t, layer=layer, probe=probe, u=u):
                return _block_outputs(hf, ids, (layer, probe.position, t * u))[0][probe.position]

            with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD through attention
                z, ju = torch.func.jvp(logits_at, (torch.zeros(()),), (torch.ones(()),))
            p = torch.softmax(z, -1)
            expected = 0.5 * (ju @ (p * ju) - (p @ ju) ** 2)  # ½ (Ju)ᵀ (diag p − p pᵀ) (Ju)
            assert got[row, layer].item() == pytest.approx(expected.item(), rel=1e-3)


def test_kl2_approximates_exact_for_small_vectors(llama, chain, probes):
    vectors = _vectors(llama, scale=0.01)
    ids = {"c0": _sequence(chain)}
    exact = probe_effects(llama, ids, probes[:1], vectors, "exact", batch_size=64, progress=False)
    second = probe_effects(llama, ids, probes[:1], vectors, "kl2", batch_size=64, progress=False)
    torch.testing.assert_close(exact, second, rtol=0.05, atol=0)


@pytest.mark.parametrize("metric", ATTRIBUTION_METRICS)
def test_remote_local_equals_local(tokenizer, llama, chain, probes, metric):
    simulated = make_tiny("llama", tokenizer, remote="local")
    vectors = _vectors(llama)
    ids = {"c0": _sequence(chain)}
    local = probe_effects(llama, ids, probes, vectors, metric, batch_size=16, progress=False)
    remote = probe_effects(simulated, ids, probes, vectors, metric, batch_size=16, progress=False)
    torch.testing.assert_close(remote, local, rtol=0, atol=0)


def test_qwen2_first_order_equals_autograd(tiny_qwen2, thinking_tokenizer):
    chain = _chain(thinking_tokenizer)
    probes = find_probes(pl.DataFrame([chain]), _annotations([chain]), thinking_tokenizer,
                         ["backtracking"])
    vectors = _vectors(tiny_qwen2, ["backtracking"])
    ids = _sequence(chain)
    got = probe_effects(tiny_qwen2, {"c0": ids}, probes, vectors, "nll", progress=False)
    for row, probe in enumerate(probes):
        grads = _reference_gradients(tiny_qwen2.hf_model, ids, probe.position, _nll(probe.target))
        torch.testing.assert_close(got[row], (grads * vectors["backtracking"]).sum(-1),
                                   rtol=1e-4, atol=1e-6)


def test_spearman_hand_computed():
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / 22.5 ** 0.5)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ------------------------------------------------------------------- the stage and CLI

def _write_run(root, lm, chains, vector_meta=None, labels=tuple(SENTENCES), model=None) -> RunDir:
    run = RunDir(root)
    rows = pl.DataFrame(chains).with_columns(
        model=pl.lit(model or lm.name), thinking_start=pl.lit(0),
        thinking_end=pl.col("response").str.len_chars(),
    )
    write_parquet(rows, run.chains, {})
    write_parquet(_annotations(chains), run.annotations, {})
    vectors = _vectors(lm, labels)
    vectors["overall"] = torch.zeros(lm.arch.n_layers, lm.arch.d_model)
    meta = {"model": {"model": lm.name}} if vector_meta is None else vector_meta
    save_vectors(VectorSet(vectors, meta), run.vectors)
    return run


def scipy_free_spearman(x, y):
    """Spearman's rho as the Pearson correlation of average ranks, written plainly."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return num / den if den else float("nan")


def test_attribute_stage_writes_table_and_validation(llama, tokenizer, tmp_path):
    chains = [_chain(tokenizer, "a"), _chain(tokenizer, "b")]
    run = _write_run(tmp_path, llama, chains)
    df = attribute(run, llama, metric="nll", validate=2)
    assert df.columns[:6] == ["label", "layer", "effect", "std", "n_spans", "metric"]
    counts = dict(df.group_by("label").agg(pl.col("n_spans").first()).iter_rows())
    assert counts == {"backtracking": 4, "uncertainty-estimation": 2, "example-testing": 2,
                      "adding-knowledge": 2}
    spans = pl.read_parquet(run.path("attribution_spans.parquet"))
    one = spans.filter(pl.col("label") == "backtracking")["effects"].to_list()
    mean = torch.tensor(one, dtype=torch.float64).abs().mean(0)
    effect = df.filter(pl.col("label") == "backtracking").sort("layer")["effect"].to_list()
    torch.testing.assert_close(torch.tensor(effect, dtype=torch.float64), mean)
    meta = read_metadata(run.attribution)
    assert meta["options"]["metric"] == "nll" and meta["model"]["model"] == llama.name
    assert set(meta["validation"]) == set(SENTENCES)
    assert all(-1 <= rho <= 1 for rho in meta["validation"].values())
    detail = meta["validation_detail"]
    assert detail["spearman"]["nll"] == meta["validation"]
    profiles = pl.DataFrame(detail["profiles"])
    assert set(profiles["metric"]) == {"nll", "released-code", "exact"}
    for name in ("nll", "released-code"):  # each stored rho is that of the stored profiles
        for label, rho in detail["spearman"][name].items():
            def profile(m, label=label):
                rows = profiles.filter((pl.col("metric") == m) & (pl.col("label") == label))
                return rows.sort("layer")["effect"].to_list()
            expected = scipy_free_spearman(profile(name), profile("exact"))
            assert rho == pytest.approx(expected, nan_ok=True)
    html = figure3_chart(df).to_html()
    assert "backtracking" in html


def test_bad_inputs(llama, tokenizer, tmp_path):
    chain = _chain(tokenizer)
    with pytest.raises(BadInput, match="--metric 'kl'"):
        attribute(_write_run(tmp_path / "a", llama, [chain]), llama, metric="kl")
    wrong_model = _write_run(tmp_path / "b", llama, [chain], {"model": {"model": "other/model"}})
    with pytest.raises(BadInput, match="extracted from 'other/model'"):
        attribute(wrong_model, llama)
    narrow = VectorSet({"backtracking": torch.zeros(llama.arch.n_layers, 32)})
    with pytest.raises(BadInput, match=r"\[4, 32\] per label but tiny-llama has 4 layers of width 64"):
        check_vectors(narrow, llama, "v.safetensors")
    run = _write_run(tmp_path / "c", llama, [chain], labels=["backtracking", "deduction"])
    with pytest.raises(BadInput, match="no usable 'own' span for label.*deduction"):
        attribute(run, llama, labels=["deduction"])
    with pytest.raises(BadInput, match="no steering vector for 'initializing'"):
        attribute(run, llama, labels=["initializing"])


def test_cli_attribute_and_select(llama, tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    llama.hf_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = _write_run(tmp_path / "run", llama, [_chain(tokenizer)],
                     vector_meta={"model": {"model": str(model_dir)}}, model=str(model_dir))
    runner = CliRunner()
    base = ["--run-dir", str(run.root)]
    result = runner.invoke(cli, base + ["attribute", "--model", str(model_dir), "--device", "cpu",
                                        "--metric", "released-code", "--spans", "others"])
    assert result.exit_code == 0, result.output
    assert (run.charts / "attribution.html").is_file()
    assert pl.read_parquet(run.attribution)["metric"].unique().to_list() == ["released-code"]
    result = runner.invoke(cli, base + ["attribute", "--model", str(model_dir), "--metric", "kl"])
    assert result.exit_code == 2
    result = runner.invoke(cli, base + ["select", "--skip-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    assert "runner-up" in result.output


# ------------------------------------------------------------------------ resuming

def _interrupted(root, llama, chains, monkeypatch, after: int, **options) -> RunDir:
    """A run directory whose attribution stopped after ``after`` chains."""
    run = _write_run(root, llama, chains)
    FaultAfter(monkeypatch, attribution, "_request_effects", after)
    with pytest.raises(KeyboardInterrupt):
        attribute(run, llama, **options)
    assert run.partial("attribute").is_file()
    assert not run.attribution.exists() and not run.path(SPANS_FILE).exists()
    return run


def _results(run: RunDir) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(run.attribution), pl.read_parquet(run.path(SPANS_FILE))


@pytest.fixture(scope="module")
def three_chains(tokenizer) -> list[dict]:
    return [_chain(tokenizer, name) for name in "abc"]


def test_interrupted_attribute_resumes_identically(llama, three_chains, tmp_path, monkeypatch,
                                                   capsys):
    reference = _write_run(tmp_path / "ref", llama, three_chains)
    attribute(reference, llama, metric="nll")
    run = _interrupted(tmp_path / "run", llama, three_chains, monkeypatch, 2, metric="nll",
                       rows_per_request=1)
    capsys.readouterr()
    resumed = FaultAfter(monkeypatch, attribution, "_request_effects")
    df = attribute(run, llama, metric="nll", rows_per_request=1)
    assert resumed.calls == 1  # chain c only
    assert "attribute: resuming at chain 3/3" in capsys.readouterr().err
    assert df.equals(_results(reference)[0])
    for got, want in zip(_results(run), _results(reference)):
        assert got.equals(want)
    assert not run.partial("attribute").exists()


@pytest.mark.parametrize("change", [{"metric": "released-code"}, {"labels": ["backtracking"]}])
def test_attribute_with_other_options_starts_over(llama, three_chains, tmp_path, monkeypatch,
                                                   capsys, change):
    run = _interrupted(tmp_path, llama, three_chains, monkeypatch, 1, metric="nll",
                       rows_per_request=1)
    capsys.readouterr()
    calls = FaultAfter(monkeypatch, attribution, "_request_effects")
    attribute(run, llama, **{"metric": "nll", "rows_per_request": 1, **change})
    assert calls.calls == 3
    err = capsys.readouterr().err
    assert "other inputs or options; starting over" in err and "resuming" not in err
    assert not run.partial("attribute").exists()


def test_damaged_attribute_partial_file_is_ignored(llama, three_chains, tmp_path, monkeypatch,
                                                   capsys):
    run = _interrupted(tmp_path, llama, three_chains, monkeypatch, 2, rows_per_request=1)
    partial = run.partial("attribute")
    partial.write_bytes(partial.read_bytes()[:-100])
    capsys.readouterr()
    calls = FaultAfter(monkeypatch, attribution, "_request_effects")
    attribute(run, llama, rows_per_request=1)
    assert calls.calls == 3
    warning = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and str(partial) in warning[0]
    assert run.attribution.is_file() and not partial.exists()


def test_chain_aggregation_is_the_mean_of_chain_means():
    from nnsteer.selection.attribution import Probe, layer_effects

    probes = [Probe("a", "backtracking", "deduction", 3, 0), Probe("a", "backtracking", "x", 5, 0),
              Probe("b", "backtracking", "x", 4, 0), Probe("b", "example-testing", "x", 4, 0)]
    effects = torch.tensor([[1.0, -2.0], [3.0, 4.0], [-5.0, 0.0], [2.0, 2.0]])
    chains = layer_effects(probes, effects, "released-code", "chains")
    rows = chains.filter(pl.col("label") == "backtracking").sort("layer")
    # chain a: (1 + 3) / 2 = 2 and (2 + 4) / 2 = 3; chain b: 5 and 0
    assert rows["effect"].to_list() == pytest.approx([3.5, 1.5])
    assert rows["std"].to_list() == pytest.approx([1.5, 1.5])  # ddof 0 over the 2 chains
    assert rows["n_spans"].to_list() == [3, 3] and rows["n_chains"].to_list() == [2, 2]
    pooled = layer_effects(probes, effects, "released-code").filter(pl.col("label") == "backtracking")
    assert pooled.sort("layer")["effect"].to_list() == pytest.approx([3.0, 2.0])
    with pytest.raises(BadInput, match="--aggregate 'chain'"):
        layer_effects(probes, effects, "nll", "chain")


def test_limit_attributes_the_first_chains(llama, tokenizer, tmp_path):
    chains = [_chain(tokenizer, "a"), _chain(tokenizer, "b")]
    run = _write_run(tmp_path, llama, chains)
    first = attribute(run, llama, metric="nll", limit=1, aggregate="chains",
                      labels=["backtracking"])
    assert first["n_chains"].unique().to_list() == [1] and first["n_spans"][0] == 2
    assert set(pl.read_parquet(run.path(SPANS_FILE))["chain_id"]) == {"a"}
    assert read_metadata(run.attribution)["options"]["aggregate"] == "chains"
