"""NDIF readiness: is there an API key, is the service up, does it serve this model now."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nnsteer.errors import BadInput, NnsteerError

NDIF_KEY_HELP = "export NDIF_API_KEY=<your key> (free key at https://login.ndif.us)"


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
    """Fail in one line unless ``model`` can run on NDIF now; return its state."""
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
        raise BadInput(
            f"NDIF does not serve {model} right now {now}; it runs: "
            f"{', '.join(running) or 'nothing'}. Pick one of those, or run on a local GPU "
            "without --remote"
        )
    return "running"
