"""Task records and files: the built-in set, a user's file, and ``tasks.parquet``'s frame.

The built-in set (``data/tasks.jsonl``) holds 30 training and 3 held-out evaluation
tasks in each of the paper's 10 categories (Table 1). A user's JSONL or CSV file needs
``prompt`` and ``category`` per row (any category names; the paper's are spelt as in
:data:`CATEGORIES`), and may give ``task_id``, ``split`` and ``answer``. Below both
:mod:`nnsteer.tasks.stage` (the stage) and :mod:`nnsteer.tasks.claude` (Claude).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.errors import BadInput
from nnsteer.package_data import package_path
from nnsteer.runs.store import RunDir, provenance, write_parquet

#: The paper's task categories (Table 1), exactly as the ``category`` column spells them.
CATEGORIES: tuple[str, ...] = (
    "Mathematical Logic",
    "Spatial Reasoning",
    "Verbal Logic",
    "Pattern Recognition",
    "Lateral Thinking",
    "Causal Reasoning",
    "Probabilistic Thinking",
    "Systems Thinking",
    "Creative Problem Solving",
    "Scientific Reasoning",
)

SPLITS: tuple[str, ...] = ("train", "validation", "eval")
#: The split ``select --coefficient auto`` sweeps on: never trained on, never evaluated.
VALIDATION = "validation"

#: Columns of ``tasks.parquet``, in order.
SCHEMA: dict[str, type[pl.DataType]] = {
    "task_id": pl.String,
    "category": pl.String,
    "prompt": pl.String,
    "answer": pl.String,
    "split": pl.String,
    "source": pl.String,
}

BUILTIN_PATH = package_path("nnsteer.tasks.builtin", "tasks.jsonl")
#: The paper's numbers of train and held-out eval tasks per category (v1: 300 + 30).
PAPER_PER_CATEGORY, PAPER_EVAL_PER_CATEGORY = 30, 3

_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """``text`` lowercased with whitespace collapsed: the dedup key. Numbers count:
    "What is 2+2?" and "What is 3+3?" are different tasks."""
    return _SPACE.sub(" ", text.lower()).strip()


def category_slug(category: str) -> str:
    """``"Mathematical Logic"`` -> ``"mathematical-logic"``."""
    return category.lower().replace(" ", "-")


def make_task_id(category: str, split: str, number: int, tag: str = "") -> str:
    """``mathematical-logic-001``, ``mathematical-logic-eval-001``; ``tag`` marks a source (``gen``)."""
    parts = [category_slug(category), tag, "eval" if split == "eval" else "", f"{number:03d}"]
    return "-".join(p for p in parts if p)


def tasks_frame(records: list[dict[str, Any]]) -> pl.DataFrame:
    """A ``tasks.parquet`` frame from task records (dicts with the :data:`SCHEMA` keys)."""
    return pl.DataFrame([{k: r.get(k) for k in SCHEMA} for r in records], schema=SCHEMA)


def parse_task(record: dict[str, Any], where: str,
               categories: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Check one task record; :class:`BadInput` naming ``where`` if it cannot be used.

    ``categories`` limits the categories allowed (default: any non-empty name; the
    paper's are given their spelling in :data:`CATEGORIES` whatever the case).
    Returns ``category``, ``prompt``, ``answer`` (str or None), ``split`` (default
    ``train``) and ``task_id`` (None when not given).
    """
    prompt = _text(record.get("prompt"))
    if not prompt:
        raise BadInput(f"{where}: empty prompt")
    category = _text(record.get("category"))
    if not category:
        raise BadInput(f"{where}: empty category")
    canonical = {c.lower(): c for c in categories or CATEGORIES}.get(category.lower())
    if canonical is None and categories is None:
        canonical = category
    if canonical is None:
        raise BadInput(f"{where}: unknown category {category!r} (known: {', '.join(categories)})")
    split = _text(record.get("split")) or "train"
    if split not in SPLITS:
        raise BadInput(f"{where}: split must be one of {', '.join(SPLITS)}, not {split!r}")
    return {
        "task_id": _text(record.get("task_id")),
        "category": canonical,
        "prompt": prompt,
        "answer": _text(record.get("answer")),
        "split": split,
    }


def read_task_file(path: Path | str, source: str = "file") -> pl.DataFrame:
    """Tasks from a JSONL or CSV file, checked row by row; errors name the file and row."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: task file not found")
    rows = {".jsonl": _jsonl_rows, ".csv": _csv_rows}.get(path.suffix.lower())
    if rows is None:
        raise BadInput(f"{path}: unknown task file type {path.suffix!r} (use .jsonl or .csv)")
    tasks: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    try:
        for where, record in rows(path):
            task = parse_task(record, where)
            key = normalise(task["prompt"])
            if key in first_seen:
                raise BadInput(f"{where}: same task as {first_seen[key]}")
            first_seen[key] = where
            tasks.append({**task, "where": where, "source": source})
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text (after {len(tasks)} task(s))") from None
    if not tasks:
        raise BadInput(f"{path}: no tasks")
    _fill_task_ids(tasks)
    return tasks_frame(tasks)


def load_builtin_tasks() -> pl.DataFrame:
    """The built-in set: 30 train and 3 eval tasks in each of the 10 categories."""
    return read_task_file(BUILTIN_PATH, source="builtin")


def cap_tasks(tasks: pl.DataFrame, per_category: int | None, eval_per_category: int | None) -> pl.DataFrame:
    """The first ``per_category`` train and ``eval_per_category`` eval tasks (and every
    validation task) of each category,
    ordered by category (the paper's as in :data:`CATEGORIES`, then others in order of
    first appearance), then train before eval."""
    caps = {"train": per_category, "eval": eval_per_category, VALIDATION: None}
    limit = {split: len(tasks) if cap is None else cap for split, cap in caps.items()}
    rank_in_group = pl.int_range(pl.len()).over("category", "split")
    order = [*CATEGORIES, *(c for c in dict.fromkeys(tasks["category"]) if c not in CATEGORIES)]
    return (
        tasks.filter(rank_in_group < pl.col("split").replace_strict(limit, return_dtype=pl.Int64))
        .with_columns(
            pl.col("category").replace_strict({c: i for i, c in enumerate(order)},
                                              return_dtype=pl.Int32).alias("_category"),
            pl.col("split").replace_strict({s: i for i, s in enumerate(SPLITS)},
                                           return_dtype=pl.Int32).alias("_split"),
        )
        .sort("_category", "_split", maintain_order=True)
        .select(list(SCHEMA))
    )


def carve_validation(tasks: pl.DataFrame, per_category: int | None) -> pl.DataFrame:
    """``tasks`` with the last ``per_category`` train tasks of each category moved to the
    :data:`VALIDATION` split (None or 0: unchanged); eval tasks are never moved.

    :class:`BadInput` if a category would be left without a train task.
    """
    if not per_category:
        return tasks
    rank_from_end = pl.int_range(pl.len(), 0, -1).over("category", "split")
    train = pl.col("split") == "train"
    left = (tasks.filter(train).group_by("category", maintain_order=True).len()
            .filter(pl.col("len") <= per_category))
    if left.height:
        category, n = left.row(0)
        raise BadInput(f"--validation-per-category {per_category}: category {category!r} has "
                       f"only {n} train task(s), and needs one left to train on")
    return tasks.with_columns(split=pl.when(train & (rank_from_end <= per_category))
                              .then(pl.lit(VALIDATION)).otherwise(pl.col("split")))


def save_tasks(run: RunDir, tasks: pl.DataFrame, options: dict[str, Any]) -> None:
    """Write ``tasks.parquet`` with its provenance."""
    write_parquet(tasks.select(list(SCHEMA)), run.tasks, provenance("tasks", options))


def _text(value: Any) -> str | None:
    """A stripped string, or None for missing/empty values (numbers become strings)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInput(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise BadInput(f"{where}: expected a JSON object")
            yield where, record


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows numbered as a spreadsheet shows them: the header is row 1."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("prompt", "category") if c not in (reader.fieldnames or [])]
        if missing:
            raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
        for number, row in enumerate(reader, start=2):
            yield f"{path} row {number}", row


def _fill_task_ids(tasks: list[dict[str, Any]]) -> None:
    """Give tasks without an id one numbered within its category and split; ids must be unique."""
    counts: dict[tuple[str, str], int] = {}
    owners: dict[str, str] = {}
    for task in tasks:
        key = (task["category"], task["split"])
        counts[key] = counts.get(key, 0) + 1
        if task["task_id"] is None:
            task["task_id"] = make_task_id(task["category"], task["split"], counts[key])
        if task["task_id"] in owners:
            raise BadInput(f"{task['where']}: task_id {task['task_id']!r} already used at {owners[task['task_id']]}")
        owners[task["task_id"]] = task["where"]
