"""docs/formats.md says what the stages write: every table of the page against the schemas the
stages read with, and against the files a small study on a tiny model really writes (every
column in order with its type, every metadata key)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import polars as pl
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "formats.md"

#: The page's type names of the polars types.
TYPES = {"String": "str", "Int64": "int64", "Float64": "float64", "Boolean": "bool",
         "List(Int64)": "list[int64]", "List(Float64)": "list[float64]"}
#: The keys every file's metadata holds (the page's "Provenance" table).
PROVENANCE = ("stage", "options", "model", "nnsteer", "time")


def tables() -> dict[str, list[list[list[str]]]]:
    """Per ``##`` section of the page, its tables: rows of cells, header and rule left out."""
    sections: dict[str, list[list[list[str]]]] = {}
    section, current = None, None
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            section, current = line[3:].strip(), None
            sections[section] = []
        elif line.startswith("|") and section is not None:
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if current is None:
                current = []
                sections[section].append(current)
                continue  # the header
            if set("".join(cells)) <= set("-: "):
                continue  # the rule
            current.append(cells)
        else:
            current = None
    return sections


def names(cell: str) -> list[str]:
    """``"`a`, `b`"`` -> ``["a", "b"]``."""
    return re.findall(r"`([^`]+)`", cell)


def columns(section: str, which: int = 0) -> list[tuple[str, str]]:
    return [(names(row[0])[0], row[1]) for row in tables()[f"`{section}`"][which]]


def keys(section: str, which: int) -> set[str]:
    return {name for row in tables()[section][which] for name in names(row[0])}


def as_columns(schema) -> list[tuple[str, str]]:
    """A schema (polars types or type classes) as the page writes it."""
    return [(name, TYPES[str(dtype() if isinstance(dtype, type) else dtype)])
            for name, dtype in dict(schema).items()]


# ------------------------------------------------------------------ against the schemas


def test_tasks_chains_and_annotations_match_the_schemas_the_stages_read_with():
    from nnsteer.annotation.stage import ANNOTATION_SCHEMA
    from nnsteer.generation.chains import CHAIN_SCHEMA
    from nnsteer.tasks.files import SCHEMA

    assert columns("tasks.parquet") == as_columns(SCHEMA)
    assert columns("chains.parquet") == as_columns(CHAIN_SCHEMA)
    assert columns("annotations.parquet") == as_columns(ANNOTATION_SCHEMA)


def test_layers_json_fields_are_the_layer_choice_and_its_calibration():
    from nnsteer.steer.choices import LayerChoice

    fields = [row for row in tables()["`layers.json`"][0]]
    documented = [names(row[0])[0] for row in fields]
    assert documented == [f.name for f in dataclasses.fields(LayerChoice)] + ["conditions"]


def test_the_provenance_table_is_what_every_output_carries():
    from nnsteer.runs.store import provenance

    assert keys("Provenance: every file's metadata", 0) == set(provenance("x", {}))
    assert set(PROVENANCE) == set(provenance("x", {}))


# ------------------------------------------------------------------ against a real study

RECITED = ("Let me read this. Okay! By definition squares have four sides... Wait, actually that "
           "seems off?! I am not sure it is wrong? For example with x=2 then y equals 3 so answer: five\n")
CONFIG = """
run_dir = "{run}"
[model]
name = "{model}"
batch_size = 4
[tasks]
per_category = 1
eval_per_category = 1
validation_per_category = 1
[generate]
max_new_tokens = 46
limit = 3
[annotate]
annotator = "rules"
[select]
coefficient = "auto"
grid = [1.0]
validation_limit = 1
max_new_tokens = 4
[steer]
behaviours = ["uncertainty-estimation"]
max_new_tokens = 6
limit = 1
[evaluate]
n_boot = 50
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory, tokenizer):
    """Every stage but the report, through ``nnsteer run``, on a tiny random Llama that
    recites a chain with cues for several behaviours (so that every stage has work)."""
    from conftest import reciting_hf

    from nnsteer.pipeline.run import read_config, run_pipeline

    root = tmp_path_factory.mktemp("formats")
    model = root / "reciting-llama"
    reciting_hf("llama", tokenizer, tokenizer.encode(RECITED, add_special_tokens=False)
                ).save_pretrained(model)
    tokenizer.save_pretrained(model)
    config = root / "study.toml"
    config.write_text(CONFIG.format(run=root / "run", model=model), encoding="utf-8")
    stages = ["tasks", "generate", "annotate", "extract", "attribute", "select", "steer", "evaluate"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only spins on a busy machine
    try:
        return run_pipeline(read_config(config), only=stages, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("file, section, which", [
    ("tasks.parquet", "tasks.parquet", 0),
    ("chains.parquet", "chains.parquet", 0),
    ("steered.parquet", "chains.parquet", 0),
    ("sweep.parquet", "chains.parquet", 0),
    ("annotations.parquet", "annotations.parquet", 0),
    ("steered_annotations.parquet", "annotations.parquet", 0),
    ("attribution.parquet", "attribution.parquet", 0),
    ("attribution_spans.parquet", "attribution.parquet", 1),
    ("evaluation.parquet", "evaluation.parquet", 0),
])
def test_every_column_in_order_with_its_type(study, file, section, which):
    assert columns(section, which) == as_columns(pl.read_parquet_schema(study.root / file))


@pytest.mark.parametrize("file, section", [
    ("chains.parquet", "chains.parquet"),
    ("steered.parquet", "chains.parquet"),
    ("annotations.parquet", "annotations.parquet"),
    ("evaluation.parquet", "evaluation.parquet"),
    ("tasks.parquet", None),
    ("attribution.parquet", None),
])
def test_every_metadata_key(study, file, section):
    from nnsteer.runs.store import read_metadata

    documented = set(PROVENANCE) | (keys(f"`{section}`", 1) if section else set())
    assert set(read_metadata(study.root / file)) == documented


def test_the_vectors_metadata(study):
    from nnsteer.runs.store import read_metadata

    documented = keys("`vectors.safetensors`", 0)
    imported_only = {"per_layer_labels", "imported"}
    assert set(read_metadata(study.root / "vectors.safetensors")) == (
        set(PROVENANCE) | documented - imported_only)


def test_the_layers_json_entries(study):
    entries = json.loads((study.root / "layers.json").read_text())
    documented = [names(row[0])[0] for row in tables()["`layers.json`"][0]]
    for entry in entries.values():
        assert list(entry) == documented[:-1]  # `conditions` only after --calibrate-conditions
        assert {"coefficient_sweep", *PROVENANCE} <= set(entry["provenance"])
