"""``sum_sample_means`` against means taken by hand from ``output_hidden_states``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import FaultAfter, make_tiny

from nnsteer.vectors import residuals
from nnsteer.vectors.residuals import Selection, sum_sample_means

GROUPS = ["backtracking", "deduction", "overall"]


def block_outputs(hf_model, ids: list[int]) -> torch.Tensor:
    """``[n_layers, T, d_model]`` float64 decoder-block outputs of one unpadded sequence.

    ``output_hidden_states[l + 1]`` for every block but the last, whose entry transformers
    passes through the final norm; the last block's output comes from a forward hook.
    """
    blocks = hf_model.model.layers
    captured = []
    hook = blocks[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    layers = [h[0] for h in out.hidden_states[1:-1]] + [captured[0][0]]
    return torch.stack(layers).double()


def reference_sums(hf_model, selections: list[Selection], groups: list[str]):
    """Sum over samples of each sample's mean activation, one sequence at a time."""
    sums, counts = {}, dict.fromkeys(groups, 0)
    for selection in selections:
        acts = block_outputs(hf_model, list(selection.ids))
        for group in groups:
            for sample in selection.samples.get(group, []):
                positions = sorted(set(sample))
                if positions:
                    mean = acts[:, positions].mean(dim=1)
                    sums[group] = sums.get(group, 0) + mean
                    counts[group] += 1
    return sums, counts


def random_selections(vocab: int, n: int, seed: int = 0) -> list[Selection]:
    """Sequences of different lengths with random, overlapping and repeated positions."""
    rng = random.Random(seed)
    selections = []
    for _ in range(n):
        length = rng.randint(5, 40)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        samples = {
            group: [[rng.randrange(length) for _ in range(rng.randint(1, 6))]
                    for _ in range(rng.randint(0, 3))]
            for group in GROUPS
        }
        samples["overall"] = [list(range(rng.randrange(length), length))]
        selections.append(Selection(ids, samples))
    return selections


@pytest.fixture(scope="module")
def selections(tokenizer) -> list[Selection]:
    return random_selections(len(tokenizer), 9)


def test_sums_match_hidden_states(tiny_model, selections):
    got = sum_sample_means(tiny_model, selections, GROUPS, batch_size=4, progress=False)
    want, counts = reference_sums(tiny_model.hf_model, selections, GROUPS)
    assert got.counts == counts
    for group in GROUPS:
        assert got.sums[group].shape == (tiny_model.arch.n_layers, tiny_model.arch.d_model)
        torch.testing.assert_close(got.sums[group], want[group], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.means()[group], (want[group] / counts[group]).float(),
                                   atol=1e-5, rtol=1e-5)


def test_batch_size_does_not_change_results(tiny_llama, selections):
    one = sum_sample_means(tiny_llama, selections, GROUPS, batch_size=1, progress=False)
    eight = sum_sample_means(tiny_llama, selections, GROUPS, batch_size=8, progress=False)
    for group in GROUPS:
        torch.testing.assert_close(one.sums[group], eight.sums[group], atol=1e-5, rtol=1e-5)


def test_remote_local_equals_local(tokenizer, tiny_llama, selections):
    simulated = make_tiny("llama", tokenizer, remote="local")
    local = sum_sample_means(tiny_llama, selections, GROUPS, batch_size=4, progress=False)
    remote = sum_sample_means(simulated, selections, GROUPS, batch_size=4, progress=False)
    for group in GROUPS:
        torch.testing.assert_close(remote.sums[group], local.sums[group], atol=0, rtol=0)


def test_strict_server_returns_only_layer_sums(tokenizer, tiny_llama, selections):
    """Through a stand-in NDIF server: the sums of a local run under the server's bf16
    autocast, and each response is about one [L, K, H] tensor per batch."""
    strict = pytest.importorskip("strict_remote")
    lm = make_tiny("llama", tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local = sum_sample_means(tiny_llama, selections, GROUPS, batch_size=8, progress=False)
    with strict.strict_remote(lm) as server:
        remote = sum_sample_means(lm, selections, GROUPS, batch_size=8, progress=False)
    for group in GROUPS:
        torch.testing.assert_close(remote.sums[group], local.sums[group], atol=0, rtol=0)
    layer_sums_bytes = lm.arch.n_layers * len(GROUPS) * lm.arch.d_model * 4
    (request,) = server.requests  # both batches of 8 in one request
    assert [t.shape for t in request.tensors] == [(4, len(GROUPS), 64)] * 2
    assert request.response_bytes < 2 * layer_sums_bytes + 4096


def test_groups_without_samples_have_no_mean(tiny_llama):
    selection = Selection([5, 6, 7, 8], {"deduction": [[1, 2]], "backtracking": [[]]})
    got = sum_sample_means(tiny_llama, [selection], ["deduction", "backtracking"], progress=False)
    assert got.counts == {"deduction": 1, "backtracking": 0}
    assert list(got.means()) == ["deduction"]
    assert not got.sums["backtracking"].any()


def test_position_outside_the_sequence_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="outside a sequence of 3 tokens"):
        sum_sample_means(tiny_llama, [Selection([5, 6, 7], {"deduction": [[3]]})], ["deduction"],
                         progress=False)


def test_interrupted_save_keeps_the_previous_state(tiny_llama, selections, tmp_path, monkeypatch):
    """Ctrl-C while the second batch's state is being written: the first batch's state stays."""
    path = tmp_path / ".extract.partial.pt"
    real_save = torch.save

    def save_half_then_interrupt(state, f):
        if state["batches"] == 2:
            Path(f).write_bytes(b"half a file")
            raise KeyboardInterrupt
        real_save(state, f)

    monkeypatch.setattr(torch, "save", save_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):  # 9 selections, 3 batches
        sum_sample_means(tiny_llama, selections, GROUPS, batch_size=4, progress=False,
                         checkpoint=path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    calls = FaultAfter(monkeypatch, residuals, "_reduce_batches")
    got = sum_sample_means(tiny_llama, selections, GROUPS, batch_size=4, progress=False,
                           checkpoint=path)
    assert calls.calls == 2
    want = sum_sample_means(tiny_llama, selections, GROUPS, batch_size=4, progress=False)
    assert all(torch.equal(got.sums[group], want.sums[group]) for group in GROUPS)
