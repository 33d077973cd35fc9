"""Files that ship inside the package (built-in tasks, configs, prompts, adapters, weights).

Every run-time read of a shipped file goes through :func:`package_path`, so that an editable
install, a wheel and an install from a git URL all find the same files.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def package_path(package: str, *parts: str) -> Path:
    """The path of the shipped file ``parts`` inside ``package`` (e.g. ``"nnsteer", "data", "x"``)."""
    return Path(str(files(package).joinpath(*parts)))
