"""A long stage's partial state, kept in one file so that a rerun resumes where it stopped.

A :class:`Checkpoint` is a file beside the stage's output (``RunDir.partial(stage)``) and
a key: the fingerprint of everything the result depends on (the model's identity, the
inputs, the options). The state is a flat dict of tensors, ints and strings, written
with ``torch.save`` to a temporary file renamed into place, so an interrupted save leaves
the previous state whole; it is read back with ``torch.load(weights_only=True)``. A file
with another key, or one that cannot be read, is ignored with one line on stderr and the
stage starts over. The stage deletes the file once its output is written.

Example:
    >>> cp = Checkpoint.of(run.partial("extract"), lm.identity(), inputs, options)
    >>> state = cp.resume({"totals": torch.zeros(3, 4), "batches": 0})
    >>> cp.save({"totals": totals, "batches": 5})
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nnsteer.errors import say
from nnsteer.runs.store import atomic_path, fingerprint

State = dict[str, torch.Tensor | int | str]

#: The entry of the saved dict that holds the key.
KEY = "__checkpoint_key__"


def tensor_digest(tensor: torch.Tensor, layout: bool = True) -> str:
    """A sha256 of a tensor's dtype, shape and exact values; with ``layout=False``, of its
    values' bytes alone (the digests ``steer`` records of the vectors it used)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{flat.dtype} {tuple(tensor.shape)}".encode() if layout else b"")
    h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """Where a stage keeps its partial state (``path``; None keeps none), valid for ``key`` only."""

    path: Path | None
    key: str = ""

    @classmethod
    def of(cls, path: Path | None, *identity: Any) -> Checkpoint:
        """A checkpoint at ``path`` whose key fingerprints ``identity`` (JSON values and tensors)."""
        if path is None:
            return cls(None)
        parts = [tensor_digest(p) if isinstance(p, torch.Tensor) else p for p in identity]
        return cls(Path(path), fingerprint(*parts))

    def resume(self, initial: State) -> State:
        """The saved state if it was saved under this key, else ``initial``.

        The saved state must have ``initial``'s entries with the same types (and, for
        tensors, shapes and dtypes); a file that does not is reported as damaged.
        """
        if self.path is None or not self.path.exists():
            return initial
        saved = _load(self.path)
        if isinstance(saved, str):
            problem = saved
        elif saved[KEY] != self.key:
            say(f"{self.path}: left by a run with other inputs or options; starting over")
            return initial
        elif not all(_same_kind(saved.get(name), value) for name, value in initial.items()):
            problem = "its entries differ"
        else:
            return {name: saved[name] for name in initial}
        say(f"warning: {self.path}: damaged partial file ignored ({problem}); starting over")
        return initial

    def jobs(self) -> JobBook:
        """The NDIF jobs sent for this checkpoint's stage and not yet answered."""
        return JobBook(None if self.path is None else self.path.with_name(self.path.name + ".jobs.json"),
                       self.key)

    def save(self, state: State) -> None:
        """Replace the saved state with ``state``, atomically (nothing when ``path`` is None)."""
        if self.path is None:
            return
        with atomic_path(self.path) as tmp:
            torch.save({**state, KEY: self.key}, tmp)


@dataclass(frozen=True)
class JobBook:
    """Ids of NDIF jobs a stage sent and has no answer for yet, by request (``"extract
    batch 3/12"``), in a JSON file beside its checkpoint (``path``; None keeps none).

    A rerun after a dropped connection finds the job there and re-attaches to it
    instead of paying for it again. Entries left under another checkpoint key (other
    inputs or options) are ignored; the file goes once no job is pending.
    """

    path: Path | None
    key: str = ""

    def _read(self) -> dict[str, str]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get(KEY) != self.key:
            return {}
        return {k: v for k, v in saved.items() if k != KEY and isinstance(v, str)}

    def pending(self, what: str) -> str | None:
        """The id of the job sent for ``what`` and not yet answered, if any."""
        return self._read().get(what)

    def remember(self, what: str, job_id: str) -> None:
        """Note that the request ``what`` was sent as NDIF job ``job_id``."""
        self._write({**self._read(), what: job_id})

    def forget(self, what: str) -> None:
        """Drop the request ``what``: answered, failed or expired, it has no job to re-attach to."""
        jobs = self._read()
        if jobs.pop(what, None) is not None:
            self._write(jobs)

    def _write(self, jobs: dict[str, str]) -> None:
        if self.path is None:
            return
        if not jobs:
            self.path.unlink(missing_ok=True)
            return
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({**jobs, KEY: self.key}))


def announce_resume(stage: str, unit: str, done: int, total: int) -> None:
    """One line on stderr when ``stage`` continues after ``done`` of ``total`` units (none if 0)."""
    if done:
        where = f"at {unit} {done + 1}/{total}" if done < total else f"after {unit} {total}/{total}, the last"
        print(f"{stage}: resuming {where}", file=sys.stderr, flush=True)


def _load(path: Path) -> dict[str, Any] | str:
    """The dict saved at ``path``, or why it cannot be read as a checkpoint."""
    try:
        with warnings.catch_warnings():  # a foreign file's pickle warnings say nothing more
            warnings.simplefilter("ignore")
            saved = torch.load(path, weights_only=True)
    except Exception as exc:  # truncated or foreign files fail in many ways
        return type(exc).__name__
    if not isinstance(saved, dict) or not isinstance(saved.get(KEY), str):
        return "not a checkpoint"
    return saved


def _same_kind(saved: Any, expected: Any) -> bool:
    """Whether ``saved`` can stand for ``expected``: same type, and same shape and dtype for tensors."""
    if type(saved) is not type(expected):
        return False
    if isinstance(expected, torch.Tensor):
        return saved.shape == expected.shape and saved.dtype == expected.dtype
    return True
