"""The stage commands, in the order of the stage registry, then ``nnsteer run``."""

from __future__ import annotations

import click

from nnsteer.cli import (
    annotate,
    attribute,
    evaluate,
    extract,
    generate,
    report,
    run,
    select,
    steer,
    tasks,
)
from nnsteer.runs.registry import STAGE_NAMES, STAGES

#: Each stage's command, by the stage's name.
STAGE_COMMANDS: dict[str, click.Command] = {
    module.command.name: module.command
    for module in (tasks, generate, annotate, extract, attribute, select, steer, evaluate, report)
}
for _stage in STAGES:  # the one-line summaries of `nnsteer --help` come from the registry
    STAGE_COMMANDS[_stage.name].short_help = _stage.summary
COMMANDS: list[click.Command] = [*(STAGE_COMMANDS[name] for name in STAGE_NAMES), run.command]
