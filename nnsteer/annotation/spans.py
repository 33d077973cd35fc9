"""Behaviour spans and the parser of an annotator's reply, below every annotator.

An annotator names parts of a chain's reasoning in the paper's format
``["label"] text ["end-section"]``; :func:`parse_annotation` places every part on the
original characters, in order, never reusing a character. What cannot be placed is kept
with status ``unaligned`` (``start = end = -1``); a label outside
:data:`nnsteer.labels.LABELS` is kept with status ``unknown-label``. Nothing is guessed.

The parser is total: any reply and any text give a list of spans, without recursion, in
time linear in their lengths plus fixed budgets for the searches that are not: the
look-ups beyond a part's neighbourhood (:data:`FAR_BUDGET`) and the fuzzy ones
(:data:`FUZZY_BUDGET`).
"""

from __future__ import annotations

import bisect
import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from nnsteer.labels import LABELS, OK, UNALIGNED, UNKNOWN_LABEL

END_SECTION = "end-section"
#: Minimum similarity (difflib ratio on letters and digits) for a fuzzy placement.
FUZZY_THRESHOLD = 0.8
#: Characters one reply's look-ups beyond a part's neighbourhood may scan in all; once
#: spent, parts are looked up near the cursor only.
FAR_BUDGET = 200_000_000
#: Character pairs one reply's fuzzy look-ups may compare in all (a few seconds at most; one
#: part of :attr:`_Aligner.FUZZY_MAX` characters fits).
FUZZY_BUDGET = 20_000_000

@dataclass(frozen=True)
class Span:
    """One annotated part: ``text[start:end]`` carries ``label``.

    ``status`` is ``ok``, ``unaligned`` (not found in the text: ``start = end = -1``) or
    ``unknown-label`` (placed, but the label is not one of the six). ``text`` is what the
    annotator wrote for the part.
    """

    label: str
    start: int
    end: int
    status: str
    text: str


# --------------------------------------------------------------------------- parsing

_TAG = re.compile(r"\[\s*([\"'“”‘’]?)([^\[\]\n]{1,80}?)[\"'“”‘’]?\s*\]")
_NUMBERING = re.compile(r"^\(?\d+[.):]?\s*")
_LABEL_WORD = re.compile(r"^[a-z]+(?:-[a-z]+)*$")


def _normal_label(body: str) -> str:
    """``'1. Adding knowledge'`` → ``'adding-knowledge'``."""
    body = _NUMBERING.sub("", body.strip().strip("\"'“”‘’").strip()).lower()
    return re.sub(r"[\s_]+", "-", body)


def _tag_labels(match: re.Match, in_text: set[str]) -> list[str] | None:
    """The labels a bracket names, or None if it is chain text (``\\[ x \\]``, ``[blank]``;
    ``in_text``: the brackets of the chain's text)."""
    quoted = bool(match.group(1))
    pieces = [_normal_label(p) for p in re.split(r"[\"'“”‘’]?\s*,\s*[\"'“”‘’]?", match.group(2))]
    if all(p in LABELS or p == END_SECTION for p in pieces):
        return pieces
    if quoted and all(_LABEL_WORD.match(p) for p in pieces):
        return pieces
    # A bare word in brackets is a label the annotator invented unless the chain has it.
    if len(pieces) == 1 and _LABEL_WORD.match(pieces[0]) and match.group(0) not in in_text:
        return pieces
    return None


@dataclass
class _Part:
    """An annotator's part before alignment: its labels and its text."""

    labels: list[str]
    text: str = ""


def _split_parts(annotated: str, text: str) -> list[_Part]:
    """Labelled parts in order; a part ends at ``end-section``, the next label, or the end."""
    parts: list[_Part] = []
    open_part: _Part | None = None
    cursor = 0
    # A bracket without brackets inside occurs in the text exactly where the pattern finds it.
    in_text = {m.group(0) for m in _TAG.finditer(text)}
    for match in _TAG.finditer(annotated):
        labels = _tag_labels(match, in_text)
        if labels is None:
            continue
        if open_part is not None:
            open_part.text += annotated[cursor:match.start()]
        cursor = match.end()
        for label in labels:
            if label == END_SECTION:
                open_part = None
            elif open_part is not None and not open_part.text.strip():
                open_part.labels.append(label)  # several labels on one part
            else:
                open_part = _Part([label])
                parts.append(open_part)
    if open_part is not None:
        open_part.text += annotated[cursor:]
    return parts


# ------------------------------------------------------------------------- alignment

class _Projection:
    """The characters of ``text`` that ``keep`` accepts, with their original indices."""

    def __init__(self, text: str, keep: Callable[[str], bool]) -> None:
        self.keep = keep
        self.index = [i for i, c in enumerate(text) if keep(c)]
        self.chars = "".join(_fold(text[i]) for i in self.index)

    def at(self, cursor: int) -> int:
        """Projected position of the first kept character at or after ``cursor``."""
        return bisect.bisect_left(self.index, cursor)

    def span(self, start: int, end: int) -> tuple[int, int]:
        """Original ``[start, end)`` of projected ``[start, end)``."""
        return self.index[start], self.index[end - 1] + 1


def _fold(c: str) -> str:
    low = c.lower()
    return low if len(low) == 1 else c


def _not_space(c: str) -> bool:
    return not c.isspace()


class _Aligner:
    """Places parts on ``text`` in order, never reusing a character.

    Near the cursor (within ``max(len(part), NEAR)`` characters) a part is looked up
    exactly, then ignoring whitespace, then on letters and digits only, then fuzzily;
    only if all fail is it looked up (not fuzzily) further on. Looking near first keeps a
    slightly edited part from jumping to a later verbatim repetition of the chain. The
    look-ups further on and the fuzzy ones stop once their budgets are spent.
    """

    NEAR = 200
    #: Parts with more letters and digits than this (a degenerate reply) are not matched fuzzily.
    FUZZY_MAX = 1500

    def __init__(self, text: str, threshold: float = FUZZY_THRESHOLD) -> None:
        self.text = text
        self.threshold = threshold
        self.cursor = 0
        self.no_space = _Projection(text, _not_space)
        self.alnum = _Projection(text, str.isalnum)
        self.far_left = FAR_BUDGET
        self.fuzzy_left = FUZZY_BUDGET

    def place(self, part: str) -> tuple[int, int] | None:
        """Character range of ``part`` after the cursor, or None; advances the cursor."""
        near = self.cursor + max(len(part), self.NEAR)
        found = (self._exact(part, near) or self._projected(part, self.no_space, near)
                 or self._widen(self._projected(part, self.alnum, near), part)
                 or self._widen(self._fuzzy(part), part)
                 or self._far(part))
        if found is not None:
            self.cursor = found[1]
        return found

    def _far(self, part: str) -> tuple[int, int] | None:
        """``part`` anywhere after the cursor (not fuzzily), while :data:`FAR_BUDGET` lasts."""
        cost = 3 * (len(self.text) - self.cursor)
        if cost > self.far_left:
            return None
        self.far_left -= cost
        return (self._exact(part) or self._projected(part, self.no_space)
                or self._widen(self._projected(part, self.alnum), part))

    def _exact(self, part: str, limit: int | None = None) -> tuple[int, int] | None:
        end = None if limit is None else limit + len(part)
        start = self.text.find(part, self.cursor, end)
        return (start, start + len(part)) if start >= 0 else None

    def _projected(self, part: str, proj: _Projection, limit: int | None = None,
                   ) -> tuple[int, int] | None:
        needle = "".join(_fold(c) for c in part if proj.keep(c))
        if not needle:
            return None
        end = None if limit is None else proj.at(limit) + len(needle)
        start = proj.chars.find(needle, proj.at(self.cursor), end)
        return proj.span(start, start + len(needle)) if start >= 0 else None

    def _fuzzy(self, part: str) -> tuple[int, int] | None:
        needle = "".join(_fold(c) for c in part if c.isalnum())
        if not 8 <= len(needle) <= self.FUZZY_MAX:
            return None
        origin = self.alnum.at(self.cursor)
        hay = self.alnum.chars[origin: origin + 2 * len(needle) + self.NEAR]
        cost = 3 * len(hay) * len(needle)  # three comparisons below
        if cost > self.fuzzy_left:
            return None
        self.fuzzy_left -= cost
        matcher = difflib.SequenceMatcher(None, hay, needle, autojunk=False)
        anchor = matcher.find_longest_match(0, len(hay), 0, len(needle))
        if anchor.size < 4:
            return None
        lo = max(0, anchor.a - anchor.b - len(needle) // 4)
        hi = min(len(hay), anchor.a + len(needle) - anchor.b + len(needle) // 4)
        blocks = [b for b in difflib.SequenceMatcher(None, hay[lo:hi], needle, autojunk=False)
                  .get_matching_blocks() if b.size >= 3]
        if not blocks:
            return None
        start, end = lo + blocks[0].a, lo + blocks[-1].a + blocks[-1].size
        ratio = difflib.SequenceMatcher(None, hay[start:end], needle, autojunk=False).ratio()
        if ratio < self.threshold:
            return None
        return self.alnum.span(origin + start, origin + end)

    def _widen(self, found: tuple[int, int] | None, part: str) -> tuple[int, int] | None:
        """Take back the punctuation around the part that letters-and-digits matching drops."""
        if found is None:
            return None
        stripped = part.strip()
        lead = len(stripped) - len(re.sub(r"^[^\w\s]+", "", stripped))
        trail = len(stripped) - len(re.sub(r"[^\w\s]+$", "", stripped))
        start, end = found
        while lead and start > self.cursor and _is_punct(self.text[start - 1]):
            start, lead = start - 1, lead - 1
        while trail and end < len(self.text) and _is_punct(self.text[end]):
            end, trail = end + 1, trail - 1
        return start, end


def _is_punct(c: str) -> bool:
    return not c.isspace() and not c.isalnum()


def parse_annotation(annotated: str, text: str, threshold: float = FUZZY_THRESHOLD) -> list[Span]:
    """The spans of an annotator's ``["label"] part ["end-section"]`` reply, placed on ``text``.

    Tolerates quoted, bare or numbered labels (``["deduction"]``, ``[deduction]``,
    ``[1. deduction]``), a missing ``end-section``, several labels on one part (one span
    per label), and whitespace, markup or small wording changes. Parts are placed in
    order; a part that cannot be placed is ``unaligned`` with ``start = end = -1``.

    >>> parse_annotation('["deduction"]So x = 2.["end-section"]', "Hence. So x = 2.")
    [Span(label='deduction', start=7, end=16, status='ok', text='So x = 2.')]
    """
    aligner = _Aligner(text, threshold)
    spans = []
    for part in _split_parts(annotated, text):
        body = part.text.strip()
        found = aligner.place(body) if body else None
        for label in part.labels:
            if found is None:
                spans.append(Span(label, -1, -1, UNALIGNED, body))
            else:
                status = OK if label in LABELS else UNKNOWN_LABEL
                spans.append(Span(label, found[0], found[1], status, body))
    return spans
