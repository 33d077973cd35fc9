"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nnsteer.models import DEFAULT_MODEL, LoadedModel, load_model, model_slug
from nnsteer.store import RunDir


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--model --remote --device --dtype --batch-size``, as every model stage takes."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="HF id, local directory, .gguf file, or embedded model name."),
        click.option("--remote", is_flag=True, help="Run on NDIF (needs NDIF_API_KEY)."),
        click.option("--device", default=None,
                     help="cpu, cuda, cuda:1, or auto (all GPUs). Default: cuda if present."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def generation_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--limit --max-new-tokens``, as the stages that generate take; ``what`` names the tasks."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("--max-new-tokens", type=click.IntRange(min=1), default=500,
                            show_default=True, help="Greedy tokens per chain at most.")(func)
        return click.option("--limit", type=click.IntRange(min=1), default=None,
                            help=f"Only the first N {what}.")(func)

    return decorate


def open_model(model: str, remote: bool, device: str | None, dtype: str) -> LoadedModel:
    """Load the model named by the common options."""
    return load_model(model, device=device, dtype=dtype, remote=remote)


def run_dir(ctx: click.Context, model: str | None = None) -> RunDir:
    """``--run-dir``, else ``runs/<model-slug>``."""
    root = ctx.find_root().params.get("run_dir")
    if root is None:
        root = Path("runs") / model_slug(model or DEFAULT_MODEL)
    return RunDir(Path(root))

