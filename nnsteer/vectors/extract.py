"""Candidate steering vectors: difference of means at every layer, and their file.

For every label c and layer l (the output of decoder block l, counted from 0),
``u_l^c = mean of the label's samples - mean of the overall samples``, where each sample
is the mean activation over a set of token positions of one chain (METHOD.md,
"Candidate steering vectors"). The two variants differ in what a sample is:

``paper`` (the paper's formula)
    Label sample: one per chain with the label, over ``seq_c(p)``: every token whose
    characters overlap a span of c plus the token just before each span, each position
    once per chain. Overall sample: one per chain, over the tokens of its reasoning
    (``thinking_start..thinking_end``). No rescaling.
``released-code`` (the authors' ``train_vectors.py`` and ``load_model_and_vectors``)
    Label sample: one per span, over positions ``[first - 1, min(last, first + 10))``
    where ``first``/``last`` are the span's first and last token (the prediction points
    of its first tokens, at most 11). Overall sample: one per chain with spans, over
    every token from its first annotated token to its last. Each label vector is then
    rescaled at every layer to the norm of the overall mean at that layer (a zero
    difference stays zero where the released code gives NaN).

Both are stored with ``overall`` (the overall mean activation itself) in a
:class:`VectorSet`, written as ``vectors.safetensors`` (CONTRACTS.md): one float32
``[n_layers, d_model]`` tensor per label, metadata as a JSON string under the
``__metadata__`` entry ``nnsteer``. Positions come from the chains' stored token ids.

Example:
    >>> vs = extract_vectors(RunDir("runs/smollm2-135m"), lm, variant="paper")
    >>> vs = load_vectors("runs/smollm2-135m/vectors.safetensors")
    >>> vs.labels, vs.n_layers, vs.d_model
    (['initializing', ...], 30, 576)
    >>> vs["backtracking"][12]                  # u_12 for backtracking
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch

from nnsteer.annotation.spans import Span
from nnsteer.annotation.stage import check_annotated, label_positions, spans_by_chain
from nnsteer.errors import BadInput, say
from nnsteer.labels import LABELS, OVERALL, STEERED_LABELS
from nnsteer.modeling.identity import application
from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.positions import (
    decode_response,
    overlapping_tokens,
    token_offsets,
)
from nnsteer.runs.store import (
    RunDir,
    atomic_path,
    damaged,
    file_digest,
    provenance,
    read_complete,
    read_metadata,
    read_parquet,
    require,
)
from nnsteer.vectors.residuals import Selection, sum_sample_means

#: How each variant rescales its vectors (recorded in the metadata).
NORMALISATION: dict[str, str] = {"paper": "none", "released-code": "overall-norm-per-layer"}
VARIANTS: tuple[str, ...] = tuple(NORMALISATION)

CHAIN_COLUMNS = ["chain_id", "model", "prompt_ids", "output_ids", "response",
                 "thinking_start", "thinking_end"]
SPAN_COLUMNS = ["chain_id", "label", "start", "end", "text", "status"]
#: At most this many positions per span in the released-code variant.
RELEASED_WINDOW = 11


@dataclass
class VectorSet:
    """Steering vectors by label (float32 ``[n_layers, d_model]``, ``overall`` included)."""

    vectors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        """The behaviour labels that have a vector (``overall`` left out)."""
        return [label for label in self.vectors if label != OVERALL]

    @property
    def n_layers(self) -> int:
        """Number of layers each vector has."""
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def d_model(self) -> int:
        """Width of each layer's vector."""
        return int(next(iter(self.vectors.values())).shape[1])

    def __getitem__(self, label: str) -> torch.Tensor:
        try:
            return self.vectors[label]
        except KeyError:
            raise BadInput(
                f"no steering vector for {label!r}; the vector set has {', '.join(self.labels)}"
            ) from None


def save_vectors(vs: VectorSet, path: Path | str) -> None:
    """Write ``vs`` as safetensors, atomically, metadata under ``__metadata__["nnsteer"]``."""
    from safetensors.torch import save_file

    tensors = {label: v.detach().to("cpu", torch.float32).contiguous() for label, v in vs.vectors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"nnsteer": json.dumps(vs.metadata, default=str)})


def check_current(vs: VectorSet, run: RunDir) -> None:
    """:class:`BadInput` unless ``vs`` was extracted from ``run``'s current annotations
    (vector sets that did not record them are not checked)."""
    made_from = vs.metadata.get("annotations")
    if made_from is not None and made_from != file_digest(run.annotations):
        raise BadInput(f"{run.vectors} was extracted from other annotations than "
                       f"{run.annotations}: rerun `nnsteer extract`")


def load_vectors(path: Path | str) -> VectorSet:
    """Read a ``vectors.safetensors`` file (labels in :data:`LABELS` order, ``overall`` last).

    Raises :class:`BadInput` if the file is missing, unreadable or not a vector set.
    """
    from safetensors import safe_open

    path = require(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("nnsteer")
            vectors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise damaged(path, exc) from None
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise damaged(path, "its nnsteer metadata is not valid JSON") from None
    if not vectors:
        raise BadInput(f"{path}: holds no vectors")
    shapes = {tuple(v.shape) for v in vectors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise BadInput(f"{path}: vectors must all be [n_layers, d_model], found {sorted(shapes)}")
    broken = sorted(name for name, v in vectors.items()
                    if not v.is_floating_point() or not torch.isfinite(v).all())
    if broken:
        raise damaged(path, f"vector(s) {', '.join(broken)} hold NaN, inf or non-float values")
    rank = {**{label: i for i, label in enumerate(LABELS)}, OVERALL: len(LABELS) + 1}
    ordered = sorted(vectors, key=lambda name: (rank.get(name, len(LABELS)), name))
    return VectorSet({name: vectors[name] for name in ordered}, metadata)


#: Metadata key: the labels whose vector differs per layer (imported control vectors), so
#: that each steered layer gets its own row rather than the row at ``vector_layer``.
PER_LAYER = "per_layer_labels"


def steered_rows(vs: VectorSet, label: str, vector_layer: int, layers: Sequence[int]) -> torch.Tensor:
    """What steering ``label`` adds, before scaling: its vector at ``vector_layer``
    (``[d_model]``), or for a :data:`PER_LAYER` label its rows at ``layers``
    (``[len(layers), d_model]``)."""
    if label in vs.metadata.get(PER_LAYER, ()):
        return vs[label][list(layers)]
    return vs[label][vector_layer]


def per_layer(vector: torch.Tensor, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``{layer: vector}``: the same ``[d_model]`` vector at every layer, or row i of a
    ``[len(layers), d_model]`` one at ``layers[i]``."""
    if vector.dim() == 1:
        return {layer: vector for layer in layers}
    return {layer: vector[i] for i, layer in enumerate(layers)}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class AnnotatedChain:
    """One chain's full token ids, its generated tokens' character ranges, and its spans."""

    chain_id: str
    ids: list[int]
    prompt_len: int
    offsets: list[tuple[int, int]]
    reasoning: tuple[int, int]
    spans: list[Span]

    def tokens(self, start: int, end: int) -> list[int]:
        """Full-sequence positions of the generated tokens overlapping ``[start, end)``."""
        return [self.prompt_len + i for i in overlapping_tokens(self.offsets, start, end)]


def read_inputs(run: RunDir, model: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The unsteered chains and their ``ok`` spans, checked against each other and ``model``.

    Raises :class:`BadInput` naming the file and row for: an unfinished ``chains.parquet``,
    chains of another model, chains and annotations whose metadata name different models,
    annotations made from other chains (other responses, or other chains altogether),
    spans of chains that are not in ``chains.parquet``, unknown labels, or spans outside
    their chain's response.
    """
    chains = read_complete(run.chains, CHAIN_COLUMNS)
    known = set(chains["chain_id"])
    all_chains = chains
    if "direction" in chains.columns:
        chains = chains.filter(pl.col("direction") == "none")
    if chains.is_empty():
        raise BadInput(f"{run.chains}: no unsteered chains")
    models = chains["model"].unique().to_list()
    if models != [model]:
        raise BadInput(
            f"{run.chains}: generated by {', '.join(map(str, models))}, but the model is {model}; "
            f"use the model that generated the chains (--model {models[0]})"
        )
    chains_model = read_metadata(run.chains).get("model", {}).get("model")
    annotations_metadata = read_metadata(run.annotations)
    annotations_model = annotations_metadata.get("model", {}).get("model")
    if chains_model and annotations_model and chains_model != annotations_model:
        raise BadInput(
            f"{run.annotations}: annotates chains of {annotations_model}, but {run.chains} "
            f"holds chains of {chains_model}; annotate these chains again"
        )
    check_annotated(run.annotations, annotations_metadata, run.chains, all_chains)
    spans = read_parquet(run.annotations, SPAN_COLUMNS).filter(pl.col("status") == "ok")
    unknown = spans.filter(~pl.col("chain_id").is_in(list(known)))
    if not unknown.is_empty():
        raise BadInput(f"{run.annotations}: chain {unknown['chain_id'][0]!r} is not in {run.chains}")
    spans = spans.filter(pl.col("chain_id").is_in(chains["chain_id"].to_list()))  # unsteered only
    lengths = dict(zip(chains["chain_id"], chains["response"].str.len_chars()))
    for row in spans.iter_rows(named=True):
        where = f"{run.annotations}: chain {row['chain_id']!r}, span [{row['start']}, {row['end']})"
        if row["label"] not in LABELS:
            raise BadInput(f"{where}: unknown label {row['label']!r} with status ok")
        if not 0 <= row["start"] < row["end"] <= lengths[row["chain_id"]]:
            raise BadInput(f"{where}: outside the chain's response of {lengths[row['chain_id']]} characters")
    return chains, spans


def annotated_chains(chains: pl.DataFrame, spans: pl.DataFrame, tokenizer: Any) -> list[AnnotatedChain]:
    """Each chain with its spans and token ranges; :class:`BadInput` if ids and response disagree."""
    by_chain = spans_by_chain(spans)
    result = []
    for row in chains.iter_rows(named=True):
        output_ids = list(row["output_ids"])
        if decode_response(tokenizer, output_ids) != row["response"]:
            raise BadInput(
                f"chains.parquet: chain {row['chain_id']!r}: response is not the decoded output_ids "
                "(chains from another tokenizer?)"
            )
        result.append(AnnotatedChain(
            chain_id=row["chain_id"],
            ids=list(row["prompt_ids"]) + output_ids,
            prompt_len=len(row["prompt_ids"]),
            offsets=token_offsets(tokenizer, output_ids),
            reasoning=(row["thinking_start"], row["thinking_end"]),
            spans=by_chain.get(row["chain_id"], []),
        ))
    return result


# --------------------------------------------------------------------------- variants

Samples = dict[str, list[list[int]]]


def paper_samples(chain: AnnotatedChain) -> Samples:
    """Paper: per label one sample, ``seq_c(p)``; overall one sample, the reasoning tokens."""
    by_label = label_positions(chain.spans, chain.offsets, chain.prompt_len)
    samples: Samples = {label: [positions] for label, positions in by_label.items() if positions}
    reasoning = chain.tokens(*chain.reasoning)
    if reasoning:
        samples[OVERALL] = [reasoning]
    return samples


def released_code_samples(chain: AnnotatedChain) -> Samples:
    """Released code: per span ``[first - 1, min(last, first + 10))``; overall first..last annotated token."""
    samples: Samples = {}
    firsts, lasts = [], []
    for span in chain.spans:
        tokens = chain.tokens(span.start, span.end)
        if not tokens:
            continue
        first, last = tokens[0], tokens[-1]
        firsts.append(first)
        lasts.append(last)
        if first > 0:
            window = range(first - 1, min(last, first - 1 + RELEASED_WINDOW))
            samples.setdefault(span.label, []).append(list(window))
    if firsts:
        samples[OVERALL] = [list(range(min(firsts), max(lasts) + 1))]
    return samples


SAMPLERS: dict[str, Callable[[AnnotatedChain], Samples]] = {
    "paper": paper_samples,
    "released-code": released_code_samples,
}


def difference_of_means(means: dict[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """``mean[c] - mean[overall]`` per label (rescaled for ``released-code``), plus ``overall``."""
    overall = means[OVERALL]
    vectors = {label: means[label] - overall for label in LABELS if label in means}
    if NORMALISATION[variant] == "overall-norm-per-layer":
        vectors = {label: rescale(v, overall.norm(dim=-1)) for label, v in vectors.items()}
    return {**vectors, OVERALL: overall}


def rescale(vector: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``vector[l]`` scaled to norm ``norms[l]`` at every layer l; a zero row stays zero."""
    own = vector.norm(dim=-1, keepdim=True)
    return torch.where(own > 0, vector * norms[:, None] / own.clamp_min(torch.finfo(own.dtype).tiny), vector)


# --------------------------------------------------------------------------- the stage


def extract_vectors(
    run: RunDir,
    lm: LoadedModel,
    *,
    variant: Literal["paper", "released-code"] = "paper",
    batch_size: int = 8,
    min_spans: int = 1,
) -> VectorSet:
    """Difference-of-means vectors at every layer from ``run``'s chains and spans; writes ``run.vectors``.

    Labels with no usable span, or with fewer than ``min_spans`` annotated spans (a mean
    of so few is noise), are skipped and listed under ``skipped_labels``; the file
    is written only when the whole extraction succeeded. Resumable: the finished batches
    are kept in ``run.partial("extract")`` until the file is written.
    """
    if variant not in SAMPLERS:
        raise BadInput(f"--variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    if min_spans < 1:
        raise BadInput(f"--min-spans {min_spans}: expected at least 1")
    chains, spans = read_inputs(run, lm.name)
    sample_of = SAMPLERS[variant]
    items = annotated_chains(chains, spans, lm.tokenizer)
    selections = [Selection(chain.ids, sample_of(chain)) for chain in items]
    counts = sample_counts(selections, spans)
    if not counts[OVERALL]["samples"]:
        raise BadInput(f"{run.chains}: no chain has reasoning tokens to average (variant {variant})")
    labels = [label for label in LABELS
              if counts[label]["samples"] and counts[label]["spans"] >= min_spans]
    partial = run.partial("extract")
    sums = sum_sample_means(lm, selections, [*labels, OVERALL], batch_size=batch_size,
                            checkpoint=partial)
    metadata = {
        **provenance("extract", {"variant": variant, "min_spans": min_spans}, lm.provenance()),
        "labels": labels,
        "skipped_labels": [label for label in LABELS if label not in labels],
        "counts": counts,
        "min_spans": min_spans,
        "variant": variant,
        "normalisation": NORMALISATION[variant],
        "annotations": file_digest(run.annotations),
        **application(lm),
    }
    vs = VectorSet(difference_of_means(sums.means(), variant), metadata)
    save_vectors(vs, run.vectors)
    partial.unlink(missing_ok=True)
    if metadata["skipped_labels"]:
        say(missing_vectors_note(metadata, run.annotations.name))
    return vs


def missing_vectors_note(metadata: dict[str, Any], annotations: str) -> str:
    """One line from a vectors file's metadata: which labels got no vector and why (no
    usable span, or fewer than ``min_spans``), and which are therefore not steered."""
    skipped = metadata.get("skipped_labels", [])
    counts, least = metadata.get("counts", {}), metadata.get("min_spans", 1)
    few = {label: counts[label]["spans"] for label in skipped
           if counts.get(label, {}).get("samples")}
    none = [label for label in skipped if label not in few]
    parts = [f"no vector for {', '.join(none)}: no usable span in {annotations}"] if none else []
    if few:
        spans = ", ".join(f"{label} ({n} span{'s' * (n != 1)})" for label, n in few.items())
        parts.append(f"{'nor' if none else 'no vector'} for {spans}: fewer spans than "
                     f"min_spans = {least} in {annotations}")
    steered = [label for label in skipped if label in STEERED_LABELS]
    return "; ".join(parts) + (f"; {', '.join(steered)} cannot be steered" if steered else "")


def sample_counts(selections: list[Selection], spans: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Per label and ``overall``: chains, annotated spans, samples and positions that went in."""
    counts = {}
    span_counts = dict(spans.group_by("label").len().iter_rows())
    for group in [*LABELS, OVERALL]:
        samples = [sample for s in selections for sample in s.samples.get(group, ())]
        counts[group] = {
            "chains": sum(1 for s in selections if s.samples.get(group)),
            "spans": int(span_counts.get(group, 0)),
            "samples": len(samples),
            "positions": sum(len(sample) for sample in samples),
        }
    return counts


# --------------------------------------------------------------------------- similarity


def cosine_similarity(vs: VectorSet, across: Literal["labels", "layers"] = "labels") -> pl.DataFrame:
    """Cosine similarities of the label vectors, in long format for heatmaps.

    ``across="labels"``: every ordered pair of labels at each layer (columns ``layer``,
    ``label_a``, ``label_b``, ``cosine``). ``across="layers"``: every ordered pair of
    layers of each label (``label``, ``layer_a``, ``layer_b``, ``cosine``). ``overall``
    (a mean activation, not a direction) is left out.
    """
    if across not in ("labels", "layers"):
        raise BadInput(f"across={across!r}: expected 'labels' or 'layers'")
    if not vs.labels:
        raise BadInput("the vector set has no label vectors to compare")
    labels, layers = vs.labels, range(vs.n_layers)
    unit = torch.nn.functional.normalize(torch.stack([vs[label].double() for label in labels]), dim=-1)
    if across == "labels":
        cos = torch.einsum("alh,blh->lab", unit, unit)  # [layer, label_a, label_b]
        rows = itertools.product(layers, labels, labels)
        columns = ["layer", "label_a", "label_b"]
    else:
        cos = torch.einsum("cih,cjh->cij", unit, unit)  # [label, layer_a, layer_b]
        rows = itertools.product(labels, layers, layers)
        columns = ["label", "layer_a", "layer_b"]
    frame = pl.DataFrame(list(rows), schema=columns, orient="row")
    return frame.with_columns(cosine=pl.Series(cos.flatten().tolist(), dtype=pl.Float64))
