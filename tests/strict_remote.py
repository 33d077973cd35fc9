"""A strict stand-in for an NDIF server, for tests of every stage's ``--remote`` path.

nnsight's ``remote="local"`` re-runs the caller's own tracer in-process, so a block
that calls an installed helper (nnsteer itself), mutates a tensor it was handed, or
returns a value it never saved still passes. :class:`StrictBackend` does what a server
does instead:

1. serialises the request with ``RequestModel.serialize``, as ``RemoteBackend`` does;
2. deserialises it against the model's persistent objects in a *server interpreter*:
   only the standard library and the server's packages (nnsight and its requirements,
   plus accelerate) can be imported; nnsteer, the tests and every other client module
   are removed from ``sys.modules`` and blocked, unless the request carries them by
   value (``nnsight.register``);
3. runs the deserialised tracer (never the caller's), still in that interpreter;
4. returns only the values the block ``.save()``-d, through ``torch.save``/``torch.load``
   bytes, and writes them into the caller's frame as ``RemoteBackend`` does.

Every request is logged with its request and response sizes and the saved values'
shapes, for payload-budget assertions; :meth:`StrictServer.fail_next` drops requests
like a flaky network. Use it through :func:`strict_remote`::

    with strict_remote(lm) as server:
        chains = generate(lm, prompts, ...)   # stage code passes remote=lm.remote
    assert server.requests[0].response_bytes < 10_000
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.metadata
import io
import linecache
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.requirements import Requirement

#: Distributions an NDIF server runs; everything they require (transitively) is there too.
SERVER_DISTRIBUTIONS = ("nnsight", "accelerate")

#: The value of ``LoadedModel.remote`` that routes traces through the strict backend.
STRICT = "strict"


def _requirement_closure(roots: tuple[str, ...]) -> set[str]:
    """Normalised names of ``roots`` and every distribution they require (extras off)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requirements:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


@functools.cache
def server_modules() -> frozenset[str]:
    """Top-level import names a server can import: the stdlib and the server's packages."""
    distributions = _requirement_closure(SERVER_DISTRIBUTIONS)
    names = {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if any(d.lower().replace("_", "-") in distributions for d in dists)
    }
    return frozenset(names | set(sys.stdlib_module_names) | set(sys.builtin_module_names))


class RemoteImportError(ModuleNotFoundError):
    """The request needs a module the server does not have."""


class _ServerImports(importlib.abc.MetaPathFinder):
    """Refuses every import whose top-level package the server lacks."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        root = fullname.partition(".")[0]
        if root not in self.allowed:
            raise RemoteImportError(
                f"No module named {fullname!r} on the server: the request uses it by "
                "reference; register it with nnsight.register(module) or write the code "
                "inside the tracing block",
                name=fullname,
            )
        return None


@contextlib.contextmanager
def server_interpreter(allowed: frozenset[str]) -> Iterator[None]:
    """Run the body as if in a fresh server process.

    Client modules are gone from ``sys.modules`` and cannot be imported, and nnsight's
    per-process caches of source files and parsed blocks start empty (a server knows
    only the request's rewritten source, whose line numbers differ from the client's).
    """
    from nnsight.tracing.globals import BLOCKS, SOURCES

    hidden = {
        name: sys.modules.pop(name)
        for name in list(sys.modules)
        if name.partition(".")[0] not in allowed
    }
    caches = [(cache, dict(cache)) for cache in (SOURCES, BLOCKS)]
    for cache, _ in caches:
        cache.clear()
    finder = _ServerImports(allowed)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
        for cache, saved in caches:
            cache.clear()
            cache.update(saved)


class _PushedLocals(dict):
    """The deserialised frame's locals, remembering what the trace pushed back (its saves)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pushed: dict[str, Any] = {}

    def update(self, other: Any = (), **kwargs: Any) -> None:  # type: ignore[override]
        values = dict(other, **kwargs)
        self.pushed.update(values)
        super().update(values)


@dataclass(frozen=True)
class SavedTensor:
    """One tensor in a response, named by where it sits (``results[2]``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class RequestRecord:
    """One request the strict server answered: sizes in bytes, and what came back."""

    kind: str
    request_bytes: int
    response_bytes: int
    names: tuple[str, ...]
    tensors: list[SavedTensor] = field(default_factory=list)
    others: list[str] = field(default_factory=list)


def _leaves(name: str, value: Any, record: RequestRecord) -> None:
    """Add the tensors (and the types of other values) inside a saved value to ``record``."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).removeprefix("torch.")
        record.tensors.append(SavedTensor(name, tuple(value.shape), dtype))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _leaves(f"{name}[{i}]", item, record)
    elif isinstance(value, dict):
        for key, item in value.items():
            _leaves(f"{name}[{key!r}]", item, record)
    else:
        record.others.append(f"{name}: {type(value).__name__}")


@dataclass
class StrictServer:
    """The strict server's state: the modules it can import and the requests it answered."""

    allowed: frozenset[str] = field(default_factory=server_modules)
    requests: list[RequestRecord] = field(default_factory=list)
    running: bool = False
    failures: list[BaseException | None] = field(default_factory=list)

    def backend(self, model: Any) -> StrictBackend:
        return StrictBackend(self, model)

    def fail_next(self, *errors: BaseException | None) -> None:
        """Answer the next requests by raising ``errors`` in turn (``None`` serves one)."""
        self.failures.extend(errors)

    def tensors(self) -> list[SavedTensor]:
        """Every tensor of every response."""
        return [tensor for record in self.requests for tensor in record.tensors]


class StrictBackend:
    """An nnsight backend that answers a trace the way an NDIF server would (see module doc)."""

    def __init__(self, server: StrictServer, model: Any) -> None:
        self.server = server
        self.model = model

    def __call__(self, tracer: Any) -> None:
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import save
        from nnsight.tracing.util import push

        if self.server.running:
            raise RuntimeError(
                "a trace inside a remote request asked to go remote again: pass remote= "
                "to the outer session only"
            )
        pull_env()
        request = RequestModel.serialize(tracer)
        error = self.server.failures.pop(0) if self.server.failures else None
        if error is not None:
            raise error
        response = self._serve(request, tracer.info.frame.f_code.co_filename)
        saved = torch.load(io.BytesIO(response), map_location="cpu", weights_only=False)
        record = RequestRecord(type(tracer).__name__, len(request), len(response), tuple(saved))
        for name, value in saved.items():
            _leaves(name, value, record)
        self.server.requests.append(record)
        for value in saved.values():
            save(value)
        push(tracer.info.frame, saved)

    def _serve(self, request: bytes, filename: str) -> bytes:
        """The server side: deserialise, run the restored tracer, return its saves as bytes."""
        from nnsight.schema.request import RequestModel

        persistent = self.model._remoteable_persistent_objects()
        cached_source = linecache.cache.get(filename)
        self.server.running = True
        try:
            with server_interpreter(self.server.allowed):
                restored = RequestModel.deserialize(request, persistent)
                frame = restored.info.frame
                frame.f_locals = _PushedLocals(frame.f_locals)
                restored.execute(restored.info.code)
                buffer = io.BytesIO()
                torch.save(frame.f_locals.pushed, buffer)
        finally:
            self.server.running = False
            if cached_source is not None:
                linecache.cache[filename] = cached_source
            else:
                linecache.cache.pop(filename, None)
        return buffer.getvalue()


@contextlib.contextmanager
def strict_remote(lm: Any) -> Iterator[StrictServer]:
    """Route every trace, generate and session of ``lm`` through a :class:`StrictBackend`.

    Sets ``lm.remote`` to ``"strict"`` (stage code passes it on unchanged) and teaches
    nnsight's ``Remotable._remote_backend`` that value; both are restored on exit.
    """
    from nnsight.modeling.mixins.remotable import Remotable

    server = StrictServer()
    original_backend = Remotable._remote_backend
    original_remote = lm.remote

    def remote_backend(self: Any, remote: Any, *args: Any, **kwargs: Any) -> Any:
        if remote == STRICT:
            return server.backend(self)
        return original_backend(self, remote, *args, **kwargs)

    Remotable._remote_backend = remote_backend
    lm.remote = STRICT
    try:
        yield server
    finally:
        Remotable._remote_backend = original_backend
        lm.remote = original_remote
