"""The ``nnsteer`` process itself: one-line errors and exit codes, help, version, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnsteer.cli import INTERRUPTED

NNSTEER = [sys.executable, "-m", "nnsteer"]


def nnsteer(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NNSTEER, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The only line the process printed, which must be an nnsteer error with exit code 2."""
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("nnsteer: error: ")
    return line


def test_run_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("")
    bad = tmp_path / "file.txt" / "sub"
    for command in (["tasks"], ["run", "--config", "configs/demo.toml"]):
        line = one_error_line(nnsteer("--run-dir", str(bad), *command,
                                      cwd=Path(__file__).resolve().parents[1]))
        assert line == f"nnsteer: error: --run-dir {bad}: cannot create the directory (Not a directory)"


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")
def test_run_dir_that_cannot_be_made_is_one_line():
    line = one_error_line(nnsteer("--run-dir", "/proc/nnsteer", "tasks"))
    assert line.startswith("nnsteer: error: --run-dir /proc/nnsteer: cannot create the directory (")


def test_run_dir_is_created_only_by_a_stage_that_writes(tmp_path):
    new = tmp_path / "a" / "new"
    result = nnsteer("--run-dir", str(new), "tasks", "--help")
    assert result.returncode == 0 and "Usage: nnsteer tasks" in result.stdout
    line = one_error_line(nnsteer("--run-dir", str(new), "select"))
    assert "not found: run `nnsteer" in line  # the missing input, not the directory
    assert not (tmp_path / "a").exists()  # the check that it can be made leaves nothing
    result = nnsteer("--run-dir", str(new), "tasks", "--per-category", "1")
    assert result.returncode == 0 and (new / "tasks.parquet").is_file()


@pytest.mark.parametrize("args, expected", [
    (["generate", "--limit", "-1"],
     "Invalid value for '--limit': -1 is not in the range x>=1. "
     "Try 'nnsteer generate --help' for help."),
    (["tasks", "generate", "--per-category", "x"],
     "Invalid value for '--per-category': 'x' is not a valid integer range. "
     "Try 'nnsteer tasks generate --help' for help."),
    (["steer", "--lmit", "3"], "No such option '--lmit'"),
    (["run"], "Missing option '--config'"),
    (["--run-dir"], "Option '--run-dir' requires an argument. Try 'nnsteer --help' for help."),
    (["probe"], "No such command 'probe'. Try 'nnsteer --help' for help."),
])
def test_usage_errors_are_one_line(args, expected):
    line = one_error_line(nnsteer(*args))
    assert line.startswith(f"nnsteer: error: {expected}")
    assert "help" in line


def test_help_and_version_still_work():
    result = nnsteer("--help")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: nnsteer") and "generate" in result.stdout
    result = nnsteer("run", "-h")
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.count("Usage: nnsteer run") == 1
    result = nnsteer("--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, "nnsteer, version 0.1.0\n", "")
    result = nnsteer()  # no command: the help, as click shows it
    assert "Usage: nnsteer" in result.stdout + result.stderr and "error" not in result.stderr


def test_run_help_is_exact_about_force():
    help_text = " ".join(nnsteer("run", "--help").stdout.split())
    assert "rerun the command without --force to continue where it stopped" in help_text
    assert "with --force the chosen stages start from scratch" in help_text
    assert "Rerun the chosen stages from scratch" in help_text


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("library", ["_multiarray_umath", "libtorch"])
def test_ctrl_c_while_importing_is_one_line(tmp_path, library):
    """SIGINT as soon as numpy's or torch's native library is mapped, i.e. mid-import."""
    process = subprocess.Popen([*NNSTEER, "--run-dir", str(tmp_path), "generate", "--max-new-tokens", "4"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _loaded(process.pid, library):
        assert process.poll() is None and time.monotonic() < deadline, "never saw the import"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert (process.returncode, stdout, stderr) == (130, "", INTERRUPTED + "\n")


def test_a_global_option_after_the_command_gets_a_hint():
    from click.testing import CliRunner

    from nnsteer.cli import cli

    result = CliRunner().invoke(cli, ["generate", "--run-dir", "x"])
    assert result.exit_code == 2
    assert "--run-dir is a global option: it goes before the command, as in " \
           "'nnsteer --run-dir DIR generate ...'" in result.output


def test_every_option_has_help_and_models_takes_no_batch_size():
    import click
    from click.testing import CliRunner

    from nnsteer.cli import cli

    ctx = click.Context(cli)
    commands = [cli.get_command(ctx, name) for name in cli.list_commands(ctx)]
    commands += [c for group in commands if isinstance(group, click.Group)
                 for c in group.commands.values()]
    for command in commands:
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{command.name} {param.opts[0]} has no help text"
    result = CliRunner().invoke(cli, ["models", "--batch-size", "4"])
    assert result.exit_code == 2 and "No such option '--batch-size'" in result.output
    assert "`nnsteer tasks generate`" in CliRunner().invoke(cli, ["tasks", "--help"]).output
