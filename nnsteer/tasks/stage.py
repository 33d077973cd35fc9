"""The ``tasks`` stage (``tasks.parquet``): the built-in set, a user's file, or Claude.

It dispatches to :mod:`nnsteer.tasks.files` (built-in set and files) and
:mod:`nnsteer.tasks.claude` (Claude), which sit below it; the names of
:mod:`nnsteer.tasks.files` are available from here too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from nnsteer.errors import BadInput
from nnsteer.runs.store import RunDir
from nnsteer.tasks.claude import DEFAULT_CLAUDE, generate_tasks
from nnsteer.tasks.files import (  # noqa: F401 (re-exported: the tasks API in one place)
    BUILTIN_PATH,
    CATEGORIES,
    PAPER_EVAL_PER_CATEGORY,
    PAPER_PER_CATEGORY,
    SCHEMA,
    SPLITS,
    VALIDATION,
    cap_tasks,
    carve_validation,
    category_slug,
    load_builtin_tasks,
    make_task_id,
    normalise,
    parse_task,
    read_task_file,
    save_tasks,
    tasks_frame,
)


def write_tasks(
    run: RunDir,
    source: str = "builtin",
    path: Path | None = None,
    per_category: int | None = None,
    eval_per_category: int | None = None,
    claude_model: str | None = None,
    base_url: str | None = None,
    validation_per_category: int | None = None,
) -> pl.DataFrame:
    """Write ``tasks.parquet`` from the built-in set (``source="builtin"``), a file
    (``"file"``), or new tasks written by Claude (``"claude"``).

    ``per_category`` / ``eval_per_category`` keep only the first N train / M eval tasks of
    each category (a quick demo); with ``"claude"`` they are how many to ask for (default
    the paper's 30 and 3), with ``claude_model`` and ``base_url`` as in
    :func:`nnsteer.tasks.claude.generate_tasks`. ``validation_per_category`` moves the
    last N train tasks of each category (before the cap) to the ``validation`` split, which
    ``select --coefficient auto`` sweeps on (:func:`carve_validation`; not with ``"claude"``).
    Example: ``write_tasks(RunDir("runs/demo"), per_category=5)``.
    """
    for option, value in (("per_category", per_category), ("eval_per_category", eval_per_category),
                          ("validation_per_category", validation_per_category)):
        if value is not None and value < 0:
            raise BadInput(f"{option} must be 0 or more, not {value}")
    if source != "file" and path is not None:
        raise BadInput("path is only for source='file'")
    if source != "claude" and (claude_model is not None or base_url is not None):
        raise BadInput("claude_model and base_url are only for source='claude'")
    if source == "claude" and validation_per_category:
        raise BadInput("validation_per_category is for the built-in set or a file, not 'claude'")
    if source == "claude":
        return generate_tasks(
            run, model=claude_model or DEFAULT_CLAUDE, base_url=base_url,
            per_category=PAPER_PER_CATEGORY if per_category is None else per_category,
            eval_per_category=(PAPER_EVAL_PER_CATEGORY if eval_per_category is None
                               else eval_per_category))
    if source == "builtin":
        path = BUILTIN_PATH
        tasks = load_builtin_tasks()
    elif source == "file":
        if path is None:
            raise BadInput("source='file' needs a path")
        tasks = read_task_file(path)
    else:
        raise BadInput(f"source must be 'builtin', 'file' or 'claude', not {source!r}")
    tasks = cap_tasks(carve_validation(tasks, validation_per_category), per_category,
                      eval_per_category)
    options = {
        "source": source,
        "path": None if source == "builtin" else str(path),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "per_category": per_category,
        "eval_per_category": eval_per_category,
        "validation_per_category": validation_per_category,
    }
    save_tasks(run, tasks, options)
    return tasks
