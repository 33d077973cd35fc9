"""Greedy chains, unsteered or steered, batched, locally or on NDIF.

:func:`generate` is the one entry point: task prompts in, token ids and text out. A
:class:`SteeringSpec` adds (``positive``) or subtracts (``negative``) ``coefficient ×
vector`` to the output of each of its decoder blocks, by default at every position and
every step (paper; :mod:`nnsteer.generation.modes` narrows where), each of ``n`` layers receiving
``coefficient / n``. The intervention lives inside
an nnsight ``generate`` context, so ``lm.remote`` sends the same code to NDIF.

Example:
    >>> gens = generate(lm, ["What is 17 * 23?"], max_new_tokens=64)
    >>> gens[0].response[gens[0].thinking_start:gens[0].thinking_end]   # the reasoning
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from nnsteer.errors import BadInput
from nnsteer.generation.modes import BlockInputs, block_inputs, step_boundary_ids
from nnsteer.generation.prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    check_prompt_template,
    prompt_token_ids,
)
from nnsteer.generation.spec import Steering, SteeringSpec
from nnsteer.modeling.models import LoadedModel
from nnsteer.modeling.positions import decode_response
from nnsteer.modeling.thinking import (
    THINK_TAGS,
    ThinkingChoice,
    ThinkingFormat,
    end_of_thinking_ids,
    thinking_of,
)
from nnsteer.ndif.remote import with_retries

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
    names the user-turn preset (:data:`nnsteer.generation.prompts.PROMPT_TEMPLATES`).
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

    Batches group prompts of similar token length (longest first), of equal length where
    left padding would change the model's outputs (:meth:`nnsteer.modeling.architecture.
    Architecture.batches`); every input is checked before the first batch runs.
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
    batches = lm.arch.batches([len(p) for p in prompt_ids], batch_size, decode=True)
    bar = tqdm(total=len(prompts), unit="chain", desc=desc, disable=not progress)
    seconds, n_tokens = 0.0, 0  # generating only: not the caller's work between batches
    try:
        n_batches = len(batches)
        for k, indices in enumerate(batches, start=1):
            started = time.perf_counter()
            new_ids, steered = with_retries(
                lambda: generate_batch(
                    lm, [prompt_ids[i] for i in indices], [specs[i] for i in indices],
                    max_new_tokens, stop,
                ),
                what=f"generate batch {k}/{n_batches}",
            )
            generations = [
                finish_generation(tokenizer, prompt_ids[i], row, stop, thinking.format, n)
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


def generate_batch(
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
    until = {"eos_token_id": sorted(stop)} if stop and not stop <= eos_ids(lm) else {}
    return _traced_generation(lm, batch["input_ids"], batch["attention_mask"],
                              steering_inputs(lm, prompt_ids, specs), max_new_tokens, until)


def steering_inputs(lm: LoadedModel, prompt_ids: list[list[int]],
                    specs: list[SteeringSpec | None]) -> BlockInputs | None:
    """The steering block's inputs for a batch of prompts and their specs on ``lm``
    (:func:`nnsteer.generation.modes.block_inputs`); ``None`` if no row is steered."""
    modes = {(s.where, s.at) for s in specs if s is not None}
    return block_inputs(
        specs, [len(p) for p in prompt_ids], dtype=lm.dtype, vocab_size=lm.arch.vocab_size,
        end_of_thinking=end_of_thinking_ids(lm) if {"thinking", "answer"} & {w for w, _ in modes}
        else [],
        boundaries=step_boundary_ids(lm.tokenizer) if any(a != "every" for _, a in modes)
        else ([], []),
        eos=sorted(eos_ids(lm)),
    )


def _traced_generation(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    steer: BlockInputs | None,
    max_new_tokens: int,
    until: dict[str, Any],
) -> tuple[list[list[int]], list[int]]:
    """The new ids of one nnsight ``generate`` of a left-padded batch, and per row the
    positions steered; ``steer``: what is added where and when (``None``: nothing);
    ``until``: the ``generate`` keywords of the ids that end a chain."""
    n_rows, width = input_ids.shape
    layers, embed = lm.layers, lm.arch.embed(lm.nn)
    steering = steer is not None
    if steering:  # the block reads plain values only: nnsteer's classes do not cross to NDIF
        table, steered, visit, rows, scale = (steer.table, steer.layers, steer.visit, steer.rows,
                                              steer.scale)
        lengths, vocab, marker = steer.lengths, steer.vocab, steer.end_of_thinking
        boundary, newline, eos = steer.boundary, steer.newline, steer.eos
        detect, direction, threshold = steer.detect, steer.direction, steer.threshold
        modes = steer.modes
        prompt_thinking, prompt_answer = modes.prompt_thinking, modes.prompt_answer
        generated_thinking, generated_answer = modes.generated_thinking, modes.generated_answer
        step_starts, conditional = modes.step_starts, modes.conditional
    # An open-ended ``tracer.iter[:]`` ends by design with a "never reached" warning. Every
    # statement of the block is one line: NDIF runs it re-parsed, and a nested ``with`` after
    # a multi-line statement would move.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with lm.nn.generate(max_new_tokens=max_new_tokens, **lm.remote_options(),
                             **GREEDY, **until) as tracer:
            with tracer.invoke(input_ids=input_ids, attention_mask=attention_mask):
                if steering:
                    counts = scale.new_zeros(scale.shape[1]).save()
                    state = {}
                    for _ in tracer.iter[:]:
                        ids = embed.input
                        if not state:
                            is_boundary = ids.new_zeros(vocab) > 0
                            is_newline, is_eos = is_boundary.clone(), is_boundary.clone()
                            is_boundary[boundary] = True
                            is_newline[newline] = True
                            is_eos[eos] = True
                            close = ids.new_tensor(marker or [-1])
                            k = close.shape[0]
                            seen = ids == -1
                            found = ids[:, k - 1:] == close[k - 1]
                            for j in range(k - 1):
                                found = found & (ids[:, j: ids.shape[1] - k + 1 + j] == close[j])
                            seen[:, k - 1:] = found
                            answer = seen.cumsum(1) > 0
                            at_newline = is_newline[ids]
                            start = is_boundary[ids] | (at_newline & at_newline.roll(1, 1))
                            start[:, 0] = is_boundary[ids[:, 0]]
                            start[:, -1] = True
                            unpadded = ids.new_tensor(lengths)[:, None]
                            live = ids.new_ones(ids.shape[1]).cumsum(0) > ids.shape[1] - unpadded
                            only_starts = ids.new_tensor(step_starts)[:, None] > 0
                            only_detected = ids.new_tensor(conditional)[:, None] > 0
                            thinking = ids.new_tensor(prompt_thinking)[:, None] > 0
                            answering = ids.new_tensor(prompt_answer)[:, None] > 0
                            later_thinking = ids.new_tensor(generated_thinking)[:, None] > 0
                            later_answering = ids.new_tensor(generated_answer)[:, None] > 0
                            state["tail"] = ids[:, -k:]
                            state["answer"] = answer[:, -1]
                            state["newline"] = at_newline[:, -1]
                            state["alive"] = live[:, -1]
                        else:
                            last = ids[:, -1]
                            tail = state["tail"].roll(-1, 1)
                            tail[:, -1] = last
                            at_newline = is_newline[last]
                            state["alive"] = state["alive"] & ~is_eos[last]
                            state["answer"] = state["answer"] | (tail == close).all(1)
                            start = (is_boundary[last] | (at_newline & state["newline"]))[:, None]
                            state["tail"], state["newline"] = tail, at_newline
                            answer, live = state["answer"][:, None], state["alive"][:, None]
                            thinking, answering = later_thinking, later_answering
                        mask = (answer & answering) | (~answer & thinking)
                        mask = mask & (start | ~only_starts) & live
                        for layer in visit:
                            h = layers[layer].output
                            if layer == detect:
                                unit = direction.to(h.device)
                                fired = (h.float() * unit).sum(-1) > threshold
                                mask = mask.to(h.device) & (fired | ~only_detected.to(h.device))
                            if layer in steered:
                                j = steered.index(layer)
                                vectors = table.to(h.device)[rows[j]].float()
                                delta = vectors * scale[j].to(h.device)[:, None]
                                on = mask.to(device=h.device, dtype=h.dtype)[:, :, None]
                                h[:] += delta.to(dtype=h.dtype)[:, None, :] * on
                        counts += mask.sum(1).to(counts.device)
            with tracer.invoke():
                new_ids = tracer.result[:, width:].clone().save()
    return new_ids.tolist(), counts.long().tolist() if steering else [0] * n_rows


def finish_generation(
    tokenizer: Any, prompt_ids: list[int], new_ids: list[int], stop: set[int],
    fmt: ThinkingFormat = THINK_TAGS, steered: int = 0,
) -> Generation:
    """The :class:`Generation` of a generated row: cut after its first ``stop`` id and
    decoded; ``fmt`` finds the reasoning (``steered``: positions steered)."""
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
