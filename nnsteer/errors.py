"""Errors nnsteer raises for bad input (exit 2) and for failed runs (exit 1)."""


class NnsteerError(Exception):
    """A run failed for a reason the user can act on; the CLI prints it on one line, exit 1."""

    exit_code = 1


class BadInput(NnsteerError):
    """Bad usage or input: a file, row, option or model that cannot be used; exit 2."""

    exit_code = 2
