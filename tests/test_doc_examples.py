"""Every fenced block of README.md and docs/**/*.md runs, is parsed, or says why not.

- ``python`` fences run, page by page: the fences of one page run in order in one namespace
  (a page reads as one session), in a fresh temporary directory, on the embedded models
  (each loaded once per test session). A fence that needs a study's files declares it with
  ``<!-- docs-test: setup demo-run -->`` on the line before it: the page then runs where
  ``runs/demo`` is a small study of the embedded thinking model (:func:`demo_run`).
- ``bash``/``sh``/``shell`` fences, and the ``$ `` lines of ``console`` fences: every command
  that starts with ``nnsteer`` is split as the shell splits it and parsed by the real click
  commands, without running them, so every option and value is checked; an unquoted shell
  operator in it (``>``, ``<``, ``|``, ``&``, ``;``) fails, since the shell would act on it.
  ``bash scripts/…`` and ``python analysis/…`` lines must name files that exist.
- ``toml`` and ``json`` fences are parsed; ``text`` fences (output, diagrams) are not checked.
- A fence that cannot run here says why, on the line before it:
  ``<!-- docs-test: skip needs a GPU -->``. Fences without a language fail.

The census (how many fences ran, were parsed, were skipped and why) is printed at the end of
the test session (``tests/conftest.py``, ``pytest_terminal_summary``).
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

SHELL = {"bash", "sh", "shell", "console"}
PARSED = {"toml", "json"}
UNCHECKED = {"text"}
RUN = {"python"}
SETUPS = {"demo-run"}

_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>skip|setup)\s+(?P<arg>.*?)\s*-->\s*$")
#: Shell operators that end or redirect a command: never part of an nnsteer argument.
_OPERATORS = {";", "&", "&&", "|", "||", ">", ">>", "<", "<<", "(", ")", ">&", "<&", "&>"}


@dataclass(frozen=True)
class Fence:
    """One fenced block: where it is, its language, its text and its marker."""

    page: str
    line: int
    lang: str
    body: str
    skip: str | None = None
    setup: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def expand_snippets(body: str) -> str:
    """``body`` with each ``--8<--`` line replaced by what it includes, as the site shows it."""
    from test_docs import included

    return "\n".join(included(line)[0][1] if "--8<--" in line else line
                     for line in body.split("\n"))


def read_fences(path: Path, page: str | None = None) -> list[Fence]:
    """The fenced blocks of one Markdown page, indented ones (in list items) included;
    ``page`` names it (default: its path in the repository)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = page or path.relative_to(ROOT).as_posix()
    fences, i = [], 0
    while i < len(lines):
        opened = _OPEN.match(lines[i])
        if not opened:
            i += 1
            continue
        indent, ticks = opened["indent"], opened["ticks"]
        lang = opened["info"].strip().split(" ")[0].lower() if opened["info"].strip() else ""
        body, j = [], i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        marker = _MARKER.match(lines[i - 1]) if i else None
        fences.append(Fence(page, i + 1, lang, expand_snippets("\n".join(body)) + "\n",
                            skip=marker["arg"] if marker and marker["what"] == "skip" else None,
                            setup=marker["arg"] if marker and marker["what"] == "setup" else None))
        i = j + 1
    return fences


FENCES = [fence for path in PAGES for fence in read_fences(path)]


def census() -> dict[str, Counter]:
    """How many fences run, are parsed, are skipped (by reason) and are not checked."""
    counts: dict[str, Counter] = {"executed": Counter(), "parsed": Counter(),
                                  "skipped": Counter(), "not checked": Counter()}
    for fence in FENCES:
        if fence.skip:
            counts["skipped"][fence.skip] += 1
        elif fence.lang in RUN:
            counts["executed"][fence.lang] += 1
        elif fence.lang in SHELL or fence.lang in PARSED:
            counts["parsed"][fence.lang] += 1
        else:
            counts["not checked"][fence.lang] += 1
    return counts


def census_lines() -> list[str]:
    """The census as lines for the end of the test session."""
    counts = census()
    lines = [f"doc fences: {sum(counts['executed'].values())} executed, "
             f"{sum(counts['parsed'].values())} parsed, {sum(counts['skipped'].values())} skipped, "
             f"{sum(counts['not checked'].values())} not checked (text)"]
    for kind in ("executed", "parsed", "not checked"):
        if counts[kind]:
            lines.append(f"  {kind}: " + ", ".join(f"{n} {lang}" for lang, n in sorted(counts[kind].items())))
    lines += [f"  skipped ({n}): {reason}" for reason, n in sorted(counts["skipped"].items())]
    return lines


# --------------------------------------------------------------------------- every fence


def test_every_fence_has_a_known_language_and_marker():
    known = SHELL | PARSED | UNCHECKED | RUN
    unknown = [f"{f.where}: {f.lang or '(none)'}" for f in FENCES if f.lang not in known]
    assert not unknown, f"fences with no or an unknown language (one of {sorted(known)}): {unknown}"
    setups = [f"{f.where}: {f.setup}" for f in FENCES if f.setup and f.setup not in SETUPS]
    assert not setups, f"unknown setups (one of {sorted(SETUPS)}): {setups}"
    assert not [f.where for f in FENCES if f.skip == ""], "a skip marker must say why"


def test_census_counts_every_fence():
    counts = census()
    assert sum(sum(c.values()) for c in counts.values()) == len(FENCES)
    assert sum(counts["executed"].values()) >= 5 and sum(counts["parsed"].values()) >= 15


# --------------------------------------------------------------------------- shell fences


def shell_lines(fence: Fence) -> list[str]:
    """The fence's command lines: continuation lines joined; for ``console``, the ``$`` lines."""
    lines, current = [], ""
    for raw in fence.body.splitlines():
        if fence.lang == "console":
            if not raw.startswith("$ ") and not current:
                continue
            raw = raw[2:] if raw.startswith("$ ") else raw
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append(current + raw)
        current = ""
    return [line for line in lines if line.strip()]


def split_commands(line: str) -> list[list[str]]:
    """``line`` split as a POSIX shell splits it into simple commands (operators apart)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    commands, current = [], []
    for token in tokens:
        if token in {";", "&&", "||", "|", "&"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def _unchecked_paths(command: click.Command) -> list[click.Path]:
    """The command's ``click.Path(exists=True)`` types: their placeholders (FILE) are parsed,
    not looked up."""
    return [p.type for p in command.params
            if isinstance(p.type, click.Path) and p.type.exists]


def parse_nnsteer(argv: list[str]) -> list[str]:
    """Parse ``nnsteer ARGS`` with the real click commands, invoking nothing; returns the
    command path. Raises on any option, value or command click or nnsteer refuses."""
    from nnsteer.cli import cli

    assert argv[0] == "nnsteer"
    if set(argv) & {"--help", "-h", "--version"}:
        return ["nnsteer", "(help)"]
    ctx = cli.make_context("nnsteer", argv[1:])
    path = ["nnsteer"]
    group: click.Command = cli
    while isinstance(group, click.Group):
        rest = [*getattr(ctx, "_protected_args", ctx.__dict__.get("protected_args", [])), *ctx.args]
        if not rest:
            break
        name, command, rest = group.resolve_command(ctx, rest)
        assert command is not None, f"no command {name!r}"
        path.append(name)
        paths = _unchecked_paths(command)
        for t in paths:
            t.exists = False
        try:
            ctx = command.make_context(name, list(rest), parent=ctx)
        finally:
            for t in paths:
                t.exists = True
        group = command
    return path


SHELL_FENCES = [f for f in FENCES if f.lang in SHELL and not f.skip]


@pytest.mark.parametrize("fence", SHELL_FENCES, ids=[f.where for f in SHELL_FENCES])
def test_shell_fence_parses(fence):
    for line in shell_lines(fence):
        for command in split_commands(line):
            if command[0] == "nnsteer":
                bad = [t for t in command if t in _OPERATORS or t.startswith((">", "<"))]
                assert not bad, (f"{fence.where}: {line!r}: unquoted shell operator {bad[0]!r} "
                                 "in an nnsteer command: quote the argument")
                try:
                    parse_nnsteer(command)
                except click.exceptions.Exit as exc:  # a usage error the group printed
                    pytest.fail(f"{fence.where}: {line!r} is refused (exit {exc.exit_code})")
                except Exception as exc:  # noqa: BLE001 - click's or nnsteer's refusal
                    pytest.fail(f"{fence.where}: {line!r} is refused: {exc}")
            elif command[0] in {"bash", "python", "python3"} and len(command) > 1:
                script = command[1]
                if script.startswith(("scripts/", "analysis/", "bench/", "tests/")):
                    assert (ROOT / script).is_file(), f"{fence.where}: {script} does not exist"


def test_an_unquoted_condition_is_caught():
    """The check that catches ``--when LABEL@12>3.5`` written without quotes."""
    assert split_commands("nnsteer steer --when uncertainty-estimation@12>3.5") == [
        ["nnsteer", "steer", "--when", "uncertainty-estimation@12", ">", "3.5"]]
    assert split_commands("nnsteer steer --when 'uncertainty-estimation@12>3.5'") == [
        ["nnsteer", "steer", "--when", "uncertainty-estimation@12>3.5"]]
    assert parse_nnsteer(["nnsteer", "--run-dir", "runs/x", "steer", "--when",
                          "uncertainty-estimation@12>3.5"]) == ["nnsteer", "steer"]
    with pytest.raises(click.UsageError):
        parse_nnsteer(["nnsteer", "steer", "--no-such-option"])
    with pytest.raises(click.exceptions.Exit):  # the group's own options: one line, exit 2
        parse_nnsteer(["nnsteer", "--no-such-option", "steer"])


# --------------------------------------------------------------------------- toml and json


PARSED_FENCES = [f for f in FENCES if f.lang in PARSED and not f.skip]


@pytest.mark.parametrize("fence", PARSED_FENCES, ids=[f.where for f in PARSED_FENCES])
def test_data_fence_parses(fence, tmp_path):
    """JSON parses; TOML is a config ``nnsteer run`` accepts: every key and value checked as
    ``nnsteer run`` checks them before its first stage."""
    if fence.lang == "json":
        json.loads(fence.body)
        return
    from nnsteer.pipeline.run import read_config, stage_function, stage_options
    from nnsteer.runs.registry import STAGES

    tomllib.loads(fence.body)
    path = tmp_path / "fence.toml"
    path.write_text(fence.body, encoding="utf-8")
    config = read_config(path)
    for stage in STAGES:
        stage_options(config, stage, stage_function(stage))


# --------------------------------------------------------------------------- python fences


@functools.cache
def _loaded(*args, **kwargs):
    from nnsteer.modeling import models

    return models.__dict__["_docs_original_load_model"](*args, **kwargs)


@pytest.fixture(scope="module")
def cached_models():
    """``load_model`` loads each embedded model once for this module's doc tests, and torch runs
    on one thread: on a busy machine a second one spins more than it computes (a quarter of
    the CPU time, measured)."""
    import torch

    from nnsteer.modeling import models

    original, threads = models.load_model, torch.get_num_threads()
    models.__dict__["_docs_original_load_model"] = original
    models.load_model = _loaded
    torch.set_num_threads(1)
    yield
    models.load_model = original
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cached_models):
    """``runs/demo``: a small study of the embedded thinking model, ``smollm2-135m-r1``, with
    the files the pages read: tasks, a few training chains with their rules annotations, an
    ``uncertainty-estimation`` vector and its ``layers.json`` entry (imported from a random
    direction at layers 20 and 21, as ``nnsteer import`` does), steered chains and their
    evaluation. Tiny on purpose: it checks that the examples run, not what they find."""
    import torch

    from nnsteer import RunDir, load_model
    from nnsteer.annotation import annotate_chains
    from nnsteer.evaluation import evaluate
    from nnsteer.generation import generate_chains
    from nnsteer.steer import steer_chains
    from nnsteer.steer.export import import_vector
    from nnsteer.tasks import write_tasks

    root = tmp_path_factory.mktemp("demo-run")
    run = RunDir(root / "runs" / "demo")
    lm = load_model("smollm2-135m-r1")
    write_tasks(run, per_category=1, eval_per_category=1)
    generate_chains(run, lm, limit=2, max_new_tokens=16)
    annotate_chains(run, annotator="rules")
    direction = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(0))
    torch.save({20: direction, 21: direction}, root / "direction.pt")
    import_vector(run, lm, root / "direction.pt", "uncertainty-estimation")
    steer_chains(run, lm, behaviours=["uncertainty-estimation"], limit=2, max_new_tokens=8)
    evaluate(run, lm=lm)
    return root


PYTHON_PAGES = sorted({f.page for f in FENCES if f.lang in RUN})
#: The fences (code and setup) of the pages whose examples ran and passed.
_PASSED: set[tuple] = set()


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_python_fences_run(page, tmp_path, monkeypatch, request, cached_models):
    fences = [f for f in FENCES if f.page == page and f.lang in RUN]
    runnable = [f for f in fences if not f.skip]
    if not runnable:
        pytest.skip(f"every python fence of {page} is marked skip")
    key = tuple((f.body, f.setup) for f in runnable)
    if key in _PASSED:  # the README repeats a page's example: it ran once already
        return
    if any(f.setup == "demo-run" for f in runnable):
        shutil.copytree(request.getfixturevalue("demo_run") / "runs", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "docs_" + re.sub(r"\W", "_", page)}
    for fence in runnable:
        code = compile(fence.body, fence.where, "exec")
        try:
            exec(code, namespace)  # noqa: S102 - the documentation's own examples
        except Exception as exc:
            raise AssertionError(f"{fence.where}: the example fails: {type(exc).__name__}: {exc}") from exc
    _PASSED.add(key)


def test_fence_reader_handles_indented_fences_and_markers(tmp_path):
    page = tmp_path / "check.md"
    page.write_text("1. Step:\n\n    <!-- docs-test: skip needs NDIF -->\n    ```bash\n"
                    "    nnsteer models --remote\n    ```\n\n```python\nx = 1\n```\n",
                    encoding="utf-8")
    fences = read_fences(page, "check.md")
    assert [(f.lang, f.body, f.skip, f.line) for f in fences] == [
        ("bash", "nnsteer models --remote\n", "needs NDIF", 4), ("python", "x = 1\n", None, 8)]
