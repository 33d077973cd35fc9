"""Evaluation of steered chains: token shares against hand counts, statistics against
hand-computed examples, the chart's fields, the CLI and its bad-input messages."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from nnsteer.annotation.stage import annotate_chains
from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.evaluation.paired import MIN_TASKS_FOR_INTERVAL
from nnsteer.evaluation.shares import steering_chart, summarise, summary_text
from nnsteer.evaluation.stage import evaluate
from nnsteer.runs.store import RunDir, read_metadata, write_parquet
from nnsteer.stats import bootstrap_interval
from nnsteer.vectors.extract import VectorSet, save_vectors

# Each chain is a list of (label or None, text) segments. Segments are tokenised one by one
# and concatenated, so the tokens of a segment cover exactly its characters and the hand
# count of a label is the number of tokens its segments encode to.
BASELINE = [
    ("initializing", "The problem asks for x."),
    ("deduction", " So x equals 4."),
    (None, "\n\n"),
    ("backtracking", " Wait, let me check that again."),
    ("uncertainty-estimation", " I am not sure about this."),
    ("example-testing", " Try x = 2: 2 + 2 = 4."),
]
POSITIVE = [
    ("backtracking", "Wait, no. Let me go back and recheck the first step."),
    ("deduction", " Then x is 4."),
    ("backtracking", " Hmm, wait, that was wrong."),
]
NEGATIVE = [
    ("initializing", "We need x."),
    ("deduction", " Since 2x = 8, x = 4, and so the answer is 4."),
    ("example-testing", " Check: 2 times 4 is 8."),
]
RANDOM = [
    ("deduction", "Then x = 4 because 2x = 8."),
    ("backtracking", " Wait."),
    ("summarizing", " In short, x is 4."),  # an invented label: status unknown-label, not counted
]
CONDITIONS = {  # chain suffix: (behaviour, direction, vector, segments)
    "base": (None, "none", "none", BASELINE),
    "pos": ("backtracking", "positive", "behaviour", POSITIVE),
    "neg": ("backtracking", "negative", "behaviour", NEGATIVE),
    "rnd": ("backtracking", "positive", "random", RANDOM),
}
TASKS = ("t0", "t1", "t2")


def _ids(tokenizer, segments):
    return [tokenizer.encode(text, add_special_tokens=False) for _, text in segments]


def _hand_counts(tokenizer, segments):
    counts: dict[str, int] = {}
    for (label, _), ids in zip(segments, _ids(tokenizer, segments)):
        if label is not None and label != "summarizing":
            counts[label] = counts.get(label, 0) + len(ids)
    return counts


def _chain_and_spans(tokenizer, chain_id, task_id, condition):
    behaviour, direction, vector, segments = CONDITIONS[condition]
    ids = [i for seg in _ids(tokenizer, segments) for i in seg]
    response = tokenizer.decode(ids, skip_special_tokens=True)
    assert response == "".join(text for _, text in segments)
    chain = {
        "chain_id": chain_id, "task_id": task_id, "model": "smollm2-135m",
        "prompt_ids": tokenizer.encode("Solve 2x = 8."), "output_ids": ids, "response": response,
        "thinking_start": 0, "thinking_end": len(response), "finish_reason": "eos",
        "behaviour": behaviour, "direction": direction,
        "coefficient": 0.0 if direction == "none" else 1.0, "layers": [] if direction == "none" else [3],
        "split": "eval", "vector": vector,
    }
    spans, start = [], 0
    for label, text in segments:
        end = start + len(text)
        if label is not None:
            status = "unknown-label" if label == "summarizing" else "ok"
            spans.append({"chain_id": chain_id, "label": label, "start": start, "end": end,
                          "text": text, "annotator": "rules", "status": status})
        start = end
    return chain, spans


def _write_run(root, tokenizer, conditions=tuple(CONDITIONS), tasks=TASKS) -> RunDir:
    run = RunDir(root)
    chains, spans = [], []
    for task in tasks:
        for condition in conditions:
            chain, chain_spans = _chain_and_spans(tokenizer, f"{task}-{condition}", task, condition)
            chains.append(chain)
            spans += chain_spans
    write_parquet(pl.DataFrame(chains), run.steered, {"stage": "steer", "model": {"model": "smollm2-135m"}})
    # Annotate once for real (the file's metadata is then what `annotate` reuses), then
    # put the hand-placed spans in its place.
    annotate_chains(run, annotator="rules", source="steered", tokenizer=tokenizer)
    write_parquet(pl.DataFrame(spans), run.steered_annotations, read_metadata(run.steered_annotations))
    training = pl.DataFrame(spans[:1]).with_columns(annotator=pl.lit("rules"))
    write_parquet(training, run.annotations, {"stage": "annotate", "options": {"annotator": "rules"}})
    return run


# --- token counts -------------------------------------------------------------------


@pytest.mark.parametrize("denominator", ["labelled", "steered"])
def test_fractions_per_chain_match_hand_counts(tmp_path, tokenizer, denominator):
    run = _write_run(tmp_path, tokenizer)
    evaluation = evaluate(run, denominator=denominator, tokenizer=tokenizer, n_boot=200)
    counted = (
        ("initializing", "deduction", "adding-knowledge", "example-testing",
         "uncertainty-estimation", "backtracking")
        if denominator == "labelled" else
        ("backtracking", "uncertainty-estimation", "example-testing", "adding-knowledge")
    )
    assert evaluation.height == len(TASKS) * len(CONDITIONS) * len(counted)
    for condition, (_, _, _, segments) in CONDITIONS.items():
        hand = _hand_counts(tokenizer, segments)
        total = sum(hand.get(label, 0) for label in counted)
        rows = evaluation.filter(pl.col("chain_id") == f"t1-{condition}")
        assert sorted(rows["label"]) == sorted(counted)
        for row in rows.iter_rows(named=True):
            assert row["tokens"] == hand.get(row["label"], 0), (condition, row["label"])
            assert row["total"] == total
            assert row["fraction"] == pytest.approx(hand.get(row["label"], 0) / total)
            assert row["denominator"] == denominator
    baseline = evaluation.filter(pl.col("direction") == "none")
    assert baseline["behaviour"].is_null().all() and baseline.height == len(TASKS) * len(counted)

    meta = read_metadata(run.evaluation)
    assert meta["stage"] == "evaluate" and meta["options"]["annotator"] == "rules"
    assert meta["options"]["denominator"] == denominator and meta["model"] == {"model": "smollm2-135m"}
    assert ("labelled" if denominator == "labelled" else "four steered") in meta["unit"]
    html = (run.charts / "steering.html").read_text()
    assert "vega" in html and 'src="http' not in html  # self-contained
    assert "backtracking: baseline" in (run.root / "summary.txt").read_text()


# --- statistics ---------------------------------------------------------------------


def test_bootstrap_interval_hand_examples():
    assert bootstrap_interval([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3))
    # Means of resamples of {0, 1}: 0, 0.5, 1 with probability 1/4, 1/2, 1/4.
    assert bootstrap_interval([0.0, 1.0], n_boot=4000) == (0.0, 1.0)
    # Of {-0.2, -0.1, 0}: the extremes each have probability 1/27 > 2.5%.
    low, high = bootstrap_interval([-0.1, 0.0, -0.2], n_boot=4000)
    assert (low, high) == (pytest.approx(-0.2), pytest.approx(0.0))
    assert bootstrap_interval([1.0, 2.0, 4.0], seed=3) == bootstrap_interval([1.0, 2.0, 4.0], seed=3)
    assert all(math.isnan(bound) for bound in bootstrap_interval([]))


def _evaluation_rows(shares: dict[tuple[str, str], float | None]) -> pl.DataFrame:
    """A hand-made evaluation frame: share of backtracking per (task, condition)."""
    kinds = {"base": (None, "none", "none", 0.0), "pos": ("backtracking", "positive", "behaviour", 1.0),
             "neg": ("backtracking", "negative", "behaviour", 1.0),
             "rnd": ("backtracking", "positive", "random", 1.0)}
    rows = []
    for (task, kind), share in shares.items():
        behaviour, direction, vector, coefficient = kinds[kind]
        rows.append({"chain_id": f"{task}-{kind}", "task_id": task, "behaviour": behaviour,
                     "direction": direction, "vector": vector, "coefficient": coefficient,
                     "label": "backtracking", "tokens": 0, "total": 0 if share is None else 10,
                     "fraction": share, "denominator": "labelled"})
    return pl.DataFrame(rows)


HAND = {
    ("t0", "base"): 0.1, ("t1", "base"): 0.2, ("t2", "base"): 0.3,
    ("t0", "pos"): 0.3, ("t1", "pos"): 0.4, ("t2", "pos"): 0.5,      # +0.2 on every task
    ("t0", "neg"): 0.0, ("t1", "neg"): 0.2, ("t2", "neg"): 0.1,      # -0.1, 0, -0.2
    ("t0", "rnd"): 0.1, ("t1", "rnd"): 0.2, ("t2", "rnd"): 0.3,      # unchanged
    ("t3", "pos"): None,                                             # no labelled token
}


def test_summary_numbers_hand_computed():
    summary = summarise(_evaluation_rows(HAND), n_boot=4000, seed=0, min_tasks=2)
    rows = {(r["direction"], r["vector"]): r for r in summary.iter_rows(named=True)}
    assert list(summary["direction"]) == ["none", "positive", "negative", "positive"]
    base, pos = rows["none", "none"], rows["positive", "behaviour"]
    neg, rnd = rows["negative", "behaviour"], rows["positive", "random"]
    assert base["mean"] == pytest.approx(0.2) and base["n_tasks"] == 3 and base["diff"] is None
    assert base["ci_low"] == pytest.approx(0.1) and base["ci_high"] == pytest.approx(0.3)
    assert pos["mean"] == pytest.approx(0.4) and pos["n_pairs"] == 3 and pos["n_unlabelled"] == 1
    assert pos["diff"] == pytest.approx(0.2)
    assert pos["diff_low"] == pytest.approx(0.2) and pos["diff_high"] == pytest.approx(0.2)
    assert neg["mean"] == pytest.approx(0.1) and neg["diff"] == pytest.approx(-0.1)
    assert (neg["diff_low"], neg["diff_high"]) == (pytest.approx(-0.2), pytest.approx(0.0))
    assert rnd["diff"] == pytest.approx(0.0) and rnd["diff_low"] == rnd["diff_high"] == pytest.approx(0.0)
    assert set(summary["unit"]) == {"share of labelled tokens"}

    text = summary_text(summary)
    assert "Unit: share of labelled tokens" in text
    assert "backtracking: baseline 20.0% [10.0, 30.0] (3 tasks)" in text
    assert "positive ×1: 40.0% [30.0, 50.0]; +20.0 pp [+20.0, +20.0] vs baseline over 3 tasks: raised" in text
    assert "1 chain(s) with no labelled token left out" in text
    # -0.1 pp [-0.2, 0.0]: the interval reaches 0, so no claim that negative steering lowered it.
    assert "negative ×1: 10.0%" in text and "-10.0 pp [-20.0, +0.0]" in text
    assert "no clear change (interval includes 0)" in text
    assert "random positive ×1" in text and "no clear change, as a control should" in text
    assert "Positive steering raised the target behaviour (Holm-adjusted p < 0.05) in 1 of 1" in text
    assert "Negative steering lowered the target behaviour (Holm-adjusted p < 0.05) in 0 of 1" in text
    assert "Holm-adjusted across all 3 steered conditions" in text


def test_too_few_tasks_give_means_without_intervals_or_verdicts():
    summary = summarise(_evaluation_rows(HAND), n_boot=200)  # 3 tasks < MIN_TASKS_FOR_INTERVAL
    assert MIN_TASKS_FOR_INTERVAL == 8
    pos = summary.filter((pl.col("direction") == "positive") & (pl.col("vector") == "behaviour"))
    pos = pos.row(0, named=True)
    assert pos["diff"] == pytest.approx(0.2) and pos["diff_low"] is None and pos["ci_low"] is None
    text = summary_text(summary)
    assert "positive ×1: 40.0%; +20.0 pp vs baseline over 3 tasks: too few tasks for an interval" in text
    assert "interval excludes 0" not in text and "raised the target" not in text
    assert "Intervals and verdicts need at least 8 tasks" in text
    eight = {**{(f"t{i}", "base"): 0.2 for i in range(8)},
             **{(f"t{i}", "pos"): 0.3 + 0.01 * i for i in range(8)}}
    assert "raised (interval excludes 0; Holm-adjusted p" in summary_text(summarise(_evaluation_rows(eight)))


def test_summary_flags_a_random_control_that_moves_and_averages_chains_of_a_task():
    shares = dict(HAND)
    shares["t0", "rnd"], shares["t1", "rnd"], shares["t2", "rnd"] = 0.5, 0.6, 0.7
    evaluation = _evaluation_rows(shares)
    # A second baseline chain of t0 (share 0.3): t0's baseline becomes (0.1 + 0.3) / 2.
    evaluation = pl.concat([evaluation, evaluation.filter(pl.col("chain_id") == "t0-base")
                            .with_columns(chain_id=pl.lit("t0-base-2"), fraction=pl.lit(0.3))])
    summary = summarise(evaluation, n_boot=500, min_tasks=2)
    base = summary.filter(pl.col("direction") == "none").row(0, named=True)
    assert base["mean"] == pytest.approx((0.2 + 0.2 + 0.3) / 3)
    assert "the random control raised it too" in summary_text(summary)


def test_chart_fields_and_unit():
    summary = summarise(_evaluation_rows(HAND), n_boot=200, min_tasks=2)
    spec = steering_chart(summary).to_dict()
    bars, ticks, intervals = spec["layer"]
    assert bars["mark"]["type"] == "bar" and intervals["mark"]["type"] == "errorbar"
    assert ticks["mark"]["type"] == "tick" and ticks["encoding"]["y"]["field"] == "share"
    enc = bars["encoding"]
    assert enc["x"]["field"] == "behaviour" and enc["xOffset"]["field"] == "condition"
    assert enc["color"]["field"] == "condition" and enc["y"]["field"] == "share"
    assert enc["y"]["title"] == "share of labelled tokens (%)"
    assert intervals["encoding"]["y"]["field"] == "share_low"
    assert intervals["encoding"]["y2"]["field"] == "share_high"
    values = next(iter(spec["datasets"].values()))
    by_condition = {v["condition"]: v for v in values}
    assert set(by_condition) == {"baseline", "positive", "negative", "random positive"}
    assert by_condition["positive"]["share"] == pytest.approx(40.0)
    assert by_condition["baseline"]["share_low"] == pytest.approx(10.0)


# --- CLI and bad input ---------------------------------------------------------------


def test_cli_writes_outputs_and_prints_summary(tmp_path, tokenizer):
    run = _write_run(tmp_path / "run", tokenizer)
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "evaluate", "--n-boot", "200",
                                      "--denominator", "steered"])
    assert result.exit_code == 0, result.output
    assert "Unit: share of tokens with one of the four steered labels" in result.output
    assert "backtracking: baseline" in result.output
    assert pl.read_parquet(run.evaluation)["denominator"].unique().to_list() == ["steered"]
    assert (run.charts / "steering.html").exists()


def test_summary_names_the_steered_behaviours_that_got_no_vector(tmp_path, tokenizer):
    run = _write_run(tmp_path / "run", tokenizer)
    evaluate(run, n_boot=50)
    assert "Not steered" not in (run.root / "summary.txt").read_text()  # no vectors file
    counts = {"backtracking": {"chains": 1, "spans": 1, "samples": 1, "positions": 20},
              "initializing": {"chains": 0, "spans": 0, "samples": 0, "positions": 0}}
    meta = {"skipped_labels": ["initializing", "backtracking"], "counts": counts, "min_spans": 10}
    save_vectors(VectorSet({"deduction": torch.zeros(2, 4), "overall": torch.zeros(2, 4)}, meta),
                 run.vectors)
    evaluate(run, n_boot=50)
    assert (run.root / "summary.txt").read_text().endswith(
        "\nNot steered: no vector for initializing: no usable span in annotations.parquet; nor "
        "for backtracking (1 span): fewer spans than min_spans = 10 in annotations.parquet; "
        "backtracking cannot be steered.\n")


def _cli_error(run_root, *args):
    result = CliRunner().invoke(cli, ["--run-dir", str(run_root), "evaluate", *args])
    assert result.exit_code == 2, result.output
    return result.output


def test_missing_steered_chains_says_run_steer(tmp_path):
    assert f"run `nnsteer --run-dir {tmp_path} steer` first" in _cli_error(tmp_path)


def test_empty_eval_set(tmp_path, tokenizer):
    run = _write_run(tmp_path, tokenizer)
    write_parquet(pl.read_parquet(run.steered).head(0), run.steered, {})
    assert "no chains: the eval split had no tasks" in _cli_error(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda df: df.with_columns(direction=pl.col("direction").replace("positive", "up")),
     "row 1 (chain t0-pos): direction 'up' is not one of none, positive, negative"),
    (lambda df: df.filter(pl.col("direction") != "none"), "no baseline chains"),
    (lambda df: df.filter(pl.col("direction") == "none"), "only baseline chains"),
])
def test_bad_steered_rows(tmp_path, tokenizer, change, message):
    run = _write_run(tmp_path, tokenizer)
    write_parquet(change(pl.read_parquet(run.steered)), run.steered, {})
    assert message in _cli_error(tmp_path)


def test_bad_input_leaves_outputs_intact(tmp_path, tokenizer):
    run = _write_run(tmp_path, tokenizer)
    evaluate(run, tokenizer=tokenizer, n_boot=100)
    before = run.evaluation.read_bytes()
    chains = pl.read_parquet(run.steered).with_columns(
        behaviour=pl.when(pl.col("direction") == "negative").then(pl.lit("deduction"))
        .otherwise(pl.col("behaviour")))
    write_parquet(chains, run.steered, {})
    with pytest.raises(BadInput, match=r"row 2 \(chain t0-neg\): behaviour 'deduction'"):
        evaluate(run, tokenizer=tokenizer, denominator="steered")
    assert run.evaluation.read_bytes() == before
    with pytest.raises(BadInput, match="--denominator must be one of"):
        evaluate(run, tokenizer=tokenizer, denominator="sentences")
    with pytest.raises(BadInput, match="--annotator 'gpt'"):
        evaluate(run, tokenizer=tokenizer, annotator="gpt")
    with pytest.raises(BadInput, match="--grader 'gpt-4o': expected 'offline' or 'openai:<model>'"):
        evaluate(run, tokenizer=tokenizer, grader="gpt-4o")
    assert run.evaluation.read_bytes() == before


def test_incomplete_steered_chains_are_refused(tmp_path, tokenizer):
    run = _write_run(tmp_path, tokenizer)
    evaluate(run, tokenizer=tokenizer, n_boot=100)
    before = run.evaluation.read_bytes()
    unfinished = {**read_metadata(run.steered), "complete": False, "chains_done": 4,
                  "chains_planned": 20}
    write_parquet(pl.read_parquet(run.steered).head(4), run.steered, unfinished)
    output = _cli_error(tmp_path)
    assert output == (f"nnsteer: error: {run.steered} is incomplete (4 of 20 chains): "
                      "rerun `nnsteer steer` to finish it\n")
    assert run.evaluation.read_bytes() == before


def test_annotator_comes_from_training_or_the_option(tmp_path, tokenizer):
    run = _write_run(tmp_path, tokenizer)
    run.annotations.unlink()
    with pytest.raises(BadInput, match="pass --annotator, or run `nnsteer annotate`"):
        evaluate(run, tokenizer=tokenizer)
    evaluate(run, tokenizer=tokenizer, annotator="rules", n_boot=100)
    assert read_metadata(run.evaluation)["options"]["annotator"] == "rules"


def test_unannotated_chains_are_annotated_and_the_rest_kept(tmp_path, tokenizer):
    run = _write_run(tmp_path, tokenizer)
    hand = pl.read_parquet(run.steered_annotations)
    write_parquet(hand.filter(pl.col("chain_id") != "t2-neg"), run.steered_annotations,
                  read_metadata(run.steered_annotations))
    evaluate(run, tokenizer=tokenizer, n_boot=100)
    after = pl.read_parquet(run.steered_annotations)
    assert after.filter(pl.col("chain_id") == "t2-neg").height > 0  # the rules annotator ran
    kept = after.filter(pl.col("chain_id") != "t2-neg").sort("chain_id", "start")
    assert kept.select(hand.columns).equals(hand.filter(pl.col("chain_id") != "t2-neg")
                                            .sort("chain_id", "start").cast(kept.select(hand.columns).schema))


def test_wrong_tokenizer_is_caught(tmp_path, tokenizer):
    run = _write_run(tmp_path, tokenizer)
    chains = pl.read_parquet(run.steered).with_columns(response=pl.col("response") + " extra")
    write_parquet(chains, run.steered, {})
    with pytest.raises(BadInput, match="response is not the decoding of output_ids"):
        evaluate(run, tokenizer=tokenizer)


# --- with the steer stage's real output ----------------------------------------------


def test_steer_then_evaluate_on_a_tiny_model(tmp_path, tiny_llama):
    import torch

    from nnsteer.runs.store import write_json
    from nnsteer.steer.chains import steer_chains
    from nnsteer.vectors.extract import VectorSet, save_vectors

    run = RunDir(tmp_path)
    prompts = ["Is 91 a prime number? Think step by step.", "Wait, what is 12 times 12?"]
    write_parquet(pl.DataFrame({"task_id": ["e0", "e1"], "category": ["Mathematical Logic"] * 2,
                                "prompt": prompts, "split": ["eval"] * 2, "source": ["file"] * 2}),
                  run.tasks, {})
    generator = torch.Generator().manual_seed(0)
    save_vectors(VectorSet({label: torch.randn(4, 64, generator=generator)
                            for label in ("backtracking", "overall")}), run.vectors)
    write_json(run.layers, {"backtracking": {"vector_layer": 2, "layers": [2], "coefficient": 4.0}})
    steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=12)

    evaluation = evaluate(run, annotator="rules", tokenizer=tiny_llama.tokenizer, n_boot=100)
    conditions = {(None, "none", "none"), ("backtracking", "positive", "behaviour"),
                  ("backtracking", "negative", "behaviour"), ("backtracking", "positive", "random"),
                  ("backtracking", "negative", "random")}
    assert set(evaluation.select("behaviour", "direction", "vector").iter_rows()) == conditions
    assert evaluation.height == 2 * len(conditions) * 6
    summary = summarise(evaluation, n_boot=100)
    assert summary.height == len(conditions) and set(summary["behaviour"]) == {"backtracking"}


def test_every_chain_gets_its_costs(tmp_path, tiny_llama, capsys):
    """A real steer on a tiny model, then evaluate with the model: every cost column on
    every chain's rows, equal to the per-chain functions; the summary pairs them."""
    import torch

    from nnsteer.evaluation.costs import summarise_costs
    from nnsteer.evaluation.grader import grade_offline
    from nnsteer.evaluation.metrics import (
        CHAIN_METRICS,
        answer_text,
        nll_unsteered,
        text_costs,
    )
    from nnsteer.runs.store import write_json
    from nnsteer.steer.chains import steer_chains
    from nnsteer.vectors.extract import VectorSet, save_vectors

    run = RunDir(tmp_path)
    prompts = ["Is 91 a prime number? Think step by step.", "Wait, what is 12 times 12?",
               "Name a colour."]
    write_parquet(pl.DataFrame({"task_id": ["e0", "e1", "e2"], "category": ["Mathematical Logic"] * 3,
                                "prompt": prompts, "answer": ["No", "144", None],
                                "split": ["eval"] * 3, "source": ["file"] * 3}), run.tasks, {})
    generator = torch.Generator().manual_seed(0)
    save_vectors(VectorSet({label: torch.randn(4, 64, generator=generator)
                            for label in ("backtracking", "overall")}), run.vectors)
    write_json(run.layers, {"backtracking": {"vector_layer": 2, "layers": [2], "coefficient": 4.0}})
    steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=12)
    capsys.readouterr()
    evaluation = evaluate(run, annotator="rules", tokenizer=tiny_llama.tokenizer, n_boot=100,
                          lm=tiny_llama, batch_size=3)
    assert "of 3, 1 have no reference answer" in capsys.readouterr().err
    chains = pl.read_parquet(run.steered).to_dicts()
    nll = nll_unsteered(tiny_llama, chains)
    per_chain = evaluation.unique("chain_id").sort("chain_id")
    assert per_chain.height == len(chains) == 15
    for chain, value in zip(chains, nll):
        row = per_chain.filter(pl.col("chain_id") == chain["chain_id"]).row(0, named=True)
        assert (row["reasoning_tokens"], row["closed_thinking"], row["answered"], row["repetition"],
                row["compression_ratio"]) == tuple(vars(text_costs(chain, tiny_llama.tokenizer)).values())
        assert row["nll_unsteered"] == pytest.approx(value, abs=1e-4)
        reference = {"e0": "No", "e1": "144", "e2": None}[chain["task_id"]]
        expected = grade_offline(answer_text(chain), reference) if answer_text(chain) else (
            None if reference is None else False)
        assert row["correct"] is expected and row["grader"] == "offline"
    assert evaluation.filter(pl.col("nll_unsteered").is_null()).height == 0
    costs = summarise_costs(evaluation, n_boot=100)
    assert set(costs["metric"]) == {"correct", *CHAIN_METRICS}
    meta = read_metadata(run.evaluation)
    assert meta["repetition_ngram"] == 4 and len(meta["costs"]) == costs.height
    assert meta["options"]["grader"] == "offline"
    text = (run.root / "summary.txt").read_text()
    assert "Costs: paired differences" in text and "NLL under the unsteered model" in text

    # The report's example chains come from this real steer: the unsteered chain (vector
    # "none") and both directions, each with its cost figures.
    from nnsteer.report.examples import example_chains_section
    from nnsteer.report.steering import costs_section

    body = example_chains_section(run).body
    assert body.count("<tr>") == 3 and "<th>unsteered<div" in body
    assert "backtracking, positive<div" in body and "backtracking, negative<div" in body
    assert body.count("NLL unsteered: ") == 3 and "repeated 4-grams: " in body
    costs = costs_section(run)
    assert costs.spec is not None and "NLL under the unsteered model" in costs.body
    assert "backtracking: baseline" in (run.root / "summary.txt").read_text()


def test_an_answer_the_grader_cannot_read_does_not_stop_evaluate(tmp_path, tokenizer):
    """A chain whose answer is a thousand minus signs and a digit: evaluation.parquet is
    written, and the chain gets a verdict (the number written last is -6, not 6)."""
    run = _write_run(tmp_path, tokenizer, conditions=("base", "pos"))
    chains = pl.read_parquet(run.steered)
    response = chains["response"][0] + "\n\nThe answer is " + "-" * 1000 + "6"
    ids = tokenizer.encode(response, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == response
    first = pl.Series([True] + [False] * (chains.height - 1))
    chains = chains.with_columns(
        response=pl.when(first).then(pl.lit(response)).otherwise(pl.col("response")),
        output_ids=pl.when(first).then(pl.lit(ids, dtype=pl.List(pl.Int64)))
        .otherwise(pl.col("output_ids")),
        finish_reason=pl.lit("eos"))
    write_parquet(chains, run.steered, read_metadata(run.steered))
    write_parquet(pl.DataFrame({"task_id": list(TASKS), "category": ["Mathematical Logic"] * 3,
                                "prompt": ["Solve 2x = 8."] * 3, "answer": ["6"] * 3,
                                "split": ["eval"] * 3, "source": ["file"] * 3}), run.tasks, {})
    evaluation = evaluate(run, tokenizer=tokenizer, n_boot=50)
    assert run.evaluation.exists()
    verdict = evaluation.filter(pl.col("chain_id") == chains["chain_id"][0])["correct"]
    assert verdict.unique().to_list() == [False]
