"""Annotation: behaviour spans of reasoning chains, aligned to the exact text of each chain.

An annotator (the offline ``learned`` or ``rules`` one, or an LLM in the paper's format,
parsed by :mod:`nnsteer.annotation.spans`) names parts of a chain's reasoning; this module runs it over a run's
chains and stores the spans.

Offsets in ``annotations.parquet`` are character offsets into ``response``; token
positions are derived from the chain's stored ids (:func:`label_positions`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import click
import polars as pl
from tqdm.auto import tqdm

from nnsteer.annotation.learned import shipped_annotator, weights_digest
from nnsteer.annotation.llm import (
    API_KEY_ENV,
    DEFAULT_ANNOTATOR_MODEL,
    PROMPT_VERSION,
    annotate_texts,
    prompt_digest,
)
from nnsteer.annotation.rules import rules_annotate
from nnsteer.annotation.spans import Span
from nnsteer.errors import BadInput
from nnsteer.labels import FAILED, LABELS, OK, UNALIGNED, UNKNOWN_LABEL
from nnsteer.modeling.embedded import cache_dir as user_cache
from nnsteer.modeling.models import load_tokenizer
from nnsteer.modeling.positions import (
    merge_positions,
    overlapping_tokens,
    span_positions,
    token_offsets,
)
from nnsteer.runs.store import (
    RunDir,
    provenance,
    read_complete,
    read_metadata,
    read_parquet,
    write_parquet,
)

ANNOTATION_SCHEMA = {
    "chain_id": pl.String, "label": pl.String, "start": pl.Int64, "end": pl.Int64,
    "text": pl.String, "annotator": pl.String, "status": pl.String,
}
CHAIN_COLUMNS = ["chain_id", "model", "prompt_ids", "output_ids", "response",
                 "thinking_start", "thinking_end"]


# ------------------------------------------------------------------ token positions

def spans_by_chain(annotations: pl.DataFrame) -> dict[str, list[Span]]:
    """The spans of ``annotations.parquet`` grouped by ``chain_id`` (all statuses)."""
    grouped: dict[str, list[Span]] = {}
    for row in annotations.iter_rows(named=True):
        grouped.setdefault(row["chain_id"], []).append(
            Span(row["label"], row["start"], row["end"], row["status"], row["text"]))
    return grouped


def label_positions(
    spans: Iterable[Span], offsets: Sequence[tuple[int, int]], prompt_len: int,
) -> dict[str, list[int]]:
    """Full-sequence token positions of each label's ``ok`` spans in one chain.

    Each span gives its tokens plus the token just before it
    (:func:`nnsteer.modeling.positions.span_positions`); a position counts once per label.
    ``offsets`` is ``token_offsets(tokenizer, output_ids)`` of the chain's stored ids, and
    span offsets are into the same decoded ``response``.
    """
    groups: dict[str, list[list[int]]] = {}
    for span in spans:
        if span.status == OK:
            groups.setdefault(span.label, []).append(
                span_positions(offsets, prompt_len, span.start, span.end))
    return {label: merge_positions(g) for label, g in groups.items()}


def token_label_counts(spans: Iterable[Span], offsets: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Number of generated tokens each label's ``ok`` spans cover (a token once per label)."""
    covered: dict[str, set[int]] = {}
    for span in spans:
        if span.status == OK:
            covered.setdefault(span.label, set()).update(
                overlapping_tokens(offsets, span.start, span.end))
    return {label: len(tokens) for label, tokens in covered.items()}


# ------------------------------------------------------------------------- the stage

#: The annotators that run offline, and the one ``auto`` picks without an API key.
OFFLINE = ("learned", "rules")
#: How the annotator names are spelled, for messages.
ANNOTATOR_NAMES = "auto, learned, rules or openai:<model>"
OFFLINE_DEFAULT = "rules"


def resolve_annotator(annotator: str) -> str:
    """``auto`` → ``openai:gpt-4o`` if ``OPENAI_API_KEY`` is set, else the offline default
    (with a notice)."""
    if annotator == "auto":
        if os.environ.get(API_KEY_ENV):
            return f"openai:{DEFAULT_ANNOTATOR_MODEL}"
        click.echo(f"nnsteer: {API_KEY_ENV} is not set: annotating with the offline "
                   f"`{OFFLINE_DEFAULT}` annotator", err=True)
        return OFFLINE_DEFAULT
    if is_annotator(annotator):
        return annotator
    raise BadInput(f"--annotator {annotator!r}: expected {ANNOTATOR_NAMES}")


def is_annotator(name: str) -> bool:
    """Whether ``name`` names an annotator: ``auto``, an offline one, or ``openai:<model>``."""
    return name == "auto" or name in OFFLINE or (name.startswith("openai:") and name != "openai:")


def offline_annotator(annotator: str) -> Callable[[str], list[Span]]:
    """The function that annotates one text for ``rules``, ``learned`` or ``auto`` (the
    offline default)."""
    name = OFFLINE_DEFAULT if annotator == "auto" else annotator
    if name == "rules":
        return rules_annotate
    if name == "learned":
        return shipped_annotator().annotate
    raise BadInput(f"--annotator {annotator!r}: expected an offline annotator ({', '.join(OFFLINE)})")


def _check_chains(chains: pl.DataFrame) -> None:
    missing = [c for c in ("chain_id", "response", "thinking_start", "thinking_end")
               if c not in chains.columns]
    if missing:
        raise BadInput(f"chains: missing column(s) {', '.join(missing)}")
    for row in chains.select("chain_id", "response", "thinking_start", "thinking_end").iter_rows():
        chain_id, response, start, end = row
        if not 0 <= start <= end <= len(response):
            raise BadInput(f"chains: chain {chain_id}: thinking_start/thinking_end ({start}, {end}) "
                           f"outside its response ({len(response)} characters)")


def annotate_frame(
    chains: pl.DataFrame, *, annotator: str = "rules", base_url: str | None = None,
    workers: int = 8, cache_dir: Path | None = None, progress: bool = True,
    timeout: float | None = None, retries: int | None = None, prompt: str | None = None,
) -> pl.DataFrame:
    """Annotation rows (``annotations.parquet`` columns) for the reasoning of each chain.

    Only ``response[thinking_start:thinking_end]`` is annotated; offsets are shifted into
    ``response``. ``prompt`` replaces the LLM annotator's prompt
    (:func:`nnsteer.annotation.llm.prompt_messages`). A chain the LLM annotator could not annotate gets one row with status
    ``failed`` (label null, ``start = end = -1``, the reason as ``text``).
    """
    annotator = resolve_annotator(annotator)
    _check_chains(chains)
    rows = chains.select("chain_id", "response", "thinking_start", "thinking_end").rows()
    texts = [response[start:end] for _, response, start, end in rows]
    if annotator in OFFLINE:
        annotate = offline_annotator(annotator)
        results: list = [annotate(t) for t in tqdm(
            texts, desc=f"annotate ({annotator})", unit="chain", disable=not progress)]
    else:
        limits = {k: v for k, v in (("timeout", timeout), ("retries", retries)) if v is not None}
        results = annotate_texts(texts, model=annotator.removeprefix("openai:"),
                                 base_url=base_url, workers=workers, cache_dir=cache_dir,
                                 progress=progress, prompt=prompt, **limits)
    out = []
    for (chain_id, _, shift, _), result in zip(rows, results):
        if not isinstance(result, list):  # llm_annotator.Failed
            out.append((chain_id, None, -1, -1, result.reason, annotator, FAILED))
            continue
        for s in result:
            start, end = (s.start + shift, s.end + shift) if s.start >= 0 else (-1, -1)
            out.append((chain_id, s.label, start, end, s.text, annotator, s.status))
    return pl.DataFrame(out, schema=ANNOTATION_SCHEMA, orient="row")


def annotate_chains(
    run: RunDir, *, annotator: str = "auto", base_url: str | None = None, workers: int = 8,
    source: str = "chains", tokenizer: Any = None, cache_dir: Path | None = None,
    timeout: float | None = None, retries: int | None = None,
    annotator_prompt: str | None = None,
) -> pl.DataFrame:
    """Annotate a run's chains (``source="chains"``) or steered chains (``"steered"``).

    ``timeout`` (seconds per request) and ``retries`` (after a 429, 5xx or timeout) are
    for the LLM annotator; None keeps its defaults. ``annotator_prompt`` is a file whose
    text replaces the LLM annotator's prompt (e.g. the authors' prompt; the reasoning goes
    where it says ``{thinking}``); its hash enters the reply cache's key and the metadata.

    Resumable: chains already annotated by the same annotator, whose response has not
    changed since, are kept; failed ones are tried again. Writes ``annotations.parquet`` (or ``steered_annotations.parquet``) and
    returns the per-label summary (:func:`label_summary`).
    """
    if source not in ("chains", "steered"):
        raise BadInput(f"source {source!r}: expected chains or steered")
    annotator = resolve_annotator(annotator)
    prompt = read_annotator_prompt(annotator_prompt, annotator)
    chains_path, out_path = ((run.chains, run.annotations) if source == "chains"
                             else (run.steered, run.steered_annotations))
    chains = read_complete(chains_path, columns=CHAIN_COLUMNS)
    _check_chains(chains)
    digests = response_digests(chains)
    options = {"annotator": annotator, "source": source}
    if annotator == "learned":
        options["weights"] = weights_digest()
    elif annotator not in OFFLINE:
        options["prompt_version"] = PROMPT_VERSION
        if prompt is not None:
            options |= {"annotator_prompt": str(annotator_prompt),
                        "prompt_sha256": prompt_digest(prompt)}
    done = _reusable(out_path, options, digests)
    todo = chains.filter(~pl.col("chain_id").is_in(done["chain_id"].unique().to_list()))
    if cache_dir is None and annotator not in OFFLINE:
        cache_dir = user_cache() / "annotations"
    fresh = annotate_frame(todo, annotator=annotator, base_url=base_url, workers=workers,
                           cache_dir=cache_dir, prompt=prompt, timeout=timeout, retries=retries)
    annotations = pl.concat([done, fresh]).sort("chain_id", maintain_order=True)
    model = read_metadata(chains_path).get("model") or (
        {"model": chains["model"][0]} if len(chains) else {})
    metadata = provenance("annotate", options, model)
    metadata["responses"] = digests
    write_parquet(annotations, out_path, metadata)
    failed = failed_chains(annotations)
    if failed:
        click.echo(f"nnsteer: {failed_note(out_path, failed)}", err=True)
    if tokenizer is None and len(chains):
        tokenizer = load_tokenizer(chains["model"][0])
    return label_summary(chains, annotations, tokenizer)


def failed_chains(annotations: pl.DataFrame) -> list[str]:
    """The ids of the chains whose annotation ``failed`` (sorted)."""
    return annotations.filter(pl.col("status") == FAILED)["chain_id"].unique().sort().to_list()


def failed_chains_in(path: Path) -> list[str]:
    """:func:`failed_chains` of a written annotations file ([] if there is none)."""
    if not path.exists():
        return []
    return failed_chains(read_parquet(path, columns=["chain_id", "status"]))


def failed_note(path: Path, failed: list[str]) -> str:
    """The line that says which chains of ``path`` could not be annotated, and what to do."""
    listed = ", ".join(failed[:10]) + (", ..." if len(failed) > 10 else "")
    return (f"{len(failed)} chain(s) of {path.name} could not be annotated ({listed}); later "
            "stages skip them: rerun to try them again")


def read_annotator_prompt(path: str | Path | None, annotator: str) -> str | None:
    """The text of the prompt file ``path`` (None: nnsteer's prompt); :class:`BadInput`
    naming ``--annotator-prompt`` if it is missing or empty, or the annotator is offline."""
    if path is None:
        return None
    if annotator in OFFLINE:
        raise BadInput(f"--annotator-prompt {path}: the {annotator} annotator takes no prompt")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"--annotator-prompt {path}: cannot read it "
                       f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    if not text.strip():
        raise BadInput(f"--annotator-prompt {path}: the file is empty")
    return text


def response_digests(chains: pl.DataFrame) -> dict[str, str]:
    """A short hash of each chain's ``response`` by ``chain_id``, as annotation files record."""
    return {chain_id: hashlib.sha256(response.encode()).hexdigest()[:16]
            for chain_id, response in chains.select("chain_id", "response").iter_rows()}


def check_annotated(annotations_path: Path, metadata: dict[str, Any], chains_path: Path,
                    chains: pl.DataFrame) -> None:
    """:class:`BadInput` unless ``annotations_path`` (whose ``metadata`` is given) was made
    from exactly ``chains``.

    Compares the response digests the annotate stage recorded with those of ``chains``
    (all rows of ``chains_path``); a file that recorded none is not checked.
    """
    recorded = metadata.get("responses")
    if recorded is not None and recorded != response_digests(chains):
        raise BadInput(f"{annotations_path} was made from other chains than {chains_path}: "
                       "rerun `nnsteer annotate`")


def _reusable(path: Path, options: dict[str, Any], digests: dict[str, str]) -> pl.DataFrame:
    """Rows of an earlier run by the same annotator and prompt, for chains whose response
    is unchanged and that did not fail."""
    empty = pl.DataFrame(schema=ANNOTATION_SCHEMA)
    metadata = read_metadata(path) if path.exists() else {}
    recorded = metadata.get("options", {})
    if any(recorded.get(key) != options.get(key) for key in ("annotator", "prompt_sha256")):
        return empty
    before = metadata.get("responses", {})
    same = [cid for cid, digest in digests.items() if before.get(cid) == digest]
    old = read_parquet(path, columns=list(ANNOTATION_SCHEMA)).select(list(ANNOTATION_SCHEMA))
    failed = old.filter(pl.col("status") == FAILED)["chain_id"].unique().to_list()
    return old.filter(pl.col("chain_id").is_in(same)
                      & ~pl.col("chain_id").is_in(failed)).cast(ANNOTATION_SCHEMA)


def label_summary(chains: pl.DataFrame, annotations: pl.DataFrame, tokenizer: Any) -> pl.DataFrame:
    """Per label: ``spans`` placed, ``tokens`` they cover, ``unaligned`` and ``unknown`` parts.

    Token counts come from each chain's stored ``output_ids``; unknown labels are pooled
    under their own names.
    """
    grouped = spans_by_chain(annotations)
    tokens = dict.fromkeys(LABELS, 0)
    rows = chains.select("chain_id", "output_ids").iter_rows()
    for chain_id, output_ids in tqdm(rows, total=len(chains), desc="count tokens", unit="chain",
                                     leave=False):
        spans = grouped.get(chain_id)
        if spans:
            offsets = token_offsets(tokenizer, output_ids)
            for label, n in token_label_counts(spans, offsets).items():
                tokens[label] = tokens.get(label, 0) + n
    counts = (annotations.filter(pl.col("status") != FAILED)
              .group_by("label").agg(
                  spans=(pl.col("status") == OK).sum(),
                  unaligned=(pl.col("status") == UNALIGNED).sum(),
                  unknown=(pl.col("status") == UNKNOWN_LABEL).sum()))
    labels = list(LABELS) + sorted(set(counts["label"]) - set(LABELS))
    table = pl.DataFrame({"label": labels, "tokens": [tokens.get(x, 0) for x in labels]})
    table = table.join(counts, on="label", how="left").fill_null(0)
    return table.select("label", "spans", "tokens", "unaligned", "unknown").cast(
        {c: pl.Int64 for c in ("spans", "tokens", "unaligned", "unknown")})
