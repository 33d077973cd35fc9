"""Thresholds of conditional steering (``steer --when``), calibrated on the training chains.

For each label in ``layers.json`` that has a vector, and each layer, every generated token
of the unsteered training chains is projected, at its own position, on the label's unit
vector at that layer (the residual after that decoder block, as ``--when`` reads it).
Tokens inside the label's spans are the positives; the threshold maximises F1 of
``projection > threshold`` (:func:`nnsteer.generation.modes.calibrate_threshold`). The result is
added to each entry of ``layers.json`` as ``conditions``: ``{"<layer>": {threshold,
precision, recall, f1, n_inside, n_outside}}``, with ``provenance.calibrate_conditions``.

Example:
    >>> found = calibrate_conditions(RunDir("runs/demo"), lm)
    >>> found["uncertainty-estimation"][12]["f1"]
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from nnsteer.errors import BadInput
from nnsteer.generation.modes import calibrate_threshold
from nnsteer.generation.spec import unit
from nnsteer.modeling.models import LoadedModel
from nnsteer.ndif.remote import with_retries
from nnsteer.runs.store import RunDir, provenance, read_json, write_json
from nnsteer.vectors.extract import (
    AnnotatedChain,
    annotated_chains,
    load_vectors,
    read_inputs,
)


def calibrate_conditions(run: RunDir, lm: LoadedModel, *, batch_size: int = 8,
                         progress: bool = True) -> dict[str, dict[int, dict[str, float]]]:
    """Calibrate every ``layers.json`` label with a vector at every layer; add the results
    to ``layers.json`` and print each label's best layer. Returns ``{label: {layer: stats}}``."""
    if batch_size < 1:
        raise BadInput(f"--batch-size must be at least 1, not {batch_size}")
    entries = read_json(run.layers)
    vector_set = load_vectors(run.vectors)
    labels = [label for label in entries if label in vector_set.vectors]
    if not labels:
        raise BadInput(f"{run.layers}: none of its labels has a vector in {run.vectors}")
    chains, spans = read_inputs(run, lm.name)
    annotated = annotated_chains(chains, spans, lm.tokenizer)
    units = torch.stack([torch.stack([unit(v) for v in vector_set[label]]) for label in labels])
    inside: dict[tuple[str, int], list[torch.Tensor]] = {}
    outside: dict[tuple[str, int], list[torch.Tensor]] = {}
    bar = tqdm(total=len(annotated), unit="chain", desc="calibrate", disable=not progress)
    projections: dict[int, torch.Tensor] = {}  # per chain: [layers, labels, generated]
    for k, batch in enumerate(lm.arch.batches([len(c.ids) for c in annotated], batch_size), 1):
        projected = with_retries(
            lambda: _project(lm, [annotated[i] for i in batch], units.transpose(0, 1)),
            what=f"calibrate batch {k}")
        projections.update(zip(batch, projected))
        bar.update(len(batch))
    bar.close()
    for i, chain in enumerate(annotated):
        values = projections[i]
        for k, label in enumerate(labels):
            mask = _inside(chain, label, values.shape[-1])
            for layer in range(values.shape[0]):
                inside.setdefault((label, layer), []).append(values[layer, k][mask])
                outside.setdefault((label, layer), []).append(values[layer, k][~mask])
    found: dict[str, dict[int, dict[str, float]]] = {}
    for label in labels:
        if not any(t.numel() for t in inside[(label, 0)]):
            print(f"{label}: no labelled token in the training chains: not calibrated")
            continue
        found[label] = {layer: calibrate_threshold(torch.cat(inside[(label, layer)]),
                                                   torch.cat(outside[(label, layer)]))
                        for layer in range(units.shape[1])}
        best = max(found[label], key=lambda layer: found[label][layer]["f1"])
        stats = found[label][best]
        print(f"{label}: best layer {best}: threshold {stats['threshold']:.4g}, precision "
              f"{stats['precision']:.3f}, recall {stats['recall']:.3f}, F1 {stats['f1']:.3f} "
              f"({stats['n_inside']} labelled of {stats['n_inside'] + stats['n_outside']} tokens)")
    made = provenance("select", {"calibrate_conditions": True, "batch_size": batch_size},
                      lm.provenance())
    for label, layers in found.items():
        entry = entries[label]
        entry["conditions"] = {str(layer): stats for layer, stats in layers.items()}
        entry["provenance"] = {**entry.get("provenance", {}), "calibrate_conditions": made}
    write_json(run.layers, entries)
    return found


def _inside(chain: AnnotatedChain, label: str, n_generated: int) -> torch.Tensor:
    """Which generated tokens of ``chain`` lie in its ``label`` spans."""
    mask = torch.zeros(n_generated, dtype=torch.bool)
    for span in chain.spans:
        if span.label == label:
            for position in chain.tokens(span.start, span.end):
                mask[position - chain.prompt_len] = True
    return mask


def _project(lm: LoadedModel, batch: list[AnnotatedChain], units: torch.Tensor) -> list[torch.Tensor]:
    """Per chain ``[layers, labels, generated tokens]``: each generated token's residual
    projected on ``units`` (``[layers, labels, d_model]``, float32) at every layer."""
    ids = lm.tokenizer.pad({"input_ids": [c.ids for c in batch]}, padding=True,
                           padding_side="left", return_tensors="pt")
    width = ids["input_ids"].shape[1]
    keep = max(len(c.ids) - c.prompt_len for c in batch)
    layers, n_layers, n_rows = lm.layers, lm.arch.n_layers, len(batch)
    positions = (ids["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with lm.nn.trace(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                     position_ids=positions, **lm.remote_options()):
        out = units.new_zeros(n_layers, n_rows, keep, units.shape[1])
        for layer in range(n_layers):
            h = layers[layer].output[:, width - keep:].float()
            u = units[layer].to(h.device)
            for k in range(u.shape[0]):
                out[layer, :, :, k] = (h * u[k]).sum(-1).to(out.device)
        out = out.save()
    result = []
    for row, chain in enumerate(batch):
        n = len(chain.ids) - chain.prompt_len
        result.append(out[:, row, keep - n:, :].permute(0, 2, 1).contiguous())
    return result
