"""The HTML report: sections, chart files, self-containment, and rendering in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from nnsteer.cli import cli
from nnsteer.labels import LABELS, OVERALL, STEERED_LABELS
from nnsteer.report import CHARTS, write_report
from nnsteer.store import RunDir, provenance, write_json, write_parquet

ARTIFACTS = Path(__file__).parent / "artifacts"
N_LAYERS, D_MODEL = 6, 8
MODEL = {"model": "tiny-test", "revision": "abc123"}


def _annotations() -> pl.DataFrame:
    """Two chains: c0 has 2 ok backtracking spans and 1 ok deduction; c1 has 1 ok deduction,
    1 unaligned deduction and 1 unknown-label span."""
    rows = [
        ("c0", "backtracking", "ok"), ("c0", "backtracking", "ok"), ("c0", "deduction", "ok"),
        ("c1", "deduction", "ok"), ("c1", "deduction", "unaligned"), ("c1", "summarizing", "unknown-label"),
    ]
    return pl.DataFrame(
        [{"chain_id": c, "label": l, "start": 10 * i, "end": 10 * i + 9, "text": "x" * 9,
          "annotator": "rules", "status": s} for i, (c, l, s) in enumerate(rows)]
    )


def _evaluation() -> pl.DataFrame:
    """Two eval tasks; for each behaviour a baseline, a positive and a negative chain."""
    rows = []
    for task in ("t0", "t1"):
        for behaviour, direction, share in [(None, "none", 0.2)] + [
            (b, d, s) for b in STEERED_LABELS for d, s in (("positive", 0.5), ("negative", 0.1))
        ]:
            chain = f"{task}|{behaviour or 'baseline'}|{direction}"
            for label in STEERED_LABELS:
                target = behaviour in (None, label)
                rows.append({"chain_id": chain, "task_id": task, "behaviour": behaviour,
                             "direction": direction, "label": label, "tokens": 10 if target else 0,
                             "fraction": share if target else 0.0,
                             "coefficient": 0.0 if direction == "none" else 1.0,
                             "vector": "none" if direction == "none" else "behaviour",
                             "denominator": "labelled"})
    return pl.DataFrame(rows)


STEERED_TEXT = {"none": "So x = 3. Wait, check.", "positive": "Wait, maybe x = 4. Wait, no.",
                "negative": "So x = 3 <done>."}


def _steered() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Steered chains of t0 and t1 (own and random vector), and spans: every "Wait," backtracking."""
    chains, spans = [], []
    for task in ("t0", "t1"):
        for behaviour, direction, vector in [(None, "none", None)] + [
            (b, d, v) for b in STEERED_LABELS for d in ("positive", "negative") for v in ("behaviour", "random")
        ]:
            chain_id, text = f"{task}|{behaviour}|{direction}|{vector}", STEERED_TEXT[direction]
            chains.append({"chain_id": chain_id, "task_id": task, "behaviour": behaviour,
                           "direction": direction, "vector": vector, "response": text})
            spans += [{"chain_id": chain_id, "label": "backtracking", "start": m.start(),
                       "end": m.end(), "status": "ok"} for m in re.finditer("Wait,", text)]
    return pl.DataFrame(chains), pl.DataFrame(spans)


def write_synthetic_run(root: Path) -> RunDir:
    """A run directory with every file the report reads, in the contract formats."""
    run = RunDir(root)
    write_parquet(_annotations(), run.annotations, provenance("annotate", {"annotator": "rules"}, MODEL))
    attribution = pl.DataFrame(
        [{"label": label, "layer": layer, "effect": float(layer + i), "std": 0.1, "n_spans": 3,
          "metric": "nll"} for i, label in enumerate(STEERED_LABELS) for layer in range(N_LAYERS)]
    )
    write_parquet(attribution, run.attribution, provenance("attribute", {"metric": "nll"}, MODEL))
    torch.manual_seed(0)
    vectors = {label: torch.randn(N_LAYERS, D_MODEL) for label in (*LABELS, OVERALL)}
    meta = provenance("extract", {"variant": "paper"}, MODEL)
    save_file(vectors, str(run.vectors), metadata={"nnsteer": json.dumps(meta)})
    write_json(run.layers, {label: {"vector_layer": 3, "layers": [3], "coefficient": 1.0}
                            for label in STEERED_LABELS})
    steered, steered_spans = _steered()
    write_parquet(steered, run.steered, provenance("steer", {}, MODEL))
    write_parquet(steered_spans, run.steered_annotations, provenance("evaluate", {}, MODEL))
    write_parquet(_evaluation(), run.evaluation,
                  provenance("evaluate", {"denominator": "labelled", "n_boot": 200, "seed": 0}, MODEL))
    return run


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> RunDir:
    run = write_synthetic_run(tmp_path_factory.mktemp("run"))
    write_report(run)
    return run


def test_every_section_and_chart_file(full_report):
    page = full_report.report.read_text()
    assert 'class="missing"' not in page
    for title in ["Provenance", "Behaviour labels", "Selected layers", *CHARTS.values()]:
        assert f"<h2>{title}</h2>" in page
    for name in CHARTS:
        assert f'id="chart-{name}"' in page
        png = full_report.charts / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "<svg" in (full_report.charts / f"{name}.svg").read_text()[:500]
    assert "abc123" in page and "tiny-test" in page  # provenance: model and revision


def test_label_counts_match_hand_counts(full_report):
    page = full_report.report.read_text()
    assert "2 chains annotated by <code>rules</code>" in page
    assert "Approximate labels:" in page  # the offline annotator is flagged
    # label, ok spans, chains with an ok span, unaligned, unknown-label
    for row in (("backtracking", 2, 1, 0, 0), ("deduction", 2, 2, 1, 0), ("summarizing", 0, 0, 0, 1)):
        cells = "".join(f"<td>{v}</td>" for v in row)
        assert f"<tr>{cells}</tr>" in page


def test_example_chains_colour_the_spans_of_one_task(full_report):
    page = full_report.report.read_text()
    examples = page.split("<h2>Example chains</h2>")[1].split("</section>")[0]
    assert "Eval task <code>t0</code>" in examples and "t1" not in examples
    assert examples.count("<tr>") == 1 + 2 * len(STEERED_LABELS)  # random control not shown
    wait = '<span title="backtracking" style="background:#f8cbcb">Wait,</span>'
    assert examples.count(wait) == 1 + 2 * len(STEERED_LABELS)  # 1 unsteered + 2 per positive
    assert "<th>backtracking, negative</th><td style=\"white-space:pre-wrap\">So x = 3 &lt;done&gt;." in examples


def test_page_needs_no_network(full_report):
    page = full_report.report.read_text()
    markup = re.sub(r"(?s)<script>.*?</script>", "<script></script>", page)
    assert not re.search(r"<(script|img|iframe)[^>]*\ssrc=|<link[^>]*href=|https?://", markup)
    assert "vegaEmbed" in page and len(page) > 500_000  # the libraries themselves are inlined


def test_missing_stages_say_not_run_yet(tmp_path):
    run = RunDir(tmp_path)
    write_parquet(_annotations(), run.annotations, provenance("annotate", {}, MODEL))
    page = write_report(run).read_text()
    assert page.count('class="missing">Not run yet') == 5  # attribution ... steering, examples
    assert "<td>backtracking</td>" in page
    assert not run.charts.exists()


def test_cli_prints_path_and_rejects_missing_dir(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "report"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(run.report)
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path / "absent"), "report"])
    assert result.exit_code == 2 and "no such run directory" in result.output


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("NNSTEER_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is not installed but NNSTEER_REQUIRE_CHROMIUM=1")
    return found


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium headless with the network cut off (no DNS, unreachable proxy)."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=15000", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_renders_in_headless_chromium(full_report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    url = full_report.report.resolve().as_uri()
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'data-charts-rendered="3"' in page, dom.stderr[-2000:]
    assert 'class="js-error"' not in page
    assert not re.search(r"CONSOLE.*(Uncaught|Error)|Uncaught", dom.stderr), dom.stderr[-2000:]
    for name in CHARTS:
        chart = page.split(f'id="chart-{name}"', 1)[1].split("</section>", 1)[0]
        assert "<svg" in chart, name
        assert len(re.findall(r'role="graphics-symbol"', chart)) >= 4, name  # drawn marks

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    result = _headless(chromium, tmp_path / "profile", f"--screenshot={shot}",
                       "--window-size=1200,4000", url)
    assert result.returncode == 0 and shot.read_bytes()[:4] == b"\x89PNG", result.stderr[-2000:]


@pytest.mark.parametrize("script, name", [("figure3_attribution.py", "attribution"),
                                          ("figure4_steering.py", "steering"),
                                          ("vector_similarity.py", "similarity")])
def test_analysis_scripts_write_figures(full_report, tmp_path, script, name):
    analysis = Path(__file__).resolve().parents[1] / "analysis"
    result = subprocess.run([sys.executable, str(analysis / script), str(full_report.root),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "<svg" in (tmp_path / f"{name}.svg").read_text()[:500]
    if name == "steering":  # one script is enough to check the "stage not run" exit
        empty = subprocess.run([sys.executable, str(analysis / script), str(tmp_path)],
                               capture_output=True, text=True, timeout=120)
        assert empty.returncode == 2 and "Not run yet" in empty.stderr
