"""The offline ``learned`` annotator: a small trained head over sentence encodings.

Each sentence of the rules' splitter (:func:`nnsteer.annotation.rules.sentences`) is encoded by the
embedded SmolLM2-135M: the chain's text is re-tokenised with its tokenizer (so chains of any
model work), run through the model's first :data:`LAYER` decoder layers in windows of
:data:`WINDOW` tokens, and the final-norm'd hidden states of the tokens that cover the
sentence are averaged. With the rules' label and the sentence's position and shape
(:func:`sentence_features`), a bidirectional GRU over the chain's sentences (:class:`Head`)
gives each sentence one of the six labels. Spans are character offsets into the text.

The weights ship in the package (``nnsteer/data/learned_annotator.safetensors``) with their
provenance (``learned_annotator.json``: training files, their sha256, date, cross-file
agreement); ``analysis/train_learned_annotator.py`` rebuilds them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import torch

from nnsteer.annotation.rules import rules_annotate
from nnsteer.annotation.spans import Span
from nnsteer.labels import LABELS, OK
from nnsteer.modeling.models import load_weights
from nnsteer.modeling.sources import resolve_source
from nnsteer.package_data import package_path
from nnsteer.runs.store import file_digest

#: Decoder layers of the encoder whose output (after the final norm) is pooled.
LAYER = 8
#: Tokens per encoder window (each window starts with the BOS token).
WINDOW = 1024
ENCODER = "smollm2-135m"
WEIGHTS = "learned_annotator.safetensors"
PROVENANCE = "learned_annotator.json"
#: Classes the head scores: the six labels, then ``none`` (words no LLM span covers).
CLASSES = [*LABELS, "none"]
#: Number of :func:`sentence_features` per sentence.
N_FEATURES = len(LABELS) + 9


def sentence_features(text: str, spans: list[Span]) -> torch.Tensor:
    """Per sentence (the rules' ``spans`` of ``text``): its rules label (one-hot), position
    in the chain, paragraph start, first paragraph, length, question mark, digits."""
    rows = []
    n = len(spans)
    first_paragraph = text.find("\n\n")
    first_paragraph = len(text) if first_paragraph < 0 else first_paragraph
    previous_end = 0
    for index, span in enumerate(spans):
        onehot = [float(span.label == label) for label in LABELS]
        words = len(span.text.split())
        rows.append(onehot + [
            index / max(n - 1, 1), math.log1p(index) / 5, float(index < 2),
            float(index == 0 or "\n\n" in text[previous_end:span.start]),
            float(span.start < first_paragraph), math.log1p(words) / 3,
            float(span.text.rstrip().endswith("?")),
            float(any(c.isdigit() for c in span.text)), span.start / max(len(text), 1),
        ])
        previous_end = span.end
    return torch.tensor(rows, dtype=torch.float32).reshape(n, N_FEATURES)


class SentenceEncoder:
    """Mean-pooled hidden states of the embedded model over sentences of any text."""

    def __init__(self, layers: int = LAYER, model: str = ENCODER) -> None:
        hf_model, self.tokenizer = load_weights(resolve_source(model), "cpu", torch.float32)
        body = hf_model.model
        body.layers = body.layers[:layers]  # only the layers the features need
        self.body = body
        self.layers = layers
        self.bos = self.tokenizer.bos_token_id

    @torch.no_grad()
    def hidden(self, text: str, outputs: Iterable[int] | None = None) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Per token of ``text``: the final-norm'd hidden state after each layer count in
        ``outputs`` (default: all :attr:`layers`), and the token's character range."""
        encoded = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        outputs = list(outputs or [self.layers])
        pieces: list[list[torch.Tensor]] = [[] for _ in outputs]
        for start in range(0, len(ids), WINDOW):
            window = torch.tensor([[self.bos, *ids[start:start + WINDOW]]])
            states = self.body(input_ids=window, output_hidden_states=True).hidden_states
            for piece, layer in zip(pieces, outputs):
                state = states[layer] if layer == self.layers else self.body.norm(states[layer])
                piece.append(state[0, 1:])
        d = self.body.config.hidden_size
        return [torch.cat(p) if p else torch.zeros(0, d) for p in pieces], list(offsets)

    def encode(self, text: str, ranges: list[tuple[int, int]],
               outputs: Iterable[int] | None = None) -> list[torch.Tensor]:
        """Per layer count in ``outputs``: the mean hidden state of the tokens covering each
        character range of ``text`` (rows in the order of ``ranges``)."""
        states, offsets = self.hidden(text, outputs)
        return [pool(s, offsets, ranges, len(text)) for s in states]


def pool(states: torch.Tensor, offsets: list[tuple[int, int]], ranges: list[tuple[int, int]],
         length: int) -> torch.Tensor:
    """Mean of the token rows of ``states`` from the token covering each range's first
    character to the one covering its last (a character no token covers takes the next
    token before it)."""
    token_at = torch.full((length,), -1, dtype=torch.long)
    for i, (a, b) in enumerate(offsets):
        token_at[a:b] = i
    token_at = torch.cummax(token_at, 0).values.clamp(min=0)
    first = token_at[torch.tensor([a for a, _ in ranges], dtype=torch.long)]
    last = token_at[torch.tensor([b - 1 for _, b in ranges], dtype=torch.long)]
    sums = torch.cat([torch.zeros(1, states.shape[1]), states.cumsum(0)])
    return (sums[last + 1] - sums[first]) / (last - first + 1).unsqueeze(1)


class Head(torch.nn.Module):
    """Sentence encodings and features of one chain → class scores per sentence."""

    def __init__(self, d_model: int, project: int = 64, hidden: int = 48, dropout: float = 0.3) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_model))
        self.register_buffer("std", torch.ones(d_model))
        self.dropout = torch.nn.Dropout(dropout)
        self.project = torch.nn.Linear(d_model, project)
        width = project + N_FEATURES
        self.gru = torch.nn.GRU(width, hidden, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(width + 2 * hidden, len(CLASSES))

    def forward(self, encodings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``encodings`` (batch, sentences, d_model), ``features`` (batch, sentences,
        N_FEATURES) → scores (batch, sentences, classes)."""
        x = self.project(self.dropout((encodings - self.mean) / self.std))
        x = torch.cat([torch.relu(x), features], -1)
        context, _ = self.gru(self.dropout(x))
        return self.out(torch.cat([x, self.dropout(context)], -1))


def package_file(name: str) -> Path:
    """A file of the package's ``data`` folder."""
    return package_path("nnsteer", "data", name)


def read_provenance(path: Path | None = None) -> dict[str, Any]:
    """The shipped weights' provenance (training files, hashes, date, figures)."""
    return json.loads((path or package_file(PROVENANCE)).read_text())


def weights_digest() -> str:
    """A short sha256 of the shipped weights (recorded in annotation files)."""
    return str(file_digest(package_file(WEIGHTS)))[:16]


def measured_agreement() -> str:
    """One sentence: the shipped head's cross-file word-level agreement with the LLM labels."""
    results = read_provenance()["cross_file"]
    figures = ", ".join(f"{r['macro_f1']:.3f} on {r['test'].removesuffix('.json')}" for r in results)
    return ("The offline learned annotator labels sentences from SmolLM2 encodings of them; "
            f"trained on some models' chains, it agrees with a GPT-4-class annotator at a word-level "
            f"macro-F1 of {figures} (docs/benchmarks.md, Measured figures).")


class LearnedAnnotator:
    """The encoder and the shipped (or given) head; :meth:`annotate` labels one text."""

    def __init__(self, weights: Path | None = None, encoder: SentenceEncoder | None = None) -> None:
        from safetensors.torch import load_file

        weights = weights or package_file(WEIGHTS)
        state = load_file(str(weights))
        config = read_provenance(weights.with_suffix(".json"))["head"]
        self.head = Head(state["mean"].shape[0], config["project"], config["hidden"])
        self.head.load_state_dict(state)
        self.head.eval()
        self.encoder = encoder or SentenceEncoder(config["layer"])

    @torch.no_grad()
    def annotate(self, text: str) -> list[Span]:
        """One ``ok`` span per sentence of ``text``, labelled by the head."""
        spans = rules_annotate(text)
        if not spans:
            return []
        [encodings] = self.encoder.encode(text, [(s.start, s.end) for s in spans])
        scores = self.head(encodings[None], sentence_features(text, spans)[None])[0]
        labels = scores[:, :len(LABELS)].argmax(-1).tolist()
        return [Span(LABELS[i], s.start, s.end, OK, s.text) for i, s in zip(labels, spans)]


@cache
def shipped_annotator() -> LearnedAnnotator:
    """The package's learned annotator, loaded once per process."""
    return LearnedAnnotator()


def learned_annotate(texts: Iterable[str]) -> Iterator[list[Span]]:
    """Spans of each text by the shipped learned annotator, one text at a time."""
    annotator = shipped_annotator()
    for text in texts:
        yield annotator.annotate(text)
