"""``nnsteer steer``: steered and baseline chains on the eval tasks (steered.parquet)."""

from __future__ import annotations

import click

from nnsteer.cli.common import (
    generation_options,
    model_options,
    number_list,
    open_model,
    run_dir,
)
from nnsteer.steer.chains import steer_chains


def _names(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


@click.command(name="steer")
@model_options
@click.option(
    "--behaviours",
    callback=_names,
    default=None,
    help="Comma-separated labels. Default: every behaviour in layers.json.",
)
@click.option(
    "--coefficients",
    callback=number_list,
    default=None,
    help="Comma-separated sweep, e.g. 0.5,1,2. Default: each label's layers.json coefficient.",
)
@click.option(
    "--random-control/--no-random-control",
    default=True,
    show_default=True,
    help="Also steer with a random vector of the same norm at the same layers.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random control.")
@click.option("--where", callback=_names, default="all", show_default=True,
              help="Comma-separated phases to steer, one condition each: all, prompt, generated, "
                   "thinking, answer (docs/steering-modes.md).")
@click.option("--at", "at", default="every", show_default=True,
              help="every position, or step-starts: only where a sentence or paragraph ends.")
@click.option("--when", default=None, metavar="LABEL@LAYER>THRESHOLD",
              help="Steer only where the residual at LAYER projects on LABEL's unit vector above "
                   "THRESHOLD (LABEL@LAYER: the threshold select --calibrate-conditions wrote).")
@click.option("--force", is_flag=True, help="Use vectors made on another model (fingerprint or id differs).")
@generation_options("eval tasks")
@click.pass_context
def command(
    ctx: click.Context,
    model: str,
    remote: bool,
    device: str | None,
    dtype: str,
    batch_size: int,
    behaviours: list[str] | None,
    coefficients: list[float] | None,
    random_control: bool,
    seed: int,
    where: list[str],
    at: str,
    when: str | None,
    limit: int | None,
    max_new_tokens: int,
    prompt_template: str,
    force: bool,
) -> None:
    """Generate steered chains (positive, negative) and baselines on the eval tasks."""
    run = run_dir(ctx, model)
    lm = open_model(model, remote, device, dtype)
    chains = steer_chains(
        run,
        lm,
        behaviours=behaviours,
        coefficients=coefficients,
        random_control=random_control,
        limit=limit,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        prompt_template=prompt_template,
        where=where,
        at=at,
        when=when,
        force=force,
    )
    click.echo(f"{run.steered}: {chains.height} chains")
