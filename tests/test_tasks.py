"""Tasks: the built-in set, user files, and Claude generation against a local Messages API."""

from __future__ import annotations

import json
import re
import string
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest
from click.testing import CliRunner

from nnsteer.cli import cli
from nnsteer.errors import BadInput, NnsteerError
from nnsteer.runs.store import RunDir, read_metadata
from nnsteer.tasks.claude import PROGRESS_FILE, generate_tasks
from nnsteer.tasks.stage import (
    BUILTIN_PATH,
    CATEGORIES,
    load_builtin_tasks,
    normalise,
    read_task_file,
    write_tasks,
)

PAPER_CATEGORIES = [
    "Mathematical Logic", "Spatial Reasoning", "Verbal Logic", "Pattern Recognition",
    "Lateral Thinking", "Causal Reasoning", "Probabilistic Thinking", "Systems Thinking",
    "Creative Problem Solving", "Scientific Reasoning",
]


def plain_key(text: str) -> str:
    """A key stricter than the dedup key, written out independently: lowercase, digits -> #,
    single spaces (the built-in tasks differ by more than their numbers)."""
    text = re.sub(r"[0-9]+([.,][0-9]+)*", "#", text.lower())
    return " ".join(text.split())


def raw_builtin() -> list[dict]:
    return [json.loads(line) for line in BUILTIN_PATH.read_text().splitlines()]


# --- the built-in set ---------------------------------------------------------------


def test_builtin_set_has_33_tasks_per_category_and_no_duplicates():
    tasks = load_builtin_tasks()
    assert list(CATEGORIES) == PAPER_CATEGORIES
    assert tasks.columns == ["task_id", "category", "prompt", "answer", "split", "source"]
    assert len(tasks) == 330
    for category in PAPER_CATEGORIES:
        rows = tasks.filter(pl.col("category") == category)
        assert (rows["split"] == "train").sum() == 30, category
        assert (rows["split"] == "eval").sum() == 3, category
    keys = [plain_key(p) for p in tasks["prompt"]]
    assert len(set(keys)) == 330
    train = {plain_key(p) for p in tasks.filter(pl.col("split") == "train")["prompt"]}
    held_out = {plain_key(p) for p in tasks.filter(pl.col("split") == "eval")["prompt"]}
    assert not train & held_out
    assert tasks["task_id"].n_unique() == 330
    assert all("-eval-" in t for t in tasks.filter(pl.col("split") == "eval")["task_id"])
    assert set(tasks["source"]) == {"builtin"}


def test_builtin_tasks_are_questions_with_short_answers():
    for task in raw_builtin():
        assert 50 <= len(task["prompt"]) <= 400, task["task_id"]
        assert task["prompt"].rstrip()[-1] in "?.", task["task_id"]
        assert task["answer"] is None or 0 < len(task["answer"]) <= 200, task["task_id"]
    assert sum(t["answer"] is not None for t in raw_builtin()) >= 280


def test_normalise_ignores_case_and_spacing_but_not_numbers():
    assert normalise("  A train leaves at 9:00,\n at 60 km/h ") == "a train leaves at 9:00, at 60 km/h"
    assert normalise("Sum of 3.5 AND 1,000") == normalise("sum  of 3.5 and 1,000")
    assert normalise("What is 2+2?") != normalise("What is 3+3?")
    assert normalise("two dice") != normalise("three dice")


def test_a_file_may_use_its_own_categories(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("prompt,category,split\nWhat is 2+2?,Arithmetic,train\nWhat is 3+3?,Arithmetic,eval\n"
                    "Which way is west?,spatial reasoning,train\n")
    tasks = write_tasks(RunDir(tmp_path / "run"), source="file", path=path)
    assert tasks.select("task_id", "category").rows() == [  # the paper's categories first
        ("spatial-reasoning-001", "Spatial Reasoning"), ("arithmetic-001", "Arithmetic"),
        ("arithmetic-eval-001", "Arithmetic")]


def test_write_tasks_keeps_the_first_tasks_of_each_category(tmp_path):
    run = RunDir(tmp_path)
    tasks = write_tasks(run, per_category=2, eval_per_category=1)
    assert len(tasks) == 30
    expected = []
    for category in PAPER_CATEGORIES:
        rows = [t for t in raw_builtin() if t["category"] == category]
        expected += [t["task_id"] for t in rows if t["split"] == "train"][:2]
        expected += [t["task_id"] for t in rows if t["split"] == "eval"][:1]
    assert tasks["task_id"].to_list() == expected
    assert pl.read_parquet(run.tasks).equals(tasks)
    meta = read_metadata(run.tasks)
    assert meta["stage"] == "tasks"
    assert meta["options"]["per_category"] == 2 and meta["options"]["source"] == "builtin"


# --- user files -----------------------------------------------------------------------


def test_jsonl_file_fills_ids_and_default_split(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"prompt": "How many legs do 3 spiders have?", "category": "Mathematical Logic", "answer": 24},
        {"prompt": "Which way is west when facing north?", "category": "spatial reasoning"},
        {"prompt": "Is it valid?", "category": "Verbal Logic", "split": "eval", "task_id": "mine-1"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    tasks = write_tasks(RunDir(tmp_path / "run"), source="file", path=path)
    assert tasks.rows() == [
        ("mathematical-logic-001", "Mathematical Logic", rows[0]["prompt"], "24", "train", "file"),
        ("spatial-reasoning-001", "Spatial Reasoning", rows[1]["prompt"], None, "train", "file"),
        ("mine-1", "Verbal Logic", "Is it valid?", None, "eval", "file"),
    ]


@pytest.mark.parametrize("name, text, message", [
    ("t.csv", "prompt,category\nWhat is 2+2?,Mathematical Logic\nWhy?, \n",
     "t.csv row 3: empty category"),
    ("t.csv", "prompt,category\n  ,Verbal Logic\n", "t.csv row 2: empty prompt"),
    ("t.csv", "question,category\nWhy?,Verbal Logic\n", "t.csv: missing column(s) prompt"),
    ("t.csv", "prompt,category,split\nWhy?,Verbal Logic,test\n", "t.csv row 2: split must be one of train, validation, eval"),
    ("t.csv", "prompt,category,split\nAdd 2 and 3.,Verbal Logic,train\nadd 2 AND  3.,Verbal Logic,eval\n",
     "t.csv row 3: same task as"),
    ("t.csv", "prompt,category,task_id\nWhy?,Verbal Logic,a\nHow?,Verbal Logic,a\n",
     "t.csv row 3: task_id 'a' already used"),
    ("t.jsonl", '{"prompt": "Why?", "category": "Verbal Logic"}\n{"prompt": "How?",\n',
     "t.jsonl line 2: invalid JSON"),
    ("t.jsonl", '["Why?", "Verbal Logic"]\n', "t.jsonl line 1: expected a JSON object"),
    ("t.txt", "Why?\n", "unknown task file type"),
])
def test_bad_task_file_names_the_row(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadInput, match=re.escape(message)):
        read_task_file(path)


# --- CLI ------------------------------------------------------------------------------


def test_cli_writes_the_builtin_set(tmp_path):
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "tasks"])
    assert result.exit_code == 0, result.output
    assert "330 tasks (300 train, 30 eval)" in result.output
    tasks = pl.read_parquet(tmp_path / "tasks.parquet")
    assert len(tasks) == 330 and tasks["task_id"].n_unique() == 330


def test_cli_bad_csv_row_exits_2_and_keeps_existing_tasks(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["--run-dir", str(tmp_path), "tasks"]).exit_code == 0
    before = (tmp_path / "tasks.parquet").read_bytes()
    csv_path = tmp_path / "tasks.csv"
    csv_path.write_text("prompt,category\nWhat is 2+2?,Mathematical Logic\n"
                        "Name a prime.,Mathematical Logic\n\"Why, though?\",\n")
    result = runner.invoke(cli, ["--run-dir", str(tmp_path), "tasks", "--from", str(csv_path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"nnsteer: error: {csv_path} row 4: empty category"
    ]
    assert (tmp_path / "tasks.parquet").read_bytes() == before


# --- a local Messages API -------------------------------------------------------------

Reply = tuple[int, dict, dict]


def message(text: str, stop_reason: str = "end_turn") -> Reply:
    return 200, {
        "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test",
        "content": [{"type": "text", "text": text}], "stop_reason": stop_reason,
        "stop_sequence": None, "usage": {"input_tokens": 100, "output_tokens": 40},
    }, {}


def api_error(status: int, kind: str) -> Reply:
    return status, {"type": "error", "error": {"type": kind, "message": f"test {kind}"}}, {"retry-after-ms": "1"}


def asked(body: dict) -> tuple[str, int]:
    """The category and number of tasks a request asks for."""
    text = body["messages"][0]["content"]
    return re.search(r'category "([^"]+)"', text)[1], int(re.search(r"Write (\d+) new", text)[1])


def word(k: int) -> str:
    """A number spelled in letters, so that prompts differ after normalisation."""
    letters = ""
    while True:
        k, r = divmod(k, 26)
        letters = string.ascii_lowercase[r] + letters
        if k == 0:
            return letters


class FakeClaude:
    """A Messages API on 127.0.0.1 whose replies come from ``script(n, body)``; None = new tasks.

    Records every request body; shuts itself down after 60 s at the latest.
    """

    def __init__(self, script: Callable[[int, dict], Reply | None], made: int = 0):
        self.script = script
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.made = made  # tasks written so far (by this test's servers), to keep prompts unique
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                assert self.path == "/v1/messages"
                fake.requests.append(body)
                fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                status, payload, headers = fake.script(len(fake.requests), body) or fake.good(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.deadline = threading.Timer(60, self.server.shutdown)
        self.deadline.daemon = True
        self.deadline.start()

    def good(self, body: dict) -> Reply:
        category, n = asked(body)
        tasks = []
        for _ in range(n):
            self.made += 1
            tasks.append({"category": category, "answer": "yes",
                          "prompt": f"Case {word(self.made)}: reason step by step about {category}."})
        return message("Here you are:\n```json\n" + json.dumps(tasks) + "\n```")

    def close(self) -> None:
        self.deadline.cancel()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def claude() -> Iterator[Callable[..., FakeClaude]]:
    servers: list[FakeClaude] = []

    def start(script=lambda n, body: None) -> FakeClaude:
        servers.append(FakeClaude(script, made=servers[-1].made if servers else 0))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")


def generate(run: RunDir, server: FakeClaude, **options) -> pl.DataFrame:
    options = {"per_category": 2, "eval_per_category": 1, "batch_size": 2, "model": "claude-test",
               "base_url": server.url, **options}
    return generate_tasks(run, **options)


def test_generation_asks_one_request_per_category_and_batch(tmp_path, claude, capsys):
    server = claude()
    tasks = generate(RunDir(tmp_path), server)
    # 3 tasks per category in batches of 2: 2 requests per category.
    assert [asked(b) for b in server.requests] == [(c, n) for c in PAPER_CATEGORIES for n in (2, 1)]
    assert len(tasks) == 30
    assert set(tasks["source"]) == {"anthropic:claude-test"}
    math = tasks.filter(pl.col("category") == "Mathematical Logic")
    assert math["task_id"].to_list() == ["mathematical-logic-gen-001", "mathematical-logic-gen-002",
                                         "mathematical-logic-gen-eval-001"]
    assert math["split"].to_list() == ["train", "train", "eval"]
    assert math["prompt"].to_list() == [f"Case {w}: reason step by step about Mathematical Logic."
                                        for w in ("b", "c", "d")]
    assert pl.read_parquet(tmp_path / "tasks.parquet").equals(tasks)
    assert read_metadata(tmp_path / "tasks.parquet")["options"]["model"] == "claude-test"
    first = server.requests[0]
    assert first["model"] == "claude-test" and first["system"] and first["max_tokens"] > 0
    credentials = server.headers[0].get("x-api-key") or server.headers[0].get("authorization", "")
    assert credentials.endswith("test-key")  # the key from the environment (header varies by SDK version)
    # The request shows Claude existing tasks of its category to avoid.
    assert load_builtin_tasks()["prompt"][0] in first["messages"][0]["content"]
    assert "token use: 20 requests, 2000 input and 800 output tokens" in capsys.readouterr().err


@pytest.mark.parametrize("status, kind", [(429, "rate_limit_error"), (529, "overloaded_error"),
                                          (503, "api_error")])
def test_rate_limits_and_overload_are_retried(tmp_path, claude, status, kind):
    server = claude(lambda n, body: api_error(status, kind) if n in (1, 2) else None)
    tasks = generate(RunDir(tmp_path), server)
    assert len(server.requests) == 22
    assert server.requests[0] == server.requests[2]  # the same request, retried
    assert len(tasks) == 30


def test_broken_reply_is_reported_and_skipped_then_asked_again(tmp_path, claude, capsys):
    server = claude(lambda n, body: message('[{"prompt": "Half a list"') if n == 1 else None)
    run = RunDir(tmp_path)
    tasks = generate(run, server)
    assert "Mathematical Logic: reply is not a JSON list; skipped" in capsys.readouterr().err
    math = tasks.filter(pl.col("category") == "Mathematical Logic")
    assert math["split"].to_list() == ["train"] and len(tasks) == 28
    rerun = claude()
    tasks = generate(run, rerun)
    assert [asked(b) for b in rerun.requests] == [("Mathematical Logic", 2)]
    assert len(tasks) == 30


def test_repeats_and_bad_items_are_reported_and_skipped(tmp_path, claude, capsys):
    builtin_prompt = load_builtin_tasks()["prompt"][0]

    def script(n: int, body: dict) -> Reply | None:
        if n != 1:
            return None
        items = [
            {"prompt": builtin_prompt.upper()},  # a built-in task, in capitals
            {"prompt": "Case one: a new task."},
            {"prompt": "case  ONE: a new task."},  # repeats the item before it
            {"prompt": "   "},
            {"prompt": "Case two: wrong place.", "category": "Maths"},
            "not an object",
            {"prompt": "Case three: a new task.", "answer": None},
            {"prompt": "Case four: asked elsewhere.", "category": "verbal logic"},
        ]
        return message(json.dumps(items))

    tasks = generate(RunDir(tmp_path), claude(script))
    err = capsys.readouterr().err
    for problem in ("item 1 repeats an existing task", "item 3 repeats an existing task",
                    "item 4: empty prompt", "item 5: unknown category 'Maths'",
                    "item 6 is not a JSON object", "item 8 is in category 'Verbal Logic'"):
        assert f"Mathematical Logic: {problem}" in err
    math = tasks.filter(pl.col("category") == "Mathematical Logic")
    assert math["prompt"].to_list()[:2] == ["Case one: a new task.", "Case three: a new task."]
    assert math["answer"].to_list()[:2] == [None, None]
    assert len(tasks) == 30


def test_interrupted_run_resumes_without_asking_again(tmp_path, claude, capsys):
    run = RunDir(tmp_path)
    failing = claude(lambda n, body: api_error(500, "api_error") if n > 7 else None)
    with pytest.raises(NnsteerError, match="rerun to continue"):
        generate(run, failing, max_retries=1)
    assert len(failing.requests) == 9  # 7 answered, then one request and its retry
    assert "token use: 7 requests, 700 input and 280 output tokens" in capsys.readouterr().err
    assert not run.tasks.exists()
    kept = [json.loads(line) for line in (tmp_path / PROGRESS_FILE).read_text().splitlines()]
    assert len(kept) == 3 + 3 + 3 + 2  # 7 requests: three categories and one batch of the fourth

    healthy = claude()
    tasks = generate(run, healthy)
    expected = [("Pattern Recognition", 1)] + [(c, n) for c in PAPER_CATEGORIES[4:] for n in (2, 1)]
    assert [asked(b) for b in healthy.requests] == expected
    assert len(tasks) == 30
    by_id = {t["task_id"]: t["prompt"] for t in tasks.iter_rows(named=True)}
    assert all(by_id[t["task_id"]] == t["prompt"] for t in kept)
    again = claude()
    assert generate(run, again).equals(tasks) and not again.requests


def test_missing_api_key_is_one_line_exit_2(tmp_path, claude, monkeypatch):
    server = claude()
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(BadInput, match="ANTHROPIC_API_KEY"):
        generate(RunDir(tmp_path), server)
    result = CliRunner().invoke(cli, ["--run-dir", str(tmp_path), "tasks", "generate", "--base-url", server.url])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "nnsteer: error: ANTHROPIC_API_KEY is not set: export your Anthropic API key to generate tasks"
    ]
    assert not server.requests


def test_cli_generate_against_a_compatible_server(tmp_path, claude):
    server = claude()
    result = CliRunner().invoke(cli, [
        "--run-dir", str(tmp_path), "tasks", "generate", "--per-category", "1", "--eval-per-category", "0",
        "--model", "claude-test", "--base-url", server.url,
    ])
    assert result.exit_code == 0, result.output
    assert "10 tasks (10 train) in 10 categories" in result.output
    assert "token use: 10 requests, 1000 input and 400 output tokens" in result.output
    assert len(server.requests) == 10


def test_pipeline_tasks_stage_asks_claude_once(tmp_path, claude):
    from nnsteer.pipeline.run import read_config, run_pipeline

    server = claude()
    config = tmp_path / "claude.toml"
    config.write_text(f'[tasks]\nsource = "claude"\nclaude_model = "claude-test"\n'
                      f'base_url = "{server.url}"\nper_category = 1\neval_per_category = 1\n')
    lines: list[str] = []
    run = run_pipeline(read_config(config), run_dir=tmp_path / "run", only=["tasks"], log=lines.append)
    tasks = pl.read_parquet(run.tasks)
    assert len(tasks) == 20 and set(tasks["source"]) == {"anthropic:claude-test"}
    assert len(server.requests) == 10 and {r["model"] for r in server.requests} == {"claude-test"}
    run_pipeline(read_config(config), run_dir=run.root, only=["tasks"], log=lines.append)
    assert lines[-1].endswith("skipped (up to date)") and len(server.requests) == 10


def test_claude_options_need_the_claude_source(tmp_path):
    with pytest.raises(BadInput, match="claude_model and base_url are only for source='claude'"):
        write_tasks(RunDir(tmp_path), claude_model="claude-test")


def test_a_reply_without_usage_is_counted_without_tokens(tmp_path, claude, capsys):
    """A compatible server that sends no ``usage``: the tasks are kept, no traceback."""
    def script(n: int, body: dict) -> Reply:
        status, payload, headers = server.good(body)
        return status, {k: v for k, v in payload.items() if k != "usage"}, headers

    server = claude(script)
    tasks = generate(RunDir(tmp_path), server)
    assert len(tasks) == 30
    assert "token use: 20 requests, 0 input and 0 output tokens" in capsys.readouterr().err


def test_key_pieces_a_server_echoes_are_never_printed(tmp_path, claude, monkeypatch):
    """An error reply with the key's first 12 characters, and a task whose category is the
    key: neither the key nor any 8 characters of it reach stderr."""
    key = "ant-FAKE-0123456789abcdefXYZ"
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    run = RunDir(tmp_path)

    def echo(n: int, body: dict) -> Reply:
        if n == 1:
            return message(json.dumps([{"category": key, "prompt": "Why?", "answer": "yes"}]))
        return 400, {"type": "error", "error": {"type": "invalid_request_error",
                                                "message": f"key {key[:12]}... is not allowed"}}, {}

    server = claude(echo)
    result = CliRunner().invoke(cli, ["--run-dir", str(run.root), "tasks", "generate", "--base-url",
                                      server.url, "--per-category", "1", "--eval-per-category", "0"])
    assert result.exit_code == 1
    assert result.stderr.count("nnsteer: error:") == 1 and "Traceback" not in result.stderr
    assert "key ***... is not allowed" in result.stderr
    assert "unknown category '***'" in result.stderr
    assert not [key[i:i + 8] for i in range(len(key) - 7) if key[i:i + 8] in result.stderr]
