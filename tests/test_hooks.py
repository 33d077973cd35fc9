"""nnsteer.steering: plain forward hooks giving nnsteer's own steered tokens, removed on exit."""

from __future__ import annotations

import pytest
import torch
from test_generation import PROMPTS
from test_steer import LAYERS, NEW, run, write_vectors  # noqa: F401  (the run fixture)

import nnsteer
from nnsteer.generation.loop import generate
from nnsteer.generation.prompts import chat_prompt
from nnsteer.generation.spec import SteeringSpec
from nnsteer.vectors.extract import load_vectors


def _plain_greedy(lm, prompt, new=NEW):
    tok = lm.tokenizer
    ids = tok(chat_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = lm.hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_steering_equals_nnsteer_generation(run, tiny_llama):  # noqa: F811
    vectors = write_vectors(run, 4, 64)
    choice = LAYERS["example-testing"]
    spec = SteeringSpec({layer: vectors["example-testing"][2] for layer in choice["layers"]},
                        choice["coefficient"], "negative")
    theirs = generate(tiny_llama, PROMPTS[:2], steering=spec, max_new_tokens=NEW, progress=False)
    for prompt, gen in zip(PROMPTS[:2], theirs):
        with nnsteer.steering(tiny_llama.hf_model, run.root, behaviour="example-testing",
                              direction="negative") as added:
            assert _plain_greedy(tiny_llama, prompt) == gen.output_ids
        assert sorted(added) == [0, 1, 2]
    unsteered = generate(tiny_llama, PROMPTS[:1], max_new_tokens=NEW, progress=False)[0]
    assert _plain_greedy(tiny_llama, PROMPTS[0]) == unsteered.output_ids != theirs[0].output_ids
    vs = load_vectors(run.vectors)
    with nnsteer.steering(tiny_llama.hf_model, vs, behaviour="example-testing", layers=[0, 1, 2],
                          vector_layer=2, coefficient=3.0, direction="negative"):
        assert _plain_greedy(tiny_llama, PROMPTS[0]) == theirs[0].output_ids


def test_hooks_are_removed_on_error(run, tiny_llama):  # noqa: F811
    write_vectors(run, 4, 64)
    blocks = tiny_llama.hf_model.model.layers
    before = [dict(block._forward_hooks) for block in blocks]  # transformers may hold its own
    with pytest.raises(RuntimeError, match="boom"):
        with nnsteer.steering(tiny_llama.hf_model, run.root, behaviour="backtracking"):
            assert len(blocks[1]._forward_hooks) == len(before[1]) + 1
            raise RuntimeError("boom")
    assert [dict(block._forward_hooks) for block in blocks] == before


def test_inside_a_pipeline(run, tiny_llama):  # noqa: F811
    from transformers import pipeline

    vectors = write_vectors(run, 4, 64)
    spec = SteeringSpec({1: vectors["backtracking"][1]}, 1.5)
    [gen] = generate(tiny_llama, PROMPTS[:1], steering=spec, max_new_tokens=NEW, progress=False)
    pipe = pipeline("text-generation", model=tiny_llama.hf_model, tokenizer=tiny_llama.tokenizer)
    prompt = chat_prompt(tiny_llama.tokenizer, PROMPTS[0])
    with nnsteer.steering(tiny_llama.hf_model, run.root, behaviour="backtracking"):
        [out] = pipe(prompt, max_new_tokens=NEW, do_sample=False, return_full_text=False,
                     add_special_tokens=False)
    assert out["generated_text"] == tiny_llama.tokenizer.decode(gen.output_ids)


def test_ready_additions_from_a_file(run, tiny_llama, tmp_path):  # noqa: F811
    from nnsteer.steer.export import export_vector

    write_vectors(run, 4, 64)
    out = tmp_path / "bt.gguf"
    export_vector(run, "backtracking", "gguf", out)
    with nnsteer.steering(tiny_llama.hf_model, run.root, behaviour="backtracking"):
        expected = _plain_greedy(tiny_llama, PROMPTS[1])
    with nnsteer.steering(tiny_llama.hf_model, out):
        assert _plain_greedy(tiny_llama, PROMPTS[1]) == expected
