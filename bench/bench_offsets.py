"""Time of :func:`nnsteer.modeling.positions.token_offsets` against the prefix method it replaced.

The prefix method decodes every prefix ``ids[: i + 1]`` (quadratic in the chain length);
both run in the same process on the same chains of the embedded model's tokenizer
(SmolLM2's byte-level BPE), runs interleaved, best of ``--repeats``, wall and CPU time.
Chains are text with accented, Greek, CJK characters and emoji split across byte tokens;
each length is also timed with special tokens (EOS, pads) in it. The two methods'
offsets are compared on every chain.

Usage: ``python bench/bench_offsets.py [--lengths 1000,4000] [--repeats 3] [--out bench/results/offsets.txt]``
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

from _output import emit  # bench/_output.py

from nnsteer.modeling.models import load_tokenizer
from nnsteer.modeling.positions import (
    decode_response,
    token_offsets,
    windowed_prefix_lengths,
)

TEXT = (
    "Okay, so I need to figure out how many apples are left in the basket. The problem says "
    "there were 24 apples and 9 were taken away, so 24 - 9 = 15. Wait, let me double-check: "
    "café, naïve, déjà vu, Ελληνικά, 日本語の文章です, emoji 😀🎉🤔 and €100. Hmm, I'm not "
    "entirely sure the question mentions that. Actually, reading it again, nothing was returned.\n"
)


def prefix_offsets(tokenizer, output_ids) -> list[tuple[int, int]]:
    """The replaced method: decode every prefix, running minimum from the end."""
    ids = list(output_ids)
    ends = [len(decode_response(tokenizer, ids[: i + 1])) for i in range(len(ids))]
    for i in range(len(ends) - 2, -1, -1):
        ends[i] = min(ends[i], ends[i + 1])
    return list(zip([0] + ends[:-1], ends))


def chains(tokenizer, length: int) -> dict[str, list[int]]:
    """A plain chain of ``length`` tokens and the same with 2% EOS / pad tokens inside."""
    ids = tokenizer.encode(TEXT * (length // 40), add_special_tokens=False)[:length]
    assert len(ids) == length, "TEXT too short for the length"
    rng = random.Random(0)
    specials = list(tokenizer.all_special_ids)
    mixed = list(ids)
    for _ in range(length // 50):
        mixed.insert(rng.randrange(len(mixed)), rng.choice(specials))
    return {"text": ids, "text + specials": mixed}


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1000,4000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = load_tokenizer("smollm2-135m")
    lines = [f"nnsteer token_offsets bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
             f"{os.getloadavg()[0]:.1f}, Python {platform.python_version()}; "
             "tokenizer smollm2-135m (byte-level BPE)",
             f"best of {args.repeats} interleaved runs; seconds per chain",
             f"  {'chain':<28} {'prefix wall':>11} {'new wall':>9} {'prefix CPU':>10} {'new CPU':>8}"
             f" {'speedup (CPU)':>13} {'speedup (wall)':>14}  same  fallback"]
    for length in (int(n) for n in args.lengths.split(",")):
        for name, ids in chains(tokenizer, length).items():
            same = token_offsets(tokenizer, ids) == prefix_offsets(tokenizer, ids)
            fallback = windowed_prefix_lengths(tokenizer, ids) is None
            best = {"prefix": (float("inf"),) * 2, "new": (float("inf"),) * 2}
            for _ in range(args.repeats):
                for method, fn in (("prefix", prefix_offsets), ("new", token_offsets)):
                    wall, cpu = timed(lambda: fn(tokenizer, ids))
                    best[method] = (min(best[method][0], wall), min(best[method][1], cpu))
            (pw, pc), (nw, nc) = best["prefix"], best["new"]
            label = f"{len(ids)} tokens, {name}"
            lines.append(f"  {label:<28} {pw:11.4f} {nw:9.4f} {pc:10.4f} {nc:8.4f}"
                         f" {pc / nc:12.1f}x {pw / nw:13.1f}x  {'yes' if same else 'NO':>4}  "
                         f"{'yes' if fallback else 'no':>8}")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
