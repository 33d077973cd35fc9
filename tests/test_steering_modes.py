"""Steering modes (where, at, when) against a reference loop of plain forward hooks.

The reference is transformers ``generate`` with PyTorch hooks: a pre-hook on the
embedding sees each forward's input ids, per-row Python state decides each position's
mask from the rules of ``docs/steering-modes.md``, a hook at the detection layer
evaluates the condition, and hooks at the steered layers add ``scale × vector`` where
the mask is set. It shares no code with the nnsight block.
"""

from __future__ import annotations

import polars as pl
import pytest
import torch
from conftest import make_tiny

from nnsteer.errors import BadInput
from nnsteer.generation import loop as generation
from nnsteer.generation import spec as steering_spec
from nnsteer.generation.loop import generate
from nnsteer.generation.modes import calibrate_threshold, step_boundary_ids
from nnsteer.generation.prompts import chat_prompt
from nnsteer.generation.spec import (
    WHERE_FLAGS,
    Condition,
    SteeringSpec,
    mode_name,
    parse_when,
    unit,
)
from nnsteer.modeling.thinking import end_of_thinking_ids

PROMPTS = [
    "What is 17 times 23?",
    "A bat and a ball cost 1.10 in total. The bat costs one more than the ball. What is the ball?",
    "Name a prime.",
]
NEW = 8
COEFFICIENT = 3.0


def _vectors(d_model: int, layers: list[int], seed: int = 0) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(d_model, generator=gen) for layer in layers}


def _ends(ids: list[int], marker: list[int]) -> bool:
    return len(ids) >= len(marker) and ids[len(ids) - len(marker):] == marker


def reference(lm, prompts, specs, n=NEW, marker=(), boundaries=((), ())):
    """New ids and steered-position counts of a hooked transformers ``generate``."""
    tok, hf = lm.tokenizer, lm.hf_model
    prompt_ids = [tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    batch = tok.pad({"input_ids": prompt_ids}, padding=True, padding_side="left", return_tensors="pt")
    width = batch["input_ids"].shape[1]
    eos = generation.eos_ids(lm)
    boundary, newline = set(boundaries[0]), set(boundaries[1])
    history = [[] for _ in prompts]  # every real input id so far, per row
    ended = [False] * len(prompts)
    counts = [0] * len(prompts)
    step = {"mask": None, "first": True}
    condition = next((s.when for s in specs if s is not None and s.when is not None), None)

    def decide(module, args):
        ids = args[0].tolist()
        first = step["first"]
        mask = torch.zeros(len(ids), len(ids[0]), dtype=torch.bool)
        for r, row in enumerate(ids):
            spec = specs[r]
            for p, token in enumerate(row):
                if first and p < width - len(prompt_ids[r]):
                    continue  # left padding
                if not first:
                    ended[r] = ended[r] or token in eos
                    if ended[r]:
                        continue
                before = history[r][-1] if history[r] else None
                history[r].append(token)
                if spec is None:
                    continue
                answer = any(_ends(history[r][:i + 1], list(marker)) for i in range(len(history[r]))) \
                    if marker else False
                flags = WHERE_FLAGS[spec.where]
                on = flags[(0 if first else 2) + answer]
                if spec.at == "step-starts":
                    on = on and (token in boundary or (token in newline and before in newline)
                                 or (first and p == len(row) - 1))
                mask[r, p] = on
        step.update(mask=mask, first=False)

    def detect(module, args, out):
        fired = (out.float() * condition.vector).sum(-1) > condition.threshold
        rows = torch.tensor([s is not None and s.when is not None for s in specs])
        step["mask"] = step["mask"] & (fired | ~rows[:, None])

    def add(layer):
        def hook(module, args, out):
            rows = [(spec.scale * spec.vectors[layer].float()) if spec is not None and layer in spec.vectors
                    else torch.zeros(out.shape[-1]) for spec in specs]
            delta = torch.stack(rows).to(out.dtype)[:, None, :]
            return torch.where(step["mask"][..., None], out + delta, out)
        return hook

    handles = [lm.arch.embed(hf).register_forward_pre_hook(decide)]
    if condition is not None:
        handles.append(lm.arch.layers(hf)[condition.layer].register_forward_hook(detect))
    for layer in sorted({l for s in specs if s is not None for l in s.vectors}):
        handles.append(lm.arch.layers(hf)[layer].register_forward_hook(add(layer)))

    def count(module, args, out):
        for r, steered in enumerate(step["mask"].sum(1).tolist()):
            counts[r] += steered

    handles.append(lm.arch.layers(hf)[-1].register_forward_hook(count))
    try:
        out = hf.generate(**batch, max_new_tokens=n, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return out[:, width:].tolist(), counts


def _run(lm, prompts, specs, n=NEW, batch_size=8):
    gens = generate(lm, prompts, steering=specs, max_new_tokens=n, batch_size=batch_size,
                    progress=False)
    return [g.output_ids for g in gens], [g.steered_tokens for g in gens]


def _cut(rows, lm):
    stop = generation.eos_ids(lm)
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


def _check(lm, specs, prompts=PROMPTS, marker=(), boundaries=((), ())):
    """nnsteer equals the hook reference, batched and one by one; returns the ids."""
    ids, counts = _run(lm, prompts, specs)
    ref_ids, ref_counts = reference(lm, prompts, specs, marker=marker, boundaries=boundaries)
    assert ids == _cut(ref_ids, lm)
    assert counts == ref_counts
    single = [_run(lm, [p], [s]) for p, s in zip(prompts, specs)]
    assert ids == [i[0] for i, _ in single] and counts == [c[0] for _, c in single]
    return ids, counts


def use_marker(monkeypatch, marker) -> None:
    """Make ``marker`` the end-of-thinking spelling where specs are checked and where the
    batch is built (the tiny models never write </think>)."""
    for module in (generation, steering_spec):
        monkeypatch.setattr(module, "end_of_thinking_ids", lambda lm: list(marker))


@pytest.fixture
def marked(monkeypatch):
    """Make ``marker`` the end-of-thinking spelling (:func:`use_marker`)."""
    return lambda marker: use_marker(monkeypatch, marker)


@pytest.mark.parametrize("where", ["all", "prompt", "generated"])
def test_phase_modes_equal_the_hook_reference(tiny_llama, where):
    spec = SteeringSpec(_vectors(64, [1, 2]), COEFFICIENT, "positive", where)
    ids, counts = _check(tiny_llama, [spec, None, spec])
    plain, _ = _run(tiny_llama, PROMPTS, None)
    assert ids[1] == plain[1] and counts[1] == 0
    assert ids[0] != plain[0], "steering too weak to test"


def test_prompt_and_generated_split_all(tiny_llama):
    counts = {w: _run(tiny_llama, PROMPTS[:1], SteeringSpec(_vectors(64, [1]), 1.0, "positive", w))[1][0]
              for w in ("all", "prompt", "generated")}
    [prompt_ids] = [generate(tiny_llama, PROMPTS[:1], max_new_tokens=1, progress=False)[0].prompt_ids]
    assert counts["prompt"] == len(prompt_ids)
    assert counts["all"] == counts["prompt"] + counts["generated"] == len(prompt_ids) + NEW - 1


@pytest.mark.parametrize("where", ["thinking", "answer"])
@pytest.mark.parametrize("length", [1, 2], ids=["one-token-marker", "two-token-marker"])
def test_thinking_and_answer_switch_at_the_marker(tiny_llama, marked, where, length):
    """The marker is taken from the chain that is identical up to it (all-steered for
    thinking, unsteered for answer), so the switch happens mid-generation."""
    spec = SteeringSpec(_vectors(64, [1, 2]), COEFFICIENT, "positive", where)
    steered_all = SteeringSpec(spec.vectors, COEFFICIENT, "positive")
    [source] = generate(tiny_llama, PROMPTS[:1], steering=steered_all if where == "thinking"
                        else None, max_new_tokens=NEW, progress=False)
    chain = source.output_ids
    at = next(i for i in range(2, NEW - 2)
              if chain[i] not in chain[:i] and chain[i] not in source.prompt_ids)
    marker = chain[at - length + 1: at + 1]
    marked(marker)
    ids, counts = _check(tiny_llama, [spec, spec], PROMPTS[:2], marker=marker)
    assert ids[0][: at + 1] == chain[: at + 1]
    assert ids[0] != chain, "the switch changed nothing"


def test_a_marker_in_the_prompt_starts_the_answer_there(tiny_llama, marked):
    prompt_ids = generate(tiny_llama, PROMPTS[:1], max_new_tokens=1, progress=False)[0].prompt_ids
    marker = prompt_ids[5:7]
    marked(marker)
    spec = SteeringSpec(_vectors(64, [1]), COEFFICIENT, "positive", "answer")
    ids, counts = _check(tiny_llama, [spec], PROMPTS[:1], marker=marker)
    assert counts[0] == len(prompt_ids) - 6 + NEW - 1


def test_step_starts_equal_the_hook_reference(tiny_llama, monkeypatch):
    """Real boundaries (the prompt's), then ones the tiny model writes (generated path)."""
    spec = SteeringSpec(_vectors(64, [0, 2]), COEFFICIENT, "negative", "all", "step-starts")
    real = step_boundary_ids(tiny_llama.tokenizer)
    ids, counts = _check(tiny_llama, [spec, spec, None], boundaries=real)
    assert 0 < counts[0] < 50
    plain, _ = _run(tiny_llama, PROMPTS, None)
    written = {t for row in plain for t in row[1:4]}
    written_newline = {plain[0][4], plain[0][5]}
    boundaries = (real[0] + sorted(written), real[1] + sorted(written_newline))
    monkeypatch.setattr(generation, "step_boundary_ids", lambda tok: boundaries)
    _check(tiny_llama, [spec, spec, spec], boundaries=boundaries)


def test_conditional_steering_equals_the_hook_reference(tiny_llama):
    condition = Condition("uncertainty-estimation", 1, 0.0, unit(_vectors(64, [0], seed=7)[0]))
    spec = SteeringSpec(_vectors(64, [1, 3]), COEFFICIENT, "positive", when=condition)
    plain_spec = SteeringSpec(spec.vectors, COEFFICIENT, "positive")
    ids, counts = _check(tiny_llama, [spec, plain_spec, None])
    everywhere = _run(tiny_llama, PROMPTS[:1], plain_spec)[1][0]
    assert 0 < counts[0] < everywhere


def test_modes_mix_in_one_batch(tiny_qwen2, marked):
    marked([tiny_qwen2.tokenizer.convert_tokens_to_ids("?")])
    condition = Condition("backtracking", 0, 0.1, unit(_vectors(64, [0], seed=3)[0]))
    vectors = _vectors(64, [1, 2])
    specs = [SteeringSpec(vectors, COEFFICIENT, "positive", where) for where in WHERE_FLAGS]
    specs += [SteeringSpec(vectors, COEFFICIENT, "negative", "thinking", "step-starts", condition)]
    prompts = (PROMPTS * 2)[: len(specs)]
    _check(tiny_qwen2, specs, prompts, marker=[tiny_qwen2.tokenizer.convert_tokens_to_ids("?")],
           boundaries=step_boundary_ids(tiny_qwen2.tokenizer))


def test_remote_local_runs_every_mode(tokenizer, monkeypatch):
    use_marker(monkeypatch, [30])
    condition = Condition("backtracking", 0, 0.1, unit(_vectors(64, [0], seed=3)[0]))
    vectors = _vectors(64, [1, 2])
    specs = [SteeringSpec(vectors, COEFFICIENT, "positive", "thinking", "step-starts", condition),
             SteeringSpec(vectors, COEFFICIENT, "negative", "answer")]
    local = _run(make_tiny("llama", tokenizer), PROMPTS[:2], specs)
    assert _run(make_tiny("llama", tokenizer, remote="local"), PROMPTS[:2], specs) == local


def test_boundary_ids_are_sentence_and_paragraph_ends(tokenizer):
    boundary, newline = step_boundary_ids(tokenizer)
    text = {t: tokenizer.decode([t]) for t in boundary + newline}
    assert all(text[t].endswith("\n\n") or text[t].rstrip()[-1] in ".!?" for t in boundary)
    assert all(text[t].endswith("\n") for t in newline)
    for word in (".", "?", "!", "\n\n"):
        assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(word))[-1] in boundary
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize("the"))[0] not in boundary


def test_thinking_end_ids(tiny_qwen2, tiny_llama):
    assert end_of_thinking_ids(tiny_llama) == []  # SmolLM2's vocabulary has no </think> token
    with pytest.raises(BadInput, match="--where thinking: tiny-llama has no thinking format"):
        generate(tiny_llama, PROMPTS[:1], steering=SteeringSpec(_vectors(64, [1]), 1.0,
                 "positive", "thinking"), max_new_tokens=2, progress=False)


@pytest.mark.parametrize("text, message", [
    ("backtracking", "expected LABEL@LAYER>THRESHOLD"),
    ("backtracking@x>1", "layer 'x' is not a layer index"),
    ("backtracking@3>high", "threshold 'high' is not a number"),
    ("backtracking@3>nan", "not a finite number"),
])
def test_bad_when_is_one_line(text, message):
    with pytest.raises(BadInput, match=message) as err:
        parse_when(text)
    assert "\n" not in str(err.value)


def test_when_parts_and_mode_names():
    assert parse_when("uncertainty-estimation@12>-3.5") == ("uncertainty-estimation", 12, -3.5)
    assert parse_when("backtracking@4") == ("backtracking", 4, None)
    condition = Condition("backtracking", 4, 2.0, torch.ones(3))
    assert mode_name() == "all"
    assert mode_name("thinking", "step-starts", condition) == "thinking+step-starts+when backtracking@4>2"


@pytest.mark.parametrize("spec, message", [
    (dict(where="middle"), "--where 'middle': expected one of all, prompt"),
    (dict(at="sometimes"), "--at 'sometimes': expected one of every, step-starts"),
    (dict(when=Condition("b", 9, 0.0, torch.ones(64))), "layer 9 is out of range"),
    (dict(when=Condition("b", 2, 0.0, torch.ones(64))), "must not come after the first steered"),
    (dict(when=Condition("b", 0, 0.0, torch.ones(8))), "the vector has shape"),
])
def test_bad_modes_are_one_line(tiny_llama, spec, message):
    steering = SteeringSpec(_vectors(64, [1]), 1.0, "positive", **spec)
    with pytest.raises(BadInput, match=message) as err:
        generate(tiny_llama, PROMPTS[:1], steering=steering, max_new_tokens=2, progress=False)
    assert "\n" not in str(err.value)


def test_calibration_maximises_f1():
    inside = torch.tensor([3.0, 4.0, 5.0, 0.5])
    outside = torch.tensor([-1.0, 0.0, 1.0, 2.0, 2.5])
    found = calibrate_threshold(inside, outside)
    assert found["threshold"] == pytest.approx(2.75)
    assert (found["precision"], found["recall"]) == (1.0, 0.75)
    best = max(
        (2 * ((inside > t).sum() / ((inside > t).sum() + (outside > t).sum()))
         * ((inside > t).sum() / 4) / (((inside > t).sum() / ((inside > t).sum() + (outside > t).sum()))
                                        + (inside > t).sum() / 4)).item()
        for t in torch.linspace(-2, 6, 801) if (inside > t).sum() > 0)
    assert found["f1"] == pytest.approx(best)


@pytest.mark.parametrize("backend", ["strict", "ndif"])
def test_every_mode_runs_remotely_as_locally(tokenizer, monkeypatch, backend):
    """One batch of every mode through the strict backend and the loopback NDIF (allow-lists,
    bf16 autocast) equals the same batch run locally under bf16 autocast."""
    from fake_ndif import ndif_remote
    from strict_remote import strict_remote

    lm = make_tiny("llama", tokenizer)
    use_marker(monkeypatch, [30])  # "?"
    condition = Condition("backtracking", 0, 0.1, unit(_vectors(64, [0], seed=3)[0]))
    vectors = _vectors(64, [1, 2])
    specs = [SteeringSpec(vectors, COEFFICIENT, "positive", where) for where in WHERE_FLAGS]
    specs += [SteeringSpec(vectors, COEFFICIENT, "negative", "thinking", "step-starts", condition),
              None]
    prompts = (PROMPTS * 3)[: len(specs)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local = _run(lm, prompts, specs, batch_size=4)
    with (strict_remote if backend == "strict" else ndif_remote)(lm) as server:
        remote = _run(lm, prompts, specs, batch_size=4)
    assert remote == local
    assert len(server.requests) == 2
    for record in server.requests:  # the upload: vectors once, in the model's dtype
        assert record.request_bytes < 40_000


# --- the steer stage ---------------------------------------------------------------------


def test_steer_stage_records_modes(tmp_path, tiny_llama):
    from test_generation import write_tasks
    from test_steer import LAYERS, write_vectors
    from test_steer import NEW as STAGE_NEW

    from nnsteer.runs.store import RunDir, read_metadata, write_json
    from nnsteer.steer.chains import steer_chains

    run = RunDir(tmp_path)
    write_tasks(run, n_train=1, n_eval=2)
    write_json(run.layers, LAYERS)
    write_vectors(run, tiny_llama.arch.n_layers, tiny_llama.arch.d_model)
    plain = steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=STAGE_NEW)
    assert set(plain["mode"]) == {"none", "all"}
    table = steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=STAGE_NEW,
                         where=["all", "prompt"], at="step-starts", when="example-testing@0>0")
    mode = "all+step-starts+when example-testing@0>0"
    assert set(table["mode"]) == {"none", mode, "prompt+step-starts+when example-testing@0>0"}
    assert table.height == 2 * (1 + 2 * 2 * 2)
    steered = table.filter(pl.col("mode") == mode)
    assert all(cid.endswith(f"|{mode}") for cid in steered["chain_id"])
    assert (table.filter(pl.col("mode") == "none")["steered_tokens"] == 0).all()
    assert (steered["steered_tokens"] > 0).all()
    assert read_metadata(run.steered)["options"]["when"] == "example-testing@0>0"
    write_json(run.layers, {**LAYERS, "example-testing": {**LAYERS["example-testing"],
               "conditions": {"0": {"threshold": 0.0}}}})
    again = steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=STAGE_NEW,
                         where=["all", "prompt"], at="step-starts", when="example-testing@0")
    assert again["output_ids"].to_list() == table["output_ids"].to_list()


@pytest.mark.parametrize("options, message", [
    (dict(when="nothing@0>1"), "has no vector for 'nothing'"),
    (dict(when="backtracking@7>1"), "layer 7 is out of range"),
    (dict(when="backtracking@0"), "no calibrated threshold for 'backtracking' at layer 0"),
    (dict(where=["thinking"]), "has no thinking format"),
    (dict(where=["all", "all"]), "give distinct modes"),
    (dict(at="often"), "--at 'often'"),
])
def test_steer_stage_bad_modes_are_one_line(tmp_path, tiny_llama, options, message):
    from test_generation import write_tasks
    from test_steer import LAYERS, write_vectors

    from nnsteer.runs.store import RunDir, write_json
    from nnsteer.steer.chains import steer_chains

    run = RunDir(tmp_path)
    write_tasks(run, n_train=1, n_eval=1)
    write_json(run.layers, LAYERS)
    write_vectors(run, tiny_llama.arch.n_layers, tiny_llama.arch.d_model,
                  labels=["backtracking", "example-testing"])
    with pytest.raises(BadInput, match=message) as err:
        steer_chains(run, tiny_llama, behaviours=["backtracking"], max_new_tokens=2, **options)
    assert "\n" not in str(err.value) and not run.steered.exists()


def test_evaluate_and_report_keep_modes_apart():
    from nnsteer.evaluation.shares import summarise, summary_text
    from nnsteer.report.steering import forest_chart

    rows = []
    for task in range(3):
        for direction, mode, share in (("none", "none", 0.2), ("positive", "all", 0.5),
                                       ("positive", "thinking", 0.3)):
            rows.append({"chain_id": f"t{task}|{mode}", "task_id": f"t{task}",
                         "behaviour": None if direction == "none" else "backtracking",
                         "direction": direction, "vector": "none" if direction == "none" else
                         "behaviour", "coefficient": 0.0 if direction == "none" else 1.0,
                         "mode": mode, "label": "backtracking", "tokens": 1, "total": 2,
                         "fraction": share + task / 100, "denominator": "labelled"})
    summary = summarise(pl.DataFrame(rows), n_boot=10)
    steered = summary.filter(pl.col("direction") != "none")
    assert steered["mode"].to_list() == ["all", "thinking"]
    assert steered["diff"].to_list() == pytest.approx([0.3, 0.1])
    assert "positive [thinking] ×1" in summary_text(summary)
    chart = forest_chart(summary, {"backtracking": [1]}).to_dict()
    assert chart["facet"]["column"]["field"] == "mode"


# --- calibration of --when thresholds ------------------------------------------------------


def _labelled_run(tmp_path, lm):
    """Train chains of the tiny model, spans over thirds of each response, vectors, layers."""
    from test_generation import write_tasks

    from nnsteer.generation.chains import generate_chains
    from nnsteer.labels import LABELS
    from nnsteer.runs.store import RunDir, provenance, write_json, write_parquet
    from nnsteer.vectors.extract import extract_vectors

    run = RunDir(tmp_path)
    write_tasks(run, n_train=3)
    chains = generate_chains(run, lm, max_new_tokens=12, batch_size=2)
    rows, turn = [], 0
    for chain_id, response in zip(chains["chain_id"], chains["response"]):
        cuts = [0, len(response) // 3, 2 * len(response) // 3, len(response)]
        for start, end in zip(cuts, cuts[1:]):
            rows.append({"chain_id": chain_id, "label": LABELS[turn % 2], "start": start,
                         "end": end, "text": response[start:end], "annotator": "test",
                         "status": "ok"})
            turn += 1
    write_parquet(pl.DataFrame(rows), run.annotations, provenance("annotate", {}, lm.provenance()))
    extract_vectors(run, lm, batch_size=2, min_spans=1)
    write_json(run.layers, {LABELS[0]: {"vector_layer": 1, "layers": [1], "coefficient": 1.0}})
    return run, LABELS[0]


def test_calibration_equals_hidden_states_and_best_f1(tmp_path, tiny_llama):
    from nnsteer.runs.store import read_json
    from nnsteer.steer.calibration import calibrate_conditions
    from nnsteer.vectors.extract import annotated_chains, load_vectors, read_inputs

    run, label = _labelled_run(tmp_path, tiny_llama)
    found = calibrate_conditions(run, tiny_llama, batch_size=2, progress=False)
    chains, spans = read_inputs(run, tiny_llama.name)
    vector = load_vectors(run.vectors)[label]
    inside, outside = {}, {}
    for chain in annotated_chains(chains, spans, tiny_llama.tokenizer):
        with torch.no_grad():  # hidden_states[-1] has the final norm: the last block's own output
            states = tiny_llama.hf_model(torch.tensor([chain.ids]), output_hidden_states=True)
            last = tiny_llama.hf_model.model.layers[-1]
            outputs = []
            handle = last.register_forward_hook(lambda m, a, o: outputs.append(o))
            tiny_llama.hf_model(torch.tensor([chain.ids]))
            handle.remove()
        hidden = [*states.hidden_states[1:-1], outputs[0]]
        labelled = {p for s in chain.spans if s.label == label for p in chain.tokens(s.start, s.end)}
        for layer in range(tiny_llama.arch.n_layers):
            values = hidden[layer][0] @ (vector[layer] / vector[layer].norm())
            for p in range(chain.prompt_len, len(chain.ids)):
                (inside if p in labelled else outside).setdefault(layer, []).append(float(values[p]))
    for layer, stats in found[label].items():
        assert stats["n_inside"] == len(inside[layer]) and stats["n_outside"] == len(outside[layer])
        cuts = sorted(inside[layer] + outside[layer])
        best = 0.0
        for t in [cuts[0] - 1] + [(a + b) / 2 for a, b in zip(cuts, cuts[1:])]:
            tp = sum(v > t for v in inside[layer])
            fp = sum(v > t for v in outside[layer])
            best = max(best, 2 * tp / (tp + fp + len(inside[layer])))
        assert stats["f1"] == pytest.approx(best, abs=1e-6)
        tp = sum(v > stats["threshold"] for v in inside[layer])
        assert stats["recall"] == pytest.approx(tp / len(inside[layer]))
    entry = read_json(run.layers)[label]
    assert entry["conditions"]["1"] == found[label][1]
    assert entry["provenance"]["calibrate_conditions"]["stage"] == "select"
    assert (entry["vector_layer"], entry["layers"]) == (1, [1])  # only keys added


def test_cli_steer_modes(tmp_path, tiny_llama):
    from click.testing import CliRunner
    from test_generation import write_tasks
    from test_steer import LAYERS, write_vectors

    from nnsteer.cli import cli
    from nnsteer.runs.store import RunDir, write_json

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    write_tasks(run, n_train=1, n_eval=1)
    write_json(run.layers, LAYERS)
    write_vectors(run, tiny_llama.arch.n_layers, tiny_llama.arch.d_model)
    model_dir = tmp_path / "model"
    tiny_llama.hf_model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    base = ["--run-dir", str(run.root), "steer", "--model", str(model_dir), "--device", "cpu",
            "--max-new-tokens", "3", "--behaviours", "backtracking", "--no-random-control"]
    result = CliRunner().invoke(cli, base + ["--where", "all,prompt", "--at", "step-starts",
                                             "--when", "example-testing@1>0.5"])
    assert result.exit_code == 0, result.output
    assert sorted(set(pl.read_parquet(run.steered)["mode"])) == [
        "all+step-starts+when example-testing@1>0.5", "none",
        "prompt+step-starts+when example-testing@1>0.5"]
    bad = CliRunner().invoke(cli, base + ["--when", "example-testing@1>lots"])
    assert bad.exit_code == 2 and "threshold 'lots' is not a number" in bad.output


@pytest.mark.parametrize("backend", ["strict", "ndif"])
def test_calibration_runs_remotely_as_locally(tmp_path, tokenizer, backend):
    from fake_ndif import ndif_remote
    from strict_remote import strict_remote

    from nnsteer.steer.calibration import calibrate_conditions

    lm = make_tiny("llama", tokenizer)
    run, label = _labelled_run(tmp_path, lm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local = calibrate_conditions(run, lm, batch_size=2, progress=False)
    with (strict_remote if backend == "strict" else ndif_remote)(lm):
        remote = calibrate_conditions(run, lm, batch_size=2, progress=False)
    assert remote == local
