"""The offline ``rules`` annotator: one label per sentence from its wording and position.

Used when no LLM is available. Each sentence is matched against cue patterns in a fixed
order (backtracking, uncertainty-estimation, example-testing, adding-knowledge); the
opening sentences of a chain, and an early sentence that plans the approach, are
``initializing``; worked arithmetic ("2 + 3 = 5") is ``example-testing``; a general,
unhedged statement with no first person and no calculation is ``adding-knowledge``; a
sentence without cues that follows an example in the same paragraph continues it, as does
a short fragment ("Not 20.") any label; everything else is ``deduction``.
Its word-level agreement with GPT-4-class annotations is measured by
:mod:`nnsteer.annotation.agreement` (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import re

from nnsteer.annotation.spans import Span
from nnsteer.labels import OK

#: Sentences of the first paragraph, up to this many, are ``initializing``.
OPENING_SENTENCES = 2
#: A sentence that plans the approach ("Let me break it down step by step") among this
#: many opening sentences is ``initializing`` too.
PLANNING_SENTENCES = 10
_PLANNING = re.compile(r"step by step|^let me (start|begin|break)\b|how to approach", re.I)

_SENTENCE = re.compile(r"[^\n]*?(?:[.!?](?=\s)|[.!?]$|\n|$)")
_CUES: list[tuple[str, re.Pattern]] = [
    ("backtracking", re.compile(
        r"^(wait|oh|no|actually|alternatively)\b[,.!]?\s*(no\b|(but )?maybe|perhaps|actually|"
        r"i think|another|i (made|was|need to|should) (i )?(re|go|mis|wrong)|"
        r"that's (not|wrong)|let me (re|go back|start|try (again|another|a different))|"
        r"going back|i (mis|made a mistake))"
        r"|^(on second thought|scratch that|that's not right|no, wait)"
        r"|let me (reconsider|rethink|re-?evaluate|re-?examine|go back|start over|"
        r"try again|try (another|a different)|think (again|differently))"
        r"|i (made a mistake|was wrong|think i (made|messed))"
        r"|\bi (must|might) have (made|miscalculated|misread|misunderstood)", re.I)),
    ("uncertainty-estimation", re.compile(
        r"not (sure|certain|entirely)|i('m| am) (confused|unsure|uncertain|not)|i wonder|"
        r"i (don't|do not) (know|remember|think)|is that (right|correct)|does that make sense|"
        r"might be wrong|could be wrong|i('m| am) (getting|going in circles)|"
        r"\b(stuck|confusing)\b|\bi('m| am) (overcomplicating|overthinking|missing)|"
        r"\bi (might|may) (be|have) (wrong|mistaken|missed|missing)|"
        r"\b(unclear|uncertain|unsure|doubt)|"
        # A yes/no question to oneself.
        r"^(is|does|do|could|would|can|should|are|am|was|did|or) .*\?$|"
        r"^(but|wait|hmm+)\b[,.]?\s*(wait\b|but\b|that|is|does|how|what|why|i'm|i don't|"
        r"maybe|would|could|isn't|doesn't|am i|then|no\b)", re.I)),
    ("example-testing", re.compile(
        r"for (example|instance)|e\.g\.|let('s| me| us) (test|try|plug|take|pick|say|"
        r"use|consider (an? )?(example|case|specific))|"
        r"^(suppose|say|imagine|if i (take|try|pick|use)|like,? (if|a|an|the|when|maybe)|"
        r"take|testing|test|checking|check|trying|starting with)\b|"
        r"\b(plug(ging)? in|with (x|n|k|a|b) ?= ?-?\d|"
        r"i'?ll try|try(ing)? with)\b|\bwhat if\b|"
        r"\bif (i|we) (take|try|use|pick|choose|set|plug)\b|"
        r"^(first|next|now|then|so|okay),? (take|try|consider|let's (take|try|say)|"
        r"let me (take|try|pick))\b|"
        # Substituting a number: "If the first number is 2, ...", "n = 3: ...".
        r"^if (the|a|an|we|i|he|she|it|[a-z])\b.*\b(is|are|=)\s*-?\d|"
        r"^[-*]?\s*\(?[a-z]\w{0,3} ?= ?-?\d+\)?[:,]|"
        # Worked arithmetic: "2 + 3 = 5", a LaTeX line "\( 1 \times 2 = 2 \)".
        r"\d\s*[×*/+−-]\s*\(?-?\d[^=]*=\s*-?\d|^\\[(\[]", re.I)),
    ("adding-knowledge", re.compile(
        r"\bi (remember|recall|know|learned|read)|"
        r"\bi('ve| have) (also )?(heard|read|learned|seen)|"
        r"\bin (many|some|most) (places|countries|cases|cultures)\b|"
        # A fact checked with a tag question ("..., right?") or a generic "A cell is ...".
        r", right\?$|^(a|an) [a-z]+ (is|are|has|can)\b|"
        r"\b(oh|ah),? right\b|\b(the formula|the definition|is defined as|by definition|"
        r"according to|is known as|is called|it's (known|a fact)|well[- ]known|"
        r"theorem|the law of|the rule (is|of|for)|in general,|typically|usually|"
        r"are known (to|for)|refers to|is a (type|kind|form|measure|unit|process) of)\b", re.I)),
]

#: A general statement: no opening connective or definite article, no first or second
#: person, no question, no hedge.
_STATEMENT = re.compile(
    r"^(?!(so|therefore|thus|then|that|this|which|hence|but|and|or|if|maybe|perhaps|now|"
    r"next|first|finally|wait|hmm|okay|alright|let|the)\b)"
    r"(?!.*\b(i|i'm|i'll|i've|me|my|we|we're|let's|us|our|you)\b)(?!.*\?)"
    r"(?!.*\b(maybe|perhaps|might|could|should|would|probably)\b)"
    r".*\b(is|are|has|have|was|were|uses?|can|means|contains?|consists?)\b", re.I)
_CALCULATION = re.compile(r"[=×*/+]\s*\d")
#: A sentence is labelled from its first this many characters (keeps every cue's search
#: linear in the chain's length whatever its sentences look like).
MAX_SENTENCE_CHARS = 2_000
#: Labels a cue-less sentence inherits from the sentence before it in a paragraph.
_CONTINUED = ("example-testing",)
#: A cue-less fragment of at most this many words continues any label before it.
FRAGMENT_WORDS = 3


def sentences(text: str) -> list[tuple[int, int]]:
    """Character ranges of the sentences of ``text`` (stripped of surrounding whitespace)."""
    ranges = []
    for match in _SENTENCE.finditer(text):
        start, end = match.start(), match.end()
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            ranges.append((start, end))
    return ranges


def label_sentence(sentence: str, index: int, in_first_paragraph: bool,
                   previous: str | None = None) -> str:
    """The label of one sentence from its cues, its place in the chain, and the label of
    the sentence before it in the same paragraph (``previous``, None at a paragraph start).
    Only its first :data:`MAX_SENTENCE_CHARS` characters are read."""
    sentence = sentence[:MAX_SENTENCE_CHARS]
    if (in_first_paragraph and index < OPENING_SENTENCES
            or index < PLANNING_SENTENCES and _PLANNING.search(sentence)):
        return "initializing"
    for label, cue in _CUES:
        if cue.search(sentence):
            return label
    if _STATEMENT.search(sentence) and not _CALCULATION.search(sentence):
        return "adding-knowledge"
    if previous in _CONTINUED or (previous and len(sentence.split()) <= FRAGMENT_WORDS):
        return previous
    return "deduction"


def rules_annotate(text: str) -> list[Span]:
    """One ``ok`` span per sentence of ``text``, labelled by :func:`label_sentence`."""
    paragraph_end = text.find("\n\n", len(text) - len(text.lstrip()))
    if paragraph_end < 0:
        paragraph_end = len(text)
    spans: list[Span] = []
    for index, (start, end) in enumerate(sentences(text)):
        previous = spans[-1] if spans and "\n\n" not in text[spans[-1].end:start] else None
        sentence = text[start:end]
        label = label_sentence(sentence, index, start < paragraph_end,
                               previous.label if previous else None)
        spans.append(Span(label, start, end, OK, sentence))
    return spans
