"""Greedy and steered generation against plain transformers references."""

from __future__ import annotations

import math
import re

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import FaultAfter, make_tiny

from nnsteer.annotation.stage import annotate_chains
from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.generation import loop as generation
from nnsteer.generation.chains import generate_chains
from nnsteer.generation.loop import generate, reasoning_span
from nnsteer.generation.prompts import chat_prompt, prompt_token_ids
from nnsteer.generation.spec import SteeringSpec
from nnsteer.runs.store import RunDir, read_complete, read_metadata, write_parquet
from nnsteer.vectors.extract import read_inputs

PROMPTS = [
    "What is 17 times 23?",
    "A bat and a ball cost 1.10 in total. The bat costs one more than the ball. What is the ball?",
    "Name a prime.",
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies?",
]
NEW = 10


def hf_greedy(lm, prompts, max_new_tokens=NEW, add: dict[int, torch.Tensor] | None = None):
    """Plain transformers ``generate`` on a left-padded batch; forward hooks add ``add[layer]``."""
    tok = lm.tokenizer
    ids = [tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    batch = tok.pad({"input_ids": ids}, padding=True, padding_side="left", return_tensors="pt")
    handles = [
        lm.hf_model.model.layers[layer].register_forward_hook(lambda mod, args, out, v=v: out + v)
        for layer, v in (add or {}).items()
    ]
    try:
        out = lm.hf_model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return out[:, batch["input_ids"].shape[1] :].tolist()


def ids(generations):
    return [g.output_ids for g in generations]


def random_vectors(d_model, layers, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return {layer: scale * torch.randn(d_model, generator=gen) for layer in layers}


def test_unsteered_equals_transformers_generate(tiny_model):
    for prompt in PROMPTS[:2]:
        [gen] = generate(tiny_model, [prompt], max_new_tokens=NEW, progress=False)
        assert gen.output_ids == hf_greedy(tiny_model, [prompt])[0]
        assert (
            gen.prompt_ids
            == tiny_model.tokenizer(
                chat_prompt(tiny_model.tokenizer, prompt), add_special_tokens=False
            )["input_ids"]
        )
        assert gen.finish_reason == "length" and len(gen.output_ids) == NEW


@pytest.mark.parametrize("layers", [[1], [0, 1, 2]], ids=["one-layer", "three-layers"])
@pytest.mark.parametrize("direction", ["positive", "negative"])
def test_steering_equals_forward_hook(tiny_model, layers, direction):
    vectors = random_vectors(tiny_model.arch.d_model, layers, seed=len(layers))
    coefficient = 0.8
    spec = SteeringSpec(vectors, coefficient, direction)
    sign = 1 if direction == "positive" else -1
    added = {layer: sign * coefficient / len(layers) * v for layer, v in vectors.items()}
    for prompt in PROMPTS[:2]:
        [gen] = generate(tiny_model, [prompt], steering=spec, max_new_tokens=NEW, progress=False)
        reference = hf_greedy(tiny_model, [prompt], add=added)[0]
        assert gen.output_ids == reference
        assert reference != hf_greedy(tiny_model, [prompt])[0], "steering too weak to test"


def test_reference_tells_partial_steering_apart(tiny_llama):
    """Steering only the prompt pass, or without the 1/n scale, gives other tokens."""
    vectors = random_vectors(64, [0, 2], seed=3)
    spec = SteeringSpec(vectors, 0.8, "positive")
    [gen] = generate(tiny_llama, [PROMPTS[0]], steering=spec, max_new_tokens=NEW, progress=False)
    added = {k: 0.4 * v for k, v in vectors.items()}
    prompt_only = [
        tiny_llama.hf_model.model.layers[k].register_forward_hook(
            lambda mod, args, out, v=v: out + v if out.shape[1] > 1 else out
        )
        for k, v in added.items()
    ]
    try:
        only_prompt = hf_greedy(tiny_llama, [PROMPTS[0]])[0]
    finally:
        for handle in prompt_only:
            handle.remove()
    unscaled = hf_greedy(tiny_llama, [PROMPTS[0]], add={k: 0.8 * v for k, v in vectors.items()})[0]
    assert gen.output_ids == hf_greedy(tiny_llama, [PROMPTS[0]], add=added)[0]
    assert gen.output_ids != only_prompt and gen.output_ids != unscaled


def test_coefficient_zero_equals_unsteered(tiny_model):
    spec = SteeringSpec(random_vectors(tiny_model.arch.d_model, [0, 1]), 0.0, "negative")
    steered = generate(tiny_model, PROMPTS[:2], steering=spec, max_new_tokens=NEW, progress=False)
    plain = generate(tiny_model, PROMPTS[:2], max_new_tokens=NEW, progress=False)
    assert ids(steered) == ids(plain)


def test_batched_equals_one_by_one(tiny_model):
    d = tiny_model.arch.d_model
    a = SteeringSpec(random_vectors(d, [1], seed=1), 0.8, "positive")
    b = SteeringSpec(random_vectors(d, [0, 2], seed=2), 0.8, "negative")
    specs = [a, None, b, a]
    batched = generate(
        tiny_model, PROMPTS, steering=specs, max_new_tokens=NEW, batch_size=3, progress=False
    )
    single = [
        generate(tiny_model, [p], steering=s, max_new_tokens=NEW, progress=False)[0]
        for p, s in zip(PROMPTS, specs)
    ]
    assert batched == single
    assert len({tuple(g.output_ids) for g in batched}) == len(PROMPTS)


def test_remote_local_gives_the_same_ids(tokenizer):
    local = make_tiny("llama", tokenizer)
    simulated = make_tiny("llama", tokenizer, remote="local")
    specs = [SteeringSpec(random_vectors(64, [1, 3]), 0.8, "positive"), None]
    results = [
        generate(lm, PROMPTS[:2], steering=specs, max_new_tokens=NEW, progress=False)
        for lm in (local, simulated)
    ]
    assert ids(results[0]) == ids(results[1])


def hand_greedy(hf, prompt_ids, n):
    """Argmax of a full forward pass per step: greedy decoding by hand, no cache, no config."""
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt_ids) :]


def test_generation_config_does_not_leak(tokenizer):
    lm = make_tiny("llama", tokenizer)
    config = lm.hf_model.generation_config
    config.do_sample, config.temperature, config.top_k, config.top_p = True, 0.3, 5, 0.5
    config.repetition_penalty, config.no_repeat_ngram_size = 3.0, 2
    [gen] = generate(lm, [PROMPTS[0]], max_new_tokens=NEW, progress=False)
    assert gen.output_ids == hand_greedy(lm.hf_model, gen.prompt_ids, NEW)


def test_chains_end_after_their_first_eos(tokenizer):
    lm = make_tiny("llama", tokenizer)
    plain = hf_greedy(lm, PROMPTS[:2])
    stop = plain[0][3]
    lm.hf_model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    gens = generate(lm, PROMPTS[:2], max_new_tokens=NEW, progress=False)
    for gen, row in zip(gens, plain):
        cut = row.index(stop) + 1 if stop in row else len(row)
        assert gen.output_ids == row[:cut]
        assert gen.finish_reason == ("eos" if stop in row else "length")
    assert gens[0].output_ids[-1] == stop and len(gens[0].output_ids) <= 4


@pytest.mark.parametrize(
    "response, span",
    [
        ("<think>\nabc</think>\n\nThe answer", (7, 11)),  # tags generated
        ("abc\n</think>\n\nThe answer", (0, 4)),  # prompt opened <think>
        ("plain answer, no tags", (0, 21)),  # non-thinking model
        ("<think>cut off by the length lim", (7, 32)),  # ran out of tokens
    ],
)
def test_reasoning_span(response, span):
    assert reasoning_span(response) == span


def test_thinking_template_opens_think(tiny_qwen2, tiny_llama):
    assert chat_prompt(tiny_qwen2.tokenizer, "x").endswith("<｜Assistant｜><think>\n")
    assert "x" in chat_prompt(tiny_llama.tokenizer, "x")


@pytest.mark.parametrize("preset, user_turn", [
    ("released-thinking", "Name a prime."),
    ("released-comparison", "Please answer the following question:\n\nName a prime."),
    ("step-by-step", "Please answer the following question:\n\nName a prime.\n\nIt requires a "
                     "few steps of reasoning. So first, think step by step, and only then give "
                     "the final answer."),
])
def test_prompt_template_presets(tiny_qwen2, preset, user_turn):
    tok = tiny_qwen2.tokenizer
    expected = tok.apply_chat_template([{"role": "user", "content": user_turn}], tokenize=False,
                                       add_generation_prompt=True)
    assert chat_prompt(tok, "Name a prime.", preset) == expected
    assert prompt_token_ids(tok, "Name a prime.", preset) == tok(expected, add_special_tokens=False)["input_ids"]


def test_prompt_template_is_recorded_and_checked(tiny_llama, tmp_path):
    run = RunDir(tmp_path)
    write_parquet(pl.DataFrame({"task_id": ["t0"], "category": ["c"], "prompt": [PROMPTS[2]],
                                "split": ["train"], "source": ["builtin"]}), run.tasks, {})
    chains = generate_chains(run, tiny_llama, max_new_tokens=3, prompt_template="released-thinking")
    assert chains["prompt_ids"][0].to_list() == prompt_token_ids(
        tiny_llama.tokenizer, PROMPTS[2], "released-thinking")
    assert read_metadata(run.chains)["options"]["prompt_template"] == "released-thinking"
    with pytest.raises(BadInput, match="--prompt-template 'bare'"):
        generate_chains(run, tiny_llama, max_new_tokens=3, prompt_template="bare")


@pytest.mark.parametrize(
    "prompts, spec, message",
    [
        ([], None, "no prompts"),
        (["ok", "  "], None, "prompt 1 is empty"),
        (["ok"], SteeringSpec({9: torch.zeros(64)}, 1.0), "steering layer 9 is out of range"),
        (
            ["ok"],
            SteeringSpec({1: torch.zeros(32)}, 1.0),
            r"shape \(32,\); the model's width is 64",
        ),
        (["ok"], SteeringSpec({1: torch.full((64,), math.nan)}, 1.0), "contains NaN"),
        (["ok"], SteeringSpec({1: torch.zeros(64)}, -1.0), "steering coefficient: -1.0 is not a number >= 0"),
    ],
)
def test_bad_input_fails_before_generating(tiny_llama, prompts, spec, message):
    with pytest.raises(BadInput, match=message):
        generate(tiny_llama, prompts, steering=spec, max_new_tokens=NEW, progress=False)


def write_tasks(run: RunDir, n_train: int = 3, n_eval: int = 0) -> None:
    rows = [
        {
            "task_id": f"t{i}",
            "category": "c",
            "prompt": PROMPTS[i % 4] + f" ({i})",
            "split": "train",
            "source": "file",
        }
        for i in range(n_train)
    ]
    rows += [
        {
            "task_id": f"e{i}",
            "category": "c",
            "prompt": PROMPTS[i % 4],
            "split": "eval",
            "source": "file",
        }
        for i in range(n_eval)
    ]
    write_parquet(pl.DataFrame(rows), run.tasks, {"stage": "tasks"})


def test_generate_chains_table_and_resume(tiny_qwen2, tmp_path):
    run = RunDir(tmp_path)
    write_tasks(run, n_train=4)
    first = generate_chains(run, tiny_qwen2, limit=2, max_new_tokens=6, batch_size=2)
    assert first["chain_id"].to_list() == ["t0", "t1"]
    assert first["direction"].to_list() == ["none", "none"] and first["behaviour"].null_count() == 2
    assert first["layers"].to_list() == [[], []] and first["coefficient"].to_list() == [0.0, 0.0]
    row = first.row(1, named=True)
    assert row["prompt_ids"] == prompt_token_ids(tiny_qwen2.tokenizer, PROMPTS[1] + " (1)")
    assert row["response"] == tiny_qwen2.tokenizer.decode(
        row["output_ids"], skip_special_tokens=True
    )
    assert (row["thinking_start"], row["thinking_end"]) == reasoning_span(row["response"])
    meta = read_metadata(run.chains)
    assert meta["stage"] == "generate" and meta["options"]["max_new_tokens"] == 6
    assert meta["model"]["model"] == "tiny-qwen2"

    # A rerun keeps finished chains (marked here) and adds the new tasks, in task order.
    marked = first.with_columns(pl.lit("kept").alias("response"))
    write_parquet(marked, run.chains, meta)
    second = generate_chains(run, tiny_qwen2, limit=4, max_new_tokens=6, batch_size=3)
    assert second["chain_id"].to_list() == ["t0", "t1", "t2", "t3"]
    assert second["response"].to_list()[:2] == ["kept", "kept"]
    assert (
        second.row(3, named=True)["output_ids"]
        == generate(tiny_qwen2, [PROMPTS[3] + " (3)"], max_new_tokens=6, progress=False)[
            0
        ].output_ids
    )

    # Other settings: everything is generated again.
    third = generate_chains(run, tiny_qwen2, limit=2, max_new_tokens=5, batch_size=2)
    assert "kept" not in third["response"].to_list()
    assert third["output_ids"].list.len().max() <= 5


def test_cli_generate(tiny_llama, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    run = RunDir(tmp_path / "run")
    write_tasks(run, n_train=3)
    args = [
        "--run-dir",
        str(run.root),
        "generate",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--limit",
        "2",
        "--max-new-tokens",
        "4",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output
    assert pl.read_parquet(run.chains).height == 2
    bad = CliRunner().invoke(cli, args[:-4] + ["--limit", "0"])
    assert bad.exit_code == 2 and "'--limit': 0 is not in the range" in bad.output


@pytest.mark.embedded
def test_embedded_model_chain(tmp_path):
    from nnsteer.modeling.models import load_model

    lm = load_model("smollm2-135m", device="cpu")
    [gen] = generate(lm, ["What is 12 + 30?"], max_new_tokens=24, progress=False)
    assert gen.output_ids == hf_greedy(lm, ["What is 12 + 30?"], max_new_tokens=24)[0]
    assert gen.response.strip() and (gen.thinking_start, gen.thinking_end) == (0, len(gen.response))


def test_interrupted_run_keeps_finished_batches(tokenizer, tmp_path):
    lm = make_tiny("llama", tokenizer)
    run = RunDir(tmp_path)
    write_tasks(run, n_train=3)
    calls = []

    def interrupt_second_batch(module, args, output):
        calls.append(1)
        if len(calls) > 3:  # a batch of max_new_tokens=3 makes three forward passes
            raise KeyboardInterrupt

    handle = lm.hf_model.model.layers[0].register_forward_hook(interrupt_second_batch)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_chains(run, lm, max_new_tokens=3, batch_size=1)
    finally:
        handle.remove()
    assert pl.read_parquet(run.chains).height == 1
    finished = generate_chains(run, lm, max_new_tokens=3, batch_size=1)
    assert finished["chain_id"].to_list() == ["t0", "t1", "t2"]


def test_interrupted_chains_are_refused_until_finished(tiny_llama, tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    write_tasks(run, n_train=3)
    FaultAfter(monkeypatch, generation, "generate_batch", after=1)
    with pytest.raises(KeyboardInterrupt):
        generate_chains(run, tiny_llama, max_new_tokens=3, batch_size=1)
    meta = read_metadata(run.chains)
    assert (meta["complete"], meta["chains_done"], meta["chains_planned"]) == (False, 1, 3)
    message = f"{run.chains} is incomplete (1 of 3 chains): rerun `nnsteer generate` to finish it"
    with pytest.raises(BadInput, match=re.escape(message)):
        annotate_chains(run, annotator="rules", tokenizer=tiny_llama.tokenizer)
    with pytest.raises(BadInput, match=re.escape(message)):
        read_inputs(run, tiny_llama.name)  # extract and attribute
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "annotate", "--annotator", "rules"])
    assert result.exit_code == 2 and result.stderr == f"nnsteer: error: {message}\n"
    assert not run.annotations.exists()

    FaultAfter(monkeypatch, generation, "generate_batch")  # no more interruptions
    assert generate_chains(run, tiny_llama, max_new_tokens=3, batch_size=1).height == 3
    meta = read_metadata(run.chains)
    assert (meta["complete"], meta["chains_done"], meta["chains_planned"]) == (True, 3, 3)
    annotate_chains(run, annotator="rules", tokenizer=tiny_llama.tokenizer)
    assert read_inputs(run, tiny_llama.name)[0].height == 3

    # A file from an nnsteer that did not record completeness counts as complete.
    old = {k: v for k, v in meta.items() if k not in ("complete", "chains_done", "chains_planned")}
    write_parquet(pl.read_parquet(run.chains), run.chains, old)
    assert read_inputs(run, tiny_llama.name)[0].height == 3


def test_rerun_says_what_it_drops_and_when_it_is_up_to_date(tiny_llama, tmp_path, capsys):
    run = RunDir(tmp_path)
    write_tasks(run, n_train=3)
    generate_chains(run, tiny_llama, max_new_tokens=3)
    capsys.readouterr()
    generate_chains(run, tiny_llama, max_new_tokens=3)
    assert capsys.readouterr().err == f"nnsteer: {run.chains} is up to date (3 chains)\n"

    assert generate_chains(run, tiny_llama, limit=1, max_new_tokens=3)["chain_id"].to_list() == ["t0"]
    assert capsys.readouterr().err.splitlines() == [
        f"nnsteer: dropping 2 chains of {run.chains} that are not in this run "
        "(other tasks, --limit, behaviours or layers)",
        f"nnsteer: {run.chains} is up to date (1 chains)",
    ]
    assert read_metadata(run.chains)["complete"] is True


def test_other_settings_keep_the_finished_table_until_the_new_one_is_complete(
        tiny_llama, tmp_path, monkeypatch, capsys):
    """Four complete chains, then a run with another max_new_tokens (or --limit) interrupted
    after one batch: chains.parquet is the finished table, byte for byte, and stays readable
    by later stages; stderr says what it holds and what waits; the same options continue,
    and only the complete new table replaces it."""
    run = RunDir(tmp_path)
    write_tasks(run, n_train=6)
    generate_chains(run, tiny_llama, limit=4, max_new_tokens=12, batch_size=2)
    finished = run.chains.read_bytes()
    pending = tmp_path / ".chains.parquet.pending"
    for options, held in [(dict(limit=4, max_new_tokens=5), "4 chains (other settings)"),
                          (dict(limit=6, max_new_tokens=12), "4 finished chains"),
                          (dict(limit=2, max_new_tokens=5), "4 chains (other settings)")]:
        capsys.readouterr()
        FaultAfter(monkeypatch, generation, "generate_batch", after=1)
        with pytest.raises(KeyboardInterrupt):
            generate_chains(run, tiny_llama, batch_size=1, **options)
        assert run.chains.read_bytes() == finished
        assert read_complete(run.chains).height == 4  # complete, as it was
        n = options["limit"]
        done = 5 if n == 6 else 1
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"nnsteer: {run.chains} still holds its {held}; {done} of this run's {n} chains are "
            "done, kept for a rerun with the same options")
        assert pl.read_parquet(pending).height == done

    # --limit 2 at max_new_tokens 5 continues from its pending chain, then replaces the table.
    fault = FaultAfter(monkeypatch, generation, "generate_batch")
    table = generate_chains(run, tiny_llama, limit=2, max_new_tokens=5, batch_size=1)
    assert fault.calls == 1 and not pending.exists()
    assert table["chain_id"].to_list() == ["t0", "t1"] and table["output_ids"].list.len().max() <= 5
    assert pl.read_parquet(run.chains).equals(table) and read_metadata(run.chains)["complete"]


def test_a_damaged_pending_file_is_discarded(tiny_llama, tmp_path, capsys):
    run = RunDir(tmp_path)
    write_tasks(run, n_train=2)
    pending = tmp_path / ".chains.parquet.pending"
    pending.write_bytes(b"PAR1 not a table")
    assert generate_chains(run, tiny_llama, max_new_tokens=3).height == 2
    assert f"nnsteer: {pending}: damaged, discarded" in capsys.readouterr().err
    assert not pending.exists()
