"""Fault injection: misbehaving LLM servers, damaged files, bad configs, two writers, SIGKILL.

Every case checks the exit code, that the error is one line, and that the files it
must not touch are byte for byte as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner
from fake_llm import FakeLLM

from nnsteer.cli import cli
from nnsteer.runs.store import LOCK_NAME, RunDir, run_lock, write_parquet
from nnsteer.vectors.extract import VectorSet, save_vectors

KEY = "sk-test-SECRET-0123456789"
#: Reasoning texts of four sentences each, so that a reply labelling one covers a quarter.
TEXTS = ["Okay, so I need to find x. We know that 2x = 6. So x is 3. Let me check: 2 * 3 = 6.",
         "First, the area of a square is its side squared. The side is 4. So the area is 16. "
         "Wait, maybe the side was 5?",
         "I remember that primes have two divisors. Take 7 as an example. It has 1 and 7. "
         "So 7 is prime."]


def leaked(text: str, secret: str = KEY) -> list[str]:
    """The runs of 8 characters of ``secret`` in ``text``."""
    return [secret[i:i + 8] for i in range(len(secret) - 7) if secret[i:i + 8] in text]


def invoke(*args: str) -> tuple[int, str]:
    """``nnsteer ARGS`` in this process: its exit code and its stderr."""
    result = CliRunner().invoke(cli, list(args))
    assert not isinstance(result.exception, (AssertionError, TypeError, KeyError)), result.exception
    return result.exit_code, result.stderr


def one_line(stderr: str) -> str:
    """The error line; every other line on stderr is a progress bar or a note."""
    errors = [line for line in stderr.splitlines() if line.startswith("nnsteer: error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ the LLM annotator

@pytest.fixture
def chains_run(tmp_path, monkeypatch, tokenizer) -> RunDir:
    """A run directory with three chains of :data:`TEXTS` and a key in the environment."""
    from nnsteer.modeling.embedded import cache_dir, embedded_dir

    model = embedded_dir("smollm2-135m")  # the tokenizer of the chains, made once
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("NNSTEER_CACHE", str(tmp_path / "cache"))
    (cache_dir() / model.name).parent.mkdir(parents=True)
    (cache_dir() / model.name).symlink_to(model)
    run = RunDir(tmp_path / "run")
    chains = pl.DataFrame({
        "chain_id": ["c0", "c1", "c2"], "model": "smollm2-135m", "prompt_ids": [[1]] * 3,
        "output_ids": [tokenizer.encode(t) for t in TEXTS], "response": TEXTS,
        "thinking_start": [0] * 3, "thinking_end": [len(t) for t in TEXTS]})
    write_parquet(chains, run.chains, {"stage": "generate"})
    return run


def replies() -> Path:
    """The LLM annotator's reply cache."""
    return Path(os.environ["NNSTEER_CACHE"]) / "annotations"


def annotate(run: RunDir, server: FakeLLM, *extra: str) -> tuple[int, str]:
    return invoke("--run-dir", str(run.root), "annotate", "--annotator", "openai:gpt-4o",
                  "--base-url", server.url, "--retries", "0", "--timeout", "5", *extra)


@pytest.mark.parametrize("mode", ["garbage", "empty", "invented", "paraphrase", "partial",
                                  "truncated", "no-choices", "bad-json", "hang", "echo-key",
                                  "echo-key-late"])
def test_bad_replies_fail_their_chains_and_are_asked_again(chains_run, mode):
    run = chains_run
    chains = run.chains.read_bytes()
    server = FakeLLM(mode, hang_s=2.0)
    try:
        code, stderr = annotate(run, server, *(["--timeout", "0.3"] if mode == "hang" else []))
        assert code == 1, stderr  # the file is written, but the stage is incomplete
        assert ("3 chain(s) of annotations.parquet could not be annotated (c0, c1, c2); later "
                "stages skip them: rerun to try them again") in stderr
        rows = pl.read_parquet(run.annotations)
        assert rows["status"].to_list() == ["failed"] * 3
        assert not leaked(stderr) and not leaked(" ".join(rows["text"]))
        assert not list(replies().rglob("*.json"))  # nothing cached
        assert run.chains.read_bytes() == chains
        server.mode = "good"  # the next run asks again, and keeps what it is given
        code, stderr = annotate(run, server)
        assert code == 0, stderr
        assert set(pl.read_parquet(run.annotations)["status"]) == {"ok"}
        assert len(list(replies().rglob("*.json"))) == 3
    finally:
        server.close()


def test_rate_limits_and_server_errors_are_retried(chains_run):
    server = FakeLLM("flaky")
    try:
        code, stderr = annotate(chains_run, server, "--retries", "2", "--workers", "1")
        assert code == 0, stderr
        assert set(pl.read_parquet(chains_run.annotations)["status"]) == {"ok"}
        assert server.requests == 5  # a 429, a 500, then the three chains
    finally:
        server.close()


def test_one_malformed_response_fails_one_chain_only(chains_run):
    server = FakeLLM("good")
    real = server.answer
    server.answer = lambda body, n, key: (
        (200, b"not json") if body["messages"][-1]["content"] == TEXTS[1] else real(body, n, key))
    try:
        code, stderr = annotate(chains_run, server)
        assert code == 1, stderr
        rows = pl.read_parquet(chains_run.annotations)
        assert rows.filter(pl.col("status") == "failed")["chain_id"].to_list() == ["c1"]
        assert set(rows.filter(pl.col("chain_id") != "c1")["status"]) == {"ok"}
    finally:
        server.close()


def test_run_with_failed_chains_finishes_its_stages_and_exits_1(chains_run, tmp_path):
    server = FakeLLM("good")
    real = server.answer
    server.answer = lambda body, n, key: (
        (200, b"not json") if body["messages"][-1]["content"] == TEXTS[1] else real(body, n, key))
    config = tmp_path / "study.toml"
    config.write_text(f'[annotate]\nannotator = "openai:gpt-4o"\nbase_url = "{server.url}"\n'
                      'retries = 0\ntimeout = 5\n')
    try:
        code, stderr = invoke("--run-dir", str(chains_run.root), "run", "--config", str(config),
                              "--only", "annotate")
    finally:
        server.close()
    assert code == 1, stderr
    assert "1 chain(s) of annotations.parquet could not be annotated (c1)" in stderr
    assert "Traceback" not in stderr and "nnsteer: error" not in stderr, stderr
    assert pl.read_parquet(chains_run.annotations).height >= 3


def test_ctrl_c_cancels_pending_requests(chains_run, monkeypatch):
    """Ctrl-C while the first request hangs: the others are never sent, the run ends at once."""
    import nnsteer.annotation.llm as llm

    server = FakeLLM("hang", hang_s=30)
    real = llm.tqdm

    def interrupted(iterable, **kwargs):
        time.sleep(0.3)  # the first request is in flight
        raise KeyboardInterrupt
        yield from real(iterable, **kwargs)

    monkeypatch.setattr(llm, "tqdm", interrupted)
    try:
        start = time.monotonic()
        code, stderr = annotate(chains_run, server, "--workers", "1")
        assert code == 130 and time.monotonic() - start < 5
        assert stderr.strip() == "nnsteer: interrupted; finished work is saved, rerun to continue"
        assert server.requests <= 1
        assert not chains_run.annotations.exists()
    finally:
        server.close()


def test_credentials_in_the_base_url_are_not_stored(chains_run, tmp_path):
    server = FakeLLM("good")
    try:
        url = server.url.replace("http://", "http://user:hunter2@")
        code, stderr = annotate(chains_run, server, "--base-url", url)
        assert code == 0, stderr
    finally:
        server.close()
    from nnsteer.errors import public_url

    assert public_url(url) == server.url
    stored = b"".join(snapshot(chains_run.root).values())
    assert b"hunter2" not in stored and KEY.encode() not in stored


def killed_once_asked(server: FakeLLM, key_variable: str, *command: str) -> int:
    """Run ``nnsteer COMMAND`` (``key_variable`` set to :data:`KEY`) until it has sent
    ``server`` (which never answers) a request, then SIGKILL it; its process id. Closes
    ``server``."""
    process = subprocess.Popen([sys.executable, "-m", "nnsteer", *command],
                               stderr=subprocess.DEVNULL, env={**os.environ, key_variable: KEY})
    try:
        deadline = time.monotonic() + 60
        while not server.requests:  # the stage is waiting for its reply
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        server.close()
    return process.pid


def test_the_lock_file_holds_no_arguments_even_after_sigkill(chains_run):
    """A real ``annotate`` with credentials in --base-url, killed while its request hangs:
    its lock file names the process, host and start time, and nothing of the command."""
    server = FakeLLM("hang", hang_s=30)
    url = server.url.replace("http://", "http://user:hunter2@") + "?api_key=QUERYSECRET"
    pid = killed_once_asked(server, "OPENAI_API_KEY", "--run-dir", str(chains_run.root),
                            "annotate", "--annotator", "openai:gpt-4o", "--base-url", url,
                            "--retries", "0")
    held = (chains_run.root / LOCK_NAME).read_text()
    assert re.fullmatch(rf"process {pid} \(on [^ ,()]+, since [0-9T:+-]+\)", held), held
    stored = b"".join(snapshot(chains_run.root).values())
    assert b"hunter2" not in stored and b"QUERYSECRET" not in stored and not leaked(str(stored))


def test_claude_giving_nothing_usable_keeps_the_tasks(tmp_path, monkeypatch):
    """``tasks generate`` against a Messages server whose replies hold no task: exit 1."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            data = json.dumps({"id": "m", "type": "message", "role": "assistant", "model": "c",
                               "content": [{"type": "text", "text": "Sorry, no tasks today."}],
                               "stop_reason": "end_turn", "stop_sequence": None,
                               "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    run = RunDir(tmp_path / "run")
    try:
        assert invoke("--run-dir", str(run.root), "tasks", "--per-category", "1")[0] == 0
        before = run.tasks.read_bytes()
        code, stderr = invoke("--run-dir", str(run.root), "tasks", "generate", "--per-category",
                              "1", "--eval-per-category", "0", "--base-url",
                              f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert code == 1
    assert one_line(stderr) == (f"nnsteer: error: Claude gave no usable task: {run.tasks} is "
                                "kept as it was; rerun to ask again")
    assert run.tasks.read_bytes() == before


# ---------------------------------------------------------------------- damaged files

N_LAYERS = 6


@pytest.fixture
def select_run(tmp_path) -> RunDir:
    """Vectors and an attribution table: enough for ``nnsteer select``."""
    run = RunDir(tmp_path / "run")
    save_vectors(VectorSet({label: torch.ones(N_LAYERS, 8) for label in ("backtracking", "overall")},
                           {}), run.vectors)
    rows = [{"label": "backtracking", "layer": layer, "effect": float(layer), "std": 0.0,
             "n_spans": 3, "metric": "nll"} for layer in range(N_LAYERS)]
    write_parquet(pl.DataFrame(rows), run.attribution, {})
    return run


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def overwrite(path: Path) -> None:
    path.write_bytes(b"\x89\xff garbage \x00" * 10)


def nan_vector(path: Path) -> None:
    save_vectors(VectorSet({"backtracking": torch.full((N_LAYERS, 8), float("nan")),
                            "overall": torch.ones(N_LAYERS, 8)}, {}), path)


def edit_attribution(**column) -> callable:
    def edit(path: Path) -> None:
        df = pl.read_parquet(path)
        write_parquet(df.with_columns(**{k: pl.Series(v) for k, v in column.items()}), path, {})
    return edit


@pytest.mark.parametrize("name, damage, expected", [
    ("vectors.safetensors", truncate, "damaged or not an nnsteer file"),
    ("vectors.safetensors", overwrite, "damaged or not an nnsteer file"),
    ("vectors.safetensors", nan_vector, "backtracking hold NaN"),
    ("attribution.parquet", truncate, "damaged or not an nnsteer file"),
    ("attribution.parquet", overwrite, "damaged or not an nnsteer file"),
    ("attribution.parquet", edit_attribution(effect=[0.0, 1.0, float("nan"), 0.0, 0.0, 0.0]),
     "row 2: layer 2, effect nan"),
    ("attribution.parquet", edit_attribution(effect=[0.0, 1.0, float("inf"), 0.0, 0.0, 0.0]),
     "row 2: layer 2, effect inf"),
    ("attribution.parquet", edit_attribution(layer=[0, 1, 2, 3, 4, 99]), "row 5: layer 99"),
    ("attribution.parquet", edit_attribution(effect=["a", "b", "c", "d", "e", "f"]),
     "of the wrong type"),
])
def test_damaged_inputs_of_select_are_one_line(select_run, name, damage, expected):
    damage(select_run.path(name))
    before = snapshot(select_run.root)
    code, stderr = invoke("--run-dir", str(select_run.root), "select")
    assert code == 2
    line = one_line(stderr)
    assert line.startswith(f"nnsteer: error: {select_run.path(name)}: ") and expected in line, line
    assert "delete it and rerun `nnsteer " in line
    assert snapshot(select_run.root) == before  # layers.json not written


@pytest.mark.parametrize("name, damage", [("chains.parquet", truncate),
                                         ("chains.parquet", overwrite),
                                         ("annotations.parquet", truncate)])
def test_damaged_inputs_of_annotate_are_one_line(chains_run, tokenizer, name, damage):
    """Damaged chains, and damaged annotations of an earlier run (the resume path)."""
    from nnsteer.annotation.stage import annotate_chains

    annotate_chains(chains_run, annotator="rules", tokenizer=tokenizer)
    damage(chains_run.path(name))
    before = snapshot(chains_run.root)
    code, stderr = invoke("--run-dir", str(chains_run.root), "annotate", "--annotator", "rules")
    assert code == 2
    assert one_line(stderr).startswith(f"nnsteer: error: {chains_run.path(name)}: damaged")
    assert snapshot(chains_run.root) == before


def test_damaged_pipeline_state_and_non_utf8_files_are_one_line(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "c.toml"
    config.write_text('[tasks]\nper_category = 1\n')
    assert invoke("--run-dir", str(run), "run", "--config", str(config), "--only", "tasks")[0] == 0
    (run / "pipeline.json").write_text('{"tasks": [')
    before = snapshot(run)
    code, stderr = invoke("--run-dir", str(run), "run", "--config", str(config))
    assert code == 2 and f"{run / 'pipeline.json'}: damaged" in one_line(stderr)
    assert snapshot(run) == before

    config.write_bytes(b"[tasks]\nper_category = 1 # \xff\xfe\n")
    code, stderr = invoke("--run-dir", str(run), "run", "--config", str(config))
    assert code == 2 and one_line(stderr) == f"nnsteer: error: {config}: not UTF-8 text"

    tasks = tmp_path / "t.jsonl"
    tasks.write_bytes(b'{"prompt": "What is 2 + 2?", "category": "mathematical-logic"}\n\xff\n')
    code, stderr = invoke("--run-dir", str(run), "tasks", "--from", str(tasks))
    assert code == 2 and one_line(stderr).startswith(f"nnsteer: error: {tasks}: not UTF-8 text")
    assert snapshot(run) == before


# ---------------------------------------------------------------------- config checks

@pytest.mark.parametrize("table, message", [
    ('[attribute]\nmetric = "nlll"', "[attribute] metric = 'nlll': must be one of "
                                     "released-code, nll, kl2, exact"),
    ("[steer]\nbehaviours = 5", "[steer] behaviours = 5: expected list[str]"),
    ('[steer]\nbehaviours = ["backtracing"]', "[steer] behaviours = ['backtracing']: must be one of"),
    ("[select]\nlabels = 5", "[select] labels = 5: expected "),
    ('[select]\nlayers = {backtracking = "x"}', "[select] layers = {'backtracking': 'x'}: expected "
                                                "dict[str, list[int]]"),
    ("[select]\nlayers = {backtracking = [-1]}", "must be 0 or more"),
    ("[select]\nskip_fraction = 1.5", "[select] skip_fraction = 1.5: must be a fraction in [0, 1)"),
    ("[generate]\nlimit = 0", "[generate] limit = 0: must be 1 or more"),
    ('[annotate]\nannotator = "gpt4"', "[annotate] annotator = 'gpt4': must be auto, learned, rules or "
                                       "openai:<model>"),
    ('[extract]\nvariant = "papr"', "[extract] variant = 'papr': must be one of paper, released-code"),
    ('[model]\ndtype = "float8"', "[model] dtype = 'float8': must be one of auto"),
    ('[model]\nname = "missing.gguf"', "[model] name = 'missing.gguf': missing.gguf: no such GGUF file"),
    ('[model]\nname = "no/such/model/path"', "[model] name = 'no/such/model/path': unknown model"),
])
def test_whole_config_is_checked_before_the_first_stage(tmp_path, table, message):
    """A bad value anywhere stops ``nnsteer run`` before any stage runs or any file changes."""
    run = tmp_path / "run"
    good = tmp_path / "good.toml"
    good.write_text("[tasks]\nper_category = 1\n")
    assert invoke("--run-dir", str(run), "run", "--config", str(good), "--only", "tasks")[0] == 0
    before = snapshot(run)
    config = tmp_path / "x.toml"
    config.write_text(f"[tasks]\nper_category = 2\n{table}\n")
    code, stderr = invoke("--run-dir", str(run), "run", "--config", str(config))
    assert code == 2
    line = one_line(stderr)
    assert line.startswith(f"nnsteer: error: {config}: ") and message in line, line
    assert "running" not in stderr
    assert snapshot(run) == before


# ------------------------------------------------------------------ two writers, SIGKILL

@contextlib.contextmanager
def holding(run: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the run directory's lock until the block ends (SIGKILL)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from nnsteer.runs.store import run_lock\n"
         f"with run_lock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def refused(run: Path, holder: subprocess.Popen, *command: str) -> bool:
    """Whether ``nnsteer --run-dir RUN COMMAND`` is refused in one line naming ``holder``."""
    code, stderr = invoke("--run-dir", str(run), *command)
    line = one_line(stderr)
    return code == 1 and line.startswith(
        f"nnsteer: error: {run.resolve()} is in use by process {holder.pid} (on ") and line.endswith(
        "wait for it to finish, or stop it")


def test_second_writer_is_refused_and_a_dead_ones_lock_taken_over(tmp_path):
    run = tmp_path / "run"
    assert invoke("--run-dir", str(run), "tasks", "--per-category", "1")[0] == 0
    before = snapshot(run)
    with holding(run) as holder:
        assert refused(run, holder, "tasks", "--per-category", "2")
        assert {k: v for k, v in snapshot(run).items() if k != LOCK_NAME} == before
    assert (run / LOCK_NAME).exists()  # left by the killed holder: free again
    code, stderr = invoke("--run-dir", str(run), "tasks", "--per-category", "2")
    assert code == 0, stderr
    assert not (run / LOCK_NAME).exists()
    with run_lock(run), run_lock(run):  # nests in one process
        assert (run / LOCK_NAME).exists()


def test_a_new_run_directory_is_locked_from_the_start(tmp_path):
    """A writer on a directory that does not exist yet makes it and holds it at once; one
    that leaves it empty removes what it made."""
    run = tmp_path / "new" / "run"
    with holding(run) as holder:
        assert refused(run, holder, "tasks", "--per-category", "1")
        assert [p.name for p in run.iterdir()] == [LOCK_NAME]
    other = tmp_path / "other" / "run"
    with run_lock(other):
        assert other.is_dir()
    assert not (tmp_path / "other").exists()


def race(*commands: list[str]) -> list[tuple[int, str]]:
    """Start ``nnsteer COMMAND`` for every command at once; each one's exit code and stderr."""
    processes = [subprocess.Popen([sys.executable, "-m", "nnsteer", *command], text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for command in commands]
    return [(process.wait(timeout=600), process.stderr.read()) for process in processes]


def check_raced(results: list[tuple[int, str]], run: Path) -> list[int]:
    """Each racer either finished or was refused in one line; nothing half-written is
    left. The indices of those that finished."""
    finished = []
    for index, (code, stderr) in enumerate(results):
        if code == 0:
            finished.append(index)
        else:
            assert code == 1, stderr
            assert f"{run.resolve()} is in use by process " in one_line(stderr)
    assert finished, results
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no lock, no temporary
    return finished


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llama) -> Path:
    """The tiny Llama saved as a local model directory, for commands in other processes."""
    path = tmp_path_factory.mktemp("model") / "tiny-llama"
    tiny_llama.hf_model.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("exists", [False, True], ids=["new-directory", "existing-directory"])
def test_two_imports_at_once_lose_nothing(tmp_path, model_dir, exists):
    """Two ``import`` commands started together on one run directory: the vectors and
    layers.json name the same labels, those of the commands that finished."""
    from test_export import cvector_generator_file

    from nnsteer.steer.choices import read_layers
    from nnsteer.vectors.extract import load_vectors

    run = tmp_path / "new"
    if exists:
        run.mkdir()
    files = {}
    for name, layer in (("alpha", 1), ("beta", 2)):
        files[name] = tmp_path / f"{name}.gguf"
        cvector_generator_file(files[name], {layer: torch.ones(64).numpy()})
    results = race(*[["--run-dir", str(run), "import", str(path), "--as", name, "--model",
                      str(model_dir), "--device", "cpu"] for name, path in files.items()])
    finished = {list(files)[i] for i in check_raced(results, run)}
    assert set(load_vectors(run / "vectors.safetensors").labels) == finished
    assert set(read_layers(run / "layers.json")) == finished


@pytest.mark.parametrize("exists", [False, True], ids=["new-directory", "existing-directory"])
def test_two_task_commands_at_once_lose_nothing(tmp_path, exists):
    """Two ``tasks`` commands started together: tasks.parquet is whole, and one of them wrote it."""
    run = tmp_path / "new"
    if exists:
        run.mkdir()
    counts = (1, 2)
    results = race(*[["--run-dir", str(run), "tasks", "--per-category", str(n)] for n in counts])
    finished = [counts[i] for i in check_raced(results, run)]
    tasks = pl.read_parquet(run / "tasks.parquet")
    written = pl.read_parquet_metadata(run / "tasks.parquet")
    per_category = json.loads(written["metadata"])["options"]["per_category"]
    assert per_category in finished
    assert tasks.filter(pl.col("split") == "train").height == 10 * per_category


def test_sigkill_while_outputs_are_set_aside_loses_nothing(tmp_path):
    """A real ``nnsteer run`` killed while the tasks stage reruns with new options (asking
    a server that never answers): the next run puts the finished outputs back."""
    run = tmp_path / "run"
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text("[tasks]\nper_category = 1\n")
    assert invoke("--run-dir", str(run), "run", "--config", str(old), "--only", "tasks")[0] == 0
    before = snapshot(run)
    server = FakeLLM("hang", hang_s=30)
    new.write_text(f'[tasks]\nsource = "claude"\nbase_url = "{server.url}"\n'
                   "per_category = 1\neval_per_category = 0\n")
    killed_once_asked(server, "ANTHROPIC_API_KEY", "--run-dir", str(run), "run", "--config",
                      str(new), "--only", "tasks")
    assert not (run / "tasks.parquet").exists()  # set aside when it was killed
    code, stderr = invoke("--run-dir", str(run), "run", "--config", str(old), "--only", "tasks")
    assert code == 0 and "skipped (up to date)" in stderr, stderr
    after = snapshot(run)
    assert after["tasks.parquet"] == before["tasks.parquet"]
    assert not [name for name in after if name.endswith((".set-aside", ".unfinished"))]


# ---------------------------------------------------------------------- input checks

def test_wrong_case_status_and_repeated_chains_are_refused(chains_run, tokenizer):
    from nnsteer.annotation.stage import annotate_chains
    from nnsteer.errors import BadInput
    from nnsteer.vectors.extract import read_inputs

    annotate_chains(chains_run, annotator="rules", tokenizer=tokenizer)
    rows = pl.read_parquet(chains_run.annotations)
    write_parquet(rows.with_columns(pl.col("status").str.to_uppercase()), chains_run.annotations, {})
    with pytest.raises(BadInput, match=r"annotations.parquet: row 0: status 'OK' is not one of ok, "):
        read_inputs(chains_run, "smollm2-135m")

    chains = pl.read_parquet(chains_run.chains)
    write_parquet(pl.concat([chains, chains.head(1)]), chains_run.chains, {})
    before = snapshot(chains_run.root)
    code, stderr = invoke("--run-dir", str(chains_run.root), "annotate", "--annotator", "rules")
    assert code == 2
    assert one_line(stderr) == (f"nnsteer: error: {chains_run.chains}: chain_id 'c0' appears "
                                "more than once")
    assert snapshot(chains_run.root) == before


def test_prompt_longer_than_the_model_is_refused(tiny_llama):
    from nnsteer.errors import BadInput
    from nnsteer.generation.chains import ChainJob, check_lengths

    limit = tiny_llama.hf_model.config.max_position_embeddings
    job = ChainJob(chain_id="t1", task_id="t1", split="train", prompt="seven " * limit)
    with pytest.raises(BadInput, match=rf"task t1: its prompt of \d+ tokens and max_new_tokens 10 "
                                       rf"exceed the {limit} positions of tiny-llama"):
        check_lengths(tiny_llama, [job], 10)
    check_lengths(tiny_llama, [ChainJob(chain_id="t2", task_id="t2", split="train",
                                        prompt="What is 2 + 2?")], 10)


def test_vectors_from_other_annotations_are_refused(chains_run, tokenizer):
    from nnsteer.annotation.stage import annotate_chains
    from nnsteer.errors import BadInput
    from nnsteer.runs.store import file_digest
    from nnsteer.vectors.extract import check_current

    annotate_chains(chains_run, annotator="rules", tokenizer=tokenizer)
    vectors = {"backtracking": torch.ones(2, 4)}
    check_current(VectorSet(vectors, {"annotations": file_digest(chains_run.annotations)}), chains_run)
    with pytest.raises(BadInput, match="vectors.safetensors was extracted from other annotations "
                                       "than .*annotations.parquet: rerun `nnsteer extract`"):
        check_current(VectorSet(vectors, {"annotations": "0" * 64}), chains_run)


# ------------------------------------------------ every file import, export and annotate read

def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _json(value) -> callable:
    def write(path: Path) -> None:
        path.write_text(json.dumps(value))
    return write


def _tensors(shapes: dict[str, tuple[int, ...]]) -> callable:
    def write(path: Path) -> None:
        save_vectors(VectorSet({k: torch.ones(*shape) for k, shape in shapes.items()}), path)
    return write


def _pt(content) -> callable:
    def write(path: Path) -> None:
        torch.save(content, path)
    return write


def _gguf(directions: dict[int, object]) -> callable:
    def write(path: Path) -> None:
        from test_export import cvector_generator_file

        cvector_generator_file(path, directions)
    return write


def _frame(**columns) -> callable:
    def write(path: Path) -> None:
        df = pl.read_parquet(path)
        write_parquet(df.with_columns(**{k: pl.Series(v) for k, v in columns.items()}), path, {})
    return write


def _drop(column: str) -> callable:
    def write(path: Path) -> None:
        write_parquet(pl.read_parquet(path).drop(column), path, {})
    return write


def _bytes(data: bytes) -> callable:
    def write(path: Path) -> None:
        path.write_bytes(data)
    return write


#: The vectors and layers.json of a run that export and import read (4 layers of width 64).
_RUN_LAYERS = {"backtracking": {"vector_layer": 1, "layers": [1, 2], "coefficient": 2.0}}
#: (command, the file it reads: a run file or one beside the run, how it is damaged, what
#: the one line says after the file's path).
FILE_FAULTS = [
    *[(command, name, damage, said)
      for command in ("export", "import")
      for name, damage, said in [
          ("vectors.safetensors", truncate, "damaged or not an nnsteer file"),
          ("vectors.safetensors", _empty, "damaged or not an nnsteer file"),
          ("vectors.safetensors", overwrite, "damaged or not an nnsteer file"),
          ("vectors.safetensors", _tensors({"backtracking": (4, 64, 2)}),
           "vectors must all be [n_layers, d_model]"),
          ("layers.json", truncate, "damaged or not an nnsteer file"),
          ("layers.json", _empty, "damaged or not an nnsteer file"),
          ("layers.json", _json(["backtracking"]), ""),
          ("layers.json", _json({"backtracking": {"vector_layer": 1, "layers": "1",
                                                  "coefficient": 1.0}}), ""),
      ]],
    ("import", "vectors.safetensors", _tensors({"backtracking": (3, 64)}),
     "vectors are [3, 64] per label but"),
    ("import", "in.gguf", truncate, "damaged or not an nnsteer file"),
    ("import", "in.gguf", _empty, "damaged or not an nnsteer file"),
    ("import", "in.gguf", overwrite, "damaged or not an nnsteer file"),
    ("import", "in.gguf", _gguf({1: np.ones((2, 32))}), "direction.1 must be a float32 1-D"),
    ("import", "in.gguf", _gguf({1: np.ones(32)}), "its vectors have width 32"),
    ("import", "in.pt", truncate, "damaged or not an nnsteer file"),
    ("import", "in.pt", _empty, "damaged or not an nnsteer file"),
    ("import", "in.pt", _pt([torch.ones(64)]), "expected a {layer: tensor} dict"),
    ("import", "in.pt", _pt({1: torch.ones(2, 32)}), "layer 1: has shape [2, 32]"),
    ("import", "in.json", truncate, "damaged or not an nnsteer file"),
    ("import", "in.json", _bytes(b"\xff\xfe{}"), "not UTF-8 text"),
    ("annotate", "chains.parquet", truncate, "damaged or not an nnsteer file"),
    ("annotate", "chains.parquet", _empty, "damaged or not an nnsteer file"),
    ("annotate", "chains.parquet", _frame(thinking_start=["0", "0", "0"]),
     "column thinking_start holds String, not integers"),
    ("annotate", "chains.parquet", _frame(response=[None, "x", "y"]), "row 0: response is empty"),
    ("annotate", "chains.parquet", _drop("output_ids"), "missing column(s) output_ids"),
    ("annotate", "annotations.parquet", truncate, "damaged or not an nnsteer file"),
    ("annotate", "annotations.parquet", _empty, "damaged or not an nnsteer file"),
    ("annotate", "prompt.txt", _bytes(b"Label this: \xff\xfe"), ""),
    ("annotate", "prompt.txt", _empty, ""),
]


@pytest.fixture
def fault_run(tmp_path, chains_run, tokenizer) -> RunDir:
    """Chains annotated by the rules, vectors and a layers.json: what the commands read."""
    from test_export import cvector_generator_file

    from nnsteer.annotation.stage import annotate_chains

    annotate_chains(chains_run, annotator="rules", tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(0)
    save_vectors(VectorSet({label: torch.randn(4, 64, generator=gen)
                            for label in ("backtracking", "overall")}), chains_run.vectors)
    chains_run.layers.write_text(json.dumps(_RUN_LAYERS))
    cvector_generator_file(tmp_path / "in.gguf", {1: np.ones(64)})
    torch.save({1: torch.ones(64)}, tmp_path / "in.pt")
    (tmp_path / "in.json").write_text(json.dumps({"stage": "export"}))
    (tmp_path / "prompt.txt").write_text("Label this reasoning: {thinking}")
    return chains_run


@pytest.mark.parametrize("command, name, damage, said", FILE_FAULTS)
def test_damaged_files_of_import_export_and_annotate_are_one_line(
        fault_run, model_dir, tmp_path, command, name, damage, said):
    """The command exits 2 with one line naming the file, and the run directory is byte
    for byte as it was."""
    run = fault_run
    path = run.path(name) if (run.root / name).exists() else tmp_path / name
    damage(path)
    before = snapshot(run.root)
    if command == "export":
        args = ["export", "--behaviour", "backtracking", "--out", str(tmp_path / "out.gguf")]
    elif command == "import":
        source = tmp_path / ("in.pt" if name in ("in.pt", "in.json") else "in.gguf")
        args = ["import", str(source), "--as", "mine", "--model", str(model_dir), "--device", "cpu"]
    else:
        args = ["annotate", "--annotator", "rules"]
        if name == "prompt.txt":
            args = ["annotate", "--annotator", "openai:gpt-4o", "--base-url", "http://127.0.0.1:9",
                    "--annotator-prompt", str(path)]
    code, stderr = invoke("--run-dir", str(run.root), *args)
    assert code == 2, stderr
    line = one_line(stderr)
    assert str(path) in line and said in line, line
    assert snapshot(run.root) == before
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("where", ["option", "config"])
@pytest.mark.parametrize("run_dir, why", [("afile", "File exists"), ("afile/run", "Not a directory"),
                                          ("runs/x\x00y", "embedded null byte")],
                         ids=["a-file", "under-a-file", "nul"])
def test_a_run_directory_that_cannot_be_is_one_line(tmp_path, monkeypatch, where, run_dir, why):
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("mine")
    if where == "option":
        if "\x00" in run_dir:
            pytest.skip("a command line cannot hold a NUL")
        code, stderr = invoke("--run-dir", run_dir, "tasks", "--per-category", "1")
    else:
        Path("c.toml").write_text(f"run_dir = {json.dumps(run_dir)}\n[tasks]\nper_category = 1\n")
        code, stderr = invoke("run", "--config", "c.toml")
    assert code == 2
    line = one_line(stderr)
    assert ("is a file" if (where, run_dir) == ("option", "afile") else why) in line, line
    assert Path("afile").read_text() == "mine" and sorted(os.listdir()) == sorted(
        ["afile", *(["c.toml"] if where == "config" else [])])


def test_writing_under_a_file_is_one_line(tmp_path):
    from nnsteer.errors import BadInput
    from nnsteer.runs.store import write_json

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(BadInput, match=rf"^{tmp_path}/afile/x.json: cannot write there \("):
        write_json(tmp_path / "afile" / "x.json", {})
