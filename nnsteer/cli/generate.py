"""``nnsteer generate``: greedy chains on the tasks of a split (chains.parquet)."""

from __future__ import annotations

import click

from nnsteer.cli.common import generation_options, model_options, open_model, run_dir
from nnsteer.generation.chains import generate_chains
from nnsteer.runs.store import require


@click.command(name="generate")
@model_options
@click.option(
    "--split",
    type=click.Choice(["train", "eval"]),
    default="train",
    show_default=True,
    help="Which tasks to generate chains for.",
)
@generation_options("tasks of the split")
@click.pass_context
def command(
    ctx: click.Context,
    model: str,
    remote: bool,
    device: str | None,
    dtype: str,
    batch_size: int,
    split: str,
    limit: int | None,
    max_new_tokens: int,
    prompt_template: str,
) -> None:
    """Generate greedy reasoning chains (chains.parquet); a rerun continues where it stopped."""
    run = run_dir(ctx, model)
    require(run.tasks)  # before loading the model
    lm = open_model(model, remote, device, dtype)
    chains = generate_chains(
        run, lm, split=split, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
        prompt_template=prompt_template,
    )
    click.echo(f"{run.chains}: {chains.height} chains")
