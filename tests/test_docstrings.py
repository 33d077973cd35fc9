"""Every module of the package has a docstring, and so has every public function, class, method
and property it defines, and everything in ``nnsteer.__all__``: the Python API reference
(docs/reference/api.md) is generated from them."""

import importlib
import inspect
import pkgutil

import pytest

import nnsteer

#: Not API: the ``python -m nnsteer`` entry point, and the shipped data folders that
#: pyproject.toml's package-dir maps into the package (``data/`` and ``configs/``).
SKIPPED = ("nnsteer.__main__", "nnsteer.tasks.builtin", "nnsteer.pipeline.configs")


def _skipped(name: str) -> bool:
    return any(name == s or name.startswith(f"{s}.") for s in SKIPPED)


def _module_names() -> list[str]:
    """``nnsteer`` and every module of every subpackage, found by walking the package."""
    found = ["nnsteer"]
    for info in pkgutil.walk_packages(nnsteer.__path__, "nnsteer."):
        if not _skipped(info.name):
            found.append(info.name)
    return sorted(found)


MODULES = _module_names()


def _has_doc(obj: object) -> bool:
    doc = obj.__doc__
    if not doc or not doc.strip():
        return False
    # A dataclass without a docstring gets its signature as one: "Name(field: type, ...)".
    return not (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("))


def _public_members(module_name: str) -> list[tuple[str, object]]:
    """``(qualified name, object)`` of the module's own public functions and classes, and of
    the public methods and properties those classes define."""
    module = importlib.import_module(module_name)
    found = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if obj.__module__ != module.__name__:  # imported from elsewhere
            continue
        found.append((f"{module.__name__}.{name}", obj))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(function):
                    found.append((f"{module.__name__}.{name}.{attr}", function))
    return found


def test_walk_finds_every_subpackage_and_skips_the_data():
    """The walk reaches every subpackage of the import-linter layers and a module inside each,
    and leaves out the entry point and the data packages."""
    for package in ("runs", "ndif", "modeling", "tasks", "annotation", "generation", "vectors",
                    "steer", "evaluation", "selection", "report", "pipeline", "cli"):
        assert f"nnsteer.{package}" in MODULES
        assert any(name.startswith(f"nnsteer.{package}.") for name in MODULES), package
    for module in ("errors", "labels", "stats", "package_data"):
        assert f"nnsteer.{module}" in MODULES
    assert not [name for name in MODULES if _skipped(name)]


@pytest.mark.parametrize("module_name", MODULES)
def test_module_and_its_public_api_have_docstrings(module_name):
    module = importlib.import_module(module_name)
    assert _has_doc(module), f"{module_name} has no module docstring"
    missing = [name for name, obj in _public_members(module_name) if not _has_doc(obj)]
    assert not missing, f"no docstring: {', '.join(missing)}"


def test_package_exports_have_docstrings():
    assert _has_doc(nnsteer)
    missing = [name for name in nnsteer.__all__
               if name != "__version__" and not _has_doc(getattr(nnsteer, name))]
    assert not missing, f"no docstring: {', '.join(missing)}"


def test_check_sees_a_missing_docstring():
    """The check itself: a function or dataclass without a docstring is caught."""
    from dataclasses import dataclass

    def bare() -> None:
        pass

    @dataclass
    class Bare:
        x: int

    @dataclass
    class Documented:
        """Has one."""

        x: int

    assert not _has_doc(bare) and not _has_doc(Bare) and _has_doc(Documented)
