"""The report's example chains: one eval task's unsteered and steered chains, spans coloured."""

from __future__ import annotations

import html

import polars as pl

from nnsteer.evaluation.costs import chain_figures
from nnsteer.labels import LABELS
from nnsteer.report.blocks import Section, Unavailable, need
from nnsteer.runs.store import RunDir, read_parquet


def example_chains_section(run: RunDir) -> Section:
    """One eval task's chains, unsteered and steered each way per behaviour, spans coloured by label.

    The task is the first with a baseline and both directions of every behaviour's own
    vector (not the random control); the text shown is each chain's whole response.
    """
    colours = dict(zip(LABELS, ["#dbe9f6", "#e2f0d9", "#fff2cc", "#e4dcf3", "#fde0c8", "#f8cbcb"]))
    chains = read_parquet(need(run.steered),
                          columns=["chain_id", "task_id", "behaviour", "direction", "vector", "response"])
    spans = read_parquet(need(run.steered_annotations),
                         columns=["chain_id", "label", "start", "end", "status"])
    chains = chains.filter(pl.col("vector").is_null() | pl.col("vector").is_in(["none", "behaviour"]))
    wanted = {("none", None)} | {(d, b) for b in chains["behaviour"].drop_nulls().unique()
                                 for d in ("positive", "negative")}
    task_ids = [t for (t,), group in chains.group_by("task_id", maintain_order=True)
                if {(d, b) for d, b in group.select("direction", "behaviour").iter_rows()} >= wanted]
    if not task_ids:
        raise Unavailable("no eval task has an unsteered chain and both steering directions")
    task_id = sorted(task_ids)[0]
    figures_of = _chain_figures(run, task_id)
    rows = chains.filter(pl.col("task_id") == task_id).sort(
        pl.col("behaviour").fill_null(""), pl.col("direction") != "none", pl.col("direction") != "positive")
    cells = []
    for row in rows.iter_rows(named=True):
        text, pieces, at = row["response"], [], 0
        chain_spans = spans.filter((pl.col("chain_id") == row["chain_id"]) & (pl.col("status") == "ok"))
        for span in chain_spans.sort("start").iter_rows(named=True):
            if span["start"] < at or span["label"] not in colours:
                continue
            pieces.append(html.escape(text[at:span["start"]]))
            pieces.append(f'<span title="{span["label"]}" style="background:{colours[span["label"]]}">'
                          f'{html.escape(text[span["start"]:span["end"]])}</span>')
            at = span["end"]
        pieces.append(html.escape(text[at:]))
        name = "unsteered" if row["direction"] == "none" else f'{row["behaviour"]}, {row["direction"]}'
        figures = f'<div class="figures">{html.escape(figures_of[row["chain_id"]])}</div>' \
            if row["chain_id"] in figures_of else ""
        cells.append(f'<tr><th>{html.escape(name)}{figures}</th>'
                     f'<td style="white-space:pre-wrap">{"".join(pieces)}</td></tr>')
    legend = " ".join(f'<span style="background:{c};padding:0 0.3em">{label}</span>'
                      for label, c in colours.items())
    return Section("Example chains", f"<p>Eval task <code>{html.escape(task_id)}</code>, greedy chains; "
                   f"annotated spans: {legend}</p><table>{''.join(cells)}</table>")


def _chain_figures(run: RunDir, task_id: str) -> dict[str, str]:
    """Per chain of ``task_id``, its cost figures from ``evaluation.parquet`` (if measured)."""
    if not run.evaluation.exists():
        return {}
    evaluation = read_parquet(run.evaluation)
    if "nll_unsteered" not in evaluation.columns:
        return {}
    rows = evaluation.filter(pl.col("task_id") == task_id).unique("chain_id")
    return {row["chain_id"]: chain_figures(row) for row in rows.iter_rows(named=True)}
