"""Cost of the ``learned`` annotator against one forward pass of the embedded model.

Both run in the same process on the same chains (the reasoning text of annotated-chain
files, or a built-in text when none is given): the baseline is a full forward pass of
SmolLM2-135M (all layers and the unembedding) over the text re-tokenised with its
tokenizer, in the annotator's windows; the annotator splits, encodes (its first layers
only), and labels. Runs interleaved, best of ``--repeats``, wall and CPU time. Memory: the
peak resident size after streaming ``--chains`` chains and after streaming them 3 times over
(flat in the number of chains when the two agree).

Usage: ``python bench/bench_annotator.py [FILE.json] [--chains 4] [--repeats 2]
[--text-repeats 12] [--out bench/results/annotator.txt]``
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import torch
from _output import emit  # bench/_output.py

from nnsteer.annotation.agreement import read_annotated_chains
from nnsteer.annotation.learned import ENCODER, WINDOW, shipped_annotator
from nnsteer.modeling.models import load_weights
from nnsteer.modeling.sources import resolve_source

#: One paragraph of the built-in text, repeated ``--text-repeats`` times (12: 1,199 tokens).
PARAGRAPH = ("Okay, so I need to find how many apples are left. There were 24 and 9 were taken, so "
             "24 - 9 = 15. Wait, let me double-check that. Hmm, I'm not sure the question says "
             "they were not returned. For example, if 3 came back, 15 + 3 = 18. I remember that "
             "'left' usually means what remains. So the answer is 15.\n\n")


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, nargs="?", default=None)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--text-repeats", type=int, default=12,
                        help="paragraphs of the built-in text per chain (without FILE)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    texts = ([r["thinking_process"] for r in read_annotated_chains(args.file)[:args.chains]]
             if args.file else [PARAGRAPH * args.text_repeats] * args.chains)
    annotator = shipped_annotator()
    model, tokenizer = load_weights(resolve_source(ENCODER), "cpu", torch.float32)

    @torch.no_grad()
    def forward(text: str) -> None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), WINDOW):
            model(input_ids=torch.tensor([[tokenizer.bos_token_id, *ids[start:start + WINDOW]]]))

    def stream(times: int) -> None:
        for _ in range(times):
            for text in texts:
                annotator.annotate(text)

    annotator.annotate(texts[0][:200])
    forward(texts[0][:200])  # warm-up
    best = {"forward": (float("inf"),) * 2, "learned": (float("inf"),) * 2}
    for _ in range(args.repeats):
        for name, fn in (("forward", forward), ("learned", annotator.annotate)):
            spent = timed(lambda: [fn(t) for t in texts])
            best[name] = tuple(min(a, b) for a, b in zip(best[name], spent))
    stream(1)
    once = peak_rss_mib()
    stream(3)
    thrice = peak_rss_mib()
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    source = args.file.name if args.file else "built-in text"
    lines = [f"nnsteer learned-annotator bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}, torch {torch.__version__}",
             f"{len(texts)} chains of {source} ({tokens} SmolLM2 tokens); best of {args.repeats} "
             "interleaved runs",
             f"  {'':<44}{'wall s':>8}{'CPU s':>8}",
             f"  {'one forward pass of smollm2-135m (30 layers)':<44}{best['forward'][0]:>8.2f}"
             f"{best['forward'][1]:>8.2f}",
             f"  {'learned annotator (split, encode, label)':<44}{best['learned'][0]:>8.2f}"
             f"{best['learned'][1]:>8.2f}",
             f"cost ratio learned / forward: {best['learned'][1] / best['forward'][1]:.2f}x CPU, "
             f"{best['learned'][0] / best['forward'][0]:.2f}x wall (aim <= 1.5x)",
             f"peak RSS after streaming {len(texts)} chains {once:.0f} MiB, after {4 * len(texts)} "
             f"{thrice:.0f} MiB (ratio {thrice / once:.3f})"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
