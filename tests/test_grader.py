"""The grader: the offline rules on a table of answer forms, and the LLM judge through a
real openai client against a local server."""

from __future__ import annotations

import re

import pytest
from fake_llm import FakeLLM

from nnsteer.errors import BadInput
from nnsteer.evaluation.grader import (
    final_segment,
    gradable_offline,
    grade_answers,
    grade_offline,
    resolve_grader,
)

#: (model's answer text, reference, expected grade)
TABLE = [
    # integers, units, thousands separators
    ("So she has 7 cows.", "7", True),
    ("So she has 8 cows.", "7", False),
    ("The answer is 7 cows and 23 chickens.", "7", True),
    ("It takes 3 hours.", "3 hours", True),
    ("It takes 3.5 hours.", "3 hours", False),
    ("Total: 1,000 dollars", "1000", True),
    ("Total: $1,250,000.", "1,250,000 dollars", True),
    ("He paid 400 dollars.", "400 dollars", True),
    ("Final answer: -2.5 kg", "−2.5 kg", True),
    # decimals and tolerance, fractions, expressions
    ("The ratio is about 14.7.", "14.7", True),
    ("The ratio is about 14.2.", "14.7", False),
    ("The probability is 1/3.", "1/3", True),
    ("The probability is 0.333.", "1/3", True),
    ("The probability is 0.33.", "1/3", True),
    ("The probability is 0.4.", "1/3", False),
    ("So the answer is \\boxed{\\frac{2}{3}}.", "2/3", True),
    ("There are 1024 subsets.", "2^10", True),
    ("It equals 13.", "3*4+1", True),
    ("The two answers: 50 and 10", "50; 10", True),
    ("The two answers: 50 and 11", "50; 10", False),
    # yes / no
    ("Yes, every square is a rectangle.", "Yes", True),
    ("No, not every one.", "Yes", False),
    ("That is false.", "No", True),
    # multiple-choice letters
    ("The answer is (C).", "C", True),
    ("The answer is B.", "C", False),
    ("I choose (b).", "(b)", True),
    # short strings, normalised
    ("It was Tuesday.", "Tuesday", True),
    ("The answer: a postage stamp!", "A postage stamp", True),
    ("The answer: a stamp collection", "A postage stamp", False),
    ("Answer: A is a knight and B is a knave.", "A is a knight and B is a knave", None),  # 8 words
    # no reference, no answer
    ("Anything", None, None),
    ("Anything", "  ", None),
]


@pytest.mark.parametrize("answer, reference, expected", TABLE)
def test_offline_grader_on_answer_forms(answer, reference, expected):
    assert grade_offline(answer, reference) is expected


def test_final_segment_prefers_boxed_then_answer_is_then_last_line():
    assert final_segment("x \\boxed{5} then \\boxed{6} answer is 7") == "6"
    assert final_segment("first answer is 3.\nso the answer: 4\nthanks") == "4"
    assert final_segment("one\n\ntwo\n") == "two"


def test_free_text_references_are_not_gradable_offline():
    assert gradable_offline("7")
    assert not gradable_offline("Women applied more to competitive departments (Simpson's paradox)")
    assert not gradable_offline(None)


def test_grade_answers_offline_marks_empty_answers_wrong():
    grades = grade_answers(["7 cows", "", "Tuesday", "x"], ["7", "7", "Monday", None], ["q"] * 4)
    assert grades == [True, False, False, None]
    with pytest.raises(BadInput, match="--grader"):
        resolve_grader("gpt-4o")


class _Judge(FakeLLM):
    """Replies CORRECT when the reference is a word-for-word part of the model's answer,
    else INCORRECT; ``"chatty"`` replies with neither verdict."""

    def answer(self, body, n, key):
        text = body["messages"][-1]["content"]
        reference = re.search(r"Reference answer:\n(.*)\n", text).group(1)
        answer = re.search(r"final answer:\n(.*)\n", text).group(1)
        verdict = "CORRECT" if reference.lower() in answer.lower() else "INCORRECT"
        if self.mode == "garbage":
            verdict = "I think the answer is plausible."
        return 200, {"id": f"r{n}", "object": "chat.completion", "created": 0,
                     "model": body["model"], "choices": [{
                         "index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": verdict}}]}


def test_llm_judge_through_the_annotator_client_and_cache(tmp_path, capsys):
    server = _Judge()
    try:
        answers = ["It is Tuesday.", "It is Monday.", "", "Trophic cascade, yes"]
        references = ["Tuesday", "Tuesday", "Tuesday", None]
        options = dict(grader="openai:judge", base_url=server.url, cache_dir=tmp_path, workers=2)
        grades = grade_answers(answers, references, ["Which day?"] * 4, **options)
        assert grades == [True, False, False, None]
        assert server.requests == 2  # no request for an empty answer or a missing reference
        assert grade_answers(answers, references, ["Which day?"] * 4, **options) == grades
        assert server.requests == 2  # cached
        server.mode = "garbage"
        grades = grade_answers(["Tuesday!"], ["Tuesday"], ["Which day?"], **options)
        assert grades == [None] and server.requests == 4  # asked twice, then left ungraded
        assert "failed on 1 of 1" in capsys.readouterr().err
    finally:
        server.close()
