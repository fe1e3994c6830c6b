"""flydeploy: hot code upgrades for Python applications on Fly.io.

New application code reaches every running machine and every Python process on
it; long-lived servers are suspended at a safe point, their code is swapped in
place, their state is migrated through ``code_change`` and they are resumed.
Open connections stay open and in-memory state survives.  A restarted machine
catches up at boot; a cold ``fly deploy`` stays the way back to a clean
baseline.  Standard library only: vendor this one file into an app image.

At boot, one line is all an application needs::

    import flydeploy
    flydeploy.startup_reapply_current()

The file is organised in sections, in the order data flows:

0. Foundations    the exception hierarchy, logging, small shared helpers.
1. Storage        the SigV4 signer (``sign_request``, ``presign_url``) and the
                  S3/Tigris client (``S3``); ``LocalStore``, the same interface
                  on a directory, for local mode.
2. Releases       deterministic release tarballs (``pack_release``,
                  ``unpack_release``), the ``current.json`` metadata
                  (``read_current``, ``record_hot_upgrade``, ``reset_current``)
                  and the deploy lock (``acquire_lock``).
3. Machines API   the Fly Machines API client (``Machines``) and the fleet
                  orchestration that pushes a release to every machine
                  (``orchestrate``).
4. Engine         what happens inside one process: servers (``Server``),
                  asyncio loop pausing (``attach_loop``), change tracking
                  (``track``, ``modified_modules``) and the transactional
                  in-place code swap (``reload_modules``).
5. Agent          the per-process agent on a unix socket, the per-machine
                  upgrade (``hot_upgrade``), boot-time catch-up
                  (``startup_reapply_current``) and the poller.
6. Entry points   ``python -m flydeploy rpc ...`` and
                  ``python -m flydeploy orchestrate ...``.

Every error raised on purpose is a ``FlyDeployError``; its message says what
went wrong and what to do about it.  Secrets never appear in messages or logs.
"""

from __future__ import annotations

import abc
import ast
import builtins
import collections
import contextlib
import dataclasses
import enum
import functools
import gc
import hashlib
import importlib
import importlib.machinery
import importlib.util
import linecache
import logging
import marshal
import operator
import os
import site
import sys
import sysconfig
import threading
import time
import traceback
import types
from collections.abc import Callable
from collections.abc import Iterable

__version__ = "0.1.0"

__all__ = [
    # 0. Foundations
    "FlyDeployError",
    "ConfigError",
    # 1. Storage
    "S3Error",
    "NotFound",
    "PreconditionFailed",
    # 1. Storage: SigV4 and S3 client
    # 1. Storage: local directory store
    # 2. Releases
    # 3. Machines API
    # 3. Fleet orchestration
    # 4. Engine: servers and asyncio loops
    # 4. Engine: tracking, code swap, reload_modules
    "track",
    "modified_modules",
    "reload_modules",
    "UpgradeReport",
    "UpgradeRefused",
    "on_upgrade",
    # 5. Agent
    # 6. Entry points
]

# ===========================================================================
# 0. Foundations
# ===========================================================================

log = logging.getLogger("flydeploy")


class FlyDeployError(Exception):
    """Base class of every error flydeploy raises on purpose."""


class ConfigError(FlyDeployError):
    """A setting is missing or malformed; the message names where to set it."""


# ===========================================================================
# 1. Storage: SigV4 signer, S3/Tigris client, local directory store
# ===========================================================================


class S3Error(FlyDeployError):
    """A storage request failed.

    ``status`` is the HTTP status (0 when no reply came), ``code`` and
    ``message`` come from the server's XML error body, ``request_id`` from its
    headers; ``key`` is the object the request was about.
    """

    def __init__(self, message: str, *, status: int = 0, code: str = "",
                 request_id: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.key = key


class NotFound(S3Error):
    """The object does not exist (HTTP 404)."""


class PreconditionFailed(S3Error):
    """A conditional request (``If-Match`` / ``If-None-Match``) did not hold (HTTP 412)."""


# --- SigV4 signing ----------------------------------------------------------


# --- S3 client --------------------------------------------------------------


# --- Local directory store --------------------------------------------------


# ===========================================================================
# 2. Releases: tarballs, current.json metadata, deploy lock
# ===========================================================================


# --- Release tarballs ------------------------------------------------------


# --- current.json metadata --------------------------------------------------


# --- Deploy lock ------------------------------------------------------------


# ===========================================================================
# 3. Machines API: Fly Machines client, fleet orchestration
# ===========================================================================


# --- Machines API client ----------------------------------------------------


# --- Fleet orchestration ----------------------------------------------------


# ===========================================================================
# 4. Engine: servers, asyncio pause, change tracking, in-place code swap
# ===========================================================================


# --- Servers ----------------------------------------------------------------


# --- asyncio loops and the pause --------------------------------------------


# --- Change tracking --------------------------------------------------------

# A checked hash-based pyc (PEP 552): the interpreter validates it against the
# source's content, never against an mtime.
_PYC_CHECKED_HASH = 0b11


@dataclasses.dataclass(frozen=True)
class _Loaded:
    """What one tracked module was loaded from: its file, the content hash of
    the bytes that were loaded, and those bytes (None for C extensions)."""

    path: str
    digest: str
    source: bytes | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as stream:
        return stream.read()


def _module_origin(module: types.ModuleType) -> str | None:
    """The file a module was loaded from, or None when it has none."""
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.has_location and isinstance(spec.origin, str):
        return spec.origin
    origin = getattr(module, "__file__", None)
    return origin if isinstance(origin, str) else None


def _is_extension(path: str) -> bool:
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _installation_dirs() -> tuple[str, ...]:
    """Directories of the standard library and of every site-packages."""
    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(path)
    for getter in (site.getsitepackages, lambda: [site.getusersitepackages()]):
        try:
            dirs.update(getter())
        except AttributeError:  # a virtualenv's site module may lack them
            pass
    return tuple(sorted({os.path.realpath(d) for d in dirs}))


def _is_under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def _code_from_source(path: str, source: bytes) -> types.CodeType:
    """The code object of ``source``, from a matching checked-hash pyc when
    there is one, else compiled (and cached as such a pyc)."""
    key = importlib.util.source_hash(source)
    try:
        cached = importlib.util.cache_from_source(path)
        data = _read_bytes(cached)
    except (NotImplementedError, OSError):
        data = b""
    if (data[:4] == importlib.util.MAGIC_NUMBER
            and int.from_bytes(data[4:8], "little") & 1 and data[8:16] == key):
        try:
            return marshal.loads(memoryview(data)[16:])
        except (EOFError, ValueError, TypeError):
            pass  # a damaged cache file: compile instead
    code = compile(source, path, "exec", dont_inherit=True)
    _write_pyc(path, source, code)
    return code


def _write_pyc(path: str, source: bytes, code: types.CodeType) -> None:
    """Cache ``code`` as a checked-hash pyc so every later process, with or
    without flydeploy, runs exactly this source; drop the stale file if the
    cache directory is not writable."""
    if sys.dont_write_bytecode:
        return
    try:
        cached = importlib.util.cache_from_source(path)
    except NotImplementedError:
        return
    data = (importlib.util.MAGIC_NUMBER + _PYC_CHECKED_HASH.to_bytes(4, "little")
            + importlib.util.source_hash(source) + marshal.dumps(code))
    temporary = f"{cached}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with open(temporary, "wb") as stream:
            stream.write(data)
        os.replace(temporary, cached)
    except OSError:
        for leftover in (temporary, cached):
            try:
                os.unlink(leftover)
            except OSError:
                pass


# Modules an upgrade will import for the first time, read and compiled while
# preparing so that importing them inside the pause does no file I/O:
# path -> (source, code).
_prepared_imports: dict[str, tuple[bytes, types.CodeType]] = {}


class _TrackingLoader(importlib.machinery.SourceFileLoader):
    """Loads a tracked module and records the hash of the very bytes it ran."""

    def get_code(self, fullname: str) -> types.CodeType:
        path = self.get_filename(fullname)
        prepared = _prepared_imports.pop(path, None)
        if prepared is None:
            source = self.get_data(path)
            prepared = (source, _code_from_source(path, source))
        _tracker.remember(fullname, path, prepared[0])
        return prepared[1]


class _TrackingFinder:
    """First finder on ``sys.meta_path``: asks the others, then hands modules
    under a tracked root to ``_TrackingLoader`` (C extensions are hashed)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if not _tracker.roots:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        origin = spec.origin if spec.has_location else None
        if origin and _tracker.covers(fullname, origin):
            if type(spec.loader) is importlib.machinery.SourceFileLoader:
                spec.loader = _TrackingLoader(fullname, origin)
            elif _is_extension(origin):
                _tracker.remember(fullname, origin, None)
        return spec


class _Tracker:
    """The tracked roots and what every tracked module was loaded from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.roots: tuple[str, ...] = ()
        self.loaded: dict[str, _Loaded] = {}
        self.finder = _TrackingFinder()
        self._installation: tuple[str, ...] | None = None

    def covers(self, name: str, path: str) -> bool:
        """Whether module ``name`` loaded from ``path`` is the application's."""
        if name in ("__main__", __name__) or not self.roots:
            return False
        path = os.path.realpath(path)
        if not any(_is_under(path, root) for root in self.roots):
            return False
        if self._installation is None:
            self._installation = _installation_dirs()
        parts = path.split(os.sep)
        return ("site-packages" not in parts and "dist-packages" not in parts
                and not any(_is_under(path, d) for d in self._installation))

    def remember(self, name: str, path: str, source: bytes | None) -> None:
        """Record what module ``name`` runs (for extensions: hash the file now)."""
        try:
            data = _read_bytes(path) if source is None else source
        except OSError:
            return
        with self.lock:
            self.loaded[name] = _Loaded(path, _sha256(data), source)

    def add_roots(self, roots: list[str]) -> None:
        with self.lock:
            self.roots = tuple(dict.fromkeys(self.roots + tuple(roots)))
            if self.finder not in sys.meta_path:
                sys.meta_path.insert(0, self.finder)
        for name, module in list(sys.modules.items()):
            origin = _module_origin(module) if module is not None else None
            if (origin is None or name in self.loaded or not self.covers(name, origin)
                    or not (origin.endswith(".py") or _is_extension(origin))):
                continue
            try:
                data = _read_bytes(origin)
            except OSError:
                continue
            self.remember(name, origin, None if _is_extension(origin) else data)

    def record_for(self, name: str) -> _Loaded | None:
        """What the live module ``name`` was loaded from, if it is tracked."""
        record = self.loaded.get(name)
        module = sys.modules.get(name)
        if record is None or module is None or _module_origin(module) != record.path:
            return None
        return record


_tracker = _Tracker()


def track(*roots: str | os.PathLike[str]) -> list[str]:
    """Declare the application's source roots and start tracking its modules.

    Only modules whose file lies under a root are ever upgraded; the standard
    library and site-packages never are, even under a root.  Without roots,
    the directory of ``__main__`` is used, else the current directory.  Each
    module's source hash is recorded from the bytes it is imported from;
    modules already imported are hashed now.  Calling ``track`` again adds
    roots.  Returns every tracked root.
    """
    if not roots:
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        roots = (os.path.dirname(os.path.abspath(main_file)) if main_file else os.getcwd(),)
    resolved = []
    for root in roots:
        path = os.path.realpath(os.fspath(root))
        if not os.path.isdir(path):
            raise ConfigError(f"track(): source root {os.fspath(root)!r} is not a directory; "
                              "pass the directory that holds the application's modules")
        resolved.append(path)
    _tracker.add_roots(resolved)
    return list(_tracker.roots)


def modified_modules() -> list[str]:
    """The tracked modules whose file on disk differs from what is loaded.

    Compares content hashes, never modification times; a deleted file is not
    reported (there is nothing to load).  Names are sorted.
    """
    changed = []
    for name in sorted(_tracker.loaded):
        record = _tracker.record_for(name)
        if record is None:
            continue
        try:
            data = _read_bytes(record.path)
        except OSError:
            continue
        if _sha256(data) != record.digest:
            changed.append(name)
    return changed


# --- In-place code swap -----------------------------------------------------


class UpgradeRefused(FlyDeployError):
    """An upgrade cannot be applied in place (a syntax error, a changed C
    extension, a class shape change with live instances, changed Enum
    members...).  Found while preparing, before anything was suspended or
    changed; ``module`` names the module at fault."""

    def __init__(self, message: str, *, module: str) -> None:
        super().__init__(message)
        self.module = module


_MISSING = object()
_REUSE = "__flydeploy_reuse__"
# Class dictionary entries that describe the class object itself, never copied
# from a new class body.
_CLASS_LAYOUT = frozenset({"__dict__", "__weakref__", "__slots__", "__classcell__",
                           "__module__", "__orig_bases__"})
_DATACLASS_BOOKKEEPING = frozenset({"__dataclass_fields__", "__dataclass_params__",
                                    "__match_args__"})
_SKIPPED_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _bound_names(statement: ast.stmt) -> set[str]:
    """Names a statement binds in the scope it is written in."""
    names: set[str] = set()
    stack: list[ast.AST] = [statement]
    while stack:
        node = stack.pop()
        if isinstance(node, (*_DEFS, ast.ClassDef)):
            names.add(node.name)
            if node is not statement:
                continue
            stack.extend(node.decorator_list)
            continue
        if isinstance(node, _SKIPPED_SCOPES):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name.split(".")[0]) for a in node.names if a.name != "*")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            names.add(node.rest)
        stack.extend(ast.iter_child_nodes(node))
    return names


def _nested_statements(body: list[ast.stmt]):
    """The statements of one scope, including those inside if/try/with/for/
    match blocks, without entering function or class bodies."""
    for statement in body:
        yield statement
        if isinstance(statement, (*_DEFS, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _nested_statements(getattr(statement, field, None) or [])
        for block in (*getattr(statement, "handlers", ()), *getattr(statement, "cases", ())):
            yield from _nested_statements(block.body)


@dataclasses.dataclass
class _Scope:
    """One module or class body as written: for each name, the source text of
    the statements that bind it (so a changed statement can be told from an
    unchanged one), the class header, and the functions it defines."""

    statements: dict[str, tuple[str, ...]]
    header: str = ""
    defs: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    twice: frozenset[str] = frozenset()  # names bound by several plain defs
    values: dict[str, str] = dataclasses.field(default_factory=dict)  # NAME = <source>


def _scopes(tree: ast.Module, source: bytes) -> dict[str, _Scope]:
    """Every module-level and class scope of a module, keyed by qualname
    (``""`` is the module itself)."""
    lines = importlib.util.decode_source(source).split("\n")
    scopes: dict[str, _Scope] = {}

    def text(statement: ast.stmt) -> str:
        first = min([d.lineno for d in getattr(statement, "decorator_list", ())]
                    + [statement.lineno])
        return "\n".join(line.rstrip() for line in lines[first - 1:statement.end_lineno])

    def visit(qualname: str, body: list[ast.stmt], header: str) -> None:
        statements: dict[str, list[str]] = collections.defaultdict(list)
        scope = _Scope({}, header)
        for statement in body:
            written = text(statement)
            for name in _bound_names(statement):
                statements[name].append(written)
            if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
                targets = (statement.targets if isinstance(statement, ast.Assign)
                           else [statement.target])
                scope.values.update((t.id, ast.unparse(statement.value)) for t in targets
                                    if isinstance(t, ast.Name))
        for statement in _nested_statements(body):
            if not isinstance(statement, (*_DEFS, ast.ClassDef)):
                continue
            inner = f"{qualname}.{statement.name}" if qualname else statement.name
            if isinstance(statement, _DEFS):
                scope.defs[(inner, _accessor(statement))] += 1
            else:
                visit(inner, statement.body,
                      ast.dump(ast.Tuple(statement.bases + [k.value for k in statement.keywords]))
                      + repr([k.arg for k in statement.keywords]))
        scope.statements = {name: tuple(texts) for name, texts in statements.items()}
        scope.twice = frozenset(name.rpartition(".")[2] for (name, accessor), count
                                in scope.defs.items() if count > 1 and not accessor)
        scopes[qualname] = scope

    visit("", tree.body, "")
    return scopes


def _accessor(definition: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """Which property accessor a ``def`` makes, from its decorators ("" if none)."""
    for decorator in definition.decorator_list:
        if isinstance(decorator, ast.Name) and decorator.id == "property":
            return "fget"
        if isinstance(decorator, ast.Attribute) and decorator.attr in ("getter", "setter",
                                                                      "deleter"):
            return {"getter": "fget", "setter": "fset", "deleter": "fdel"}[decorator.attr]
    return ""


def _inject_reuse(tree: ast.Module, reusable: set[tuple[str, str]]) -> None:
    """Give every reusable ``def`` an innermost decorator that moves the new
    code into the old function object and returns the old object, so every
    other decorator and registry sees the function it saw before."""

    def visit(qualname: str, body: list[ast.stmt]) -> None:
        for statement in _nested_statements(body):
            if not isinstance(statement, (*_DEFS, ast.ClassDef)):
                continue
            inner = f"{qualname}.{statement.name}" if qualname else statement.name
            if isinstance(statement, _DEFS):
                key = (inner, _accessor(statement))
                if key in reusable:
                    where = {"lineno": statement.lineno, "col_offset": statement.col_offset,
                             "end_lineno": statement.lineno,
                             "end_col_offset": statement.col_offset}
                    call = ast.Call(ast.Name(_REUSE, ast.Load(), **where),
                                    [ast.Constant(inner, **where), ast.Constant(key[1], **where)],
                                    [], **where)
                    statement.decorator_list.append(call)
            elif isinstance(statement, ast.ClassDef):
                visit(inner, statement.body)

    visit("", tree.body)


def _enum_members(scope: _Scope) -> dict[str, str]:
    """Member names of an Enum class as written, with the source of each value
    (sunder and dunder names and the names in ``_ignore_`` are no members)."""
    ignored: set[str] = set()
    if "_ignore_" in scope.values:
        node = ast.parse(scope.values["_ignore_"], mode="eval").body
        for item in (node.elts if isinstance(node, (ast.List, ast.Tuple)) else [node]):
            if isinstance(item, ast.Constant) and isinstance(item.value, str):
                ignored.update(item.value.split())
    return {name: value for name, value in scope.values.items()
            if name not in ignored and not (name.startswith("_") and name.endswith("_"))}


def _live_instances(classes: set[type]) -> dict[type, int]:
    """How many live objects are instances of each class (or a subclass)."""
    owners: dict[type, type] = {}
    for cls in classes:
        pending = [cls]
        while pending:
            current = pending.pop()
            owners.setdefault(current, cls)
            pending.extend(type.__subclasses__(current))
    counts: dict[type, int] = collections.Counter()
    for obj in gc.get_objects():
        owner = owners.get(type(obj))
        if owner is not None:
            counts[owner] += 1
    return counts


def _lookup(namespace: dict, qualname: str):
    """Follow a dotted qualname through a module namespace and class dicts."""
    parts = qualname.split(".")
    obj = namespace.get(parts[0], _MISSING)
    for part in parts[1:]:
        if not isinstance(obj, type):
            return _MISSING
        obj = obj.__dict__.get(part, _MISSING)
    return obj


@dataclasses.dataclass
class _ModulePlan:
    """Everything prepared for reloading one module, before touching anything."""

    name: str
    module: types.ModuleType
    path: str
    source: bytes
    swap_code: types.CodeType | None  # the new source with reuse decorators injected
    old: dict[str, _Scope]
    new: dict[str, _Scope]
    rebuilt: set[str]          # class qualnames that get a new class object
    imports: set[str]


def _imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Absolute names of the modules a module body imports (and their parents)."""
    names: set[str] = set()
    for statement in _nested_statements(tree.body):
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * statement.level + (statement.module or ""),
                                                   package) if statement.level else statement.module
            except (ImportError, ValueError):
                continue
            targets = [base] + [f"{base}.{alias.name}" for alias in statement.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


# The scopes of the source each module runs, kept from its last upgrade:
# module name -> (content hash of that source, its scopes).
_analysed: dict[str, tuple[str, dict[str, _Scope]]] = {}


def _plan_module(name: str) -> _ModulePlan:
    """Read, compile and check one module's new source; raises UpgradeRefused."""
    module = sys.modules.get(name)
    record = _tracker.record_for(name)
    if module is None or record is None:
        raise FlyDeployError(f"module {name!r} is not a tracked, imported module; "
                             "import it and call flydeploy.track(<source root>) first")
    try:
        source = _read_bytes(record.path)
    except OSError as exc:
        raise UpgradeRefused(f"cannot read {record.path} for module {name}: {exc.strerror}; "
                             "restore the file or leave the module out", module=name) from None
    if record.source is None:
        if _sha256(source) == record.digest:
            raise FlyDeployError(f"module {name!r} is a C extension and cannot be reloaded")
        raise UpgradeRefused(f"cold deploy required: C extension {name} ({record.path}) "
                             "changed; run `fly deploy`", module=name)
    try:
        tree = ast.parse(source, record.path)
        new = _scopes(tree, source)
        cached = _analysed.get(name)
        old = (cached[1] if cached is not None and cached[0] == record.digest
               else _scopes(ast.parse(record.source, record.path), record.source))
        package = name if hasattr(module, "__path__") else name.rpartition(".")[0]
        plan = _ModulePlan(name, module, record.path, source, None, old, new, set(),
                           _imported_modules(tree, package))
        _check_classes(plan)
        reusable: set[tuple[str, str]] = set()
        for qualname, scope in new.items():
            before = old.get(qualname)
            if before is not None and not _within(qualname, plan.rebuilt):
                reusable.update(key for key, count in scope.defs.items()
                                if count == 1 and before.defs.get(key) == 1)
        _inject_reuse(tree, reusable)
        plan.swap_code = compile(tree, record.path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise UpgradeRefused(f"syntax error in {exc.filename or record.path}, line {exc.lineno}: "
                             f"{exc.msg}; fix it and upgrade again (nothing was changed)",
                             module=name) from None
    return plan


def _within(qualname: str, prefixes: set[str]) -> bool:
    return any(qualname == p or qualname.startswith(p + ".") for p in prefixes)


def _check_classes(plan: _ModulePlan) -> None:
    """Refuse what cannot change in place: Enum members added, removed or
    given new values; a changed base list, metaclass or ``__slots__`` of a
    class with live instances.  Such a class without instances is rebuilt."""
    reshaped: dict[type, str] = {}
    for qualname, scope in plan.new.items():
        before = plan.old.get(qualname)
        cls = _lookup(plan.module.__dict__, qualname) if qualname else None
        if (before is None or not isinstance(cls, type) or cls.__module__ != plan.name
                or cls.__qualname__ != qualname):
            continue
        where = f"{plan.name}.{qualname}"
        if issubclass(cls, enum.Enum):
            old_members, new_members = _enum_members(before), _enum_members(scope)
            if old_members.keys() != new_members.keys():
                added = sorted(new_members.keys() - old_members.keys())
                removed = sorted(old_members.keys() - new_members.keys())
                raise UpgradeRefused(f"cold deploy required: Enum {where} members changed "
                                     f"(added {added}, removed {removed}); live members cannot "
                                     "be added or removed in place", module=plan.name)
            changed = sorted(k for k in old_members if old_members[k] != new_members[k])
            if changed:
                raise UpgradeRefused(f"cold deploy required: Enum {where} members {changed} "
                                     "changed value", module=plan.name)
        if (before.header != scope.header
                or before.statements.get("__slots__") != scope.statements.get("__slots__")):
            reshaped[cls] = qualname
    if not reshaped:
        return
    for cls, count in _live_instances(set(reshaped)).items():
        raise UpgradeRefused(f"cold deploy required: class {plan.name}.{reshaped[cls]} changed "
                             f"its base list, metaclass or __slots__ and has {count} live "
                             "instance(s)", module=plan.name)
    plan.rebuilt.update(reshaped.values())


def _import_order(plans: dict[str, _ModulePlan]) -> list[_ModulePlan]:
    """The plans with every module after the changed modules it imports;
    import cycles are cut where the modules were first imported."""
    position = {name: index for index, name in enumerate(sys.modules)}
    ordered: list[_ModulePlan] = []
    visited: set[str] = set()

    def visit(name: str) -> None:
        if name in visited:
            return
        visited.add(name)
        for dependency in sorted(plans[name].imports & plans.keys(), key=position.__getitem__):
            visit(dependency)
        ordered.append(plans[name])

    for name in sorted(plans, key=position.__getitem__):
        visit(name)
    return ordered


def _changed(old: _Scope | None, new: _Scope | None, name: str) -> bool:
    """Whether ``name`` must take its new value: its binding statements changed,
    or nothing in the new source binds it explicitly."""
    if old is None or new is None or name not in new.statements:
        return True
    return old.statements.get(name) != new.statements[name]


def _defined_twice(old: _Scope | None, new: _Scope | None, name: str) -> bool:
    """Whether several plain ``def`` statements bind the name (``_`` for
    singledispatch registrations...): then the name says nothing about which
    old function a new one continues."""
    return any(scope is not None and name in scope.twice for scope in (old, new))


_FUNCTION_ATTRIBUTES = ("__code__", "__defaults__", "__kwdefaults__", "__doc__",
                        "__annotations__", "__name__", "__qualname__")
_function_attributes = operator.attrgetter(*_FUNCTION_ATTRIBUTES)


def _set_function_attributes(function: types.FunctionType, values: tuple) -> None:
    (function.__code__, function.__defaults__, function.__kwdefaults__, function.__doc__,
     function.__annotations__, function.__name__, function.__qualname__) = values
_build_class = builtins.__build_class__


def _is_singledispatch(obj: object) -> bool:
    return isinstance(obj, types.FunctionType) and all(
        hasattr(obj, a) for a in ("register", "dispatch", "registry", "__wrapped__"))


def _unwrap_to_function(obj: object, accessor: str) -> types.FunctionType | None:
    """The innermost plain function behind a descriptor or decorator wrapper."""
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = getattr(obj, accessor or "fget")
    elif isinstance(obj, functools.cached_property):
        obj = obj.func
    for _ in range(100):  # a __wrapped__ cycle must not hang the upgrade
        inner = getattr(obj, "__wrapped__", None)
        if inner is None:
            break
        obj = inner
    return obj if isinstance(obj, types.FunctionType) else None


class _Swap:
    """One in-place code swap with its undo log.

    Executes each new module body in the live module's namespace, with two
    hooks: an innermost decorator on every function that moves the new code
    into the old function object (so decorators and registries see the old
    identity), and a ``__build_class__`` that updates an existing class in
    place instead of creating a new one.  Then module state is merged:
    every change made is logged so ``rollback`` can undo all of it.
    """

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.undo: list[Callable[[], None]] = []
        self.saved: set[int] = set()
        self.merging: set[int] = set()
        # Functions changed so far, with what each was before.
        self.functions: dict[int, tuple[types.FunctionType, tuple, dict]] = {}
        self.added: list[str] = []
        self.replaced: list[str] = []
        self.old_globals: dict[str, dict] = {}
        self.plan: _ModulePlan | None = None
        self.stage = ""
        self.modules_before = set(sys.modules)

    # -- the undo log --

    def _save_class(self, cls: type) -> None:
        if id(cls) in self.saved:
            return
        self.saved.add(id(cls))
        contents = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}

        def restore() -> None:
            current = dict(cls.__dict__)
            for attribute in current.keys() - contents.keys() - {"__dict__", "__weakref__"}:
                delattr(cls, attribute)
            for attribute, value in contents.items():
                if current.get(attribute, _MISSING) is not value:
                    setattr(cls, attribute, value)
            if isinstance(cls, abc.ABCMeta):
                cls._abc_caches_clear()

        self.undo.append(restore)

    def _save_module(self, module: types.ModuleType) -> dict:
        contents = dict(module.__dict__)
        self.undo.append(lambda: _restore_mapping(module.__dict__, contents))
        return contents

    def _set_cell(self, cell: types.CellType, value: object) -> None:
        try:
            before = cell.cell_contents
        except ValueError:
            before = _MISSING

        def restore() -> None:
            if before is _MISSING:
                del cell.cell_contents
            else:
                cell.cell_contents = before

        self.undo.append(restore)
        cell.cell_contents = value

    def rollback(self) -> None:
        """Put every module, function, class and closure back as it was."""
        for restore in reversed(self.undo):
            try:
                restore()
            except Exception:  # keep undoing the rest whatever one step does
                log.exception("flydeploy: one step of the rollback failed")
        for function, attributes, contents in self.functions.values():
            _set_function_attributes(function, attributes)
            _restore_mapping(function.__dict__, contents)
        self.undo.clear()
        self.functions.clear()
        for name in set(sys.modules) - self.modules_before:
            sys.modules.pop(name, None)

    # -- merging old and new objects --

    def merge(self, old: object, new: object, changed: bool, label: str) -> object:
        """What to bind where ``old`` was bound and the new source made ``new``:
        the old object carrying the new code wherever possible."""
        if old is new:
            return old
        if _is_singledispatch(old) and _is_singledispatch(new):
            return self._merge_singledispatch(old, new, label)
        if isinstance(old, types.FunctionType) and isinstance(new, types.FunctionType):
            if (old.__qualname__, old.__module__) == (new.__qualname__, new.__module__):
                return self.swap_function(old, new, changed, label)
        elif type(old) is type(new) and isinstance(old, (classmethod, staticmethod)):
            inner = self.merge(old.__func__, new.__func__, changed, label)
            return old if inner is old.__func__ else new
        elif type(old) is type(new) and isinstance(old, property):
            pairs = [(getattr(old, a), getattr(new, a)) for a in ("fget", "fset", "fdel")]
            if all((o is None) == (n is None) for o, n in pairs):
                merged = [o if o is None else self.merge(o, n, changed, label) for o, n in pairs]
                if all(m is o for m, (o, _) in zip(merged, pairs)):
                    return old
            return new
        elif (type(old) is type(new) and hasattr(old, "cache_clear")
                and hasattr(old, "__wrapped__")):
            inner = self.merge(old.__wrapped__, new.__wrapped__, changed, label)
            if inner is old.__wrapped__:
                saved = self.functions.get(id(inner))
                if saved is not None and saved[1][0] != inner.__code__:
                    old.cache_clear()
                return old
            return new
        elif isinstance(old, type) and isinstance(new, type):
            self._replace(label)  # a class rebuilt because its shape changed
            return new
        return new if changed else old

    def _replace(self, label: str) -> None:
        if label not in self.replaced:
            self.replaced.append(label)

    def swap_function(self, old: types.FunctionType, new: types.FunctionType, changed: bool,
                      label: str) -> types.FunctionType:
        """Give ``old`` the code, defaults and attributes of ``new``; returns
        ``new`` instead (listed as replaced) when their free variables differ."""
        if id(old) in self.merging:
            return old
        if old.__code__.co_freevars != new.__code__.co_freevars:
            self._replace(label)
            return new
        if id(old) not in self.functions:
            self.functions[id(old)] = (old, _function_attributes(old), dict(old.__dict__))
        _set_function_attributes(old, _function_attributes(new))
        if old.__dict__ or new.__dict__ or old.__closure__:
            self.merging.add(id(old))
            try:
                self._merge_function_contents(old, new, changed, label)
            finally:
                self.merging.discard(id(old))
        return old

    def _merge_function_contents(self, old: types.FunctionType, new: types.FunctionType,
                                 changed: bool, label: str) -> None:
        """Attributes and closure cells: the old objects carrying the new code."""
        merged = {key: value if old.__dict__.get(key, _MISSING) is _MISSING
                  else self.merge(old.__dict__[key], value, changed, label)
                  for key, value in new.__dict__.items()}
        _restore_mapping(old.__dict__, merged)
        for old_cell, new_cell in zip(old.__closure__ or (), new.__closure__ or ()):
            try:
                before, after = old_cell.cell_contents, new_cell.cell_contents
            except ValueError:
                continue
            merged_value = self.merge(before, after, changed, label)
            if merged_value is not before:
                self._set_cell(old_cell, merged_value)

    def _merge_singledispatch(self, old: types.FunctionType, new: types.FunctionType,
                              label: str) -> types.FunctionType:
        """Keep the old dispatcher; its registered implementations take the
        new code, and implementations registered only by the new source join."""
        cells = dict(zip(old.dispatch.__code__.co_freevars, old.dispatch.__closure__ or ()))
        registry = cells["registry"].cell_contents if "registry" in cells else None
        if isinstance(registry, dict):
            contents = dict(registry)
            self.undo.append(lambda: (_restore_mapping(registry, contents), old._clear_cache()))
        for cls, implementation in new.registry.items():
            current = old.registry.get(cls)
            merged = (implementation if current is None
                      else self.merge(current, implementation, True, label))
            if merged is not current:
                old.register(cls, merged)
        old._clear_cache()
        return old

    # -- the hooks that run inside a new module body --

    def reuse(self, qualname: str, accessor: str) -> Callable[[types.FunctionType], object]:
        """The innermost decorator injected on every ``def`` that existed before."""
        plan = self.plan

        def decorate(new: types.FunctionType) -> object:
            old = _unwrap_to_function(_lookup(self.old_globals[plan.name], qualname), accessor)
            if old is None or (old.__qualname__, old.__module__) != (new.__qualname__,
                                                                      new.__module__):
                return new
            return self.swap_function(old, new, True, f"{plan.name}.{qualname}")

        return decorate

    def build_class(self, body: types.FunctionType, name: str, /, *bases: object,
                    **keywords: object) -> object:
        """``builtins.__build_class__`` during the swap: a class statement of
        the module being executed updates the existing class in place."""
        plan = self.plan
        qualname = getattr(body, "__qualname__", "")
        if (plan is not None and threading.get_ident() == self.thread
                and body.__globals__ is plan.module.__dict__ and "<locals>" not in qualname
                and not _within(qualname, plan.rebuilt)):
            cls = _lookup(self.old_globals[plan.name], qualname)
            if (isinstance(cls, type) and cls.__module__ == plan.name
                    and cls.__qualname__ == qualname):
                return self._update_class(cls, body, bases, keywords)
        return _build_class(body, name, *bases, **keywords)

    def _update_class(self, cls: type, body: types.FunctionType, bases: tuple,
                      keywords: dict) -> type:
        plan = self.plan
        _, namespace, _ = types.prepare_class(body.__name__, types.resolve_bases(bases), keywords)
        exec(body.__code__, body.__globals__, namespace, closure=body.__closure__)
        cell = namespace.get("__classcell__")
        if cell is not None:  # zero-argument super() in the new methods
            cell.cell_contents = cls
        self._save_class(cls)
        qualname = cls.__qualname__
        old_scope, new_scope = plan.old.get(qualname), plan.new.get(qualname)
        members = set(cls._member_map_) if isinstance(cls, enum.EnumMeta) else set()
        skipped = _CLASS_LAYOUT | members | {"_ignore_"}
        label = f"{plan.name}.{qualname}"
        for attribute, value in dict(namespace).items():
            if attribute in skipped:
                continue
            if attribute in ("__init_subclass__", "__class_getitem__") and isinstance(
                    value, types.FunctionType):
                value = classmethod(value)
            elif attribute == "__new__" and isinstance(value, types.FunctionType):
                value = staticmethod(value)
            current = cls.__dict__.get(attribute, _MISSING)
            if current is not _MISSING and not _defined_twice(old_scope, new_scope, attribute):
                value = self.merge(current, value, _changed(old_scope, new_scope, attribute),
                                   f"{label}.{attribute}")
            if value is not current:
                setattr(cls, attribute, value)
                set_name = getattr(type(value), "__set_name__", None)
                if set_name is not None:
                    set_name(value, cls, attribute)
        if old_scope is not None and new_scope is not None:
            for attribute in old_scope.statements.keys() - new_scope.statements.keys() - skipped:
                if attribute in cls.__dict__:
                    delattr(cls, attribute)
        if "__doc__" not in namespace:
            cls.__doc__ = None
        if "__hash__" not in namespace:  # what type() does for a class defining __eq__
            if "__eq__" in namespace:
                cls.__hash__ = None
            elif "__hash__" in cls.__dict__ and cls.__dict__["__hash__"] is None:
                delattr(cls, "__hash__")
        if "__dataclass_fields__" in cls.__dict__:  # let @dataclass generate afresh
            for attribute, value in list(cls.__dict__.items()):
                if attribute not in namespace and (
                        attribute in _DATACLASS_BOOKKEEPING
                        or getattr(getattr(_unwrap_to_function(value, ""), "__code__", None),
                                   "co_filename", "") == "<string>"):
                    delattr(cls, attribute)
        if isinstance(cls, abc.ABCMeta):
            abc.update_abstractmethods(cls)
            cls._abc_caches_clear()
        return cls

    # -- modules --

    def swap_module(self, plan: _ModulePlan) -> None:
        """Execute the new body of one module in place and merge its state."""
        namespace = plan.module.__dict__
        old = self.old_globals[plan.name] = self._save_module(plan.module)
        namespace.pop("__annotations__", None)
        namespace["__doc__"] = None
        namespace[_REUSE] = self.reuse
        self.plan, self.stage = plan, f"executing module {plan.name}"
        builtins.__build_class__ = self.build_class
        try:
            exec(plan.swap_code, namespace)
        finally:
            builtins.__build_class__ = _build_class
            namespace.pop(_REUSE, None)
            self.plan = None
        self.stage = f"merging the state of module {plan.name}"
        keep = namespace.get("__hot_keep__", old.get("__hot_keep__", ()))
        keep = {keep} if isinstance(keep, str) else set(keep)
        old_scope, new_scope = plan.old[""], plan.new[""]
        for name, value in list(namespace.items()):
            current = old.get(name, _MISSING)
            if current is _MISSING:
                if not (name.startswith("__") and name.endswith("__")):
                    self.added.append(f"{plan.name}.{name}")
            elif name in keep:
                namespace[name] = current
            elif (value is not current and name not in ("__doc__", "__annotations__")
                  and not _defined_twice(old_scope, new_scope, name)):
                namespace[name] = self.merge(current, value, _changed(old_scope, new_scope, name),
                                             f"{plan.name}.{name}")
        for name in old_scope.statements.keys() - new_scope.statements.keys() - keep:
            value = namespace.get(name, _MISSING)
            submodule = sys.modules.get(f"{plan.name}.{name}")
            if value is not _MISSING and (submodule is None or value is not submodule):
                del namespace[name]

    def run(self, plans: list[_ModulePlan]) -> None:
        """Swap every module in order, then run each new ``__hot_upgrade__``."""
        for plan in plans:
            self.swap_module(plan)
        for plan in plans:
            if "__hot_upgrade__" in plan.new[""].statements:
                self.stage = f"running {plan.name}.__hot_upgrade__"
                plan.module.__hot_upgrade__(self.old_globals[plan.name])


def _restore_mapping(mapping: dict, contents: dict) -> None:
    """Make ``mapping`` equal ``contents`` again without ever emptying it."""
    for key in mapping.keys() - contents.keys():
        del mapping[key]
    for key, value in contents.items():
        if mapping.get(key, _MISSING) is not value:
            mapping[key] = value


# --- reload_modules ---------------------------------------------------------


@dataclasses.dataclass
class UpgradeReport:
    """What one ``reload_modules`` call did.

    ``modules`` are the reloaded modules in the order they were executed;
    ``added`` and ``replaced`` are ``module.name`` labels of new names and of
    objects that could not keep their identity; ``servers_upgraded`` and
    ``servers_failed`` name servers; ``suspend_ms`` is the longest time any
    server or loop was held and ``total_ms`` the whole call; ``error`` is a
    readable message when ``ok`` is False, and ``rolled_back`` says that
    changes had begun and were all undone.
    """

    ok: bool = False
    modules: list[str] = dataclasses.field(default_factory=list)
    added: list[str] = dataclasses.field(default_factory=list)
    replaced: list[str] = dataclasses.field(default_factory=list)
    servers_upgraded: list[str] = dataclasses.field(default_factory=list)
    servers_failed: list[str] = dataclasses.field(default_factory=list)
    suspend_ms: float = 0.0
    total_ms: float = 0.0
    error: str | None = None
    rolled_back: bool = False

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready values."""
        return dataclasses.asdict(self)


_upgrade_lock = threading.Lock()
_upgrade_callbacks: list[Callable[[UpgradeReport], object]] = []


def on_upgrade(callback: Callable[[UpgradeReport], object], *,
               remove: bool = False) -> Callable[[UpgradeReport], object]:
    """Register ``callback`` to be called with the report after every upgrade
    attempt (check ``report.ok``); ``remove=True`` unregisters it.  An
    exception in a callback is logged, never raised.  Returns ``callback``,
    so this works as a decorator."""
    if not callable(callback):
        raise FlyDeployError(f"on_upgrade() needs a callable, got {callback!r}")
    if remove:
        if callback in _upgrade_callbacks:
            _upgrade_callbacks.remove(callback)
    elif callback not in _upgrade_callbacks:
        _upgrade_callbacks.append(callback)
    return callback


def _prepare(names: list[str]) -> list[_ModulePlan]:
    """Phase 1: plans for every module in import order, touching nothing live."""
    plans = {name: _plan_module(name) for name in dict.fromkeys(names)}
    importlib.invalidate_caches()  # modules added next to the changed ones
    for name in sorted(set().union(*(plan.imports for plan in plans.values()))):
        _prepare_import(name)
    return _import_order(plans)


def _prepare_import(name: str) -> None:
    """Read and compile a tracked module the new code imports for the first time."""
    parent = name.rpartition(".")[0]
    if name in sys.modules or (parent and parent not in sys.modules):
        return
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return  # the import itself will report it, inside the rollback-safe swap
    if spec is not None and isinstance(spec.loader, _TrackingLoader):
        try:
            source = _read_bytes(spec.origin)
            _prepared_imports[spec.origin] = (source, _code_from_source(spec.origin, source))
        except (OSError, SyntaxError):
            pass  # likewise: the import inside the swap fails and rolls back


def _failure_message(stage: str, exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
    return (f"{stage} failed: {type(exc).__name__}: {exc}{where}; "
            "every change was rolled back")


def _commit(plans: list[_ModulePlan]) -> None:
    """After a successful swap: remember what runs now and refresh caches."""
    for plan in plans:
        _tracker.remember(plan.name, plan.path, plan.source)
        _analysed[plan.name] = (_sha256(plan.source), plan.new)
        _write_pyc(plan.path, plan.source,
                   compile(plan.source, plan.path, "exec", dont_inherit=True))
        linecache.checkcache(plan.path)


def reload_modules(names: Iterable[str] | None = None, *, suspend_timeout: float = 10.0,
                   extra: object = None) -> UpgradeReport:
    """Upgrade modules in place from their source on disk.

    ``names`` defaults to ``modified_modules()``.  Phase 1 reads, compiles
    and checks every new source and orders the modules along their imports
    (a refusal or a syntax error ends the call here, nothing changed).
    Phase 2 swaps the code in place with an undo log; any failure rolls
    everything back.  Failures are reported in the returned report (``ok``
    False); this raises only on misuse.
    """
    if isinstance(names, str):
        raise FlyDeployError("reload_modules() takes a list of module names, not one string: "
                             f"write reload_modules([{names!r}])")
    if not isinstance(suspend_timeout, (int, float)) or not suspend_timeout > 0:
        raise FlyDeployError(f"suspend_timeout must be a positive number of seconds, "
                             f"got {suspend_timeout!r}")
    started = time.perf_counter()
    report = UpgradeReport()
    with _upgrade_lock:
        try:
            plans = _prepare(modified_modules() if names is None else list(names))
        except UpgradeRefused as exc:
            report.error = str(exc)
            plans = None
        if plans is not None:
            report.modules = [plan.name for plan in plans]
            if plans:
                _swap_everything(plans, report, suspend_timeout, extra)
            else:
                report.ok = True
    report.total_ms = (time.perf_counter() - started) * 1000
    _prepared_imports.clear()
    if report.modules or report.error:
        for callback in list(_upgrade_callbacks):
            try:
                callback(report)
            except Exception:
                log.exception("flydeploy: on_upgrade callback %r failed", callback)
    return report


@contextlib.contextmanager
def _garbage_collection_paused():
    """Keep the cyclic garbage collector out of the critical section: a full
    collection of a large heap would lengthen the pause for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _swap_everything(plans: list[_ModulePlan], report: UpgradeReport, suspend_timeout: float,
                     extra: object) -> None:
    """Phases 2 and 3: swap with an undo log; commit or roll back."""
    swap = _Swap()
    held = time.perf_counter()
    try:
        with _garbage_collection_paused():
            swap.run(plans)
    except BaseException as exc:
        swap.rollback()
        report.rolled_back = True
        report.error = _failure_message(swap.stage, exc)
        if not isinstance(exc, Exception):
            raise
    else:
        report.ok = True
    finally:
        report.suspend_ms = (time.perf_counter() - held) * 1000
    report.added, report.replaced = swap.added, swap.replaced
    if report.ok:
        _commit(plans)


# ===========================================================================
# 5. Agent: per-process agent, per-machine upgrade, boot catch-up, poller
# ===========================================================================


# --- The per-process agent --------------------------------------------------


# --- Per-machine upgrade ----------------------------------------------------


# --- Boot catch-up and poller -----------------------------------------------


# ===========================================================================
# 6. Entry points: python -m flydeploy rpc | orchestrate
# ===========================================================================


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m flydeploy``; returns the process exit code."""
    print("usage: python -m flydeploy {rpc,orchestrate} ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    # Run through the importable module, not this __main__ copy, so that the
    # process has one flydeploy whatever way it was started.
    import flydeploy

    sys.exit(flydeploy.main())
