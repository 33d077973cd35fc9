"""``nnsteer plan``'s figures against a real run of a small study, stage by stage.

Runs every stage of a config (``--config``: a file or a shipped name; default
``bench/device_study.toml``) from scratch, with the model's forward passes counted by a hook
on the model, its backward passes by wrapping ``torch.autograd.grad``, the chains and
tokens read from the run's files and, on a GPU, each stage's peak memory
(``torch.cuda.max_memory_allocated`` after a reset when the stage starts). Prints, per
stage and figure, the plan's value, the measured one and the verdict: counts must be
equal, bounds (``≤``) not exceeded; attribution's passes are checked by the plan's formula
on the probes the run found (the plan itself estimates them before annotation); memory is
a ratio (the plan counts the weights, the KV caches and the activations kept for a
gradient, not transient buffers). Exit status 1 when a count differs or a bound is exceeded.

``--tiny``: a tiny random Llama that recites a chain with behaviour cues (tests/conftest.py)
and a CPU-sized study, so that CI runs this check (tests/test_device_script.py).

Usage: ``python bench/check_plan.py [--config FILE] [--tiny] [--run-dir DIR] [--out FILE]``
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import polars as pl
import torch
from _output import emit  # bench/_output.py

from nnsteer.pipeline import run as pipeline_run
from nnsteer.pipeline.plan import attribution_passes, plan_study, stage_settings
from nnsteer.pipeline.run import read_config, run_pipeline

ROOT = Path(__file__).resolve().parents[1]

TINY_STUDY = """
[model]
name = "{model}"
device = "cpu"
dtype = "float32"
batch_size = 4

[tasks]
per_category = 1
eval_per_category = 1
validation_per_category = 1

[generate]
max_new_tokens = 24
limit = 5

[annotate]
annotator = "rules"

[attribute]
batch_size = 3

[select]
labels = ["backtracking", "uncertainty-estimation"]
coefficient = "auto"
grid = [0.5, 2.0]
validation_limit = 1
max_new_tokens = 4

[steer]
max_new_tokens = 6
limit = 1

[evaluate]
n_boot = 100
"""


def tiny_config(folder: Path) -> Path:
    """The tiny study's config, with its reciting model saved beside it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import reciting_hf  # noqa: E402 (the tests' tiny models)
    from test_pipeline import RECITED  # noqa: E402
    from transformers import AutoTokenizer

    from nnsteer.modeling.embedded import embedded_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir("smollm2-135m"))
    model = reciting_hf("llama", tokenizer, tokenizer.encode(RECITED, add_special_tokens=False))
    model.save_pretrained(folder / "reciting-llama")
    tokenizer.save_pretrained(folder / "reciting-llama")
    path = folder / "tiny.toml"
    path.write_text(TINY_STUDY.format(model=folder / "reciting-llama"))
    return path


def measure(config, run_dir: Path) -> tuple[Counter, Counter, dict[str, int], dict[str, float]]:
    """Run every stage afresh: per stage, forward and backward passes, peak memory (GPU),
    and seconds."""
    forward, backward = Counter(), Counter()
    peak: dict[str, int] = {}
    seconds: dict[str, float] = {}
    state = {"stage": None, "start": 0.0}
    cuda = torch.cuda.is_available() and not config.model.remote
    load, grad = pipeline_run.load_model, torch.autograd.grad

    def counted_load(*args, **kwargs):
        lm = load(*args, **kwargs)
        lm.hf_model.register_forward_pre_hook(lambda module, a: forward.update([state["stage"]]))
        return lm

    def counted_grad(*args, **kwargs):
        backward.update([state["stage"]])
        return grad(*args, **kwargs)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        found = re.match(r"\[\d+/\d+\] (\w+)\s+(running|done in)", line)
        if not found:
            return
        stage, what = found[1], found[2]
        if cuda:
            torch.cuda.synchronize()
        if what == "running":
            state.update(stage=stage, start=time.perf_counter())
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        else:
            seconds[stage] = time.perf_counter() - state["start"]
            if cuda:
                peak[stage] = torch.cuda.max_memory_allocated()

    pipeline_run.load_model, torch.autograd.grad = counted_load, counted_grad
    try:
        run_pipeline(config, run_dir=run_dir, force=True, log=log)
    finally:
        pipeline_run.load_model, torch.autograd.grad = load, grad
    return forward, backward, peak, seconds


def compare(config, run_dir: Path, forward: Counter, backward: Counter,
            peak: dict[str, int]) -> tuple[list[str], bool]:
    """The table of plan against measurement, and whether every count agrees."""
    plan = plan_study(config)
    run = config.run(run_dir)
    rows: list[tuple[str, str, str, str, str]] = []
    agree = True

    def check(stage: str, name: str, planned: float | None, measured: float, bound: bool) -> None:
        nonlocal agree
        if planned is None:
            verdict = "not planned"
        elif bound:
            verdict = "within bound" if measured <= planned else "OVER"
        else:
            verdict = "equal" if measured == planned else "DIFFERENT"
        agree &= verdict in ("equal", "within bound", "not planned")
        rows.append((stage, name, "-" if planned is None else f"{planned:,.0f}",
                     f"{measured:,.0f}", verdict))

    figure = {(f.stage, f.name): f for f in plan.figures}
    tables = {"generate": run.chains, "select": run.path("sweep.parquet"), "steer": run.steered}
    for stage, path in tables.items():
        if (stage, "chains") not in figure:
            continue
        table = pl.read_parquet(path)
        chains = figure[stage, "chains"]
        check(stage, "chains", chains.value, table.height, chains.text.startswith("≤"))
        check(stage, "new tokens", figure[stage, "new tokens"].value,
              int(table["output_ids"].list.len().sum()), True)
    planned = plan.values("forward passes")
    for stage in ("generate", "extract", "select", "steer", "evaluate", "report"):
        bound = stage in ("generate", "select", "steer")
        check(stage, "forward passes", planned.get(stage), forward[stage], bound)
    spans = pl.read_parquet(run.path("attribution_spans.parquet"))
    options = stage_settings(config)["attribute"]
    passes = attribution_passes(spans.group_by("chain_id").len()["len"].to_list(),
                                options["batch_size"], options["metric"], plan.shape.n_layers)
    if not options["validate"]:
        check("attribute", "forward passes (found probes)", passes[0], forward["attribute"], False)
        check("attribute", "backward passes (found probes)", passes[1], backward["attribute"], False)
    rows.append(("attribute", "forward passes (plan's estimate)",
                 f"{figure['attribute', 'forward passes'].value:,.0f}", f"{forward['attribute']:,}",
                 f"{len(spans) / max(spans['chain_id'].n_unique(), 1):.1f} probes per chain found"))
    memory = plan.values("peak memory")
    for stage, bytes_ in peak.items():
        planned_bytes = memory.get(stage)
        ratio = f"measured / plan {bytes_ / planned_bytes:.2f}" if planned_bytes else "no plan"
        rows.append((stage, "peak memory (GiB)", f"{(planned_bytes or 0) / 2**30:.3f}",
                     f"{bytes_ / 2**30:.3f}", ratio))
    if not peak:
        rows.append(("all", "peak memory", "-", "-", "not measured: no CUDA device"))
    header = ("stage", "figure", "plan", "measured", "verdict")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  "
              f"{r[3]:>{widths[3]}}  {r[4]}" for r in [header, *rows]]
    return [plan.summary(), *lines], agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "bench" / "device_study.toml"))
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU study (CI)")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="check-plan-"))
    config = read_config(tiny_config(folder) if args.tiny else args.config)
    run_dir = args.run_dir or folder / "run"
    started = time.perf_counter()
    forward, backward, peak, seconds = measure(config, run_dir)
    table, agree = compare(config, run_dir, forward, backward, peak)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else f"CPU ({os.cpu_count()} cores)")
    lines = [f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, "
             f"{device}, torch {torch.__version__}; python bench/check_plan.py "
             f"{'--tiny' if args.tiny else '--config ' + str(args.config)}",
             f"study {config.path.name}: {config.model.name}; "
             f"{time.perf_counter() - started:.0f} s; per stage: "
             + ", ".join(f"{stage} {s:.1f} s" for stage, s in seconds.items()),
             *table,
             "all counts agree with the plan" if agree else "SOME COUNTS DISAGREE WITH THE PLAN"]
    emit(lines, args.out)
    sys.exit(0 if agree else 1)


if __name__ == "__main__":
    main()
