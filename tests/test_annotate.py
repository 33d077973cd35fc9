"""Parsing annotator replies, aligning them to the chain text, token positions, the stage."""

from __future__ import annotations

import difflib
import json
import re

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import ANNOTATED_CHAINS, requires_shared

from nnsteer.annotation.spans import Span, parse_annotation
from nnsteer.annotation.stage import (
    annotate_chains,
    annotate_frame,
    label_positions,
    spans_by_chain,
    token_label_counts,
)
from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.labels import LABELS
from nnsteer.runs.store import RunDir, read_metadata, write_parquet

FILES = sorted(ANNOTATED_CHAINS.glob("*.json")) if ANNOTATED_CHAINS.is_dir() else []


def _records(name: str) -> list[dict]:
    return json.loads((ANNOTATED_CHAINS / f"{name}.json").read_text())


def _parsed(name: str, index: int) -> tuple[str, list[Span]]:
    """The thinking text of a shared record and its parsed annotation."""
    record = _records(name)[index]
    return record["thinking_process"], parse_annotation(record["annotated_response"],
                                                        record["thinking_process"])


def _placed(spans: list[Span], text: str) -> None:
    """Every ok span lies inside ``text``; no two parts share a character."""
    ranges = sorted({(s.start, s.end) for s in spans if s.status == "ok"})
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start
    assert all(0 <= s <= e <= len(text) for s, e in ranges)


# ------------------------------------------------------------------ real annotations

@requires_shared()
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_record_parses_and_aligns(path):
    records = json.loads(path.read_text())
    total = ok = 0
    for record in records:
        text = record["thinking_process"]
        spans = parse_annotation(record["annotated_response"], text)
        assert spans, "a record with no parts"
        _placed(spans, text)
        total += len(spans)
        ok += sum(s.status == "ok" for s in spans)
        # The authors' own counts skip numbered tags like [1. deduction]: ours are a superset.
        numbered = {label: len(re.findall(rf'\["?\d+\. {label}"?\]', record["annotated_response"]))
                    for label in LABELS}
        for label, count in record["label_counts"].items():
            assert sum(s.label == label for s in spans) - numbered[label] == count
    assert ok / total >= 0.98


@requires_shared()
def test_quoted_labels_place_parts_verbatim():
    text, spans = _parsed("deepseek-r1-distill-llama-8b", 0)
    first = "First, I need to determine the total number of possible 5-card hands"
    assert (spans[0].label, spans[0].start, spans[0].status) == ("initializing", 0, "ok")
    assert text[spans[0].start:spans[0].end].startswith(first)
    assert [s.label for s in spans[:3]] == ["initializing", "deduction", "adding-knowledge"]
    assert all(text[s.start:s.end] == s.text for s in spans)


@requires_shared()
def test_numbered_and_bare_labels():
    # qwen-14b record 3 writes [0. initializing], [4. uncertainty-estimation], [1. deduction].
    record = _records("deepseek-r1-distill-qwen-14b")[3]
    assert record["annotated_response"].startswith("[0. initializing]")
    spans = parse_annotation(record["annotated_response"], record["thinking_process"])
    assert [s.label for s in spans[:4]] == [
        "initializing", "uncertainty-estimation", "initializing", "deduction"]
    assert spans[0].start == 0 and spans[1].text.startswith("Well, I know that colonizing")
    # A bare [deduction] tag, found in the shared data at test time.
    for record in _records("llama-3.1-8b-instruct"):
        bare = re.search(r"(?<!\")\[deduction\]([^\[]+)\[", record["annotated_response"])
        if bare:
            break
    spans = parse_annotation(record["annotated_response"], record["thinking_process"])
    part = bare.group(1).strip()
    assert any(s.label == "deduction" and s.text == part and s.status == "ok" for s in spans)


@requires_shared()
def test_brackets_in_the_text_are_not_tags():
    # LaTeX \[ ... \] and a literal "[blank]" stay part of the text.
    text, spans = _parsed("qwen2.5-14b-instruct", 0)
    latex = [s for s in spans if "\\[ C(52, 5)" in s.text]
    assert latex and all(s.status == "ok" and s.label == "deduction" for s in latex)
    record = next(r for r in _records("deepseek-r1-distill-llama-8b")
                  if "to [blank]." in r["thinking_process"])
    spans = parse_annotation(record["annotated_response"], record["thinking_process"])
    assert any("[blank]" in s.text and s.status == "ok" for s in spans)
    assert {s.label for s in spans} <= set(LABELS)


@requires_shared()
def test_whitespace_changes_align():
    # Find parts whose text differs from the chain only in whitespace.
    found = 0
    for record in (r for path in FILES for r in json.loads(path.read_text())):
        text = record["thinking_process"]
        for span in parse_annotation(record["annotated_response"], text):
            if span.status == "ok" and span.text not in text:
                original = text[span.start:span.end]
                if re.sub(r"\s", "", original) == re.sub(r"\s", "", span.text):
                    found += 1
    assert found >= 100


@requires_shared()
def test_edited_part_stays_near_instead_of_jumping_to_a_repeat():
    # The annotator shortened "How is that possible?" to "How?"; the chain repeats the
    # paragraph verbatim further on: the part belongs to its first, edited occurrence.
    record = _records("deepseek-r1-distill-qwen-14b")[16]
    text = record["thinking_process"]
    opening = "Alternatively, maybe the man arrived on Friday, stayed three days, and left on the same Friday."
    spans = parse_annotation(record["annotated_response"], text)
    part = next(s for s in spans if s.text.startswith(opening))
    assert part.start == text.find(opening)
    assert text.find(part.text) > part.end  # the verbatim copy comes later
    ratio = difflib.SequenceMatcher(None, text[part.start:part.end], part.text).ratio()
    assert ratio > 0.9
    assert all(s.status == "ok" for s in spans)


@requires_shared()
def test_duplicated_text_is_not_placed_twice():
    # The annotator put "Hmm, but I'm not sure if that's the right fit." at the end of one
    # part and again as its own part: the second copy has no characters left.
    text, spans = _parsed("deepseek-r1-distill-llama-8b", 5)
    sentence = "Hmm, but I'm not sure if that's the right fit."
    assert text.count(sentence) == 1
    copy = next(s for s in spans if s.text == sentence)
    assert (copy.status, copy.start, copy.end) == ("unaligned", -1, -1)
    previous = spans[spans.index(copy) - 1]
    assert text[previous.start:previous.end].endswith(sentence)


@requires_shared()
def test_degenerate_reply_is_unaligned_quickly():
    # llama-instruct record 23: a part runs on with ~78,000 zeros and no end-section.
    record = _records("llama-3.1-8b-instruct")[23]
    assert not record["annotated_response"].rstrip().endswith('["end-section"]')
    spans = parse_annotation(record["annotated_response"], record["thinking_process"])
    assert spans[-1].status == "unaligned" and len(spans[-1].text) > 50_000
    assert sum(s.status == "ok" for s in spans) == len(spans) - 1


# ----------------------------------------------------------------- synthetic damage

TEXT = ("Okay, so I need to find x. We know 2x = 6.\n\nSo x = 3. Wait, maybe I should check "
        "that. Let me test x = 3: 2 * 3 = 6. Yes.")


def test_missing_end_section_and_two_labels_on_one_part():
    annotated = ('["initializing"]Okay, so I need to find x.\n["deduction"] We know 2x = 6.'
                 '["end-section"]["deduction"]["backtracking"]So x = 3. Wait, maybe I should '
                 'check that.["end-section"] ["example-testing"]Let me test x = 3: 2 * 3 = 6.')
    spans = parse_annotation(annotated, TEXT)
    assert [(s.label, TEXT[s.start:s.end]) for s in spans] == [
        ("initializing", "Okay, so I need to find x."),
        ("deduction", "We know 2x = 6."),
        ("deduction", "So x = 3. Wait, maybe I should check that."),
        ("backtracking", "So x = 3. Wait, maybe I should check that."),
        ("example-testing", "Let me test x = 3: 2 * 3 = 6."),
    ]
    assert {s.status for s in spans} == {"ok"}


def test_label_variants_and_unknown_labels():
    annotated = ("[Initializing] Okay, so I need to find x. [end section] "
                 "[\"summarizing\"]We know 2x = 6.[\"end-section\"]"
                 "[recapping]So x = 3.[END-SECTION]"
                 "['Uncertainty Estimation']Wait, maybe I should check that.")
    spans = parse_annotation(annotated, TEXT)
    assert [(s.label, s.status) for s in spans] == [
        ("initializing", "ok"), ("summarizing", "unknown-label"),
        ("recapping", "unknown-label"), ("uncertainty-estimation", "ok")]
    assert TEXT[spans[1].start:spans[1].end] == "We know 2x = 6."
    spans = parse_annotation('["deduction", "backtracking"]So x = 3.["end-section"]', TEXT)
    assert [(s.label, TEXT[s.start:s.end]) for s in spans] == [
        ("deduction", "So x = 3."), ("backtracking", "So x = 3.")]


def test_line_breaks_markup_and_small_edits():
    text = "### Step 1\nThe total is\n   C(52, 5) = 2,598,960.\n\nSo the answer is about 0.507, I think."
    annotated = ('["deduction"]Step 1 The total is C(52, 5) = 2,598,960.["end-section"]'
                 '["deduction"]So the answer is roughly 0.507, I think.["end-section"]')
    spans = parse_annotation(annotated, text)
    assert [text[s.start:s.end] for s in spans] == [
        "Step 1\nThe total is\n   C(52, 5) = 2,598,960.",
        "So the answer is about 0.507, I think."]


def test_unplaceable_and_reordered_parts():
    annotated = ('["deduction"]So x = 3.["end-section"]'
                 '["initializing"]Okay, so I need to find x.["end-section"]'
                 '["deduction"]The moon is made of cheese entirely.["end-section"]'
                 '["example-testing"]Let me test x = 3: 2 * 3 = 6.["end-section"]')
    spans = parse_annotation(annotated, TEXT)
    assert [s.status for s in spans] == ["ok", "unaligned", "unaligned", "ok"]
    assert all((s.start, s.end) == (-1, -1) for s in spans if s.status == "unaligned")


def test_reply_without_tags_gives_no_spans():
    assert parse_annotation("I cannot annotate this text.", TEXT) == []


# ------------------------------------------------------------------ token positions

def _chain(tokenizer, reasoning: str, answer: str = "The answer is 3.", chain_id: str = "c0"):
    """A chain whose ids are real SmolLM2 ids of ``<think>reasoning</think>answer``."""
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Solve 2x = 6."}], add_generation_prompt=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = prompt_ids["input_ids"]
    output_ids = tokenizer.encode(f"<think>{reasoning}</think>{answer}", add_special_tokens=False)
    response = tokenizer.decode(output_ids, skip_special_tokens=True)
    start = response.index("<think>") + len("<think>")
    return {"chain_id": chain_id, "task_id": "t0", "model": "smollm2-135m",
            "prompt_ids": list(prompt_ids), "output_ids": output_ids, "response": response,
            "thinking_start": start, "thinking_end": response.index("</think>")}


def test_label_positions_and_counts_match_tokenizer_offsets(tokenizer):
    from nnsteer.modeling.positions import token_offsets

    chain = _chain(tokenizer, TEXT)
    response, ids, prompt_len = chain["response"], chain["output_ids"], len(chain["prompt_ids"])
    # Reference: the fast tokenizer's own character offsets of the same text.
    reference = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    assert reference["input_ids"] == ids
    ref_offsets = reference["offset_mapping"]

    def covered(start, end):
        return [i for i, (s, e) in enumerate(ref_offsets) if s < end and e > start]

    a = response.index("We know")
    b = response.index("Wait, maybe")
    spans = [Span("deduction", a, a + len("We know 2x = 6."), "ok", ""),
             Span("deduction", b - len("So x = 3. "), b - 1, "ok", ""),
             Span("backtracking", b, b + len("Wait, maybe I should check that."), "ok", ""),
             Span("example-testing", -1, -1, "unaligned", "")]
    offsets = token_offsets(tokenizer, ids)
    positions = label_positions(spans, offsets, prompt_len)
    for label in ("deduction", "backtracking"):
        tokens = sorted({i for s in spans if s.label == label for i in covered(s.start, s.end)})
        firsts = {covered(s.start, s.end)[0] - 1 for s in spans if s.label == label}
        expected = sorted({prompt_len + i for i in tokens} | {prompt_len + i for i in firsts})
        assert positions[label] == expected
        assert token_label_counts(spans, offsets)[label] == len(tokens)
    assert "example-testing" not in positions


def test_first_token_span_includes_last_prompt_token(tokenizer):
    from nnsteer.modeling.positions import token_offsets

    chain = _chain(tokenizer, TEXT)
    offsets = token_offsets(tokenizer, chain["output_ids"])
    prompt_len = len(chain["prompt_ids"])
    positions = label_positions([Span("initializing", 0, 7, "ok", "<think>")], offsets, prompt_len)
    assert positions["initializing"][0] == prompt_len - 1


# -------------------------------------------------------------------------- the stage

def _write_chains(run: RunDir, chains: list[dict]) -> None:
    write_parquet(pl.DataFrame(chains), run.chains, {"stage": "generate"})


def test_annotate_frame_offsets_are_into_response(tokenizer):
    chains = pl.DataFrame([_chain(tokenizer, TEXT)])
    rows = annotate_frame(chains, annotator="rules", progress=False)
    assert set(rows.columns) >= {"chain_id", "label", "start", "end", "text", "annotator", "status"}
    response = chains["response"][0]
    start, end = chains["thinking_start"][0], chains["thinking_end"][0]
    for row in rows.iter_rows(named=True):
        assert start <= row["start"] < row["end"] <= end
        assert response[row["start"]:row["end"]] == row["text"]
    assert rows["annotator"].unique().to_list() == ["rules"]
    assert rows["label"][0] == "initializing"


def test_stage_writes_resumes_and_summarises(tokenizer, tmp_path, monkeypatch):
    from nnsteer.modeling.positions import token_offsets

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run = RunDir(tmp_path / "run")
    first = _chain(tokenizer, TEXT, chain_id="c0")
    _write_chains(run, [first])
    summary = annotate_chains(run, tokenizer=tokenizer)  # auto → rules without a key
    annotations = pl.read_parquet(run.annotations)
    assert read_metadata(run.annotations)["options"]["annotator"] == "rules"
    # Summary tokens: each label's tokens, counted here from the reference offsets.
    offsets = token_offsets(tokenizer, first["output_ids"])
    by_label: dict[str, set[int]] = {}
    for row in annotations.iter_rows(named=True):
        by_label.setdefault(row["label"], set()).update(
            i for i, (s, e) in enumerate(offsets) if s < row["end"] and e > row["start"] and e > s)
    table = {r["label"]: r for r in summary.iter_rows(named=True)}
    for label in LABELS:
        assert table[label]["tokens"] == len(by_label.get(label, ()))
        assert table[label]["spans"] == annotations.filter(pl.col("label") == label).height

    # Resume: a kept chain is not annotated again (its edited row survives), a new one is.
    write_parquet(annotations.with_columns(pl.lit("kept").alias("text")), run.annotations,
                  read_metadata(run.annotations))
    _write_chains(run, [first, _chain(tokenizer, "Hmm, maybe x = 4. Wait, no.", chain_id="c1")])
    annotate_chains(run, tokenizer=tokenizer, annotator="rules")
    again = pl.read_parquet(run.annotations)
    assert set(again.filter(pl.col("chain_id") == "c0")["text"]) == {"kept"}
    assert [s.text for s in spans_by_chain(again)["c1"]] == ["Hmm, maybe x = 4.", "Wait, no."]

    # A chain generated again (same id, new response) is annotated again.
    _write_chains(run, [_chain(tokenizer, "Okay. So x = 3.", chain_id="c0")])
    annotate_chains(run, tokenizer=tokenizer, annotator="rules")
    assert pl.read_parquet(run.annotations)["text"].to_list() == ["Okay.", "So x = 3."]


def test_stage_bad_input(tokenizer, tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(BadInput, match="chains.parquet not found"):
        annotate_chains(run, annotator="rules", tokenizer=tokenizer)
    chain = _chain(tokenizer, TEXT)
    chain["thinking_end"] = 10_000
    _write_chains(run, [chain])
    with pytest.raises(BadInput, match="chain c0: thinking_start/thinking_end"):
        annotate_chains(run, annotator="rules", tokenizer=tokenizer)
    with pytest.raises(BadInput, match="--annotator 'gpt'"):
        annotate_chains(run, annotator="gpt", tokenizer=tokenizer)
    assert not run.annotations.exists()


@pytest.mark.embedded
def test_cli_annotate(tokenizer, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    run = RunDir(tmp_path / "run")
    _write_chains(run, [_chain(tokenizer, TEXT)])
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "annotate"])
    assert result.exit_code == 0, result.output
    assert "OPENAI_API_KEY is not set" in result.output
    assert re.search(r"initializing\s+2\s+\d+\s+0\s+0", result.output)
    assert run.annotations.exists()
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "annotate", "--annotator", "x"])
    assert result.exit_code == 2 and "--annotator 'x'" in result.output
