"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nnsteer.models import DEFAULT_MODEL, LoadedModel, load_model, model_slug
from nnsteer.pipeline import create_run_dir
from nnsteer.store import RunDir


def model_choice_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--model --remote --device --dtype``: which model, and where it runs."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="HF id, local directory, .gguf file, or embedded model name."),
        click.option("--remote", is_flag=True, help="Run on NDIF (needs NDIF_API_KEY)."),
        click.option("--device", default=None,
                     help="cpu, cuda, cuda:1, or auto (all GPUs). Default: cuda if present."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--model --remote --device --dtype --batch-size``, as every model stage takes."""
    func = click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                        help="Chains (spans for attribute) per forward pass or NDIF request; "
                             "lower it if memory runs out.")(func)
    return model_choice_options(func)


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


def given_run_dir(ctx: click.Context) -> Path | None:
    """``--run-dir`` if given, checked (:func:`check_run_dir`)."""
    root = ctx.find_root().params.get("run_dir")
    if root is not None:
        check_run_dir(Path(root), "--run-dir")
    return root


def run_dir(ctx: click.Context, model: str | None = None) -> RunDir:
    """``--run-dir``, else ``runs/<model-slug>``; checked (:func:`check_run_dir`)."""
    root = given_run_dir(ctx)
    if root is None:
        root = Path("runs") / model_slug(model or DEFAULT_MODEL)
        check_run_dir(root, "run directory")
    return RunDir(Path(root))


def check_run_dir(root: Path, origin: str) -> None:
    """:class:`BadInput` naming ``origin`` unless ``root`` is a directory or can be made one.

    Leaves nothing behind: a stage creates its run directory only when it writes there.
    """
    for path in create_run_dir(root, origin):
        with contextlib.suppress(OSError):  # something else wrote there meanwhile: keep it
            path.rmdir()
