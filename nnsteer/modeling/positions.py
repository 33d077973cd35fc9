"""From character spans of a response to the token positions the model saw.

Positions are always derived from the stored token ids, never by re-tokenising text.
A chain's full sequence is ``prompt_ids + output_ids``; position ``len(prompt_ids) + i``
is generated token ``i``. ``response`` is ``decode_response(tokenizer, output_ids)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any


def decode_response(tokenizer: Any, output_ids: Sequence[int]) -> str:
    """The text of generated tokens, special tokens (EOS, pads) left out."""
    return tokenizer.decode(list(output_ids), skip_special_tokens=True)


def token_offsets(tokenizer: Any, output_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Character range ``[start, end)`` of each generated token inside the decoded response.

    A token covers every character one of its bytes belongs to: a token that completes a
    multi-byte character begun before it shares that character with the token before it.
    A special token that decoding leaves out gets an empty range. Ranges are ordered, start
    at 0 and end at ``len(response)``; one starts where the previous one ends, or one
    character earlier where the two share a character.
    """
    ids = list(output_ids)
    prefixes = windowed_prefix_lengths(tokenizer, ids)
    if prefixes is None:
        prefixes = exact_prefix_lengths(tokenizer, ids)
    lengths, completes = [n for n, _ in prefixes], [c for _, c in prefixes]
    # A prefix that ends inside a multi-byte character decodes to a replacement char
    # that a later token removes: take the running minimum from the end.
    ends = lengths[:]
    for i in range(len(ends) - 2, -1, -1):
        ends[i] = min(ends[i], ends[i + 1])
    text = decode_response(tokenizer, ids) if any(completes) else ""
    offsets = []
    for i, end in enumerate(ends):
        start = ends[i - 1] if i else 0
        # The character the previous prefix left unfinished is one this token completes,
        # unless it never became one (invalid bytes stay a replacement char).
        if completes[i] and start and text[start - 1] != _REPLACEMENT:
            start -= 1
        offsets.append((start, end))
    return offsets


_REPLACEMENT = "\ufffd"
_CONTEXT = 4  # tokens of look-back kept in front of a decoding window
_MAX_WINDOW = 256  # tokens; a window that does not settle by then is given up on

#: Per generated token: the length of the decoded prefix that ends with it, and whether
#: it continues a prefix that ended inside a character (a token decoding does not skip).
PrefixLengths = list[tuple[int, bool]]


def exact_prefix_lengths(tokenizer: Any, ids: list[int]) -> PrefixLengths:
    """:data:`PrefixLengths` by decoding every prefix whole (quadratic, always right)."""
    skipped = _skipped_ids(tokenizer, ids)
    out: PrefixLengths = []
    previous = ""
    for i, token in enumerate(ids):
        prefix = decode_response(tokenizer, ids[: i + 1])
        out.append((len(prefix), token not in skipped and previous.endswith(_REPLACEMENT)))
        previous = prefix
    return out


def windowed_prefix_lengths(tokenizer: Any, ids: list[int]) -> PrefixLengths | None:
    """:data:`PrefixLengths` decoded a window at a time; None where the lengths cannot be
    checked against the whole decoded response."""
    # A prefix's text is taken as ``committed + decode(kept[start:])``. The window starts
    # a few tokens back at a boundary where the text had settled (a trailing replacement
    # char may be an unfinished multi-byte character), so how a decoder treats a first
    # token (a stripped leading space, a kept "##") and clean-ups across tokens stay
    # inside it. A boundary becomes the start only where its own decoding ends the
    # window's; the text left behind must continue the response, the last window end it.
    text = decode_response(tokenizer, ids)
    skipped = _skipped_ids(tokenizer, ids)
    kept: list[int] = []
    lengths: PrefixLengths = []
    boundaries = deque([0])  # where in ``kept`` a window may start
    start = committed = 0  # the window's start; the length of the text before it
    unfinished = False  # the text decoded so far ends inside a character
    for token in ids:
        if token in skipped:
            lengths.append((lengths[-1][0] if lengths else 0, False))
            continue
        kept.append(token)
        end = len(kept)
        if end - start > _MAX_WINDOW:
            return None
        window = decode_response(tokenizer, kept[start:])
        lengths.append((committed + len(window), unfinished))
        unfinished = window.endswith(_REPLACEMENT)
        if unfinished:
            continue
        boundaries.append(end)
        while len(boundaries) > 1 and boundaries[1] <= end - _CONTEXT:
            boundaries.popleft()
        if boundaries[0] <= start:
            continue
        context = decode_response(tokenizer, kept[boundaries[0]:])
        if not window.endswith(context):
            continue
        piece = window[: len(window) - len(context)]
        if not text.startswith(piece, committed):
            return None
        committed += len(piece)
        start = boundaries[0]
    if text[committed:] != decode_response(tokenizer, kept[start:]):
        return None
    return lengths


def _skipped_ids(tokenizer: Any, ids: list[int]) -> set[int]:
    """The special ids among ``ids`` that ``decode_response`` leaves out wherever they stand.

    Skipping special tokens filters them out before decoding, so a special token that
    decodes to nothing with skipping and to something without it adds nothing to any prefix.
    """
    special = set(getattr(tokenizer, "all_special_ids", ())) & set(ids)
    return {t for t in special if decode_response(tokenizer, [t]) == "" != tokenizer.decode([t])}


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
