"""``nnsteer annotate``: behaviour spans of the chains (annotations.parquet)."""

from __future__ import annotations

from pathlib import Path

import click

from nnsteer.annotation.agreement import file_agreement
from nnsteer.annotation.stage import (
    OFFLINE_DEFAULT,
    annotate_chains,
    failed_chains_in,
    offline_annotator,
)
from nnsteer.cli.common import llm_limits, run_dir
from nnsteer.modeling.models import DEFAULT_MODEL


@click.command(name="annotate")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Model whose run directory to use (when --run-dir is not given).")
@click.option("--annotator", default="auto", show_default=True,
              help="learned, rules, openai:<model>, or auto (openai:gpt-4o if OPENAI_API_KEY "
                   "is set, else rules).")
@click.option("--base-url", default=None, help="Any OpenAI-compatible server (vLLM, Ollama).")
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Concurrent LLM requests.")
@llm_limits
@click.option("--annotator-prompt", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="A file whose text replaces the LLM annotator's prompt (e.g. the authors'); "
                   "the reasoning goes where it says {thinking}, else it is the user message.")
@click.option("--source", type=click.Choice(["chains", "steered"]), default="chains",
              show_default=True, help="Annotate chains.parquet or steered.parquet.")
@click.option("--agreement", "agreement_files", multiple=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Instead: print the offline annotator's (--annotator learned or rules; auto: "
                   "rules) agreement with the LLM annotations of FILE (annotated-chains JSON). "
                   "Repeatable.")
@click.pass_context
def command(ctx: click.Context, model: str, annotator: str, base_url: str | None, workers: int,
            timeout: float, retries: int, annotator_prompt: str | None, source: str,
            agreement_files: tuple[Path, ...]) -> None:
    """Annotate chains into behaviour spans (annotations.parquet)."""
    if agreement_files:
        annotate = offline_annotator(annotator)
        name = OFFLINE_DEFAULT if annotator == "auto" else annotator
        for path in agreement_files:
            click.echo(file_agreement(path, annotate).format(f"{name} vs {path.name}"))
            click.echo()
        return

    run = run_dir(ctx, model)
    summary = annotate_chains(run, annotator=annotator, base_url=base_url, workers=workers,
                              source=source, timeout=timeout, retries=retries,
                              annotator_prompt=annotator_prompt)
    out = run.annotations if source == "chains" else run.steered_annotations
    click.echo(f"wrote {out}")
    click.echo(f"{'label':<24}{'spans':>7}{'tokens':>8}{'unaligned':>11}{'unknown':>9}")
    for label, spans, tokens, unaligned, unknown in summary.iter_rows():
        click.echo(f"{label:<24}{spans:>7}{tokens:>8}{unaligned:>11}{unknown:>9}")
    if failed_chains_in(out):
        ctx.exit(1)  # the failed chains were named on stderr; the file keeps the rest
