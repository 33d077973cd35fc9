"""The LLM annotator against a local Chat Completions server, through the real openai client."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import polars as pl
import pytest

from nnsteer.annotation.llm import PROMPT, PROMPT_VERSION, annotate_texts
from nnsteer.annotation.stage import annotate_chains, annotate_frame
from nnsteer.errors import BadInput
from nnsteer.runs.store import RunDir, read_metadata, write_parquet

TEXTS = ["Okay, so I need to find x. We know 2x = 6.",
         "So x = 3. Wait, maybe I should check that.",
         "Let me test x = 3: 2 * 3 = 6. I remember that 6 is even."]


def labelled(text: str) -> str:
    """A well-formed reply: the first sentence initializing, the rest deduction."""
    first, _, rest = text.partition(". ")
    reply = f'["initializing"]{first}.["end-section"]'
    return reply + (f'\n["deduction"]{rest}["end-section"]' if rest else "")


class ChatServer:
    """A Chat Completions endpoint on 127.0.0.1; ``respond(body, n)`` → (status, reply text,
    or the error message when the status is not 200).

    It records every request and refuses more than ``limit`` of them.
    """

    def __init__(self, respond: Callable[[dict, int], tuple[int, str]], limit: int = 50) -> None:
        self.respond, self.limit = respond, limit
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                    n = len(server.requests)
                status, text = (429, "") if n > server.limit else server.respond(body, n)
                if status == 200:
                    payload = {"id": f"r{n}", "object": "chat.completion", "created": 0,
                               "model": body["model"], "choices": [{
                                   "index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": text}}]}
                else:
                    payload = {"error": {"message": text or f"status {status}", "type": "test"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("retry-after-ms", "5")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def texts(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.requests]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    servers: list[ChatServer] = []

    def start(respond):
        servers.append(ChatServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _well_formed(body: dict, n: int) -> tuple[int, str]:
    return 200, labelled(body["messages"][-1]["content"])


def test_normal_run(serve, tmp_path):
    server = serve(_well_formed)
    results = annotate_texts(TEXTS, base_url=server.url, workers=3, cache_dir=tmp_path,
                             progress=False)
    assert len(server.requests) == 3
    for body, headers in zip(server.requests, server.headers):
        assert body["model"] == "gpt-4o" and body["temperature"] == 0
        assert body["messages"][0] == {"role": "system", "content": PROMPT}
        assert headers["authorization"] == "Bearer sk-test"
    assert sorted(server.texts()) == sorted(TEXTS)
    for text, spans in zip(TEXTS, results):  # results come back in input order
        assert spans[0].label == "initializing" and spans[0].start == 0
        assert [text[s.start:s.end] for s in spans] == [s.text for s in spans]
    cached = list((tmp_path / "gpt-4o").glob(f"v{PROMPT_VERSION}-*.json"))
    assert len(cached) == 3


def test_429_then_success(serve, tmp_path):
    server = serve(lambda body, n: (429, "") if n == 1 else _well_formed(body, n))
    [spans] = annotate_texts(TEXTS[:1], base_url=server.url, cache_dir=tmp_path, progress=False)
    assert len(server.requests) == 2
    assert [s.label for s in spans] == ["initializing", "deduction"]


def test_broken_reply_is_retried_once_then_reported(serve, tmp_path):
    server = serve(lambda body, n: (200, "Sure! Here is the annotated text: x is 3."))
    chains = pl.DataFrame({"chain_id": ["c0"], "response": [TEXTS[0]],
                           "thinking_start": [0], "thinking_end": [len(TEXTS[0])]})
    rows = annotate_frame(chains, annotator="openai:gpt-4o", base_url=server.url,
                          cache_dir=tmp_path, progress=False)
    assert len(server.requests) == 2
    assert rows.select("chain_id", "label", "start", "end", "status").row(0) == (
        "c0", None, -1, -1, "failed")
    assert "no labels" in rows["text"][0]
    assert not list(tmp_path.rglob("*.json"))  # a broken reply is not cached


def test_interrupted_run_resumes_from_cache(serve, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("NNSTEER_CACHE", str(tmp_path / "cache"))
    # First run: the server rejects the third chain (a 400 is not retried).
    server = serve(lambda body, n: (400, "") if body["messages"][-1]["content"] == TEXTS[2]
                   else _well_formed(body, n))
    run = RunDir(tmp_path / "run")
    chains = pl.DataFrame({
        "chain_id": ["c0", "c1", "c2"], "model": "m", "prompt_ids": [[1]] * 3,
        "output_ids": [tokenizer.encode(t) for t in TEXTS], "response": TEXTS, "thinking_start": [0] * 3,
        "thinking_end": [len(t) for t in TEXTS]})
    write_parquet(chains, run.chains, {"stage": "generate"})
    annotate_chains(run, annotator="auto", base_url=server.url, tokenizer=tokenizer)
    first = pl.read_parquet(run.annotations)
    assert first.filter(pl.col("status") == "failed")["chain_id"].to_list() == ["c2"]
    assert read_metadata(run.annotations)["options"]["annotator"] == "openai:gpt-4o"
    assert len(server.requests) == 3

    # Resumed: only the failed chain is asked for.
    server.respond = _well_formed
    annotate_chains(run, annotator="openai:gpt-4o", base_url=server.url, tokenizer=tokenizer)
    assert server.texts()[3:] == [TEXTS[2]]
    assert set(pl.read_parquet(run.annotations)["status"]) == {"ok"}

    # A fresh run (annotations file gone) is served from the reply cache: no request at all.
    run.annotations.unlink()
    monkeypatch.delenv("OPENAI_API_KEY")
    rows = annotate_frame(chains, annotator="openai:gpt-4o", base_url=None,
                          cache_dir=tmp_path / "cache" / "annotations", progress=False)
    assert len(server.requests) == 4
    assert rows.filter(pl.col("status") == "ok")["chain_id"].unique().sort().to_list() == [
        "c0", "c1", "c2"]


def test_missing_key_is_bad_input(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(BadInput, match="OPENAI_API_KEY"):
        annotate_texts(TEXTS, cache_dir=tmp_path, progress=False)


def test_rejected_key_stops_the_run(serve, tmp_path):
    server = serve(lambda body, n: (401, ""))
    with pytest.raises(BadInput, match="OPENAI_API_KEY was rejected"):
        annotate_texts(TEXTS[:1], base_url=server.url, cache_dir=tmp_path, progress=False)


def test_model_refusing_temperature_0_is_asked_at_its_default(serve, tmp_path, capsys):
    # What OpenAI's reasoning models answer to temperature=0.
    refusal = ("Unsupported value: 'temperature' does not support 0 with this model. "
               "Only the default (1) value is supported.")
    server = serve(lambda body, n: (400, refusal) if "temperature" in body else _well_formed(body, n))
    results = annotate_texts(TEXTS, model="gpt-5", base_url=server.url, workers=3,
                             cache_dir=tmp_path, progress=False)
    assert all(isinstance(spans, list) and spans for spans in results)
    asked_without = [body for body in server.requests if "temperature" not in body]
    assert len(asked_without) == 3  # every text annotated once, at the default temperature
    assert len(server.requests) <= 6  # refused at most once per worker
    assert capsys.readouterr().err.count("does not accept temperature 0") == 1


def test_other_bad_requests_are_not_retried_without_temperature(serve, tmp_path):
    server = serve(lambda body, n: (400, "maximum context length exceeded"))
    [result] = annotate_texts(TEXTS[:1], base_url=server.url, cache_dir=tmp_path, progress=False)
    assert "context length" in result.reason
    assert len(server.requests) == 1 and server.requests[0]["temperature"] == 0


def test_annotator_prompt_file_replaces_the_prompt_and_keys_the_cache(serve, tmp_path):
    from nnsteer.annotation.stage import read_annotator_prompt

    server = serve(lambda body, n: (200, labelled(body["messages"][-1]["content"].split("|")[1])))
    ours = "Label this: |{thinking}| and nothing else."
    [spans] = annotate_texts(TEXTS[:1], model="gpt-4.1", base_url=server.url,
                             cache_dir=tmp_path, progress=False, prompt=ours)
    assert server.requests[0]["messages"] == [
        {"role": "user", "content": ours.replace("{thinking}", TEXTS[0])}]
    assert [s.label for s in spans] == ["initializing", "deduction"]
    annotate_texts(TEXTS[:1], model="gpt-4.1", base_url=server.url, cache_dir=tmp_path,
                   progress=False, prompt=ours)
    assert len(server.requests) == 1  # cached under the prompt's hash
    other = "Label this: |{thinking}| now."
    annotate_texts(TEXTS[:1], model="gpt-4.1", base_url=server.url, cache_dir=tmp_path,
                   progress=False, prompt=other)
    assert len(server.requests) == 2  # another prompt: not the cached reply
    assert len(list((tmp_path / "gpt-4.1").glob("p*.json"))) == 2
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(BadInput, match="--annotator-prompt .*empty.txt: the file is empty"):
        read_annotator_prompt(tmp_path / "empty.txt", "openai:gpt-4.1")
    with pytest.raises(BadInput, match="rules annotator takes no prompt"):
        read_annotator_prompt(tmp_path / "empty.txt", "rules")


@pytest.mark.parametrize("entry", [b"\xff\xfe not UTF-8", b'{"reply": 5}', b"[1, 2]", b'"text"',
                                   b'{"reply": null}', b"{"],
                         ids=["not-utf8", "number", "list", "string", "null", "truncated"])
def test_a_damaged_cache_entry_is_asked_again_and_replaced(serve, tmp_path, entry):
    server = serve(_well_formed)
    first = annotate_texts(TEXTS[:1], base_url=server.url, cache_dir=tmp_path, progress=False)
    [path] = (tmp_path / "gpt-4o").glob("*.json")
    path.write_bytes(entry)
    again = annotate_texts(TEXTS[:1], base_url=server.url, cache_dir=tmp_path, progress=False)
    assert again == first and len(server.requests) == 2
    assert json.loads(path.read_text())["reply"] == labelled(TEXTS[0])
