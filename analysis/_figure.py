"""Shared command line of the figure scripts: rebuild one report chart from a run directory."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nnsteer.errors import NnsteerError
from nnsteer.report.page import chart_spec, save_charts
from nnsteer.runs.store import RunDir


def main(name: str, doc: str | None) -> None:
    """Run the command that writes chart ``name`` of a run as PNG and SVG."""

    @click.command(help=doc)
    @click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Folder for the files. Default: RUN_DIR/charts.")
    def command(run_dir: Path, out: Path | None) -> None:
        run = RunDir(run_dir)
        try:
            paths = save_charts({name: chart_spec(run, name)}, out or run.charts)
        except NnsteerError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        for path in paths:
            click.echo(path)

    command()
