"""What steering costs, per chain: length, closure, loops, compressibility and coherence.

Each chain's *reasoning* is the text ``response[thinking_start:thinking_end]`` and its
tokens are the generated tokens (from the stored ``output_ids``) whose characters
overlap that range; the *answer* is what follows the reasoning (see :func:`answer_text`).
No thinking tag is hard-coded: the chain's offsets say where the reasoning ends.

Per chain (:func:`chain_costs`):

- ``reasoning_tokens``: the number of reasoning tokens.
- ``closed_thinking``: the reasoning ended within the token budget: text followed it,
  or the chain ended with EOS (``finish_reason == "eos"``).
- ``answered``: a non-empty answer followed the reasoning.
- ``repetition``: the share of the reasoning's token :data:`NGRAM`-grams that repeat an
  earlier one (0 = no repeat; a loop of ``k`` tokens repeated ``r`` times tends to
  ``1 - 1/r``); null with fewer than :data:`NGRAM` tokens.
- ``compression_ratio``: the reasoning's UTF-8 bytes over their zlib-compressed bytes
  (level 9): loops compress well, so higher means more repetitive; null if empty.
- ``nll_unsteered``: the mean negative log-likelihood (nats per token) of the reasoning
  tokens under the unsteered model, given the prompt and the tokens before them
  (:func:`nll_unsteered`); the coherence cost. Null without reasoning tokens.

Example:
    >>> repetition("wait wait wait wait wait".split(), n=2)
    0.75
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.positions import overlapping_tokens, token_offsets
from nnsteer.ndif.remote import with_retries

#: Token n-grams counted by ``repetition``.
NGRAM = 4
#: The per-chain metrics, in the order of the evaluation table's columns.
CHAIN_METRICS = ("reasoning_tokens", "closed_thinking", "answered", "repetition",
           "compression_ratio", "nll_unsteered")

# A tag that closes the reasoning (e.g. ``</think>``) left in the text after it.
_LEADING_TAG = re.compile(r"^\s*</?[^<>\s]+>")


def repetition(tokens: Sequence[Hashable], n: int = NGRAM) -> float | None:
    """The share of the n-grams of ``tokens`` that occurred before (None if there are none)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return None
    return 1 - len(set(grams)) / len(grams)


def compression_ratio(text: str) -> float | None:
    """UTF-8 bytes of ``text`` over its zlib-compressed (level 9) bytes (None if empty)."""
    data = text.encode()
    if not data:
        return None
    return len(data) / len(zlib.compress(data, 9))


def answer_text(chain: dict[str, Any]) -> str:
    """The answer of a chain: the text after its reasoning, less a closing tag.

    A chain whose reasoning runs to its end answered in it if it ended with EOS (a model
    that does not mark its reasoning): its whole response is the answer. A chain cut at
    its token budget inside its reasoning has no answer (``""``).
    """
    response, end = chain["response"], chain["thinking_end"]
    if end < len(response):
        return _LEADING_TAG.sub("", response[end:], count=1).strip()
    return response.strip() if chain["finish_reason"] == "eos" else ""


def reasoning_token_indices(chain: dict[str, Any], tokenizer: Any) -> list[int]:
    """Indices into ``output_ids`` of the tokens that overlap the reasoning's characters."""
    offsets = token_offsets(tokenizer, chain["output_ids"])
    return overlapping_tokens(offsets, chain["thinking_start"], chain["thinking_end"])


@dataclass(frozen=True)
class TextCosts:
    """The metrics that need no model (all of :data:`CHAIN_METRICS` but ``nll_unsteered``)."""

    reasoning_tokens: int
    closed_thinking: bool
    answered: bool
    repetition: float | None
    compression_ratio: float | None


def text_costs(chain: dict[str, Any], tokenizer: Any) -> TextCosts:
    """The text metrics of one chain (a ``steered.parquet`` / ``chains.parquet`` row)."""
    ids = chain["output_ids"]
    tokens = [ids[i] for i in reasoning_token_indices(chain, tokenizer)]
    reasoning = chain["response"][chain["thinking_start"]:chain["thinking_end"]]
    closed = chain["thinking_end"] < len(chain["response"]) or chain["finish_reason"] == "eos"
    return TextCosts(len(tokens), closed, bool(answer_text(chain)), repetition(tokens),
                     compression_ratio(reasoning))


#: Logits unembedded at once by :func:`nll_unsteered` (float32: 256 MB).
LOGIT_CHUNK = 1 << 26


def nll_unsteered(
    lm: LoadedModel, chains: Sequence[dict[str, Any]], *, batch_size: int = 8,
    progress: bool = False,
) -> list[float | None]:
    """Per chain, the mean NLL (nats/token) of its reasoning tokens under ``lm`` unsteered.

    Each chain is ``prompt_ids + output_ids``; the reasoning tokens are those of
    :func:`reasoning_token_indices` (with ``lm``'s tokenizer). One nnsight trace per batch
    of ``batch_size`` chains (``Architecture.batches``: longest first, left-padded, position ids counted from each
    row's first token) reduces the log-probabilities inside the trace, so only one number
    per chain leaves the device, locally and on NDIF. None for a chain with no reasoning token.
    """
    targets = []
    for chain in chains:
        start = len(chain["prompt_ids"])
        targets.append([start + i for i in reasoning_token_indices(chain, lm.tokenizer)])
    sequences = [list(c["prompt_ids"]) + list(c["output_ids"]) for c in chains]
    scored = [i for i in range(len(chains)) if targets[i]]
    result: list[float | None] = [None] * len(chains)
    batches = [[scored[j] for j in batch] for batch in
               lm.arch.batches([len(sequences[i]) for i in scored], batch_size)]
    for k, batch in enumerate(tqdm(batches, desc="nll (unsteered)", unit="batch",
                                   disable=not progress), start=1):
        inputs = _nll_batch([sequences[i] for i in batch], [targets[i] for i in batch])
        means = with_retries(lambda: _mean_nll(lm, *inputs),
                             what=f"nll batch {k}/{len(batches)}")
        for i, value in zip(batch, means.tolist()):
            result[i] = float(value)
    return result


def _nll_batch(sequences: list[list[int]], targets: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, mask and position ids; flattened rows of the positions that predict
    each target, the target ids, and the ``[rows, chains]`` weights of a per-chain mean."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, wanted, columns, weights = [], [], [], []
    for b, (sequence, positions) in enumerate(zip(sequences, targets)):
        pad = width - len(sequence)
        ids[b, pad:] = torch.tensor(sequence, dtype=torch.long)
        mask[b, pad:] = 1
        for p in positions:
            rows.append(b * width + pad + p - 1)  # the logits at p - 1 predict token p
            wanted.append(sequence[p])
            columns.append(b)
            weights.append(1.0 / len(positions))
    dense = torch.zeros(len(rows), len(sequences), dtype=torch.float64)
    dense[torch.arange(len(rows)), torch.tensor(columns)] = torch.tensor(weights, dtype=torch.float64)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids, torch.tensor(rows), torch.tensor(wanted), dense


def _mean_nll(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
              rows: torch.Tensor, wanted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``[chains]`` float32: the weighted mean of ``-log p(wanted | prefix)`` per chain.

    Only the predicting positions are unembedded (the final norm's output at ``rows``
    times the unembedding), in float32 chunks of at most :data:`LOGIT_CHUNK` logits, and
    the forward stops there: no ``[batch, length, vocab]`` logits are made.
    """
    model = lm.nn  # the traced block must not capture nnsteer objects (NDIF refuses them)
    norm, head = lm.arch.final_norm(model), lm.arch.unembed(model)
    step = max(1, LOGIT_CHUNK // lm.arch.vocab_size)
    starts = list(range(0, len(rows), step))
    with model.trace(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                     **lm.remote_options()) as tracer:
        h = norm.output
        flat = h.reshape(-1, h.shape[-1])
        rows, wanted = rows.to(h.device), wanted.to(h.device)
        parts = []
        for s in starts:
            logits = torch.nn.functional.linear(flat.index_select(0, rows[s: s + step]),
                                                head.weight).float()
            target = logits.gather(1, wanted[s: s + step].unsqueeze(1)).squeeze(1)
            parts.append(torch.logsumexp(logits, -1) - target)
        nll = torch.cat(parts).double()
        means = (weights.to(h.device).T @ nll).float().save()
        tracer.stop()
    return means.cpu()
