"""The target models' real tokenizers (R1-Distill-Qwen, R1-Distill-Llama, Qwen3).

Token offsets against the bytes each token stands for (byte-level BPE, the GPT-2 byte
alphabet written out below), the chat templates, the reasoning boundary, the round-trip
check on load, and the CLI from ``tasks`` to ``extract`` on a tiny model of each
vocabulary that recites a unicode-rich chain with ``</think>`` and EOS.
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import reciting_hf

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.generation.loop import finish_generation, reasoning_span, thinking_span
from nnsteer.generation.prompts import prompt_token_ids
from nnsteer.modeling.models import ROUND_TRIP_SAMPLE, check_tokenizer, load_tokenizer
from nnsteer.modeling.positions import (
    decode_response,
    overlapping_tokens,
    token_offsets,
)
from nnsteer.runs.store import RunDir
from nnsteer.vectors.extract import load_vectors

#: A chain with the characters R1 chains are full of, CJK, emoji (joined ones too) and
#: characters outside the basic plane.
UNICODE_CHAIN = (
    "Okay, so 17 × 23 ≈ 391 → check: ∑ᵢ xᵢ² ≥ 0, and 1.5 × 10⁹ ≠ ∞. Café, naïve, déjà vu; "
    "日本語の文章です。鳩と鸚鵡。Hmm 🤔🎉👨‍👩‍👧 — “quotes” ‘too’, €100, 𝜋 ≈ 3.14159, 𝔽₂ ⊂ ℝ… "
    "Wait, maybe I'm wrong?</think>\n\nThe answer is **391** ✓"
)

#: What the tiny models recite: behaviours for the ``rules`` annotator, split characters,
#: ``</think>`` and then the answer; no token repeats (see ``reciting_hf``).
RECITED = ("Okay so 2×4≈8 → ∑ café 鳩 🤔 𝜋. Wait, maybe my sum was off? I am not sure it is right! "
           "For example with x=3 then y equals five; answer: nine</think>\n\nNine ✓")

FAMILY = {"r1-qwen": "qwen2", "r1-llama": "llama", "qwen3": "qwen3"}


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet: printable bytes stand for themselves, the others for
    256 + their rank among the non-printable ones."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def characters_of_tokens(tokenizer, ids: list[int], text: str) -> list[set[int]]:
    """Per token, the indices of the characters of ``text`` its bytes belong to."""
    alphabet = _byte_alphabet()
    owner = [i for i, char in enumerate(text) for _ in char.encode("utf-8")]  # byte → character
    special = set(tokenizer.all_special_ids)
    cursor, out = 0, []
    for token, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        n = 0 if token in special else len(bytes(alphabet[c] for c in piece))
        out.append(set(owner[cursor : cursor + n]))
        cursor += n
    assert cursor == len(owner)  # the tokens' bytes are the text's bytes
    return out


def test_every_token_belongs_to_the_spans_covering_its_bytes(target_tokenizer):
    tok = target_tokenizer
    ids = tok.encode(UNICODE_CHAIN * 2, add_special_tokens=False) + [tok.eos_token_id]
    text = decode_response(tok, ids)
    assert text == UNICODE_CHAIN * 2
    expected = characters_of_tokens(tok, ids, text)
    assert sum(len(a & b) for a, b in zip(expected, expected[1:])) >= 10  # split characters
    offsets = token_offsets(tok, ids)
    for char in range(len(text)):  # the one-character span of each character
        assert set(overlapping_tokens(offsets, char, char + 1)) == {
            i for i, chars in enumerate(expected) if char in chars}, (char, text[char])
    assert offsets[-1] == (len(text), len(text))  # EOS: no character


def test_chat_templates_and_round_trip(target_tokenizer):
    tok = target_tokenizer
    ids = prompt_token_ids(tok, "What is 2 + 2?")
    if tok.eos_token == "<｜end▁of▁sentence｜>":  # R1-distill: BOS, and the prompt opens <think>
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.convert_ids_to_tokens(ids[-3:]) == ["<｜Assistant｜>", "<think>", "Ċ"]
    else:
        assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert "Please answer the following question:\n\nWhat is 2 + 2?" in tok.decode(ids)
    assert check_tokenizer(tok, "x") is tok


def _think_response_ids(tok, answer: str = "\n\nNine ✓") -> list[int]:
    opened = "" if tok.eos_token == "<｜end▁of▁sentence｜>" else "<think>"
    return tok.encode(f"{opened}Okay, 2 × 4 ≈ 8 →</think>{answer}", add_special_tokens=False) + [tok.eos_token_id]


def test_reasoning_ends_at_the_think_token(target_tokenizer):
    tok = target_tokenizer
    ids = _think_response_ids(tok)
    gen = finish_generation(tok, [], ids, {tok.eos_token_id})
    assert gen.finish_reason == "eos"
    assert (gen.thinking_start, gen.thinking_end) == reasoning_span(gen.response)
    assert gen.response[gen.thinking_start : gen.thinking_end] == "Okay, 2 × 4 ≈ 8 →"


def test_reasoning_ends_at_a_special_think_token(target_tokenizer_files, tmp_path):
    """A tokenizer that marks ``</think>`` special: decoding drops the tag, the id still ends
    the reasoning (a text search would let the reasoning swallow the answer)."""
    from transformers import AutoTokenizer

    folder = shutil.copytree(target_tokenizer_files["r1-qwen"], tmp_path / "special")
    files = json.loads((folder / "tokenizer.json").read_text())
    for token in files["added_tokens"]:
        token["special"] = token["special"] or token["content"] == "</think>"
    (folder / "tokenizer.json").write_text(json.dumps(files, ensure_ascii=False))
    tok = AutoTokenizer.from_pretrained(folder)
    ids = _think_response_ids(tok, answer=" Nine")
    gen = finish_generation(tok, [], ids, {tok.eos_token_id})
    assert gen.response == "Okay, 2 × 4 ≈ 8 → Nine"
    assert reasoning_span(gen.response) == (0, len(gen.response))  # the text alone cannot tell
    assert gen.response[gen.thinking_start : gen.thinking_end] == "Okay, 2 × 4 ≈ 8 →"
    assert thinking_span(tok, ids, gen.response) == (gen.thinking_start, gen.thinking_end)


def test_a_tokenizer_that_loses_spaces_fails_loudly(target_tokenizer_files, tmp_path):
    """What transformers before 5.22 did to R1-Distill-Llama: a SentencePiece-style
    pre-tokenizer on a byte-level vocabulary, so spaces and newlines vanish."""
    import transformers

    folder = shutil.copytree(target_tokenizer_files["r1-llama"], tmp_path / "mangled")
    files = json.loads((folder / "tokenizer.json").read_text())
    files["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first",
                              "split": False}
    (folder / "tokenizer.json").write_text(json.dumps(files, ensure_ascii=False))
    (folder / "config.json").write_text("{}")
    with pytest.raises(BadInput, match=f"transformers {transformers.__version__} does not give "
                                       "text back") as caught:
        load_tokenizer(str(folder))
    assert "\n" not in str(caught.value) and ROUND_TRIP_SAMPLE[:20] in str(caught.value)


@pytest.fixture
def reciting_model_dir(target_name, target_tokenizer, target_tokenizer_files, tmp_path):
    """A tiny model of the tokenizer's vocabulary (width 32) reciting :data:`RECITED` then
    EOS, saved with the tokenizer's files in ``tmp_path / "model"``."""
    tok, name = target_tokenizer, target_name
    opened = "<think>" if name == "qwen3" else ""
    recited = [*prompt_token_ids(tok, "x")[-1:], *tok.encode(opened + RECITED, add_special_tokens=False),
               tok.eos_token_id]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = reciting_hf(FAMILY[name], tok, recited, hidden_size=32, intermediate_size=64, **ids)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target_tokenizer_files[name] / file, folder / file)
    return folder, opened


def test_cli_from_tasks_to_extract(reciting_model_dir, target_name, target_tokenizer, tmp_path,
                                   monkeypatch):
    """The stages on each vocabulary, the model given by a relative path."""
    tok, (folder, opened) = target_tokenizer, reciting_model_dir
    monkeypatch.chdir(tmp_path)
    run = RunDir(tmp_path / "run")
    model = ["--model", "model", "--batch-size", "2"]
    for args in (["tasks", "--per-category", "1", "--eval-per-category", "0"],
                 ["generate", *model, "--limit", "2", "--max-new-tokens", "80"],
                 ["annotate", "--annotator", "rules"],
                 ["extract", *model]):
        result = CliRunner().invoke(cli, ["--run-dir", str(run.root), *args])
        assert result.exit_code == 0, (args[0], result.output)

    chains = pl.read_parquet(run.chains)
    assert chains["model"].unique().to_list() == [str(folder)]  # stored absolute
    for chain in chains.iter_rows(named=True):
        assert chain["finish_reason"] == "eos" and chain["output_ids"][-1] == tok.eos_token_id
        response, start, end = chain["response"], chain["thinking_start"], chain["thinking_end"]
        assert response == opened + RECITED
        assert (start, end) == (len(opened), response.index("</think>"))
        offsets = token_offsets(tok, chain["output_ids"])
        reasoning = overlapping_tokens(offsets, start, end)
        # every token with a byte inside the reasoning: the completing ones too
        expected = [i for i, chars in enumerate(characters_of_tokens(tok, chain["output_ids"], response))
                    if chars & set(range(start, end))]
        assert reasoning == expected
    spans = pl.read_parquet(run.annotations)
    assert {"uncertainty-estimation", "example-testing"} <= set(spans["label"])
    assert {"uncertainty-estimation", "example-testing"} <= set(load_vectors(run.vectors).labels)

    if target_name != "r1-llama":  # once is enough for what follows
        return
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # later stages find the model, and accept its absolute path
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "extract", "--model", str(folder)])
    assert result.exit_code == 0, result.output

