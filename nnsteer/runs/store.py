"""The run directory and its files (formats fixed by CONTRACTS.md).

Every file is written to a temporary name beside its target and renamed into place,
so an interrupted stage never leaves a half-written output. Parquet files carry their
provenance as JSON under the key-value metadata key ``metadata``; safetensors files
under the ``__metadata__`` entry ``nnsteer``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import polars as pl

from nnsteer.errors import BadInput, NnsteerError, first_line
from nnsteer.labels import FAILED, OK, UNALIGNED, UNKNOWN_LABEL
from nnsteer.runs.registry import PIPELINE_STATE, RUN_FILES, producer


@dataclass(frozen=True)
class RunDir:
    """The files of one study. ``RunDir("runs/smollm2-135m").chains`` is a path."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def path(self, name: str) -> Path:
        """The file ``name`` inside the run directory."""
        return self.root / name

    @property
    def tasks(self) -> Path:
        """Tasks (``tasks.parquet``, written by ``tasks``)."""
        return self.root / RUN_FILES["tasks"]

    @property
    def chains(self) -> Path:
        """Training reasoning chains (``chains.parquet``, written by ``generate``)."""
        return self.root / RUN_FILES["chains"]

    @property
    def annotations(self) -> Path:
        """Behaviour spans of the chains (``annotations.parquet``, written by ``annotate``)."""
        return self.root / RUN_FILES["annotations"]

    @property
    def vectors(self) -> Path:
        """Candidate steering vectors (``vectors.safetensors``, written by ``extract``)."""
        return self.root / RUN_FILES["vectors"]

    @property
    def attribution(self) -> Path:
        """Mean attribution effect per label and layer (``attribution.parquet``, written by ``attribute``)."""
        return self.root / RUN_FILES["attribution"]

    @property
    def layers(self) -> Path:
        """Chosen steering layers (``layers.json``, written by ``select``)."""
        return self.root / RUN_FILES["layers"]

    @property
    def steered(self) -> Path:
        """Steered evaluation chains (same columns as ``chains.parquet``)."""
        return self.root / RUN_FILES["steered"]

    @property
    def steered_annotations(self) -> Path:
        """Behaviour spans of the steered chains (``steered_annotations.parquet``, written by ``evaluate``)."""
        return self.root / RUN_FILES["steered_annotations"]

    @property
    def evaluation(self) -> Path:
        """Behaviour shares with intervals (``evaluation.parquet``, written by ``evaluate``)."""
        return self.root / RUN_FILES["evaluation"]

    @property
    def report(self) -> Path:
        """The self-contained report page (``report.html``, written by ``report``)."""
        return self.root / RUN_FILES["report"]

    @property
    def charts(self) -> Path:
        """Folder of chart files (HTML, PNG, SVG)."""
        return self.root / "charts"

    def partial(self, stage: str) -> Path:
        """The hidden file where ``stage`` keeps its finished batches until its output is written."""
        return self.root / f".{stage}.partial.pt"

    def owns(self, path: Path | str) -> bool:
        """Whether ``path`` is one of the run's own files, which nothing but its stages may
        write: a stage's output (:data:`RUN_FILES`), ``pipeline.json``, the lock, or a hidden
        file (partial checkpoints, set-aside and unfinished outputs, temporary files)."""
        path = Path(path).resolve()
        if path.parent != self.root.resolve():
            return False
        return path.name in {*RUN_FILES.values(), PIPELINE_STATE} or path.name.startswith(".")


def now_iso() -> str:
    """The current UTC time in ISO 8601, to the second (for provenance)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def nnsteer_version() -> str:
    """The installed nnsteer version (for provenance)."""
    return version("nnsteer")


def provenance(stage: str, options: dict[str, Any], model: dict[str, Any] | None = None) -> dict:
    """The metadata every output carries: stage, its options, model, version, time."""
    return {
        "stage": stage,
        "options": options,
        "model": model or {},
        "nnsteer": nnsteer_version(),
        "time": now_iso(),
    }


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success only.

    :class:`BadInput` naming ``target`` if its folder cannot be made or written to (a file
    in the way, no permission).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise BadInput(f"{target}: cannot write there ({exc.strerror or first_line(exc)})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


LOCK_NAME = ".nnsteer.lock"
_held: dict[Path, tuple[int, int]] = {}  # run directory -> (lock file descriptor, depth)


def create_run_dir(root: Path, origin: str) -> list[Path]:
    """Create the run directory ``root`` if missing; the directories made, deepest first.

    :class:`BadInput` naming ``origin`` (where the path came from) if it cannot be made.
    """
    try:
        made = [path for path in (root, *root.parents) if not path.exists()]
        root.mkdir(parents=True, exist_ok=True)
        return made
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise not_a_run_dir(root, origin, exc) from None


def not_a_run_dir(root: Path, origin: str, exc: OSError | ValueError) -> BadInput:
    """The one-line error for a run directory that cannot be made or written to."""
    why = getattr(exc, "strerror", None) or first_line(exc)
    return BadInput(f"{origin} {root}: cannot create the directory ({why})")


@contextlib.contextmanager
def run_lock(root: Path | str, origin: str = "run directory") -> Iterator[None]:
    """Hold the run directory ``root`` for this process while the block writes there.

    A directory that does not exist yet is created first (with its missing parents;
    :class:`BadInput` naming ``origin`` if it cannot be), so that two processes starting
    on a new directory contend for the same lock; the directories made are removed again
    at the end if the block left them empty. A second process is refused with
    :class:`RunDirBusy` naming the process that holds it; a lock left by a process that
    died is free again (the operating system drops it). The same process may nest the
    lock. The lock file holds the holder's process id, host and start time, nothing else.
    """
    try:
        root = Path(root).resolve()
    except (OSError, ValueError) as exc:
        raise not_a_run_dir(Path(root), origin, exc) from None
    if root in _held:
        fd, depth = _held[root]
        _held[root] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[root]
            _held[root] = (fd, depth - 1)
        return
    fd, made = _acquire(root, origin)
    _held[root] = (fd, 1)
    try:
        yield
    finally:
        del _held[root]
        with contextlib.suppress(OSError):
            os.unlink(root / LOCK_NAME)
        for path in made:  # deepest first; one that holds anything stays
            with contextlib.suppress(OSError):
                path.rmdir()
        os.close(fd)


class RunDirBusy(NnsteerError):
    """Another process holds the run directory."""


def _acquire(root: Path, origin: str) -> tuple[int, list[Path]]:
    """An open descriptor of ``root``'s lock file, exclusively locked by this process, and
    the directories made for it, deepest first."""
    import fcntl
    import socket

    path = root / LOCK_NAME
    made: list[Path] = []
    while True:
        made += create_run_dir(root, origin)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except FileNotFoundError:  # a process that made the directory removed it, empty
            continue
        except OSError as exc:
            raise not_a_run_dir(root, origin, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirBusy(f"{root} is in use by {holder}: wait for it to finish, "
                             "or stop it") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:  # its holder removed it as we opened it: try again
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} (on {socket.gethostname()}, since {now_iso()})".encode())
    made = sorted(set(made), key=lambda p: len(p.parts), reverse=True)
    return fd, made


def write_parquet(df: pl.DataFrame, path: Path | str, metadata: dict[str, Any]) -> None:
    """Write ``df`` atomically with ``metadata`` as JSON under the key ``metadata``."""
    with atomic_path(path) as tmp:
        df.write_parquet(tmp, metadata={"metadata": json.dumps(metadata, default=str)})


def require(path: Path | str) -> Path:
    """``path`` if it exists, else :class:`BadInput` naming the stage that writes it."""
    path = Path(path)
    if not path.exists():
        stage = producer(path.name)
        hint = f": run `nnsteer --run-dir {path.parent} {stage}` first" if stage else ""
        raise BadInput(f"{path} not found{hint}")
    return path


def read_parquet(path: Path | str, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a run file, checking that it exists and has the named columns."""
    path = require(path)
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # polars raises several kinds for damaged files
        raise damaged(path, exc) from None
    missing = [c for c in columns or [] if c not in df.columns]
    if missing:
        raise BadInput(f"{path}: missing column(s) {', '.join(missing)}")
    _check_rows(path, df)
    return df


_CHAINS = {"unique": "chain_id", "filled": ("chain_id", "response", "prompt_ids", "output_ids"),
           "integer": ("thinking_start", "thinking_end")}
_SPANS = {"filled": ("chain_id", "status", "start", "end"), "integer": ("start", "end"),
          "statuses": True}
#: What the rows of each run file must hold, whoever reads them: a column of unique
#: values, columns without nulls, integer columns, and known span statuses.
ROW_RULES: dict[str, dict[str, Any]] = {
    "tasks.parquet": {"unique": "task_id", "filled": ("task_id", "prompt", "category", "split")},
    "chains.parquet": _CHAINS,
    "steered.parquet": _CHAINS,
    "annotations.parquet": _SPANS,
    "steered_annotations.parquet": _SPANS,
}


def _check_rows(path: Path, df: pl.DataFrame) -> None:
    """:class:`BadInput` naming ``path`` and the first bad row against :data:`ROW_RULES`."""
    rules = ROW_RULES.get(path.name, {})
    for column in rules.get("integer", ()):
        if column in df.columns and not df.schema[column].is_integer():
            raise BadInput(f"{path}: column {column} holds {df.schema[column]}, not integers")
    for column in rules.get("filled", ()):
        if column in df.columns and df[column].null_count():
            row = df[column].is_null().arg_true()[0]
            raise BadInput(f"{path}: row {row}: {column} is empty")
    unique = rules.get("unique")
    if unique in df.columns and df[unique].n_unique() != len(df):
        repeated = df[unique].filter(df[unique].is_duplicated())[0]
        raise BadInput(f"{path}: {unique} {repeated!r} appears more than once")
    if rules.get("statuses") and "status" in df.columns:
        known = (OK, UNALIGNED, UNKNOWN_LABEL, FAILED)
        bad = df.with_row_index("row").filter(~pl.col("status").is_in(known))
        if len(bad):
            raise BadInput(f"{path}: row {bad['row'][0]}: status {bad['status'][0]!r} is not "
                           f"one of {', '.join(known)}")


def completeness(done: int, planned: int) -> dict[str, Any]:
    """Metadata saying whether a file written batch by batch holds all its ``planned`` chains."""
    return {"complete": done >= planned, "chains_done": done, "chains_planned": planned}


def read_complete(path: Path | str, columns: list[str] | None = None) -> pl.DataFrame:
    """:func:`read_parquet` of a chains file, refusing one whose stage has chains still to come.

    A file without the ``complete`` key (written before nnsteer recorded it) counts as
    complete.
    """
    df = read_parquet(path, columns)
    metadata = read_metadata(path)
    if metadata.get("complete", True) is False:
        stage = metadata.get("stage") or producer(Path(path).name)
        raise BadInput(
            f"{path} is incomplete ({metadata.get('chains_done')} of "
            f"{metadata.get('chains_planned')} chains): rerun `nnsteer {stage}` to finish it"
        )
    return df


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The nnsteer metadata of a parquet or safetensors file ({} if it has none);
    :class:`BadInput` naming the file if it is damaged."""
    path = require(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("nnsteer")
        else:
            raw = pl.read_parquet_metadata(path).get("metadata")
        metadata = json.loads(raw) if raw else {}
    except Exception as exc:  # truncated or foreign files fail in many ways
        raise damaged(path, exc) from None
    if not isinstance(metadata, dict):
        raise damaged(path, "its metadata is not an object")
    return metadata


def damaged(path: Path | str, why: BaseException | str) -> BadInput:
    """The one-line error for a run file that cannot be read: what is wrong and what to do."""
    reason = why if isinstance(why, str) else type(why).__name__
    stage = producer(Path(path).name)
    todo = (f"delete it and rerun `nnsteer {stage}`" if stage
            else "replace it or delete it")
    return BadInput(f"{path}: damaged or not an nnsteer file ({reason}): {todo}")


def write_json(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    """A JSON file's value; :class:`BadInput` naming the file if it is not UTF-8 JSON."""
    path = require(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise damaged(path, f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8 text") from None


def write_text(path: Path | str, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_digest(path: Path | str) -> str | None:
    """SHA-256 of a file's bytes, or ``None`` if it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable values (options, input identities)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
