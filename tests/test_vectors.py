"""Steering vectors of both variants against a reference computed from hidden states by hand."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import FaultAfter, make_tiny
from test_generation import write_tasks
from test_residuals import block_outputs

from nnsteer.annotation.stage import annotate_chains
from nnsteer.cli import cli
from nnsteer.errors import BadInput
from nnsteer.generation.chains import generate_chains
from nnsteer.labels import LABELS
from nnsteer.runs.store import RunDir, provenance, read_metadata, write_parquet
from nnsteer.vectors import residuals
from nnsteer.vectors.extract import (
    VectorSet,
    cosine_similarity,
    extract_vectors,
    load_vectors,
    read_inputs,
    save_vectors,
)

#: Reasoning with marked spans: ``{label}text{/}``. Boundaries fall inside words on purpose,
#: one span is longer than the released code's 11-position window, two touch.
MARKED = [
    "{initializing}Okay, so I need to find x.{/} {deduction}If 2x = 8 then x = 4.{/}"
    " {backtracking}Wait, let me check that again.{/}",
    "Hmm. {uncertainty-estimation}I am not sure this is right{/}{uncertainty-estimation},"
    " maybe{/} so I will {example-testing}try x = 3: 2*3 = 6, which is not 8, and then x = 5:"
    " 2*5 = 10, also not 8{/}.",
    "{deduction}The ball costs five cents because the bat costs one dollar more{/}. Alterna"
    "{backtracking}tively, wait{/} {adding-knowledge}a dollar has 100 cents{/}.",
    "{adding-knowledge}Newton's second law says F = ma.{/} {deduction}So a = F/m = 2.{/}",
    "Short {backtracking}But{/} end.",
    "{deduction}Each step doubles the count, so after ten steps there are 1024 of them{/}"
    " and {uncertainty-estimation}I think{/} {deduction}that is final{/}.",
    "Let me see. {example-testing}Take n = 1{/}.",
    "{initializing}We are asked for the sum.{/} {deduction}1 + 2 + 3 = 6{/} {backtracking}hmm"
    ", no{/}{backtracking} wait{/}.",
    "Nothing annotated here except {deduction}this{/}.",
]
ANSWER = "\n</think>\n\nThe answer is 4."


@dataclass
class Chain:
    chain_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    response: str
    reasoning: tuple[int, int]
    spans: list[tuple[str, int, int]]


def parse_marked(marked: str) -> tuple[str, list[tuple[str, int, int]]]:
    """``{label}text{/}`` markup to plain text and ``(label, start, end)`` spans."""
    text, spans, pos = "", [], 0
    for match in re.finditer(r"\{([a-z-]+)\}(.*?)\{/\}", marked):
        text += marked[pos : match.start()]
        spans.append((match[1], len(text), len(text) + len(match[2])))
        text += match[2]
        pos = match.end()
    return text + marked[pos:], spans


def make_chains(tokenizer, thinking: bool) -> list[Chain]:
    chains = []
    for i, marked in enumerate(MARKED):
        reasoning, spans = parse_marked(marked)
        response = reasoning + ANSWER if thinking else reasoning
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Task {i}: solve it."}], tokenize=False, add_generation_prompt=True
        )
        chains.append(Chain(
            chain_id=f"c{i}",
            prompt_ids=tokenizer(prompt, add_special_tokens=False)["input_ids"],
            output_ids=tokenizer(response, add_special_tokens=False)["input_ids"],
            response=response,
            reasoning=(0, len(reasoning)),
            spans=spans,
        ))
    return chains


def write_run(root: Path, model: str, chains: list[Chain], annotations_model: str | None = None) -> RunDir:
    """chains.parquet and annotations.parquet as the generate and annotate stages write them,
    plus rows extraction must ignore: a steered chain, an unaligned span, an unknown label."""
    run = RunDir(root)
    rows = [dict(chain_id=c.chain_id, task_id=f"t{i}", model=model, prompt_ids=c.prompt_ids,
                 output_ids=c.output_ids, response=c.response, thinking_start=c.reasoning[0],
                 thinking_end=c.reasoning[1], direction="none") for i, c in enumerate(chains)]
    rows.append({**rows[0], "chain_id": "steered", "direction": "positive"})
    meta = {"model": model}
    write_parquet(pl.DataFrame(rows), run.chains, provenance("generate", {}, meta))
    spans = [dict(chain_id=c.chain_id, label=label, start=start, end=end,
                  text=c.response[start:end], annotator="test", status="ok")
             for c in chains for label, start, end in c.spans]
    spans += [
        dict(chain_id="c0", label="deduction", start=-1, end=-1, text="lost", annotator="test",
             status="unaligned"),
        dict(chain_id="c1", label="summarizing", start=0, end=5, text="Hmm. ", annotator="test",
             status="unknown-label"),
        dict(chain_id="steered", label="deduction", start=0, end=5, text="Okay,", annotator="test",
             status="ok"),
    ]
    write_parquet(pl.DataFrame(spans), run.annotations,
                  provenance("annotate", {}, {"model": annotations_model or model}))
    return run


def token_ranges(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Character range of each token: ASCII byte-level BPE decodes token by token."""
    ends, total = [], 0
    for token in ids:
        total += len(tokenizer.decode([token]))
        ends.append(total)
    return list(zip([0] + ends[:-1], ends))


def reference_vectors(lm, chains: list[Chain], variant: str) -> dict[str, torch.Tensor]:
    """The vectors of METHOD.md written out plainly, one chain at a time, in float64."""
    label_means: dict[str, list[torch.Tensor]] = {label: [] for label in LABELS}
    overall_means = []
    for chain in chains:
        acts = block_outputs(lm.hf_model, chain.prompt_ids + chain.output_ids)  # [L, T, H]
        ranges = token_ranges(lm.tokenizer, chain.output_ids)
        assert ranges[-1][1] == len(chain.response)
        p = len(chain.prompt_ids)

        def covered(start: int, end: int) -> list[int]:
            return [p + i for i, (s, e) in enumerate(ranges) if s < end and e > start]

        if variant == "paper":
            for label in LABELS:
                positions = set()
                for span_label, start, end in chain.spans:
                    if span_label == label:
                        tokens = covered(start, end)
                        positions |= set(tokens) | {tokens[0] - 1}
                if positions:
                    label_means[label].append(acts[:, sorted(positions)].mean(dim=1))
            overall_means.append(acts[:, covered(*chain.reasoning)].mean(dim=1))
        else:  # the authors' train_vectors.py: token range [start, end) of each span
            bounds = []
            for label, start_char, end_char in chain.spans:
                tokens = covered(start_char, end_char)
                start, end = tokens[0], tokens[-1] + 1
                bounds.append((start, end))
                label_means[label].append(acts[:, start - 1 : min(end - 1, start + 10)].mean(dim=1))
            low, high = min(s for s, _ in bounds), max(e for _, e in bounds)
            overall_means.append(acts[:, low:high].mean(dim=1))
    overall = torch.stack(overall_means).mean(0)
    vectors = {label: torch.stack(means).mean(0) - overall for label, means in label_means.items() if means}
    if variant == "released-code":
        vectors = {label: v * (overall.norm(dim=-1) / v.norm(dim=-1))[:, None] for label, v in vectors.items()}
    return {**vectors, "overall": overall}


def assert_same_vectors(got: VectorSet, want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert list(got.vectors) == list(want)
    for label, vector in want.items():
        assert got.vectors[label].dtype == torch.float32
        torch.testing.assert_close(got.vectors[label].double(), vector, atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def llama_chains(tokenizer) -> list[Chain]:
    return make_chains(tokenizer, thinking=False)


@pytest.mark.parametrize("variant", ["paper", "released-code"])
def test_vectors_match_reference(tmp_path, tiny_model, variant):
    chains = make_chains(tiny_model.tokenizer, thinking=tiny_model.arch.family == "qwen2")
    run = write_run(tmp_path, tiny_model.name, chains)
    vs = extract_vectors(run, tiny_model, variant=variant, batch_size=3)
    assert_same_vectors(vs, reference_vectors(tiny_model, chains, variant))
    assert vs.n_layers == tiny_model.arch.n_layers and vs.d_model == tiny_model.arch.d_model
    assert_same_vectors(load_vectors(run.vectors), reference_vectors(tiny_model, chains, variant))


@pytest.mark.parametrize("variant", ["paper", "released-code"])
def test_batch_size_1_equals_8(tmp_path, tiny_llama, llama_chains, variant):
    run = write_run(tmp_path, tiny_llama.name, llama_chains)
    one = extract_vectors(run, tiny_llama, variant=variant, batch_size=1)
    eight = extract_vectors(run, tiny_llama, variant=variant, batch_size=8)
    assert_same_vectors(eight, {label: v.double() for label, v in one.vectors.items()})


def test_remote_local_equals_local(tmp_path, tokenizer, tiny_llama, llama_chains):
    simulated = make_tiny("llama", tokenizer, remote="local")
    run = write_run(tmp_path, tiny_llama.name, llama_chains)
    local = extract_vectors(run, tiny_llama, variant="released-code", batch_size=4)
    remote = extract_vectors(run, simulated, variant="released-code", batch_size=4)
    for label, vector in local.vectors.items():
        torch.testing.assert_close(remote.vectors[label], vector, atol=0, rtol=0)


def test_metadata_counts_and_skipped_labels(tmp_path, tokenizer, tiny_llama, capfd):
    chains = make_chains(tokenizer, thinking=False)[3:5]  # deduction, adding-knowledge, backtracking
    run = write_run(tmp_path, tiny_llama.name, chains)
    vs = extract_vectors(run, tiny_llama, variant="paper")
    assert ("no vector for initializing, example-testing, uncertainty-estimation: no usable span "
            "in annotations.parquet; example-testing, uncertainty-estimation cannot be steered"
            ) in capfd.readouterr().err  # said by the stage itself, so `nnsteer run` says it too
    meta = read_metadata(run.vectors)
    assert meta == vs.metadata
    assert meta["stage"] == "extract" and meta["options"] == {"variant": "paper", "min_spans": 1}
    assert meta["model"]["model"] == tiny_llama.name
    assert meta["variant"] == "paper" and meta["normalisation"] == "none"
    assert vs.labels == meta["labels"] == ["deduction", "adding-knowledge", "backtracking"]
    assert meta["skipped_labels"] == ["initializing", "example-testing", "uncertainty-estimation"]
    assert meta["counts"]["deduction"] == {"chains": 1, "spans": 1, "samples": 1,
                                           "positions": meta["counts"]["deduction"]["positions"]}
    assert meta["counts"]["overall"]["chains"] == 2
    assert meta["counts"]["initializing"] == {"chains": 0, "spans": 0, "samples": 0, "positions": 0}
    assert all(torch.isfinite(v).all() for v in vs.vectors.values())


def test_min_spans_skips_labels_with_fewer_spans_and_leaves_the_others(tmp_path, tokenizer,
                                                                      tiny_llama, capfd):
    """Spans: backtracking 5, uncertainty 3, initializing / example-testing / adding-knowledge 2."""
    chains = make_chains(tokenizer, thinking=True)
    every = extract_vectors(write_run(tmp_path / "all", tiny_llama.name, chains), tiny_llama)
    capfd.readouterr()
    run = write_run(tmp_path / "three", tiny_llama.name, chains)
    some = extract_vectors(run, tiny_llama, min_spans=3)
    assert some.labels == ["deduction", "uncertainty-estimation", "backtracking"]
    for label in some.labels:
        torch.testing.assert_close(some.vectors[label], every.vectors[label], atol=0, rtol=0)
    assert capfd.readouterr().err.splitlines()[-1] == (
        "nnsteer: no vector for initializing (2 spans), adding-knowledge (2 spans), example-testing "
        "(2 spans): fewer spans than min_spans = 3 in annotations.parquet; adding-knowledge, "
        "example-testing cannot be steered")
    meta = read_metadata(run.vectors)
    assert meta["min_spans"] == 3 and meta["options"] == {"variant": "paper", "min_spans": 3}


def test_min_spans_note_names_both_reasons(tmp_path, tokenizer, tiny_llama, capfd):
    chains = make_chains(tokenizer, thinking=False)[3:5]  # one span each: deduction, adding-knowledge, backtracking
    extract_vectors(write_run(tmp_path, tiny_llama.name, chains), tiny_llama, min_spans=2)
    assert ("no vector for initializing, example-testing, uncertainty-estimation: no usable span "
            "in annotations.parquet; nor for deduction (1 span), adding-knowledge (1 span), backtracking "
            "(1 span): "
            "fewer spans than min_spans = 2 in annotations.parquet; adding-knowledge, "
            "example-testing, uncertainty-estimation, backtracking cannot be steered"
            ) in capfd.readouterr().err


def test_min_spans_below_one_is_refused_by_the_cli(tmp_path):
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "extract", "--min-spans", "0"])
    assert result.exit_code == 2 and "--min-spans" in result.output


def test_touching_spans_count_a_position_once(tmp_path, tokenizer, tiny_llama):
    """Chain c1: two touching uncertainty spans share the second one's preceding token."""
    chains = make_chains(tokenizer, thinking=False)[1:2]
    run = write_run(tmp_path, tiny_llama.name, chains)
    vs = extract_vectors(run, tiny_llama, variant="paper")
    ranges = token_ranges(tokenizer, chains[0].output_ids)
    covered = {i for _, start, end in chains[0].spans if _ == "uncertainty-estimation"
               for i, (s, e) in enumerate(ranges) if s < end and e > start}
    assert vs.metadata["counts"]["uncertainty-estimation"]["positions"] == len(covered) + 1


def test_span_beyond_the_response_writes_nothing(tmp_path, tiny_llama, llama_chains):
    run = write_run(tmp_path, tiny_llama.name, llama_chains)
    save_vectors(VectorSet({"overall": torch.ones(2, 3)}, {"old": True}), run.vectors)
    spans = pl.read_parquet(run.annotations)
    too_far = spans.with_columns(end=pl.when(pl.col("chain_id") == "c4").then(999).otherwise(pl.col("end")))
    write_parquet(too_far, run.annotations, read_metadata(run.annotations))
    with pytest.raises(BadInput, match=r"chain 'c4', span \[\d+, 999\): outside the chain's response"):
        extract_vectors(run, tiny_llama)
    assert load_vectors(run.vectors).metadata == {"old": True}


@pytest.mark.parametrize("problem, message", [
    ("annotations-model", "annotates chains of other/model"),
    ("lm-name", "generated by tiny-llama, but the model is tiny-qwen2"),
    ("variant", "--variant 'mean': expected one of paper, released-code"),
    ("response", "response is not the decoded output_ids"),
    ("unknown-chain", "chain 'ghost' is not in"),
])
def test_bad_input(tmp_path, tiny_llama, tiny_qwen2, llama_chains, problem, message):
    run = write_run(tmp_path, tiny_llama.name, llama_chains,
                    annotations_model="other/model" if problem == "annotations-model" else None)
    if problem == "response":
        chains = pl.read_parquet(run.chains).with_columns(response=pl.col("response") + "!")
        write_parquet(chains, run.chains, read_metadata(run.chains))
    if problem == "unknown-chain":
        spans = pl.read_parquet(run.annotations).with_columns(chain_id=pl.lit("ghost"))
        write_parquet(spans, run.annotations, read_metadata(run.annotations))
    lm = tiny_qwen2 if problem == "lm-name" else tiny_llama
    with pytest.raises(BadInput, match=message):
        extract_vectors(run, lm, variant="mean" if problem == "variant" else "paper")
    assert not run.vectors.exists()


def test_annotations_of_other_chains_are_refused(tmp_path, tiny_llama):
    run = RunDir(tmp_path)
    write_tasks(run, n_train=3)
    generate_chains(run, tiny_llama, max_new_tokens=4)
    annotate_chains(run, annotator="rules", tokenizer=tiny_llama.tokenizer)
    assert read_inputs(run, tiny_llama.name)[0].height == 3
    stale = (f"{run.annotations} was made from other chains than {run.chains}: "
             "rerun `nnsteer annotate`")
    for change in ({"max_new_tokens": 6}, {"max_new_tokens": 6, "limit": 2}):
        generate_chains(run, tiny_llama, **change)  # other responses, then fewer chains
        with pytest.raises(BadInput, match=re.escape(stale)):
            extract_vectors(run, tiny_llama)
        assert not run.vectors.exists()
        annotate_chains(run, annotator="rules", tokenizer=tiny_llama.tokenizer)
        assert read_inputs(run, tiny_llama.name)[0].height == 3 - ("limit" in change)


def test_load_vectors_errors(tmp_path):
    with pytest.raises(BadInput, match=r"not found: run `nnsteer --run-dir \S+ extract` first"):
        load_vectors(tmp_path / "vectors.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BadInput, match="bad.safetensors: damaged or not an nnsteer file"):
        load_vectors(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("across, columns, height", [
    ("labels", ["layer", "label_a", "label_b", "cosine"], 3 * 2 * 2),
    ("layers", ["label", "layer_a", "layer_b", "cosine"], 2 * 3 * 3),
])
def test_cosine_similarity_by_hand(across, columns, height):
    torch.manual_seed(0)
    vectors = {"deduction": torch.randn(3, 5), "backtracking": torch.randn(3, 5), "overall": torch.randn(3, 5)}
    frame = cosine_similarity(VectorSet(vectors), across=across)
    assert frame.columns == columns and frame.height == height
    for row in frame.iter_rows(named=True):
        if across == "labels":
            a, b = vectors[row["label_a"]][row["layer"]], vectors[row["label_b"]][row["layer"]]
        else:
            a, b = vectors[row["label"]][row["layer_a"]], vectors[row["label"]][row["layer_b"]]
        assert row["cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)


def test_cli_extract(tmp_path, tokenizer, llama_chains):
    model_dir = tmp_path / "tiny-model"
    make_tiny("llama", tokenizer).hf_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    run = write_run(tmp_path / "run", str(model_dir), llama_chains)
    args = ["--run-dir", str(run.root), "extract", "--model", str(model_dir), "--device", "cpu",
            "--batch-size", "4", "--variant", "released-code"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "backtracking" in result.stdout and "overall" in result.stdout
    assert "wrote" in result.stdout
    assert load_vectors(run.vectors).metadata["variant"] == "released-code"

    run.vectors.unlink()
    result = CliRunner().invoke(cli, [*args[:3], "--model", "smollm2-135m"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--model" in result.stderr
    assert not run.vectors.exists()


@pytest.mark.embedded
def test_embedded_model_matches_reference(tmp_path, tokenizer):
    from nnsteer.modeling.models import load_model

    lm = load_model("smollm2-135m", device="cpu", dtype="float32")
    chains = make_chains(tokenizer, thinking=False)[:2]
    run = write_run(tmp_path, lm.name, chains)
    vs = extract_vectors(run, lm, variant="paper", batch_size=4)
    want = reference_vectors(lm, chains, "paper")
    scale = max(v.abs().max().item() for v in want.values())
    assert_same_vectors(vs, want, atol=1e-5 * scale)


# --------------------------------------------------------------------------- resuming


def interrupted_extract(root: Path, lm, chains, monkeypatch, after: int, **options) -> RunDir:
    """A run directory whose extraction stopped after ``after`` batches."""
    run = write_run(root, lm.name, chains)
    FaultAfter(monkeypatch, residuals, "_reduce_batches", after)
    with pytest.raises(KeyboardInterrupt):
        extract_vectors(run, lm, **options)
    assert run.partial("extract").is_file() and not run.vectors.exists()
    return run


def test_interrupted_extract_resumes_bit_identically(tmp_path, tiny_llama, llama_chains,
                                                     monkeypatch, capsys):
    reference = extract_vectors(write_run(tmp_path / "ref", tiny_llama.name, llama_chains),
                                tiny_llama, batch_size=2)  # 9 chains: 5 batches
    run = interrupted_extract(tmp_path / "run", tiny_llama, llama_chains, monkeypatch, 3,
                              batch_size=2)
    capsys.readouterr()
    resumed = FaultAfter(monkeypatch, residuals, "_reduce_batches")
    vs = extract_vectors(run, tiny_llama, batch_size=2)
    assert resumed.calls == 2  # batches 4 and 5 only
    assert "extract: resuming at batch 4/5" in capsys.readouterr().err
    assert list(vs.vectors) == list(reference.vectors)
    assert all(torch.equal(vs.vectors[label], v) for label, v in reference.vectors.items())
    assert all(torch.equal(load_vectors(run.vectors).vectors[label], v)
               for label, v in reference.vectors.items())
    assert not run.partial("extract").exists()


@pytest.mark.parametrize("change", [{"variant": "released-code"}, {"batch_size": 3}])
def test_extract_with_other_options_starts_over(tmp_path, tiny_llama, llama_chains, monkeypatch,
                                                 capsys, change):
    run = interrupted_extract(tmp_path, tiny_llama, llama_chains, monkeypatch, 2, batch_size=2)
    capsys.readouterr()
    options = {"batch_size": 2, **change}
    calls = FaultAfter(monkeypatch, residuals, "_reduce_batches")
    vs = extract_vectors(run, tiny_llama, **options)
    assert calls.calls == -(-len(llama_chains) // options["batch_size"])  # every batch
    err = capsys.readouterr().err
    assert "other inputs or options; starting over" in err and "resuming" not in err
    fresh = extract_vectors(write_run(tmp_path / "fresh", tiny_llama.name, llama_chains),
                            tiny_llama, **options)
    assert all(torch.equal(vs.vectors[label], v) for label, v in fresh.vectors.items())
    assert not run.partial("extract").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_extract_partial_file_is_ignored(tmp_path, tiny_llama, llama_chains, monkeypatch,
                                                 capsys, damage):
    run = interrupted_extract(tmp_path, tiny_llama, llama_chains, monkeypatch, 2, batch_size=4)
    partial = run.partial("extract")
    data = partial.read_bytes()
    partial.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80garbage" * 50)
    capsys.readouterr()
    calls = FaultAfter(monkeypatch, residuals, "_reduce_batches")
    extract_vectors(run, tiny_llama, batch_size=4)
    assert calls.calls == 3
    warning = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and str(partial) in warning[0] and "starting over" in warning[0]
    assert run.vectors.is_file() and not partial.exists()
