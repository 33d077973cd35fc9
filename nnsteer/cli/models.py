"""``nnsteer models``: what a model is, without loading its weights."""

from __future__ import annotations

import click

from nnsteer.cli.common import describe_thinking, model_choice_options, open_model
from nnsteer.modeling.models import describe_model
from nnsteer.pipeline.smoke import smoke_lines


@click.command(name="models")
@model_choice_options
@click.option("--smoke", is_flag=True, help="With --remote: send one tiny generate, extract "
              "and attribute request, and say whether NDIF accepted each.")
def command(model: str, remote: bool, device: str | None, dtype: str, smoke: bool) -> None:
    """What a model is: architecture, layers, width, dtype, and where it runs."""
    if smoke and not remote:
        raise click.UsageError("--smoke needs --remote (it sends requests to NDIF)")
    hot_swap = click.get_current_context().meta.get("nnsteer.hot_swap", False)
    info = describe_model(model, device=device, dtype=dtype, remote=remote, hot_swap=hot_swap)
    info["thinking format"] = describe_thinking(model)
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:<{width}}  {value}")
    if smoke:
        for line in smoke_lines(open_model(model, remote, device, dtype)):
            click.echo(line)
