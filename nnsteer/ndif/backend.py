"""The nnsight backend nnsteer sends NDIF requests with: submit, then poll, re-attaching to a
job a crashed run had already paid for (:class:`NdifBackend`).

Importing this module imports nnsight: :mod:`nnsteer.modeling.models` imports it only when a
remote model runs.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

from nnsteer.errors import NnsteerError
from nnsteer.ndif.remote import (
    CURRENT_REQUEST,
    EXPIRED_STATUS,
    MAX_POLL_INTERVAL,
    POLL_INTERVAL,
    ResultExpired,
    trusted_result_url,
    warn,
)
from nnsteer.runs.checkpoint import JobBook


def ndif_backend(model_key: str, *, deadline: float | None = None) -> NdifBackend:
    """The nnsight backend nnsteer sends NDIF requests with (see :class:`NdifBackend`)."""
    return NdifBackend(model_key, deadline)


class NdifBackend(RemoteBackend):
    """nnsight's ``RemoteBackend``, submitting without blocking and then polling.

    To the stage it behaves like a blocking request (the saved values land in the
    trace's frame), but: the job id is kept in the request's :class:`JobBook` (a
    rerun re-attaches instead of paying twice); waiting stops after ``deadline``
    seconds; status changes are one ``tqdm.write`` line each (nnsight's own status
    display stays off, so progress bars stay whole). Results load through nnsight's
    own code, from the configured ``NDIF_HOST`` only.
    """

    def __init__(self, model_key: str, deadline: float | None = None) -> None:
        super().__init__(model_key, blocking=False)
        self.display.enabled = False
        self.deadline = deadline

    def __call__(self, tracer: Any = None) -> Any:
        what, jobs = CURRENT_REQUEST.get()
        self.job_id = jobs.pending(what) if jobs is not None else None
        result = None
        if self.job_id is not None:
            warn(f"{what}: re-attaching to NDIF job {self.job_id}")
            try:
                result = self._wait(what, jobs, reattached=True)
            except ResultExpired:
                warn(f"{what}: NDIF no longer has job {self.job_id}'s result (it keeps "
                      "results about 2 hours); running the job again")
                jobs.forget(what)  # type: ignore[union-attr]
                self.job_id = None
        if self.job_id is None:
            self.submit(tracer)
            if jobs is not None:
                jobs.remember(what, self.job_id)
            result = self._wait(what, jobs)
        self._push(result, tracer)
        return result

    def download_result(self, url: Any) -> Any:
        """nnsight's download and load, for a URL on ``NDIF_HOST`` or over https only
        (nnsight unpickles what it loads)."""
        if isinstance(url, str) and not trusted_result_url(url, self.host):
            raise NnsteerError(
                f"NDIF answered with a result at {url.split('?')[0]}, neither on "
                f"NDIF_HOST ({self.host}) nor over https: not loaded (results are "
                "unpickled); check NDIF_HOST"
            )
        return super().download_result(url)

    def _wait(self, what: str, jobs: JobBook | None, reattached: bool = False) -> Any:
        """The job's result; with ``reattached``, :class:`ResultExpired` if NDIF no
        longer knows the job (its status is gone) or its result (the URL is gone)."""
        started, last, interval = time.monotonic(), None, POLL_INTERVAL
        self.status = None
        while True:
            try:
                result = self.poll()
            except RemoteError:
                if jobs is not None:  # the job is over: a retry sends a new one
                    jobs.forget(what)
                raise
            except httpx.HTTPStatusError as exc:
                if reattached and exc.response.status_code in EXPIRED_STATUS:
                    raise ResultExpired(self.job_id) from None
                raise
            if result is not None:
                return result
            if reattached and self.status is None:  # /response answered 404
                raise ResultExpired(self.job_id)
            if self.status is not None and self.status != last:
                last = self.status
                warn(f"{what}: NDIF job {self.job_id} {last.value.lower()}")
            waited = time.monotonic() - started
            if self.deadline is not None and waited > self.deadline:
                raise NnsteerError(
                    f"{what}: NDIF job {self.job_id} not done after {self.deadline:g} s "
                    "(the deadline: --ndif-deadline, [model] ndif_deadline); rerun to "
                    "re-attach to it, or raise the deadline"
                )
            time.sleep(interval)
            interval = min(MAX_POLL_INTERVAL, 2 * interval)

