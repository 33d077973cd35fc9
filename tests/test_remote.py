"""The strict remote backend, NDIF readiness checks and request retries.

References are plain: transformers' ``output_hidden_states``, the same block run locally,
and the loopback NDIF of ``fake_ndif.py`` for the readiness checks.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path

import httpx
import nnsight
import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny
from fake_ndif import fake_ndif
from nnsight.schema.config import CONFIG
from strict_remote import AllowListError, strict_remote

from nnsteer.cli import cli
from nnsteer.errors import BadInput, NnsteerError
from nnsteer.modeling import positions
from nnsteer.ndif.remote import check_remote, check_route, is_transient, with_retries

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [2, 2, 50, 51, 52, 53, 54, 55]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


@pytest.fixture()
def lm(tokenizer):
    """A private tiny Llama (the strict backend flips ``lm.remote``)."""
    return make_tiny("llama", tokenizer)


# --- the strict backend ---------------------------------------------------------------


def _layer_sums(lm, remote):
    m, layers = lm.nn, lm.layers
    with m.trace(input_ids=IDS, attention_mask=MASK, remote=remote):
        sums = torch.stack([layers[i].output.sum(1) for i in range(4)]).save()
    return sums


def test_strict_trace_equals_hidden_states_and_returns_only_saves(lm):
    position_ids = (MASK.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = lm.hf_model(
            input_ids=IDS, attention_mask=MASK, position_ids=position_ids,
            output_hidden_states=True,
        ).hidden_states
    reference = torch.stack([h.sum(1) for h in hidden[1:4]])
    with strict_remote(lm, bf16=False) as server:
        sums = _layer_sums(lm, lm.remote)
    assert lm.remote is False
    torch.testing.assert_close(sums[:3], reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(sums, _layer_sums(lm, False))
    (record,) = server.requests
    assert record.names == ("sums",) and not record.others
    assert [(t.shape, t.dtype) for t in record.tensors] == [((4, 2, 64), "float32")]
    assert 4 * 2 * 64 * 4 < record.response_bytes < 4 * 2 * 64 * 4 + 2_000


def test_strict_generate_with_steering_at_every_step_equals_local(lm):
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))

    def steered(remote):
        m, layer = lm.nn, lm.layers[1]
        with pytest.warns(UserWarning, match="never reached"):
            with m.generate(max_new_tokens=6, do_sample=False, remote=remote) as tracer:
                with tracer.invoke(input_ids=IDS, attention_mask=MASK):
                    for step in tracer.iter[:]:
                        layer.output[:] += 4.0 * vector.to(layer.output.device)
                with tracer.invoke():
                    ids = tracer.result.save()
        return ids

    with strict_remote(lm, bf16=False) as server:
        remote_ids = steered(lm.remote)
    assert torch.equal(remote_ids, steered(False))
    assert not torch.equal(remote_ids[:, 8:], lm.hf_model.generate(
        input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False)[:, 8:])
    assert [(t.shape, t.dtype) for t in server.tensors()] == [((2, 14), "int64")]


def test_strict_gradient_trace_equals_autograd(lm):
    target, position = 7, 5

    def grad_norms(remote):
        m, layers = lm.nn, lm.layers
        with m.trace(input_ids=IDS[:1], remote=remote):
            m.model.embed_tokens.output.requires_grad_(True)
            hs = [layers[i].output for i in range(4)]
            loss = -torch.log_softmax(m.output.logits[0, position], -1)[target]
            grads = torch.autograd.grad(loss, hs)
            norms = torch.stack([g[0, position].norm() for g in grads]).save()
        return norms

    outputs = {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, out))
             for i, layer in enumerate(lm.hf_model.model.layers)]
    embeds = lm.hf_model.model.embed_tokens(IDS[:1]).requires_grad_(True)
    try:
        logits = lm.hf_model(inputs_embeds=embeds).logits
    finally:
        for hook in hooks:
            hook.remove()
    loss = -torch.log_softmax(logits[0, position], -1)[target]
    reference = torch.stack([g[0, position].norm() for g in
                             torch.autograd.grad(loss, [outputs[i] for i in range(4)])])
    with strict_remote(lm, bf16=False):
        norms = grad_norms(lm.remote)
    torch.testing.assert_close(norms, reference, rtol=1e-5, atol=1e-6)


def test_strict_session_with_kv_cache_equals_full_forward(lm):
    """The cache is rebuilt from the server's own cache class: no transformers reference."""

    def next_token_logits(remote):
        m = lm.nn
        with m.session(remote=remote):
            with torch.no_grad():
                with m.trace(input_ids=IDS[:1, :5]):
                    cache = m.output.past_key_values
            kv = [(layer.keys, layer.values) for layer in cache.layers]
            results = [].save()
            for p in (3, 4):
                with m.trace(input_ids=IDS[:1, p:p + 1], position_ids=torch.tensor([[p]]),
                             past_key_values=type(cache)(
                                 ddp_cache_data=[(k[:, :, :p], v[:, :, :p]) for k, v in kv])):
                    results.append(m.output.logits[0, -1])
        return torch.stack(list(results))

    with torch.no_grad():
        reference = lm.hf_model(input_ids=IDS[:1, :5]).logits[0, 3:5]
    with strict_remote(lm, bf16=False) as server:
        logits = next_token_logits(lm.remote)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    assert len(server.requests) == 1 and server.requests[0].kind == "Tracer"


def test_installed_helper_fails_strict_even_registered(lm):
    """The check has teeth: nnsteer is installed here, not on the server."""

    def with_helper(remote):
        m = lm.nn
        with m.trace(input_ids=IDS[:1], remote=remote):
            where = torch.tensor(positions.merge_positions([[3, 1], [1, 2]]))
            picked = m.model.layers[0].output[0, where].sum().save()
        return picked

    local = with_helper(False)
    # nnsight's own simulation misses it: installed packages stay importable there.
    assert torch.equal(with_helper("local"), local)
    with strict_remote(lm, bf16=False), pytest.raises(AllowListError, match="'nnsteer"):
        with_helper(lm.remote)
    assert sys.modules["nnsteer.modeling.positions"] is positions  # the client's modules are back
    nnsight.register(positions)
    try:
        # By value, the helper still names importlib's loader, which NDIF's lists refuse.
        with strict_remote(lm, bf16=False), pytest.raises(AllowListError, match="importlib"):
            with_helper(lm.remote)
        with strict_remote(lm, bf16=False, allow_lists=False):
            assert torch.equal(with_helper(lm.remote), local)
    finally:
        import cloudpickle

        cloudpickle.unregister_pickle_by_value(positions)


def test_strict_bf16_autocast_like_ndif(lm):
    """Layer outputs come back as a local bf16 autocast run gives them, not as float32."""
    with strict_remote(lm) as server:
        sums = _layer_sums(lm, lm.remote)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local_bf16 = _layer_sums(lm, False)
    local = _layer_sums(lm, False)
    assert sums.dtype == local_bf16.dtype
    assert torch.equal(sums, local_bf16)
    assert not torch.equal(sums.float(), local)
    torch.testing.assert_close(sums.float(), local, rtol=0.05, atol=0.3)
    assert server.requests[0].tensors[0].dtype == str(sums.dtype).removeprefix("torch.")


def _with_dynamic_cache(m, remote):
    from transformers import DynamicCache

    with m.trace(input_ids=IDS[:1], remote=remote):
        out = m.output.logits.sum().save()
        DynamicCache()
    return out


def _with_batch_encoding(m, remote):
    from transformers import BatchEncoding

    with m.trace(remote=remote) as tracer:
        with tracer.invoke(BatchEncoding({"input_ids": IDS[:1]})):
            out = m.output.logits.sum().save()
    return out


def _with_nullcontext(m, remote):
    import contextlib as client_contextlib

    with m.trace(input_ids=IDS[:1], remote=remote):
        with client_contextlib.nullcontext():
            out = m.output.logits.sum().save()
    return out


def _with_nnsight_save(m, remote):
    with m.trace(input_ids=IDS[:1], remote=remote):
        out = nnsight.save(m.output.logits.sum())
    return out


def _with_open(m, remote):
    with m.trace(input_ids=IDS[:1], remote=remote):
        out = m.output.logits.sum().save()
        open("/dev/null").close()
    return out


@pytest.mark.parametrize(("block", "refused"), [
    (_with_dynamic_cache, "'transformers"), (_with_batch_encoding, "'transformers"),
    (_with_nullcontext, "'contextlib'"), (_with_nnsight_save, "'nnsight'"),
    (_with_open, "name 'open' is not defined"),
])
def test_strict_refuses_references_outside_ndif_lists(lm, block, refused):
    """Each of these passes nnsight's ``remote="local"`` and fails NDIF's allow-lists."""
    block(lm.nn, "local")
    with strict_remote(lm, bf16=False), pytest.raises(Exception, match=refused):
        block(lm.nn, lm.remote)


def test_strict_tensors_are_copies_on_the_server(lm):
    """A block that writes into a client tensor instead of saving a result gets nothing back."""

    def fill(remote):
        out = torch.zeros(4)
        m, layers = lm.nn, lm.layers
        with m.trace(input_ids=IDS[:1], remote=remote):
            for i in range(4):
                out[i] = layers[i].output.sum()
        return out

    assert fill(False).abs().sum() > 0
    with strict_remote(lm, bf16=False):
        assert fill(lm.remote).abs().sum() == 0


def test_strict_rejects_remote_inside_a_remote_session(lm):
    def nested(remote):
        m = lm.nn
        with m.session(remote=remote):
            with m.trace(input_ids=IDS[:1], remote=remote):
                total = m.model.layers[0].output.sum().save()
        return total

    with strict_remote(lm, bf16=False), pytest.raises(RuntimeError, match="outer session only"):
        nested(lm.remote)


# --- readiness: /env, /whoami and /status answered by the loopback NDIF ---------------


def _key(repo: str, revision: str = "main") -> str:
    """A full model key as nnsight 0.8 sends it."""
    suffix = json.dumps({"repo_id": repo, "revision": revision, "task": "text-generation"})
    return f"nnsight.modeling.transformers.TransformersModel:{suffix}"


@pytest.fixture()
def ndif():
    """``ndif(deployments={key: state}, **FakeNdif options)``: a loopback NDIF serving none
    of them for real (readiness checks only read /env, /whoami and /status)."""
    stack = contextlib.ExitStack()

    def serve(deployments: dict[str, str] | None = None, **options):
        return stack.enter_context(fake_ndif({}, extra_deployments=deployments or {},
                                             **options))

    with stack:
        yield serve


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_remote_running(ndif):
    ndif({_key("org/big-model") + " ": "DEPLOYING", _key("org/big-model"): "RUNNING"})
    assert check_remote("org/big-model") == "running"


def test_check_remote_not_served_lists_running_models(ndif):
    ndif({_key("org/Big-Model"): "RUNNING", _key("org/other"): "DEPLOYING"})
    with pytest.raises(BadInput) as err:
        check_remote("org/big-model")
    message = str(err.value)
    assert "\n" not in message
    assert "not deployed" in message and "it runs: org/Big-Model." in message
    assert "Did you mean org/Big-Model?" in message and "without --remote" in message
    assert "--hot-swap" in message
    with pytest.raises(BadInput, match=r"org/other right now \(deploying\)"):
        check_remote("org/other")
    with pytest.raises(BadInput, match=r"org/Big-Model at revision v2 right now \(not deployed"):
        check_remote("org/Big-Model", revision="v2")


def test_check_remote_hot_swap_skips_the_running_check(ndif):
    ndif({})
    assert check_remote("org/cold-model", hot_swap=True) == "hot-swap"
    check_route(_key("org/cold-model"), hot_swap=True)


def test_check_route_compares_the_full_model_key(ndif):
    """Served under another task or revision is not served: NDIF routes by the whole key."""
    ndif({_key("org/big-model"): "RUNNING"})
    check_route(_key("org/big-model"))
    other_task = _key("org/big-model").replace("text-generation", "text-classification")
    with pytest.raises(BadInput, match="no deployment with the model key") as err:
        check_route(other_task)
    assert "\n" not in str(err.value) and "text-generation" in str(err.value)


@pytest.mark.parametrize(("env", "fix"), [
    ({"python": "3.99"}, "NDIF runs Python 3.99 and refuses requests from Python 3.11: run "
                         "nnsteer in a Python 3.99 environment"),
    ({"env_packages": {"nnsight": "0.8.2"}}, "NDIF needs nnsight 0.8.2 or newer, this "
                                             "environment has 0.8.1: pip install "
                                             "'nnsight>=0.8.2,<0.9'"),
    ({"env_packages": {"nnsight": "0.9.0"}}, "NDIF needs nnsight 0.9.0 or newer, and nnsteer "
                                             "supports nnsight>=0.8.1,<0.9 only"),
    ({"env_packages": {"transformers": "4.57.1"}}, "pip install 'transformers==4.57.1'"),
])
def test_check_remote_environment_mismatch_says_what_to_install(ndif, env, fix):
    ndif({_key("org/big-model"): "RUNNING"}, **env)
    with pytest.raises(BadInput) as err:
        check_remote("org/big-model")
    assert fix in str(err.value) and "\n" not in str(err.value)
    assert "0.9.0'" not in str(err.value)  # never advice outside nnsteer's own pin


@pytest.mark.parametrize("minimum", ["0.7.2", "0.8.0", "0.8.1"])
def test_check_remote_gates_on_the_servers_minimum_nnsight(ndif, minimum):
    """/env's nnsight is the oldest client NDIF accepts: an older minor is no reason to stop."""
    ndif({_key("org/big-model"): "RUNNING"}, env_packages={"nnsight": minimum})
    assert check_remote("org/big-model") == "running"


def test_check_remote_goes_on_without_env(ndif, capfd):
    """NDIF's main branch has no /env: one line says what was not checked, then on."""
    ndif({_key("org/big-model"): "RUNNING"}, has_env=False)
    assert check_remote("org/big-model") == "running"
    (line,) = [line for line in capfd.readouterr().err.splitlines() if "/env" in line]
    assert line.startswith("nnsteer: NDIF has no /env")


def test_nnsight_pin_is_pyprojects():
    import tomllib

    from nnsteer.ndif import remote as remote_module

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert f"nnsight{remote_module.NNSIGHT_PIN}" in project["project"]["dependencies"]


def test_check_remote_service_down(monkeypatch):
    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    with pytest.raises(NnsteerError, match="cannot reach NDIF at .*/env") as err:
        check_remote("org/big-model")
    assert "\n" not in str(err.value)


def test_check_remote_needs_api_key(ndif, monkeypatch):
    ndif({_key("org/big-model"): "RUNNING"})
    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(BadInput, match="NDIF_API_KEY") as err:
        check_remote("org/big-model")
    assert "\n" not in str(err.value)


def test_check_remote_unknown_api_key(ndif, monkeypatch):
    ndif({_key("org/big-model"): "RUNNING"})
    monkeypatch.setattr(CONFIG.API, "APIKEY", "mistyped-key")
    with pytest.raises(BadInput, match="does not recognise this NDIF_API_KEY"):
        check_remote("org/big-model")


def test_check_remote_needs_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    with pytest.raises(BadInput, match="Hugging Face id"):
        check_remote("smollm2-135m")
    with pytest.raises(BadInput, match="Hugging Face id"):
        check_remote(str(tmp_path))


def test_cli_models_remote_not_served(ndif):
    ndif({_key("org/big-model"): "RUNNING"})
    result = CliRunner().invoke(cli, ["models", "--model", "org/small-model", "--remote"])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("nnsteer: error: NDIF does not serve org/small-model")


def test_cli_models_remote_unreachable_is_one_line_exit_1(monkeypatch):
    monkeypatch.setattr(CONFIG.API, "HOST", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    result = CliRunner().invoke(cli, ["models", "--model", "org/big-model", "--remote"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("nnsteer: error: cannot reach NDIF at http://127.0.0.1:")


def test_cli_models_remote_served_without_hub_access(ndif, monkeypatch):
    """NDIF serves it, but its config cannot be fetched here: still one clean line."""
    import huggingface_hub.constants

    ndif({_key("org/big-model"): "RUNNING"})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["models", "--model", "org/big-model", "--remote"])
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("nnsteer: error: cannot read the config of 'org/big-model'")


def test_cli_models_remote_hot_swap(ndif, monkeypatch):
    import huggingface_hub.constants

    ndif({})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["models", "--model", "org/cold", "--remote", "--hot-swap"])
    assert "cannot read the config of 'org/cold'" in result.stderr  # got past the NDIF checks


# --- retries --------------------------------------------------------------------------


def test_with_retries_recovers_after_two_connection_errors():
    calls, delays = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) <= 2:
            raise httpx.ConnectError("connection refused")
        return "ids"

    assert with_retries(flaky, what="batch 2/5", sleep=delays.append) == "ids"
    assert len(calls) == 3 and delays == [2.0, 4.0]


def test_with_retries_gives_up_naming_the_batch_on_a_real_nnsight_request(lm):
    """nnsight's own RemoteBackend against a closed port: connection refused every time."""
    from nnsight.intervention.backends.remote import RemoteBackend

    backend = RemoteBackend("nnsight.modeling.transformers.TransformersModel:{}",
                            host=f"http://127.0.0.1:{_closed_port()}")
    calls, delays = [], []

    def request() -> torch.Tensor:
        calls.append(1)
        with lm.nn.trace(input_ids=IDS[:1], backend=backend):
            out = lm.nn.output.logits.sum().save()
        return out

    with pytest.raises(NnsteerError, match=r"^batch 3/12 failed 4 times on NDIF \(Connection"):
        with_retries(request, what="batch 3/12", attempts=4, base_delay=1, max_delay=3,
                     sleep=delays.append)
    assert len(calls) == 4 and delays == [1, 2, 3]


def test_with_retries_does_not_repeat_a_failing_intervention():
    calls = []

    def broken() -> None:
        calls.append(1)
        raise IndexError("index 9 is out of bounds")

    with pytest.raises(IndexError):
        with_retries(broken, what="batch 1/1", sleep=pytest.fail)
    assert len(calls) == 1


@pytest.mark.parametrize(("status", "transient"), [(503, True), (429, True), (401, False)])
def test_is_transient_reads_the_cause_of_nnsight_errors(status, transient):
    from nnsight.intervention.backends.remote import RemoteError

    response = httpx.Response(status, request=httpx.Request("POST", "http://x/request"))
    cause = httpx.HTTPStatusError("failed", request=response.request, response=response)
    try:
        raise RemoteError("Failed to send request") from cause
    except RemoteError as exc:
        assert is_transient(exc) is transient


def test_is_transient_server_side_job_error_is_not():
    from nnsight.intervention.backends.remote import RemoteError

    assert not is_transient(RemoteError("CUDA out of memory"))
    assert is_transient(TimeoutError("read timed out"))



def test_config_model_table_takes_the_ndif_options(tmp_path):
    from nnsteer.pipeline.run import read_config

    path = tmp_path / "c.toml"
    path.write_text("[model]\nname = 'org/big-model'\nremote = true\nhot_swap = true\n"
                    "ndif_deadline = 900.0\n")
    model = read_config(path).model
    assert model.hot_swap is True and model.ndif_deadline == 900.0
    path.write_text("[model]\nhot_swap = 'yes'\n")
    with pytest.raises(BadInput, match=r"\[model\] hot_swap = 'yes': expected bool"):
        read_config(path)


def test_cli_options_reach_load_model(monkeypatch):
    """--hot-swap and --ndif-deadline, given with the model options, reach load_model
    (--thinking-format and --reasoning-effort: the thinking format of what it loaded)."""
    import click

    import nnsteer.cli.common as common

    seen = {}
    monkeypatch.setattr(common, "load_model", lambda model, **options: seen.update(options))
    monkeypatch.setattr(common, "apply_thinking", lambda lm, *thinking: seen.update(thinking=thinking))

    @click.command()
    @common.model_options
    def stage(model, remote, device, dtype, batch_size):
        common.open_model(model, remote, device, dtype)

    result = CliRunner().invoke(stage, ["--model", "org/big", "--remote", "--hot-swap",
                                        "--ndif-deadline", "600", "--thinking-format", "harmony",
                                        "--reasoning-effort", "high"])
    assert result.exit_code == 0, result.output
    assert seen["hot_swap"] is True and seen["ndif_deadline"] == 600.0 and seen["remote"]
    assert seen["thinking"] == ("harmony", "high")
