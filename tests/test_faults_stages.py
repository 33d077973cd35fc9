"""Fault injection, table-driven, across the stages: every stage command and ``nnsteer run``
over hostile run files, every config key over hostile values, and the embedded model's
damaged cache.

The tables are generated, not written case by case:

- **run files**: each file of the registry (``RUN_FILES``) that a stage reads
  (``Stage.inputs``), truncated, empty, of the wrong type (another format under its name)
  or of the wrong shape (its format, other contents), for every stage command that reads
  it and for ``nnsteer run --only`` its readers;
- **config keys**: each key of ``[model]`` (``ModelConfig``) and of every stage table (its
  function's parameters, ``RUNNERS``) given a wrong type, and where it is a number NaN, inf,
  a negative and zero (zero only where the test's own table, :data:`ZERO_MEANS_SOMETHING`,
  does not say it is a meaningful value); each key naming a file (``Stage.file_options``
  and ``[model] name``) given a missing file; each key with choices (``CHOICES``,
  ``PATTERNS``) given one that is not among them;
- **the embedded model's cache** (``$NNSTEER_CACHE``): each file of its entry truncated,
  empty, garbage or deleted is found and rebuilt, never fatal (the LLM annotator's cache
  is ``tests/test_faults.py``'s).

Every hostile case must exit 2 with one line on stderr and leave the run directory byte
for byte as it was. The study they start from is one ``nnsteer run`` of the reciting tiny
model (``test_pipeline.pipeline_config``); the model is loaded once and handed to every
command (the same weights each time: ``load_model`` is wrapped in a cache, not replaced).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import json
import math
import os
import shutil
import typing
from pathlib import Path

import polars as pl
import pytest
import torch
from conftest import FaultAfter
from safetensors.torch import save_file
from test_faults import invoke, one_line, snapshot
from test_pipeline import pipeline_config  # noqa: F401  (the study's config fixture)

import nnsteer.cli.common as cli_common
import nnsteer.pipeline.run as pipeline_run
from nnsteer.cli import INTERRUPTED
from nnsteer.generation import loop
from nnsteer.modeling import embedded
from nnsteer.pipeline.run import RUNNERS, SUPPLIED, ModelConfig, read_config
from nnsteer.runs.registry import RUN_FILES, STAGES

# ------------------------------------------------------------------ the study

@pytest.fixture(scope="module")
def study(pipeline_config):  # noqa: F811  (the fixture imported above)
    """The reciting model's directory, the study's config, and its finished run directory."""
    run = pipeline_config.parent / "faults-run"
    with pytest.MonkeyPatch.context() as patch:
        loaded_once(patch)
        code, err = invoke("--run-dir", str(run), "run", "--config", str(pipeline_config))
    assert code == 0, err
    return Path(read_config(pipeline_config).model.name), pipeline_config, run


_LOADED: dict = {}


def loaded_once(monkeypatch) -> None:
    """Every command gets the model it names loaded once per session (the real loader)."""
    real = pipeline_run.load_model

    @functools.wraps(real)
    def load_model(name, **options):
        key = (name, json.dumps(options, sort_keys=True, default=str))
        if key not in _LOADED:
            _LOADED[key] = real(name, **options)
        return _LOADED[key]

    monkeypatch.setattr(cli_common, "load_model", load_model)
    monkeypatch.setattr(pipeline_run, "load_model", load_model)


@pytest.fixture
def run_copy(study, tmp_path, monkeypatch):
    """A fresh copy of the study's run directory for one case."""
    loaded_once(monkeypatch)
    copy = tmp_path / "run"
    shutil.copytree(study[2], copy)
    return copy


def stage_args(stage: str, model_dir: Path) -> list[str]:
    """The stage command as the study's config runs it (the same model and settings)."""
    model = ["--model", str(model_dir)]
    device = ["--device", "cpu"]
    return [stage, *{
        "generate": [*model, *device, "--max-new-tokens", "46", "--limit", "6",
                     "--batch-size", "4"],
        "annotate": [*model, "--annotator", "rules"],
        "extract": [*model, *device, "--batch-size", "4"],
        "attribute": [*model, *device, "--batch-size", "4"],
        "select": model,
        "steer": [*model, *device, "--behaviours", "backtracking,uncertainty-estimation",
                  "--max-new-tokens", "12", "--limit", "2", "--batch-size", "16"],
        "evaluate": [*model, *device, "--n-boot", "200", "--batch-size", "4"],
        "report": model,
    }[stage]]


# ------------------------------------------------------------------ hostile run files

def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def wrong_type(path: Path) -> None:
    """Another format under the file's name: JSON for parquet and safetensors, parquet for JSON."""
    if path.suffix == ".json":
        pl.DataFrame({"x": [1]}).write_parquet(path)
    else:
        path.write_text(json.dumps({"backtracking": {"layers": [0]}}))


def wrong_shape(path: Path) -> None:
    """The file's own format with other contents: a table of other columns, vectors of
    another shape, JSON of another structure."""
    if path.suffix == ".parquet":
        pl.DataFrame({"chain_id": ["c0"], "x": [1.5]}).write_parquet(path)
    elif path.suffix == ".safetensors":
        save_file({"backtracking": torch.ones(3)}, str(path), metadata={"nnsteer": "{}"})
    else:
        path.write_text(json.dumps(["backtracking", 3]))


DAMAGES = {"truncated": truncated, "empty": empty, "wrong-type": wrong_type,
           "wrong-shape": wrong_shape}
#: Each run file a stage reads, with the stages that read it (the registry's inputs).
READERS = {key: [s.name for s in STAGES if key in s.inputs]
           for key in RUN_FILES if any(key in s.inputs for s in STAGES)}
#: Readers that read a file's metadata only: a table of other columns, without nnsteer's
#: metadata, is not theirs to refuse (the report lists tasks.parquet in its provenance).
METADATA_ONLY = {("tasks", "report")}
FILE_CASES = [(key, damage, stage) for key, stages in READERS.items() for damage in DAMAGES
              for stage in stages]


@pytest.mark.parametrize("key, damage, stage", FILE_CASES,
                         ids=[f"{RUN_FILES[k]}-{d}-{s}" for k, d, s in FILE_CASES])
def test_a_damaged_run_file_is_one_line_for_every_stage_that_reads_it(
        study, run_copy, key, damage, stage):
    DAMAGES[damage](run_copy / RUN_FILES[key])
    before = snapshot(run_copy)
    code, err = invoke("--run-dir", str(run_copy), *stage_args(stage, study[0]))
    if damage == "wrong-shape" and (key, stage) in METADATA_ONLY:
        assert code == 0, err  # nothing of it is read: the report is written
        assert snapshot(run_copy)[RUN_FILES[key]] == before[RUN_FILES[key]]
        return
    assert code == 2, err
    assert RUN_FILES[key] in one_line(err)
    assert snapshot(run_copy) == before


PIPELINE_CASES = [(key, damage) for key in READERS for damage in DAMAGES]


@pytest.mark.parametrize("key, damage", PIPELINE_CASES,
                         ids=[f"{RUN_FILES[k]}-{d}" for k, d in PIPELINE_CASES])
def test_a_damaged_run_file_is_one_line_for_nnsteer_run(study, run_copy, key, damage):
    DAMAGES[damage](run_copy / RUN_FILES[key])
    before = snapshot(run_copy)
    only = [f"--only={stage}" for stage in READERS[key]]
    code, err = invoke("--run-dir", str(run_copy), "run", "--config", str(study[1]), *only)
    assert code == 2, err
    assert RUN_FILES[key] in one_line(err)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("change, n, done", [
    ({"--max-new-tokens": "8"}, 6, 4),
    ({"--max-new-tokens": "8", "--limit": "2", "--batch-size": "1"}, 2, 1)])
def test_ctrl_c_in_generate_with_other_settings_keeps_the_finished_chains(
        study, run_copy, monkeypatch, change, n, done):
    """The reported case: a finished chains.parquet (6 chains of 46 tokens), then ``generate``
    with another ``--max-new-tokens`` (and ``--limit``) interrupted after one batch. The
    table is kept byte for byte, and stderr says what it holds before "finished work is
    saved"."""
    args = stage_args("generate", study[0])
    for option, value in change.items():
        args[args.index(option) + 1] = value
    before = snapshot(run_copy)
    FaultAfter(monkeypatch, loop, "generate_batch", after=1)
    code, err = invoke("--run-dir", str(run_copy), *args)
    assert code == 130, err
    assert [line for line in err.splitlines() if line.startswith("nnsteer:")][-2:] == [
        f"nnsteer: {run_copy / 'chains.parquet'} still holds its 6 chains (other settings); "
        f"{done} of this run's {n} chains are done, kept for a rerun with the same options",
        INTERRUPTED]
    after = snapshot(run_copy)
    assert pl.read_parquet(run_copy / ".chains.parquet.pending").height == done
    del after[".chains.parquet.pending"]
    assert after == before


# ------------------------------------------------------------------ hostile config keys

#: Keys for which zero is a meaningful value, by the test's own reading of what they do:
#: no tasks of a split, no validation, an unsteered coefficient, no retries, a seed, no
#: skipped layers, the first layer, a cost bound of nothing.
ZERO_MEANS_SOMETHING = frozenset({
    "per_category", "eval_per_category", "validation_per_category", "validate", "coefficient",
    "coefficients", "retries", "seed", "skip_fraction", "layers", "max_coherence_cost",
    "max_repetition_cost", "max_accuracy_cost", "grid"})
#: Keys whose value names a file that must exist, beyond the registry's ``file_options``.
FILE_KEYS = {("model", "name")}


def config_keys() -> list[tuple[str, str, typing.Any]]:
    """Every ``(table, key, type hint)`` a config may set."""
    keys = [("model", key, hint) for key, hint in typing.get_type_hints(ModelConfig).items()]
    for stage in STAGES:
        function = RUNNERS[stage.name]
        for name, param in inspect.signature(function).parameters.items():
            if name not in SUPPLIED and param.kind in (param.KEYWORD_ONLY,
                                                       param.POSITIONAL_OR_KEYWORD):
                keys.append((stage.name, name, pipeline_run._hint(function, name)))
    return keys


def _members(hint) -> set:
    """The plain types a hint allows (``int | None`` → {int, NoneType}; list[float] → {list})."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) \
        else (hint,)
    return {typing.get_origin(a) or a for a in args}


def _numeric(hint) -> tuple[bool, bool]:
    """Whether a key takes numbers (directly, or inside a list or table), and integers only."""
    text = str(hint)
    return ("int" in text or "float" in text), ("float" not in text)


def _inside(hint, value):
    """``value`` where ``hint`` puts numbers: itself, in a list, or in a table's list."""
    kinds = _members(hint)
    if kinds & {int, float}:
        return value
    if dict in kinds:
        return {"backtracking": [value]}
    return [value]


def _unknown_choice(kinds: set):
    """A value that is none of a key's choices, in the key's own shape (a table's choices
    are its keys)."""
    if dict in kinds:
        return {"no-such-choice": [1]}
    if kinds & {list, collections.abc.Sequence}:
        return ["no-such-choice"]
    return "no-such-choice"


def hostile_values() -> list[tuple[str, str, str, typing.Any]]:
    """``(table, key, what, value)``: every hostile value of every key."""
    cases = []
    file_keys = FILE_KEYS | {(s.name, k) for s in STAGES for k in s.file_options}
    for table, key, hint in config_keys():
        kinds = _members(hint)
        wrong = [1, 2] if dict in kinds else {"wrong": "type"}
        cases.append((table, key, "wrong-type", wrong))
        numeric, integer = _numeric(hint)
        if numeric:
            cases += [(table, key, "nan", _inside(hint, math.nan)),
                      (table, key, "inf", _inside(hint, math.inf)),
                      (table, key, "negative", _inside(hint, -1 if integer else -0.5))]
            if key not in ZERO_MEANS_SOMETHING:
                cases.append((table, key, "zero", _inside(hint, 0)))
        if (table, key) in file_keys:
            cases.append((table, key, "missing-file", "no/such/file.txt"))
        if (table, key) in pipeline_run.CHOICES or (table, key) in pipeline_run.PATTERNS:
            cases.append((table, key, "unknown-choice", _unknown_choice(kinds)))
    return cases


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf"
    return json.dumps(value)


CONFIG_CASES = hostile_values()
#: What makes a stage use the key at all: ``[tasks] path`` is read from a file source.
CONTEXT = {("tasks", "path"): ['source = "file"']}


@pytest.mark.parametrize("table, key, what, value", CONFIG_CASES,
                         ids=[f"{t}.{k}-{w}" for t, k, w, _ in CONFIG_CASES])
def test_a_hostile_config_value_is_one_line_before_any_stage(study, run_copy, table, key, what,
                                                              value):
    lines = study[1].read_text().splitlines()
    header = f"[{table}]"
    if header not in lines:
        lines += ["", header]
    start = lines.index(header) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    kept = [row for row in lines[start:end] if not row.startswith(f"{key} =")]
    setting = [*CONTEXT.get((table, key), []), f"{key} = {toml_value(value)}"]
    text = "\n".join([*lines[:start], *setting, *kept, *lines[end:]]) + "\n"
    bad = run_copy.parent / "bad.toml"
    bad.write_text(text)
    before = snapshot(run_copy)
    code, err = invoke("--run-dir", str(run_copy), "run", "--config", str(bad))
    assert code == 2, err
    message = one_line(err)
    assert str(bad) in message and key in message
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------ the embedded model's cache

CACHE_DAMAGES = {"truncated": truncated, "empty": empty,
                 "garbage": lambda path: path.write_bytes(os.urandom(1024)),
                 "deleted": lambda path: path.unlink()}


@pytest.fixture(scope="module")
def cache_entry():
    """The embedded model's cache entry (built once, with its record of its files)."""
    entry = embedded.embedded_dir("smollm2-135m")
    assert embedded.cache_problem(entry) is None
    return entry


def linked_copy(entry: Path, target: Path) -> Path:
    """A copy of the cache entry whose files are hard links (damage replaces, never edits)."""
    target.mkdir(parents=True)
    for path in entry.iterdir():
        os.link(path, target / path.name)
    return target


def replace_then(damage: str):
    """The damage applied to a fresh file in place of the link, so the original is untouched
    (a truncated file keeps at most its first MiB)."""
    def apply(path: Path) -> None:
        with open(path, "rb") as f:
            head = f.read(min(path.stat().st_size // 2, 1 << 20))
        path.unlink()
        if damage == "truncated":
            path.write_bytes(head)
        elif damage != "deleted":
            CACHE_DAMAGES[damage](path)
    return apply


CACHE_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", embedded.MANIFEST)
CACHE_CASES = [(file, damage, recorded) for file in CACHE_FILES for damage in CACHE_DAMAGES
               for recorded in (True, False)
               if not (file == embedded.MANIFEST and not recorded)]


@pytest.mark.parametrize("file, damage, recorded", CACHE_CASES,
                         ids=[f"{f}-{d}-{'recorded' if r else 'old'}" for f, d, r in CACHE_CASES])
def test_a_damaged_cache_file_is_found(cache_entry, tmp_path, file, damage, recorded):
    """With its record (``recorded``) or without one (an entry built by an older nnsteer),
    every damage of every file is found, so that the entry is rebuilt."""
    copy = linked_copy(cache_entry, tmp_path / cache_entry.name)
    if not recorded:
        (copy / embedded.MANIFEST).unlink()
    if not recorded and (file, damage) == ("chat_template.jinja", "truncated"):
        pytest.skip("a cut template is still a template: only an entry's record finds it")
    replace_then(damage)(copy / file)
    if file == embedded.MANIFEST and damage == "deleted":  # the record alone: made again
        assert embedded.cache_problem(copy) is None and (copy / file).is_file()
    else:
        assert embedded.cache_problem(copy) is not None


@pytest.mark.embedded
def test_a_truncated_tokenizer_in_the_cache_is_rebuilt_not_fatal(cache_entry, tmp_path,
                                                                  monkeypatch):
    """The reported case: a truncated tokenizer.json in ``$NNSTEER_CACHE`` gave a
    JSONDecodeError. Now the entry is rebuilt, saying so in one line, and the command works."""
    monkeypatch.setenv("NNSTEER_CACHE", str(tmp_path))
    copy = linked_copy(cache_entry, tmp_path / cache_entry.name)
    replace_then("truncated")(copy / "tokenizer.json")
    code, err = invoke("models", "--model", "smollm2-135m", "--device", "cpu")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("nnsteer:")]
    assert notes == [f"nnsteer: {copy}: damaged cache entry (tokenizer.json has 1048576 bytes, "
                     f"not {(cache_entry / 'tokenizer.json').stat().st_size}): rebuilding it"]
    assert embedded.cache_problem(copy) is None
    assert (copy / "tokenizer.json").read_bytes() == (cache_entry / "tokenizer.json").read_bytes()
