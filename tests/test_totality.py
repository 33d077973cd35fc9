"""The grader and the annotators' parsers are total: any string gets a result, in bounded
time, without an exception (property-based, with hypothesis), and the inputs that once
recursed or ran for minutes finish at once."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nnsteer.annotation.rules import rules_annotate
from nnsteer.annotation.spans import parse_annotation
from nnsteer.evaluation.grader import final_segment, grade_offline
from nnsteer.labels import OK, UNALIGNED, UNKNOWN_LABEL

#: Pieces that steer the parsers into their deeper paths: tags, braces, boxes, operators,
#: "answer is", cue words, digits and whitespace.
PIECES = ["[", "]", '"', "'", "(", ")", "{", "}", "\\", "-", "−", "+", "*", "/", "^", ".", ",",
          ";", ":", "?", "!", " ", "\n", "\n\n", "0", "1", "7", "9", "x", "A", "b", "e",
          "\\boxed{", "\\frac{1}{2}", "answer is ", "Answer: ", '["deduction"]', "[backtracking]",
          '["end-section"]', "[1. adding-knowledge]", "Wait, ", "Let me check. ", "2 + 3 = 5",
          "yes", "no", "(C)", "Hmm, ", "I am not sure.", "e.g. ", "1,000", "3.25"]
TEXTS = st.text() | st.lists(st.sampled_from(PIECES), max_size=1500).map("".join)
#: Every example finishes within this (the property's time bound), on a busy machine.
BOUND = timedelta(seconds=5)
PROPERTY = settings(max_examples=150, deadline=BOUND,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(TEXTS, TEXTS)
@example("The answer is " + "-" * 1000 + "6", "6")
@example("The answer is (-8)^(0.5)", "2")
@example("1+" * 5000 + "1", "1+" * 400 + "1")
def test_grade_offline_is_total(answer, reference):
    assert grade_offline(answer, reference) in (True, False, None)
    assert isinstance(final_segment(answer), str)


@PROPERTY
@given(TEXTS, TEXTS)
@example('["deduction"]' * 3000, "x" * 3000)
def test_parse_annotation_is_total(reply, text):
    for span in parse_annotation(reply, text):
        if span.status == UNALIGNED:
            assert span.start == span.end == -1
        else:
            assert span.status in (OK, UNKNOWN_LABEL)
            assert 0 <= span.start <= span.end <= len(text)


@PROPERTY
@given(TEXTS)
def test_rules_annotator_is_total(text):
    for span in rules_annotate(text):
        assert span.status == OK and text[span.start:span.end] == span.text and span.text.strip()


def _placed(n: int, length: int) -> tuple[str, str]:
    """A reply of ``n`` parts of ``length`` words, each a rewording of the text."""
    words = ["alpha", "beta", "gamma", "delta", "x", "2", "="]
    text = " ".join(words[(i * 7 + i // 3) % len(words)] for i in range(20 * n))
    part = " ".join(words[(i * 5 + i // 2) % len(words)] for i in range(length))
    return "".join(f'["deduction"]{part}["end-section"]' for _ in range(n)), text


@pytest.mark.parametrize("name, call", [
    ("a thousand minus signs", lambda: grade_offline("The answer is " + "-" * 1000 + "6", "6")),
    ("a hundred thousand minus signs",
     lambda: grade_offline("The answer is " + "-" * 100_000 + "6", "6")),
    ("a long sum", lambda: grade_offline("1+" * 100_000 + "1", "6")),
    ("a long sum as the reference", lambda: grade_offline("6", "1+" * 100_000 + "1")),
    ("open boxes", lambda: final_segment("\\boxed{" * 100_000)),
    ("long arithmetic sentences", lambda: rules_annotate("Okay.\n\nSo.\n\n" + "1 + 2 " * 100_000)),
    ("long reworded parts", lambda: parse_annotation(*_placed(40, 700))),
    ("reworded parts as long as fuzzy matching takes", lambda: parse_annotation(*_placed(40, 300))),
    ("short reworded parts", lambda: parse_annotation(*_placed(400, 30))),
    ("many bracketed words", lambda: parse_annotation("[word] x " * 20_000, "y " * 100_000)),
])
def test_worst_inputs_finish_in_bounded_time(name, call):
    start = time.monotonic()
    call()
    assert time.monotonic() - start < BOUND.total_seconds(), name
