"""The README stays a short entry point into the documentation site (docs/, mkdocs.yml).

The site itself is checked by ``mkdocs build --strict`` in .ci/run: broken links, missing
pages, pages left out of the nav and the generated CLI and API references."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: Where each section of the README of 2026-12-02 (775 lines) now lives: its heading on the
#: page. Nothing of it was dropped.
MOVED_SECTIONS = {
    "Two commands on a fresh machine": ("getting-started.md", "## Two commands on a fresh machine"),
    "The two embedded models": ("models.md", "## The two embedded models"),
    "Does it think?": ("models.md", "### Does it think?"),
    "What it shows: configs/thinking.toml": ("results.md", "## The thinking study"),
    "The demo: configs/demo.toml": ("results.md", "## The demo"),
    "What the plain model's study found": ("results.md", "## The plain model"),
    "The study, stage by stage": ("study.md", "# The study, stage by stage"),
    "Choices that differ from the paper or its released code":
        ("method.md", "## Choices that differ from the paper or its released code"),
    "Bad input, crashes and two writers": ("reliability.md", "## Bad input, crashes and two writers"),
    "Reproducing the released code: nnsteer run --released-code":
        ("released-code.md", "## `nnsteer run --released-code`"),
    "Running on NDIF": ("ndif.md", "# Running on NDIF"),
    "Set-up": ("ndif.md", "## Set-up"),
    "Long runs: retries and resuming": ("ndif.md", "## Long runs: retries and resuming"),
    "What travels: payload budgets": ("ndif.md", "## What travels: payload budgets"),
    "Precision of what comes back": ("ndif.md", "## Precision of what comes back"),
    "What was verified against what": ("ndif.md", "## What was verified against what"),
    "How this is tested without NDIF": ("ndif.md", "## How this is tested without NDIF"),
    "Measured figures": ("benchmarks.md", "## Measured figures"),
    "Tokenizers tested": ("models.md", "## Tokenizers tested"),
    "Development": ("contributing.md", "## Development"),
}


def test_readme_is_short_and_has_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "arXiv 2506.18167" in text
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in text
        assert (ROOT / command.split()[1]).is_file()


def test_readme_links_point_at_files():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert any(t.startswith("docs/images/") for t in targets)
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to missing files: {missing}"


@pytest.mark.parametrize("section", sorted(MOVED_SECTIONS))
def test_old_readme_section_is_on_a_page(section):
    page, heading = MOVED_SECTIONS[section]
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    assert heading in lines, f"{section!r}: no {heading!r} in docs/{page}"


# --------------------------------------------------------------------------- the CLI reference


def test_cli_reference_shows_defaults_and_placeholders_as_help_does():
    """docs/reference/cli.md as MkDocs renders it with docs/hooks.py: no click sentinel in a
    default cell, and ``<model-slug>`` kept as text (escaped), not swallowed as an HTML tag."""
    import importlib.util

    markdown = pytest.importorskip("markdown")
    pytest.importorskip("mkdocs_click")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    hooks.install()
    page = markdown.markdown((DOCS / "reference" / "cli.md").read_text(encoding="utf-8"),
                             extensions=["mkdocs-click", "attr_list", "tables", "fenced_code"])
    assert "nnsteer steer" in page and "--run-dir" in page
    assert "Sentinel" not in page and "UNSET" not in page
    assert "runs/&lt;model-slug&gt;" in page
    assert "openai:&lt;model&gt;" in page
    assert "<model-slug>" not in page.replace("&lt;model-slug&gt;", "")
