"""The offline rules annotator and the agreement measures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ANNOTATED_CHAINS, requires_shared

from nnsteer.annotation.agreement import agreement, file_agreement, word_labels
from nnsteer.annotation.rules import rules_annotate, sentences
from nnsteer.annotation.spans import Span
from nnsteer.cli import cli
from nnsteer.errors import BadInput

CHAIN = (
    "Okay, so I need to find the area of the triangle. The sides are 3, 4 and 5.\n\n"
    "Let me break it down step by step. I remember that a 3-4-5 triangle is a right triangle. "
    "So the area is half of 3 times 4. That gives 3 * 4 / 2 = 6. "
    "Wait, maybe I should use Heron's formula instead. Hmm, I'm not sure that is needed. "
    "Let me test it with s = 6: sqrt(6 * 3 * 2 * 1) = 6. It matches. "
    "A triangle's area is half its base times its height."
)


def test_sentences_and_labels_on_a_written_chain():
    spans = rules_annotate(CHAIN)
    assert [(s.label, CHAIN[s.start:s.end]) for s in spans] == [
        ("initializing", "Okay, so I need to find the area of the triangle."),
        ("initializing", "The sides are 3, 4 and 5."),
        ("initializing", "Let me break it down step by step."),
        ("adding-knowledge", "I remember that a 3-4-5 triangle is a right triangle."),
        ("deduction", "So the area is half of 3 times 4."),
        ("example-testing", "That gives 3 * 4 / 2 = 6."),
        ("backtracking", "Wait, maybe I should use Heron's formula instead."),
        ("uncertainty-estimation", "Hmm, I'm not sure that is needed."),
        ("example-testing", "Let me test it with s = 6: sqrt(6 * 3 * 2 * 1) = 6."),
        ("example-testing", "It matches."),
        ("adding-knowledge", "A triangle's area is half its base times its height."),
    ]
    assert {s.status for s in spans} == {"ok"}


def test_sentences_split_on_lines_and_keep_decimals():
    text = "  First line without stop\nx = 2.5 here. Next one!\n\n"
    assert [text[a:b] for a, b in sentences(text)] == [
        "First line without stop", "x = 2.5 here.", "Next one!"]
    assert rules_annotate("") == []


def test_word_labels_take_the_span_covering_most_of_a_word():
    text = "ab cd ef gh"
    spans = [Span("deduction", 0, 4, "ok", ""), Span("backtracking", 4, 8, "ok", ""),
             Span("example-testing", 9, 11, "unaligned", "")]
    # "cd" has one character in each span: the first found keeps it.
    assert word_labels(text, spans) == ["deduction", "deduction", "backtracking", "none"]


def test_agreement_against_hand_computed_values():
    reference = ["deduction", "deduction", "backtracking", "none"]
    predicted = ["deduction", "backtracking", "backtracking", "deduction"]
    result = agreement(reference, predicted)
    assert result.f1["deduction"] == pytest.approx(0.5)        # 2·1 / (2 + 2)
    assert result.f1["backtracking"] == pytest.approx(2 / 3)   # 2·1 / (2 + 1)
    assert result.precision["backtracking"] == pytest.approx(0.5)
    assert result.recall["deduction"] == pytest.approx(0.5)
    assert result.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    # observed 2/4; expected (2·2 + 1·2 + 1·0) / 16 = 6/16
    assert result.kappa == pytest.approx((0.5 - 0.375) / (1 - 0.375))
    assert agreement(reference, reference).kappa == pytest.approx(1.0)
    with pytest.raises(ValueError):
        agreement(reference, predicted[:2])


@requires_shared()
def test_rules_agreement_on_thinking_models_is_measured():
    # Recorded in bench/results/agreement.txt: 0.603 and 0.554.
    for name, floor in [("deepseek-r1-distill-llama-8b", 0.60), ("deepseek-r1-distill-qwen-14b", 0.55)]:
        result = file_agreement(ANNOTATED_CHAINS / f"{name}.json", rules_annotate)
        assert result.macro_f1 >= floor
        assert result.kappa > 0.3
        assert result.words > 50_000


@requires_shared()
def test_cli_prints_agreement():
    path = ANNOTATED_CHAINS / "deepseek-r1-distill-llama-8b.json"
    result = CliRunner().invoke(cli, ["annotate", "--agreement", str(path)])
    assert result.exit_code == 0, result.output
    assert "rules vs deepseek-r1-distill-llama-8b.json" in result.output
    assert "macro-F1" in result.output and "Cohen's kappa" in result.output


@requires_shared()
def test_rules_ceiling_script_reproduces_the_readme_figures():
    """analysis/rules_ceiling.py: its rules figure is the agreement module's, and a classifier
    learnt from the Llama-8B file stays below 0.6 on the Qwen-14B file (docs/benchmarks.md)."""
    train, test = (ANNOTATED_CHAINS / f"{name}.json" for name in
                   ("deepseek-r1-distill-llama-8b", "deepseek-r1-distill-qwen-14b"))
    script = Path(__file__).resolve().parents[1] / "analysis" / "rules_ceiling.py"
    result = subprocess.run([sys.executable, str(script), str(train), str(test), "--l2", "0.003"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = dict(re.findall(r"^(rules annotator|its sentences|classifier).*?macro-F1\D*([01]\.\d{3})",
                              result.stdout, re.M))
    assert float(figures["rules annotator"]) == pytest.approx(
        file_agreement(test, rules_annotate).macro_f1, abs=5e-4)
    assert float(figures["its sentences"]) > 0.98
    assert 0.5 < float(figures["classifier"]) < 0.6


def test_agreement_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"response": "x"}]')
    with pytest.raises(BadInput, match="record 0 lacks thinking_process"):
        file_agreement(bad, rules_annotate)
    bad.write_text("{")
    result = CliRunner().invoke(cli, ["annotate", "--agreement", str(bad)])
    assert result.exit_code == 2 and "bad.json: not a readable JSON file" in result.output
