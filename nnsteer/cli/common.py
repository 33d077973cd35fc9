"""Options and helpers shared by the CLI commands."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nnsteer.annotation.llm import DEFAULT_RETRIES, DEFAULT_TIMEOUT
from nnsteer.errors import BadInput
from nnsteer.generation.prompts import DEFAULT_PROMPT_TEMPLATE, PROMPT_TEMPLATES
from nnsteer.modeling.models import (
    DEFAULT_MODEL,
    LoadedModel,
    load_model,
    load_tokenizer,
    model_slug,
)
from nnsteer.modeling.placement import parse_placement_text
from nnsteer.modeling.sources import model_name
from nnsteer.modeling.thinking import (
    FORMAT_CHOICES,
    REASONING_EFFORTS,
    apply_thinking,
    check_effort,
    check_format,
    choose,
)
from nnsteer.runs.store import RunDir, create_run_dir, run_lock


def model_choice_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--model --remote --device --dtype``: which model, and where it runs."""
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     callback=lambda ctx, param, value: model_name(value),
                     help="HF id, local directory, .gguf file, or embedded model name."),
        click.option("--remote", is_flag=True, help="Run on NDIF (needs NDIF_API_KEY)."),
        click.option("--device", default=None,
                     help="cpu, cuda, cuda:1, or auto (all GPUs). Default: cuda if present."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
        click.option("--hot-swap", is_flag=True, expose_value=False, callback=_keep_ndif_option,
                     help="With --remote: skip the check that NDIF runs the model now (for "
                          "keys that may load models on demand)."),
        click.option("--ndif-deadline", type=click.FloatRange(min=1), default=None,
                     expose_value=False, callback=_keep_ndif_option,
                     help="With --remote: seconds one NDIF request may take (default: no "
                          "limit); a rerun re-attaches to the job."),
        click.option("--device-map", default=None, expose_value=False, callback=_keep_ndif_option,
                     help="Spread the model with accelerate: auto, balanced, sequential, or a "
                          'JSON object {"module": device} (device: GPU index, cpu or disk).'),
        click.option("--max-memory", default=None, expose_value=False, callback=_keep_ndif_option,
                     help="With --device-map: memory per device, e.g. 0=20GiB,cpu=64GiB."),
        *thinking_options(),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _keep_ndif_option(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Keep ``--hot-swap`` / ``--ndif-deadline`` / ``--device-map`` / ``--max-memory`` for
    :func:`open_model` (not a command argument)."""
    ctx.meta[f"nnsteer.{param.name}"] = value
    return value


def thinking_options() -> list[Callable[[Callable[..., Any]], Callable[..., Any]]]:
    """``--thinking-format --reasoning-effort``, kept for :func:`open_model` (see
    :mod:`nnsteer.modeling.thinking`); a bad value is one line naming the option."""
    def keep(check: Callable[[str | None, str], str | None]) -> Callable[..., Any]:
        def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
            ctx.meta[f"nnsteer.{param.name}"] = check(value, f"--{param.name.replace('_', '-')}")
        return callback

    return [
        click.option("--thinking-format", default=None, expose_value=False,
                     callback=keep(check_format), metavar="[" + "|".join(FORMAT_CHOICES) + "]",
                     help="How the model marks its reasoning. Default: detected from its "
                          "tokenizer and chat template (auto)."),
        click.option("--reasoning-effort", default=None, expose_value=False,
                     callback=keep(check_effort), metavar="[" + "|".join(REASONING_EFFORTS) + "]",
                     help="The harmony format's reasoning effort (default medium)."),
    ]


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--model --remote --device --dtype --batch-size``, as every model stage takes."""
    func = click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                        help="Chains (spans for attribute) per forward pass or NDIF request; "
                             "lower it if memory runs out.")(func)
    return model_choice_options(func)


def cost_model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--remote --device --dtype --batch-size`` of the unsteered model that ``evaluate``
    scores the chains with (the chains' own model, so no ``--model``)."""
    options = [
        click.option("--remote", is_flag=True,
                     help="Score the chains' NLL on NDIF (needs NDIF_API_KEY)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1, or auto."),
        click.option("--dtype", default="auto", show_default=True,
                     help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16."),
        click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Chains per forward pass or NDIF request of the NLL."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def generation_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--limit --max-new-tokens --prompt-template``, as the stages that generate take;
    ``what`` names the tasks."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func = click.option("--prompt-template", type=click.Choice(list(PROMPT_TEMPLATES)),
                            default=DEFAULT_PROMPT_TEMPLATE, show_default=True,
                            help="The user turn around each task: step-by-step (nnsteer), "
                                 "released-thinking (the bare task, as the released steering "
                                 "code), released-comparison (its comparison script).")(func)
        func = click.option("--max-new-tokens", type=click.IntRange(min=1), default=500,
                            show_default=True, help="Greedy tokens per chain at most.")(func)
        return click.option("--limit", type=click.IntRange(min=1), default=None,
                            help=f"Only the first N {what}.")(func)

    return decorate


def llm_limits(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--timeout --retries`` of each LLM annotator request."""
    func = click.option("--retries", type=click.IntRange(min=0), default=DEFAULT_RETRIES,
                        show_default=True,
                        help="Retries of a request after a 429, a 5xx or a timeout.")(func)
    return click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                        default=DEFAULT_TIMEOUT, show_default=True,
                        help="Seconds an LLM request may take.")(func)


def open_model(model: str, remote: bool, device: str | None, dtype: str) -> LoadedModel:
    """Load the model named by the common options (and ``--hot-swap``, ``--ndif-deadline``),
    with its thinking format (``--thinking-format``, ``--reasoning-effort``)."""
    meta = click.get_current_context().meta
    device_map, max_memory = parse_placement_text(meta.get("nnsteer.device_map"),
                                                  meta.get("nnsteer.max_memory"))
    lm = load_model(model, device=device, dtype=dtype, remote=remote,
                    hot_swap=meta.get("nnsteer.hot_swap", False),
                    ndif_deadline=meta.get("nnsteer.ndif_deadline"),
                    device_map=device_map, max_memory=max_memory)
    apply_thinking(lm, meta.get("nnsteer.thinking_format"), meta.get("nnsteer.reasoning_effort"))
    return lm


def describe_thinking(model: str) -> str:
    """``NAME (why)``: the thinking format ``model`` would run with (its tokenizer alone,
    and ``--thinking-format``, ``--reasoning-effort``)."""
    meta = click.get_current_context().meta
    return choose(load_tokenizer(model), model, meta.get("nnsteer.thinking_format"),
                  meta.get("nnsteer.reasoning_effort")).summary()


def given_run_dir(ctx: click.Context) -> Path | None:
    """``--run-dir`` if given, checked (:func:`check_run_dir`)."""
    root = ctx.find_root().params.get("run_dir")
    if root is not None:
        check_run_dir(Path(root), "--run-dir")
    return root


def run_dir(ctx: click.Context, model: str | None = None, existing: bool = False) -> RunDir:
    """``--run-dir``, else ``runs/<model-slug>``; checked (:func:`check_run_dir`) and
    locked against other processes until the command ends (:func:`nnsteer.runs.store.run_lock`).
    With ``existing``, :class:`BadInput` if the directory does not exist (a command that only
    reads a run never creates one)."""
    root = given_run_dir(ctx)
    if root is None:
        root = Path("runs") / model_slug(model or DEFAULT_MODEL)
        check_run_dir(root, "run directory")
    if existing and not Path(root).is_dir():
        raise BadInput(f"{root}: no such run directory")
    ctx.with_resource(run_lock(root))
    return RunDir(Path(root))


def check_run_dir(root: Path, origin: str) -> None:
    """:class:`BadInput` naming ``origin`` unless ``root`` is a directory or can be made one.

    Leaves nothing behind: a stage creates its run directory only when it writes there.
    """
    for path in create_run_dir(root, origin):
        with contextlib.suppress(OSError):  # something else wrote there meanwhile: keep it
            path.rmdir()


def number_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """A click callback: comma-separated numbers as a list (``None`` stays ``None``)."""
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
