"""From character spans of a response to the token positions the model saw.

Positions are always derived from the stored token ids, never by re-tokenising text.
A chain's full sequence is ``prompt_ids + output_ids``; position ``len(prompt_ids) + i``
is generated token ``i``. ``response`` is ``decode_response(tokenizer, output_ids)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def decode_response(tokenizer: Any, output_ids: Sequence[int]) -> str:
    """The text of generated tokens, special tokens (EOS, pads) left out."""
    return tokenizer.decode(list(output_ids), skip_special_tokens=True)


def token_offsets(tokenizer: Any, output_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character range ``[start, end)`` of each generated token inside the decoded response.

    A token that only completes a multi-byte character, or a special token, may get an
    empty range. Ranges are contiguous, ordered and end at ``len(response)``.
    """
    ids = list(output_ids)
    prefix_lengths = [
        len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True)) for i in range(len(ids))
    ]
    # A prefix that ends inside a multi-byte character decodes to a replacement char
    # that a later token removes: take the running minimum from the end.
    ends = prefix_lengths[:]
    for i in range(len(ends) - 2, -1, -1):
        ends[i] = min(ends[i], ends[i + 1])
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def overlapping_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of generated tokens whose characters overlap ``[start, end)``."""
    return [i for i, (s, e) in enumerate(offsets) if s < end and e > start and e > s]


def span_positions(
    offsets: Sequence[tuple[int, int]], prompt_len: int, start: int, end: int,
    with_previous: bool = True,
) -> list[int]:
    """Full-sequence positions of a span's tokens, with the token just before it.

    The token before the span's first token is its prediction point; for the first
    generated token that is the last prompt token. Empty if the span covers no token.
    """
    tokens = overlapping_tokens(offsets, start, end)
    if not tokens:
        return []
    positions = [prompt_len + i for i in tokens]
    if with_previous and positions[0] > 0:
        positions.insert(0, positions[0] - 1)
    return positions


def merge_positions(groups: Iterable[Iterable[int]]) -> list[int]:
    """Sorted union of position lists: a position counts once per chain."""
    return sorted({p for group in groups for p in group})
