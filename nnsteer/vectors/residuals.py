"""Mean residual-stream activations over chosen token positions, reduced on the device.

A :class:`Selection` names one token sequence and, per group (a behaviour label, or
``overall``), lists of positions; each list is one *sample* whose activations are
averaged. :func:`sum_sample_means` returns, per group and layer, the sum over all
samples of all sequences of the sample's mean decoder-block output, and the number
of samples: a difference of means is then ``sums[c] / counts[c] - ...``.

One nnsight trace per batch reads the output of every decoder block and contracts it,
inside the trace, with a ``[positions, groups]`` weight matrix (``1/len(sample)`` at
each position of each sample, summed over samples). Only the ``[n_layers, n_groups,
d_model]`` float32 result is saved, so neither memory nor what NDIF sends back grows
with the length or the number of chains, and no full activations leave the device.
Left padding is masked and skipped (padded rows are never read); position ids count
each row from its first real token, so results do not depend on the batch size.

Example:
    >>> sel = Selection(ids=prompt_ids + output_ids, samples={"backtracking": [[41, 42, 43]]})
    >>> sums = sum_sample_means(lm, [sel], ["backtracking"])
    >>> sums.means()["backtracking"].shape      # [n_layers, d_model]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from nnsteer.modeling.models import LoadedModel
from nnsteer.ndif.remote import with_retries
from nnsteer.runs.checkpoint import Checkpoint, announce_resume


@dataclass(frozen=True)
class Selection:
    """A token sequence and, per group, the position lists whose activations are averaged."""

    ids: Sequence[int]
    samples: Mapping[str, Sequence[Sequence[int]]]


@dataclass
class MeanSums:
    """Per group: the sum over samples of each sample's mean activation ``[L, H]``, and how many."""

    sums: dict[str, torch.Tensor]
    counts: dict[str, int]

    def means(self) -> dict[str, torch.Tensor]:
        """Mean over samples (float32 ``[L, H]``) of each group that has at least one sample."""
        return {
            group: (total / self.counts[group]).float()
            for group, total in self.sums.items()
            if self.counts[group]
        }


def sum_sample_means(
    lm: LoadedModel,
    selections: Sequence[Selection],
    groups: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> MeanSums:
    """Sum of per-sample mean activations at every layer, per group, over all selections.

    Sequences run longest first in batches of ``batch_size`` (less padding; of equal
    length where padding changes the model's outputs: ``Architecture.batches``); the
    accumulators are float64 ``[n_layers, d_model]`` per group, whatever the number
    of sequences. With ``checkpoint``, the sums of the finished batches are saved
    there after each batch, and a rerun with the same model, selections, groups and
    batch size continues from them, with the same result as an uninterrupted run.
    """
    n_layers, d_model = lm.arch.n_layers, lm.arch.d_model
    counts = dict.fromkeys(groups, 0)
    for selection in selections:
        for group in groups:
            counts[group] += sum(1 for sample in selection.samples.get(group, ()) if sample)
    batches = lm.arch.batches([len(s.ids) for s in selections], batch_size)
    partial = Checkpoint.of(checkpoint, lm.identity(), list(groups), batch_size,
                          [(list(s.ids), _plain(s.samples)) for s in selections])
    state = partial.resume({
        "totals": torch.zeros(len(groups), n_layers, d_model, dtype=torch.float64),
        "batches": 0,
    })
    totals, done = state["totals"], state["batches"]
    announce_resume("extract", "batch", done, len(batches))
    tokens = [sum(len(selections[i].ids) for i in batch) for batch in batches]
    per_request = BATCHES_PER_REQUEST if lm.remote else 1
    with tqdm(total=sum(tokens), initial=sum(tokens[:done]), desc="residuals", unit="tok",
              disable=not progress) as bar:
        while done < len(batches):
            end = min(done + per_request, len(batches))
            inputs = [_batch_inputs([selections[i] for i in batch], groups)
                      for batch in batches[done:end]]
            reading = [b for b in inputs if len(b.rows)]  # else no sample reads the batch
            what = (f"extract batch {end}/{len(batches)}" if end == done + 1
                    else f"extract batches {done + 1}-{end}/{len(batches)}")
            if reading:
                layer_sums = with_retries(lambda: _reduce_batches(lm, reading), what=what,
                                          jobs=partial.jobs())
                for sums in layer_sums:  # batch by batch, as one batch per request adds them
                    totals += sums.to("cpu", torch.float64).transpose(0, 1)
            partial.save({"totals": totals, "batches": end})
            bar.update(sum(tokens[done:end]))
            done = end
    return MeanSums(dict(zip(groups, totals)), counts)


#: Batches one NDIF request runs (one session, a trace per batch); locally, one each.
BATCHES_PER_REQUEST = 8


def _plain(samples: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    """``samples`` as JSON-serialisable lists."""
    return {group: [list(sample) for sample in lists] for group, lists in samples.items()}


@dataclass(frozen=True)
class _Batch:
    """Model inputs of a left-padded batch and what to read from its activations.

    ``rows`` indexes the flattened ``[B * T]`` positions that any sample uses;
    ``weights[r, k]`` is the sum over group k's samples holding ``rows[r]`` of
    ``1/len(sample)``.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor


def _batch_inputs(selections: Sequence[Selection], groups: Sequence[str]) -> _Batch:
    """Left-pad ``selections`` and weight their samples (a position repeated in a sample counts once)."""
    width = max(len(s.ids) for s in selections)
    ids = torch.zeros(len(selections), width, dtype=torch.long)
    mask = torch.zeros(len(selections), width, dtype=torch.long)
    flat: list[int] = []
    column: list[int] = []
    value: list[float] = []
    for b, selection in enumerate(selections):
        length = len(selection.ids)
        pad = width - length
        ids[b, pad:] = torch.tensor(list(selection.ids), dtype=torch.long)
        mask[b, pad:] = 1
        for k, group in enumerate(groups):
            for sample in selection.samples.get(group, ()):
                positions = sorted(set(sample))
                if not positions:
                    continue
                if not 0 <= positions[0] <= positions[-1] < length:
                    raise ValueError(f"sample {positions} outside a sequence of {length} tokens")
                flat += [b * width + pad + p for p in positions]
                column += [k] * len(positions)
                value += [1.0 / len(positions)] * len(positions)
    dense = torch.zeros(len(selections) * width, len(groups), dtype=torch.float64)
    dense.index_put_(
        (torch.tensor(flat, dtype=torch.long), torch.tensor(column, dtype=torch.long)),
        torch.tensor(value, dtype=torch.float64),
        accumulate=True,
    )
    rows = dense.ne(0).any(1).nonzero().squeeze(1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return _Batch(ids, mask, position_ids, rows, dense[rows].float())


def _reduce_batches(lm: LoadedModel, batches: Sequence[_Batch]) -> torch.Tensor:
    """``[n_batches, n_layers, n_groups, d_model]``: per batch, ``weightsᵀ · h_l[rows]``
    for every block output ``h_l``, in one session (one NDIF request).

    Only the token ids (int32) and each row's length go up for the model's inputs; the
    attention mask and position ids are built on the server. float32, contracted in
    float64: autocast (NDIF runs every request under bf16 autocast) leaves float64 matmuls
    alone, so only the activations themselves are bf16 there.
    """
    layers = [lm.layers[i] for i in range(lm.arch.n_layers)]
    sent = [(b.ids.int(), b.mask.sum(1).int(), b.rows, b.weights) for b in batches]
    # The block reads no module-level name (NDIF's newer sandbox runs it without them).
    stack, arange, float64 = torch.stack, torch.arange, torch.float64
    m = lm.nn
    with m.session(**lm.remote_options()):
        reduced = [].save()
        for ids, lengths, rows, weights in sent:
            width = ids.shape[1]
            mask = (arange(width)[None, :] >= (width - lengths.long())[:, None]).long()
            with m.trace(input_ids=ids.long(), attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)) as tracer:
                sums = []
                for layer in layers:
                    h = layer.output
                    rows = rows.to(h.device)
                    weights = weights.to(h.device, float64)
                    picked = h.reshape(-1, h.shape[-1]).index_select(0, rows).double()
                    sums.append((weights.T @ picked).float())
                reduced.append(stack([s.to(h.device) for s in sums]).cpu())
                tracer.stop()
    return stack(list(reduced))
