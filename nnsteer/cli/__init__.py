"""The ``nnsteer`` command line: a thin layer over the stage functions."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nnsteer.cli.common import model_options
from nnsteer.errors import NnsteerError


class _Group(click.Group):
    """Prints nnsteer errors on one line with their exit code (2 bad input, 1 failed run)."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except NnsteerError as exc:
            click.echo(f"nnsteer: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("nnsteer: interrupted; finished work is saved, rerun to continue", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the study's files. Default: runs/<model-slug>.")
@click.version_option(package_name="nnsteer")
def cli(run_dir: Path | None) -> None:
    """Find and steer reasoning behaviours with steering vectors, locally or on NDIF."""


@cli.command()
@model_options
def models(model: str, remote: bool, device: str | None, dtype: str, batch_size: int) -> None:
    """What a model is: architecture, layers, width, dtype, and where it runs."""
    from nnsteer.models import describe_model

    info = describe_model(model, device=device, dtype=dtype, remote=remote)
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:<{width}}  {value}")


def _register() -> None:
    from nnsteer.cli import stages

    for command in stages.COMMANDS:
        cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    sys.exit(cli.main(prog_name="nnsteer", standalone_mode=True))
