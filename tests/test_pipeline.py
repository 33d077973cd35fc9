"""``nnsteer run``: config checks, up-to-date skipping, and resuming after a real SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.pipeline.run import (
    read_config,
    run_pipeline,
    select_stages,
    stage_function,
    stage_options,
)
from nnsteer.runs.registry import STAGE_NAMES, STAGES
from nnsteer.runs.store import RunDir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key", [
    ("colour = 1\n", "'colour'"),
    ("[model]\nname = 'x'\nwidth = 3\n", "[model] 'width'"),
    ("[generate]\nmax_tokens = 3\n", "[generate] 'max_tokens'"),
])
def test_unknown_keys_name_file_and_key(tmp_path, text, key):
    config = write_config(tmp_path / "bad.toml", text)
    with pytest.raises(BadInput, match=f"bad.toml: unknown key {key}".replace("[", r"\[").replace("]", r"\]")):
        run_pipeline(read_config(config), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing done before the check


@pytest.mark.parametrize("text", ["[generate]\nmax_new_tokens = 'many'\n", "[model]\nremote = 1\n",
                                  "[tasks\n", "model = 3\n"])
def test_bad_values_are_bad_input(tmp_path, text):
    config = write_config(tmp_path / "bad.toml", text)
    with pytest.raises(BadInput, match="bad.toml"):
        run_pipeline(read_config(config), run_dir=tmp_path / "run")


@pytest.mark.parametrize("text, message", [
    ("[select]\ncoefficient = nan\n", r"\[select\] coefficient = nan: must be a finite number"),
    ("[select]\ncoefficient = inf\n", r"\[select\] coefficient = inf: must be a finite number"),
    ("[select]\ngrid = [0.0]\n", r"\[select\] grid = \[0.0\]: expected numbers > 0"),
    ("[select]\nmax_coherence_cost = -1.0\n", r"\[select\] max_coherence_cost = -1.0: expected a finite number >= 0"),
    ("[steer]\ncoefficients = [-1.0]\n", r"\[steer\] coefficients = \[-1.0\]: -1.0 is not a number >= 0"),
    ("[steer]\nwhen = 'garbage'\n", r"\[steer\] when = 'garbage': expected LABEL@LAYER>THRESHOLD"),
    ("[evaluate]\ngrader = 'foo'\n", r"\[evaluate\] grader = 'foo': expected 'offline'"),
    ("[annotate]\nannotator = 'openai:gpt-4o'\nannotator_prompt = 'missing.txt'\n",
     r"\[annotate\] annotator_prompt = 'missing.txt': cannot read it"),
])
def test_every_value_is_checked_before_any_stage_runs(tmp_path, text, message):
    """The CLI's own checks, run on the config before anything loads, naming the key."""
    config = write_config(tmp_path / "bad.toml", text)
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path / "run"), "run", "--config",
                                      str(config), "--only", "tasks"])
    assert result.exit_code == 2
    assert re.search(f"bad.toml: {message}", result.output), result.output
    assert not (tmp_path / "run").exists()


def test_a_shipped_config_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["--run-dir", "demo", "run", "--config", "demo", "--only", "tasks"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "demo" / "tasks.parquet").is_file()
    result = CliRunner().invoke(cli, ["run", "--config", "no-such-study", "--only", "tasks"])
    assert result.exit_code == 2 and "shipped configs: demo," in result.output


def test_shipped_configs_parse():
    for path in sorted(CONFIGS.glob("*.toml")):
        config = read_config(path)
        assert config.run_dir is not None
        for stage in STAGES:  # every key is an option of the stage's function
            stage_options(config, stage, stage_function(stage))
    paper = read_config(CONFIGS / "paper-qwen-14b.toml")
    assert paper.options["select"]["layers"]["adding-knowledge"] == [24]
    assert paper.options["tasks"]["per_category"] == 30
    assert paper.options["generate"]["max_new_tokens"] == 500


def test_stage_selection():
    assert [s.name for s in select_stages("steer")] == ["steer", "evaluate", "report"]
    assert [s.name for s in select_stages(only=["report", "tasks"])] == ["tasks", "report"]
    with pytest.raises(BadInput, match="unknown stage 'train'"):
        select_stages("train")


def test_every_stage_of_the_registry_has_one_runner_and_one_command():
    from nnsteer.cli.stages import STAGE_COMMANDS
    from nnsteer.pipeline.run import RUNNERS

    assert list(RUNNERS) == list(STAGE_NAMES)
    assert set(STAGE_COMMANDS) == set(STAGE_NAMES)
    produced = [name for stage in STAGES for name in stage.output_files()]
    assert len(produced) == len(set(produced))  # one producer per file


def _tasks_run(tmp_path: Path, per_category: int) -> tuple[RunDir, list[str]]:
    config = write_config(tmp_path / "tasks.toml",
                          f"[tasks]\nper_category = {per_category}\neval_per_category = 1\n")
    lines: list[str] = []
    run = run_pipeline(read_config(config), run_dir=tmp_path / "run", only=["tasks"], log=lines.append)
    return run, lines


def test_stage_skipped_only_while_up_to_date(tmp_path):
    run, lines = _tasks_run(tmp_path, 2)
    assert "running" in lines[0] and "done in" in lines[1]
    first = pl.read_parquet(run.tasks)
    _, lines = _tasks_run(tmp_path, 2)
    assert lines == ["[1/1] tasks  skipped (up to date)"]
    run.partial("tasks").write_bytes(b"stale")
    _, lines = _tasks_run(tmp_path, 1)  # changed option: runs again, from scratch
    assert "running" in lines[0]
    assert not run.partial("tasks").exists()  # no resuming from another run's partial state
    assert pl.read_parquet(run.tasks).height < first.height
    first.write_parquet(run.tasks)  # an output changed outside the pipeline: redone
    _, lines = _tasks_run(tmp_path, 1)
    assert "running" in lines[0]
    state = json.loads((run.root / "pipeline.json").read_text())
    assert state["tasks"]["complete"] is True


# A chain the tiny model below recites, with cues for several behaviours. Its tokens are
# all different, so "next token = successor of the current one" is a well-defined rule.
RECITED = ("Let me read this. Okay! By definition squares have four sides... Wait, actually that "
           "seems off?! I am not sure it is wrong? For example with x=2 then y equals 3 so answer: five\n")


def reciting_model(tokenizer):
    """A tiny random Llama whose greedy output cycles through :data:`RECITED`, so that
    annotation finds behaviours and every stage has work to do."""
    from conftest import reciting_hf

    return reciting_hf("llama", tokenizer, tokenizer.encode(RECITED, add_special_tokens=False))


PIPELINE_CONFIG = """
[model]
name = "{model}"
batch_size = 4

[tasks]
per_category = 1
eval_per_category = 1

[generate]
max_new_tokens = 46
limit = 6

[annotate]
annotator = "rules"

[steer]
behaviours = ["backtracking", "uncertainty-estimation"]
max_new_tokens = 12
limit = 2
batch_size = 16

[evaluate]
n_boot = 200
"""


@pytest.fixture(scope="module")
def pipeline_config(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "reciting-llama"
    reciting_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return write_config(root / "tiny.toml", PIPELINE_CONFIG.format(model=model_dir))


def _nnsteer(run_dir: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "nnsteer", "--run-dir", str(run_dir), "run", "--config", str(config)]


#: One thread is plenty for the tiny model, and keeps the test fast on a busy machine.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_to_end(run_dir: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_nnsteer(run_dir, config), capture_output=True, text=True, timeout=300,
                          env=ONE_THREAD)


def _stage_running(run_dir: Path, stage: str) -> bool:
    try:
        state = json.loads((run_dir / "pipeline.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return state.get(stage, {}).get("complete") is False


def _data(path: Path):
    """A run file's data without its provenance times: frames, tensors, JSON, text."""
    if path.suffix == ".parquet":
        df = pl.read_parquet(path)
        return df.sort([c for c, t in df.schema.items() if not isinstance(t, pl.List)])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {k: v.tolist() for k, v in load_file(path).items()}
    if path.suffix == ".json":  # layers.json's entries carry a provenance time
        return json.loads(path.read_text(),
                          object_hook=lambda d: {k: v for k, v in d.items() if k != "time"})
    return path.read_text()


def test_killed_run_resumes_to_the_same_outputs(pipeline_config, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = _run_to_end(whole, pipeline_config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(whole / "report.html")

    process = subprocess.Popen(_nnsteer(killed, pipeline_config), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=ONE_THREAD)
    deadline = time.monotonic() + 240
    while not ((killed / "chains.parquet").exists() and _stage_running(killed, "generate")):
        assert process.poll() is None and time.monotonic() < deadline, "never caught generate midway"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    partial = pl.read_parquet(killed / "chains.parquet").height
    assert 0 < partial < pl.read_parquet(whole / "chains.parquet").height  # killed mid-stage

    resumed = _run_to_end(killed, pipeline_config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tasks" in resumed.stderr and "skipped (up to date)" in resumed.stderr
    files = sorted(p.relative_to(whole) for p in whole.rglob("*")
                   if p.is_file() and p.suffix in (".parquet", ".safetensors", ".json", ".txt")
                   and p.name != "pipeline.json")
    assert {"chains.parquet", "annotations.parquet", "vectors.safetensors", "attribution.parquet",
            "layers.json", "steered.parquet", "evaluation.parquet"} <= {f.name for f in files}
    for name in files:
        ours, reference = _data(killed / name), _data(whole / name)
        assert ours.equals(reference) if isinstance(ours, pl.DataFrame) else ours == reference, name
    assert (killed / "report.html").stat().st_size > 500_000

    again = _run_to_end(killed, pipeline_config)
    assert again.returncode == 0 and again.stderr.count("skipped (up to date)") == 9, again.stderr


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.parametrize("stage, change", [
    ("select", lambda text: text + '\n[select]\nlayers = {backtracking = [99]}\n'),
    ("steer", lambda text: text.replace('"uncertainty-estimation"]', '"backtracking"]')),
])
def test_rejected_option_value_keeps_the_finished_outputs(pipeline_config, tmp_path, stage, change):
    run_dir = tmp_path / "run"
    lines: list[str] = []
    run_pipeline(read_config(pipeline_config), run_dir=run_dir, log=lines.append)
    before = _snapshot(run_dir)
    bad = write_config(tmp_path / "bad.toml", change(pipeline_config.read_text()))

    result = CliRunner().invoke(cli, ["--run-dir", str(run_dir), "run", "--config", str(bad)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("nnsteer: error: ")
    assert re.search(rf"{stage} +running", result.output)  # rejected by the stage, once started
    assert _snapshot(run_dir) == before  # old outputs and pipeline.json byte for byte

    (run_dir / ".vectors.safetensors.set-aside").write_bytes(b"left by a killed run")
    lines.clear()
    run_pipeline(read_config(pipeline_config), run_dir=run_dir, log=lines.append)
    assert all("skipped (up to date)" in line for line in lines) and len(lines) == len(STAGES)
    assert _snapshot(run_dir) == before  # the left-over is gone too

    fixed = write_config(tmp_path / "fixed.toml", pipeline_config.read_text().replace(
        "max_new_tokens = 12", "max_new_tokens = 10"))
    lines.clear()
    run_pipeline(read_config(fixed), run_dir=run_dir, only=["steer"], log=lines.append)
    assert "running" in lines[0]  # a changed value reruns the stage
    assert pl.read_parquet(run_dir / "steered.parquet")["output_ids"].list.len().max() <= 10
    assert not list(run_dir.glob(".*.set-aside"))


def test_stage_that_failed_after_writing_restores_the_old_outputs(tmp_path, monkeypatch):
    """Ctrl-C after a fresh stage wrote: the old outputs come back, the new ones wait
    (unfinished) for a rerun with the same options, which continues them."""
    import functools

    from nnsteer.pipeline.run import RUNNERS

    run, _ = _tasks_run(tmp_path, 2)
    before, first = _snapshot(run.root), pl.read_parquet(run.tasks).height
    real = RUNNERS["tasks"]

    @functools.wraps(real)
    def interrupted(run, **options):
        real(run, **options)
        raise KeyboardInterrupt

    monkeypatch.setitem(RUNNERS, "tasks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _tasks_run(tmp_path, 1)
    assert run.tasks.read_bytes() == before["tasks.parquet"]  # the finished output, untouched
    assert (run.root / ".tasks.parquet.unfinished").exists()
    assert not list(run.root.glob(".*.set-aside"))
    _, lines = _tasks_run(tmp_path, 2)  # the old options: up to date
    assert lines == ["[1/1] tasks  skipped (up to date)"]
    monkeypatch.setitem(RUNNERS, "tasks", real)
    _, lines = _tasks_run(tmp_path, 1)
    assert "running" in lines[0] and pl.read_parquet(run.tasks).height < first
    assert not list(run.root.glob(".*.set-aside")) + list(run.root.glob(".*.unfinished"))


def test_run_dir_that_cannot_be_created_is_bad_input(tmp_path):
    (tmp_path / "file.txt").write_text("")
    config = write_config(tmp_path / "c.toml", f'run_dir = "{tmp_path}/file.txt/run"\n')
    with pytest.raises(BadInput, match=r"c.toml: run_dir .*/file.txt/run: cannot create the directory"):
        run_pipeline(read_config(config), only=["tasks"])


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    config = write_config(tmp_path / "bad.toml", "[steer]\ncoefficent = 2\n")
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path / "run"), "run", "--config", str(config)])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"nnsteer: error: {config}: unknown key [steer] 'coefficent' (expected ")
    assert "coefficients" in line


def test_every_shipped_config_is_accepted_and_the_demo_runs_the_thinking_model():
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")):
        config = read_config(path)
        for stage in STAGES:
            stage_options(config, stage, stage_function(stage))  # BadInput for a bad key or value
    demo = read_config(Path(__file__).resolve().parents[1] / "configs" / "demo.toml")
    assert demo.model.name == "smollm2-135m-r1" and demo.options["extract"]["min_spans"] == 10


def test_min_spans_below_one_in_a_config_is_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[extract]\nmin_spans = 0\n")
    extract = next(s for s in STAGES if s.name == "extract")
    with pytest.raises(BadInput, match=r"c.toml: \[extract\] min_spans = 0: must be 1 or more"):
        stage_options(read_config(path), extract, stage_function(extract))


def test_select_auto_in_a_config_sweeps_the_validation_tasks(pipeline_config, tmp_path):
    auto = write_config(tmp_path / "auto.toml", pipeline_config.read_text().replace(
        "eval_per_category = 1", "eval_per_category = 1\nvalidation_per_category = 1")
        + '\n[select]\ncoefficient = "auto"\ngrid = [0.5, 2.0]\nvalidation_limit = 2\n'
          "max_new_tokens = 6\n")
    run = run_pipeline(read_config(auto), run_dir=tmp_path / "run", log=lambda line: None)
    layers = json.loads(run.layers.read_text())
    for entry in layers.values():
        record = entry["provenance"]["coefficient_sweep"]
        assert [r["coefficient"] for r in record["sweep"]] == [0.5, 2.0]
        assert entry["coefficient"] == record["chosen"] in (0.5, 2.0)
    steered = pl.read_parquet(run.steered)
    assert set(steered.filter(pl.col("direction") != "none")["coefficient"]) <= {0.5, 2.0}
    with pytest.raises(BadInput, match=r'\[select\] coefficient = \'strong\': must be a number >= 0 or "auto"'):
        bad = write_config(tmp_path / "bad.toml", auto.read_text().replace(
            'coefficient = "auto"', 'coefficient = "strong"'))
        run_pipeline(read_config(bad), run_dir=tmp_path / "run", only=["select"])
