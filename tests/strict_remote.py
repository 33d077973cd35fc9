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
3. enforces the real server's allow-lists (:data:`DESERIALISATION_MODULES` while
   unpickling, :data:`EXECUTION_MODULES` and :data:`SERVER_BUILTINS` while running):
   a request that references a ``transformers`` class, ``contextlib`` or any other
   module outside them fails with :class:`AllowListError`, as NDIF refuses it;
4. runs the deserialised tracer (never the caller's), still in that interpreter, inside
   ``torch.autocast(bfloat16)`` on the model's device type, as NDIF runs every request;
5. returns only the values the block ``.save()``-d, through ``torch.save``/``torch.load``
   bytes, and writes them into the caller's frame as ``RemoteBackend`` does.

Two sandboxes (``sandbox=``, :data:`SANDBOXES`): ``"allow-lists"`` is NDIF main's
``protected_environment.py`` as above; ``"whitelist"`` mirrors the rewritten sandbox of
the ``caden/cpu`` branch (RestrictedPython and ``whitelist.yaml``, read 2026-12-03):
``builtins.__import__`` is replaced for the whole process, so the imports library code
makes while the request runs are checked too (a refused module is a placeholder that
fails on first use); every builtin not on its list is deleted from ``builtins``; the
block's globals are a plain dict holding only the builtins (a module-level name the
block looks up, such as ``torch``, is a ``NameError``); and the process default dtype is
bf16 (``torch.full`` without a dtype gives bf16).

Every request is logged with its request and response sizes and the saved values'
shapes, for payload-budget assertions; :meth:`StrictServer.fail_next` drops requests
like a flaky network. Use it through :func:`strict_remote`::

    with strict_remote(lm) as server:
        chains = generate(lm, prompts, ...)   # stage code passes remote=lm.remote
    assert server.requests[0].response_bytes < 10_000

:func:`serve_request` is the server side alone (bytes in, result bytes out), which the
loopback NDIF of ``fake_ndif.py`` runs behind its HTTP and websocket endpoints.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.metadata
import io
import linecache
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from nnsight.tracing.util import Scope
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


#: Modules a request may use while it runs on NDIF: ``(name, submodules too)``. From
#: ndif-team/ndif ``src/services/ray/src/ray/nn/security/protected_environment.py``
#: (``WHITELISTED_MODULES``, read 2026-12-01).
EXECUTION_MODULES: tuple[tuple[str, bool], ...] = (
    ("builtins", False), ("torch", True), ("collections", True), ("time", True),
    ("numpy", True), ("sympy", True), ("nnterp", True), ("math", True), ("einops", True),
    ("urllib3", True), ("typing", True), ("_operator", False), ("operator", False),
    ("pandas", True), ("enum", True), ("nnsight.intervention.envoy", True),
)

#: Modules a request's pickle may name while NDIF deserialises it: the execution list,
#: pickle's own helpers and nnsight's protocol classes. The server lists the nnsight
#: modules by their pre-0.8 paths (``nnsight.intervention.tracing.base``, ...); the
#: entries after ``nnsight.modeling`` are where nnsight 0.8.1 keeps the same classes.
DESERIALISATION_MODULES: tuple[tuple[str, bool], ...] = (
    ("pickle", True), ("cloudpickle", True), ("copyreg", True),
    ("nnsight.schema.request", False), ("nnsight.intervention.interleaver", False),
    ("nnsight.intervention.batching", False), ("nnsight.modeling", True),
    ("nnsight.intervention.tracer", False), ("nnsight.tracing.tracer", False),
    ("nnsight.tracing.util", False), ("nnsight.intervention.serialization", False),
    *EXECUTION_MODULES,
)

#: The builtins a request may call on NDIF (the server's ``WHITELISTED_BUILTINS``): every
#: exception and warning class, plus these names. ``open``, ``exec``, ``compile``,
#: ``locals``, ``breakpoint`` and the rest are gone while a request runs.
SERVER_BUILTINS = frozenset("""
    Ellipsis False None NotImplemented True __build_class__ __doc__ __import__ __loader__
    __name__ __package__ __spec__ abs aiter all anext any ascii bool bytearray bytes
    callable chr classmethod complex copyright credits delattr dict dir divmod enumerate
    eval filter float format frozenset getattr globals hasattr hash hex id input int
    isinstance issubclass iter len list map max memoryview min next object oct ord pow
    print property range repr reversed round set setattr slice sorted staticmethod str
    sum super tuple type vars zip
""".split())

#: The builtins the rewritten sandbox keeps in ``builtins`` while a request runs
#: (``whitelist.yaml``'s list; ``exec`` and ``compile`` stay, as restricted versions).
WHITELIST_BUILTINS = (SERVER_BUILTINS - {"input"}) | {"exec", "compile"}

#: ``"allow-lists"``: NDIF main's sandbox; ``"whitelist"``: the rewritten one (module doc).
SANDBOXES = ("allow-lists", "whitelist")


class AllowListError(ImportError):
    """The request references a module that NDIF's allow-list refuses."""


def allowed_by(module: str, entries: tuple[tuple[str, bool], ...]) -> bool:
    """Whether ``module`` is one of ``entries`` (or inside one that admits submodules)."""
    return any(module == name or (deep and module.startswith(name + "."))
               for name, deep in entries)


def _refuse(module: str, when: str) -> AllowListError:
    return AllowListError(
        f"NDIF refuses {module!r} while {when} a request (not on its allow-list): keep "
        "that module's classes and functions out of the traced block and what it captures",
        name=module,
    )


def _allow_listed_unpickler(base: type) -> type:
    """``base`` (nnsight's unpickler), refusing any class outside the server's lists."""

    class AllowListedUnpickler(base):
        def find_class(self, module: str, name: str) -> Any:
            if not allowed_by(module, DESERIALISATION_MODULES):
                raise _refuse(module, "deserialising")
            return super().find_class(module, name)

    return AllowListedUnpickler


def _is_request_code(frame_globals: Any, request_globals: Any) -> bool:
    """Whether an import comes from the request (its block, or a pickle helper loading it).

    The libraries' own imports are not checked: a server has them loaded already.
    """
    if frame_globals is None or frame_globals is request_globals:
        return True
    if isinstance(frame_globals, Scope):  # the block itself runs in a Scope
        return True
    return frame_globals.get("__name__", "").partition(".")[0] in {"cloudpickle", "pickle"}


@contextlib.contextmanager
def allow_list(entries: tuple[tuple[str, bool], ...], when: str,
               request_globals: Any = None) -> Iterator[None]:
    """Refuse imports of modules outside ``entries`` by the request's code."""
    import builtins

    real_import = builtins.__import__

    def guarded(name: str, globals: Any = None, locals: Any = None,
                fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and _is_request_code(globals, request_globals) \
                and not allowed_by(name, entries):
            raise _refuse(name, when)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded
    try:
        yield
    finally:
        builtins.__import__ = real_import


class UnauthorizedModule:
    """What the rewritten sandbox's import returns for a refused module: any use fails."""

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_name", name)

    def __getattribute__(self, attribute: str) -> Any:
        raise AllowListError(f"Module {object.__getattribute__(self, '_name')} is not "
                             "whitelisted (imported while the request ran, by its code or "
                             "a library's)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattribute__("__call__")


@contextlib.contextmanager
def process_imports(entries: tuple[tuple[str, bool], ...]) -> Iterator[None]:
    """Replace ``builtins.__import__`` for the process: on this thread (the server's),
    every import, the libraries' too, of a module outside ``entries`` gets an
    :class:`UnauthorizedModule`. Other threads (the test's client) import freely, and so
    do this module (the server) and nnsight's own request machinery (a server's nnsight is whatever version makes
    its sandbox work; this client's 0.8.1 imports ``linecache`` while deserialising)."""
    import builtins

    real_import, serving = builtins.__import__, threading.get_ident()

    def checked(name: str, globals: Any = None, locals: Any = None,
                fromlist: Any = (), level: int = 0) -> Any:
        caller = (globals or {}).get("__name__", "") if isinstance(globals, dict) else ""
        if (threading.get_ident() != serving or name == "builtins"
                or caller.partition(".")[0] == "nnsight" or caller == __name__):
            return real_import(name, globals, locals, fromlist, level)
        if level == 0 and not allowed_by(name, entries):
            return UnauthorizedModule(name)
        module = real_import(name, globals, locals, fromlist, level)
        if level and not allowed_by(module.__name__, entries):
            return UnauthorizedModule(module.__name__)
        return module

    builtins.__import__ = checked
    try:
        yield
    finally:
        builtins.__import__ = real_import


@contextlib.contextmanager
def whitelist_process() -> Iterator[None]:
    """The rest of the rewritten sandbox's process state while a request runs: builtins
    off its list deleted from ``builtins``, the default dtype bf16; both restored."""
    import builtins

    namespace = vars(builtins)
    deleted = {name: value for name, value in namespace.items()
               if not name.startswith("_") and name not in WHITELIST_BUILTINS
               and not (isinstance(value, type) and issubclass(value, BaseException))}
    dtype = torch.get_default_dtype()
    for name in deleted:
        del namespace[name]
    torch.set_default_dtype(torch.bfloat16)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        namespace.update(deleted)


def server_builtins() -> dict[str, Any]:
    """The builtins a request's code sees on NDIF: :data:`SERVER_BUILTINS`, every exception
    and warning class, and an ``__import__`` that honours :func:`allow_list`."""
    import builtins

    names = {key: value for key, value in vars(builtins).items()
             if key in SERVER_BUILTINS
             or (isinstance(value, type) and issubclass(value, BaseException))}
    names["__import__"] = lambda *args, **kwargs: builtins.__import__(*args, **kwargs)
    return names


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


def record_response(kind: str, request: bytes, response: bytes,
                    compress: bool = False) -> RequestRecord:
    """What one answered request sent and got back (``response``: the result blob)."""
    data = response
    if compress:
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(response)
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    record = RequestRecord(kind, len(request), len(response), tuple(saved))
    for name, value in saved.items():
        _leaves(name, value, record)
    return record


@dataclass
class StrictServer:
    """The strict server's state: the modules it can import and the requests it answered."""

    allowed: frozenset[str] = field(default_factory=server_modules)
    requests: list[RequestRecord] = field(default_factory=list)
    running: bool = False
    failures: list[BaseException | None] = field(default_factory=list)
    #: Enforce NDIF's allow-lists; run under bf16 autocast (both as the real server does).
    strict: bool = True
    bf16: bool = True
    #: Which NDIF sandbox the requests run in (:data:`SANDBOXES`).
    sandbox: str = "allow-lists"

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
        response = self._serve(request)
        saved = torch.load(io.BytesIO(response), map_location="cpu", weights_only=False)
        self.server.requests.append(record_response(type(tracer).__name__, request, response))
        for value in saved.values():
            save(value)
        push(tracer.info.frame, saved)

    def _serve(self, request: bytes) -> bytes:
        from concurrent.futures import ThreadPoolExecutor

        self.server.running = True
        try:  # in a thread of its own: a server has none of the client's trace state
            with ThreadPoolExecutor(1) as pool:
                return pool.submit(serve_request, self.model, request,
                                   allowed=self.server.allowed, strict=self.server.strict,
                                   bf16=self.server.bf16, sandbox=self.server.sandbox).result()
        finally:
            self.server.running = False


def serve_request(model: Any, request: bytes, *, allowed: frozenset[str] | None = None,
                  strict: bool = True, bf16: bool = True, compress: bool = False,
                  sandbox: str = "allow-lists") -> bytes:
    """The server side of one request: deserialise, run, return ``torch.save`` of its saves.

    ``model`` is the nnsight model the request runs on. With ``strict``, the server's
    allow-lists are enforced (module doc, step 3), in the way ``sandbox`` says
    (:data:`SANDBOXES`; ``"whitelist"`` implies ``strict``); with ``bf16`` the request
    runs under ``torch.autocast(bfloat16)``. ``compress``: the request and the answer
    are zstd-compressed, as nnsight does when ``CONFIG.API.COMPRESS`` is set.
    """
    from nnsight.intervention.serialization import CustomCloudUnpickler
    from nnsight.schema.request import RequestModel

    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox {sandbox!r}: expected one of {SANDBOXES}")
    whitelist = sandbox == "whitelist"
    strict = strict or whitelist
    persistent = model._remoteable_persistent_objects()
    unpickler = _allow_listed_unpickler(CustomCloudUnpickler) if strict else CustomCloudUnpickler
    checked = allow_list if strict else _unchecked
    device_type = next(model._module.parameters()).device.type
    client_sources = dict(linecache.cache)  # deserialising registers the request's source
    with server_interpreter(allowed or server_modules()), _restored(linecache.cache, client_sources):
        with (process_imports(DESERIALISATION_MODULES) if whitelist
              else checked(DESERIALISATION_MODULES, "deserialising")):
            restored = RequestModel.deserialize(request, persistent, compress, unpickler)
        frame = restored.info.frame
        frame.f_locals = _PushedLocals(frame.f_locals)
        if whitelist:  # a plain dict: the module-level names the block captured are gone
            frame.f_globals = {"__builtins__": server_builtins()}
            frame.f_locals["__builtins__"] = frame.f_globals["__builtins__"]
        elif strict:  # the block, and functions it defines, see only the server's builtins
            frame.f_locals["__builtins__"] = frame.f_globals["__builtins__"] = server_builtins()
        running = (_stacked(process_imports(EXECUTION_MODULES), whitelist_process())
                   if whitelist else checked(EXECUTION_MODULES, "running", frame.f_globals))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            with running, _trace_scope():
                restored.execute(restored.info.code)
        buffer = io.BytesIO()
        torch.save(frame.f_locals.pushed, buffer)
    data = buffer.getvalue()
    if compress:
        import zstandard

        data = zstandard.ZstdCompressor(level=6).compress(data)
    return data


@contextlib.contextmanager
def _trace_scope() -> Iterator[None]:
    """This thread is inside one trace (nnsight's depth 1) while the request runs."""
    from nnsight.tracing.tracer import dec, inc

    inc()
    try:
        yield
    finally:
        dec()


@contextlib.contextmanager
def _restored(cache: dict, saved: dict) -> Iterator[None]:
    try:
        yield
    finally:
        cache.clear()
        cache.update(saved)


@contextlib.contextmanager
def _stacked(*contexts: Any) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield


@contextlib.contextmanager
def _unchecked(*args: Any, **kwargs: Any) -> Iterator[None]:
    yield


@contextlib.contextmanager
def strict_remote(lm: Any, *, bf16: bool = True, allow_lists: bool = True,
                  sandbox: str = "allow-lists") -> Iterator[StrictServer]:
    """Route every trace, generate and session of ``lm`` through a :class:`StrictBackend`.

    Sets ``lm.remote`` to ``"strict"`` (stage code passes it on unchanged) and teaches
    nnsight's ``Remotable._remote_backend`` that value; both are restored on exit.
    """
    from nnsight.modeling.mixins.remotable import Remotable

    server = StrictServer(strict=allow_lists, bf16=bf16, sandbox=sandbox)
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
