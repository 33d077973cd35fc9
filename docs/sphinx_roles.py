"""Griffe extension for the API reference. nnsteer's docstrings mark references with Sphinx
roles (``:func:`load_model```), shown here as code (`` `load_model` ``), and examples as
doctest lines (``>>> ...``), shown here as code blocks."""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|data|attr|mod|obj|exc|const):`~?\.?([^`]+)`")


def _fence_doctests(text: str) -> str:
    """Each run of lines from a ``>>>`` line to the next blank line, fenced as Python."""
    out: list[str] = []
    fence = None  # the indentation of the open fence
    for line in text.split("\n"):
        if fence is not None and not line.strip():
            out.append(fence + "```")
            fence = None
        elif fence is None and line.lstrip().startswith(">>>"):
            fence = line[: len(line) - len(line.lstrip())]
            out.append(fence + "```pycon")
        out.append(line)
    if fence is not None:
        out.append(fence + "```")
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
        """Rewrite the roles in ``pkg`` and all its members."""
        objects = [pkg]
        while objects:
            obj = objects.pop()
            if obj.docstring is not None:
                obj.docstring.value = _fence_doctests(_ROLE.sub(r"`\1`", obj.docstring.value))
            objects.extend(member for member in obj.members.values() if not member.is_alias)
