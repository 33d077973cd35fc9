"""Is a chain's final answer right? An offline grader, or an LLM judge.

``offline`` (:func:`grade_offline`) reads the reference answer's form and checks the
final answer (:func:`final_segment`: the last ``\\boxed{}``, else what follows the last
"answer is" / "answer:", else the last non-empty line):

- a number, with or without a unit (``"3 hours"``, ``"1,000"``, ``"-2.5 kg"``), a fraction
  (``"9/19"``) or a simple arithmetic expression (``"2^10"``, ``"3*4+1"``): some number in
  the final answer equals it, exactly for an integer written there, else within
  ``tolerance`` (relative) or half a unit of its last written decimal (``0.33`` for ``1/3``);
- yes / no (true / false): the first such word of the final answer;
- a multiple-choice letter (``"C"``, ``"(b)"``): the first letter in brackets there,
  else the last standalone capital;
- a short string (at most :data:`MAX_WORDS` words): it appears, normalised (case,
  punctuation, articles), as whole words in the normalised final answer.

A reference of several parts joined by ``;`` needs every part. Longer free-text
references are not graded offline (None); ``openai:<model>`` grades them with an LLM
judge that uses the LLM annotator's client, cache, reply validation and retries
(:mod:`nnsteer.annotation.llm`) and the prompt in ``nnsteer/data/grader_prompt.txt``.
A chain with no answer is wrong; a task with no reference answer gets None.

The offline grader is total: any answer and any reference get a verdict or None, in time
and memory bounded by :data:`MAX_ANSWER_CHARS`, :data:`MAX_REFERENCE_CHARS` and
:data:`MAX_EXPRESSION_CHARS`, without recursion.

Example:
    >>> grade_offline("So she has 7 cows.", "7")
    True
"""

from __future__ import annotations

import ast
import hashlib
import math
import operator
import re
from collections.abc import Sequence
from pathlib import Path

from nnsteer.annotation.llm import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    Failed,
    LLMAnnotator,
    ask_all,
)
from nnsteer.errors import BadInput, say
from nnsteer.package_data import package_path

OFFLINE = "offline"
#: Longest reference (in words) the offline grader compares as a short string.
MAX_WORDS = 5
#: Default relative tolerance of a numeric comparison.
TOLERANCE = 1e-3
#: The grader reads the last this many characters of an answer text (the final answer is at its end).
MAX_ANSWER_CHARS = 20_000
#: A longer reference is free text: not graded offline.
MAX_REFERENCE_CHARS = 1_000
#: Longest text read as an arithmetic expression.
MAX_EXPRESSION_CHARS = 200
PROMPT_FILE = "grader_prompt.txt"
VERDICTS = {"CORRECT": True, "INCORRECT": False}

_NUMBER = r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?:\s*/\s*\d+(?:\.\d+)?)?(?![\d])")
_UNIT = re.compile(r"^[A-Za-z%$€£°][\w%°]*(?:\s+[A-Za-z]+){0,3}$")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_BRACES = re.compile(r"\\boxed\{|[{}]")
_ANSWER_IS = re.compile(r"(?i)\banswer\s*(?:is|:)\s*:?\s*(.+)")
_YES_NO = {"yes": "yes", "no": "no", "true": "yes", "false": "no"}
_ARTICLES = {"a", "an", "the"}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.Pow: operator.pow}


def resolve_grader(grader: str) -> str:
    """``offline`` or ``openai:<model>``; :class:`BadInput` for anything else."""
    if grader == OFFLINE or (grader.startswith("openai:") and grader.removeprefix("openai:")):
        return grader
    raise BadInput(f"--grader {grader!r}: expected 'offline' or 'openai:<model>'")


def final_segment(answer: str) -> str:
    """The final answer inside an answer text (its last :data:`MAX_ANSWER_CHARS`
    characters): the last ``\\boxed{}``, else the text after the last "answer is" /
    "answer:", else the last non-empty line."""
    answer = answer[-MAX_ANSWER_CHARS:]
    boxed = _last_boxed(answer)
    if boxed is not None:
        return boxed
    stated = _ANSWER_IS.findall(answer)
    if stated:
        return stated[-1]
    lines = [line for line in answer.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _last_boxed(text: str) -> str | None:
    """What the ``\\boxed{...}`` that closes last holds (braces balanced inside), or None."""
    found = None
    opened: list[tuple[int, bool]] = []  # (where its content starts, whether it is boxed)
    for match in _BRACES.finditer(text):
        if match.group() != "}":
            opened.append((match.end(), match.group() != "{"))
        elif opened:
            start, boxed = opened.pop()
            if boxed:
                found = text[start:match.start()]
    return found


def grade_offline(answer: str, reference: str | None, tolerance: float = TOLERANCE) -> bool | None:
    """Whether ``answer`` (an answer text) gives ``reference``; None if the reference is
    missing or free text the offline grader cannot check."""
    if not reference or not reference.strip() or len(reference) > MAX_REFERENCE_CHARS:
        return None
    segment = final_segment(answer)
    verdicts = [_grade_part(segment, part.strip(), tolerance) for part in reference.split(";")]
    return None if None in verdicts else all(verdicts)


def gradable_offline(reference: str | None) -> bool:
    """Whether :func:`grade_offline` can check answers against ``reference``."""
    return grade_offline("", reference) is not None


def _grade_part(segment: str, part: str, tolerance: float) -> bool | None:
    value = _reference_number(part)
    if value is not None:
        return any(_close(found, written, value, tolerance) for found, written in _numbers(segment))
    words = _normalise(part).split()
    if len(words) == 1 and words[0] in _YES_NO:
        said = [_YES_NO[w] for w in _normalise(segment).split() if w in _YES_NO]
        return bool(said) and said[0] == _YES_NO[words[0]]
    letter = re.fullmatch(r"\(?([A-Za-z])\)?", part)
    if letter:
        found = re.findall(r"\(([A-Za-z])\)", segment) or re.findall(r"\b([A-Z])\b", segment)[-1:]
        return bool(found) and found[0].lower() == letter.group(1).lower()
    if 0 < len(words) <= MAX_WORDS:
        return f" {' '.join(words)} " in f" {_normalise(segment)} "
    return None


def _reference_number(part: str) -> float | None:
    """The value of a reference that is a number with an optional unit, or an expression."""
    text = part.replace("−", "-").strip()
    expression = _evaluate(text)
    if expression is not None:
        return expression
    match = re.match(rf"^(?:about\s+|~\s*|\$\s*)?({_NUMBER}(?:\s*/\s*\d+)?)\s*(.*)$", text)
    if match and (not match.group(2) or _UNIT.match(match.group(2))):
        return _number(match.group(1))
    return None


def _evaluate(text: str) -> float | None:
    """The value of an arithmetic expression of numbers, ``+ - * / ^ ( )``, of at most
    :data:`MAX_EXPRESSION_CHARS` characters; else None."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    text = _FRAC.sub(r"(\1)/(\2)", text).replace("^", "**").replace("×", "*").replace("÷", "/")
    if not re.fullmatch(r"[\d\s.+\-*/()]+", text) or not re.search(r"\d", text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    return _value(tree)


def _value(root: ast.AST) -> float | None:
    """The real value of an arithmetic syntax tree, evaluated with a stack of its own (no
    recursion); None if it is not arithmetic, not real, or overflows."""
    values: list[float] = []
    stack: list[tuple[ast.AST, bool]] = [(root, False)]
    while stack:
        node, operands_done = stack.pop()
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            try:
                values.append(float(node.value))
            except OverflowError:
                return None
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            if not operands_done:
                stack += [(node, True), (node.operand, False)]
            elif isinstance(node.op, ast.USub):
                values.append(-values.pop())
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            if not operands_done:
                stack += [(node, True), (node.right, False), (node.left, False)]
                continue
            right, left = values.pop(), values.pop()
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                return None
            try:
                result = _OPERATORS[type(node.op)](left, right)
            except (ZeroDivisionError, OverflowError, ValueError):
                return None
            if not isinstance(result, float):  # a negative number to a fractional power
                return None
            values.append(result)
        else:
            return None
    return values[0]


def _number(text: str) -> float:
    text = text.replace(",", "").replace("−", "-").replace(" ", "")
    if "/" in text:
        numerator, denominator = text.split("/")
        return float(numerator) / float(denominator) if float(denominator) else math.nan
    return float(text)


def _numbers(segment: str) -> list[tuple[float, str]]:
    """Every number written in ``segment`` (fractions and ``\\frac`` included), with its text."""
    segment = _FRAC.sub(r"\1/\2", segment)
    found = [(_number(m.group(0)), m.group(0)) for m in _NUMBER_RE.finditer(segment)]
    whole = _evaluate(segment)
    return found + ([(whole, segment)] if whole is not None else [])


def _close(found: float, written: str, reference: float, tolerance: float) -> bool:
    if math.isnan(found):
        return False
    decimals = re.search(r"\.(\d+)$", written.strip())
    slack = 0.5 * 10 ** -len(decimals.group(1)) if decimals and "/" not in written else 0.0
    return abs(found - reference) <= max(tolerance * abs(reference), slack) or found == reference


def _normalise(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text.lower().replace("'", "")).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def _guarded_grade(answer: str, reference: str | None) -> bool | None:
    """:func:`grade_offline`, None (ungraded, said in one line) should it ever fail: one
    answer never stops a stage."""
    try:
        return grade_offline(answer, reference)
    except Exception as exc:  # grade_offline is total by construction; this is a backstop
        say(f"the offline grader could not grade an answer ({type(exc).__name__}); left ungraded")
        return None


# --- grading chains -------------------------------------------------------------------------


def judge_prompt() -> str:
    """The LLM judge's prompt (``{question}``, ``{reference}``, ``{answer}`` are filled in)."""
    return package_path("nnsteer", "data", PROMPT_FILE).read_text()


class LLMJudge(LLMAnnotator):
    """The LLM annotator's client, cache and retries, asking for a one-word verdict."""

    def __init__(self, model: str, **options) -> None:
        super().__init__(model, **options)
        self.template = judge_prompt()
        self.prompt_key = f"g{hashlib.sha256(self.template.encode()).hexdigest()[:16]}"

    def messages(self, text: str) -> list[dict[str, str]]:
        """The Chat Completions messages for a filled judge prompt: ``text`` as the one user turn."""
        return [{"role": "user", "content": text}]

    def judge(self, text: str) -> bool | Failed:
        """The verdict on a filled prompt; a reply other than CORRECT / INCORRECT is refused."""
        def accept(reply: str) -> tuple[bool | None, str | None]:
            word = reply.strip().strip(".*!\"'` ").upper()
            if word in VERDICTS:
                return VERDICTS[word], None
            return None, "reply is neither CORRECT nor INCORRECT"

        return self.ask(text, accept)

    def fill(self, question: str, reference: str, answer: str) -> str:
        """The judge prompt with the task's question, its reference answer and the chain's answer."""
        return (self.template.replace("{question}", question).replace("{reference}", reference)
                .replace("{answer}", answer))


def grade_answers(
    answers: Sequence[str], references: Sequence[str | None], questions: Sequence[str], *,
    grader: str = OFFLINE, base_url: str | None = None, workers: int = 8,
    cache_dir: Path | None = None, retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT, progress: bool = False,
) -> list[bool | None]:
    """Per chain: whether its answer text gives its task's reference answer.

    An empty answer is wrong (False); a missing reference, an answer the offline grader
    cannot check, or one the LLM judge failed on is None (the judge's failures are said
    in one line).
    """
    grader = resolve_grader(grader)
    grades: list[bool | None] = [None if not ref else False for ref in references]
    asked = [i for i, (answer, ref) in enumerate(zip(answers, references)) if ref and answer.strip()]
    if grader == OFFLINE:
        for i in asked:
            grades[i] = _guarded_grade(answers[i], references[i])
        return grades
    judge = LLMJudge(grader.removeprefix("openai:"), base_url=base_url, cache_dir=cache_dir,
                     max_retries=retries, timeout=timeout)
    texts = [judge.fill(questions[i], references[i], answers[i]) for i in asked]
    verdicts = ask_all(judge, texts, judge.judge, workers=workers, progress=progress,
                       desc=f"grade ({grader})")
    failed = [v for v in verdicts if isinstance(v, Failed)]
    for i, verdict in zip(asked, verdicts):
        grades[i] = None if isinstance(verdict, Failed) else verdict
    if failed:
        say(f"the {grader} grader failed on {len(failed)} of {len(texts)} answers, left "
            f"ungraded (first: {failed[0].reason})")
    return grades
