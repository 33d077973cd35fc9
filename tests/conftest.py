"""Shared fixtures: tiny random-weight Llama and Qwen2 models with a real tokenizer, and
:class:`FaultAfter`, which interrupts a stage after a given number of batches.

The tokenizer is SmolLM2's (from the embedded model's cache). ``tiny_qwen2`` carries an
R1-distill style chat template whose prompt already opens ``<think>``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from nnsteer.models import LoadedModel, embedded_dir, wrap_model

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


def build_tiny_hf(family: str, vocab_size: int, seed: int = 0):
    """A random-weight float32 ``LlamaForCausalLM`` (4 layers) or ``Qwen2ForCausalLM`` (3 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=4, tie_word_embeddings=False, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, tie_word_embeddings=True, **common))
    else:
        raise ValueError(family)
    return model.eval()


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
