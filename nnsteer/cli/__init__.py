"""The ``nnsteer`` command line: a thin layer over the stage functions.

Importing this module imports click only: the commands, and torch with them, are
loaded when the group first looks a command up, inside :func:`main`, so that Ctrl-C
at any point after start-up gets the same one line as Ctrl-C during a stage.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from nnsteer.errors import NnsteerError, scrub

INTERRUPTED = "nnsteer: interrupted; finished work is saved, rerun to continue"
#: Options of ``nnsteer`` itself, given before the command name.
_GLOBAL_OPTIONS = ("--run-dir",)
#: Click's "no arguments: show the help" (click >= 8.2), shown as click shows it.
_HELP_ERRORS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _fail(message: str, exit_code: int) -> NoReturn:
    click.echo(message, err=True)
    raise click.exceptions.Exit(exit_code)


def _usage_line(exc: click.UsageError, where: Callable[[], str]) -> str:
    """A click usage error on one line, with the failing command's ``--help`` hint;
    ``where()`` is that command's path when click did not say."""
    message = " ".join(exc.format_message().split())
    path = exc.ctx.command_path if exc.ctx is not None else where()
    if isinstance(exc, click.NoSuchOption) and exc.option_name in _GLOBAL_OPTIONS:
        message += (f" {exc.option_name} is a global option: it goes before the command, "
                    f"as in 'nnsteer {exc.option_name} DIR {path.split()[-1]} ...'.")
    return f"nnsteer: error: {message} Try '{path} --help' for help."


@contextlib.contextmanager
def _one_line_errors(where: Callable[[], str]) -> Iterator[None]:
    """Turn usage errors, nnsteer errors and Ctrl-C into one line and their exit code."""
    try:
        yield
    except _HELP_ERRORS:
        raise
    except click.UsageError as exc:
        _fail(_usage_line(exc, where), exc.exit_code)
    except NnsteerError as exc:
        _fail(f"nnsteer: error: {scrub(str(exc))}", exc.exit_code)
    except KeyboardInterrupt:
        _fail(INTERRUPTED, 130)


class _Group(click.Group):
    """Loads its commands on first use; prints errors on one line with their exit code
    (2 bad usage or input, 1 failed run, 130 interrupted)."""

    _loaded = False

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        with _one_line_errors(lambda: info_name or "nnsteer"):  # its options, --help, --version
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        def where() -> str:  # the command whose options failed to parse, as far as known
            return " ".join([ctx.command_path, *filter(None, [ctx.invoked_subcommand])])

        with _one_line_errors(where):  # the command's options, and the command itself
            return super().invoke(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def _load(self) -> None:
        if self._loaded:
            return
        with _interrupt_after():
            from nnsteer.cli import (  # keeps torch out of CLI start-up
                models,
                plan,
                portable,
                stages,
            )

        for command in [models.command, plan.command, *portable.COMMANDS, *stages.COMMANDS]:
            self.add_command(command)
        self._loaded = True


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C back until the block has finished, then raise KeyboardInterrupt.

    For imports: an extension module interrupted while it initialises (numpy under
    torch) fails with an unrelated ImportError instead of KeyboardInterrupt.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory of the study's files. Default: runs/<model-slug>.")
@click.version_option(package_name="nnsteer")
def cli(run_dir: Path | None) -> None:
    """Find and steer reasoning behaviours with steering vectors, locally or on NDIF."""


def main() -> None:
    """Console-script entry point."""
    try:
        sys.exit(cli.main(prog_name="nnsteer", standalone_mode=True))
    except KeyboardInterrupt:  # outside the group's own handling
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
