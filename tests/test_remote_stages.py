"""Every stage that supports ``--remote`` gives the local result through the strict backend.

One small study (tiny Llama, 2 train + 1 eval task, hand-placed spans) is run locally
once; each stage then runs again on a copy of its inputs with ``lm.remote`` routed
through :mod:`strict_remote` (NDIF's allow-lists, bf16 autocast). Its output must equal
the same stage run locally under the same bf16 autocast, and stay within the stated bf16
tolerance of the float32 local study. The same runs check the payload budgets: what
each response may hold.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import polars as pl
import pytest
import torch
from conftest import make_tiny
from fake_ndif import fake_ndif, ndif_remote, served
from polars.testing import assert_frame_equal
from strict_remote import SANDBOXES, strict_remote

from nnsteer.errors import NnsteerError
from nnsteer.labels import LABELS
from nnsteer.modeling.models import wrap_model
from nnsteer.ndif import remote
from nnsteer.runs.store import (
    RunDir,
    provenance,
    read_metadata,
    write_json,
    write_parquet,
)
from nnsteer.vectors import residuals

generation = pytest.importorskip("nnsteer.generation.chains")
vectors = pytest.importorskip("nnsteer.vectors.extract")
attribution = pytest.importorskip("nnsteer.selection.attribution")
steer = pytest.importorskip("nnsteer.steer.chains")
tasks = pytest.importorskip("nnsteer.tasks.stage")

MAX_NEW_TOKENS = 6
BATCH = 2
BEHAVIOUR = "backtracking"
#: The Hub id the loopback NDIF serves the tiny model under.
SERVED_REPO = "test/tiny-llama"
#: The envelope torch.save adds around the tensors of a response (zip headers, pickle).
ENVELOPE = 2_000
#: bf16 tolerance of extract's vectors against float32: ``‖remote − fp32‖ / ‖fp32‖`` per
#: behaviour (bf16 keeps 8 significant bits; the reduction itself runs in float64).
VECTOR_BF16_RTOL = 3e-2
#: bf16 tolerance of attribute's effects against float32 (absolute, in nats per unit
#: vector; the tiny model's effects are about 0.1).
EFFECT_BF16_ATOL = 1e-2


def _local_bf16(stage, study: RunDir, tmp_path, *files: str):
    """``stage(run)`` run locally on a copy of ``files`` under the server's bf16 autocast."""
    run = RunDir(tmp_path / "local-bf16")
    run.root.mkdir()
    for name in files:
        shutil.copy(study.path(name), run.path(name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return stage(run)


@pytest.fixture(scope="module")
def lm(tokenizer):
    return make_tiny("llama", tokenizer)


@pytest.fixture(params=[(way, sandbox) for way in ("strict", "ndif") for sandbox in SANDBOXES],
                ids=lambda param: "-".join(param))
def remote_run(request):
    """Where the stages' requests go: ``strict``, the in-process strict backend, or
    ``ndif``, nnsight's real RemoteBackend against the loopback NDIF of ``fake_ndif.py``;
    each in both of NDIF's sandboxes (``strict_remote.SANDBOXES``). All run bf16
    autocast; all log the requests they answered."""
    way, sandbox = request.param
    return functools.partial(strict_remote if way == "strict" else ndif_remote,
                             sandbox=sandbox)


@pytest.fixture(scope="module")
def study(tmp_path_factory, lm) -> RunDir:
    """Every stage run locally, in order, on one small run directory."""
    run = RunDir(tmp_path_factory.mktemp("local"))
    records = [
        {"task_id": f"t{i}", "category": "Verbal Logic", "split": split, "source": "file",
         "prompt": prompt}
        for i, (split, prompt) in enumerate([
            ("train", "Is every square a rectangle?"),
            ("train", "A bat and a ball cost 1.10 in total. How much is the ball?"),
            ("eval", "If all bloops are razzies, are some razzies bloops?"),
        ])
    ]
    tasks.save_tasks(run, tasks.tasks_frame(records), {})
    generation.generate_chains(run, lm, max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH)
    _annotate_thirds(run, lm)
    vectors.extract_vectors(run, lm, batch_size=BATCH)
    attribution.attribute(run, lm, metric="nll", batch_size=BATCH, labels=[BEHAVIOUR])
    write_json(run.layers, {BEHAVIOUR: {"vector_layer": 1, "layers": [1, 2], "coefficient": 4.0}})
    steer.steer_chains(run, lm, behaviours=[BEHAVIOUR], limit=1, random_control=False,
                       max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH)
    return run


def _annotate_thirds(run: RunDir, lm) -> None:
    """Three spans per chain over thirds of its response, labels taken in turn."""
    chains = pl.read_parquet(run.chains)
    rows, turn = [], 0
    for chain_id, response in zip(chains["chain_id"], chains["response"]):
        cuts = [0, len(response) // 3, 2 * len(response) // 3, len(response)]
        for start, end in zip(cuts, cuts[1:]):
            if start < end:
                label = (BEHAVIOUR, *LABELS)[turn % (len(LABELS) + 1)]
                rows.append({"chain_id": chain_id, "label": label, "start": start, "end": end,
                             "text": response[start:end], "annotator": "test", "status": "ok"})
                turn += 1
    write_parquet(pl.DataFrame(rows), run.annotations, provenance("annotate", {}, lm.provenance()))


def _inputs(study: RunDir, tmp_path, *files: str) -> RunDir:
    """A fresh run directory holding copies of ``files`` of the local study."""
    run = RunDir(tmp_path / "strict")
    run.root.mkdir()
    for name in files:
        shutil.copy(study.path(name), run.path(name))
    return run


def _same_chains(local: pl.DataFrame, remote: pl.DataFrame) -> None:
    columns = ["chain_id", "prompt_ids", "output_ids", "response", "finish_reason", "direction"]
    assert_frame_equal(remote.select(columns), local.select(columns))


def _assert_token_ids_only(server, chains: pl.DataFrame) -> None:
    """Generation budget: one int64 ``[batch, new tokens]`` tensor per request, a copy
    (``torch.save`` writes a view's whole storage, and the prompt ids would come back too),
    and with steering one float32 ``[batch]`` of steered-token counts."""
    for record in server.requests:
        ids, *counts = sorted(record.tensors, key=lambda t: t.dtype != "int64")
        assert not record.others
        assert ids.dtype == "int64" and ids.shape[0] <= BATCH and ids.shape[1] <= MAX_NEW_TOKENS
        assert [(c.dtype, c.shape) for c in counts] in ([], [("float32", ids.shape[:1])])
        alone = io.BytesIO()
        torch.save({t.name: torch.zeros(t.shape, dtype=getattr(torch, t.dtype))
                    for t in record.tensors}, alone)
        assert record.response_bytes <= len(alone.getvalue())


def test_generate_remote_equals_local(study, lm, tmp_path, remote_run):
    def stage(run):
        return generation.generate_chains(run, lm, max_new_tokens=MAX_NEW_TOKENS,
                                          batch_size=BATCH)

    run = _inputs(study, tmp_path, "tasks.parquet")
    with remote_run(lm) as server:
        chains = stage(run)
    _same_chains(_local_bf16(stage, study, tmp_path, "tasks.parquet"), chains)
    assert len(server.requests) == 1  # 2 tasks, one batch
    _assert_token_ids_only(server, chains)


def test_extract_remote_equals_local(study, lm, tmp_path, remote_run):
    inputs = ("tasks.parquet", "chains.parquet", "annotations.parquet")
    run = _inputs(study, tmp_path, *inputs)
    with remote_run(lm) as server:
        remote = vectors.extract_vectors(run, lm, batch_size=BATCH)
    local = vectors.load_vectors(study.vectors)
    local_bf16 = _local_bf16(lambda r: vectors.extract_vectors(r, lm, batch_size=BATCH),
                             study, tmp_path, *inputs)
    assert set(remote.vectors) == set(local.vectors)
    for label, vector in local.vectors.items():
        assert remote.vectors[label].dtype == torch.float32
        torch.testing.assert_close(remote.vectors[label], local_bf16.vectors[label],
                                   rtol=1e-6, atol=1e-7)
        error = (remote.vectors[label] - vector).norm() / vector.norm()
        assert 0 < error < VECTOR_BF16_RTOL, (label, float(error))
    # Budget: per batch, one [n_layers, n_groups, d_model] float32 sum; no [T, D] activations.
    n_groups = len(local.vectors)
    longest = max(len(p) + len(o) for p, o in
                  pl.read_parquet(study.chains).select("prompt_ids", "output_ids").iter_rows())
    for record in server.requests:
        (sums,) = record.tensors
        assert sums.dtype == "float32" and sums.shape == (4, n_groups, 64)
        assert record.response_bytes < 4 * n_groups * 64 * 4 + ENVELOPE
        assert record.response_bytes < BATCH * longest * 64 * 4  # less than one layer's [T, D]


def test_attribute_remote_equals_local(study, lm, tmp_path, remote_run):
    def stage(run):
        return attribution.attribute(run, lm, metric="nll", batch_size=BATCH,
                                     labels=[BEHAVIOUR])

    inputs = ("chains.parquet", "annotations.parquet", "vectors.safetensors")
    run = _inputs(study, tmp_path, *inputs)
    with remote_run(lm) as server:
        remote = stage(run)
    assert_frame_equal(remote, _local_bf16(stage, study, tmp_path, *inputs),
                       check_exact=False, rel_tol=1e-5, abs_tol=1e-6)
    assert_frame_equal(remote, pl.read_parquet(study.attribution), check_exact=False,
                       rel_tol=0, abs_tol=EFFECT_BF16_ATOL)
    # Budget: one request for all chains; per-span per-layer effects [n_spans, n_layers]
    # and nothing else come back.
    spans = pl.read_parquet(study.path(attribution.SPANS_FILE))
    assert len(server.requests) == 1
    n_returned = 0
    for record in server.requests:
        assert not record.others
        for effects in record.tensors:
            assert effects.shape[1:] == (4,) and effects.shape[0] <= BATCH
            n_returned += effects.shape[0]
    assert n_returned == spans.height
    assert max(r.response_bytes for r in server.requests) < spans.height * 4 * 4 + ENVELOPE


def test_steer_remote_equals_local(study, lm, tmp_path, remote_run):
    def stage(run):
        return steer.steer_chains(run, lm, behaviours=[BEHAVIOUR], limit=1,
                                  random_control=False, max_new_tokens=MAX_NEW_TOKENS,
                                  batch_size=BATCH)

    inputs = ("tasks.parquet", "vectors.safetensors", "layers.json")
    run = _inputs(study, tmp_path, *inputs)
    with remote_run(lm) as server:
        remote = stage(run)
    local = _local_bf16(stage, study, tmp_path, *inputs)
    _same_chains(local, remote)
    (baseline,) = local.filter(pl.col("direction") == "none")["output_ids"].to_list()
    steered = local.filter(pl.col("direction") != "none")["output_ids"].to_list()
    assert any(ids != baseline for ids in steered)  # the steering changed the chains
    _assert_token_ids_only(server, remote)


def test_generate_retries_a_dropped_batch(study, lm, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BASE_DELAY", 0.0)
    run = _inputs(study, tmp_path, "tasks.parquet")
    with strict_remote(lm, bf16=False) as server:
        server.fail_next(None, httpx.ConnectError("connection reset"))  # batch 2, first try
        chains = generation.generate_chains(run, lm, max_new_tokens=MAX_NEW_TOKENS, batch_size=1)
    assert len(server.requests) == 2 and not server.failures  # the dropped try was re-sent
    _same_chains(pl.read_parquet(study.chains), chains)


def test_generate_resumes_at_the_batch_ndif_kept_dropping(study, lm, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BASE_DELAY", 0.0)
    run = _inputs(study, tmp_path, "tasks.parquet")
    with strict_remote(lm, bf16=False) as server:
        server.fail_next(None, *[httpx.ConnectError("connection reset")] * 5)  # batch 2 of 2
        with pytest.raises(NnsteerError, match="generate batch 2/2 failed 5 times"):
            generation.generate_chains(run, lm, max_new_tokens=MAX_NEW_TOKENS, batch_size=1)
    assert pl.read_parquet(run.chains).height == 1
    with strict_remote(lm, bf16=False) as server:
        chains = generation.generate_chains(run, lm, max_new_tokens=MAX_NEW_TOKENS, batch_size=1)
    assert len(server.requests) == 1
    _same_chains(pl.read_parquet(study.chains), chains)


# --- long jobs on the loopback NDIF: retries, one-line errors, re-attaching, deadline ------

EXTRACT_INPUTS = ("tasks.parquet", "chains.parquet", "annotations.parquet")


def _extract(run, lm):
    """Two batches, one request each (the long-job tests count requests)."""
    with mock.patch.object(residuals, "BATCHES_PER_REQUEST", 1):
        return vectors.extract_vectors(run, lm, batch_size=1)


def test_extract_reattaches_to_its_job_after_dropped_polls(study, lm, tmp_path, monkeypatch,
                                                            capfd):
    """Polls that lose the connection are retried on the same job: no job is paid twice.
    nnsight's status display stays off: only nnsteer's one-line notes, on stderr."""
    monkeypatch.setattr(remote, "RETRY_BASE_DELAY", 0.0)
    run = _inputs(study, tmp_path, *EXTRACT_INPUTS)
    with ndif_remote(lm, drop_polls=2) as ndif:
        remote_set = _extract(run, lm)
    n_batches = len(ndif.requests)
    assert ndif.submitted() == n_batches == 2  # 2 chains, batch size 1
    local = vectors.load_vectors(study.vectors)
    assert set(remote_set.vectors) == set(local.vectors)
    assert not list(run.root.glob("*.jobs.json"))  # nothing left pending
    out, err = capfd.readouterr()
    assert out == "" and "re-attaching to NDIF job" in err
    assert all(line.startswith("nnsteer: ") for line in err.splitlines()
               if "NDIF" in line and "residuals" not in line)


def test_extract_rerun_reattaches_after_the_retries_ran_out(study, lm, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BASE_DELAY", 0.0)
    run = _inputs(study, tmp_path, *EXTRACT_INPUTS)
    with ndif_remote(lm, drop_polls=5) as ndif:
        with pytest.raises(NnsteerError, match="extract batch 1/2 failed 5 times on NDIF"):
            _extract(run, lm)
        (pending,) = run.root.glob("*.jobs.json")
        assert ndif.submitted() == 1
        _extract(run, lm)  # the rerun: batch 1 re-attaches, batch 2 is sent
        assert ndif.submitted() == 2 and len(ndif.requests) == 2
    assert not pending.exists()


def test_evicted_job_is_sent_again_and_a_failed_one_is_one_line(study, lm, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BASE_DELAY", 0.0)
    run = _inputs(study, tmp_path, *EXTRACT_INPUTS)
    with ndif_remote(lm) as ndif:
        ndif.fail_jobs("Traceback (most recent call last):\n  ...\nRuntimeError: Your job "
                       "was evicted by a higher-priority deployment. Please try again later.")
        _extract(run, lm)
        assert ndif.submitted() == 3  # batch 1 twice
        ndif.fail_jobs("Traceback (most recent call last):\n  File \"x\", line 1\n"
                       "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
        (tmp_path / "again").mkdir()
        with pytest.raises(NnsteerError) as err:
            _extract(_inputs(study, tmp_path / "again", *EXTRACT_INPUTS), lm)
    assert str(err.value) == ("extract batch 1/2 failed on NDIF: torch.OutOfMemoryError: CUDA "
                              "out of memory. Tried to allocate 2 GiB; lower --batch-size "
                              "and rerun")


def test_deadline_stops_waiting_and_a_rerun_reattaches(study, lm, tmp_path, monkeypatch):
    run = _inputs(study, tmp_path, *EXTRACT_INPUTS)
    with ndif_remote(lm, queue_delay=1.0) as ndif:
        monkeypatch.setattr(lm, "ndif_deadline", 0.2)
        with pytest.raises(NnsteerError, match=r"extract batch 1/2: NDIF job \w+ not done "
                                               r"after 0.2 s \(the deadline"):
            _extract(run, lm)
        monkeypatch.setattr(lm, "ndif_deadline", None)
        _extract(run, lm)
        assert ndif.submitted() == 2


@pytest.mark.parametrize("keep_statuses", [False, True], ids=["job-gone", "result-url-gone"])
def test_rerun_after_the_result_expired_runs_the_job_again(study, lm, tmp_path, monkeypatch,
                                                          capfd, keep_statuses):
    """NDIF keeps a finished job's result about 2 hours: a later rerun cannot re-attach,
    so it sends the job again, with one line."""
    run = _inputs(study, tmp_path, *EXTRACT_INPUTS)
    with ndif_remote(lm, queue_delay=0.5) as ndif:
        monkeypatch.setattr(lm, "ndif_deadline", 0.1)
        with pytest.raises(NnsteerError, match="not done after"):
            _extract(run, lm)
        monkeypatch.setattr(lm, "ndif_deadline", None)
        while not ndif.results:  # the abandoned job finishes, then its result expires
            time.sleep(0.05)
        ndif.expire_results(keep_statuses=keep_statuses)
        capfd.readouterr()
        remote_set = _extract(run, lm)
        assert ndif.submitted() == 3  # batch 1 twice, batch 2 once
    assert set(remote_set.vectors) == set(vectors.load_vectors(study.vectors).vectors)
    assert not list(run.root.glob("*.jobs.json"))
    notes = [line for line in capfd.readouterr().err.splitlines() if "running the job again" in line]
    assert len(notes) == 1 and notes[0].startswith("nnsteer: extract batch 1/2: NDIF no longer")


def test_a_result_on_another_host_is_not_loaded(study, lm, tmp_path):
    run = _inputs(study, tmp_path, *EXTRACT_INPUTS)
    with ndif_remote(lm) as ndif:
        ndif.result_host = ndif.host.replace("127.0.0.1", "localhost")
        with pytest.raises(NnsteerError, match=r"result at http://localhost:\d+/results/\w+, "
                                               r"neither on NDIF_HOST"):
            _extract(run, lm)


# --- the CLI, as a user runs it: `nnsteer extract --remote` in a shell ----------------------

#: ``nnsteer`` itself, after seeding nnsight's cache of canonical Hub spellings (nnsight asks
#: the Hub for it; there is no Hub here, see :func:`fake_ndif.served`).
CLI_WITHOUT_HUB = ("import sys, nnsight.modeling.huggingface as hub; "
                   f"hub._ID_CACHE[{SERVED_REPO!r}] = {SERVED_REPO!r}; "
                   "from nnsteer.cli import cli; cli(prog_name='nnsteer')")


def _offline_hub_copy(lm, home: Path) -> None:
    """``lm``'s config and tokenizer as the Hub cache under ``home`` holds a download of
    :data:`SERVED_REPO` (what ``--remote`` reads locally: no weights)."""
    revision = "0" * 40
    repo = home / "hub" / f"models--{SERVED_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    lm.hf_model.config.save_pretrained(snapshot)
    lm.tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def _nnsteer_shell(run: RunDir, hf_home: Path, host: str, *args: str,
                   seed_hub_id: bool = True) -> subprocess.CompletedProcess:
    """``nnsteer --run-dir RUN ARGS`` in a subprocess, offline from the Hub, with NDIF at
    ``host``; ``seed_hub_id`` stands in for nnsight's question to the Hub."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "NDIF_HOST": host,
           "NDIF_API_KEY": "test-key"}
    launch = (["-c", CLI_WITHOUT_HUB] if seed_hub_id else ["-m", "nnsteer"])
    return subprocess.run([sys.executable, *launch, "--run-dir", str(run.root), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def test_cli_generate_annotate_extract_remote_end_to_end(study, lm, tmp_path):
    """``nnsteer generate --remote``, ``annotate`` and ``extract --remote`` with a Hub id,
    in subprocesses as a user runs them, against the loopback NDIF: the key, environment
    and route checks, the requests, and outputs equal to the same stages run locally
    under the server's bf16 autocast."""
    _offline_hub_copy(lm, tmp_path / "hf")
    run = _inputs(study, tmp_path, "tasks.parquet")
    model, batch = ["--model", SERVED_REPO], ["--batch-size", str(BATCH)]
    with fake_ndif({served(lm, SERVED_REPO): lm.nn}) as ndif:
        for command in (["generate", "--remote", "--max-new-tokens", str(MAX_NEW_TOKENS),
                         *model, *batch],
                        ["annotate", "--annotator", "rules", *model],
                        ["extract", "--remote", *model, *batch]):
            result = _nnsteer_shell(run, tmp_path / "hf", ndif.host, *command)
            assert result.returncode == 0, (command, result.stderr)
            assert "Traceback" not in result.stderr
    assert ndif.submitted() == len(ndif.requests) == 2  # a generate and an extract batch
    assert read_metadata(run.vectors)["model"]["remote"] is True

    served_locally = wrap_model(lm.hf_model, lm.tokenizer, name=SERVED_REPO)
    local = RunDir(tmp_path / "local")
    local.root.mkdir()
    shutil.copy(run.tasks, local.tasks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generation.generate_chains(local, served_locally, max_new_tokens=MAX_NEW_TOKENS,
                                   batch_size=BATCH)
    _same_chains(pl.read_parquet(local.chains), pl.read_parquet(run.chains))
    shutil.copy(run.annotations, local.annotations)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        local_set = vectors.extract_vectors(local, served_locally, batch_size=BATCH)
    remote_set = vectors.load_vectors(run.vectors)
    assert set(remote_set.vectors) == set(local_set.vectors)
    for label, vector in local_set.vectors.items():
        torch.testing.assert_close(remote_set.vectors[label], vector, rtol=1e-6, atol=1e-7)


def test_cli_remote_without_the_hub_is_one_line(study, lm, tmp_path):
    """nnsight asks the Hub for the canonical repo id it routes by: offline, one line."""
    _offline_hub_copy(lm, tmp_path / "hf")
    run = _inputs(study, tmp_path, "tasks.parquet")
    with fake_ndif({served(lm, SERVED_REPO): lm.nn}) as ndif:
        result = _nnsteer_shell(run, tmp_path / "hf", ndif.host, "generate", "--remote",
                                "--model", SERVED_REPO, seed_hub_id=False)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("nnsteer: error:")]
    assert ("nnsight could not ask the Hugging Face Hub for test/tiny-llama's id" in line
            and "unset HF_HUB_OFFLINE" in line), line
    assert ndif.submitted() == 0


# --- `nnsteer models --remote --smoke`: one tiny request of each kind -----------------------


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_smoke_requests_are_accepted_in_both_sandboxes(lm, sandbox):
    from nnsteer.pipeline.smoke import smoke_lines

    with ndif_remote(lm, sandbox=sandbox) as ndif:
        lines = smoke_lines(lm)
    assert [line.split()[0] for line in lines] == ["generate", "extract", "attribute"]
    assert all(line.split()[1] == "accepted" for line in lines), lines
    assert ndif.submitted() == len(ndif.requests) == 3


def test_smoke_says_which_kind_the_server_refused(lm):
    from nnsteer.pipeline.smoke import smoke_lines

    with ndif_remote(lm) as ndif:
        ndif.fail_jobs("Traceback (most recent call last):\n  ...\nNameError: name 'torch' "
                       "is not defined")
        generate_line, *others = smoke_lines(lm)
    assert generate_line == ("generate  refused: generate batch 1/1 failed on NDIF: NameError: "
                             "name 'torch' is not defined; finished batches are saved; fix the "
                             "cause and rerun to resume")
    assert all(" accepted (" in line for line in others)


def test_cli_models_remote_smoke(lm, tmp_path):
    _offline_hub_copy(lm, tmp_path / "hf")
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    with fake_ndif({served(lm, SERVED_REPO): lm.nn}) as ndif:
        result = _nnsteer_shell(run, tmp_path / "hf", ndif.host, "models", "--remote", "--smoke",
                                "--model", SERVED_REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()[-3:]
    assert [line.split()[:2] for line in lines] == [["generate", "accepted"],
                                                    ["extract", "accepted"],
                                                    ["attribute", "accepted"]]
    assert ndif.submitted() == 3


def test_smoke_needs_remote():
    from click.testing import CliRunner

    from nnsteer.cli import cli

    result = CliRunner().invoke(cli, ["models", "--smoke"])
    assert result.exit_code == 2 and "--smoke needs --remote" in result.output
