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

Example config (``configs/demo.toml``)::

    run_dir = "runs/demo"
    [model]
    name = "smollm2-135m"
    [tasks]
    per_category = 3
    [generate]
    max_new_tokens = 128
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import sys
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnsteer.errors import BadInput
from nnsteer.models import DEFAULT_MODEL, LoadedModel, load_model, model_slug
from nnsteer.store import RunDir, fingerprint, now_iso, read_json, write_json


@dataclass(frozen=True)
class Stage:
    """One step of the study: the function that does it, and the run files it reads and writes."""

    name: str
    module: str
    function: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    #: Options whose values name input files (their contents enter the fingerprint).
    file_options: tuple[str, ...] = ()


STAGES: tuple[Stage, ...] = (
    Stage("tasks", "nnsteer.tasks", "write_tasks", (), ("tasks",), file_options=("path",)),
    Stage("generate", "nnsteer.generation", "generate_chains", ("tasks",), ("chains",)),
    Stage("annotate", "nnsteer.annotate", "annotate_chains", ("chains",), ("annotations",)),
    Stage("extract", "nnsteer.vectors", "extract_vectors", ("chains", "annotations"), ("vectors",)),
    Stage("attribute", "nnsteer.attribution", "attribute",
          ("chains", "annotations", "vectors"), ("attribution",)),
    Stage("select", "nnsteer.select", "select_layers", ("vectors", "attribution"), ("layers",)),
    Stage("steer", "nnsteer.steer", "steer_chains", ("tasks", "layers", "vectors"), ("steered",)),
    Stage("evaluate", "nnsteer.evaluate", "evaluate",
          ("steered", "annotations"), ("steered_annotations", "evaluation")),
    Stage("report", "nnsteer.report", "write_report",
          ("tasks", "annotations", "vectors", "attribution", "layers", "evaluation"), ("report",)),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)

MODEL_KEYS = ("name", "remote", "device", "dtype", "batch_size", "hot_swap", "ndif_deadline")
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


@dataclass(frozen=True)
class Config:
    """A parsed config file: the model, the run directory, and each stage's options."""

    path: Path
    model: ModelConfig = ModelConfig()
    run_dir: Path | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, run_dir: Path | None = None) -> RunDir:
        """``run_dir`` if given, else the config's, else ``runs/<model-slug>``."""
        return RunDir(run_dir or self.run_dir or Path("runs") / model_slug(self.model.name))


def load_config(path: Path | str) -> Config:
    """Parse a config; :class:`BadInput` naming the file and key for anything unknown."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{path}: invalid TOML: {exc}") from None
    known = {"run_dir", "model", *STAGE_NAMES}
    for key, value in raw.items():
        if key not in known:
            raise BadInput(f"{path}: unknown key {key!r} (expected run_dir, [model] or a "
                           f"stage table: {', '.join(STAGE_NAMES)})")
        if key != "run_dir" and not isinstance(value, dict):
            raise BadInput(f"{path}: {key!r} must be a table ([{key}])")
    model = raw.get("model", {})
    for key in model:
        if key not in MODEL_KEYS:
            raise BadInput(f"{path}: unknown key [model] {key!r} (expected {', '.join(MODEL_KEYS)})")
    defaults = ModelConfig()
    for key, value in model.items():
        _check_type(path, f"[model] {key}", value, getattr(defaults, key))
    run_dir = raw.get("run_dir")
    if run_dir is not None and not isinstance(run_dir, str):
        raise BadInput(f"{path}: run_dir must be a string")
    return Config(
        path=path,
        model=ModelConfig(**model),
        run_dir=Path(run_dir) if run_dir else None,
        options={name: dict(raw.get(name, {})) for name in STAGE_NAMES},
    )


def _check_type(path: Path, key: str, value: Any, default: Any) -> None:
    if default is None or isinstance(default, (list, dict)):
        return
    expected = (int, float) if isinstance(default, float) else type(default)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, expected):
        raise BadInput(f"{path}: {key} = {value!r}: expected {type(default).__name__}")


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
    """The stage's function; :class:`BadInput` if its module is not in this install."""
    try:
        module = importlib.import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name != stage.module:
            raise
        raise BadInput(f"stage {stage.name!r} is not available: module {stage.module} "
                       "is missing from this install") from None
    function = getattr(module, stage.function, None)
    if function is None:
        raise BadInput(f"stage {stage.name!r} is not available: "
                       f"{stage.module}.{stage.function} is missing")
    return function


def stage_options(config: Config, stage: Stage, function: Callable[..., Any]) -> dict[str, Any]:
    """The config's options for ``stage``, checked against its function's parameters."""
    params = {n: p for n, p in inspect.signature(function).parameters.items()
              if n not in SUPPLIED and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    options = config.options.get(stage.name, {})
    for key, value in options.items():
        if key not in params:
            raise BadInput(f"{config.path}: unknown key [{stage.name}] {key!r} "
                           f"(expected {', '.join(params) or 'no options'})")
        default = params[key].default
        _check_type(config.path, f"[{stage.name}] {key}", value,
                    None if default is inspect.Parameter.empty else default)
    if "batch_size" in params and "batch_size" not in options:
        options = {**options, "batch_size": config.model.batch_size}
    return options


def file_digest(path: Path) -> str | None:
    """SHA-256 of a file's bytes, or ``None`` if it does not exist."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PipelineState:
    """``pipeline.json``: per stage, the fingerprint it ran with and its outputs' digests."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = read_json(path) if path.exists() else {}

    def up_to_date(self, stage: str, fp: str, outputs: dict[str, str | None]) -> bool:
        record = self.stages.get(stage, {})
        return (record.get("fingerprint") == fp and record.get("complete") is True
                and None not in outputs.values() and record.get("outputs") == outputs)

    def resumable(self, stage: str, fp: str) -> bool:
        """Whether ``stage`` was started with this fingerprint and did not finish."""
        record = self.stages.get(stage, {})
        return record.get("fingerprint") == fp and record.get("complete") is False

    def record(self, stage: str, fp: str, outputs: dict[str, str | None] | None = None) -> None:
        """Mark ``stage`` started (``outputs`` None) or finished, atomically."""
        self.stages[stage] = {"fingerprint": fp, "complete": outputs is not None,
                              "outputs": outputs, "time": now_iso()}
        write_json(self.path, self.stages)

    def put_back(self, stage: str, record: dict[str, Any] | None) -> None:
        """Make ``record`` (None: no record) ``stage``'s record again, atomically."""
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
                                  hot_swap=c.hot_swap, ndif_deadline=c.ndif_deadline)
        return self._lm

    def identity(self) -> dict[str, Any]:
        """What makes outputs differ between models (not where they run)."""
        return {"name": self.config.name, "dtype": self.config.dtype}


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
    run = config.run(run_dir)
    selected = {s.name for s in select_stages(from_stage, only)}
    plan = []
    for stage in STAGES:  # every table checked before any work, selected or not
        try:
            function = stage_function(stage)
        except BadInput:
            if stage.name in selected:
                raise
            continue
        options = stage_options(config, stage, function)
        if stage.name in selected:
            plan.append((stage, function, options))
    origin = "run_dir" if run_dir else f"{config.path}: run_dir" if config.run_dir else "run directory"
    create_run_dir(run.root, origin)
    state = PipelineState(run.root / "pipeline.json")
    model = _LazyModel(config.model)
    width = max(len(stage.name) for stage, _, _ in plan)
    for index, (stage, function, options) in enumerate(plan, start=1):
        prefix = f"[{index}/{len(plan)}] {stage.name:<{width}}"
        files = _stage_files(run, stage)
        _discard(files)  # set aside by a run that was killed before it could clean up
        params = inspect.signature(function).parameters
        fp = _fingerprint(run, stage, options, model.identity() if "lm" in params else None)
        outputs = _digests(run, stage.outputs)
        if not force and state.up_to_date(stage.name, fp, outputs):
            log(f"{prefix}  skipped (up to date)")
            continue
        fresh = force or not state.resumable(stage.name, fp)
        previous = state.stages.get(stage.name)
        if fresh:
            _set_aside(files)
        log(f"{prefix}  running")
        state.record(stage.name, fp)
        start = time.perf_counter()
        try:
            kwargs = dict(options)
            if "lm" in params:
                kwargs["lm"] = model.get()
            if "tokenizer" in params and model.loaded is not None:
                kwargs["tokenizer"] = model.loaded.tokenizer
            with contextlib.redirect_stdout(sys.stderr):  # stdout is kept for the report's path
                function(run, **kwargs)
        except BadInput:
            if fresh and not any(path.exists() for path in files):
                _put_back(files)  # rejected before it wrote anything: as if never started
                state.put_back(stage.name, previous)
            raise
        finally:
            _discard(files)
        state.record(stage.name, fp, _digests(run, stage.outputs))
        log(f"{prefix}  done in {_elapsed(time.perf_counter() - start)}")
    return run


def create_run_dir(root: Path, origin: str) -> list[Path]:
    """Create the run directory ``root`` if missing; the directories made, deepest first.

    :class:`BadInput` naming ``origin`` (where the path came from) if it cannot be made.
    """
    try:
        made = [path for path in (root, *root.parents) if not path.exists()]
        root.mkdir(parents=True, exist_ok=True)
        return made
    except OSError as exc:
        raise BadInput(f"{origin} {root}: cannot create the directory "
                       f"({exc.strerror or type(exc).__name__})") from None


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


def _set_aside_path(path: Path) -> Path:
    """The hidden name under which ``path`` waits while its stage reruns."""
    return path.with_name(f".{path.name.lstrip('.')}.set-aside")


def _set_aside(files: Iterable[Path]) -> None:
    """Move ``files`` to their set-aside names so that their stage starts afresh."""
    for path in files:
        if path.exists():
            path.replace(_set_aside_path(path))


def _put_back(files: Iterable[Path]) -> None:
    """Move set-aside ``files`` back to their names."""
    for path in files:
        aside = _set_aside_path(path)
        if aside.exists():
            aside.replace(path)


def _discard(files: Iterable[Path]) -> None:
    """Delete what is set aside for ``files``."""
    for path in files:
        _set_aside_path(path).unlink(missing_ok=True)


def _elapsed(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60)
    return f"{int(minutes)}m{seconds:04.1f}s" if minutes else f"{seconds:.1f}s"
