"""Attribution patching: how much would adding ``u_l^c`` before a span of ``c`` change the model?

For every span of label ``c``, the *probe* is the token just before the span's first
token (the prediction point of that token). Adding ``u_l^c`` to the residual stream at
layer ``l`` and the probe position changes a loss ``L`` of the next-token prediction
there by ``ΔL ≈ u_l^c · ∂L/∂a_l`` (paper, Figure 3). Metrics (``metric=``):

- ``released-code``: the authors' computation, reproduced as a baseline. Their loss is
  ``F.kl_div(log_softmax(z), log_softmax(z).detach(), reduction="batchmean")`` on the
  probe's logits ``z`` (a 1-D tensor, so "batchmean" divides by the vocabulary size);
  without ``log_target=True`` its value is NaN and its gradient is ``-log_softmax(z)/V``
  pushed through ``log_softmax``, which is not a KL gradient. The vector is scaled to unit
  norm; ``ΔL = û · ∂L/∂a_l``. The released code also probes a label's vector before the
  spans of every *other* label (reproduce with ``spans="others"``) and averages per chain
  before averaging over chains (reproduce with ``aggregate="chains"``; the default
  ``"spans"`` pools all spans). The per-span effects are kept in
  ``attribution_spans.parquet`` for any other aggregation.
- ``nll``: negative log-likelihood of the span's actual first token; ``ΔL = u · ∂L/∂a_l``.
- ``kl2``: the first non-zero term of the real KL: ``½ (J u)ᵀ (diag p − p pᵀ) (J u)``
  with ``J u`` the Jacobian-vector product of the probe's logits with respect to ``a_l``.
- ``exact``: the ground truth: really add ``u`` at layer ``l`` and the probe, and measure
  ``KL(clean ‖ patched)`` of the next-token distributions.

Exactness at low cost: the loss at position ``p`` depends on ``a_l(p)`` only through
position ``p``'s own computation, given the keys and values of the earlier positions. So
each chain gets one clean forward pass that fills a KV cache, then its probes run as a
batch of one-token forward (and backward) passes on that cache, each row with the cache
cut at its own position: every probe gets its own exact gradient, not that of a sum over
spans. ``exact`` and ``kl2`` replicate each probe once per layer (patched at a different
layer in each row). Everything runs in one nnsight session per chain, on NDIF too; only
the per-probe, per-layer effects come back.

Example:
    >>> df = attribute(RunDir("runs/smollm2-135m"), load_model(), metric="nll", validate=16)
    >>> figure3_chart(df).save("attribution.html")   # nnsteer.selection.figure3
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import polars as pl
import torch

from nnsteer.errors import BadInput, say
from nnsteer.labels import STEERED_LABELS
from nnsteer.modeling.identity import check_fits
from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.positions import overlapping_tokens, token_offsets
from nnsteer.ndif.remote import with_retries
from nnsteer.runs.checkpoint import Checkpoint, announce_resume
from nnsteer.runs.store import RunDir, provenance, write_parquet
from nnsteer.selection.layers import no_steered_vector
from nnsteer.vectors.extract import VectorSet, check_current, load_vectors, read_inputs

#: First-order estimates ``ΔL = u · ∂L/∂a_l`` (one backward pass per batch of probes).
FIRST_ORDER = ("released-code", "nll")
#: Metrics computed on one row per (probe, layer).
PER_LAYER = ("kl2", "exact")
ATTRIBUTION_METRICS: tuple[str, ...] = FIRST_ORDER + PER_LAYER
#: Which spans a label's vector is probed at: its own (paper), or every other label's
#: (what the released code does: it skips the label's own spans).
SPAN_SOURCES: tuple[str, ...] = ("own", "others")
#: How ``|ΔL|`` is averaged per (label, layer): over all spans pooled (std with ddof 1), or
#: per chain over its spans and then over chains (std with ddof 0: the released figure).
AGGREGATIONS: tuple[str, ...] = ("spans", "chains")

SPANS_FILE = "attribution_spans.parquet"
#: Attention kernels per trace: every fused one by default; kl2's JVP needs a second
#: derivative that only the math kernel has.
#: Names of ``torch.nn.attention.SDPBackend`` members (the enum itself cannot be pickled).
ALL_KERNELS = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
SECOND_ORDER_KERNELS = ("MATH",)


@dataclass(frozen=True)
class Probe:
    """Where one span's vector is probed: the prediction point of the span's first token."""

    chain_id: str
    label: str  # the label whose vector is added
    span_label: str  # the label of the span (differs from ``label`` with spans="others")
    position: int  # full-sequence position of the token before the span
    target: int  # id of the span's first token (the ``nll`` target)


def check_option(option: str, value: str, choices: Sequence[str]) -> None:
    """:class:`BadInput` naming ``--option`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise BadInput(f"--{option} {value!r}: expected one of {', '.join(choices)}")


def check_vectors(vs: VectorSet, lm: LoadedModel, source: str = "vectors") -> None:
    """:class:`BadInput` if the vectors were not made for ``lm`` (other model or width)."""
    made_for = (vs.metadata.get("model") or {}).get("model")
    if made_for is not None and made_for != lm.name:
        raise BadInput(f"{source}: vectors were extracted from {made_for!r}, not {lm.name!r}; "
                       "rerun `nnsteer extract` with this model")
    check_fits(vs.n_layers, vs.d_model, lm, source)


def find_probes(
    chains: pl.DataFrame,
    annotations: pl.DataFrame,
    tokenizer: Any,
    labels: Sequence[str],
    spans: str = "own",
) -> list[Probe]:
    """The probes of every ``ok`` span, for each label's vector, ordered by chain and position.

    ``chains`` needs ``chain_id``, ``prompt_ids``, ``output_ids``; ``annotations`` needs
    ``chain_id``, ``label``, ``start``, ``end``, ``status``. Spans covering no token, or
    whose probe would be position 0 (no context), are left out.
    """
    check_option("spans", spans, SPAN_SOURCES)
    ok = annotations.filter(pl.col("status") == "ok")
    by_chain: dict[str, list[dict]] = defaultdict(list)
    for row in ok.select("chain_id", "label", "start", "end").iter_rows(named=True):
        by_chain[row["chain_id"]].append(row)
    probes = []
    for chain in chains.select("chain_id", "prompt_ids", "output_ids").iter_rows(named=True):
        chain_spans = by_chain.get(chain["chain_id"])
        if not chain_spans:
            continue
        output_ids = list(chain["output_ids"])
        offsets = token_offsets(tokenizer, output_ids)
        prompt_len = len(chain["prompt_ids"])
        for span in chain_spans:
            tokens = overlapping_tokens(offsets, span["start"], span["end"])
            if not tokens or prompt_len + tokens[0] < 1:
                continue
            for label in labels:
                if (span["label"] == label) == (spans == "own"):
                    probes.append(Probe(chain["chain_id"], label, span["label"],
                                        prompt_len + tokens[0] - 1, output_ids[tokens[0]]))
    return sorted(probes, key=lambda p: (p.chain_id, p.position, p.label))


#: Probe rows one NDIF request runs at most (one row per probe; ``n_layers + 1`` per probe
#: for kl2 and exact), in whole chains, at least one: one session, a clean pass per chain
#: and its probe batches. The label vectors travel once per request, so fewer is leaner;
#: this bounds a request's time (NDIF stops jobs after an hour).
REQUEST_ROWS = 4096


def probe_effects(
    lm: LoadedModel,
    sequences: dict[str, Sequence[int]],
    probes: Sequence[Probe],
    vectors: dict[str, torch.Tensor],
    metric: str = "nll",
    batch_size: int = 8,
    progress: bool = True,
    checkpoint: Path | None = None,
    rows_per_request: int = REQUEST_ROWS,
) -> torch.Tensor:
    """Effect of each label's vector at every layer, per probe: float32 ``[n_probes, n_layers]``.

    First-order metrics give the signed ``ΔL``; ``kl2`` and ``exact`` give KL values.
    ``sequences`` maps ``chain_id`` to the chain's full token ids (prompt + output);
    ``vectors`` maps each probed label to its ``[n_layers, d_model]`` tensor. Requests
    hold whole chains, up to ``rows_per_request`` probe rows (:data:`REQUEST_ROWS`; the
    result does not depend on it). With
    ``checkpoint``, the effects of the finished chains are saved there after each
    request, and a rerun with the same model, probes, chains, vectors, metric and batch
    size skips those chains, with the same result as an uninterrupted run.
    """
    from tqdm import tqdm

    check_option("metric", metric, ATTRIBUTION_METRICS)
    if rows_per_request < 1:
        raise BadInput(f"rows per request must be at least 1, not {rows_per_request}")
    effects = torch.empty(len(probes), lm.arch.n_layers)
    if not probes:
        return effects
    table_labels = sorted({p.label for p in probes})
    table = torch.stack([vectors[label].float() for label in table_labels])
    if metric == "released-code":
        table = table / table.norm(dim=-1, keepdim=True)
    table = table.to(lm.dtype)
    by_chain: dict[str, list[int]] = defaultdict(list)
    for i, probe in enumerate(probes):
        by_chain[probe.chain_id].append(i)
    chains = list(by_chain.items())
    partial = Checkpoint.of(checkpoint, lm.identity(), metric, batch_size, table,
                            [astuple(p) for p in probes],
                            {chain_id: list(sequences[chain_id]) for chain_id in by_chain})
    state = partial.resume({"effects": effects, "chains": 0})
    effects, done = state["effects"], state["chains"]
    announce_resume("attribute", "chain", done, len(chains))
    per_layer = metric in PER_LAYER
    per_trace = max(1, batch_size // (lm.arch.n_layers + 1)) if per_layer else batch_size
    reps = lm.arch.n_layers + 1 if per_layer else 1
    with tqdm(total=len(chains), initial=done, desc=f"attribute ({metric})", unit="chain",
              disable=not progress, file=sys.stderr) as bar:
        while done < len(chains):
            group = chains[done:_request_end(chains, done, rows_per_request // reps)]
            members = [i for _, chain_members in group for i in chain_members]
            # Only the vectors of these chains' labels travel, once for the whole request.
            present = sorted({probes[i].label for i in members})
            index = {label: j for j, label in enumerate(present)}
            request_table = table[[table_labels.index(label) for label in present]]
            request = [_chain_request(sequences[chain_id], [probes[i] for i in chain_members],
                                      index, per_trace, lm.arch.pads_forward)
                       for chain_id, chain_members in group]
            request_effects = with_retries(
                lambda: _request_effects(lm, request, request_table, metric),
                what=f"attribute chains {done + 1}-{done + len(group)}/{len(chains)}",
                jobs=partial.jobs())
            effects[members] = request_effects.float().cpu()
            done += len(group)
            partial.save({"effects": effects, "chains": done})
            bar.update(len(group))
    return effects


def _request_end(chains: list[tuple[str, list[int]]], start: int, probes: int) -> int:
    """Where the request that starts at chain ``start`` ends: at least one chain, and no
    more than ``probes`` probes unless its first chain alone has more."""
    end, total = start + 1, len(chains[start][1])
    while end < len(chains) and total + len(chains[end][1]) <= probes:
        total += len(chains[end][1])
        end += 1
    return end


def _chain_request(sequence: Sequence[int], probes: list[Probe], index: dict[str, int],
                   per_trace: int, pads: bool = True) -> dict:
    """What one chain's probes send: the token ids up to the last probe's target (int32),
    and per trace the probes' positions and label indices (int32); the server derives
    the rest (probe tokens, targets, masks, cache indices, patched layers). Without
    ``pads`` (a model whose outputs left padding changes) a trace holds probes of one
    position only, so that none is padded."""
    end = max(p.position for p in probes) + 2
    groups = [probes] if pads else [list(g) for _, g in groupby(probes, key=lambda p: p.position)]
    traces = [group[s:s + per_trace] for group in groups for s in range(0, len(group), per_trace)]
    return {
        "ids": torch.tensor([list(sequence[:end])], dtype=torch.int32),
        "batches": [{"positions": torch.tensor([p.position for p in trace], dtype=torch.int32),
                     "labels": torch.tensor([index[p.label] for p in trace], dtype=torch.int32)}
                    for trace in traces],
    }


def _request_effects(lm: LoadedModel, chains: list[dict], table: torch.Tensor,
                     metric: str) -> torch.Tensor:
    """The effects of every probe of ``chains`` (:func:`_chain_request`), in order:
    ``[n_probes, n_layers]``.

    One session: per chain, a clean forward over the chain fills the KV cache, then one
    one-token trace per batch of probes. Row ``b`` sees the cache of positions ``< p_b``,
    left-padded to the batch's widest prefix (pads point at position 0 and are masked
    out). ``exact`` and ``kl2`` give each probe ``n_layers + 1`` rows: row 0 clean, row
    ``l + 1`` patched at layer ``l``. A model without a plain KV cache
    (``Architecture.plain_kv_cache``) runs each row's whole prefix instead of the cache.
    """
    m, layers, n_layers = lm.nn, lm.layers, lm.arch.n_layers
    embed = lm.arch.embed(m)
    released, second_order = metric == "released-code", metric == "kl2"
    first_order = metric in FIRST_ORDER
    reps = 1 if first_order else n_layers + 1
    kernels = SECOND_ORDER_KERNELS if second_order else ALL_KERNELS
    options = lm.remote_options()
    # The block reads no module-level name (NDIF's newer sandbox runs it without them):
    # what it needs from torch is bound here. Its source is re-read remotely: no comment
    # lines or multi-line statements before a nested `with`. The cache's argument name,
    # and its class, are the server's own (its transformers may differ from this one's).
    arange, cat, eye, zeros, stack, float32 = (torch.arange, torch.cat, torch.eye, torch.zeros,
                                               torch.stack, torch.float32)
    grad, kl_div, attention = torch.autograd.grad, torch.nn.functional.kl_div, torch.nn.attention
    # Without a plain KV cache (sliding windows, linear attention, Mamba: see
    # Architecture.plain_kv_cache) each row runs its probe's whole prefix, patched at its last
    # position only: exact, at one prefix per probe.
    plain = lm.arch.plain_kv_cache
    with m.session(**options):
        results = [].save()
        for chain in chains:
            ids = chain["ids"].long()
            width = max(int(batch["positions"].max()) for batch in chain["batches"])
            with m.trace(input_ids=ids[:, :width if plain else 1]):
                output = m.output
            cache_name = "cache" if "cache" in output else "past_key_values"
            cache = output[cache_name] if plain else None
            kv = [(layer.keys, layer.values) for layer in cache.layers] if plain else []
            for batch in chain["batches"]:
                positions = batch["positions"].long()
                rows, batch_width = positions.shape[0] * reps, int(positions.max())
                offset = arange(batch_width)[None, :] - (batch_width - positions[:, None])
                index = offset.clamp(min=0).repeat_interleave(reps, 0)
                mask = cat([offset >= 0, (positions[:, None] >= 0)], 1).long().repeat_interleave(reps, 0)
                token, position = ids[0, positions][:, None].repeat_interleave(reps, 0), positions[:, None].repeat_interleave(reps, 0)
                inputs = {"input_ids": token, "position_ids": position, "attention_mask": mask, cache_name: cache} if plain else {"input_ids": cat([ids[0][index], token], 1), "position_ids": cat([index, position], 1), "attention_mask": mask, "use_cache": False}
                labels = batch["labels"].long().repeat_interleave(reps, 0)
                targets = ids[0, positions + 1]
                patch = cat([zeros(1, n_layers, dtype=float32), eye(n_layers, dtype=float32)]).repeat(positions.shape[0], 1)
                for layer, (k, v) in zip(cache.layers if plain else [], kv):
                    layer.keys, layer.values = k[0][:, index.to(k.device)].transpose(0, 1), v[0][:, index.to(v.device)].transpose(0, 1)
                with attention.sdpa_kernel([getattr(attention.SDPBackend, name) for name in kernels]):
                    with m.trace(**inputs):
                        if first_order:
                            embed.output.requires_grad_(True)
                            hs = [layers[i].output for i in range(n_layers)]
                        else:
                            scale = patch.new_full((rows,), 0.0 if second_order else 1.0).requires_grad_(second_order)
                            where = patch * scale[:, None]
                            delta = table[labels, patch.argmax(1)]
                            for i in range(n_layers):
                                h = layers[i].output
                                step = where[:, i, None].to(h.device) * delta.to(h.device)
                                layers[i].output = cat([h[:, :-1], h[:, -1:] + step.to(h.dtype)[:, None]], 1)
                        logits = m.output.logits[:, -1]
                        if released:
                            logp = logits.log_softmax(-1)
                            # "batchmean" on one [V] logit vector divides by V: so, row by row.
                            loss = kl_div(logp, logp.detach(), reduction="sum")
                            loss = loss / logits.shape[-1]
                        elif first_order:
                            logp = logits.float().log_softmax(-1)
                            loss = -logp.gather(1, targets.to(logp.device)[:, None]).sum()
                        if first_order:
                            grads = grad(loss, hs)
                            u = table[labels]
                            value = stack([(g[:, -1].float() * u[:, i].to(g.device).float()).sum(-1).cpu() for i, g in enumerate(grads)], 1)
                        elif second_order:
                            z = logits.float()
                            weights = z.new_zeros(z.shape).requires_grad_(True)
                            (wju,) = grad((weights * z).sum(), scale, create_graph=True)
                            (ju,) = grad(wju.sum(), weights)
                            p = z.softmax(-1).detach()
                            value = 0.5 * ((p * ju * ju).sum(-1) - (p * ju).sum(-1) ** 2)
                            value = value.view(-1, n_layers + 1)[:, 1:]
                        else:
                            logq = logits.float().log_softmax(-1).view(-1, n_layers + 1, logits.shape[-1])
                            clean = logq[:, :1]
                            value = (clean.exp() * (clean - logq[:, 1:])).sum(-1)
                        results.append(value.detach().cpu())
    return cat(list(results))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their mean rank); NaN if either side is constant."""
    rx, ry = _ranks(torch.as_tensor(x, dtype=torch.float64)), _ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / denominator) if denominator > 0 else float("nan")


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(len(values), dtype=values.dtype)
    for value in values.unique():
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def layer_effects(probes: Sequence[Probe], effects: torch.Tensor, metric: str,
              aggregate: str = "spans") -> pl.DataFrame:
    """Per (label, layer): mean and std of ``|effect|`` (see :data:`AGGREGATIONS`).

    ``aggregate="spans"`` pools the label's probes (std with ddof 1); ``"chains"`` first
    averages each chain's probes, then takes the mean and the std (ddof 0) over chains.
    """
    check_option("aggregate", aggregate, AGGREGATIONS)
    labels = [p.label for p in probes]
    rows = []
    for label in dict.fromkeys(labels):
        members = [i for i, name in enumerate(labels) if name == label]
        values = effects[members].abs().double()
        by_chain: dict[str, list[int]] = defaultdict(list)
        for k, i in enumerate(members):
            by_chain[probes[i].chain_id].append(k)
        if aggregate == "chains":
            values = torch.stack([values[rows_of].mean(0) for rows_of in by_chain.values()])
            std = values.std(0, correction=0)
        else:
            std = values.std(0) if len(values) > 1 else torch.zeros(values.shape[1], dtype=torch.float64)
        for layer in range(values.shape[1]):
            rows.append({"label": label, "layer": layer, "effect": values[:, layer].mean().item(),
                         "std": std[layer].item(), "n_spans": len(members), "metric": metric,
                         "n_chains": len(by_chain)})
    return pl.DataFrame(rows, schema={"label": pl.String, "layer": pl.Int64, "effect": pl.Float64,
                                      "std": pl.Float64, "n_spans": pl.Int64, "metric": pl.String,
                                      "n_chains": pl.Int64})


def validation_sample(probes: Sequence[Probe], n: int) -> list[int]:
    """Indices of up to ``n`` probes per label, evenly spread over the label's probes."""
    chosen = []
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, probe in enumerate(probes):
        by_label[probe.label].append(i)
    for members in by_label.values():
        step = len(members) / min(n, len(members))
        chosen += [members[int(k * step)] for k in range(min(n, len(members)))]
    return sorted(chosen)


#: Metrics that ``--validate`` always compares with exact patching, besides the chosen one.
VALIDATION_REFERENCES = ("nll", "released-code")


def validate_against_exact(
    lm: LoadedModel, sequences: dict[str, Sequence[int]], probes: Sequence[Probe],
    effects: torch.Tensor, vectors: dict[str, torch.Tensor], n: int, metric: str,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The per-layer profiles of ``metric``, ``released-code`` and exact patching on the
    same ``n`` probes per label, and the Spearman correlation over layers of each
    estimate's mean ``|ΔL|`` with the exact KL.

    Returns ``{"spearman": {metric: {label: rho}}, "profiles": [{label, layer, metric,
    effect, n_spans}, ...]}``; the metrics of :data:`VALIDATION_REFERENCES` are added, to
    show whether the released code's metric tracks the real patching effect.
    """
    chosen = validation_sample(probes, n)
    sample = [probes[i] for i in chosen]
    estimates = {metric: effects[chosen]}
    for other in VALIDATION_REFERENCES:
        if other not in estimates:
            estimates[other] = probe_effects(lm, sequences, sample, vectors, other, batch_size)
    truth = layer_effects(sample, probe_effects(lm, sequences, sample, vectors, "exact", batch_size),
                      "exact")
    profiles = [truth]
    spearmans: dict[str, dict[str, float]] = {}
    for name, values in estimates.items():
        estimate = layer_effects(sample, values, name)
        profiles.append(estimate)
        spearmans[name] = {
            label: spearman(estimate.filter(pl.col("label") == label)["effect"].to_list(),
                            truth.filter(pl.col("label") == label)["effect"].to_list())
            for label in dict.fromkeys(p.label for p in sample)}
    rows = pl.concat(profiles).select("label", "layer", "metric", "effect", "n_spans")
    return {"spearman": spearmans, "profiles": rows.to_dicts()}


def attribute(
    run: RunDir,
    lm: LoadedModel,
    *,
    metric: str = "nll",
    batch_size: int = 8,
    validate: int = 0,
    spans: str = "own",
    labels: Sequence[str] | None = None,
    aggregate: str = "spans",
    limit: int | None = None,
    rows_per_request: int = REQUEST_ROWS,
) -> pl.DataFrame:
    """Write ``attribution.parquet`` (per label and layer) and ``attribution_spans.parquet``.

    ``labels`` defaults to the steered labels that have a vector; a default label with
    no span is skipped with a warning, a label asked for by name must have spans.
    ``aggregate`` says how the per-span effects are averaged (:func:`layer_effects`);
    ``limit`` probes only the first N chains of ``chains.parquet``;
    ``rows_per_request`` bounds what one NDIF request runs (:func:`probe_effects`).
    ``validate=N`` also runs ``exact`` on N probes per label and records the Spearman
    correlation of the two per-layer profiles in the metadata (``validation``), and in
    ``validation_detail`` the profiles, with ``released-code``'s too
    (:func:`validate_against_exact`).
    Resumable: the finished chains are kept in ``run.partial("attribute")`` until both
    files are written.
    """
    check_option("metric", metric, ATTRIBUTION_METRICS)
    check_option("spans", spans, SPAN_SOURCES)
    check_option("aggregate", aggregate, AGGREGATIONS)
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, not {limit}")
    vs = load_vectors(run.vectors)
    check_vectors(vs, lm, str(run.vectors))
    check_current(vs, run)
    asked = list(labels) if labels else [label for label in STEERED_LABELS if label in vs.vectors]
    if not asked:
        raise BadInput(no_steered_vector(run))
    for label in asked:
        vs[label]  # BadInput naming the labels the vector set has
    chains, annotations = read_inputs(run, lm.name)
    if limit is not None:
        chains = chains.head(limit)
    probes = find_probes(chains, annotations, lm.tokenizer, asked, spans)
    found = {p.label for p in probes}
    missing = [label for label in asked if label not in found]
    if missing and (labels or not found):
        raise BadInput(f"{run.annotations}: no usable {spans!r} span for label(s) "
                       f"{', '.join(missing)}")
    for label in missing:
        say(f"warning: no span for {label!r} in {run.annotations}; skipped")
    sequences = {row["chain_id"]: list(row["prompt_ids"]) + list(row["output_ids"])
                 for row in chains.iter_rows(named=True)}
    partial = run.partial("attribute")
    effects = probe_effects(lm, sequences, probes, vs.vectors, metric, batch_size,
                            checkpoint=partial, rows_per_request=rows_per_request)
    options = {"metric": metric, "batch_size": batch_size, "validate": validate, "spans": spans,
               "labels": asked, "aggregate": aggregate, "limit": limit}
    meta = provenance("attribute", options, lm.provenance())
    if validate:
        detail = validate_against_exact(lm, sequences, probes, effects, vs.vectors,
                                        validate, metric, batch_size)
        meta["validation"] = detail["spearman"][metric]
        meta["validation_detail"] = detail
    df = layer_effects(probes, effects, metric, aggregate)
    write_parquet(_span_table(probes, effects, metric), run.path(SPANS_FILE), meta)
    write_parquet(df, run.attribution, meta)
    partial.unlink(missing_ok=True)
    return df


def _span_table(probes: Sequence[Probe], effects: torch.Tensor, metric: str) -> pl.DataFrame:
    """One row per probe: where it is and its effect at every layer."""
    return pl.DataFrame({
        "chain_id": [p.chain_id for p in probes],
        "label": [p.label for p in probes],
        "span_label": [p.span_label for p in probes],
        "position": [p.position for p in probes],
        "target": [p.target for p in probes],
        "metric": [metric] * len(probes),
        "effects": effects.tolist(),
    }, schema_overrides={"effects": pl.List(pl.Float64)})
