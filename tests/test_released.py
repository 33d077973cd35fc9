"""``nnsteer run --released-code`` against an independent float64 port of the released code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
import released_reference as port
import torch
from click.testing import CliRunner
from test_llm_annotator import ChatServer
from test_pipeline import reciting_model

from nnsteer.annotation.rules import rules_annotate
from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.pipeline.released import (
    RELEASED_CHOICES,
    RELEASED_LAYERS,
    apply_released,
    released_options,
)
from nnsteer.pipeline.run import read_config, stage_function, stage_options
from nnsteer.runs.registry import STAGES
from nnsteer.runs.store import RunDir, read_metadata
from nnsteer.vectors.extract import load_vectors

#: A stand-in for the authors' annotator prompt (their text stays in their repository):
#: the reasoning goes where it says {thinking}.
PROMPT_FILE = "Annotate the reasoning between the markers.\n<<<{thinking}>>>\nOnly the annotated text.\n"

CONFIG = """
released_code = false
[generate]
limit = 6
max_new_tokens = 46

[model]
name = "{model}"
dtype = "float64"

[annotate]
base_url = "{url}"
annotator_prompt = "{prompt}"

[tasks]
eval_per_category = 1
per_category = 1

[steer]
behaviours = ["backtracking"]
max_new_tokens = 8
limit = 1
random_control = false

[evaluate]
base_url = "{url}"
n_boot = 50
"""


def _rules_reply(body: dict, n: int) -> tuple[int, str]:
    """The reply of an annotator that labels like the offline rules, in the paper's format."""
    [message] = body["messages"]
    text = re.search(r"<<<(.*)>>>", message["content"], re.S).group(1)
    spans = rules_annotate(text)
    return 200, "\n".join(f'["{s.label}"]{text[s.start:s.end]}["end-section"]' for s in spans)


def _rel_err(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def released_run(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("released")
    model_dir = root / "reciting-llama"
    reciting_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (root / "prompt.txt").write_text(PROMPT_FILE)
    server = ChatServer(_rules_reply, limit=500)
    config = root / "released.toml"
    config.write_text(CONFIG.format(model=model_dir, url=server.url, prompt=root / "prompt.txt"))
    with pytest.MonkeyPatch.context() as patch:  # the annotator's reply cache: not the user's
        patch.setenv("NNSTEER_CACHE", str(root / "cache"))
        result = CliRunner().invoke(cli, ["--run-dir", str(root / "run"), "run", "--config",
                                          str(config), "--released-code"])
    server.close()
    assert result.exit_code == 0, result.output[-3000:]
    return RunDir(root / "run"), model_dir, server, result.output


def test_released_run_makes_the_released_choices(released_run, tokenizer):
    run, _, server, output = released_run
    assert "[generate] max_new_tokens = 46" in output and "replaces the released 1000" in output
    assert "the authors picked no layers" in output
    assert {r["model"] for r in server.requests} == {"gpt-4.1"}
    first = server.requests[0]["messages"]
    assert len(first) == 1 and first[0]["content"].startswith("Annotate the reasoning")
    chains = pl.read_parquet(run.chains)
    tasks = pl.read_parquet(run.tasks).filter(pl.col("split") == "train")
    bare = tokenizer.apply_chat_template([{"role": "user", "content": tasks["prompt"][0]}],
                                         tokenize=True, add_generation_prompt=True)
    bare = bare["input_ids"] if isinstance(bare, dict) or hasattr(bare, "keys") else bare
    assert chains["prompt_ids"][0].to_list() == list(bare)  # the bare question
    assert read_metadata(run.chains)["options"]["prompt_template"] == "released-thinking"
    notes = read_metadata(run.annotations)["options"]
    assert notes["annotator"] == "openai:gpt-4.1" and len(notes["prompt_sha256"]) == 16
    assert load_vectors(run.vectors).metadata["variant"] == "released-code"
    options = read_metadata(run.attribution)["options"]
    assert {k: options[k] for k in ("metric", "spans", "aggregate", "limit")} == {
        "metric": "released-code", "spans": "others", "aggregate": "chains", "limit": 50}
    assert read_metadata(run.evaluation)["options"]["denominator"] == "steered"
    assert "averaged over <code>chains</code>" in run.report.read_text()


def test_released_run_equals_the_independent_port(released_run, tokenizer):
    run, model_dir, _, _ = released_run
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    chains = pl.read_parquet(run.chains)
    spans = pl.read_parquet(run.annotations).filter(pl.col("status") == "ok")
    inputs = []
    for row in chains.iter_rows(named=True):
        mine = spans.filter(pl.col("chain_id") == row["chain_id"]).sort("start")
        inputs.append((row["prompt_ids"] + row["output_ids"], port.char_spans_to_tokens(
            tokenizer, row["output_ids"], mine.select("label", "start", "end").rows(),
            len(row["prompt_ids"]))))
    vectors = port.released_vectors(model, inputs)
    ours = load_vectors(run.vectors)
    assert set(ours.labels) == set(vectors) and len(vectors) >= 4
    for label, reference in vectors.items():
        assert _rel_err(ours[label], reference) < 1e-4, label

    reference = port.released_attribution(model, inputs, vectors)
    index = {chain_id: i for i, chain_id in enumerate(chains["chain_id"])}
    per_span = pl.read_parquet(run.path("attribution_spans.parquet"))
    assert per_span.height == sum(len(v) for r in reference.values() for v in r["spans"].values())
    for (chain_id, label, position), group in per_span.group_by(
            ["chain_id", "label", "position"]):
        expected = torch.stack(reference[label]["spans"][index[chain_id], position + 1])
        got = torch.tensor(group["effects"].to_list()).abs()
        assert _rel_err(got, expected) < 1e-4, (chain_id, label, position)

    table = pl.read_parquet(run.attribution)
    assert set(table["label"]) == set(reference)
    for label, expected in reference.items():
        rows = table.filter(pl.col("label") == label).sort("layer")
        assert rows["n_chains"][0] == len(expected["chains"])
        assert _rel_err(torch.tensor(rows["effect"].to_list()), expected["mean"]) < 1e-4, label
        assert _rel_err(torch.tensor(rows["std"].to_list()), expected["std"]) < 1e-4, label
    layers = json.loads(run.layers.read_text())
    best = {label: int(table.filter((pl.col("label") == label) & (pl.col("layer") >= 1))
                       .sort("effect", descending=True)["layer"][0]) for label in reference}
    assert {label: entry["layers"] for label, entry in layers.items()} == {
        label: [layer] for label, layer in best.items()}  # select ranks the chain aggregation


def test_released_options_and_overrides(tmp_path):
    paper = released_options("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")
    assert paper["select"] == {"layers": RELEASED_LAYERS["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"],
                               "coefficient": 1.0}
    assert paper["generate"] == {"prompt_template": "released-thinking", "max_new_tokens": 1000}
    assert paper["annotate"]["annotator"] == "openai:gpt-4.1"
    assert "layers" not in released_options("tiny")["select"]
    assert all(c.source for c in RELEASED_CHOICES)
    path = tmp_path / "c.toml"
    path.write_text('released_code = true\n[model]\nname = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"\n'
                    '[attribute]\nmetric = "nll"\n')
    lines: list[str] = []
    config = apply_released(read_config(path), lines.append)
    assert config.options["attribute"] == {"metric": "nll", "spans": "others", "limit": 50,
                                           "aggregate": "chains"}
    assert config.options["select"]["layers"]["backtracking"] == [12]
    assert lines == [f"released_code: [attribute] metric = 'nll' from {path} replaces the "
                     "released 'released-code'"]
    for stage in STAGES:  # every released option is an option of its stage
        stage_options(config, stage, stage_function(stage))
    path.write_text("released_code = 1\n")
    with pytest.raises(BadInput, match="released_code must be true or false"):
        read_config(path)


def test_paper_configs_use_the_released_prompt():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/paper-*.toml")):
        options = read_config(path).options
        assert options["generate"]["prompt_template"] == "released-thinking", path
        assert options["steer"]["prompt_template"] == "released-thinking", path


def _compare(*args: str):
    """Run analysis/compare_released_attribution.py in this process (its imports are loaded)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "analysis" / "compare_released_attribution.py"
    spec = importlib.util.spec_from_file_location("compare_released_attribution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return CliRunner().invoke(module.main, list(args))


def test_compare_script_puts_the_released_file_beside_a_run(tmp_path):
    from nnsteer.runs.store import write_parquet

    chains = {"backtracking": [[0.1, 0.4, 0.2], [0.3, float("nan"), 0.6]], "deduction": []}
    torch.save(chains, tmp_path / "layer_effects_tiny.pt")  # shaped like the released files
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_parquet(pl.DataFrame({"label": ["backtracking"] * 3, "layer": [0, 1, 2],
                                "effect": [0.2, 0.2, 0.8], "std": [0.1, 0.2, 0.2],
                                "n_spans": [5] * 3, "metric": ["released-code"] * 3}),
                  run.attribution, {"options": {"aggregate": "chains"}})
    out = tmp_path / "side.csv"
    result = _compare(str(tmp_path / "layer_effects_tiny.pt"), str(run.root), "--out", str(out))
    assert result.exit_code == 0, result.output
    table = pl.read_csv(out)
    # the released figure: NaN counted as 0, mean and std (ddof 0) over chains
    assert table["released_effect"].to_list() == pytest.approx([0.2, 0.2, 0.4])
    assert table["released_std"].to_list() == pytest.approx([0.1, 0.2, 0.2])
    assert table["ratio"].to_list() == pytest.approx([1.0, 1.0, 2.0])
    assert "backtracking: Spearman over 3 layers 1.000; argmax layer released 2, run 2" in result.output
    assert "run averaged over chains" in result.output
    (tmp_path / "bad.pt").write_text("not torch")
    bad = _compare(str(tmp_path / "bad.pt"), str(run.root))
    assert bad.exit_code == 2 and "bad.pt: cannot read it" in bad.output
