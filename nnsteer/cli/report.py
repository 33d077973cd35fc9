"""``nnsteer report``: write report.html and the chart files of a run."""

from __future__ import annotations

import click

from nnsteer.cli.common import run_dir
from nnsteer.modeling.models import DEFAULT_MODEL
from nnsteer.report.page import write_report


@click.command(name="report")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model whose run directory (runs/<model-slug>) to report, without --run-dir.")
@click.pass_context
def command(ctx: click.Context, model: str) -> None:
    """Write report.html (self-contained) and PNG/SVG copies of every chart; print its path."""
    click.echo(write_report(run_dir(ctx, model, existing=True)))
