"""The chains table (``chains.parquet``) and the ``generate`` stage.

:func:`run_chain_jobs` is what the ``generate`` and ``steer`` stages share: it writes the
chains of a list of :class:`ChainJob` after every batch and, on a rerun, keeps the chains
already written with the same model, settings and inputs (:func:`chains_resume_key`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.errors import BadInput, say
from nnsteer.generation.loop import Generation, generate_batches
from nnsteer.generation.prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    check_prompt_template,
    prompt_token_ids,
)
from nnsteer.generation.spec import SteeringSpec
from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.thinking import thinking_of
from nnsteer.runs.store import (
    RunDir,
    completeness,
    fingerprint,
    provenance,
    read_metadata,
    read_parquet,
    write_parquet,
)


def generate_chains(
    run: RunDir,
    lm: LoadedModel,
    *,
    split: str = "train",
    limit: int | None = None,
    max_new_tokens: int = 500,
    batch_size: int = 8,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> pl.DataFrame:
    """The ``generate`` stage: one unsteered chain per task of ``split`` into ``run.chains``.

    ``prompt_template`` names the user-turn preset
    (:data:`nnsteer.generation.prompts.PROMPT_TEMPLATES`), recorded in the metadata.
    Resumable: a rerun keeps the chains already written and generates the rest.
    """
    check_prompt_template(prompt_template)
    tasks = split_tasks(run, split, limit)
    jobs = [
        ChainJob(chain_id=t["task_id"], task_id=t["task_id"], split=split, prompt=t["prompt"])
        for t in tasks.iter_rows(named=True)
    ]
    options = {
        "split": split,
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "prompt_template": prompt_template,
    }
    return run_chain_jobs(
        lm,
        jobs,
        run.chains,
        provenance("generate", options, lm.provenance()),
        None,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        prompt_template=prompt_template,
    )


def split_tasks(run: RunDir, split: str, limit: int | None = None) -> pl.DataFrame:
    """The first ``limit`` tasks of ``split`` in ``run.tasks``; :class:`BadInput` if none."""
    if limit is not None and limit < 1:
        raise BadInput(f"--limit must be at least 1, not {limit}")
    tasks = read_parquet(run.tasks, columns=["task_id", "prompt", "split"])
    tasks = tasks.filter(pl.col("split") == split)
    if limit is not None:
        tasks = tasks.head(limit)
    if tasks.is_empty():
        raise BadInput(f"{run.tasks}: no tasks in the {split!r} split")
    empty = tasks.filter(pl.col("prompt").fill_null("").str.strip_chars() == "")["task_id"]
    if empty.len():
        raise BadInput(f"{run.tasks}: task {empty[0]!r} has an empty prompt")
    duplicated = tasks.filter(pl.col("task_id").is_duplicated())["task_id"]
    if duplicated.len():
        raise BadInput(f"{run.tasks}: task_id {duplicated[0]!r} is not unique")
    return tasks


CHAIN_SCHEMA: dict[str, Any] = {
    "chain_id": pl.String,
    "task_id": pl.String,
    "split": pl.String,
    "model": pl.String,
    "prompt_ids": pl.List(pl.Int64),
    "output_ids": pl.List(pl.Int64),
    "response": pl.String,
    "thinking_start": pl.Int64,
    "thinking_end": pl.Int64,
    "finish_reason": pl.String,
    "behaviour": pl.String,
    "direction": pl.String,
    "coefficient": pl.Float64,
    "layers": pl.List(pl.Int64),
    "vector": pl.String,
    "mode": pl.String,
    "steered_tokens": pl.Int64,
}


@dataclass(frozen=True)
class ChainJob:
    """One chain to generate and the columns that describe it."""

    chain_id: str
    task_id: str
    split: str
    prompt: str
    steering: SteeringSpec | None = None
    behaviour: str | None = None
    direction: str = "none"
    coefficient: float = 0.0
    layers: tuple[int, ...] = field(default_factory=tuple)
    vector: str = "none"
    mode: str = "none"


def run_chain_jobs(
    lm: LoadedModel,
    jobs: list[ChainJob],
    path: Path,
    metadata: dict[str, Any],
    resume_inputs: Any,
    *,
    max_new_tokens: int,
    batch_size: int,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> pl.DataFrame:
    """Generate the chains of ``jobs`` into ``path``, rewriting a file atomically after each batch.

    Rows already written for the same model, ``max_new_tokens`` and ``resume_inputs`` (e.g.
    the steering vectors) are kept, from ``path`` and from its pending file
    (:func:`pending_path`); rows of chains that are not among ``jobs`` are dropped, saying so.
    A complete ``path``, or one written with other settings, is never replaced by an
    incomplete table: the batches go to the pending file beside it, which replaces ``path``
    once every chain is done, and an interrupted run says what ``path`` still holds. Only a
    missing ``path``, or an unfinished one of the same settings, is written batch by batch.
    The metadata says whether the file is complete (:func:`nnsteer.runs.store.completeness`),
    so that later stages refuse a file whose batches are still to come. Returns the
    table in job order.
    """
    resume_key = chains_resume_key(lm, max_new_tokens, resume_inputs)
    metadata = {**metadata, "resume_key": resume_key, "thinking": thinking_of(lm).provenance()}
    pending = pending_path(path)
    done, target, held = _resume_point(lm, path, resume_key, jobs, prompt_template)
    finished = set(done["chain_id"])
    todo = [job for job in jobs if job.chain_id not in finished]
    ordered = {job.chain_id: i for i, job in enumerate(jobs)}

    def save(rows: pl.DataFrame, where: Path) -> pl.DataFrame:
        table = rows.sort(pl.col("chain_id").replace_strict(ordered, return_dtype=pl.Int64))
        write_parquet(table, where, {**metadata, **completeness(table.height, len(jobs))})
        if where == path and pending.exists() and _key(pending) == resume_key:
            pending.unlink()  # its rows are in path now
        return table

    if not todo:
        say(f"{path} is up to date ({done.height} chains)")
        return save(done, path)  # records this run's options
    check_lengths(lm, todo, max_new_tokens)
    if done.height:
        say(f"{path}: {done.height} of {len(jobs)} chains already done, generating {len(todo)}")
    if target == pending:
        if pending.exists() and _key(pending) != resume_key:
            say(f"discarding {pending.name}: the unfinished chains of a run with other settings")
        say(f"{path} keeps its {held} until this run's {len(jobs)} chains are complete "
            f"(meanwhile in {pending.name})")
    try:
        for indices, generations in generate_batches(
            lm,
            [job.prompt for job in todo],
            steering=[job.steering for job in todo],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            desc=metadata.get("stage", "generate"),
            prompt_template=prompt_template,
        ):
            rows = [_chain_row(lm.name, todo[i], gen) for i, gen in zip(indices, generations)]
            done = pl.concat([done, pl.DataFrame(rows, schema=CHAIN_SCHEMA)])
            table = save(done, target)
    except BaseException:
        if target == pending:
            say(f"{path} still holds its {held}; {done.height} of this run's {len(jobs)} "
                f"chains are done, kept for a rerun with the same options")
        raise
    return save(table, path) if target == pending else table


def pending_path(path: Path) -> Path:
    """Where the chains of a run that must not yet replace ``path`` wait:
    ``.<name>.pending`` beside it."""
    return path.with_name(f".{path.name}.pending")


def check_lengths(lm: LoadedModel, jobs: list[ChainJob], max_new_tokens: int) -> None:
    """:class:`BadInput` naming the task whose prompt and ``max_new_tokens`` together
    exceed the model's positions (``max_position_embeddings``; not checked if unknown)."""
    limit = getattr(getattr(lm.hf_model, "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    thinking = thinking_of(lm)
    for job in jobs:
        n = len(prompt_token_ids(lm.tokenizer, job.prompt, thinking=thinking))
        if n + max_new_tokens > limit:
            raise BadInput(f"task {job.task_id}: its prompt of {n} tokens and max_new_tokens "
                           f"{max_new_tokens} exceed the {limit} positions of {lm.name}: "
                           "shorten the task or lower max_new_tokens")


def chains_resume_key(lm: LoadedModel, max_new_tokens: int, resume_inputs: Any) -> str:
    """What a chains file's rows must have been generated with to be kept on a rerun."""
    return fingerprint(lm.identity(), max_new_tokens, resume_inputs)


def _resume_point(
    lm: LoadedModel, path: Path, resume_key: str, jobs: list[ChainJob], prompt_template: str
) -> tuple[pl.DataFrame, Path, str]:
    """The finished rows to keep (of ``path`` and its pending file), the file the batches go
    to (``path``, or the pending file while ``path`` must stay as it is), and what ``path``
    holds now, in words."""
    pending = pending_path(path)
    waiting = _reusable_rows(lm, pending, resume_key, jobs, prompt_template, quiet=True)
    if not path.exists():
        return waiting, path, ""
    metadata = read_metadata(path)
    same = metadata.get("resume_key") == resume_key
    rows = _reusable_rows(lm, path, resume_key, jobs, prompt_template)
    if same and metadata.get("complete", True) is False:  # an unfinished run resumes in place
        return rows, path, ""
    rows = pl.concat([rows, waiting]).unique("chain_id", keep="first", maintain_order=True)
    n = read_parquet(path, columns=["chain_id"]).height
    held = f"{n} finished chains" if same else f"{n} chains (other settings)"
    return rows, pending, held


def _key(path: Path) -> Any:
    """The resume key a chains file was written with."""
    return read_metadata(path).get("resume_key")


def _reusable_rows(
    lm: LoadedModel, path: Path, resume_key: str, jobs: list[ChainJob], prompt_template: str,
    quiet: bool = False,
) -> pl.DataFrame:
    """Rows of ``path`` that are exactly what ``jobs`` would generate now.

    Says on stderr (unless ``quiet``: a pending file) when the file is generated again, and
    how many of its chains are dropped because ``jobs`` does not have them. A damaged
    pending file is discarded.
    """
    empty = pl.DataFrame(schema=CHAIN_SCHEMA)
    if not path.exists():
        return empty
    try:
        key = _key(path)
    except BadInput:
        if not quiet:
            raise
        say(f"{path}: damaged, discarded")
        path.unlink(missing_ok=True)
        return empty
    if key != resume_key:
        if not quiet:
            say(f"{path} was written with other settings or inputs: generating it again")
        return empty
    existing = read_parquet(path)
    if not set(CHAIN_SCHEMA) <= set(existing.columns):
        say(f"{path} was written without the mode columns: generating it again")
        return empty
    existing = existing.select(list(CHAIN_SCHEMA)).cast(CHAIN_SCHEMA)
    thinking = thinking_of(lm)
    expected = {
        job.chain_id: _job_columns(job, prompt_token_ids(lm.tokenizer, job.prompt, prompt_template,
                                                         thinking))
        for job in jobs
    }
    dropped = existing.filter(~pl.col("chain_id").is_in(list(expected))).height
    if dropped and not quiet:
        say(
            f"dropping {dropped} chains of {path} that are not in this run "
            "(other tasks, --limit, behaviours or layers)"
        )
    keep = [
        row
        for row in existing.select(list(CHAIN_SCHEMA)).iter_rows(named=True)
        if expected.get(row["chain_id"]) == {k: row[k] for k in _JOB_COLUMNS}
    ]
    return pl.DataFrame(keep, schema=CHAIN_SCHEMA)


_JOB_COLUMNS = (
    "chain_id",
    "task_id",
    "split",
    "prompt_ids",
    "behaviour",
    "direction",
    "coefficient",
    "layers",
    "vector",
    "mode",
)


def _job_columns(job: ChainJob, prompt_ids: list[int]) -> dict[str, Any]:
    """The columns of a chain fixed before generation."""
    return {
        "chain_id": job.chain_id,
        "task_id": job.task_id,
        "split": job.split,
        "prompt_ids": prompt_ids,
        "behaviour": job.behaviour,
        "direction": job.direction,
        "coefficient": float(job.coefficient),
        "layers": list(job.layers),
        "vector": job.vector,
        "mode": job.mode,
    }


def _chain_row(model: str, job: ChainJob, gen: Generation) -> dict[str, Any]:
    return {
        **_job_columns(job, gen.prompt_ids),
        "model": model,
        "output_ids": gen.output_ids,
        "response": gen.response,
        "thinking_start": gen.thinking_start,
        "thinking_end": gen.thinking_end,
        "finish_reason": gen.finish_reason,
        "steered_tokens": gen.steered_tokens,
    }
