"""A misbehaving Chat Completions server on 127.0.0.1, for the fault-injection tests.

``FakeLLM(mode)`` answers every request in one way, chosen by ``mode`` (it can be
changed between requests):

- ``good``: every sentence of the text labelled, copied exactly;
- ``garbage``: prose with no label; ``empty``: an empty reply;
- ``invented``: the text under labels that are not among the six;
- ``paraphrase``: labelled text that is not the chain's;
- ``partial``: only the first sentence of a long text labelled;
- ``truncated``: a good reply with ``finish_reason = "length"``;
- ``no-choices``: a 200 with no ``choices``; ``bad-json``: a 200 whose body is not JSON;
- ``flaky``: a 429, then a 500, then good replies;
- ``hang``: no answer for ``hang_s`` seconds;
- ``echo-key``: a 500 whose error message repeats the request's key;
- ``echo-key-late``: a reply without labels that repeats the key from its 71st character.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("good", "garbage", "empty", "invented", "paraphrase", "partial", "truncated",
         "no-choices", "bad-json", "flaky", "hang", "echo-key", "echo-key-late")


def labelled(text: str, label: str = "deduction") -> str:
    """Every sentence of ``text`` under ``label``, copied exactly."""
    parts = re.findall(r"[^.!?]+[.!?]*\s*", text)
    return "".join(f'["{label}"]{p}["end-section"]' for p in parts)


class FakeLLM:
    """The server; ``url`` for ``base_url``, ``requests`` counts what it was asked."""

    def __init__(self, mode: str = "good", hang_s: float = 3.0) -> None:
        assert mode in MODES, mode
        self.mode, self.hang_s, self.requests = mode, hang_s, 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests += 1
                    n = server.requests
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                status, payload = server.answer(body, n, key)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("retry-after-ms", "1")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, body: dict, n: int, key: str) -> tuple[int, dict | bytes]:
        text = body["messages"][-1]["content"]
        mode = self.mode
        if mode == "flaky":
            if n <= 2:
                return (429, 500)[n - 1], {"error": {"message": "busy", "type": "test"}}
            mode = "good"
        if mode == "hang":
            time.sleep(self.hang_s)
            mode = "good"
        if mode == "echo-key":
            return 500, {"error": {"message": f"internal error for key {key}", "type": "test"}}
        if mode == "no-choices":
            return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m"}
        if mode == "bad-json":
            return 200, b'{"id": "x", "choices": [{"mess'
        reply = {
            "good": labelled(text), "truncated": labelled(text),
            "garbage": "I'd be glad to help! The reasoning looks fine to me.",
            "empty": "",
            "echo-key-late": "I will not label this. " + "x" * 47 + key,
            "invented": labelled(text, "pondering"),
            "paraphrase": labelled("The model thinks hard about a wholly different question. "
                                   "It then writes something else entirely."),
            "partial": labelled(re.findall(r"[^.!?]+[.!?]*\s*", text)[0]),
        }[mode]
        finish = "length" if mode == "truncated" else "stop"
        return 200, {"id": f"r{n}", "object": "chat.completion", "created": 0,
                     "model": body["model"], "choices": [{
                         "index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": reply}}]}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
