"""Reasoning tasks written by Claude, resumably.

The paper used Claude 3.5 Sonnet, which Anthropic has retired; the default is a current
Sonnet (``--model`` picks another).

One Messages API request per category and batch asks for a JSON list of tasks. Each
accepted task is kept in ``tasks.generated.jsonl`` in the run directory as soon as its
reply arrives, so a rerun asks only for what is still missing. Tasks that repeat the
built-in set or an earlier task (after :func:`nnsteer.tasks.files.normalise`) are skipped.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from nnsteer.errors import BadInput, NnsteerError, scrub
from nnsteer.runs.store import RunDir, atomic_path
from nnsteer.tasks.files import (
    CATEGORIES,
    PAPER_EVAL_PER_CATEGORY,
    SPLITS,
    cap_tasks,
    load_builtin_tasks,
    make_task_id,
    normalise,
    parse_task,
    save_tasks,
    tasks_frame,
)

DEFAULT_CLAUDE = "claude-sonnet-5-5"
API_KEY_VARIABLE = "ANTHROPIC_API_KEY"
PROGRESS_FILE = "tasks.generated.jsonl"

# The prompt, in one place.
SYSTEM_PROMPT = (
    "You write reasoning tasks for a research study of how language models reason step by "
    "step. You reply with JSON only."
)
CATEGORY_HINTS = {
    "Mathematical Logic": "multi-step arithmetic, algebra, number and logic-grid puzzles with one exact answer",
    "Spatial Reasoning": "arrangements, directions, rotations, folding, maps and 3D shapes described in words",
    "Verbal Logic": "syllogisms, truth-tellers and liars, conditional statements and ordering clues",
    "Pattern Recognition": "number, letter and word sequences or rules to infer and extend",
    "Lateral Thinking": "riddles and puzzles whose answer needs an unexpected but fair reinterpretation",
    "Causal Reasoning": "explaining observed effects, separating causes from correlations and confounders",
    "Probabilistic Thinking": "probabilities, expected values, conditional probability and base rates",
    "Systems Thinking": "feedback loops, stocks and flows, unintended consequences of interventions",
    "Creative Problem Solving": "design and improvisation problems with constraints and several good answers",
    "Scientific Reasoning": "hypotheses, experiment design, controls and interpreting results",
}
TASK_REQUEST = """Write {n} new reasoning tasks in the category "{category}" ({hint}).

Each task must:
- be a self-contained question that takes a capable model a few hundred words of step-by-step reasoning;
- be answerable from its own text, with no tools, files or pictures;
- have a short reference answer (a number, a word or one sentence), or null if many answers are good;
- differ from the other new tasks and from these existing tasks in the category:
{existing}

Reply with only a JSON list of {n} objects of the form
{{"category": "{category}", "prompt": "<the task>", "answer": "<short answer>" or null}}."""
EXISTING_SHOWN = 20


@dataclass
class TokenUse:
    """Tokens billed over a run."""

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0

    def add(self, usage: Any) -> None:
        """Count one request and its ``usage`` (an Anthropic reply's token counts; a reply
        without them, from a compatible server, adds none)."""
        self.requests += 1
        for name in ("input_tokens", "output_tokens"):
            value = getattr(usage, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                setattr(self, name, getattr(self, name) + value)

    def __str__(self) -> str:
        requests = f"{self.requests} request{'' if self.requests == 1 else 's'}"
        return f"{requests}, {self.input_tokens} input and {self.output_tokens} output tokens"


def generate_tasks(
    run: RunDir,
    *,
    per_category: int,
    model: str = DEFAULT_CLAUDE,
    base_url: str | None = None,
    eval_per_category: int = PAPER_EVAL_PER_CATEGORY,
    batch_size: int = 10,
    max_retries: int = 8,
    max_tokens: int = 8192,
) -> pl.DataFrame:
    """Ask Claude for ``per_category`` train and ``eval_per_category`` eval tasks per category.

    Writes ``tasks.parquet`` (source ``anthropic:<model>``) and returns it. Rate limits,
    overload and server errors are retried with backoff (``max_retries`` per request);
    a reply that cannot be used is reported and skipped, and a rerun asks again only for
    what is missing. Needs ``ANTHROPIC_API_KEY``; ``base_url`` for compatible servers.
    """
    for option, value, least in (("per_category", per_category, 0),
                                 ("eval_per_category", eval_per_category, 0),
                                 ("batch_size", batch_size, 1)):
        if value < least:
            raise BadInput(f"{option} must be {least} or more, not {value}")
    api_key = os.environ.get(API_KEY_VARIABLE)
    if not api_key:
        raise BadInput(f"{API_KEY_VARIABLE} is not set: export your Anthropic API key to generate tasks")
    import anthropic

    progress = run.path(PROGRESS_FILE)
    generated = _read_progress(progress)
    wanted = {"train": per_category, "eval": eval_per_category}
    builtin = load_builtin_tasks()
    seen = {normalise(p) for p in builtin["prompt"]} | {normalise(t["prompt"]) for t in generated}
    plan = [(c, n) for c in CATEGORIES for n in _batches(_missing(generated, c, wanted), batch_size)]

    client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=max_retries)
    use = TokenUse()
    try:
        for category, n in tqdm(plan, desc="tasks from Claude", unit="request", file=sys.stderr):
            existing = [t["prompt"] for t in generated if t["category"] == category]
            existing += builtin.filter(pl.col("category") == category)["prompt"].to_list()
            try:
                reply = client.messages.create(
                    model=model, max_tokens=max_tokens, system=SYSTEM_PROMPT,
                    messages=[{"role": "user", "content": _task_request(category, n, existing)}],
                )
            except anthropic.APIError as exc:
                raise NnsteerError(
                    f"Claude request for {category} failed ({_describe(exc)}); {len(generated)} tasks "
                    f"are kept in {progress}: rerun to continue"
                ) from None
            use.add(getattr(reply, "usage", None))
            items, problems = _parse_reply(reply, category)
            for number, task in items:
                key = normalise(task["prompt"])
                split = next((s for s in SPLITS if _count(generated, category, s) < wanted.get(s, 0)), None)
                if key in seen:
                    problems.append(f"item {number} repeats an existing task")
                elif split is not None:
                    seen.add(key)
                    number_in_split = _count(generated, category, split) + 1
                    generated.append({**task, "split": split, "source": f"anthropic:{model}",
                                      "task_id": make_task_id(category, split, number_in_split, tag="gen")})
            for problem in problems:
                tqdm.write(scrub(f"nnsteer: {category}: {problem}; skipped"), file=sys.stderr)
            _write_progress(progress, generated)
    finally:
        tqdm.write(f"nnsteer: token use: {use}", file=sys.stderr)
    for category in CATEGORIES:
        if missing := _missing(generated, category, wanted):
            tqdm.write(f"nnsteer: {category}: {missing} tasks short; rerun to ask again", file=sys.stderr)

    if not generated and per_category + eval_per_category > 0:
        kept = f"{run.tasks} is kept as it was" if run.tasks.exists() else f"{run.tasks} is not written"
        raise NnsteerError(f"Claude gave no usable task: {kept}; rerun to ask again")
    tasks = cap_tasks(tasks_frame(generated), per_category, eval_per_category)
    options = {"source": "anthropic", "model": model, "per_category": per_category,
               "eval_per_category": eval_per_category}
    save_tasks(run, tasks, options)
    return tasks


def _task_request(category: str, n: int, existing: list[str]) -> str:
    return TASK_REQUEST.format(
        n=n, category=category, hint=CATEGORY_HINTS[category],
        existing="\n".join(f"- {p}" for p in existing[:EXISTING_SHOWN]),
    )


def _parse_reply(reply: Any, category: str) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """The usable tasks of a reply (numbered from 1) and what was wrong with the rest."""
    blocks = getattr(reply, "content", None)
    text = "".join(block.text for block in blocks if getattr(block, "type", None) == "text"
                   and isinstance(getattr(block, "text", None), str)) \
        if isinstance(blocks, list) else ""
    start, end = text.find("["), text.rfind("]")
    try:
        items = json.loads(text[start:end + 1]) if 0 <= start < end else None
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        cut = " (cut at max_tokens)" if getattr(reply, "stop_reason", None) == "max_tokens" else ""
        return [], [f"reply is not a JSON list{cut}"]
    good, problems = [], []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            problems.append(f"item {number} is not a JSON object")
            continue
        try:
            task = parse_task({"category": category, **item}, f"item {number}", CATEGORIES)
        except BadInput as exc:
            problems.append(str(exc))
            continue
        if task["category"] != category:
            problems.append(f"item {number} is in category {task['category']!r}")
            continue
        good.append((number, task))
    return good, problems


def _describe(exc: Exception) -> str:
    """A failed request in a few words; the body of a refused key is not shown (it may echo it)."""
    status = getattr(exc, "status_code", None)
    if status in (401, 403):
        return f"HTTP {status}: {API_KEY_VARIABLE} was refused"
    return f"HTTP {status}: {scrub(str(exc.message))[:200]}" if status else type(exc).__name__


def _count(tasks: list[dict[str, Any]], category: str, split: str) -> int:
    return sum(t["category"] == category and t["split"] == split for t in tasks)


def _missing(tasks: list[dict[str, Any]], category: str, wanted: dict[str, int]) -> int:
    return sum(max(0, n - _count(tasks, category, split)) for split, n in wanted.items())


def _batches(total: int, size: int) -> list[int]:
    """Batch sizes covering ``total``: 25 by 10 -> 10, 10, 5."""
    return [min(size, total - start) for start in range(0, total, size)]


def _read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            tasks.append(json.loads(line))
        except json.JSONDecodeError:
            raise BadInput(f"{path} line {number}: not valid JSON; delete the file to start over") from None
    return tasks


def _write_progress(path: Path, tasks: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
