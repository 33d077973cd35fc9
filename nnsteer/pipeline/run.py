"""The whole study from one TOML config, stage by stage, skipping what is up to date.

A stage is skipped when its outputs exist, are unchanged since the pipeline wrote them,
and the fingerprint of its options, model and input files' contents matches the one
recorded in ``<run>/pipeline.json``. A stage records its fingerprint before it starts,
so a rerun after Ctrl-C or a crash resumes an unfinished stage (the stages themselves
keep finished batches) instead of starting it over; a changed option, model or input,
``--force``, or outputs the pipeline did not record (written by a stage command run by
hand) run it afresh: its outputs and partial state are set aside under hidden names
(``.<file>.set-aside``) so that it cannot see them, and discarded once it finished or
failed after writing. If it rejects its input (:class:`BadInput`, e.g. an option value
it checks when it starts) before writing anything, they are put back, with its record
in ``pipeline.json``. What stages print goes to stderr: stdout is kept for the report's
path.

Example config (a cut of ``configs/plain.toml``)::

    run_dir = "runs/plain"
    [model]
    name = "smollm2-135m"
    [tasks]
    per_category = 3
    [generate]
    max_new_tokens = 128
"""

from __future__ import annotations

import collections.abc
import contextlib
import inspect
import math
import re
import sys
import time
import tomllib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnsteer.annotation.stage import (
    ANNOTATOR_NAMES,
    annotate_chains,
    is_annotator,
    read_annotator_prompt,
)
from nnsteer.errors import BadInput
from nnsteer.evaluation.grader import resolve_grader
from nnsteer.evaluation.shares import DENOMINATORS
from nnsteer.evaluation.stage import evaluate
from nnsteer.generation.chains import generate_chains
from nnsteer.generation.prompts import PROMPT_TEMPLATES
from nnsteer.generation.spec import AT, WHERE, check_coefficient, parse_when
from nnsteer.labels import LABELS
from nnsteer.modeling.embedded import EMBEDDED_MODELS
from nnsteer.modeling.models import DEFAULT_MODEL, LoadedModel, load_model, model_slug
from nnsteer.modeling.placement import check_placement, resolve_device
from nnsteer.modeling.sources import resolve_source
from nnsteer.modeling.thinking import FORMAT_CHOICES, REASONING_EFFORTS, apply_thinking
from nnsteer.package_data import package_path
from nnsteer.pipeline.released import apply_released
from nnsteer.report.page import write_report
from nnsteer.runs.registry import PIPELINE_STATE, STAGE_NAMES, STAGES, Stage
from nnsteer.runs.store import (
    RunDir,
    create_run_dir,
    file_digest,
    fingerprint,
    now_iso,
    read_json,
    run_lock,
    write_json,
)
from nnsteer.selection.attribution import (
    AGGREGATIONS,
    ATTRIBUTION_METRICS,
    SPAN_SOURCES,
    attribute,
)
from nnsteer.selection.layers import AUTO, select_layers
from nnsteer.selection.strength import Bounds, check_grid
from nnsteer.steer.chains import steer_chains
from nnsteer.tasks.files import read_task_file
from nnsteer.tasks.stage import SPLITS, write_tasks
from nnsteer.vectors.extract import VARIANTS, extract_vectors

#: The package that holds the shipped configs (the project's configs/ folder).
CONFIGS_PACKAGE = "nnsteer.pipeline.configs"
#: The function that runs each stage of :data:`~nnsteer.runs.registry.STAGES`.
RUNNERS: dict[str, Callable[..., Any]] = {
    "tasks": write_tasks,
    "generate": generate_chains,
    "annotate": annotate_chains,
    "extract": extract_vectors,
    "attribute": attribute,
    "select": select_layers,
    "steer": steer_chains,
    "evaluate": evaluate,
    "report": write_report,
}

MODEL_KEYS = ("name", "remote", "device", "dtype", "batch_size", "hot_swap", "ndif_deadline",
              "device_map", "max_memory", "thinking_format", "reasoning_effort")
#: Options that change how fast a stage runs, not what it writes: not fingerprinted.
EXECUTION_OPTIONS = frozenset({"batch_size", "workers", "device", "remote"})
#: Parameters the pipeline itself supplies to stage functions.
SUPPLIED = frozenset({"run", "lm", "tokenizer"})


@dataclass(frozen=True)
class ModelConfig:
    """The ``[model]`` table."""

    name: str = DEFAULT_MODEL
    remote: bool = False
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 8
    hot_swap: bool = False
    ndif_deadline: float | None = None
    #: accelerate's placement (``nnsteer.modeling.placement.check_placement``): a name or {module = device}.
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[str, Any] | None = None
    #: :mod:`nnsteer.modeling.thinking`: ``auto`` (None) detects the format.
    thinking_format: str | None = None
    reasoning_effort: str | None = None


@dataclass(frozen=True)
class Config:
    """A parsed config file: the model, the run directory, and each stage's options."""

    path: Path
    model: ModelConfig = ModelConfig()
    run_dir: Path | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Every choice as the authors' released code made it (:mod:`nnsteer.pipeline.released`).
    released_code: bool = False

    def run(self, run_dir: Path | None = None) -> RunDir:
        """``run_dir`` if given, else the config's, else ``runs/<model-slug>``."""
        return RunDir(run_dir or self.run_dir or Path("runs") / model_slug(self.model.name))


def shipped_configs() -> tuple[str, ...]:
    """The names of the configs that ship with nnsteer (``demo``, ``thinking``, ...)."""
    folder = package_path(CONFIGS_PACKAGE)
    return tuple(sorted(p.stem for p in folder.glob("*.toml")))


def config_path(name: Path | str) -> Path:
    """``name`` as a config file: the file itself, or, for a name that is no file here, the
    shipped config of that name (``demo`` or ``demo.toml``)."""
    path = Path(name)
    shipped = package_path(CONFIGS_PACKAGE, path.with_suffix(".toml").name)
    if not path.exists() and path.parent == Path(".") and shipped.is_file():
        return shipped
    return path


def read_config(path: Path | str) -> Config:
    """Parse a config file, or a shipped config by name (:func:`config_path`); :class:`BadInput`
    naming the file and key for anything unknown."""
    path = config_path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{path}: no such config file (shipped configs: "
                       f"{', '.join(shipped_configs())})") from None
    except IsADirectoryError:
        raise BadInput(f"{path}: a directory, not a config file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None
    known = {"run_dir", "released_code", "model", *STAGE_NAMES}
    for key, value in raw.items():
        if key not in known:
            raise BadInput(f"{path}: unknown key {key!r} (expected run_dir, released_code, "
                           f"[model] or a stage table: {', '.join(STAGE_NAMES)})")
        if key == "released_code" and not isinstance(value, bool):
            raise BadInput(f"{path}: released_code must be true or false")
        if key not in ("run_dir", "released_code") and not isinstance(value, dict):
            raise BadInput(f"{path}: {key!r} must be a table ([{key}])")
    model = raw.get("model", {})
    for key in model:
        if key not in MODEL_KEYS:
            raise BadInput(f"{path}: unknown key [model] {key!r} (expected {', '.join(MODEL_KEYS)})")
    hints = typing.get_type_hints(ModelConfig)
    for key, value in model.items():
        check_value(path, "model", key, value, hints[key])
    run_dir = raw.get("run_dir")
    if run_dir is not None and not isinstance(run_dir, str):
        raise BadInput(f"{path}: run_dir must be a string")
    return Config(
        path=path,
        model=ModelConfig(**model),
        run_dir=Path(run_dir) if run_dir else None,
        options={name: dict(raw.get(name, {})) for name in STAGE_NAMES},
        released_code=raw.get("released_code", False),
    )


def check_value(path: Path, section: str, key: str, value: Any, hint: Any) -> None:
    """:class:`BadInput` naming ``path`` and ``[section] key`` unless ``value`` has the
    type ``hint`` and an allowed value (a choice, a count, a fraction)."""
    where = f"{path}: [{section}] {key} = {value!r}"
    if not _conforms(value, hint):
        raise BadInput(f"{where}: expected {_type_name(hint)}")
    if (section, key) in PATTERNS:
        test, text = PATTERNS[section, key]
        if not test(value):
            raise BadInput(f"{where}: must be {text}")
    else:
        choices = _choices(section, key, hint)
        if choices is not None and any(v not in choices for v in _items(value)):
            raise BadInput(f"{where}: must be one of {', '.join(map(str, choices))}")
    if any(not math.isfinite(n) for n in _numbers(value)):
        raise BadInput(f"{where}: must be a finite number")
    least = LEAST.get(key)
    if least is not None and any(n < least for n in _numbers(value)):
        raise BadInput(f"{where}: must be {least} or more")
    if key in FRACTIONS and not 0 <= value < 1:
        raise BadInput(f"{where}: must be a fraction in [0, 1)")
    validate = VALIDATORS.get((section, key))
    if validate is not None and value is not None:
        try:
            validate(value)
        except BadInput as exc:
            raise BadInput(f"{where}: {_without_option(str(exc))}") from None


def _without_option(message: str) -> str:
    """A CLI check's message without its leading ``--option value:`` (the config key is named)."""
    return re.sub(r"^--[\w-]+(?: [^:]*)?: ", "", message)


def _items(value: Any) -> list[Any]:
    """The values a choice option names: a list's items, a table's keys, or the value."""
    return list(value) if isinstance(value, (list, dict)) else [value]


def _numbers(value: Any) -> list[int | float]:
    """Every number in ``value`` (nested in lists and tables' values)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


#: The least value of count options (of every stage that has them).
LEAST: dict[str, int | float] = {
    "batch_size": 1, "limit": 1, "max_new_tokens": 1, "per_category": 0,
    "eval_per_category": 0, "workers": 1, "top_k": 1, "n_boot": 1, "validate": 0,
    "coefficient": 0, "layers": 0, "timeout": 0.001, "retries": 0, "min_spans": 1,
    "validation_per_category": 0, "rows_per_request": 1, "validation_limit": 1, "seed": 0,
    "ndif_deadline": 1,
}
FRACTIONS = frozenset({"skip_fraction"})


def _check_prompt_file(path: str) -> None:
    read_annotator_prompt(path, "openai:")  # the file exists, is text and is not empty


def _check_coefficients(values: list[float]) -> None:
    for value in values:
        check_coefficient(value, "--coefficients")


#: Options checked by the same function that checks their command-line option, after their
#: type: it raises :class:`BadInput`, whose message the config check prefixes with the key.
VALIDATORS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("select", "coefficient"): lambda v: v == AUTO or check_coefficient(v, "--coefficient"),
    ("select", "grid"): check_grid,
    ("select", "max_coherence_cost"): lambda v: Bounds(coherence=v),
    ("select", "max_repetition_cost"): lambda v: Bounds(repetition=v),
    ("select", "max_accuracy_cost"): lambda v: Bounds(accuracy=v),
    ("steer", "coefficients"): _check_coefficients,
    ("steer", "when"): parse_when,
    ("evaluate", "grader"): resolve_grader,
    ("annotate", "annotator_prompt"): _check_prompt_file,
    ("evaluate", "annotator_prompt"): _check_prompt_file,
    ("tasks", "path"): read_task_file,
}
#: Options whose values are one of a list, and the list.
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("tasks", "source"): ("builtin", "file", "claude"),
    ("generate", "split"): SPLITS,
    ("extract", "variant"): VARIANTS,
    ("attribute", "metric"): ATTRIBUTION_METRICS,
    ("attribute", "spans"): SPAN_SOURCES,
    ("attribute", "aggregate"): AGGREGATIONS,
    ("generate", "prompt_template"): tuple(PROMPT_TEMPLATES),
    ("steer", "prompt_template"): tuple(PROMPT_TEMPLATES),
    ("attribute", "labels"): LABELS,
    ("select", "labels"): LABELS,
    ("select", "layers"): LABELS,
    ("steer", "behaviours"): LABELS,
    ("steer", "where"): WHERE,
    ("steer", "at"): AT,
    ("evaluate", "denominator"): DENOMINATORS,
    ("model", "dtype"): ("auto", "float32", "bfloat16", "float16", "float64"),
    ("model", "thinking_format"): FORMAT_CHOICES,
    ("model", "reasoning_effort"): REASONING_EFFORTS,
}


#: Options whose values follow a pattern rather than a list: its test and its description.
PATTERNS: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("annotate", "annotator"): (is_annotator, ANNOTATOR_NAMES),
    ("evaluate", "annotator"): (is_annotator, ANNOTATOR_NAMES),
    ("select", "coefficient"): (lambda v: v == "auto" or not isinstance(v, str),
                                'a number >= 0 or "auto"'),
}


def _choices(section: str, key: str, hint: Any) -> tuple[Any, ...] | None:
    """The values ``[section] key`` may take, if they are a list."""
    literal = [a for a in _members(hint) if typing.get_origin(a) is typing.Literal]
    if literal:
        return typing.get_args(literal[0])
    values = CHOICES.get((section, key))
    return None if values is None else tuple(values)


def _members(hint: Any) -> tuple[Any, ...]:
    """The types of a union (``int | None`` → ``int, None``), or the type itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a TOML value can be passed where ``hint`` is expected."""
    if hint in (Any, inspect.Parameter.empty):
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return any(type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        item = args[0] if args else Any
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        key, item = args or (Any, Any)
        return isinstance(value, dict) and all(
            _conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    """``list[str] | None`` → ``list[str]``: what a TOML value must look like."""
    names = []
    for member in _members(hint):
        if member is type(None):
            continue
        if typing.get_origin(member) is typing.Literal:
            names.append("str")
        elif isinstance(member, type) and not typing.get_args(member):
            names.append("str" if member is Path else member.__name__)
        else:
            names.append(str(member).replace("typing.", "").replace("collections.abc.", ""))
    return " or ".join(names)


def _hint(function: Callable[..., Any], name: str) -> Any:
    """The evaluated annotation of ``function``'s parameter ``name`` (Any if unknown)."""
    hint = inspect.signature(function).parameters[name].annotation
    if isinstance(hint, str):
        try:
            hint = eval(hint, {**vars(typing), **function.__globals__})  # noqa: S307 - own code's annotations
        except Exception:  # a name imported for type checkers only
            return Any
    return hint


def select_stages(from_stage: str | None = None, only: Iterable[str] = ()) -> list[Stage]:
    """The stages to consider: ``only`` these, or all from ``from_stage`` on, in order."""
    only = list(only)
    for name in [from_stage, *only]:
        if name is not None and name not in STAGE_NAMES:
            raise BadInput(f"unknown stage {name!r}: expected one of {', '.join(STAGE_NAMES)}")
    if only and from_stage:
        raise BadInput("give --from or --only, not both")
    if only:
        return [s for s in STAGES if s.name in only]
    start = STAGE_NAMES.index(from_stage) if from_stage else 0
    return list(STAGES[start:])


def stage_function(stage: Stage) -> Callable[..., Any]:
    """The function that runs ``stage``."""
    return RUNNERS[stage.name]


def stage_options(config: Config, stage: Stage, function: Callable[..., Any]) -> dict[str, Any]:
    """The config's options for ``stage``, checked against its function's parameters."""
    params = {n: p for n, p in inspect.signature(function).parameters.items()
              if n not in SUPPLIED and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    options = config.options.get(stage.name, {})
    for key, value in options.items():
        if key not in params:
            raise BadInput(f"{config.path}: unknown key [{stage.name}] {key!r} "
                           f"(expected {', '.join(params) or 'no options'})")
        check_value(config.path, stage.name, key, value, _hint(function, key))
    if "batch_size" in params and "batch_size" not in options:
        options = {**options, "batch_size": config.model.batch_size}
    return options


class PipelineState:
    """``pipeline.json``: per stage, the fingerprint it ran with and its outputs' digests.

    A stage's record is either finished (``complete`` true, with its outputs' digests) or
    started (``complete`` false, with ``previous``: the finished record it replaces). A
    finished record may carry ``unfinished``: the fingerprint of a later attempt that
    failed, whose partial outputs wait under hidden names until it is resumed.
    """

    def __init__(self, path: Path):
        self.path = path
        stages = read_json(path) if path.exists() else {}
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise BadInput(f"{path}: damaged (not an object of stage records): delete it "
                           "and rerun (finished stages are redone)")
        self.stages: dict[str, dict[str, Any]] = stages

    def up_to_date(self, stage: str, fp: str, outputs: dict[str, str | None]) -> bool:
        """Whether ``stage`` finished with this fingerprint and its ``outputs`` (name: digest)
        are the ones it wrote then."""
        record = self.stages.get(stage, {})
        return (record.get("fingerprint") == fp and record.get("complete") is True
                and None not in outputs.values() and record.get("outputs") == outputs)

    def resumable(self, stage: str, fp: str) -> bool:
        """Whether ``stage`` was started with this fingerprint and did not finish, its
        partial outputs in place."""
        record = self.stages.get(stage, {})
        return record.get("fingerprint") == fp and record.get("complete") is False

    def waiting(self, stage: str, fp: str) -> bool:
        """Whether an attempt with this fingerprint failed and its partial outputs wait."""
        return self.stages.get(stage, {}).get("unfinished") == fp

    def start(self, stage: str, fp: str) -> None:
        """Mark ``stage`` started with ``fp``, keeping the finished record it replaces."""
        record = self.stages.get(stage)
        if record is not None and record.get("complete") is False:  # resumed: same previous
            previous = record.get("previous")
        else:
            previous = record
        if previous is not None:
            previous = {k: v for k, v in previous.items() if k != "unfinished"}
        self._write(stage, {"fingerprint": fp, "complete": False, "outputs": None,
                            "time": now_iso(), "previous": previous})

    def finish(self, stage: str, fp: str, outputs: dict[str, str | None]) -> None:
        """Record that ``stage`` finished with this fingerprint and wrote ``outputs``."""
        self._write(stage, {"fingerprint": fp, "complete": True, "outputs": outputs,
                            "time": now_iso()})

    def fail(self, stage: str, waiting: bool) -> None:
        """Make the started record's ``previous`` the record again; ``waiting``: note that
        the attempt's partial outputs wait under hidden names."""
        record = self.stages.get(stage, {})
        restored = dict(record.get("previous") or {})
        if waiting and record.get("fingerprint"):
            restored["unfinished"] = record["fingerprint"]
        self._write(stage, restored or None)

    def _write(self, stage: str, record: dict[str, Any] | None) -> None:
        if record is None:
            self.stages.pop(stage, None)
        else:
            self.stages[stage] = record
        write_json(self.path, self.stages)


class _LazyModel:
    """Loads the configured model on first use only."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self._lm: LoadedModel | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        """The model if a stage has loaded it already."""
        return self._lm

    def get(self) -> LoadedModel:
        if self._lm is None:
            c = self.config
            self._lm = load_model(c.name, device=c.device, dtype=c.dtype, remote=c.remote,
                                  hot_swap=c.hot_swap, ndif_deadline=c.ndif_deadline,
                                  device_map=c.device_map, max_memory=c.max_memory)
            apply_thinking(self._lm, c.thinking_format, c.reasoning_effort,
                           origin="[model] thinking_format")
        return self._lm

    def identity(self) -> dict[str, Any]:
        """What makes outputs differ between models (not where they run); the thinking
        settings where the config gives them."""
        thinking = {k: getattr(self.config, k) for k in ("thinking_format", "reasoning_effort")}
        return {"name": self.config.name, "dtype": self.config.dtype,
                **{k: v for k, v in thinking.items() if v is not None}}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_pipeline(
    config: Config,
    *,
    run_dir: Path | None = None,
    from_stage: str | None = None,
    only: Iterable[str] = (),
    force: bool = False,
    log: Callable[[str], None] = _stderr,
) -> RunDir:
    """Run the selected stages in order; ``force`` reruns them even when up to date."""
    config = apply_released(config, log)
    run = config.run(run_dir)
    selected = {s.name for s in select_stages(from_stage, only)}
    plan = []
    for stage in STAGES:  # every table checked before any work, selected or not
        function = stage_function(stage)
        options = stage_options(config, stage, function)
        if stage.name in selected:
            plan.append((stage, function, options))
    if any("lm" in inspect.signature(function).parameters for _, function, _ in plan):
        check_model(config)
    origin = "run_dir" if run_dir else f"{config.path}: run_dir" if config.run_dir else "run directory"
    create_run_dir(run.root, origin)
    with run_lock(run.root):
        state = PipelineState(run.root / PIPELINE_STATE)
        model = _LazyModel(config.model)
        width = max(len(stage.name) for stage, _, _ in plan)
        for index, (stage, function, options) in enumerate(plan, start=1):
            prefix = f"[{index}/{len(plan)}] {stage.name:<{width}}"
            _run_stage(run, state, model, stage, function, options, force,
                       lambda message, p=prefix: log(f"{p}  {message}"))
    return run


def check_model(config: Config) -> None:
    """:class:`BadInput` naming the config unless its model is there: an embedded name,
    a local model directory or .gguf file. A Hugging Face id is checked for its form only
    (no network), its device for being on this machine."""
    name = config.model.name
    try:
        if name not in EMBEDDED_MODELS:  # an embedded model is there once installed
            resolve_source(name)
    except BadInput as exc:
        raise BadInput(f"{config.path}: [model] name = {name!r}: {exc}") from None
    if not config.model.remote:
        try:
            resolve_device(config.model.device)
        except BadInput as exc:
            raise BadInput(f"{config.path}: [model] device: {exc}") from None
        try:
            check_placement(config.model.device_map, config.model.max_memory)
        except BadInput as exc:
            raise BadInput(f"{config.path}: [model] {exc}") from None


def _run_stage(run: RunDir, state: PipelineState, model: _LazyModel, stage: Stage,
               function: Callable[..., Any], options: dict[str, Any], force: bool,
               log: Callable[[str], None]) -> None:
    """Run one stage unless it is up to date; its finished outputs survive any failure.

    Starting afresh, the stage's finished outputs are set aside (``.<file>.set-aside``);
    they are discarded when it finishes, and put back when it fails, its partial outputs
    then waiting (``.<file>.unfinished``) for a rerun with the same fingerprint.
    """
    files = _stage_files(run, stage)
    if any(_hidden(path, SET_ASIDE).exists() for path in files):
        _put_back(state, stage, files)  # a run killed while they were set aside
    params = inspect.signature(function).parameters
    fp = _fingerprint(run, stage, options, model.identity() if "lm" in params else None)
    if not force and state.up_to_date(stage.name, fp, _digests(run, stage.outputs)):
        log("skipped (up to date)")
        return
    if force or not state.resumable(stage.name, fp):
        _rename(files, None, SET_ASIDE)
        if not force and state.waiting(stage.name, fp):
            _rename(files, UNFINISHED, None)  # the failed attempt continues
        else:
            _discard(files, UNFINISHED)
    log("running")
    state.start(stage.name, fp)
    start = time.perf_counter()
    try:
        kwargs = dict(options)
        if "lm" in params:
            kwargs["lm"] = model.get()
        if "tokenizer" in params and model.loaded is not None:
            kwargs["tokenizer"] = model.loaded.tokenizer
        with contextlib.redirect_stdout(sys.stderr):  # stdout is kept for the report's path
            function(run, **kwargs)
    except BaseException:
        if any(_hidden(path, SET_ASIDE).exists() for path in files):
            _put_back(state, stage, files)
        raise
    _discard(files, SET_ASIDE)
    state.finish(stage.name, fp, _digests(run, stage.outputs))
    log(f"done in {_elapsed(time.perf_counter() - start)}")


def _fingerprint(run: RunDir, stage: Stage, options: dict[str, Any],
                 model: dict[str, Any] | None) -> str:
    inputs = {name: file_digest(getattr(run, name)) for name in stage.inputs}
    for key in stage.file_options:
        if isinstance(options.get(key), str):
            inputs[key] = file_digest(Path(options[key]))
    kept = {k: v for k, v in options.items() if k not in EXECUTION_OPTIONS}
    return fingerprint(stage.name, kept, model, inputs)


def _digests(run: RunDir, names: Iterable[str]) -> dict[str, str | None]:
    return {name: file_digest(getattr(run, name)) for name in names}


def _stage_files(run: RunDir, stage: Stage) -> list[Path]:
    """A stage's outputs and its partial state: what it must not see when it starts afresh."""
    return [*(getattr(run, name) for name in stage.outputs), run.partial(stage.name)]


SET_ASIDE, UNFINISHED = "set-aside", "unfinished"


def _hidden(path: Path, kind: str) -> Path:
    """The hidden name of ``path`` while it is set aside or unfinished (``kind``)."""
    return path.with_name(f".{path.name.lstrip('.')}.{kind}")


def _rename(files: Iterable[Path], source: str | None, target: str | None) -> None:
    """Rename each of ``files`` that exists under its ``source`` name to its ``target``
    name (None: the file's own name), replacing what is there."""
    for path in files:
        origin = path if source is None else _hidden(path, source)
        if origin.exists():
            origin.replace(path if target is None else _hidden(path, target))


def _discard(files: Iterable[Path], kind: str) -> None:
    for path in files:
        _hidden(path, kind).unlink(missing_ok=True)


def _put_back(state: PipelineState, stage: Stage, files: list[Path]) -> None:
    """After a failure (or a kill) of a stage started afresh: its set-aside outputs back in
    place, its partial outputs kept under their unfinished names for a rerun."""
    started = state.stages.get(stage.name, {}).get("complete") is False
    wrote = started and any(path.exists() for path in files)
    if wrote:
        _discard(files, UNFINISHED)
        _rename(files, None, UNFINISHED)
    elif not started:  # left over beside outputs the pipeline recorded since: those stay
        _discard([path for path in files if path.exists()], SET_ASIDE)
    _rename(files, SET_ASIDE, None)
    if started:
        state.fail(stage.name, wrote)


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"
