"""The ``evaluate`` stage: does steering change the behaviour it targets, and at what cost?

:func:`evaluate` annotates the steered chains with the annotator used in training,
measures each chain's behaviour shares (:mod:`nnsteer.evaluation.shares`) and costs
(:mod:`nnsteer.evaluation.costs`), and writes ``evaluation.parquet``, the Figure 4 chart and
a plain-text summary.

Example:
    >>> evaluation = evaluate(RunDir("runs/smollm2-135m"))
    >>> print(summary_text(summarise(evaluation)))
"""

from __future__ import annotations

from typing import Any

import polars as pl

from nnsteer.annotation.stage import annotate_chains, resolve_annotator
from nnsteer.errors import BadInput, public_url
from nnsteer.evaluation.costs import (
    cost_metadata,
    cost_table,
    costs_text,
    summarise_costs,
    task_answers,
)
from nnsteer.evaluation.grader import resolve_grader
from nnsteer.evaluation.paired import CHAIN_DIRECTIONS, VECTORS
from nnsteer.evaluation.shares import (
    UNITS,
    chain_fractions,
    denominator_labels,
    steering_chart,
    summarise,
    summary_text,
)
from nnsteer.labels import STEERED_LABELS
from nnsteer.modeling.models import LoadedModel, load_tokenizer
from nnsteer.modeling.positions import decode_response
from nnsteer.runs.store import (
    RunDir,
    atomic_path,
    provenance,
    read_complete,
    read_metadata,
    read_parquet,
    write_parquet,
    write_text,
)
from nnsteer.vectors.extract import missing_vectors_note

SUMMARY_FILE = "summary.txt"
CHART_FILE = "steering.html"

_STEERED_COLUMNS = ["chain_id", "task_id", "model", "output_ids", "response", "behaviour",
                    "direction", "coefficient", "vector", "thinking_start", "thinking_end"]
_SPAN_COLUMNS = ["chain_id", "label", "start", "end", "text", "annotator", "status"]


def evaluate(
    run: RunDir, *, annotator: str | None = None, base_url: str | None = None,
    workers: int = 8, denominator: str = "labelled", n_boot: int = 2000, seed: int = 0,
    tokenizer: Any = None, timeout: float | None = None, retries: int | None = None,
    annotator_prompt: str | None = None, lm: LoadedModel | None = None, grader: str = "offline",
    batch_size: int = 8,
) -> pl.DataFrame:
    """Annotate the steered chains, write ``evaluation.parquet``, the chart and the summary.

    Every chain also gets what steering cost (:func:`nnsteer.evaluation.costs.cost_table`: the
    answer graded by ``grader``, ``offline`` or ``openai:<model>``; ``nll_unsteered`` under
    ``lm``, the unsteered model, in batches of ``batch_size``), joined onto its rows, and
    the summary their paired differences (:func:`nnsteer.evaluation.costs.summarise_costs`).

    ``annotator`` defaults to the one that annotated the training chains, and
    ``annotator_prompt`` (a prompt file, see ``annotate_chains``) to the training
    annotation's prompt file when the annotator is the same. Chains already
    in ``steered_annotations.parquet`` by that annotator are not annotated again.
    ``tokenizer`` defaults to the tokenizer of the steered chains' model. ``timeout`` and
    ``retries`` are the LLM annotator's (:func:`nnsteer.annotation.stage.annotate_chains`).
    """
    labels = denominator_labels(denominator)
    if n_boot < 1:
        raise BadInput(f"--n-boot must be positive, got {n_boot}")
    resolve_grader(grader)
    chains = _read_steered(run, labels)
    annotator = resolve_annotator(annotator or training_annotator(run))
    if annotator_prompt is None and run.annotations.exists():
        recorded = read_metadata(run.annotations).get("options", {})
        if recorded.get("annotator") == annotator:
            annotator_prompt = recorded.get("annotator_prompt")
    tokenizer = tokenizer if tokenizer is not None else _chain_tokenizer(run, chains)
    _check_responses(run, chains, tokenizer)
    task_answers(run)  # tasks.parquet checked before steered_annotations.parquet is written
    annotate_chains(run, annotator=annotator, base_url=base_url, workers=workers,
                    source="steered", tokenizer=tokenizer, timeout=timeout, retries=retries,
                    annotator_prompt=annotator_prompt)
    spans = read_parquet(run.steered_annotations, _SPAN_COLUMNS)

    evaluation = chain_fractions(chains, spans, tokenizer, denominator, progress=True)
    evaluation = evaluation.join(
        cost_table(run, tokenizer, lm, grader=grader, base_url=base_url, workers=workers,
                             batch_size=batch_size, timeout=timeout, retries=retries),
        on="chain_id", how="left")
    options = {"annotator": annotator, "base_url": public_url(base_url), "denominator": denominator,
               "n_boot": n_boot, "seed": seed, "annotator_prompt": annotator_prompt,
               "grader": grader}
    meta = provenance("evaluate", options, read_metadata(run.steered).get("model"))
    meta["unit"] = UNITS[denominator]
    costs = summarise_costs(evaluation, n_boot, seed)
    meta.update(cost_metadata(costs, lm))
    write_parquet(evaluation, run.evaluation, meta)

    summary = summarise(evaluation, n_boot, seed)
    with atomic_path(run.charts / CHART_FILE) as tmp:
        steering_chart(summary).save(tmp, format="html", inline=True)
    write_text(run.root / SUMMARY_FILE, summary_text(summary) + costs_text(costs, grader)
               + _unsteered_note(run))
    return evaluation


def _unsteered_note(run: RunDir) -> str:
    """A closing line naming the steered behaviours that got no vector, and why; or ``""``."""
    if not run.vectors.exists():
        return ""
    metadata = read_metadata(run.vectors)
    if not set(metadata.get("skipped_labels", [])) & set(STEERED_LABELS):
        return ""
    return f"\nNot steered: {missing_vectors_note(metadata, run.annotations.name)}.\n"


def _read_steered(run: RunDir, labels: tuple[str, ...]) -> pl.DataFrame:
    """The steered chains of a finished ``steer`` stage, checked row by row."""
    chains = read_complete(run.steered, _STEERED_COLUMNS)
    if chains.is_empty():
        raise BadInput(f"{run.steered}: no chains: the eval split had no tasks "
                       "(add eval tasks with `nnsteer tasks`, then run `nnsteer steer`)")
    for row, chain in enumerate(chains.iter_rows(named=True)):
        where = f"{run.steered}: row {row} (chain {chain['chain_id']})"
        if chain["direction"] not in CHAIN_DIRECTIONS:
            raise BadInput(f"{where}: direction {chain['direction']!r} is not one of {', '.join(CHAIN_DIRECTIONS)}")
        if chain["vector"] not in VECTORS:
            raise BadInput(f"{where}: vector {chain['vector']!r} is not one of {', '.join(VECTORS)}")
        steered = chain["direction"] != "none"
        if steered and chain["behaviour"] not in labels:
            raise BadInput(f"{where}: behaviour {chain['behaviour']!r} is not among the labels "
                           f"counted by this denominator ({', '.join(labels)})")
    if not (chains["direction"] == "none").any():
        raise BadInput(f"{run.steered}: no baseline chains (direction 'none') to compare with: "
                       "rerun `nnsteer steer`")
    if (chains["direction"] == "none").all():
        raise BadInput(f"{run.steered}: only baseline chains, none steered: rerun `nnsteer steer`")
    return chains


def training_annotator(run: RunDir) -> str:
    """The annotator of ``annotations.parquet``: evaluation must annotate the same way."""
    if not run.annotations.exists():
        raise BadInput(f"{run.annotations} not found: pass --annotator, or run `nnsteer annotate` "
                       "so that steered chains are annotated like the training chains")
    annotator = read_metadata(run.annotations).get("options", {}).get("annotator")
    if annotator:
        return annotator
    names = read_parquet(run.annotations, ["annotator"])["annotator"].drop_nulls().unique().to_list()
    if len(names) != 1:
        raise BadInput(f"{run.annotations}: annotators {sorted(names)}: pass --annotator to choose one")
    return names[0]


def _chain_tokenizer(run: RunDir, chains: pl.DataFrame) -> Any:
    models = chains["model"].unique().to_list()
    if len(models) != 1:
        raise BadInput(f"{run.steered}: chains of several models {sorted(models)}")
    return load_tokenizer(models[0])


def _check_responses(run: RunDir, chains: pl.DataFrame, tokenizer: Any) -> None:
    """Spans are offsets into ``response``: it must be the decoding of ``output_ids``."""
    for row, chain in enumerate(chains.iter_rows(named=True)):
        if decode_response(tokenizer, chain["output_ids"]) != chain["response"]:
            raise BadInput(f"{run.steered}: row {row} (chain {chain['chain_id']}): response is not "
                           "the decoding of output_ids with this tokenizer (wrong model?)")


