"""Stage commands: ``nnsteer.cli.<stage>`` modules each define ``command``.

A stage whose module is not there yet gets a placeholder that says so and exits 2.
"""

from __future__ import annotations

import importlib

import click

from nnsteer.errors import BadInput

PLANNED = {
    "tasks": "Write tasks.parquet from the built-in set, a file, or Claude.",
    "generate": "Generate greedy reasoning chains (chains.parquet).",
    "annotate": "Annotate chains into behaviour spans (annotations.parquet).",
    "extract": "Difference-of-means candidate vectors at every layer (vectors.safetensors).",
    "attribute": "Attribution patching per layer and label (attribution.parquet).",
    "select": "Choose steering layers (layers.json).",
    "steer": "Generate steered chains on the eval tasks.",
    "evaluate": "Annotate steered chains and measure behaviour shares (evaluation.parquet).",
    "report": "Write report.html with every chart.",
    "run": "Run every stage from a TOML config, skipping those that are up to date.",
}


def _not_built(name: str, help_text: str) -> click.Command:
    @click.command(name=name, help=f"{help_text} (not built yet)",
                   context_settings={"ignore_unknown_options": True})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        raise BadInput(f"`nnsteer {name}` is not built yet")

    return command


def _command(name: str, help_text: str) -> click.Command:
    try:
        module = importlib.import_module(f"nnsteer.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"nnsteer.cli.{name}":
            raise
        return _not_built(name, help_text)
    return module.command


COMMANDS: list[click.Command] = [_command(n, h) for n, h in PLANNED.items()]
