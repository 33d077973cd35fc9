"""The report's opening sections: at a glance, who made each file, and the label counts."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.annotation.learned import measured_agreement
from nnsteer.evaluation.costs import broken_conditions
from nnsteer.evaluation.shares import summary_text
from nnsteer.labels import LABELS
from nnsteer.report.blocks import (
    Section,
    Unavailable,
    html_table,
    layer_choices,
    need,
    select_provenance,
)
from nnsteer.report.steering import cost_summary, steering_summary
from nnsteer.runs.registry import STAGES
from nnsteer.runs.store import (
    RunDir,
    nnsteer_version,
    now_iso,
    read_metadata,
    read_parquet,
)
from nnsteer.vectors.extract import missing_vectors_note


def overview_section(run: RunDir) -> Section:
    """The first lines: behaviours that got no vector (so were not steered), and the
    verdicts of the evaluation."""
    lines = []
    if run.vectors.exists():
        metadata = read_metadata(run.vectors)
        if metadata.get("skipped_labels"):
            note = missing_vectors_note
            text = note(metadata, run.annotations.name)
            lines.append(text[:1].upper() + text[1:] + ".")
    if run.evaluation.exists():
        summary = steering_summary(run)
        text = summary_text(summary)
        lines += [line for line in text.splitlines() if line.endswith("conditions.")]
        lines += broken_conditions(summary, cost_summary(run))
    if not lines:
        raise Unavailable("Nothing to say yet: run the vectors and steering stages.")
    return Section("At a glance", "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
                   + "</ul>")


def provenance_section(run: RunDir) -> Section:
    """Who made each file: stage, model and revision, options, nnsteer version, time."""
    rows = []
    for name, stage in ((name, s.name) for s in STAGES for name in s.output_files()):
        path = run.path(name)
        if not path.exists() or path.suffix not in (".parquet", ".safetensors", ".json"):
            continue
        meta = _file_provenance(run, path)
        model = meta.get("model") or {}
        rows.append({
            "file": name, "stage": meta.get("stage", stage),
            "model": model.get("model", ""), "revision": str(model.get("revision") or ""),
            "options": json.dumps(meta.get("options", {}), sort_keys=True, default=str),
            "nnsteer": meta.get("nnsteer", ""), "time": meta.get("time", ""),
        })
    if not rows:
        raise Unavailable("Not run yet: the run directory holds no stage outputs.")
    intro = (f"<p>Run directory <code>{html.escape(str(run.root))}</code>; report written "
             f"{now_iso()} by nnsteer {nnsteer_version()}.</p>")
    return Section("Provenance", intro + html_table(pl.DataFrame(rows)), folded=True)


def _file_provenance(run: RunDir, path: Path) -> dict[str, Any]:
    """A stage output's provenance: file metadata, or for ``layers.json`` its entries' own."""
    if path.suffix != ".json":
        return read_metadata(path)
    return select_provenance(layer_choices(run)) if path == run.layers else {}


def label_counts_section(run: RunDir) -> Section:
    """Spans and chains per label in the training annotations, by alignment status."""
    spans = read_parquet(need(run.annotations), columns=["chain_id", "label", "status", "annotator"])
    counts = (
        spans.group_by("label")
        .agg(
            spans=(pl.col("status") == "ok").sum(),
            chains=pl.col("chain_id").filter(pl.col("status") == "ok").n_unique(),
            unaligned=(pl.col("status") == "unaligned").sum(),
            unknown_label=(pl.col("status") == "unknown-label").sum(),
        )
    )
    every_label = pl.DataFrame({"label": list(LABELS)})  # labels never found show as 0
    counts = every_label.join(counts, on="label", how="full", coalesce=True, maintain_order="left")
    counts = counts.fill_null(0)
    n_chains = spans["chain_id"].n_unique()
    annotators = sorted(spans["annotator"].drop_nulls().unique())
    by = ", ".join(f"<code>{html.escape(a)}</code>" for a in annotators)
    note = (f"<p>{n_chains} chains annotated by {by}; spans counted with status <code>ok</code>; "
            "unaligned and unknown-label spans are reported and skipped.</p>")
    if "rules" in annotators:
        note += ("<p><strong>Approximate labels:</strong> the offline <code>rules</code> annotator "
                 "labels sentences from their wording; on R1-distill chains it agrees with a "
                 "GPT-4-class annotator at a word-level macro-F1 of about 0.55–0.6 (docs/benchmarks.md, "
                 "Measured figures). Use an LLM annotator for results.</p>")
    if "learned" in annotators:
        note += (f"<p><strong>Approximate labels:</strong> {html.escape(measured_agreement())} "
                 "Use an LLM annotator for results.</p>")
    return Section("Behaviour labels", note + html_table(counts))
