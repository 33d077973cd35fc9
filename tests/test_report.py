"""The HTML report: sections, chart files, self-containment, and rendering in headless Chromium."""

from __future__ import annotations

import html
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
from nnsteer.report.blocks import CHARTS
from nnsteer.report.page import write_report
from nnsteer.runs.store import RunDir, provenance, write_json, write_parquet

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


N_TASKS = 8  # the fewest tasks evaluate draws intervals for


def _evaluation(coefficients=(1.0,)) -> pl.DataFrame:
    """Eight eval tasks; per behaviour and coefficient, a positive and a negative chain with
    the behaviour vector and with the random one, and one baseline per task. Positive
    steering adds 0.1 × coefficient to the target's share, with task-to-task noise; the
    random vector does nothing; example-testing stays at 0% when steered negatively."""
    rows = []
    for t in range(N_TASKS):
        task, base = f"t{t}", 0.2 + 0.01 * t
        conditions = [(None, "none", "none", 0.0, base)]
        for b in STEERED_LABELS:
            for c in coefficients:
                conditions += [(b, "positive", "behaviour", c, base + 0.1 * c + 0.02 * (t % 3)),
                               (b, "negative", "behaviour", c,
                                0.0 if b == "example-testing" else base / (1 + c)),
                               (b, "positive", "random", c, base), (b, "negative", "random", c, base)]
        for behaviour, direction, vector, coefficient, share in conditions:
            chain = f"{task}|{behaviour or 'baseline'}|{direction}|{coefficient:g}|{vector}"
            costs = _chain_costs(t, behaviour, direction, vector)
            for label in STEERED_LABELS:
                target = behaviour in (None, label)
                rows.append({"chain_id": chain, "task_id": task, "behaviour": behaviour,
                             "direction": direction, "label": label, "tokens": 10 if target else 0,
                             "fraction": share if target else 0.0, "coefficient": coefficient,
                             "vector": vector, "denominator": "labelled", **costs})
    return pl.DataFrame(rows)


def _chain_costs(t: int, behaviour, direction: str, vector: str) -> dict:
    """Per-chain costs: positive backtracking steering loops (repetition +30 pp, NLL +1
    nat/token, fewer closed chains); everything else as the baseline, with task noise."""
    looping = (behaviour, direction, vector) == ("backtracking", "positive", "behaviour")
    return {"correct": t % 2 == 0, "reasoning_tokens": 100 + t, "closed_thinking": not looping or t < 2,
            "answered": not looping or t < 2, "repetition": 0.05 + 0.01 * t + (0.3 if looping else 0),
            "compression_ratio": 2.0 + 0.1 * t + (1.5 if looping else 0),
            "nll_unsteered": 1.5 + 0.05 * t + (1.0 if looping else 0), "grader": "offline"}


def _validation(labels) -> dict:
    """``attribute --validate`` metadata: exact rises with the layer, nll too, released-code falls."""
    shapes = {"exact": lambda l: l + 1.0, "nll": lambda l: 2.0 * l + 1, "released-code": lambda l: 10.0 - l}
    profiles = [{"label": label, "layer": layer, "metric": m, "effect": f(layer), "n_spans": 2}
                for label in labels for m, f in shapes.items() for layer in range(N_LAYERS)]
    spearman = {"nll": {label: 1.0 for label in labels}, "released-code": {label: -1.0 for label in labels}}
    return {"spearman": spearman, "profiles": profiles}


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


def write_synthetic_run(root: Path, coefficients=(1.0,)) -> RunDir:
    """A run directory with every file the report reads, in the contract formats."""
    run = RunDir(root)
    write_parquet(_annotations(), run.annotations, provenance("annotate", {"annotator": "rules"}, MODEL))
    attribution = pl.DataFrame(
        [{"label": label, "layer": layer, "effect": float(layer + i) if layer != 4 else 9.0,
          "std": 0.1 * layer, "n_spans": 3 + i, "metric": "nll"}
         for i, label in enumerate(STEERED_LABELS) for layer in range(N_LAYERS)]
    )
    meta = provenance("attribute", {"metric": "nll", "validate": 2}, MODEL)
    meta["validation"] = _validation(STEERED_LABELS[:2])["spearman"]["nll"]
    meta["validation_detail"] = _validation(STEERED_LABELS[:2])
    write_parquet(attribution, run.attribution, meta)
    torch.manual_seed(0)
    vectors = {label: torch.randn(N_LAYERS, D_MODEL) for label in (*LABELS, OVERALL)}
    meta = provenance("extract", {"variant": "paper"}, MODEL) | {"skipped_labels": ["initializing"]}
    save_file(vectors, str(run.vectors), metadata={"nnsteer": json.dumps(meta)})
    select = provenance("select", {"skip_fraction": 0.34, "top_k": 1, "coefficient": 1.0})
    write_json(run.layers, {label: {"vector_layer": 4, "layers": [4], "coefficient": 1.0,
                                    "chosen_by": "attribution", "provenance": select}
                            for label in STEERED_LABELS})
    steered, steered_spans = _steered()
    write_parquet(steered, run.steered, provenance("steer", {}, MODEL))
    write_parquet(steered_spans, run.steered_annotations, provenance("evaluate", {}, MODEL))
    write_parquet(_evaluation(coefficients), run.evaluation,
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


def test_first_lines_say_which_behaviour_got_no_vector_and_the_verdicts(full_report):
    page = full_report.report.read_text()
    glance = page.split("<h2>At a glance</h2>", 1)[1].split("</section>", 1)[0]
    assert "No vector for initializing: no usable span in annotations.parquet" in glance
    assert "Positive steering raised the target behaviour (Holm-adjusted p &lt; 0.05) in 4 of 4" in glance
    assert "backtracking, positive ×1: moved the behaviour but broke something: closed thinking" in glance
    assert "repeated 4-grams +30.0 pp [+30.0, +30.0]" in glance and "NLL under the unsteered" in glance
    assert "deduction, positive ×1: moved" not in glance
    assert page.index("At a glance") < page.index("<h2>Provenance</h2>")


def test_figure3_marks_skipped_chosen_and_runner_up_layers(full_report):
    from nnsteer.report.layers import layer_marks
    from nnsteer.runs.store import read_parquet
    from nnsteer.selection.figure3 import figure3_chart

    df = read_parquet(full_report.attribution)
    marks = layer_marks(full_report, df)
    # skip_fraction 0.34 of 6 layers: layers 0-2 skipped; layer 4 (effect 9) wins, 5 is second
    assert marks.first_allowed == 3 and marks.chosen["backtracking"] == [4]
    assert marks.runner_up == {"backtracking": 5, "uncertainty-estimation": 5,
                               "adding-knowledge": 5, "example-testing": 5}
    spec = figure3_chart(df, marks).to_dict()
    panels = spec["concat"]
    assert [p["title"] for p in panels] == [f"{label} ({3 + i} spans)"
                                            for i, label in enumerate(STEERED_LABELS)]
    domains = {json.dumps(layer["encoding"]["y"]["scale"]["domain"])
               for p in panels for layer in p["layer"] if "y" in layer["encoding"]
               and "scale" in layer["encoding"]["y"]}
    assert len(domains) == 1  # one y scale for every panel
    page = full_report.report.read_text()
    assert "±1 standard deviation over those spans, clipped at 0" in page
    assert "layers 0–2, which select skipped" in page


def test_validation_table_and_steering_tables(full_report):
    page = full_report.report.read_text()
    section = page.split(f"<h2>{CHARTS['validation']}</h2>", 1)[1].split("</section>", 1)[0]
    assert "<td>backtracking</td><td>released-code</td><td>-1</td>" in section
    steering = page.split(f"<h2>{CHARTS['steering']}</h2>", 1)[1].split("</section>", 1)[0]
    # coefficient, layers and the number of tasks of each condition are shown
    assert "<td>backtracking</td><td>positive</td><td>1</td><td>4</td><td>8</td>" in steering
    assert "<td>coefficients steered</td>" not in page and "<th>coefficients steered</th>" in page


def test_a_sweep_gives_a_dose_response_chart(tmp_path):
    from nnsteer.report.page import chart_spec

    run = write_synthetic_run(tmp_path, coefficients=(0.5, 1.0, 2.0))
    spec = chart_spec(run, "steering")
    assert spec["spec"]["layer"][1]["encoding"]["x"]["field"] == "signed coefficient"
    values = next(iter(spec["datasets"].values()))
    signed = sorted({v["signed coefficient"] for v in values if v["behaviour"] == "backtracking"})
    assert signed == [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    page = write_report(run).read_text()
    assert "<td>backtracking</td><td>4</td><td>[4]</td><td>1</td><td>attribution</td><td>0.5, 1, 2</td>" in page


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
    # attribution, validation, similarity, layers, steering, forest, costs, example chains
    assert page.count('class="missing">Not run yet') == 8
    assert "<td>backtracking</td>" in page
    assert not run.charts.exists()


def test_cli_prints_path_and_rejects_missing_dir(tmp_path):
    run = write_synthetic_run(tmp_path / "run")
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "report"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(run.report)
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path / "absent"), "report"])
    assert result.exit_code == 2 and "no such run directory" in result.output


@pytest.mark.parametrize("entry, expected", [
    (5, "entry 'backtracking': expected {vector_layer, layers, coefficient}"),
    ({"vector_layer": "4", "layers": [4], "coefficient": 1.0}, "vector_layer must be an integer"),
    ({"vector_layer": 4, "layers": "4", "coefficient": 1.0}, "layers must be a non-empty list"),
    ({"vector_layer": 4, "layers": [4, None], "coefficient": 1.0}, "layers must be a non-empty"),
    ({"vector_layer": 4, "layers": [4], "coefficient": "x"}, "'x' is not a number >= 0"),
])
def test_malformed_layers_entry_is_one_line(tmp_path, entry, expected):
    run = write_synthetic_run(tmp_path / "run")
    layers = json.loads(run.layers.read_text())
    layers["backtracking"] = entry
    run.layers.write_text(json.dumps(layers))
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "report"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("nnsteer: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"nnsteer: error: {run.layers}: damaged") and expected in lines[0]
    assert "rerun `nnsteer select`" in lines[0]
    assert not run.report.exists()


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


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory) -> RunDir:
    run = write_synthetic_run(tmp_path_factory.mktemp("sweep"), coefficients=(0.5, 1.0, 2.0))
    write_report(run)
    return run


@pytest.mark.parametrize("which", ["full_report", "sweep_report"])
def test_renders_in_headless_chromium(which, request, tmp_path):
    """Every chart draws its marks (the sweep's steering chart is the dose-response);
    a screenshot of each page goes to tests/artifacts/ to be looked at."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    report = request.getfixturevalue(which)
    url = report.report.resolve().as_uri()
    dom = _headless(chromium, tmp_path / "profile", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert f'data-charts-rendered="{len(CHARTS)}"' in page, dom.stderr[-2000:]
    assert 'class="js-error"' not in page
    assert not re.search(r"CONSOLE.*(Uncaught|Error)|Uncaught", dom.stderr), dom.stderr[-2000:]
    widest = int(re.search(r'data-widest-table="(\d+)"', page).group(1))
    width = int(re.search(r'data-page-width="(\d+)"', page).group(1))
    assert 0 < widest <= width  # every table fits the page, the folded provenance included
    for name in CHARTS:
        chart = page.split(f'id="chart-{name}"', 1)[1].split("</section>", 1)[0]
        assert "<svg" in chart, name
        assert len(re.findall(r'role="graphics-symbol"', chart)) >= 4, name  # drawn marks

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"report-{which.split('_')[0]}.png"
    shot.unlink(missing_ok=True)
    result = _headless(chromium, tmp_path / "profile", f"--screenshot={shot}",
                       "--window-size=1200,7000", url)
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


def test_vectors_with_only_overall(tmp_path):
    """Extract on chains where annotation found no behaviour keeps only ``overall``."""
    run = RunDir(tmp_path)
    meta = provenance("extract", {"variant": "paper"}, MODEL)
    save_file({OVERALL: torch.randn(N_LAYERS, D_MODEL)}, str(run.vectors),
              metadata={"nnsteer": json.dumps(meta)})
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "report"])
    assert result.exit_code == 0, result.output
    assert "holds only the overall mean" in run.report.read_text()


def test_results_come_first_and_reference_material_last(full_report):
    page = full_report.report.read_text()
    titles = re.findall(r'<section id="section-\d+"><h2>([^<]+)</h2>', page)
    assert titles[:3] == ["At a glance", CHARTS["forest"], CHARTS["costs"]]
    assert titles[-2:] == ["Behaviour labels", "Provenance"]
    assert titles.index(CHARTS["attribution"]) < titles.index("Example chains")
    toc = re.findall(r'<li><a href="#section-\d+">([^<]+)</a></li>', page)
    assert [html.unescape(t) for t in toc] == [html.unescape(t) for t in titles]
    provenance = page.split("<h2>Provenance</h2>", 1)[1].split("</section>", 1)[0]
    assert provenance.lstrip().startswith("<details>")


def test_unvaried_cost_metrics_are_named_not_charted():
    from nnsteer.evaluation.costs import unvaried_metrics

    table = pl.DataFrame({
        "metric": ["correct", "correct", "repetition", "repetition", "answered", "answered"],
        "mean": [0.0, 0.0, 0.1, 0.3, 1.0, 1.0],
        "diff": [None, 0.0, None, 0.2, None, 0.0],
    })
    assert unvaried_metrics(table) == ["correct", "answered"]
    moved = table.with_columns(diff=pl.Series([None, 0.0, None, 0.2, None, -0.5]))
    assert unvaried_metrics(moved) == ["correct"]
