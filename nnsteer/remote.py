"""NDIF: is a model served now, and running requests that survive a flaky network.

:func:`check_remote` is what ``--remote`` checks before any work (``load_model`` calls it);
:func:`with_retries` runs one batch's request again after a connection error, a timeout
or a 5xx answer, with exponential backoff, and names the batch when it gives up.

Example:
    >>> check_remote("meta-llama/Llama-3.1-8B")          # doctest: +SKIP
    'running'
    >>> ids = with_retries(lambda: run_batch(lm, batch), what="batch 3/12")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nnsteer.errors import BadInput, NnsteerError, first_line

T = TypeVar("T")

NDIF_KEY_HELP = "export NDIF_API_KEY=<your key> (free key at https://login.ndif.us)"

#: HTTP statuses worth asking again: rate limited, or the server failed for now.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def ndif_deployments(timeout: float = 10.0) -> dict[str, dict[str, Any]]:
    """The models NDIF serves now, by repo id: ``{repo_id: {"state": ..., "level": ...}}``.

    Raises :class:`NnsteerError` when the service cannot be reached.
    """
    import httpx
    from nnsight.schema.config import CONFIG

    url = f"{CONFIG.API.HOST}/status"
    try:
        response = httpx.get(url, timeout=timeout)
        response.raise_for_status()
        payload = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise NnsteerError(
            f"cannot reach NDIF at {url} ({type(exc).__name__}); check the network, "
            "or run locally without --remote"
        ) from None
    served: dict[str, dict[str, Any]] = {}
    for name, value in payload.get("deployments", {}).items():
        repo = value.get("repo_id") or name
        state = value.get("application_state", "UNKNOWN")
        if served.get(repo, {}).get("state") != "RUNNING":
            served[repo] = {"state": state, "level": value.get("deployment_level")}
    return served


def check_remote(model: str) -> str:
    """Fail in one line unless ``model`` can run on NDIF now; return its state.

    In order: an API key must be set, the name must be a Hub id, and NDIF must be
    reachable and running the model. Each failure says what to do instead.
    """
    from nnsight.schema.config import CONFIG

    if not CONFIG.API.APIKEY:
        raise BadInput(f"--remote needs an NDIF API key: {NDIF_KEY_HELP}")
    if Path(model).expanduser().exists() or "/" not in model:
        raise BadInput(
            f"--remote needs the Hugging Face id of a model NDIF serves, not {model!r}"
        )
    served = ndif_deployments()
    state = served.get(model, {}).get("state")
    if state != "RUNNING":
        running = sorted(repo for repo, info in served.items() if info["state"] == "RUNNING")
        now = f"({state.lower()})" if state else "(not deployed)"
        close = difflib.get_close_matches(model, running, n=1, cutoff=0.8)
        hint = f"Did you mean {close[0]}? " if close else ""
        raise BadInput(
            f"NDIF does not serve {model} right now {now}; it runs: "
            f"{', '.join(running) or 'nothing'}. {hint}Pick one of those, or run on a "
            "local GPU without --remote"
        )
    return "running"


def is_transient(exc: BaseException) -> bool:
    """Whether a failed request may succeed if sent again.

    True for connection errors, timeouts and 408/429/5xx answers, whether raised by
    httpx or websocket-client directly or wrapped in nnsight's ``RemoteError``; False for
    errors the request itself causes (a failed intervention, a 4xx answer).
    """
    import httpx
    import websocket

    while exc is not None:
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
    attempts: int = 5,
    base_delay: float | None = None,
    max_delay: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``request()``, sent again after a transient failure (see :func:`is_transient`).

    Waits ``base_delay * 2**k`` seconds (at most ``max_delay``; ``base_delay`` defaults
    to :data:`RETRY_BASE_DELAY`) before retry ``k + 1``.
    Other errors propagate at once. After ``attempts`` transient failures raises
    :class:`NnsteerError` naming ``what`` (e.g. ``"batch 3/12"``), so the user knows
    where a rerun resumes. Locally nothing is transient, so stages call it either way.
    """
    attempt = 1
    while True:
        try:
            return request()
        except Exception as exc:
            if not is_transient(exc):
                raise
            reason = f"{type(exc).__name__}: {first_line(exc, empty='no message')}"
            if attempt >= attempts:
                raise NnsteerError(
                    f"{what} failed {attempt} times on NDIF ({reason}); finished batches "
                    "are saved, rerun the same command to resume"
                ) from exc
            base = RETRY_BASE_DELAY if base_delay is None else base_delay
            delay = min(max_delay, base * 2 ** (attempt - 1))
            _warn(f"{what}: {reason}; retry {attempt}/{attempts - 1} in {delay:g} s")
            sleep(delay)
            attempt += 1


def _warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"nnsteer: {message}", file=sys.stderr)
