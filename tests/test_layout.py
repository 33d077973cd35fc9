"""The package's layout: subpackages that depend only downward (import-linter, imports inside
functions included), no private name across modules, torch out of ``import nnsteer.cli``, and
a real (non-editable) install that finds its shipped files."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nnsteer"
#: The modules allowed at the package's top level: the base layer, and the entry points.
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py", "labels.py", "stats.py", "package_data.py"}
#: The comment a function-level import of an nnsteer module must carry.
LAZY_REASON = "out of CLI start-up"


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command;"
                           "lint_imports_command()", "--config", str(ROOT / "pyproject.toml"),
                           "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_import_contracts_hold():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, cycle", [
    # The three cycles the flat layout had, each written back in (one inside a function).
    ("evaluation/paired.py", "from nnsteer.evaluation import costs\n"),
    ("generation/modes.py", "\n\ndef _back():\n    from nnsteer.generation.loop import generate\n"),
    ("steer/chains.py", "\n\ndef _back():\n    from nnsteer.selection.layers import select_layers\n"),
])
def test_the_contracts_catch_each_former_cycle(tmp_path, module, cycle):
    copy = tmp_path / "nnsteer"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with (copy / module).open("a") as f:
        f.write(cycle)
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout


def test_only_base_modules_and_entry_points_sit_at_the_top_level():
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == TOP_LEVEL


def test_no_private_name_is_imported_across_modules():
    crossings = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nnsteer"):
                crossings += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert not crossings


def test_imports_inside_functions_only_keep_heavy_modules_out_of_start_up():
    """An nnsteer module imported inside a function says why on the same line."""
    unexplained = []
    for path in _modules():
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    said = " ".join(lines[node.lineno - 1:node.end_lineno])
                    if (name or "").startswith("nnsteer") and LAZY_REASON not in said:
                        unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not unexplained


def test_the_command_line_imports_without_torch():
    code = "import sys, nnsteer.cli; print(sorted(m for m in ('torch', 'transformers', 'nnsight') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment holding nnsteer from its built wheel (not editable); its
    dependencies are this environment's, reached through a path file."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp / "dist").glob("nnsteer-*.whl"))
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    site = next(env_dir.glob("lib/python*/site-packages"))
    dependencies = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "dependencies.pth").write_text("\n".join(dependencies) + "\n")
    python = env_dir / "bin" / "python"
    # --ignore-installed: this environment's editable nnsteer is visible through the path file.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--ignore-installed", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=600, env=_outside_checkout())
    return env_dir / "bin"


def _outside_checkout() -> dict[str, str]:
    """This process's environment without what would put this checkout on the path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run_installed(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``args`` run by the installed environment (``nnsteer`` or ``python``), this checkout out of reach."""
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=_outside_checkout(),
                          capture_output=True, text=True, timeout=600)


def test_a_real_install_finds_its_shipped_files(installed, tmp_path):
    where = _run_installed(installed, tmp_path, "python", "-c", "import nnsteer; print(nnsteer.__file__)")
    assert str(ROOT) not in where.stdout and "site-packages" in where.stdout  # the wheel's copy
    tasks = _run_installed(installed, tmp_path, "nnsteer", "--run-dir", "built-in", "tasks")
    assert tasks.returncode == 0, tasks.stderr
    assert (tmp_path / "built-in" / "tasks.parquet").is_file()
    demo = _run_installed(installed, tmp_path, "nnsteer", "--run-dir", "demo", "run", "--config", "demo",
                          "--only", "tasks")
    assert demo.returncode == 0, demo.stderr
    assert "[1/1] tasks  done" in demo.stderr


@pytest.mark.embedded
def test_a_real_install_describes_the_embedded_model(installed, tmp_path):
    models = _run_installed(installed, tmp_path, "nnsteer", "models")
    assert models.returncode == 0, models.stderr
    assert "smollm2-135m" in models.stdout
