"""Exported control vectors in the real llama.cpp (llama-cpp-python, built from PyPI source).

The embedded SmolLM2 (its Q4_1 weights dequantised to float32) is converted to a float32
GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` (from the same llama-cpp-python source,
put in its build cache by ``scripts/llamacpp.sh``). Each exported file is parsed by
ggml's own GGUF reader (``libggml-base``) and laid out as llama.cpp's
``common_control_vector_load`` does (``direction.N`` at offset ``(N - 1) × n_embd``; the
C++ ``common`` library is not in the Python package), then applied with
``llama_set_adapter_cvec`` over layers 1..n_layer, as ``--control-vector`` does.

Tolerance: next-token logits agree within ``ATOL`` = 1e-3 absolute. Both sides run the
same float32 weights with a float32 KV cache; what differs is the order of float32
sums in the matrix products and norms across 30 blocks (measured: about 4e-5 on logits
spanning about 36), so 1e-3 is 25× the observed error and still 1000× smaller than the
steering shift the tests check for.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

#: CI sets NNSTEER_REQUIRE_LLAMACPP=1: there a missing llama.cpp fails instead of skipping.
REQUIRED = os.environ.get("NNSTEER_REQUIRE_LLAMACPP") == "1"
try:
    import llama_cpp
except ImportError:
    if REQUIRED:
        raise
    pytest.skip("llama-cpp-python is not installed: `bash scripts/llamacpp.sh` builds it once into "
                "the nnsteer cache (about 4.5 min on 2 cores) and installs it", allow_module_level=True)

import nnsteer  # noqa: E402
from nnsteer.generation.loop import generate  # noqa: E402
from nnsteer.generation.prompts import prompt_token_ids  # noqa: E402
from nnsteer.generation.spec import SteeringSpec
from nnsteer.modeling.embedded import embedded_gguf  # noqa: E402
from nnsteer.modeling.models import load_model  # noqa: E402
from nnsteer.runs.store import RunDir, write_json  # noqa: E402
from nnsteer.steer.export import export_vector  # noqa: E402
from nnsteer.vectors.extract import VectorSet, load_vectors, save_vectors  # noqa: E402

ATOL = 1e-3
PROMPTS = ["What is 17 times 23?", "Name a prime number larger than 50.",
           "Is a whale a fish?", "Write one sentence about the sea."]
LAYERS = {"backtracking": {"vector_layer": 10, "layers": [10], "coefficient": 40.0},
          "example-testing": {"vector_layer": 12, "layers": [5, 12, 29], "coefficient": 90.0}}
GGML_TYPE_F32 = 0


def converter() -> Path:
    """Where ``scripts/llamacpp.sh`` puts llama.cpp's converter (its build cache)."""
    root = os.environ.get("NNSTEER_BUILD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnsteer"
    path = Path(root) / f"llama-cpp-python-{llama_cpp.__version__}" / "converter" / "convert_hf_to_gguf.py"
    if not path.is_file():
        (pytest.fail if REQUIRED else pytest.skip)(f"{path} is missing: `bash scripts/llamacpp.sh` puts llama.cpp's converter there")
    return path


@pytest.fixture(scope="module")
def lm():
    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def f32_gguf(lm, tmp_path_factory) -> Path:
    """The embedded model's weights as a float32 GGUF made by llama.cpp's converter."""
    if not REQUIRED:
        pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports sentencepiece")
    script = converter()
    hf_dir = tmp_path_factory.mktemp("smollm2-hf")
    lm.hf_model.save_pretrained(hf_dir)  # a transformers checkpoint: architectures, tied embedding
    lm.tokenizer.save_pretrained(hf_dir)
    out = hf_dir / "smollm2-135m-f32.gguf"
    subprocess.run([sys.executable, str(script), str(hf_dir), "--outtype", "f32", "--outfile", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, lm) -> RunDir:
    run = RunDir(tmp_path_factory.mktemp("run"))
    gen = torch.Generator().manual_seed(0)
    vectors = {label: torch.nn.functional.normalize(torch.randn(30, 576, generator=gen), dim=-1)
               for label in LAYERS}
    save_vectors(VectorSet(vectors, {"variant": "paper"}), run.vectors)
    write_json(run.layers, LAYERS)
    return run


def ggml_control_vector(path: Path, n_embd: int, n_layer: int) -> np.ndarray:
    """The buffer llama.cpp's loader builds from a control-vector file, parsed by ggml's GGUF
    reader: layer N's direction at ``(N - 1) * n_embd`` (layer 0 has no slot)."""
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    for name, restype in [("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_tensor_name", ctypes.c_char_p),
                          ("gguf_get_tensor_type", ctypes.c_int), ("gguf_get_tensor_offset", ctypes.c_size_t),
                          ("gguf_get_tensor_size", ctypes.c_size_t), ("gguf_get_data_offset", ctypes.c_size_t),
                          ("gguf_find_key", ctypes.c_int64), ("gguf_get_val_str", ctypes.c_char_p)]:
        getattr(lib, name).restype = restype
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    for name in ["gguf_get_tensor_name", "gguf_get_tensor_type", "gguf_get_tensor_offset",
                 "gguf_get_tensor_size", "gguf_get_val_str"]:
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_n_tensors.argtypes = lib.gguf_get_data_offset.argtypes = [ctypes.c_void_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, f"ggml cannot parse {path}"
    raw = path.read_bytes()
    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
    try:
        assert lib.gguf_get_val_str(ctx, lib.gguf_find_key(ctx, b"general.architecture")) == b"controlvector"
        for i in range(lib.gguf_get_n_tensors(ctx)):
            prefix, layer = lib.gguf_get_tensor_name(ctx, i).decode().split(".")
            assert prefix == "direction" and int(layer) >= 1
            assert lib.gguf_get_tensor_type(ctx, i) == GGML_TYPE_F32
            assert lib.gguf_get_tensor_size(ctx, i) == 4 * n_embd
            start = lib.gguf_get_data_offset(ctx) + lib.gguf_get_tensor_offset(ctx, i)
            values = np.frombuffer(raw[start:start + 4 * n_embd], dtype=np.float32)
            data[(int(layer) - 1) * n_embd:int(layer) * n_embd] += values
    finally:
        lib.gguf_free(ctx)
    return data


class LlamaCpp:
    """A llama.cpp model (float32 KV cache, every position's logits) with a control vector."""

    def __init__(self, path: Path):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False,
                                   logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        self.n_embd, self.n_layer = self.llm.n_embd(), llama_cpp.llama_model_n_layer(self.llm._model.model)

    def control_vector(self, path: Path | None) -> None:
        ctx = self.llm._ctx.ctx
        if path is None:
            assert llama_cpp.llama_set_adapter_cvec(ctx, None, 0, self.n_embd, 1, self.n_layer) == 0
            return
        self.data = ggml_control_vector(path, self.n_embd, self.n_layer)  # kept alive while set
        pointer = self.data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert llama_cpp.llama_set_adapter_cvec(ctx, pointer, len(self.data), self.n_embd, 1, self.n_layer) == 0

    def next_logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        self.llm.eval(ids)
        return torch.tensor(np.array(self.llm.scores[self.llm.n_tokens - 1]))

    def greedy(self, ids: list[int], n: int, stop: set[int]) -> list[int]:
        out: list[int] = []
        logits = self.next_logits(ids)
        while len(out) < n:
            out.append(int(logits.argmax()))
            if out[-1] in stop:
                break
            self.llm.eval([out[-1]])
            logits = torch.tensor(np.array(self.llm.scores[self.llm.n_tokens - 1]))
        return out


@pytest.fixture(scope="module")
def llama(f32_gguf) -> LlamaCpp:
    return LlamaCpp(f32_gguf)


def nnsteer_logits(lm, ids, run, behaviour=None, direction="positive") -> torch.Tensor:
    steering = nnsteer.steering(lm.hf_model, run.root, behaviour=behaviour, direction=direction) \
        if behaviour else nnsteer.steering(lm.hf_model, {})
    with steering, torch.no_grad():
        return lm.hf_model(torch.tensor([ids])).logits[0, -1]


CASES = [("backtracking", "positive"), ("backtracking", "negative"), ("example-testing", "positive")]


@pytest.mark.parametrize("behaviour, direction", CASES)
def test_next_token_logits_equal_nnsteer(lm, llama, run, tmp_path, behaviour, direction):
    path = tmp_path / "cv.gguf"
    export_vector(run, behaviour, "gguf", path, direction=direction)
    for prompt in PROMPTS[:3]:
        ids = prompt_token_ids(lm.tokenizer, prompt)
        ours, plain = nnsteer_logits(lm, ids, run, behaviour, direction), nnsteer_logits(lm, ids, run)
        llama.control_vector(path)
        theirs = llama.next_logits(ids)
        llama.control_vector(None)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
        assert (ours - plain).abs().max() > 1000 * ATOL  # the steering is not vacuous
        torch.testing.assert_close(llama.next_logits(ids), plain, rtol=0, atol=ATOL)


@pytest.mark.parametrize("behaviour, direction", [CASES[0], CASES[2]])
def test_greedy_continuations_identical(lm, llama, run, tmp_path, behaviour, direction):
    path = tmp_path / "cv.gguf"
    export_vector(run, behaviour, "gguf", path, direction=direction)
    choice = LAYERS[behaviour]
    row = load_vectors(run.vectors)[behaviour][choice["vector_layer"]]
    spec = SteeringSpec({layer: row for layer in choice["layers"]}, choice["coefficient"], direction)
    prompts = PROMPTS[:2]
    gens = generate(lm, prompts * 2, steering=[spec] * 2 + [None] * 2, max_new_tokens=32,
                         batch_size=4, progress=False)
    llama.control_vector(path)
    try:
        for prompt, gen in zip(prompts, gens):
            ids = prompt_token_ids(lm.tokenizer, prompt)
            assert llama.greedy(ids, 32, {lm.tokenizer.eos_token_id}) == gen.output_ids
    finally:
        llama.control_vector(None)
    assert [g.output_ids for g in gens[:2]] != [g.output_ids for g in gens[2:]]  # not vacuous


def test_q4_1_file_shifts_the_same_way(lm, run, tmp_path):
    q4 = LlamaCpp(embedded_gguf("smollm2-135m"))
    path = tmp_path / "cv.gguf"
    for behaviour, direction in CASES:
        export_vector(run, behaviour, "gguf", path, direction=direction, force=True)  # one file, rewritten
        for prompt in PROMPTS[2:]:
            ids = prompt_token_ids(lm.tokenizer, prompt)
            ours = nnsteer_logits(lm, ids, run, behaviour, direction) - nnsteer_logits(lm, ids, run)
            q4.control_vector(None)
            plain = q4.next_logits(ids)
            q4.control_vector(path)
            theirs = q4.next_logits(ids) - plain
            cosine = torch.nn.functional.cosine_similarity(ours, theirs, dim=0)
            assert cosine > COSINE, (behaviour, direction, prompt, float(cosine))


#: Q4_1 in llama.cpp quantises activations to 8 bits for its matrix products, so the shift is
#: not the float one; it must still point the same way (measured cosines 0.989 to 0.999).
COSINE = 0.9
