"""nnsight's real ``RemoteBackend`` against the loopback NDIF of ``fake_ndif.py``.

Nothing in the client is replaced: requests go over HTTP and the websocket to
127.0.0.1, and the fake's allow-list executor runs them under bf16 autocast. References:
the same block run locally under the same bf16 autocast (bit for bit), and float32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from fake_ndif import fake_ndif, served
from nnsight.intervention.backends.remote import RemoteError

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [2, 2, 50, 51, 52, 53, 54, 55]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


@pytest.fixture()
def lm(tokenizer):
    return make_tiny("llama", tokenizer)


def _layer_sums(lm, **where):
    m, layers = lm.nn, lm.layers
    with m.trace(input_ids=IDS, attention_mask=MASK, **where):
        sums = torch.stack([layers[i].output.sum(1) for i in range(4)]).save()
    return sums


@pytest.mark.parametrize("inline_limit", [1 << 20, 0], ids=["inline", "behind-url"])
def test_blocking_websocket_trace_equals_local_bf16(lm, inline_limit):
    key = served(lm)
    with fake_ndif({key: lm.nn}, inline_limit=inline_limit) as ndif:
        sums = _layer_sums(lm, remote=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local = _layer_sums(lm)
    assert torch.equal(sums, local)
    torch.testing.assert_close(sums.float(), _layer_sums(lm), rtol=0.05, atol=0.3)
    (job,) = {job for job, _ in ndif.statuses}
    assert [s for _, s in ndif.statuses] == ["RECEIVED", "QUEUED", "RUNNING", "COMPLETED"]


def test_a_failed_job_is_a_remote_error_with_the_server_traceback(lm):
    key = served(lm)
    with fake_ndif({key: lm.nn}) as ndif:
        ndif.fail_jobs("Traceback (most recent call last):\n  ...\nIndexError: index 9 is out of bounds")
        with pytest.raises(RemoteError, match="IndexError: index 9"):
            _layer_sums(lm, remote=True)
        # the allow-list executor refuses what NDIF refuses, as a job error
        with pytest.raises(RemoteError, match="NDIF refuses 'contextlib'"):
            import contextlib as client_contextlib

            m = lm.nn
            with m.trace(input_ids=IDS, remote=True):
                with client_contextlib.nullcontext():
                    m.output.logits.sum().save()
    assert [s for _, s in ndif.statuses].count("ERROR") == 2


@pytest.mark.parametrize(("options", "refused"), [
    ({"api_keys": frozenset({"other-key"})}, "Missing or invalid API key"),
    ({"min_nnsight": "9.0"}, "Client nnsight version .* is incompatible"),
    ({"python": "2.7"}, "Client python version .* does not match server version: 2.7"),
])
def test_the_version_gate_and_key_check_answer_the_real_client(lm, options, refused):
    key = served(lm)
    with fake_ndif({key: lm.nn}, **options), pytest.raises(RemoteError, match=refused):
        _layer_sums(lm, remote=True)
