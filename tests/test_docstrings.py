"""Every public function and class of the stage modules, and everything in ``nnsteer.__all__``,
has a docstring: the Python API reference (docs/reference/api.md) is generated from them."""

import importlib
import inspect

import pytest

import nnsteer

#: The modules of the study's stages and the objects they share; their public API is documented.
STAGE_MODULES = ["tasks", "generation", "annotate", "residuals", "vectors", "attribution", "select",
                 "steer", "evaluate", "report", "models", "store"]


def _has_doc(obj: object) -> bool:
    doc = obj.__doc__
    if not doc or not doc.strip():
        return False
    # A dataclass without a docstring gets its signature as one: "Name(field: type, ...)".
    return not (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("))


def _public_members(module_name: str) -> list[tuple[str, object]]:
    """``(qualified name, object)`` of the module's own public functions and classes, and of
    the public methods and properties those classes define."""
    module = importlib.import_module(f"nnsteer.{module_name}")
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


@pytest.mark.parametrize("module_name", STAGE_MODULES)
def test_stage_module_public_api_has_docstrings(module_name):
    module = importlib.import_module(f"nnsteer.{module_name}")
    assert _has_doc(module), f"nnsteer.{module_name} has no module docstring"
    members = _public_members(module_name)
    assert members, f"nnsteer.{module_name} has no public function or class"
    missing = [name for name, obj in members if not _has_doc(obj)]
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
