"""Greedy chains, unsteered or steered, batched and resumable, locally or on NDIF.

:func:`generate` is the one entry point: task prompts in, token ids and text out. A
:class:`SteeringSpec` adds (``positive``) or subtracts (``negative``) ``coefficient ×
vector`` to the output of each of its decoder blocks, by default at every position and
every step (paper; :mod:`nnsteer.generation.modes` narrows where), each of ``n`` layers receiving
``coefficient / n``. The intervention lives inside
an nnsight ``generate`` context, so ``lm.remote`` sends the same code to NDIF.

:func:`run_chain_jobs` is what the ``generate`` and ``steer`` stages share: it writes the
chains table after every batch and, on a rerun, skips the chains already written.

Example:
    >>> gens = generate(lm, ["What is 17 * 23?"], max_new_tokens=64)
    >>> gens[0].response[gens[0].thinking_start:gens[0].thinking_end]   # the reasoning
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import polars as pl
from tqdm.auto import tqdm

from nnsteer.errors import BadInput, say
from nnsteer.generation.modes import block_inputs, step_boundary_ids
from nnsteer.generation.spec import Steering, SteeringSpec
from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.positions import decode_response
from nnsteer.modeling.thinking import (  # noqa: F401 - THINK_OPEN/CLOSE: the tags, for analysis scripts
    THINK_CLOSE,
    THINK_OPEN,
    THINK_TAGS,
    ThinkingChoice,
    ThinkingFormat,
    choose,
    end_of_thinking_ids,
    thinking_of,
)
from nnsteer.ndif.remote import with_retries
from nnsteer.runs.store import (
    RunDir,
    completeness,
    fingerprint,
    provenance,
    read_metadata,
    read_parquet,
    write_parquet,
)

#: The default user turn around every task prompt (preset ``step-by-step``): the wording
#: the released code's comparison script gives *non-thinking* models. One wording for
#: every model keeps chains comparable; it makes a non-thinking model write its reasoning
#: out, and for such a model the whole response is the reasoning.
TASK_TEMPLATE = (
    "Please answer the following question:\n\n{prompt}\n\n"
    "It requires a few steps of reasoning. So first, think step by step, "
    "and only then give the final answer."
)
#: The user-turn presets (``--prompt-template``): ``released-thinking`` is the bare task,
#: as the released steering pipeline sends it (``generate_responses.py``,
#: ``evaluate_steering.py``); ``released-comparison`` is what its comparison script gives
#: thinking models (``compare_reasoning.py``); ``step-by-step`` is :data:`TASK_TEMPLATE`.
PROMPT_TEMPLATES: dict[str, str] = {
    "step-by-step": TASK_TEMPLATE,
    "released-thinking": "{prompt}",
    "released-comparison": "Please answer the following question:\n\n{prompt}",
}
DEFAULT_PROMPT_TEMPLATE = "step-by-step"

#: Pure greedy decoding: these override whatever the model's generation config sets
#: (``None`` disables a logits processor; sampling settings are ignored without sampling).
GREEDY: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "min_p": None,
    "typical_p": None,
    "repetition_penalty": None,
    "no_repeat_ngram_size": None,
    "min_length": None,
    "min_new_tokens": None,
}

@dataclass(frozen=True)
class Generation:
    """One greedy chain: ids the model saw and produced, the text, where its reasoning is."""

    prompt_ids: list[int]
    output_ids: list[int]
    response: str
    thinking_start: int
    thinking_end: int
    finish_reason: Literal["eos", "length"]
    steered_tokens: int = 0


def check_prompt_template(name: str) -> str:
    """``name`` if it is a preset of :data:`PROMPT_TEMPLATES`; :class:`BadInput` otherwise."""
    if name not in PROMPT_TEMPLATES:
        raise BadInput(f"--prompt-template {name!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
    return name


def chat_prompt(tokenizer: Any, task_prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE,
                thinking: ThinkingChoice | None = None) -> str:
    """The chat-templated text of one task in the user turn of preset ``template``, ending
    with the assistant's generation prompt, as the thinking format renders it (``thinking``;
    default: detected from the tokenizer, :func:`nnsteer.modeling.thinking.choose`)."""
    content = PROMPT_TEMPLATES[check_prompt_template(template)].format(prompt=task_prompt)
    return (thinking or choose(tokenizer)).prompt(tokenizer, content)


def prompt_token_ids(tokenizer: Any, task_prompt: str, template: str = DEFAULT_PROMPT_TEMPLATE,
                     thinking: ThinkingChoice | None = None) -> list[int]:
    """The token ids the model sees for one task (the template supplies BOS if any)."""
    return tokenizer(chat_prompt(tokenizer, task_prompt, template, thinking),
                     add_special_tokens=False)["input_ids"]


def reasoning_span(response: str) -> tuple[int, int]:
    """Char offsets of the reasoning: the text between ``<think>`` and ``</think>``.

    A response without ``<think>`` before its ``</think>`` had the tag opened by the
    prompt: the reasoning starts at 0. Without ``</think>`` it runs to the end, so a
    response with no tags at all is all reasoning.
    """
    return THINK_TAGS.text_spans(response)[0]


def thinking_span(tokenizer: Any, output_ids: Sequence[int], response: str,
                  fmt: ThinkingFormat = THINK_TAGS) -> tuple[int, int]:
    """Char offsets of the reasoning in ``response``, the decoded ``output_ids``, in the
    thinking format ``fmt`` (default ``think-tags``: :class:`nnsteer.modeling.thinking.TagFormat`).

    Where the tokenizer has a ``</think>`` token, the reasoning ends where that token
    stands in the ids (so a tokenizer that marks the tag special, which decoding leaves
    out, still ends it) and starts after a ``<think>`` token before it, else at 0.
    Otherwise the tags are found in the text (:func:`reasoning_span`).
    """
    return fmt.reasoning(tokenizer, output_ids, response)


def eos_ids(lm: LoadedModel, thinking: ThinkingChoice | None = None) -> set[int]:
    """Token ids that end a chain: the generation config's EOS, else the tokenizer's, and
    the thinking format's own end tokens (``thinking``; e.g. harmony's ``<|call|>``)."""
    eos = lm.hf_model.generation_config.eos_token_id
    if eos is None:
        eos = lm.tokenizer.eos_token_id
    ids = {eos} if isinstance(eos, int) else set(eos or [])
    if thinking is not None:
        ids |= thinking.format.stop_ids(lm.tokenizer)
    if not ids:
        raise BadInput(
            f"{lm.name}: neither the generation config nor the tokenizer names an EOS token"
        )
    return ids


def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    steering: Steering = None,
    max_new_tokens: int = 500,
    batch_size: int = 8,
    progress: bool = True,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> list[Generation]:
    """Greedy chains for raw task prompts, in the order given.

    ``steering`` is one spec for every prompt, or one spec (or ``None``) per prompt, so
    one batch can mix behaviours, directions and unsteered rows. ``prompt_template``
    names the user-turn preset (:data:`PROMPT_TEMPLATES`).
    """
    results: list[Generation | None] = [None] * len(prompts)
    for indices, generations in generate_batches(
        lm,
        prompts,
        steering=steering,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        prompt_template=prompt_template,
    ):
        for i, gen in zip(indices, generations):
            results[i] = gen
    return results  # type: ignore[return-value]


def generate_batches(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    steering: Steering = None,
    max_new_tokens: int = 500,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
) -> Iterator[tuple[list[int], list[Generation]]]:
    """Like :func:`generate`, yielding ``(prompt indices, generations)`` batch by batch
    (``desc`` labels the progress bar).

    Batches group prompts of similar token length (longest first); every input is
    checked before the first batch runs.
    """
    specs = _per_prompt(steering, len(prompts))
    check_prompt_template(prompt_template)
    if not prompts:
        raise BadInput("no prompts to generate from")
    if max_new_tokens < 1:
        raise BadInput(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if batch_size < 1:
        raise BadInput(f"batch size must be at least 1, not {batch_size}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadInput(f"prompt {i} is empty")
    for spec in {id(s): s for s in specs if s is not None}.values():
        spec.validate(lm)
    conditions = {s.when.name for s in specs if s is not None and s.when is not None}
    if len(conditions) > 1:
        raise BadInput(f"one run steers with one --when condition at most, got "
                       f"{', '.join(sorted(conditions))}")

    tokenizer = lm.tokenizer
    thinking = thinking_of(lm)
    prompt_ids = [prompt_token_ids(tokenizer, p, prompt_template, thinking) for p in prompts]
    stop = eos_ids(lm, thinking)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))
    bar = tqdm(total=len(prompts), unit="chain", desc=desc, disable=not progress)
    seconds, n_tokens = 0.0, 0  # generating only: not the caller's work between batches
    try:
        n_batches = -(-len(order) // batch_size)
        for k, first in enumerate(range(0, len(order), batch_size), start=1):
            indices = order[first : first + batch_size]
            started = time.perf_counter()
            new_ids, steered = with_retries(
                lambda: _generate_batch(
                    lm, [prompt_ids[i] for i in indices], [specs[i] for i in indices],
                    max_new_tokens, stop,
                ),
                what=f"generate batch {k}/{n_batches}",
            )
            generations = [
                _finish(tokenizer, prompt_ids[i], row, stop, thinking.format, n)
                for i, row, n in zip(indices, new_ids, steered)
            ]
            seconds += time.perf_counter() - started
            n_tokens += sum(len(g.output_ids) for g in generations)
            bar.update(len(indices))  # no tokens/s on the bar: it would stand still mid-batch
            yield indices, generations
    finally:
        bar.close()
    if progress:
        tqdm.write(
            f"generated {len(prompts)} chains, {n_tokens} tokens in {seconds:.1f} s "
            f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s)",
            file=sys.stderr,
        )


def _per_prompt(steering: Steering, n: int) -> list[SteeringSpec | None]:
    if steering is None or isinstance(steering, SteeringSpec):
        return [steering] * n
    specs = list(steering)
    if len(specs) != n:
        raise BadInput(f"got {len(specs)} steering specs for {n} prompts")
    return specs


def _generate_batch(
    lm: LoadedModel,
    prompt_ids: list[list[int]],
    specs: list[SteeringSpec | None],
    max_new_tokens: int,
    stop: set[int] | None = None,
) -> tuple[list[list[int]], list[int]]:
    """New token ids of one left-padded batch (pads after EOS included), and per row the
    number of positions steered (prompt positions and generated inputs before the EOS);
    ``stop``: the ids that end a chain, when they are more than the generation config's EOS."""
    batch = lm.tokenizer.pad(
        {"input_ids": prompt_ids}, padding=True, padding_side="left", return_tensors="pt"
    )
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    width = input_ids.shape[1]
    until = {"eos_token_id": sorted(stop)} if stop and not stop <= eos_ids(lm) else {}
    modes = {(s.where, s.at) for s in specs if s is not None}
    steer = block_inputs(
        specs, [len(p) for p in prompt_ids], dtype=lm.dtype, vocab_size=lm.arch.vocab_size,
        end_of_thinking=end_of_thinking_ids(lm) if {"thinking", "answer"} & {w for w, _ in modes}
        else [],
        boundaries=step_boundary_ids(lm.tokenizer) if any(a != "every" for _, a in modes)
        else ([], []),
        eos=sorted(eos_ids(lm)),
    )
    layers, embed = lm.layers, lm.arch.embed(lm.nn)
    # An open-ended ``tracer.iter[:]`` ends by design with a "never reached" warning.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with lm.nn.generate(max_new_tokens=max_new_tokens, **lm.remote_options(),
                             **GREEDY, **until) as tracer:
            with tracer.invoke(input_ids=input_ids, attention_mask=attention_mask):
                if steer:
                    counts = steer["scale"].new_zeros(len(prompt_ids)).save()
                    state = {}
                    for _ in tracer.iter[:]:
                        ids = embed.input
                        if not state:
                            code = ids.new_zeros(steer["vocab"])
                            code[steer["boundary"]] += 1
                            code[steer["newline"]] += 2
                            code[steer["eos"]] += 4
                            close = ids.new_tensor(steer["close"] or [-1])
                            k = close.shape[0]
                            seen = ids == -1
                            found = ids[:, k - 1:] == close[k - 1]
                            for j in range(k - 1):
                                found = found & (ids[:, j: ids.shape[1] - k + 1 + j] == close[j])
                            seen[:, k - 1:] = found
                            answer = seen.cumsum(1) > 0
                            c = code[ids]
                            newline = (c & 2) > 0
                            start = ((c & 1) > 0) | (newline & newline.roll(1, 1))
                            start[:, 0] = (c[:, 0] & 1) > 0
                            start[:, -1] = True
                            lengths = ids.new_tensor(steer["lengths"])
                            live = ids.new_ones(ids.shape[1]).cumsum(0) > ids.shape[1] - lengths[:, None]
                            flags = steer["flags"].to(ids.device)
                            state["tail"] = ids[:, -k:]
                            state["answer"] = answer[:, -1]
                            state["newline"] = newline[:, -1]
                            state["alive"] = live[:, -1]
                            phase = 0
                        else:
                            c = code[ids[:, -1]]
                            tail = state["tail"].roll(-1, 1)
                            tail[:, -1] = ids[:, -1]
                            newline = (c & 2) > 0
                            state["alive"] = state["alive"] & ((c & 4) == 0)
                            state["answer"] = state["answer"] | (tail == close).all(1)
                            start = (((c & 1) > 0) | (newline & state["newline"]))[:, None]
                            state["tail"], state["newline"] = tail, newline
                            answer, live = state["answer"][:, None], state["alive"][:, None]
                            phase = 2
                        thinking, answering = flags[:, phase: phase + 1], flags[:, phase + 1: phase + 2]
                        mask = (answer & answering) | (~answer & thinking)
                        mask = mask & (start | ~flags[:, 4:5]) & live
                        for layer in steer["visit"]:
                            h = layers[layer].output
                            if layer == steer["detect"]:
                                unit = steer["direction"].to(h.device)
                                fired = (h.float() * unit).sum(-1) > steer["threshold"]
                                mask = mask.to(h.device) & (fired | ~flags[:, 5:6].to(h.device))
                            if layer in steer["layers"]:
                                j = steer["layers"].index(layer)
                                vectors = steer["table"].to(h.device)[steer["rows"][j]].float()
                                delta = vectors * steer["scale"][j].to(h.device)[:, None]
                                on = mask.to(device=h.device, dtype=h.dtype)[:, :, None]
                                h[:] += delta.to(dtype=h.dtype)[:, None, :] * on
                        counts += mask.sum(1).to(counts.device)
            with tracer.invoke():
                new_ids = tracer.result[:, width:].clone().save()
    steered = counts.long().tolist() if steer else [0] * len(prompt_ids)
    return new_ids.tolist(), steered


def _finish(
    tokenizer: Any, prompt_ids: list[int], new_ids: list[int], stop: set[int],
    fmt: ThinkingFormat = THINK_TAGS, steered: int = 0,
) -> Generation:
    """Cut a generated row after its first EOS and decode it; ``fmt`` finds the reasoning
    (``steered``: positions steered)."""
    cut = next((i + 1 for i, t in enumerate(new_ids) if t in stop), None)
    output_ids = new_ids[:cut]
    response = decode_response(tokenizer, output_ids)
    start, end = thinking_span(tokenizer, output_ids, response, fmt)
    return Generation(
        prompt_ids=list(prompt_ids),
        output_ids=output_ids,
        response=response,
        thinking_start=start,
        thinking_end=end,
        finish_reason="length" if cut is None else "eos",
        steered_tokens=steered,
    )


# --- the chains table (generate and steer stages) -------------------------------------


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

    ``prompt_template`` names the user-turn preset (:data:`PROMPT_TEMPLATES`), recorded
    in the metadata. Resumable: a rerun keeps the chains already written and generates
    the rest.
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
    """Generate the chains of ``jobs`` into ``path``, rewriting it atomically after each batch.

    Rows already in ``path`` are kept when the file was written for the same model,
    ``max_new_tokens`` and ``resume_inputs`` (e.g. the steering vectors); otherwise the
    stage starts over. Rows of chains that are not among ``jobs`` are dropped, saying so.
    The metadata says whether the file is complete (:func:`nnsteer.runs.store.completeness`),
    so that later stages refuse a file whose batches are still to come. Returns the
    table in job order.
    """
    resume_key = chains_resume_key(lm, max_new_tokens, resume_inputs)
    metadata = {**metadata, "resume_key": resume_key, "thinking": thinking_of(lm).provenance()}
    done = _reusable_rows(lm, path, resume_key, jobs, prompt_template)
    finished = set(done["chain_id"])
    todo = [job for job in jobs if job.chain_id not in finished]
    ordered = {job.chain_id: i for i, job in enumerate(jobs)}

    def save(rows: pl.DataFrame) -> pl.DataFrame:
        table = rows.sort(pl.col("chain_id").replace_strict(ordered, return_dtype=pl.Int64))
        write_parquet(table, path, {**metadata, **completeness(table.height, len(jobs))})
        return table

    if not todo:
        say(f"{path} is up to date ({done.height} chains)")
        return save(done)  # records this run's options
    check_lengths(lm, todo, max_new_tokens)
    if done.height:
        say(f"{path}: {done.height} of {len(jobs)} chains already done, generating {len(todo)}")
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
        table = save(done)
    return table


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


def _reusable_rows(
    lm: LoadedModel, path: Path, resume_key: str, jobs: list[ChainJob], prompt_template: str
) -> pl.DataFrame:
    """Rows of ``path`` that are exactly what ``jobs`` would generate now.

    Says on stderr when the file is generated again, and how many of its chains are
    dropped because ``jobs`` does not have them.
    """
    empty = pl.DataFrame(schema=CHAIN_SCHEMA)
    if not path.exists():
        return empty
    if read_metadata(path).get("resume_key") != resume_key:
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
    if dropped:
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
