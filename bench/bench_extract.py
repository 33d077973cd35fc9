"""Benchmark of ``nnsteer extract`` on the embedded model (SmolLM2-135M).

1. Throughput: tokens/s of the extraction traces (and of the whole stage) against a bare
   transformers forward over the same left-padded batches, in the same process, runs
   interleaved, best of ``--repeats``. Two bare baselines: the full causal LM (with
   logits, what a user would call "a forward") and the decoder stack alone (no
   ``lm_head``), which is all extraction needs. Rates are given from wall time and from
   this process's CPU time: on a machine shared with other jobs only the second is stable
   (use ``--threads 1`` there).
2. Memory: peak resident memory of the extraction on 10 and on 100 chains
   (``--memory-chains``), each in a fresh process, measured from a warmed-up baseline
   (Linux ``VmHWM`` after ``clear_refs``), and the peak of Python allocations
   (``tracemalloc``). The children run with a fixed glibc mmap threshold: by default glibc
   raises it after large frees and then keeps freed activation buffers, so RSS would climb
   over the first batches whatever the number of chains.

Usage: ``python bench/bench_extract.py [--chains 12] [--tokens 200] [--out bench/results/extract.txt]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import polars as pl
import torch
from _output import emit  # bench/_output.py

from nnsteer.labels import LABELS
from nnsteer.modeling.models import LoadedModel, load_model
from nnsteer.runs.store import RunDir, provenance, write_parquet
from nnsteer.vectors.extract import (
    annotated_chains,
    extract_vectors,
    paper_samples,
    read_inputs,
)
from nnsteer.vectors.residuals import Selection, sum_sample_means

SENTENCES = [
    "Okay, so I need to figure out how many apples are left in the basket.",
    "The problem says there were 24 apples and 9 were taken away.",
    "So 24 minus 9 gives 15 apples.",
    "Wait, let me double-check whether any apples were added back.",
    "I recall that subtraction undoes addition, so the order matters here.",
    "For example, if 3 apples came back we would have 18.",
    "Hmm, I am not entirely sure the question mentions that.",
    "Actually, reading it again, nothing was returned.",
    "Therefore the answer should be 15 apples.",
    "Let me verify with a smaller case: 5 minus 2 is 3, which is right.",
]


def write_chains(lm: LoadedModel, root: Path, n_chains: int, n_tokens: int) -> RunDir:
    """``n_chains`` fixed chains of about ``n_tokens`` generated tokens, one span per sentence."""
    tok = lm.tokenizer
    run = RunDir(root)
    chain_rows, span_rows = [], []
    for i in range(n_chains):
        response, spans = "", []
        k = i
        while len(tok(response, add_special_tokens=False)["input_ids"]) < n_tokens:
            sentence = SENTENCES[k % len(SENTENCES)]
            start = len(response) + (1 if response else 0)
            response += (" " if response else "") + sentence
            spans.append((LABELS[k % len(LABELS)], start, len(response)))
            k += 1
        prompt = tok.apply_chat_template([{"role": "user", "content": f"Puzzle {i}: apples."}],
                                         tokenize=False, add_generation_prompt=True)
        chain_rows.append(dict(
            chain_id=f"c{i}", task_id=f"t{i}", model=lm.name,
            prompt_ids=tok(prompt, add_special_tokens=False)["input_ids"],
            output_ids=tok(response, add_special_tokens=False)["input_ids"],
            response=response, thinking_start=0, thinking_end=len(response), direction="none",
        ))
        span_rows += [dict(chain_id=f"c{i}", label=label, start=s, end=e, text=response[s:e],
                           annotator="bench", status="ok") for label, s, e in spans]
    meta = provenance("bench", {}, lm.provenance())
    write_parquet(pl.DataFrame(chain_rows), run.chains, meta)
    write_parquet(pl.DataFrame(span_rows), run.annotations, meta)
    return run


def padded_batches(selections: list[Selection], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The batches extraction runs (longest first, left padding), as plain model inputs."""
    ordered = sorted(selections, key=lambda s: -len(s.ids))
    batches = []
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        width = max(len(s.ids) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, s in enumerate(chunk):
            ids[b, width - len(s.ids):] = torch.tensor(list(s.ids))
            mask[b, width - len(s.ids):] = 1
        batches.append(dict(input_ids=ids, attention_mask=mask,
                            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)))
    return batches


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def throughput(args: argparse.Namespace) -> list[str]:
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = write_chains(lm, Path(tmp), args.chains, args.tokens)
        chains, spans = read_inputs(run, lm.name)
        selections = [Selection(c.ids, paper_samples(c)) for c in annotated_chains(chains, spans, lm.tokenizer)]
        groups = [*LABELS, "overall"]
        batches = padded_batches(selections, args.batch_size)
        tokens = sum(len(s.ids) for s in selections)
        padded = sum(b["input_ids"].numel() for b in batches)

        def bare(module) -> None:
            with torch.no_grad():
                for batch in batches:
                    module(**batch)

        runs = {
            "bare forward (causal LM, logits)": lambda: bare(lm.hf_model),
            "bare forward (decoder stack, no lm_head)": lambda: bare(lm.hf_model.model),
            "extraction traces (sum_sample_means)": lambda: sum_sample_means(
                lm, selections, groups, batch_size=args.batch_size, progress=False),
            "whole stage (extract_vectors, paper)": lambda: extract_vectors(
                run, lm, variant="paper", batch_size=args.batch_size),
        }
        for fn in runs.values():  # warm-up
            fn()
        best = {name: (float("inf"), float("inf")) for name in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                wall, cpu = timed(fn)
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    lines = [f"throughput: {args.chains} chains, {tokens} tokens ({padded} with padding), "
             f"batch size {args.batch_size}, best of {args.repeats}, {args.threads} thread(s)"]
    lines.append(f"  {'':<42} {'wall s':>8} {'tok/s':>8} {'CPU s':>8} {'tok/s':>8}")
    for name, (wall, cpu) in best.items():
        lines.append(f"  {name:<42} {wall:8.3f} {tokens / wall:8.0f} {cpu:8.3f} {tokens / cpu:8.0f}")
    names = list(runs)
    for name in names[2:]:
        for baseline in names[:2]:
            wall_ratio = best[baseline][0] / best[name][0]
            cpu_ratio = best[baseline][1] / best[name][1]
            lines.append(f"  {name} / {baseline}: {cpu_ratio:.2f}x (CPU), {wall_ratio:.2f}x (wall)")
    return lines


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(n_chains: int, args: argparse.Namespace) -> None:
    """In a fresh process: peak RSS of extraction on ``n_chains`` above a warmed-up baseline."""
    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        warm = write_chains(lm, Path(tmp) / "warm", args.batch_size, args.memory_tokens)
        extract_vectors(warm, lm, batch_size=args.batch_size)
        run = write_chains(lm, Path(tmp) / "run", n_chains, args.memory_tokens)
        baseline = vm_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
        tracemalloc.start()
        extract_vectors(run, lm, batch_size=args.batch_size)
        python_peak = tracemalloc.get_traced_memory()[1]
        peak = vm_kib("VmHWM")
    print(json.dumps({"chains": n_chains, "baseline_kib": baseline, "peak_kib": peak,
                      "python_peak_kib": python_peak // 1024}))


def memory(args: argparse.Namespace) -> list[str]:
    results = []
    for n in args.memory_chains:
        cmd = [sys.executable, __file__, "--memory-child", str(n), "--batch-size", str(args.batch_size),
               "--memory-tokens", str(args.memory_tokens), "--threads", str(args.threads)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    lines = [f"peak memory: chains of about {args.memory_tokens} tokens, batch size {args.batch_size}, "
             "each count in a fresh process"]
    for r in results:
        lines.append(f"  {r['chains']:>4} chains: peak RSS {r['peak_kib'] / 1024:7.1f} MiB, "
                     f"{(r['peak_kib'] - r['baseline_kib']) / 1024:6.1f} MiB above the warmed-up baseline, "
                     f"Python allocations peak {r['python_peak_kib'] / 1024:5.1f} MiB")
    small, large = results
    lines.append(f"  peak RSS {large['chains']} / {small['chains']} chains: "
                 f"{large['peak_kib'] / small['peak_kib']:.3f}x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-tokens", type=int, default=64)
    parser.add_argument("--memory-chains", type=lambda v: [int(n) for n in v.split(",")],
                        default=[10, 100], help="the two chain counts of the memory part")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args)
        return
    header = [f"nnsteer extract bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
              f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads available, "
              f"torch {torch.__version__}, CPU float32, model smollm2-135m"]
    lines = header + throughput(args) + memory(args)
    emit(lines, args.out)


if __name__ == "__main__":
    main()
