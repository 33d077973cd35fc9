"""A loopback NDIF for tests: nnsight 0.8.1's real ``RemoteBackend`` talks to it unchanged.

It speaks the protocol as nnsight 0.8.1's client uses it (``nnsight/intervention/
backends/remote.py``, ``nnsight/ndif.py``), with the version gate and key checks of NDIF's
API service (ndif-team/ndif ``src/services/api/src/dependencies.py``):

- ``POST /request``: a multipart form, field ``data`` (the ``RequestModel`` JSON: model
  key, session id, compress) and file ``blob`` (the serialised request); headers
  ``ndif-api-key``, ``nnsight-version``, ``python-version``. A missing or unknown key gets
  401, an nnsight older than the minimum or another Python major.minor gets 400, each
  with NDIF's ``{"detail": ...}`` body; an unknown model key gets an ERROR response.
  Else the answer is the RECEIVED ``ResponseModel`` whose ``id`` is the job id.
- ``GET /subscribe`` (websocket, RFC 6455, written here on the standard library): the
  first text frame is ``{"session_id": ...}``; then every status of that session's jobs:
  QUEUED, RUNNING, then ERROR or COMPLETED. COMPLETED carries the result inline (a binary
  frame, ``ResponseModel.pickle``) when it is at most ``inline_limit`` bytes, else a URL.
- ``GET /response/{job_id}``: a job's latest status (non-blocking clients poll it; the
  result always behind a URL); ``GET /results/{job_id}``: the result bytes.
- ``GET /status``, ``/env``, ``/whoami``: deployments (with full model keys), the server's
  Python and package versions, and who a key belongs to.

Behind it :func:`strict_remote.serve_request` runs each job (NDIF's allow-lists, bf16
autocast). Jobs run one at a time in a worker thread. Faults for tests:
:meth:`FakeNdif.fail_jobs` answers jobs with ERROR descriptions (``"... evicted ..."``);
``drop_polls`` closes that many ``/response`` connections without an answer.
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import email.policy
import hashlib
import json
import platform
import queue
import socket
import struct
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from typing import Any

from strict_remote import RequestRecord, record_response, serve_request

#: RFC 6455's magic string for the handshake's accept key.
_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@dataclass
class FakeNdif:
    """The fake service's state; serve it with :func:`fake_ndif`."""

    models: dict[str, Any]
    api_keys: frozenset[str] = frozenset({"test-key"})
    min_nnsight: str = field(default_factory=lambda: version("nnsight"))
    python: str = field(default_factory=lambda: ".".join(platform.python_version_tuple()[:2]))
    env_packages: dict[str, str] = field(default_factory=lambda: {
        name: version(name) for name in ("nnsight", "transformers", "torch")})
    inline_limit: int = 1 << 20
    #: Whether the service answers ``/env`` (NDIF's main branch does not).
    has_env: bool = True
    bf16: bool = True
    #: Which NDIF sandbox runs the jobs (``strict_remote.SANDBOXES``).
    sandbox: str = "allow-lists"
    #: ``{model_key: state}`` for /status beyond the served models (RUNNING).
    extra_deployments: dict[str, str] = field(default_factory=dict)
    drop_polls: int = 0
    #: Seconds a job waits in the queue before it runs (for deadline tests).
    queue_delay: float = 0.0
    host: str = ""
    #: Where COMPLETED says the result is (default: ``host``).
    result_host: str = ""
    requests: list[RequestRecord] = field(default_factory=list)
    statuses: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, bytes] = field(default_factory=dict)
    sockets: dict[str, _WebSocket] = field(default_factory=dict)
    jobs: queue.Queue = field(default_factory=queue.Queue)

    def submitted(self) -> int:
        """How many jobs were sent (each one paid for)."""
        return sum(status == "RECEIVED" for _, status in self.statuses)

    def expire_results(self, keep_statuses: bool = False) -> None:
        """Drop every finished job's result, as NDIF does after about 2 hours (and its
        statuses too, unless ``keep_statuses``: then COMPLETED points at a dead URL)."""
        self.results.clear()
        if not keep_statuses:
            self.responses.clear()

    def fail_jobs(self, *descriptions: str) -> None:
        """Answer the next jobs with ERROR and these descriptions (a server traceback)."""
        self.failures.extend(descriptions)

    # --- the API service ----------------------------------------------------------

    def gate(self, headers: Any) -> tuple[int, str] | None:
        """NDIF's checks of a request's headers, in its order: key, nnsight, Python."""
        from packaging.version import Version

        if headers.get("ndif-api-key", "") not in self.api_keys:
            return 401, ("Missing or invalid API key. Please visit https://login.ndif.us/ "
                         "to create a new one.")
        client = headers.get("nnsight-version", "")
        if not client:
            return 400, "Client nnsight version was not provided to the NDIF server."
        if Version(client) < Version(self.min_nnsight):
            return 400, (f"Client nnsight version {client} is incompatible with the server "
                         f"nnsight version. The minimum supported version is "
                         f"{self.min_nnsight}.")
        python = ".".join(headers.get("python-version", "").split(".")[:2])
        if python != self.python:
            return 400, (f"Client python version {python} does not match server version: "
                         f"{self.python}.")
        return None

    def submit(self, metadata: dict[str, Any], blob: bytes) -> dict[str, Any]:
        """Queue one request; the RECEIVED (or ERROR) response."""
        job_id = uuid.uuid4().hex
        model_key = metadata.get("model_key", "")
        if model_key not in self.models:
            return self.respond(job_id, metadata.get("session_id", ""), "ERROR",
                                f"Model {model_key} is not deployed.")
        response = self.respond(job_id, metadata.get("session_id", ""), "RECEIVED",
                                "Your job has been received and is waiting to be queued.")
        self.jobs.put((job_id, metadata, blob))
        return response

    def respond(self, job_id: str, session_id: str, status: str, description: str,
                result: bytes | None = None) -> dict[str, Any]:
        """Record a status, and send it to the job's websocket if it has one."""
        response: dict[str, Any] = {"id": job_id, "status": status, "description": description}
        self.statuses.append((job_id, status))
        if result is not None:
            self.results[job_id] = result
            response["data"] = f"{self.result_host or self.host}/results/{job_id}"
        self.responses[job_id] = response
        connection = self.sockets.get(session_id)
        if connection is not None and status != "RECEIVED":
            if result is not None and len(result) <= self.inline_limit:
                from nnsight.schema.response import ResponseModel

                inline = ResponseModel(id=job_id, status=status, description=description,
                                       data=result)
                connection.send(inline.pickle(), binary=True)
            else:
                connection.send(json.dumps(response).encode())
        return response

    # --- the model service --------------------------------------------------------

    def work(self) -> None:
        """Run queued jobs until a ``None`` arrives."""
        while (job := self.jobs.get()) is not None:
            job_id, metadata, blob = job
            session = metadata.get("session_id", "")
            self.respond(job_id, session, "QUEUED", "Your job has been queued.")
            time.sleep(self.queue_delay)
            self.respond(job_id, session, "RUNNING", "Your job has started running.")
            if self.failures:
                self.respond(job_id, session, "ERROR", self.failures.pop(0))
                continue
            try:
                result = serve_request(self.models[metadata["model_key"]], blob,
                                       bf16=self.bf16, compress=metadata.get("compress", False),
                                       sandbox=self.sandbox)
            except Exception as exc:
                self.respond(job_id, session, "ERROR", f"{traceback.format_exc()}\n{exc}")
                continue
            self.requests.append(record_response("job", blob, result,
                                                 metadata.get("compress", False)))
            self.respond(job_id, session, "COMPLETED", "Your job has been completed.", result)

    def status(self) -> dict[str, Any]:
        deployments = {**{key: "RUNNING" for key in self.models}, **self.extra_deployments}
        entries = {}
        for i, (key, state) in enumerate(deployments.items()):
            suffix = json.loads(key.split(":", 1)[1])
            entries[f"deployment-{i}"] = {
                "model_key": key, "repo_id": suffix["repo_id"],
                "revision": suffix.get("revision") or "main",
                "application_state": state, "deployment_level": "HOT",
            }
        return {"deployments": entries}

    def env(self) -> dict[str, Any]:
        return {"python_version": f"{self.python}.0 (fake NDIF)", "packages": self.env_packages}


class _WebSocket:
    """The server end of one websocket: unmasked frames out, a lock for writer threads."""

    def __init__(self, handler: BaseHTTPRequestHandler) -> None:
        self.handler = handler
        self.lock = threading.Lock()

    def send(self, payload: bytes, binary: bool = False) -> None:
        header = bytes([0x80 | (0x2 if binary else 0x1)])
        n = len(payload)
        if n < 126:
            header += bytes([n])
        elif n < 1 << 16:
            header += bytes([126]) + struct.pack("!H", n)
        else:
            header += bytes([127]) + struct.pack("!Q", n)
        with self.lock:
            self.handler.wfile.write(header + payload)

    def wait_for_close(self) -> None:
        """Read (and drop) the client's frames until it closes."""
        read = self.handler.rfile.read
        while True:
            head = read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", read(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", read(8))[0]
            read(4 + length if head[1] & 0x80 else length)
            if opcode == 0x8:
                with contextlib.suppress(OSError), self.lock:
                    self.handler.wfile.write(b"\x88\x00")
                return


def _handler(ndif: FakeNdif) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _json(self, code: int, body: Any) -> None:
            payload = json.dumps(body).encode()
            self._bytes(code, payload, "application/json")

        def _bytes(self, code: int, payload: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?")[0]
            if path == "/subscribe":
                return self._subscribe()
            if path == "/status":
                return self._json(200, ndif.status())
            if path == "/env" and ndif.has_env:
                return self._json(200, ndif.env())
            if path == "/whoami":
                known = self.headers.get("ndif-api-key") in ndif.api_keys
                return self._json(200, {"email": "user@example.org" if known else None,
                                        "tags": []})
            if path.startswith("/response/"):
                if ndif.drop_polls > 0:
                    ndif.drop_polls -= 1
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if self.headers.get("ndif-api-key") not in ndif.api_keys:
                    return self._json(401, {"detail": "Missing or invalid API key."})
                response = ndif.responses.get(path.removeprefix("/response/"))
                if response is None:
                    return self._json(404, {"detail": "not found"})
                return self._json(200, response)
            if path.startswith("/results/"):
                result = ndif.results.get(path.removeprefix("/results/"))
                if result is not None:
                    return self._bytes(200, result, "application/octet-stream")
            return self._json(404, {"detail": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != "/request":
                return self._json(404, {"detail": "not found"})
            refused = ndif.gate(self.headers)
            if refused is not None:
                return self._json(refused[0], {"detail": refused[1]})
            fields = _multipart(self.headers["Content-Type"], body)
            return self._json(200, ndif.submit(json.loads(fields["data"]), fields["blob"]))

        def _subscribe(self) -> None:
            key = self.headers["Sec-WebSocket-Key"] + _WEBSOCKET_GUID
            accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            session_id = uuid.uuid4().hex
            connection = _WebSocket(self)
            ndif.sockets[session_id] = connection
            connection.send(json.dumps({"session_id": session_id}).encode())
            try:
                connection.wait_for_close()
            finally:
                ndif.sockets.pop(session_id, None)
                self.close_connection = True
            return None

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """The fields of a ``multipart/form-data`` body, by name."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
            for part in message.iter_parts()}


def served(lm: Any, repo: str = "test/tiny-llama") -> str:
    """Give a tiny model a Hub id, and seed nnsight's cache of canonical Hub spellings with
    it (there is no Hub here); the full model key nnsight sends for it."""
    import nnsight.modeling.huggingface as huggingface

    lm.nn.repo_id = repo
    huggingface._ID_CACHE[repo] = repo
    return lm.nn.to_model_key()


@contextlib.contextmanager
def ndif_remote(lm: Any, **options: Any) -> Iterator[FakeNdif]:
    """Run ``lm``'s stages on a :func:`fake_ndif` (``lm.remote = True``, restored after)."""
    saved = lm.remote
    with fake_ndif({served(lm): lm.nn}, **options) as ndif:
        lm.remote = True
        try:
            yield ndif
        finally:
            lm.remote = saved


@contextlib.contextmanager
def fake_ndif(models: dict[str, Any], **options: Any) -> Iterator[FakeNdif]:
    """Serve a :class:`FakeNdif` on 127.0.0.1 and point nnsight's config at it.

    ``models`` maps full model keys (``to_model_key()``) to the nnsight models that run
    them. Sets ``CONFIG.API.HOST`` and, unless given, ``CONFIG.API.APIKEY``; restores both.
    """
    from nnsight.schema.config import CONFIG

    ndif = FakeNdif(models, **options)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ndif))
    server.daemon_threads = True
    ndif.host = f"http://127.0.0.1:{server.server_address[1]}"
    threads = [threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                daemon=True),
               threading.Thread(target=ndif.work, daemon=True)]
    saved = CONFIG.API.HOST, CONFIG.API.APIKEY
    CONFIG.API.HOST, CONFIG.API.APIKEY = ndif.host, "test-key"
    for thread in threads:
        thread.start()
    try:
        yield ndif
    finally:
        CONFIG.API.HOST, CONFIG.API.APIKEY = saved
        ndif.jobs.put(None)
        server.shutdown()
        server.server_close()
        threads[1].join(timeout=30)

