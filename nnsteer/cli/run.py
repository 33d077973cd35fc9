"""``nnsteer run``: every stage from a TOML config, skipping those that are up to date."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from nnsteer.annotation.stage import failed_chains_in, failed_note
from nnsteer.cli.common import given_run_dir
from nnsteer.errors import BadInput
from nnsteer.pipeline.plan import plan_study
from nnsteer.pipeline.run import (
    Config,
    read_config,
    run_pipeline,
    select_stages,
    shipped_configs,
)
from nnsteer.runs.registry import STAGE_NAMES


@click.command(name="run", help=f"Run {' → '.join(STAGE_NAMES)}.\n\n" """
    A stage is skipped when its outputs are up to date (same options, model and
    inputs). After Ctrl-C or a crash, rerun the command without --force to continue
    where it stopped: with --force the chosen stages start from scratch again.
""", short_help="Run every stage from a TOML config, skipping those that are up to date.")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The study's TOML config, or the name of one shipped with nnsteer: "
                   f"{', '.join(shipped_configs())}.")
@click.option("--from", "from_stage", type=click.Choice(STAGE_NAMES), default=None,
              help="Start at this stage (earlier stages are not checked).")
@click.option("--only", multiple=True, type=click.Choice(STAGE_NAMES),
              help="Run only this stage (repeatable).")
@click.option("--released-code", is_flag=True,
              help="Make every choice as the authors' released code (prompt, 1000 tokens, "
                   "gpt-4.1, released-code vectors and metric, --spans others on 50 chains, "
                   "chain aggregation, their layers); the config's own values still win.")
@click.option("--force", is_flag=True,
              help="Rerun the chosen stages from scratch, even if up to date; finished "
                   "batches are not reused, so after Ctrl-C rerun without --force to continue.")
@click.pass_context
def command(ctx: click.Context, config_path: Path, from_stage: str | None,
            only: tuple[str, ...], released_code: bool, force: bool) -> None:
    config = read_config(config_path)
    if released_code:
        config = dataclasses.replace(config, released_code=True)
    root = given_run_dir(ctx)  # a bad --run-dir is one line before the plan opens the model
    summary = plan_line(config, from_stage, only, config_path)

    def log(message: str) -> None:  # the plan's line first, once the run's checks have passed
        nonlocal summary
        if summary:
            click.echo(summary, err=True)
            summary = None
        click.echo(message, err=True)

    run = run_pipeline(config, run_dir=root,
                       from_stage=from_stage, only=only, force=force, log=log)
    if run.report.exists():
        click.echo(run.report)

    incomplete = False
    for path in (run.annotations, run.steered_annotations):
        if failed := failed_chains_in(path):
            click.echo(f"nnsteer: {failed_note(path, failed)}", err=True)
            incomplete = True
    if incomplete:
        ctx.exit(1)


def plan_line(config: Config, from_stage: str | None, only: tuple[str, ...],
              config_path: Path) -> str | None:
    """``nnsteer plan``'s summary of the stages this run covers; None when the plan cannot
    be made (the run then reports the config's problem itself, or needs no plan)."""
    try:
        stages = [stage.name for stage in select_stages(from_stage, only)]
        plan = plan_study(config, stages=stages)
    except BadInput:
        return None
    return f"nnsteer {plan.summary()} (`nnsteer plan --config {config_path}` for the table)"
