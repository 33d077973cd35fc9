"""``nnsteer models``: what a model is, without loading its weights."""

from __future__ import annotations

import click

from nnsteer.cli.common import describe_thinking, model_choice_options


@click.command(name="models")
@model_choice_options
def command(model: str, remote: bool, device: str | None, dtype: str) -> None:
    """What a model is: architecture, layers, width, dtype, and where it runs."""
    from nnsteer.models import describe_model

    hot_swap = click.get_current_context().meta.get("nnsteer.hot_swap", False)
    info = describe_model(model, device=device, dtype=dtype, remote=remote, hot_swap=hot_swap)
    info["thinking format"] = describe_thinking(model)
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:<{width}}  {value}")
