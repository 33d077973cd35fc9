"""The per-chain cost metrics, each against an independent computation."""

from __future__ import annotations

import gzip
import zlib

import pytest
import torch

from nnsteer.evaluation.metrics import (
    answer_text,
    compression_ratio,
    nll_unsteered,
    reasoning_token_indices,
    repetition,
    text_costs,
)
from nnsteer.modeling.positions import decode_response


@pytest.mark.parametrize("words, n, expected", [
    ("a b c d e f g h".split(), 4, 0.0),                      # 5 distinct 4-grams
    (("wait " * 10).split(), 4, 6 / 7),                       # one 4-gram 7 times
    ("so wait no so wait no so wait no".split(), 3, 4 / 7),  # 3 distinct of 7 3-grams
    ("x y z".split(), 4, None),                               # no 4-gram at all
    ("a b a b".split(), 2, 1 / 3),                            # (a b) (b a) (a b)
])
def test_repetition_counts_repeated_ngrams(words, n, expected):
    value = repetition(words, n)
    assert value is None if expected is None else value == pytest.approx(expected)


def test_repetition_of_a_loop_tends_to_one_minus_one_over_repeats():
    loop = "Wait, let me check that again .".split()
    for repeats in (2, 5, 20):
        value = repetition(loop * repeats, 4)
        grams = len(loop) * repeats - 3
        assert value == pytest.approx((grams - len(loop)) / grams)


def test_compression_ratio_is_bytes_over_zlib_bytes():
    prose = "The train leaves at nine and travels at sixty kilometres an hour towards the coast."
    loop = "Wait, wait. " * 40
    for text in (prose, loop, "é" * 30):
        data = text.encode("utf-8")
        # gzip at level 9 wraps the same deflate stream: 18 bytes of gzip frame vs 6 of zlib
        assert compression_ratio(text) == pytest.approx(len(data) / (len(gzip.compress(data, 9, mtime=0)) - 12))
        assert compression_ratio(text) == len(data) / len(zlib.compress(data, 9))
    assert compression_ratio(loop) > 5 * compression_ratio(prose)
    assert compression_ratio("") is None


def _chain(tokenizer, prompt: str, reasoning: str, answer: str | None, finish: str = "eos"):
    text = reasoning + ("" if answer is None else "</think>\n\n" + answer)
    output_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    response = decode_response(tokenizer, output_ids)
    end = response.find("</think>")
    return {"prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"],
            "output_ids": output_ids, "response": response, "thinking_start": 0,
            "thinking_end": len(response) if end < 0 else end, "finish_reason": finish}


def test_text_costs_split_reasoning_and_answer(tokenizer):
    chain = _chain(tokenizer, "Q: 2+2?", "I add two and two. Wait, wait, wait, wait.", "4")
    costs = text_costs(chain, tokenizer)
    reasoning_ids = tokenizer("I add two and two. Wait, wait, wait, wait.", add_special_tokens=False)["input_ids"]
    assert costs.reasoning_tokens == len(reasoning_ids)
    assert costs.closed_thinking and costs.answered
    assert answer_text(chain) == "4"
    assert costs.repetition == pytest.approx(repetition(reasoning_ids))
    assert costs.compression_ratio == compression_ratio("I add two and two. Wait, wait, wait, wait.")

    cut = _chain(tokenizer, "Q", "Wait, wait, wait", None, finish="length")
    costs = text_costs(cut, tokenizer)
    assert not costs.closed_thinking and not costs.answered and answer_text(cut) == ""

    plain = _chain(tokenizer, "Q", "The answer is 4.", None, finish="eos")  # no thinking markup
    costs = text_costs(plain, tokenizer)
    assert costs.closed_thinking and costs.answered and answer_text(plain) == "The answer is 4."

    unanswered = _chain(tokenizer, "Q", "Hmm.", "", finish="eos")
    assert text_costs(unanswered, tokenizer).closed_thinking
    assert not text_costs(unanswered, tokenizer).answered


def _plain_nll(hf, chain, indices):
    """Mean NLL of the reasoning tokens from one unpadded transformers forward."""
    ids = torch.tensor([chain["prompt_ids"] + chain["output_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    start = len(chain["prompt_ids"])
    return float(-torch.stack([logp[start + i - 1, ids[0, start + i]] for i in indices]).mean())


def test_nll_unsteered_matches_a_plain_forward(tiny_llama, tokenizer):
    chains = [
        _chain(tokenizer, "Question one: how many legs?", "Four legs per cow, so 7 cows.", "7"),
        _chain(tokenizer, "Q2", "Wait, wait, wait, wait, wait, wait, wait.", None, finish="length"),
        _chain(tokenizer, "A much longer third question about trains and stations?",
               "Sixty times three is 180 km.", "180 km"),
        {**_chain(tokenizer, "Q4", "x", "y"), "thinking_end": 0},  # no reasoning token
    ]
    values = nll_unsteered(tiny_llama, chains, batch_size=2)
    for chain, value in zip(chains[:3], values):
        expected = _plain_nll(tiny_llama.hf_model, chain, reasoning_token_indices(chain, tokenizer))
        assert value == pytest.approx(expected, abs=2e-4)
    assert values[3] is None
    assert nll_unsteered(tiny_llama, chains[:3], batch_size=1) == pytest.approx(values[:3], abs=2e-4)


def test_nll_unsteered_is_the_same_in_small_logit_chunks(tiny_llama, tokenizer, monkeypatch):
    """Unembedding three rows at a time (many chunks, the last one short) changes nothing."""
    import nnsteer.evaluation.metrics

    chains = [_chain(tokenizer, "Question one: how many legs?", "Four legs per cow, so 7 cows.", "7"),
              _chain(tokenizer, "Q2", "Wait, wait, wait, wait, wait, wait, wait.", None, finish="length")]
    whole = nll_unsteered(tiny_llama, chains, batch_size=2)
    monkeypatch.setattr(nnsteer.evaluation.metrics, "LOGIT_CHUNK", 3 * tiny_llama.arch.vocab_size)
    assert nll_unsteered(tiny_llama, chains, batch_size=2) == pytest.approx(whole, abs=1e-6)


def test_nll_unsteered_runs_under_ndif_rules(tiny_llama, tokenizer):
    """The same trace through the strict NDIF backend (allow-lists): one float per chain back."""
    from strict_remote import strict_remote

    chains = [_chain(tokenizer, "Q one", "Four legs per cow, so 7 cows.", "7"),
              _chain(tokenizer, "Q two, longer", "Wait, wait, wait.", None, finish="length")]
    local = nll_unsteered(tiny_llama, chains, batch_size=2)
    with strict_remote(tiny_llama, bf16=False) as server:
        remote = nll_unsteered(tiny_llama, chains, batch_size=2)
    assert remote == pytest.approx(local, abs=1e-5)
    assert len(server.requests) == 1 and server.requests[0].tensors[0].shape == (2,)
