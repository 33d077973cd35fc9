"""``nnsteer evaluate``: behaviour shares of the steered chains (Figure 4)."""

from __future__ import annotations

import click

from nnsteer.cli.common import cost_model_options, llm_limits, open_model, run_dir
from nnsteer.evaluation.costs import steered_model
from nnsteer.evaluation.stage import CHART_FILE, SUMMARY_FILE, evaluate
from nnsteer.modeling.models import DEFAULT_MODEL


@click.command(name="evaluate")
@click.option("--annotator", default=None,
              help="rules or openai:<model>. Default: the annotator of annotations.parquet.")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint for openai:<model>.")
@click.option("--workers", type=click.IntRange(min=1), default=8, show_default=True,
              help="Parallel annotation requests.")
@llm_limits
@click.option("--annotator-prompt", default=None,
              type=click.Path(exists=True, dir_okay=False),
              help="A file whose text replaces the LLM annotator's prompt (default: that of "
                   "annotations.parquet, for the same annotator); the reasoning goes "
                   "where it says {thinking}, else it is the user message.")
@click.option("--denominator", type=click.Choice(["labelled", "steered"]), default="labelled",
              show_default=True,
              help="Shares of all labelled tokens, or of the four steered labels (released code).")
@click.option("--n-boot", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Bootstrap resamples of the tasks.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Bootstrap seed.")
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="Only picks the default run directory, runs/<model-slug>.")
@click.option("--grader", default="offline", show_default=True,
              help="How final answers are graded against the tasks' answers: offline, or "
                   "openai:<model> (an LLM judge, at --base-url if given).")
@cost_model_options
@click.pass_context
def command(ctx: click.Context, annotator: str | None, base_url: str | None, workers: int,
            timeout: float, retries: int, annotator_prompt: str | None, denominator: str,
            n_boot: int, seed: int, model: str, grader: str, remote: bool, device: str | None,
            dtype: str, batch_size: int) -> None:
    """Annotate steered chains and measure behaviour shares and what steering cost
    (evaluation.parquet, chart, summary)."""
    run = run_dir(ctx, model)
    name = steered_model(run)
    lm = None if name is None else open_model(name, remote, device, dtype)
    evaluate(run, annotator=annotator, base_url=base_url, workers=workers, timeout=timeout,
             retries=retries, denominator=denominator, n_boot=n_boot, seed=seed,
             annotator_prompt=annotator_prompt, lm=lm, grader=grader, batch_size=batch_size)
    click.echo((run.root / SUMMARY_FILE).read_text(), nl=False)
    click.echo(f"wrote {run.evaluation}, {run.charts / CHART_FILE}, {run.root / SUMMARY_FILE}")
