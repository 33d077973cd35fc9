"""NDIF: can a model run there now, and running requests that survive long jobs.

:func:`check_remote` is what ``--remote`` checks before any work (``load_model`` calls it):
the API key, NDIF's environment against this one (``/env``), the key (``/whoami``) and
the served models (``/status``); :func:`check_route` compares the full model key nnsight
sends. :func:`with_retries` runs one batch's request again after a connection error, a
timeout, a 5xx answer or an evicted job, with exponential backoff, and names the batch
when it gives up. :func:`ndif_backend` is the nnsight backend stages send NDIF requests
with: submitted without blocking, polled, re-attached by job id, bounded by a deadline.

Example:
    >>> check_remote("meta-llama/Llama-3.1-8B")          # doctest: +SKIP
    'running'
    >>> ids = with_retries(lambda: run_batch(lm, batch), what="batch 3/12")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nnsteer.errors import BadInput, NnsteerError, first_line
from nnsteer.runs.checkpoint import JobBook

T = TypeVar("T")

#: The request :func:`with_retries` is sending now: its name and where its job id is kept.
CURRENT_REQUEST: ContextVar[tuple[str, JobBook | None]] = ContextVar("request", default=("", None))
#: Seconds between the first two polls of a running NDIF job; later waits double, up to
#: :data:`MAX_POLL_INTERVAL`.
POLL_INTERVAL = 0.05
MAX_POLL_INTERVAL = 2.0

NDIF_KEY_HELP = "export NDIF_API_KEY=<your key> (free key at https://login.ndif.us)"

#: Seconds to wait for each of NDIF's readiness endpoints (/env, /whoami, /status).
CHECK_TIMEOUT = 10.0

#: HTTP statuses worth asking again: rate limited, or the server failed for now.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Words in a failed job's error that mean NDIF may run it if it is sent again.
RETRIED_JOB_ERRORS = ("evicted", "preempted", "try again", "provisioning")


def _ndif_get(path: str, timeout: float, headers: dict[str, str] | None = None,
              missing_ok: bool = False) -> Any:
    """``GET`` an NDIF endpoint's JSON; :class:`NnsteerError` in one line if it fails
    (None for a 404 with ``missing_ok``: a service without that endpoint)."""
    import httpx
    from nnsight.schema.config import CONFIG

    url = f"{CONFIG.API.HOST}{path}"
    try:
        response = httpx.get(url, timeout=timeout, headers=headers)
        response.raise_for_status()
        return response.json()
    except httpx.HTTPStatusError as exc:
        if missing_ok and exc.response.status_code == 404:
            return None
        if exc.response.status_code in (401, 403):
            raise BadInput(f"NDIF refused the API key at {url}: {NDIF_KEY_HELP}") from None
        raise NnsteerError(
            f"cannot reach NDIF at {url} (HTTPStatusError {exc.response.status_code}); "
            "try again later, or run locally without --remote"
        ) from None
    except (httpx.HTTPError, ValueError) as exc:
        raise NnsteerError(
            f"cannot reach NDIF at {url} ({type(exc).__name__}); check the network and "
            "NDIF_HOST, or run locally without --remote"
        ) from None


@dataclass(frozen=True)
class Deployment:
    """One model NDIF serves: its full model key (class, repo, revision, task) and state."""

    repo_id: str
    revision: str
    state: str
    model_key: str | None


def ndif_deployments(timeout: float = CHECK_TIMEOUT) -> list[Deployment]:
    """The deployments NDIF reports on ``/status`` (one per replica)."""
    payload = _ndif_get("/status", timeout)
    return [
        Deployment(value.get("repo_id") or name, value.get("revision") or "main",
                   value.get("application_state", "UNKNOWN"), value.get("model_key"))
        for name, value in payload.get("deployments", {}).items()
    ]


#: The nnsight versions nnsteer runs with (pyproject.toml's pin): never advise another.
NNSIGHT_PIN = ">=0.8.1,<0.9"


def check_environment(server: dict[str, Any]) -> None:
    """Fail in one line if NDIF would refuse, or misread, requests from this environment.

    ``server`` is NDIF's ``/env`` answer. NDIF refuses a client whose Python major.minor
    differs from its own, or whose nnsight is older than its minimum (the version its
    API service runs); a client on another transformers major version loads model
    classes the server reads differently. The advice stays within :data:`NNSIGHT_PIN`.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    packages = server.get("packages", {})
    theirs = str(server.get("python_version", "")).split()[0:1]
    ours = ".".join(platform.python_version_tuple()[:2])
    if theirs and ".".join(theirs[0].split(".")[:2]) != ours:
        wanted = ".".join(theirs[0].split(".")[:2])
        raise BadInput(f"NDIF runs Python {wanted} and refuses requests from Python {ours}: "
                       f"run nnsteer in a Python {wanted} environment")
    minimum = packages.get("nnsight")
    local = importlib.metadata.version("nnsight")
    if minimum and Version(local) < Version(minimum):
        bounds = {spec.operator: Version(spec.version) for spec in SpecifierSet(NNSIGHT_PIN)}
        if Version(minimum) >= bounds["<"]:
            raise BadInput(f"NDIF needs nnsight {minimum} or newer, and nnsteer supports "
                           f"nnsight{NNSIGHT_PIN} only: NDIF cannot run nnsteer's requests "
                           "now; run locally without --remote")
        floor = max(Version(minimum), bounds[">="])
        raise BadInput(f"NDIF needs nnsight {minimum} or newer, this environment has {local}: "
                       f"pip install 'nnsight>={floor},<{bounds['<']}'")
    server_version = packages.get("transformers")
    local_version = importlib.metadata.version("transformers")
    if server_version and Version(local_version).major != Version(server_version).major:
        raise BadInput(
            f"NDIF runs transformers {server_version}, this environment has {local_version}: "
            f"pip install 'transformers=={server_version}'"
        )


def read_environment() -> dict[str, Any] | None:
    """NDIF's ``/env`` answer, or None with a one-line note when the service has none
    (NDIF's main branch has no ``/env``)."""
    server = _ndif_get("/env", CHECK_TIMEOUT, missing_ok=True)
    if server is None:
        warn("NDIF has no /env: its Python and nnsight versions are not checked before "
              "the first request (the server still refuses an incompatible one)")
    return server


def check_api_key(key: str) -> None:
    """:class:`BadInput` unless NDIF's ``/whoami`` knows ``key`` (skipped on a server without it)."""
    try:
        identity = _ndif_get("/whoami", CHECK_TIMEOUT, {"ndif-api-key": key})
    except BadInput:
        raise
    except NnsteerError:
        return  # an older service has no /whoami; /request still checks the key
    if isinstance(identity, dict) and "email" in identity and not identity["email"]:
        raise BadInput(f"NDIF does not recognise this NDIF_API_KEY: {NDIF_KEY_HELP}")


def check_remote(model: str, *, revision: str = "main", hot_swap: bool = False) -> str:
    """Fail in one line unless ``model`` can run on NDIF now; return its state.

    In order: an API key must be set, the name must be a Hub id, NDIF must be reachable
    with an environment it accepts requests from (:func:`check_environment`), must know
    the key, and must be running ``model`` at ``revision``. ``hot_swap`` (for keys that
    may load models on demand) skips that last check. Each failure says what to do.
    """
    from nnsight.schema.config import CONFIG

    if not CONFIG.API.APIKEY:
        raise BadInput(f"--remote needs an NDIF API key: {NDIF_KEY_HELP}")
    if Path(model).expanduser().exists() or "/" not in model:
        raise BadInput(
            f"--remote needs the Hugging Face id of a model NDIF serves, not {model!r}"
        )
    server = read_environment()
    if server is not None:
        check_environment(server)
    check_api_key(CONFIG.API.APIKEY)
    if hot_swap:
        return "hot-swap"
    served = ndif_deployments()
    if any(d.repo_id == model and d.revision == revision and d.state == "RUNNING"
           for d in served):
        return "running"
    running = sorted({d.repo_id for d in served if d.state == "RUNNING"})
    states = {d.state for d in served if d.repo_id == model and d.revision == revision}
    now = f"({min(states).lower()})" if states else "(not deployed)"
    at = "" if revision == "main" else f" at revision {revision}"
    close = difflib.get_close_matches(model, running, n=1, cutoff=0.8)
    hint = f"Did you mean {close[0]}? " if close else ""
    raise BadInput(
        f"NDIF does not serve {model}{at} right now {now}; it runs: "
        f"{', '.join(running) or 'nothing'}. {hint}Pick one of those, use --hot-swap if "
        "your key may load models, or run on a local GPU without --remote"
    )


def remote_model_key(nn: Any, model: str) -> str:
    """The model key nnsight sends for ``nn``; nnsight asks the Hugging Face Hub for the
    repo's canonical spelling, so a Hub it cannot reach is one line here."""
    try:
        return nn.to_model_key()
    except Exception as exc:  # huggingface_hub's offline, HTTP and connection errors
        raise BadInput(
            f"--remote: nnsight could not ask the Hugging Face Hub for {model}'s id "
            f"({first_line(exc)}): NDIF routes by it, so --remote needs the Hub (unset "
            "HF_HUB_OFFLINE, check the network)"
        ) from None


def check_route(model_key: str, *, hot_swap: bool = False) -> None:
    """Fail in one line unless a RUNNING deployment has exactly ``model_key``.

    ``model_key`` is what nnsight 0.8 sends (``to_model_key()``: class, repo, revision,
    task); NDIF routes by it, so a repo id that is served under another class, task or
    revision is not served. Skipped with ``hot_swap``, or when ``/status`` names no keys.
    """
    if hot_swap:
        return
    served = [d for d in ndif_deployments() if d.state == "RUNNING" and d.model_key]
    if served and all(d.model_key != model_key for d in served):
        raise BadInput(
            f"NDIF serves no deployment with the model key nnsight sends ({model_key}); "
            f"it routes to: {'; '.join(sorted({d.model_key for d in served}))}"
        )


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request may succeed if sent again.

    True for connection errors, timeouts and 408/429/5xx answers, whether raised by
    httpx or websocket-client directly or wrapped in nnsight's ``RemoteError``, and for
    jobs NDIF gave up on for now (evicted, preempted, "try again later", provisioning);
    False for errors the request itself causes (a failed intervention, a 4xx answer).
    """
    import httpx
    import websocket
    from nnsight.intervention.backends.remote import RemoteError

    while exc is not None:
        if isinstance(exc, RemoteError) and exc.__cause__ is None:
            return any(word in str(exc).lower() for word in RETRIED_JOB_ERRORS)
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code in TRANSIENT_STATUS
        if isinstance(exc, websocket.WebSocketBadStatusException):
            return exc.status_code in TRANSIENT_STATUS
        if isinstance(
            exc,
            (
                ConnectionError,
                TimeoutError,
                httpx.TransportError,
                websocket.WebSocketConnectionClosedException,
                websocket.WebSocketTimeoutException,
                websocket.WebSocketAddressException,
            ),
        ):
            return True
        exc = exc.__cause__
    return False


#: Seconds before the first retry of a failed NDIF request; each later wait doubles.
RETRY_BASE_DELAY = 2.0


def with_retries(
    request: Callable[[], T],
    *,
    what: str,
    jobs: JobBook | None = None,
    attempts: int = 5,
    base_delay: float | None = None,
    max_delay: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``request()``, sent again after a transient failure (see :func:`is_transient`).

    Waits ``base_delay * 2**k`` seconds (at most ``max_delay``; ``base_delay`` defaults
    to :data:`RETRY_BASE_DELAY`) before retry ``k + 1``.
    Other errors propagate at once, except a failed NDIF job, which becomes one
    :class:`NnsteerError` line (the last line of the server's traceback). After
    ``attempts`` transient failures raises :class:`NnsteerError` naming ``what`` (e.g.
    ``"batch 3/12"``), so the user knows where a rerun resumes. Locally nothing is
    transient, so stages call it either way. On NDIF, ``jobs`` keeps the id of the job
    sent for ``what`` until it answers, so a retry or a rerun re-attaches to it.
    """
    from nnsight.intervention.backends.remote import RemoteError

    attempt = 1
    token = CURRENT_REQUEST.set((what, jobs))
    try:
        while True:
            try:
                result = request()
                if jobs is not None:
                    jobs.forget(what)
                return result
            except Exception as exc:
                if not is_transient(exc):
                    if isinstance(exc, RemoteError):
                        raise NnsteerError(_job_failure(what, exc)) from None
                    raise
                reason = f"{type(exc).__name__}: {_last_line(exc)}"
                if attempt >= attempts:
                    raise NnsteerError(
                        f"{what} failed {attempt} times on NDIF ({reason}); finished "
                        "batches are saved, rerun the same command to resume"
                    ) from exc
                base = RETRY_BASE_DELAY if base_delay is None else base_delay
                delay = min(max_delay, base * 2 ** (attempt - 1))
                warn(f"{what}: {reason}; retry {attempt}/{attempts - 1} in {delay:g} s")
                sleep(delay)
                attempt += 1
    finally:
        CURRENT_REQUEST.reset(token)


def _last_line(exc: BaseException) -> str:
    """The last non-empty line of an error's message: a server traceback's verdict."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _job_failure(what: str, exc: BaseException) -> str:
    """One line for a job NDIF ran and that failed."""
    last = _last_line(exc)
    if "out of memory" in last.lower():
        advice = "lower --batch-size and rerun"
    elif "nnsight version" in last.lower() or "python version" in last.lower():
        advice = "install the versions `nnsteer models --remote` asks for"
    else:
        advice = "finished batches are saved; fix the cause and rerun to resume"
    return f"{what} failed on NDIF: {last}; {advice}"


#: HTTP statuses of a finished job's result once NDIF dropped it (the URL expired).
EXPIRED_STATUS = frozenset({403, 404, 410})


class ResultExpired(Exception):
    """NDIF no longer has a job's result: the job must run again."""


def trusted_result_url(url: str, host: str) -> bool:
    """Whether a result may be loaded from ``url``: on the NDIF host itself, or over https
    (NDIF stages large results on its object store, behind presigned https URLs)."""
    from urllib.parse import urlsplit

    where, ours = urlsplit(url), urlsplit(host)
    return where.scheme == "https" or (where.scheme, where.netloc) == (ours.scheme, ours.netloc)


def warn(message: str) -> None:
    """One line on stderr that leaves progress bars whole."""
    from tqdm import tqdm

    tqdm.write(f"nnsteer: {message}", file=sys.stderr)
