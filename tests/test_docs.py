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


# --------------------------------------------------------------------------- the site's pages

PAGES = [README, *sorted(DOCS.rglob("*.md"))]
_SNIPPET = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<range>[^"]+))?"\s*$', re.M)


def included(text: str) -> list[tuple[str, str]]:
    """``(snippet, text)`` of every ``--8<--`` include of a page, as pymdownx.snippets
    resolves it (whole file, ``start:end`` lines, or a named ``[start:NAME]`` section)."""
    out = []
    for match in _SNIPPET.finditer(text):
        path, part = ROOT / match["path"], match["range"]
        assert path.is_file(), f"{match['path']} does not exist"
        lines = path.read_text(encoding="utf-8").splitlines()
        if part is None:
            chosen = lines
        elif re.fullmatch(r"\d+:\d+", part):
            start, end = map(int, part.split(":"))
            assert 1 <= start <= end <= len(lines), f"{match[0].strip()}: lines out of range"
            chosen = lines[start - 1:end]
        else:
            starts = [i for i, line in enumerate(lines) if line.strip().endswith(f"[start:{part}]")]
            ends = [i for i, line in enumerate(lines) if line.strip().endswith(f"[end:{part}]")]
            assert len(starts) == len(ends) == 1, f"{match[0].strip()}: no section {part!r}"
            chosen = lines[starts[0] + 1:ends[0]]
        assert chosen, f"{match[0].strip()} includes nothing"
        out.append((match[0].strip(), "\n".join(chosen)))
    return out


#: What user pages must not say: paths outside the repository, files users do not have, and
#: the project's internal history (issue numbers, rounds of work).
FORBIDDEN = {
    "a path outside the repository": re.compile(r"\.\./shared|/work/|CONTRACTS\.md|METHOD\.md"),
    "an issue number": re.compile(r"(?<![\w&])#\d+\b|\bissues? \d+"),
    "internal history": re.compile(r"\d{4}-\d\d-\d\d round|\bas before\b|\bno longer steered\b"),
}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pages_speak_of_the_product_alone(page):
    text = page.read_text(encoding="utf-8")
    sources = [("the page", text), *included(text)]
    found = [f"{what} in {where}: {m.group(0)!r}" for where, body in sources
             for what, pattern in FORBIDDEN.items() for m in pattern.finditer(body)]
    assert not found, found


def test_every_page_is_in_the_nav_and_linked_from_the_home_page():
    nav = set(re.findall(r":\s*([\w/-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert nav == pages
    home = (DOCS / "index.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"\]\(([\w/-]+\.md)[)#]", home))
    assert pages - {"index.md"} <= linked, f"not in the home page's table: {sorted(pages - linked - {'index.md'})}"


#: Figures that stay in prose (or in a summary table), each with the file that holds it and
#: the text there that must match: (page, text on the page, source file, text in the file).
PROSE_FIGURES = [
    ("README.md", "19 min 49 s", "bench/results/studies.txt", "in all, setup included                                 19 min 49 s"),
    ("README.md", "2026-12-04 (`bench/results/studies.txt`)", "bench/results/studies.txt", "bash scripts/demo.sh in a fresh clone (configs/demo.toml), 2026-12-04"),
    ("README.md", "24.5 tokens/s", "bench/results/generation.txt", "   16  transformers generate        1024      24.5"),
    ("README.md", "a fifth of its speed on 2026-11-23", "bench/results/generation.txt", "a fifth of its 2026-11-23 speed"),
    ("docs/getting-started.md", "24.5 tokens/s", "bench/results/generation.txt", "   16  transformers generate        1024      24.5"),
    ("docs/getting-started.md", "126.4 tokens/s of 2026-11-23", "bench/results/generation.txt", "   16  transformers generate        1024     126.4"),
    ("docs/benchmarks.md", "0.92× to 1.03×", "bench/results/generation.txt", "0.92x"),
    ("docs/benchmarks.md", "0.92× to 1.03×", "bench/results/generation.txt", "1.03x"),
    ("docs/benchmarks.md", "0.99× the tokens/s of a decoder-stack-only forward", "bench/results/extract.txt", "/ bare forward (decoder stack, no lm_head): 0.99x"),
    ("docs/benchmarks.md", "peak memory 1.054×", "bench/results/extract.txt", "peak RSS 100 / 10 chains: 1.054x"),
    ("docs/benchmarks.md", "`nll` 1.28×", "bench/results/attribution.txt", "nnsteer nll                                  0.449       1.28"),
    ("docs/benchmarks.md", "10.86×", "bench/results/attribution.txt", "authors nll (fwd+bwd per span prefix)        3.799      10.86"),
    ("docs/benchmarks.md", "16.4× faster", "bench/results/offsets.txt", "16.4x"),
    ("docs/benchmarks.md", "56.5× at 4,000", "bench/results/offsets.txt", "56.5x"),
    ("docs/benchmarks.md", "macro-F1 0.603 / 0.554", "bench/results/agreement.txt", "macro-F1 0.603"),
    ("docs/benchmarks.md", "macro-F1 0.603 / 0.554", "bench/results/agreement.txt", "macro-F1 0.554"),
    ("docs/benchmarks.md", "macro-F1 0.554 on Qwen-14B, 0.564 on Llama-8B", "bench/results/agreement.txt", "macro-F1 learned 0.554"),
    ("docs/benchmarks.md", "macro-F1 0.554 on Qwen-14B, 0.564 on Llama-8B", "bench/results/agreement.txt", "macro-F1 learned 0.564"),
    ("docs/benchmarks.md", "reaches only\n0.572 on Qwen-14B", "bench/results/agreement.txt", "macro-F1 on test 0.572"),
    ("docs/benchmarks.md", "and 0.600 on Llama-8B", "bench/results/agreement.txt", "macro-F1 on test 0.600"),
    ("docs/benchmarks.md", "scores 0.994 and 0.992", "bench/results/agreement.txt", "majority LLM label: macro-F1 0.994"),
    ("docs/benchmarks.md", "scores 0.994 and 0.992", "bench/results/agreement.txt", "majority LLM label: macro-F1 0.992"),
    ("docs/benchmarks.md", "0.21× CPU", "bench/results/annotator.txt", "0.21x CPU"),
    ("docs/benchmarks.md", "measured and committed on 2026-11-23", "bench/results/attribution.txt", "Measured 23:26-23:28 UTC"),
    ("docs/ndif-requests.md", "(2.6 MB\nfor 8B, 7.0 MB for 70B)", "bench/results/ndif.txt", "total             439      107       251.4       2.6        2.60"),
    ("docs/ndif-requests.md", "(2.6 MB\nfor 8B, 7.0 MB for 70B)", "bench/results/ndif.txt", "total             439      107      1412.3       7.0        6.84"),
    ("docs/ndif-requests.md", "(38 and 63 jobs)", "bench/results/ndif.txt", "generate           38       38"),
    ("docs/ndif-requests.md", "(38 and 63 jobs)", "bench/results/ndif.txt", "steer              63       63"),
    ("docs/costs.md", "`evaluate` took less time than `steer`", "bench/results/studies.txt", "steer      100 chains of 80 tokens, 38 tokens/s         3 min 29 s"),
    ("docs/results.md", "19 min 49 s with setup", "bench/results/studies.txt", "in all, setup included                                 19 min 49 s"),
    ("docs/steering-modes.md", "steer 108 chains took 8 min 57 s, evaluate 6 min 19 s", "bench/results/studies.txt", "steer      108 chains of 256 tokens                     8 min 57 s"),
    ("docs/steering-modes.md", "steer 108 chains took 8 min 57 s, evaluate 6 min 19 s", "bench/results/studies.txt", "evaluate   the NLL of the 108 chains nearly all of it   6 min 19 s"),
]


@pytest.mark.parametrize("page, phrase, source, expected", PROSE_FIGURES,
                         ids=[f"{p}:{t[:30]}" for p, t, _, _ in PROSE_FIGURES])
def test_prose_figures_match_their_files(page, phrase, source, expected):
    text = (ROOT / page).read_text(encoding="utf-8")
    assert " ".join(phrase.split()) in " ".join(text.split()), f"{page} no longer says {phrase!r}"
    assert expected in (ROOT / source).read_text(encoding="utf-8"), f"{source} does not hold {expected!r}"


def test_the_supported_family_count_in_prose():
    from nnsteer.modeling.architecture import SUPPORTED_FAMILIES

    text = (DOCS / "models.md").read_text(encoding="utf-8")
    assert f"{len(SUPPORTED_FAMILIES)} families are tested" in text
    assert f"{len(SUPPORTED_FAMILIES)} decoder families" in README.read_text(encoding="utf-8")


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
