"""Each shipped config against a tiny random model of its model's family, so that a config
and its family cannot drift apart:

- every option passes the pipeline's own checks (``stage_options`` for every stage);
- its thinking format and reasoning effort are valid for the family: the tiny model, with
  the real tokenizer of the model (``tests/target_tokenizers.py``), takes them
  (``apply_thinking``), detection agrees with the format the config names, and a short
  chain generates in it with the config's prompt template;
- its ``[select] layers`` lie within the real model's layers (the table below, from each
  model's config.json on the hub), and ``nnsteer plan``'s offline copy of those configs
  agrees with the table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_tiny_hf

from nnsteer.generation.loop import generate
from nnsteer.modeling.architecture import Architecture
from nnsteer.modeling.models import wrap_model
from nnsteer.modeling.thinking import apply_thinking
from nnsteer.pipeline.plan import KNOWN_CONFIGS
from nnsteer.pipeline.run import read_config, stage_function, stage_options
from nnsteer.runs.registry import STAGES

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: Each shipped config's model: its family, its real number of layers, the tokenizer it is
#: tested with (a name of target_tokenizers, or ``smollm2`` for the embedded models' own)
#: and its thinking format.
MODELS: dict[str, tuple[str, int, str, str]] = {
    "smollm2-135m": ("llama", 30, "smollm2", "none"),
    "smollm2-135m-r1": ("llama", 30, "smollm2", "think-tags"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": ("qwen2", 28, "r1-qwen", "think-tags"),
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": ("llama", 32, "r1-llama", "think-tags"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B": ("qwen2", 48, "r1-qwen", "think-tags"),
    "Qwen/Qwen3-8B": ("qwen3", 36, "qwen3", "think-tags"),
    "openai/gpt-oss-20b": ("gpt_oss", 24, "gptoss", "harmony"),
}
SHIPPED = sorted(CONFIGS.glob("*.toml"))
_TOKENIZERS: dict[str, object] = {}


def _tokenizer(name: str, files: dict[str, Path], smollm2):
    from transformers import AutoTokenizer

    if name == "smollm2":
        return smollm2
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = AutoTokenizer.from_pretrained(files[name])
    return _TOKENIZERS[name]


def test_every_shipped_model_is_in_the_family_table():
    assert {read_config(path).model.name for path in SHIPPED} <= set(MODELS)
    names = {read_config(path).model.name for path in SHIPPED}
    assert {"Qwen/Qwen3-8B", "openai/gpt-oss-20b"} <= names  # bring-your-own thinking models


@pytest.mark.parametrize("name", sorted(KNOWN_CONFIGS))
def test_the_plans_offline_configs_agree_with_the_family_table(name):
    family, layers, _, _ = MODELS[name]
    assert KNOWN_CONFIGS[name]["model_type"] == family
    assert KNOWN_CONFIGS[name]["num_hidden_layers"] == layers


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_a_shipped_config_fits_its_family(path, target_tokenizer_files, tokenizer):
    config = read_config(path)
    for stage in STAGES:  # BadInput for a key or value the pipeline would refuse
        stage_options(config, stage, stage_function(stage))
    family, n_layers, tokenizer_name, fmt = MODELS[config.model.name]
    for label, layers in (config.options["select"].get("layers") or {}).items():
        assert all(0 <= layer < n_layers for layer in layers), (label, layers)
    tok = _tokenizer(tokenizer_name, target_tokenizer_files, tokenizer)
    hf = build_tiny_hf(family, len(tok))
    assert Architecture.discover(hf).family == family
    lm = wrap_model(hf, tok, name=config.model.name, revision="test")
    choice = apply_thinking(lm, config.model.thinking_format, config.model.reasoning_effort,
                            origin=f"{path.name}: [model] thinking_format")
    assert choice.format.name == fmt
    detected = apply_thinking(lm, None, config.model.reasoning_effort)  # the config agrees with detection
    assert detected.format.name == fmt
    if fmt == "harmony":
        assert choice.reasoning_effort == (config.model.reasoning_effort or "medium")
    else:
        assert config.model.reasoning_effort is None
    apply_thinking(lm, config.model.thinking_format, config.model.reasoning_effort)
    template = config.options["generate"].get("prompt_template", "step-by-step")
    [chain] = generate(lm, ["What is 2 + 3?"], max_new_tokens=2, progress=False,
                       prompt_template=template)
    assert len(chain.output_ids) >= 1
