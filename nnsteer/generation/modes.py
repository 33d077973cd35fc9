"""Where and when a steering vector is added: the per-token masks of steered generation.

A mode is ``where`` (which phase), ``at`` (which tokens of it) and an optional
:class:`Condition` (CAST-style: only where a label's direction is detected). The masks are
decided inside the generation trace, per sequence and per forward position, from the
step's input tokens (see ``docs/steering-modes.md`` for the exact positions):

- ``where``: ``all`` (every position, the paper), ``prompt`` (the prompt pass only),
  ``generated`` (the forwards of generated tokens), ``thinking`` (positions before the
  end-of-thinking marker has been fed), ``answer`` (from the position whose input completes
  that marker on). ``thinking`` and ``answer`` split ``all``.
- ``at``: ``every`` position, or ``step-starts``: positions whose input token ends a
  sentence or a paragraph (:func:`step_boundary_ids`), and the prompt's last position.
- ``when``: the residual at the condition's layer, projected on the unit vector of its
  label, exceeds the threshold.

:func:`block_inputs` turns a batch's specs into the plain tensors and lists the trace
uploads (:class:`BlockInputs`); :func:`calibrate_threshold` picks a condition's threshold
on labelled tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from nnsteer.errors import BadInput
from nnsteer.generation.spec import WHERE_FLAGS, SteeringSpec, WhereFlags

SENTENCE_ENDS = (".", "!", "?")


@lru_cache(maxsize=8)
def _vocabulary_ends(tokenizer: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    boundary, newline = [], []
    special = set(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if text.endswith("\n"):
            newline.append(token_id)
        if text.endswith("\n\n") or text.rstrip().endswith(SENTENCE_ENDS):
            boundary.append(token_id)
    return tuple(boundary), tuple(newline)


def step_boundary_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """``(boundary ids, newline ids)`` of the vocabulary, special tokens left out.

    A boundary token decodes to text that ends a paragraph (``\\n\\n``) or, once trailing
    whitespace is stripped, a sentence (``.``, ``!``, ``?``). A newline token's text ends
    in ``\\n``: two in a row are a paragraph break spelled over two tokens.
    """
    boundary, newline = _vocabulary_ends(tokenizer)
    return list(boundary), list(newline)


@dataclass(frozen=True)
class RowModes:
    """Per sequence of a batch, one flag each: which of its positions the spec steers.

    The four phase flags are its ``where`` (:class:`nnsteer.generation.spec.WhereFlags`);
    ``step_starts``: only positions that start a step; ``conditional``: only where the
    condition's direction is detected. All ``False`` for an unsteered sequence.
    """

    prompt_thinking: list[bool]
    prompt_answer: list[bool]
    generated_thinking: list[bool]
    generated_answer: list[bool]
    step_starts: list[bool]
    conditional: list[bool]


@dataclass(frozen=True)
class BlockInputs:
    """What the steering block of one batch needs, as plain tensors, lists and numbers.

    ``table``: each distinct vector once, in the model's dtype; per steered layer
    (``layers``, ascending) ``rows`` (an index into ``table`` per sequence) and ``scale``
    (``[n_layers, n_sequences]``: ``±coefficient / n_layers``, float32, 0 for unsteered
    sequences); ``visit``: the layers the block reads, steered and detection.
    ``lengths``: each sequence's prompt tokens. The token kinds, by id below ``vocab``:
    ``end_of_thinking`` (the marker, in order), ``boundary`` (ends a step), ``newline``,
    ``eos``. The condition: the residual at layer ``detect`` (-1: none) projected on
    ``direction`` exceeds ``threshold``.
    """

    table: torch.Tensor
    layers: list[int]
    visit: list[int]
    rows: list[list[int]]
    scale: torch.Tensor
    modes: RowModes
    lengths: list[int]
    vocab: int
    end_of_thinking: list[int]
    boundary: list[int]
    newline: list[int]
    eos: list[int]
    detect: int
    direction: torch.Tensor | None
    threshold: float


def block_inputs(
    specs: Sequence[SteeringSpec | None],
    lengths: Sequence[int],
    *,
    dtype: torch.dtype,
    vocab_size: int,
    end_of_thinking: Sequence[int],
    boundaries: tuple[list[int], list[int]],
    eos: Sequence[int],
) -> BlockInputs | None:
    """The steering block's inputs for a batch of ``specs`` (``None``: an unsteered
    sequence) with prompts of ``lengths`` tokens; ``None`` if no sequence is steered.

    ``dtype``: the model's; ``boundaries``: ``(boundary ids, newline ids)``
    (:func:`step_boundary_ids`).
    """
    if all(spec is None for spec in specs):
        return None
    distinct: dict[bytes, int] = {}
    vectors: list[torch.Tensor] = []
    per_layer: dict[int, tuple[list[int], list[float]]] = {}
    conditions = {s.when.name: s.when for s in specs if s is not None and s.when is not None}
    if len(conditions) > 1:
        raise BadInput(f"one batch can steer with one --when condition at most, got "
                       f"{', '.join(sorted(conditions))}")
    condition = next(iter(conditions.values()), None)
    for row, spec in enumerate(specs):
        if spec is None:
            continue
        for layer, vector in spec.vectors.items():
            vector = vector.detach().to("cpu", torch.float32)
            key = vector.numpy().tobytes()
            if key not in distinct:
                distinct[key] = len(vectors)
                vectors.append(vector)
            rows, scales = per_layer.setdefault(layer, ([0] * len(specs), [0.0] * len(specs)))
            rows[row], scales[row] = distinct[key], spec.scale
    layers = sorted(per_layer)
    visit = sorted({*layers, *([condition.layer] if condition else [])})
    return BlockInputs(
        table=torch.stack(vectors).to(dtype),
        layers=layers,
        visit=visit,
        rows=[per_layer[layer][0] for layer in layers],
        scale=torch.tensor([per_layer[layer][1] for layer in layers], dtype=torch.float32),
        modes=_row_modes(specs),
        lengths=list(lengths),
        vocab=max(vocab_size, 1 + max([*end_of_thinking, *boundaries[0], *boundaries[1], *eos])),
        end_of_thinking=list(end_of_thinking),
        boundary=boundaries[0],
        newline=boundaries[1],
        eos=list(eos),
        detect=condition.layer if condition else -1,
        direction=condition.vector.to(torch.float32) if condition else None,
        threshold=float(condition.threshold) if condition else 0.0,
    )


def _row_modes(specs: Sequence[SteeringSpec | None]) -> RowModes:
    """The flags of each sequence's spec, all ``False`` for an unsteered one."""
    where = [WHERE_FLAGS[s.where] if s is not None else WhereFlags(False, False, False, False)
             for s in specs]
    return RowModes(
        prompt_thinking=[w.prompt_thinking for w in where],
        prompt_answer=[w.prompt_answer for w in where],
        generated_thinking=[w.generated_thinking for w in where],
        generated_answer=[w.generated_answer for w in where],
        step_starts=[s is not None and s.at == "step-starts" for s in specs],
        conditional=[s is not None and s.when is not None for s in specs],
    )


def calibrate_threshold(inside: torch.Tensor, outside: torch.Tensor) -> dict[str, float]:
    """The threshold whose ``projection > threshold`` best detects ``inside`` among both (F1).

    Returns ``threshold``, ``precision``, ``recall``, ``f1`` and the counts. Candidate
    thresholds lie halfway between consecutive distinct projections; ties go to the
    higher threshold.
    """
    if inside.numel() == 0 or outside.numel() == 0:
        raise BadInput(f"calibration needs tokens inside and outside the spans, got "
                       f"{inside.numel()} inside and {outside.numel()} outside")
    values = torch.cat([inside, outside]).to(torch.float64)
    truth = torch.cat([torch.ones(inside.numel()), torch.zeros(outside.numel())]).to(torch.float64)
    order = values.argsort(descending=True)
    values, truth = values[order], truth[order]
    hits = truth.cumsum(0)  # predicted positive: the first k+1 (projection >= values[k])
    predicted = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    f1 = 2 * hits / (predicted + inside.numel())
    # A cut is only possible between distinct values.
    cut = torch.ones_like(values, dtype=torch.bool)
    cut[:-1] = values[:-1] != values[1:]
    f1 = torch.where(cut, f1, torch.full_like(f1, -1.0))
    k = int(f1.argmax())
    below = values[k + 1] if k + 1 < values.numel() else values[k] - 1.0
    threshold = float((values[k] + below) / 2)
    tp = float(hits[k])
    return {
        "threshold": threshold,
        "precision": tp / float(predicted[k]),
        "recall": tp / inside.numel(),
        "f1": float(f1[k]),
        "n_inside": int(inside.numel()),
        "n_outside": int(outside.numel()),
    }
