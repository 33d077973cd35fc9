"""Throughput of nnsteer's greedy generation against plain transformers ``generate``.

Measures, in one process on the same model and prompts, tokens per second of
transformers ``generate`` (left-padded batch, greedy), ``nnsteer.generation.loop.generate``
unsteered, and steered at one layer (nnsight ``tracer.iter[:]`` at every step), at
batch 1 and batch 16. Each figure is the best of ``--repeats`` interleaved rounds.

    python bench/bench_generation.py --model smollm2-135m --max-new-tokens 64 \
        | tee bench/results/generation.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

import torch

from nnsteer.generation.loop import GREEDY, eos_ids, generate
from nnsteer.generation.prompts import prompt_token_ids
from nnsteer.generation.spec import SteeringSpec
from nnsteer.modeling.models import load_model
from nnsteer.tasks.stage import load_builtin_tasks


def transformers_generate(lm, prompts: list[str], max_new_tokens: int) -> int:
    """Plain transformers greedy generation; returns the number of tokens up to each EOS."""
    ids = [prompt_token_ids(lm.tokenizer, p) for p in prompts]
    batch = lm.tokenizer.pad(
        {"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt"
    )
    with torch.no_grad():
        out = lm.hf_model.generate(**batch.to(lm.device), max_new_tokens=max_new_tokens, **GREEDY)
    stop = eos_ids(lm)
    tokens = 0
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        tokens += next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
    return tokens


def nnsteer_generate(lm, prompts: list[str], max_new_tokens: int, steering=None) -> int:
    gens = generate(
        lm,
        prompts,
        steering=steering,
        max_new_tokens=max_new_tokens,
        batch_size=len(prompts),
        progress=False,
    )
    return sum(len(g.output_ids) for g in gens)


def best_rates(runs: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Best tokens/s of each run over ``repeats`` rounds, the runs interleaved in each round
    (so that load from other processes hits every method alike), with the token count."""
    best: dict[str, tuple[float, int]] = {name: (0.0, 0) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tokens = run()
            best[name] = max(best[name], (tokens / (time.perf_counter() - start), tokens))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, device=args.device)
    prompts = load_builtin_tasks()["prompt"].to_list()
    layer = lm.arch.n_layers // 2
    vector = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(0))
    spec = SteeringSpec({layer: vector}, 4.0, "positive")
    print(
        f"model {args.model} ({lm.arch.n_layers} layers, {lm.dtype}) on {lm.device}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"greedy, {args.max_new_tokens} new tokens at most, best of {args.repeats} interleaved "
        "rounds; tokens = generated up to EOS"
    )
    print(f"{'batch':>5}  {'method':<26} {'tokens':>6} {'tokens/s':>9} {'vs transformers':>16}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        batch = prompts[:batch_size]
        nnsteer_generate(lm, batch, 4)  # warm up
        runs = {
            "transformers generate": partial(transformers_generate, lm, batch, args.max_new_tokens),
            "nnsteer unsteered": partial(nnsteer_generate, lm, batch, args.max_new_tokens),
            f"nnsteer steered (layer {layer})": partial(
                nnsteer_generate, lm, batch, args.max_new_tokens, spec
            ),
        }
        rates = best_rates(runs, args.repeats)
        reference = rates["transformers generate"][0]
        for name, (rate, tokens) in rates.items():
            print(
                f"{batch_size:>5}  {name:<26} {tokens:>6} {rate:>9.1f} {rate / reference:>15.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
