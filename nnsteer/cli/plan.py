"""``nnsteer plan``: what a study will cost, per stage, before anything loads."""

from __future__ import annotations

from pathlib import Path

import click

from nnsteer.pipeline.plan import plan_study
from nnsteer.pipeline.run import read_config, shipped_configs


@click.command(name="plan")
@click.option("--config", "config_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The study's TOML config, or the name of one shipped with nnsteer: "
                   f"{', '.join(shipped_configs())}.")
@click.option("--price-per-mtok", type=click.FloatRange(min=0), default=None,
              help="The annotator's (and an LLM grader's) price in dollars per million "
                   "tokens, input and output alike: adds their cost.")
def command(config_path: Path, price_per_mtok: float | None) -> None:
    """Per stage: chains, tokens, forward and backward passes, peak memory, annotator calls
    and, on NDIF, jobs and MB; from the config and the model's config only (no weights).

    Each figure says whether it is a count, a formula (named) or a measured constant
    (named with its date and machine); ``≤`` marks an upper bound.
    """
    plan = plan_study(read_config(config_path), price_per_mtok=price_per_mtok)
    click.echo(plan.table())
    click.echo(plan.summary())
