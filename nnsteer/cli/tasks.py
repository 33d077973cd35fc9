"""``nnsteer tasks``: write tasks.parquet from the built-in set, a file, or Claude."""

from __future__ import annotations

from pathlib import Path

import click
import polars as pl

from nnsteer.cli.common import run_dir
from nnsteer.errors import BadInput
from nnsteer.tasks.claude import DEFAULT_CLAUDE, generate_tasks
from nnsteer.tasks.files import PAPER_EVAL_PER_CATEGORY, PAPER_PER_CATEGORY
from nnsteer.tasks.stage import write_tasks

_PER_CATEGORY = click.IntRange(min=0)


@click.group(name="tasks", invoke_without_command=True)
@click.option("--from", "from_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSONL or CSV file with prompt and category (optional task_id, split, "
                   "answer). Any category names; the built-in set uses the paper's 10.")
@click.option("--per-category", type=_PER_CATEGORY, default=None,
              help="Keep only the first N train tasks of each category.")
@click.option("--eval-per-category", type=_PER_CATEGORY, default=None,
              help="Keep only the first M eval tasks of each category.")
@click.option("--validation-per-category", type=_PER_CATEGORY, default=None,
              help="Move the last N train tasks of each category to a validation split "
                   "(for select --coefficient auto; never trained on, never evaluated).")
@click.pass_context
def command(ctx: click.Context, from_file: Path | None, per_category: int | None,
            eval_per_category: int | None, validation_per_category: int | None) -> None:
    """Write tasks.parquet: the built-in set (330 tasks) or --from FILE.

    New tasks written by Claude: `nnsteer tasks generate` (see its --help).
    """
    if ctx.invoked_subcommand is not None:
        if (from_file is not None or per_category is not None or eval_per_category is not None
                or validation_per_category is not None):
            raise BadInput("--from, --per-category, --eval-per-category and "
                           "--validation-per-category before a subcommand: "
                           "they belong to `nnsteer tasks` alone (`tasks generate` has its own)")
        return

    run = run_dir(ctx)
    tasks = write_tasks(run, source="builtin" if from_file is None else "file", path=from_file,
                        per_category=per_category, eval_per_category=eval_per_category,
                        validation_per_category=validation_per_category)
    _summary(tasks, run.tasks)


@command.command(name="generate")
@click.option("--per-category", type=_PER_CATEGORY, default=PAPER_PER_CATEGORY, show_default=True,
              help="Train tasks per category.")
@click.option("--eval-per-category", type=_PER_CATEGORY, default=PAPER_EVAL_PER_CATEGORY,
              show_default=True, help="Held-out eval tasks per category.")
@click.option("--model", default=DEFAULT_CLAUDE, show_default=True, help="Claude model.")
@click.option("--base-url", default=None, help="A Messages-API compatible server.")
@click.option("--batch-size", type=click.IntRange(min=1), default=10, show_default=True,
              help="Tasks asked for per request.")
@click.pass_context
def generate(ctx: click.Context, per_category: int, eval_per_category: int, model: str,
             base_url: str | None, batch_size: int) -> None:
    """Ask Claude for new tasks (needs ANTHROPIC_API_KEY); resumes where a run stopped."""
    run = run_dir(ctx)
    tasks = generate_tasks(run, per_category=per_category, model=model, base_url=base_url,
                           eval_per_category=eval_per_category, batch_size=batch_size)
    _summary(tasks, run.tasks)


def _summary(tasks: pl.DataFrame, path: Path) -> None:
    counts = tasks["split"].value_counts()
    by_split = ", ".join(f"{n} {s}" for s, n in sorted(counts.iter_rows(), key=lambda r: r[0] != "train"))
    click.echo(f"{len(tasks)} tasks ({by_split}) in {tasks['category'].n_unique()} categories -> {path}")
