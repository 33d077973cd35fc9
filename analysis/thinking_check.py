"""Does a model think? R1-style shares of the chains of one or more run directories.

For each run's ``chains.parquet`` (e.g. greedy 256-token chains of the built-in eval
tasks; the chains written so far if generation is still going) prints one Markdown row:
how many chains open ``<think>``, close ``</think>``, are still reasoning at the token
limit, and in how many the offline ``rules`` annotator finds a span of each steered
behaviour in the reasoning.

Usage:
    python analysis/thinking_check.py runs/think-smollm2-135m runs/think-smollm2-135m-r1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from nnsteer.annotation.stage import annotate_frame
from nnsteer.labels import STEERED_LABELS
from nnsteer.modeling.thinking import THINK_CLOSE, THINK_OPEN
from nnsteer.runs.store import RunDir, read_metadata


def thinking_row(run: RunDir) -> dict[str, str]:
    """The shares of one run's chains, as ``count/total (percent)`` strings."""
    chains = pl.read_parquet(run.chains)
    spans = annotate_frame(chains, annotator="rules", progress=False)
    total = chains.height

    def share(count: int) -> str:
        return f"{count}/{total} ({100 * count / max(total, 1):.0f}%)"

    closed = chains["response"].str.contains(THINK_CLOSE, literal=True)
    still = ~closed & (chains["finish_reason"] == "length")
    found = spans.filter(pl.col("status") == "ok").group_by("label").agg(pl.col("chain_id").n_unique())
    with_label = dict(found.iter_rows())
    model = read_metadata(run.chains).get("model", {}).get("model", run.root.name)
    return {
        "model": str(model),
        "opens <think>": share(int(chains["response"].str.contains(THINK_OPEN, literal=True).sum())),
        "closes </think>": share(int(closed.sum())),
        "still reasoning at the limit": share(int(still.sum())),
        **{f"with {label}": share(with_label.get(label, 0)) for label in STEERED_LABELS},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    args = parser.parse_args(argv)
    rows = [thinking_row(RunDir(root)) for root in args.runs]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
