"""Agreement between two annotations of the same texts, at word level.

The unit is the word (a maximal run of non-whitespace characters of the annotated text),
since the shared annotated chains carry no token ids. A word takes the label of the
``ok`` span that covers most of its characters, or ``none``. Reported: per-label
precision, recall and F1, macro-F1 over the six labels, and Cohen's kappa over the six
labels plus ``none``. Macro-F1 averages the labels that occur in either annotation.
"""

from __future__ import annotations

import bisect
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnsteer.annotation.spans import Span, parse_annotation
from nnsteer.errors import BadInput
from nnsteer.labels import LABELS, OK

NONE = "none"


def word_labels(text: str, spans: Iterable[Span]) -> list[str]:
    """The label of each word of ``text`` under ``spans`` (``none`` where no span covers it).

    Spans may repeat a range (one part, two labels) but must not otherwise overlap, as
    :func:`~nnsteer.annotation.stage.parse_annotation` and the rules annotator guarantee; on a tie
    the span that starts first wins.
    """
    placed = sorted((s for s in spans if s.status == OK), key=lambda s: s.start)
    starts = [s.start for s in placed]
    labels = []
    for word in re.finditer(r"\S+", text):
        first = last = bisect.bisect_left(starts, word.end())
        while first > 0 and placed[first - 1].end > word.start():
            first -= 1
        best, overlap = NONE, 0
        for span in placed[first:last]:
            shared = min(word.end(), span.end) - max(word.start(), span.start)
            if shared > overlap:
                best, overlap = span.label, shared
        labels.append(best)
    return labels


@dataclass(frozen=True)
class Agreement:
    """Word-level agreement of ``predicted`` with ``reference``."""

    precision: dict[str, float]
    recall: dict[str, float]
    f1: dict[str, float]
    support: dict[str, int]
    macro_f1: float
    kappa: float
    words: int

    def format(self, title: str = "") -> str:
        """A small table: one row per label, then macro-F1, kappa and the word count."""
        lines = [title] if title else []
        lines.append(f"{'label':<24}{'precision':>10}{'recall':>8}{'F1':>7}{'words':>8}")
        for label in LABELS:
            lines.append(f"{label:<24}{self.precision[label]:>10.3f}{self.recall[label]:>8.3f}"
                         f"{self.f1[label]:>7.3f}{self.support[label]:>8}")
        lines.append(f"macro-F1 {self.macro_f1:.3f}   Cohen's kappa {self.kappa:.3f}   "
                     f"words {self.words}")
        return "\n".join(lines)


def agreement(reference: Sequence[str], predicted: Sequence[str]) -> Agreement:
    """Per-label F1, macro-F1 and Cohen's kappa of two word-label sequences."""
    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} reference labels but {len(predicted)} predicted")
    pairs = Counter(zip(reference, predicted))
    ref, pred = Counter(reference), Counter(predicted)
    precision, recall, f1 = {}, {}, {}
    for label in LABELS:
        hit = pairs[(label, label)]
        precision[label] = hit / pred[label] if pred[label] else 0.0
        recall[label] = hit / ref[label] if ref[label] else 0.0
        total = pred[label] + ref[label]
        f1[label] = 2 * hit / total if total else 0.0
    n = len(reference)
    observed = sum(pairs[(c, c)] for c in ref) / n if n else 0.0
    expected = sum(ref[c] * pred[c] for c in ref) / n**2 if n else 0.0
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 1.0
    present = [x for x in LABELS if ref[x] or pred[x]]
    macro = sum(f1[x] for x in present) / len(present) if present else 0.0
    return Agreement(precision, recall, f1, {x: ref[x] for x in LABELS}, macro, kappa, n)


def read_annotated_chains(path: Path | str) -> list[dict]:
    """Records of a file of annotated chains (``thinking_process``, ``annotated_response``)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a readable JSON file ({type(exc).__name__})") from None
    for i, record in enumerate(records if isinstance(records, list) else [None]):
        if not isinstance(record, dict) or not {"thinking_process", "annotated_response"} <= set(record):
            raise BadInput(f"{path}: record {i} lacks thinking_process/annotated_response")
    return records


def file_agreement(path: Path | str, annotate: Callable[[str], list[Span]]) -> Agreement:
    """Agreement of ``annotate`` with the LLM annotation of every record of ``path``."""
    reference: list[str] = []
    predicted: list[str] = []
    for record in read_annotated_chains(path):
        text = record["thinking_process"]
        reference += word_labels(text, parse_annotation(record["annotated_response"], text))
        predicted += word_labels(text, annotate(text))
    return agreement(reference, predicted)
