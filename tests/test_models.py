"""Model loading and the architecture adapter, against transformers' own outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nnsteer.errors import BadInput
from nnsteer.modeling.architecture import Architecture
from nnsteer.modeling.models import describe_model, load_model
from nnsteer.modeling.sources import model_name, resolve_source


def _layer_outputs(lm, ids, mask):
    with lm.nn.trace(input_ids=ids, attention_mask=mask, remote=lm.remote):
        out = torch.stack([lm.layers[i].output for i in range(lm.arch.n_layers)]).save()
    return out


@pytest.mark.parametrize("remote", [False, "local"])
def test_layer_outputs_equal_hidden_states(tiny_model, remote):
    lm = tiny_model
    enc = lm.tokenizer(["The cat sat on the mat.", "Hi"], return_tensors="pt", padding=True)
    was = lm.remote
    lm.remote = remote
    try:
        outs = _layer_outputs(lm, enc["input_ids"], enc["attention_mask"])
    finally:
        lm.remote = was
    hf = lm.hf_model
    position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(**enc, position_ids=position_ids, output_hidden_states=True).hidden_states
    n = lm.arch.n_layers
    for layer in range(n - 1):
        torch.testing.assert_close(outs[layer], ref[layer + 1], rtol=0, atol=0)
    # transformers applies the final norm to its last hidden state.
    normed = lm.arch.final_norm(hf)(outs[n - 1])
    torch.testing.assert_close(normed, ref[n], rtol=0, atol=0)


def test_adapter_sizes(tiny_llama, tiny_qwen2):
    assert (tiny_llama.arch.family, tiny_llama.arch.n_layers, tiny_llama.arch.d_model) == ("llama", 4, 64)
    assert (tiny_qwen2.arch.family, tiny_qwen2.arch.n_layers) == ("qwen2", 3)
    assert tiny_llama.arch.unembed(tiny_llama.hf_model) is tiny_llama.hf_model.lm_head


def test_unsupported_architecture_is_one_line():
    from transformers import T5Config

    with pytest.raises(BadInput, match="t5-dir: unsupported architecture 't5': an encoder-decoder"):
        Architecture.from_config(T5Config(), "t5-dir")


def test_local_directory_roundtrip(tiny_llama, tmp_path):
    tiny_llama.hf_model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    ids = tiny_llama.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.hf_model(ids).logits, tiny_llama.hf_model(ids).logits)
    assert lm.provenance()["n_layers"] == 4


class _Planted:
    """Unpickling this runs ``touch`` on a file: what a planted model file would do."""

    def __init__(self, witness: Path):
        self.witness = witness

    def __reduce__(self):
        return (os.system, (f"touch {self.witness}",))


def test_pytorch_model_bin_that_is_not_plain_weights_is_refused(tiny_llama, tmp_path):
    """A ``pytorch_model.bin`` that runs code when unpickled: one line, exit 2, nothing run."""
    model_dir, witness = tmp_path / "planted", tmp_path / "code-ran"
    tiny_llama.hf_model.config.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    torch.save({"model.embed_tokens.weight": _Planted(witness)}, model_dir / "pytorch_model.bin")
    with pytest.raises(BadInput, match=r"cannot load '.*planted': its weights file is not plain"):
        load_model(str(model_dir), device="cpu")
    run = str(tmp_path / "run")
    assert _cli("--run-dir", run, "tasks", "--per-category", "1").returncode == 0
    result = _cli("--run-dir", run, "generate", "--model", str(model_dir))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "cannot load" in errors[0] and "planted" in errors[0]
    assert not witness.exists()


@pytest.mark.parametrize(
    "name, message",
    [
        ("no-such-model", "unknown model 'no-such-model'"),
        ("missing.gguf", "missing.gguf: no such GGUF file"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(BadInput, match=message):
        resolve_source(name)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A hub endpoint nothing listens on, and an empty Hugging Face cache."""
    import huggingface_hub.constants

    from nnsteer.modeling.sources import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_reachable.cache_clear()
    yield tmp_path / "hub"
    hub_reachable.cache_clear()


def test_an_unreachable_hub_fails_fast_in_one_line(unreachable_hub, monkeypatch):
    import time

    start = time.perf_counter()
    with pytest.raises(BadInput) as info:
        resolve_source("nnsteer-test/not-a-model")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and "http://127.0.0.1:9" in message
    assert "not in the local cache" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="HF_HUB_OFFLINE is set"):
        resolve_source("nnsteer-test/not-a-model")


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_unreachable(unreachable_hub):
    snapshot = unreachable_hub / "models--nnsteer-test--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (unreachable_hub / "models--nnsteer-test--cached" / "refs").mkdir()
    (unreachable_hub / "models--nnsteer-test--cached" / "refs" / "main").write_text("abc")
    source = resolve_source("nnsteer-test/cached")
    assert source.local_only and source.load_kwargs["local_files_only"] is True


def test_cli_with_an_unreachable_hub_exits_2_in_one_line(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    result = _cli("models", "--model", "nnsteer-test/not-a-model", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "did not answer within 3 s" in result.stderr


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(BadInput, match="broken.gguf: not a readable GGUF file"):
        resolve_source(str(bad))


def test_directory_without_config(tmp_path):
    with pytest.raises(BadInput, match="has no config.json"):
        resolve_source(str(tmp_path))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nnsteer", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_lists_every_command():
    out = _cli("--help").stdout
    for command in ["tasks", "generate", "annotate", "extract", "attribute", "select", "steer",
                    "evaluate", "report", "run", "models"]:
        assert f"  {command}" in out


def test_cli_bad_model_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf")
    for name in ["no-such-model", str(bad)]:
        result = _cli("models", "--model", name)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert name in result.stderr


def test_remote_without_key_is_one_line_error():
    result = _cli("models", "--model", "meta-llama/Llama-3.1-8B", "--remote",
                  env={"NDIF_API_KEY": ""})
    assert result.returncode == 2
    assert "NDIF_API_KEY" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.embedded
def test_embedded_model_description_and_cache():
    info = describe_model("smollm2-135m", device="cpu")
    assert (info["layers"], info["width"]) == (30, 576)
    source = resolve_source("smollm2-135m")
    assert Path(source.path, "model.safetensors").is_file()
    assert not [p for p in Path(source.path).parent.iterdir() if p.name.startswith(".")]


@pytest.mark.embedded
def test_embedded_model_equals_gguf():
    """The cached safetensors copy computes what transformers' GGUF loader computes."""
    from transformers import AutoModelForCausalLM

    from nnsteer.modeling.embedded import embedded_gguf

    lm = load_model("smollm2-135m", device="cpu")
    gguf = embedded_gguf("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = lm.tokenizer("Let me think about this step by step.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lm.hf_model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_local_model_paths_are_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for typed in ("tiny", "./tiny/", str(tmp_path / "tiny")):
        assert model_name(typed) == resolve_source(typed).name == str(tmp_path / "tiny")
    assert model_name("org/Model-1B") == "org/Model-1B" and model_name("smollm2-135m") == "smollm2-135m"
