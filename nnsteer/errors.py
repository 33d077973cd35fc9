"""Errors nnsteer raises for bad input (exit 2) and for failed runs (exit 1), and its
one-line notes on stderr."""

import sys


class NnsteerError(Exception):
    """A run failed for a reason the user can act on; the CLI prints it on one line, exit 1."""

    exit_code = 1


class BadInput(NnsteerError):
    """Bad usage or input: a file, row, option or model that cannot be used; exit 2."""

    exit_code = 2


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message; ``empty`` (default: its type name) if none."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


def say(message: str) -> None:
    """One line on stderr, ``nnsteer: message``, as the CLI prints its errors."""
    print(f"nnsteer: {message}", file=sys.stderr, flush=True)
