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

import argparse
import atexit
import collections
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

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
    # 5. Agent
    "Agent",
    "AgentError",
    "start_agent",
    "hot_upgrade",
    "RESULT_MARKER",
    "startup_reapply_current",
    "get_current_hot_upgrade_info",
    # 6. Entry points
    "main",
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


# --- In-place code swap -----------------------------------------------------


# --- reload_modules ---------------------------------------------------------


# ===========================================================================
# 5. Agent: per-process agent, per-machine upgrade, boot catch-up, poller
# ===========================================================================


# --- The per-process agent --------------------------------------------------

_DEFAULT_RUNTIME_DIR = "/tmp/flydeploy"
_MAX_REQUEST_BYTES = 1 << 20
_REQUEST_READ_TIMEOUT = 10.0
_STATE_FILE = "state.json"
_LOCK_FILE = "upgrade.lock"
_APP_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class AgentError(FlyDeployError):
    """An agent could not be reached or refused a request, or its runtime directory is unsafe."""


def _check_app_name(app: str) -> None:
    if not app or app.startswith(".") or not set(app) <= _APP_NAME_CHARS:
        raise ConfigError(
            f"app name {app!r} is not usable: use the Fly app name (letters, digits, '-', '_', '.'), "
            "passed as an argument or through FLY_APP_NAME")


def _runtime_root() -> str:
    return os.environ.get("FLYDEPLOY_RUNTIME_DIR") or _DEFAULT_RUNTIME_DIR


def _check_private_dir(path: str, *, serving: bool) -> None:
    """Refuse a runtime directory that another user could tamper with.

    The agent side (``serving``) accepts only directories of its own user or of
    root; a root client may use any user's directory, since root can enter it
    anyway and the agents there check who connects.
    """
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise AgentError(f"{path} is a symbolic link; flydeploy refuses it as a runtime directory. "
                         "Remove the link, or set FLYDEPLOY_RUNTIME_DIR to a private directory.")
    if not stat.S_ISDIR(info.st_mode):
        raise AgentError(f"{path} is not a directory; remove it or set FLYDEPLOY_RUNTIME_DIR elsewhere.")
    uid = os.geteuid()
    if info.st_uid not in (uid, 0) and (serving or uid != 0):
        raise AgentError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid}); "
                         "flydeploy refuses it. Remove it, or set FLYDEPLOY_RUNTIME_DIR to a private directory.")


def _app_dir(app: str, *, create: bool) -> str | None:
    """The checked runtime directory of ``app``; None when it does not exist and ``create`` is false."""
    _check_app_name(app)
    root = _runtime_root()
    path = os.path.join(root, app)
    for directory in (root, path):
        if create:
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
        elif not os.path.lexists(directory):
            return None
        _check_private_dir(directory, serving=create)
    if create and os.lstat(path).st_uid == os.geteuid() and stat.S_IMODE(os.lstat(path).st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def _adopt_dir_owner(path: str) -> None:
    """Give a file that root created in an app user's directory to that user."""
    if os.geteuid() != 0:
        return
    parent = os.stat(os.path.dirname(path))
    mine = os.lstat(path)
    if (mine.st_uid, mine.st_gid) != (parent.st_uid, parent.st_gid):
        os.chown(path, parent.st_uid, parent.st_gid, follow_symlinks=False)


def _stage_file(dest: str, content: bytes | str, *, mode: int, owner: tuple[int, int] | None = None) -> str:
    """Write ``content`` (bytes, or the path of a file to copy) to a temporary file beside ``dest``.

    Returns the temporary path; ``os.replace`` it onto ``dest`` to publish it
    atomically.  On failure nothing is left behind.
    """
    directory = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".flydeploy-tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:
                with open(content, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def _write_atomically(path: str, content: bytes, *, mode: int = 0o644) -> None:
    os.replace(_stage_file(path, content, mode=mode), path)
    _adopt_dir_owner(path)


def _state_path(app: str, *, create: bool) -> str | None:
    directory = _app_dir(app, create=create)
    return None if directory is None else os.path.join(directory, _STATE_FILE)


def _read_state(app: str) -> dict | None:
    """The release this machine last installed for ``app`` (the state file), or None."""
    try:
        path = _state_path(app, create=False)
        if path is None:
            return None
        with open(path, "rb") as handle:
            state = json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, FlyDeployError) as exc:
        log.warning("ignoring the flydeploy state file of %s: %s", app, exc)
        return None
    return state if isinstance(state, dict) else None


def _write_state(app: str, state: dict) -> None:
    _write_atomically(_state_path(app, create=True), json.dumps(state, sort_keys=True).encode())


@contextlib.contextmanager
def _machine_lock(app: str, *, timeout: float = 300.0) -> Iterator[None]:
    """Hold the per-machine upgrade lock, so one process at a time does the file work."""
    path = os.path.join(_app_dir(app, create=True), _LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _adopt_dir_owner(path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AgentError(f"another process has held the upgrade lock {path} for over {timeout:.0f} s; "
                                     "check for a stuck `python -m flydeploy rpc upgrade` and retry") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# Per-process state.  _held describes the release this process's modules hold
# (None: the image's own code).  Fork hooks replace the locks in the child.
_agent: Agent | None = None
_agent_lock = threading.Lock()
_apply_lock = threading.RLock()
_held: dict | None = None
_process_app: str | None = None
_fork_lock_taken = False
_hooks_registered = False


def _ensure_tracking() -> None:
    """Track the default roots unless the app chose its own with ``track()``."""
    if not tracked_roots():
        track()


def _process_name() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{program}[{os.getpid()}]"


def _server_summaries() -> list[dict]:
    return [{"name": getattr(server, "name", None),
             "class": f"{type(server).__module__}.{type(server).__qualname__}",
             "vsn": getattr(server, "vsn", None)} for server in servers()]


def _process_info(app: str) -> dict:
    held = _held or {}
    return {"pid": os.getpid(), "name": _process_name(), "argv": list(sys.argv), "app": app,
            "version": held.get("version"), "source_image_ref": held.get("source_image_ref"),
            "deployed_at": held.get("deployed_at"), "image_ref": os.environ.get("FLY_IMAGE_REF"),
            "servers": _server_summaries(), "python": sys.version.split()[0], "cwd": os.getcwd()}


def _apply_here(release: dict, *, suspend_timeout: float = 10.0, extra: Any = None) -> dict:
    """Reload this process's changed modules and, on success, record ``release`` as held."""
    global _held
    with _apply_lock:
        report = reload_modules(suspend_timeout=suspend_timeout, extra=extra)
        if report.ok:
            _held = dict(release)
    return report.to_dict()


def _catch_up(app: str) -> None:
    """Bring this process to the release the machine installed, if it holds another one.

    A fresh process imported the installed files already and only records the
    release; a forked child of an older parent reloads what differs on disk.
    """
    global _held
    state = _read_state(app)
    if not state or state.get("image_ref") != os.environ.get("FLY_IMAGE_REF"):
        return
    if _held is not None and _held.get("version") == state.get("version"):
        return
    release = {key: state.get(key) for key in ("version", "source_image_ref", "deployed_at", "image_ref")}
    with _apply_lock:
        if modified_modules():
            report = reload_modules()
            if not report.ok:
                log.error("flydeploy: process %s could not catch up to %s: %s",
                          _process_name(), release["version"], report.error)
                return
            log.info("flydeploy: process %s caught up to %s (%d modules)",
                     _process_name(), release["version"], len(report.modules))
        _held = release


def _drain(conn: socket.socket, limit: int = 64 << 20) -> None:
    # Closing a unix socket with unread input resets the connection and the
    # peer loses the reply: read what is left of an oversized request first.
    conn.settimeout(2.0)
    while limit > 0:
        chunk = conn.recv(1 << 20)
        if not chunk:
            return
        limit -= len(chunk)


class Agent:
    """The agent of one Python process: a unix socket that answers upgrade requests.

    Listens on ``$FLYDEPLOY_RUNTIME_DIR/<app>/<pid>.sock`` (directory 0700,
    socket 0600, peers of another user than ours or root refused) and serves
    newline-delimited JSON, one request per connection, on daemon threads:
    ``ping``, ``info``, ``locate`` and ``apply``.  Start it with
    :func:`start_agent`; :meth:`stop` closes it and removes the socket.
    """

    def __init__(self, app: str) -> None:
        self.app = app
        self.pid = os.getpid()
        self.path = os.path.join(_app_dir(app, create=True), f"{self.pid}.sock")
        self._closed = False
        self._sock = self._listen()
        self._thread = threading.Thread(target=self._serve, name=f"flydeploy-agent[{app}]", daemon=True)
        self._thread.start()

    def _listen(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a dead process that had our pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(64)
        except OSError as exc:
            sock.close()
            raise AgentError(f"cannot listen on {self.path}: {exc}; "
                             "set FLYDEPLOY_RUNTIME_DIR to a short, writable directory") from exc
        return sock

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.warning("flydeploy agent %s: accept failed: %s", self.path, exc)
                time.sleep(0.1)
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True,
                             name="flydeploy-agent-request").start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                reply = _peer_refusal(conn) or _dispatch(self, _read_request(conn))
            except AgentError as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:  # an agent keeps serving whatever one request did
                log.exception("flydeploy agent %s: request failed", self.path)
                reply = {"ok": False, "error": f"internal error in {_process_name()}: {exc!r}"}
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
                conn.shutdown(socket.SHUT_WR)
                _drain(conn)

    def _forget(self) -> None:
        """Drop the listening socket inherited through fork, leaving the parent's file alone."""
        self._closed = True
        self._sock.close()

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._thread.join(timeout=5)


def _peer_refusal(conn: socket.socket) -> dict | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # there the 0700 directory is the guard
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid in (os.geteuid(), 0):
        return None
    return {"ok": False, "error": f"refused: peer uid {uid} is neither this process's user "
                                  f"(uid {os.geteuid()}) nor root"}


def _read_request(conn: socket.socket) -> dict:
    conn.settimeout(_REQUEST_READ_TIMEOUT)
    data = bytearray()
    while b"\n" not in data:
        if len(data) > _MAX_REQUEST_BYTES:
            raise AgentError(f"request larger than {_MAX_REQUEST_BYTES} bytes; send one short JSON line")
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            raise AgentError(f"no complete request line within {_REQUEST_READ_TIMEOUT:.0f} s; "
                             "end the JSON request with a newline") from None
        if not chunk:
            break
        data += chunk
    line = bytes(data).split(b"\n", 1)[0]
    if len(line) > _MAX_REQUEST_BYTES:
        raise AgentError(f"request larger than {_MAX_REQUEST_BYTES} bytes; send one short JSON line")
    try:
        request = json.loads(line)
    except ValueError as exc:
        raise AgentError(f"malformed request, not JSON ({exc}); send one JSON object per line, "
                         'e.g. {"op": "ping"}') from None
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise AgentError('malformed request: expected a JSON object with an "op", e.g. {"op": "ping"}')
    return request


def _dispatch(agent: Agent, request: dict) -> dict:
    op = request["op"]
    if op == "ping":
        return {"ok": True, "pid": os.getpid(), "name": _process_name(), "app": agent.app}
    if op == "info":
        return {"ok": True, **_process_info(agent.app)}
    if op == "locate":
        paths = request.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise AgentError('malformed locate request: "paths" must be a list of relative paths')
        return {"ok": True, "located": _locate_members(paths, *_loaded_locations(paths)), "cwd": os.getcwd()}
    if op == "apply":
        timeout = request.get("suspend_timeout", 10.0)
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise AgentError('malformed apply request: "suspend_timeout" must be a positive number of seconds')
        release = {key: request.get(key) for key in ("version", "source_image_ref", "deployed_at")}
        release["image_ref"] = os.environ.get("FLY_IMAGE_REF")
        report = _apply_here(release, suspend_timeout=float(timeout), extra=request.get("extra"))
        return {"ok": bool(report["ok"]), "pid": os.getpid(), "name": _process_name(), "report": report}
    raise AgentError(f"unknown op {op!r}; the agent answers ping, info, locate and apply")


def _before_fork() -> None:
    # A child must not be forked in the middle of an apply: it would copy half-swapped code.
    global _fork_lock_taken
    _fork_lock_taken = _apply_lock.acquire(timeout=30)


def _after_fork_in_parent() -> None:
    global _fork_lock_taken
    if _fork_lock_taken:
        _fork_lock_taken = False
        _apply_lock.release()


def _after_fork_in_child() -> None:
    global _agent, _agent_lock, _apply_lock, _fork_lock_taken, _poller
    _agent_lock, _apply_lock, _fork_lock_taken = threading.Lock(), threading.RLock(), False
    _poller = None  # its thread stayed in the parent, which keeps polling for the machine
    parent, _agent = _agent, None
    if parent is not None:
        parent._forget()
    try:
        if parent is not None:
            start_agent(parent.app)
        elif _process_app is not None:
            _catch_up(_process_app)
    except Exception:  # the child runs on, on the code it has
        log.exception("flydeploy: the forked process %s could not start its agent or catch up", os.getpid())


def _stop_own_agent() -> None:
    if _agent is not None and _agent.pid == os.getpid():
        _agent.stop()


def _register_process_hooks() -> None:
    global _hooks_registered
    if not _hooks_registered:
        _hooks_registered = True
        os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                            after_in_child=_after_fork_in_child)
        atexit.register(_stop_own_agent)


def start_agent(app: str | None = None) -> Agent:
    """Start this process's agent for ``app`` (default ``FLY_APP_NAME``) and return it.

    Idempotent within a process.  Starts change tracking with the default
    roots when the app has not called :func:`track`, and brings the process to
    the release this machine installed when it holds another one.  A forked
    child gets its own agent automatically.
    """
    global _agent, _process_app
    app = app or os.environ.get("FLY_APP_NAME") or ""
    if not app:
        raise ConfigError("start_agent needs the app name: pass it, or set FLY_APP_NAME")
    _check_app_name(app)
    _process_app = app
    with _agent_lock:
        if _agent is not None and _agent.pid == os.getpid():
            if _agent.app != app:
                raise ConfigError(f"this process already runs the agent of app {_agent.app!r}; "
                                  "one process serves one app")
            return _agent
        _ensure_tracking()
        _agent = Agent(app)
        _register_process_hooks()
    _catch_up(app)
    return _agent


def _request(path: str, request: dict, *, timeout: float) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = bytearray()
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(bytes(data).split(b"\n", 1)[0] or b"null")
    if not isinstance(reply, dict):
        raise AgentError(f"the agent at {path} closed the connection without a reply")
    return reply


def _agent_sockets(app: str) -> list[tuple[int, str]]:
    directory = _app_dir(app, create=False)
    if directory is None:
        return []
    found = []
    for entry in os.scandir(directory):
        stem, dot, suffix = entry.name.partition(".")
        if dot and suffix == "sock" and stem.isdigit() and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
            found.append((int(stem), entry.path))
    return sorted(found)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ask_agents(app: str, request: dict, *, timeout: float, exclude_pid: int | None = None) -> list[dict]:
    """Send ``request`` to every live agent of ``app`` on this machine, concurrently.

    Returns one entry per process: ``{"pid", "reply"}`` or ``{"pid", "error"}``.
    Sockets of dead processes are removed.
    """
    targets = [(pid, path) for pid, path in _agent_sockets(app) if pid != exclude_pid]

    def ask(target: tuple[int, str]) -> dict | None:
        pid, path = target
        try:
            return {"pid": pid, "reply": _request(path, request, timeout=timeout)}
        except (ConnectionRefusedError, FileNotFoundError):
            if not _pid_alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            return None
        except TimeoutError:
            return {"pid": pid, "error": f"process {pid} did not answer within {timeout:.0f} s"}
        except (OSError, ValueError, AgentError) as exc:
            return {"pid": pid, "error": f"process {pid}: {exc}"}

    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        return [entry for entry in pool.map(ask, targets) if entry is not None]


# --- Per-machine upgrade ----------------------------------------------------

RESULT_MARKER = "__FLYDEPLOY_RESULT__"


def _candidate_module_names(paths: list[str]) -> set[str]:
    names = set()
    for rel in paths:
        parts = rel.split("/")
        names.update(".".join(parts[:k]) for k in range(1, len(parts)))
        if parts[-1].endswith(".py"):
            stem = parts[-1][:-3]
            names.add(".".join(parts[:-1] + ([] if stem == "__init__" else [stem])))
    names.discard("")
    return names


def _loaded_locations(paths: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Where this process loaded the modules and packages that ``paths`` could be.

    Returns ``(module_files, package_dirs)``: source files by module name (the
    counterpart of ``:code.which``) and directories by package name.
    """
    module_files: dict[str, str] = {}
    package_dirs: dict[str, str] = {}
    for name in _candidate_module_names(paths):
        module = sys.modules.get(name)
        if module is None:
            continue
        origin = getattr(getattr(module, "__spec__", None), "origin", None) or getattr(module, "__file__", None)
        if isinstance(origin, str) and origin.endswith(".py") and os.path.isabs(origin):
            module_files[name] = origin
        search_path = list(getattr(module, "__path__", None) or [])
        if search_path:
            package_dirs[name] = search_path[0]
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main is not None and getattr(main, "__spec__", None) is None and isinstance(main_file, str):
        # A script run as `python app.py` is __main__, not `app`.
        module_files.setdefault(os.path.basename(main_file)[:-3], os.path.abspath(main_file))
    return module_files, package_dirs


def _under_as(dest: str, rel: str) -> bool:
    return os.path.normpath(dest).endswith(os.sep + os.path.normpath(rel))


def _locate_members(paths: list[str], module_files: dict[str, str],
                    package_dirs: dict[str, str]) -> dict[str, str]:
    """Map release members to where the running code was loaded from.

    A member that is a loaded module goes to that module's file; any other
    member inside a loaded package (package data, a new module) goes to the
    same place under the package's directory.  Members neither covers are left
    out (they go under the app root).  A destination always ends with the
    member's own relative path.
    """
    located = {}
    for rel in paths:
        parts = rel.split("/")
        if parts[-1].endswith(".py"):
            stem = parts[-1][:-3]
            origin = module_files.get(".".join(parts[:-1] + ([] if stem == "__init__" else [stem])))
            if origin and _under_as(origin, rel):
                located[rel] = origin
                continue
        for depth in range(len(parts) - 1, 0, -1):
            directory = package_dirs.get(".".join(parts[:depth]))
            if directory:
                candidate = os.path.join(directory, *parts[depth:])
                if _under_as(candidate, rel):
                    located[rel] = candidate
                break
    return located


def _choose_app_root(located: dict[str, str], cwd: str) -> str:
    """``FLYDEPLOY_APP_ROOT``, else the root the loaded application packages sit in, else ``cwd``."""
    configured = os.environ.get("FLYDEPLOY_APP_ROOT")
    if configured:
        return os.path.abspath(configured)
    roots = collections.Counter(os.path.normpath(dest)[: -len(os.path.normpath(rel))].rstrip(os.sep) or os.sep
                                for rel, dest in located.items())
    if roots:
        return min(roots, key=lambda root: (-roots[root], root))
    return cwd


def _plan_destinations(paths: list[str], located: dict[str, str], app_root: str) -> dict[str, str]:
    """Where each member is written: its located file, else the same relative path under ``app_root``."""
    return {rel: located.get(rel) or os.path.join(app_root, *rel.split("/")) for rel in paths}


def _file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _make_dirs(directory: str) -> None:
    if os.path.isdir(directory):
        return
    _make_dirs(os.path.dirname(directory))
    os.mkdir(directory, 0o755)
    _adopt_dir_owner(directory)


def _install_files(plan: dict[str, str], hashes: dict[str, str], source_dir: str) -> tuple[list[str], int]:
    """Write the members whose content differs from what is at their destination.

    Every changed file is first staged beside its destination (mode and owner
    of the file it replaces, or of the release and the directory for a new
    file), then each is published with ``os.replace``.  A failure while staging
    changes nothing.  Returns ``(written destinations, unchanged count)``.
    """
    changed = [(rel, dest) for rel, dest in sorted(plan.items()) if _file_sha256(dest) != hashes[rel]]
    staged: list[tuple[str, str]] = []
    try:
        for rel, dest in changed:
            source = os.path.join(source_dir, *rel.split("/"))
            try:
                current = os.stat(dest)
                mode, owner = stat.S_IMODE(current.st_mode), (current.st_uid, current.st_gid)
            except FileNotFoundError:
                _make_dirs(os.path.dirname(dest))
                parent = os.stat(os.path.dirname(dest))
                mode, owner = stat.S_IMODE(os.stat(source).st_mode), (parent.st_uid, parent.st_gid)
            staged.append((_stage_file(dest, source, mode=mode, owner=owner), dest))
    except OSError as exc:
        for tmp, _dest in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise AgentError(f"cannot write {getattr(exc, 'filename', None) or exc}: {exc.strerror or exc}; "
                         "no file was changed. Check the permissions and free space of the app directory.") from exc
    for tmp, dest in staged:
        os.replace(tmp, dest)
    return [dest for _tmp, dest in staged], len(plan) - len(staged)


def _store_for_url(url: str, store: Any = None) -> tuple[Any, str]:
    """The store and key behind a release URL: ``store`` when the URL is its own, else from the URL.

    A ``file://`` URL names a ``LocalStore``; an ``http(s)`` URL
    (``<endpoint>/<bucket>/<key>``) the S3 bucket, with the credentials of
    the environment.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        return LocalStore.from_url(url)
    if parsed.scheme not in ("http", "https"):
        raise ConfigError(f"unsupported release URL {url!r}: use the https:// URL of the uploaded "
                          "tarball or the file:// URL of a local store")
    bucket, _, key = urllib.parse.unquote(parsed.path).lstrip("/").partition("/")
    if not bucket or not key:
        raise ConfigError(f"{url} is not a release URL: expected <endpoint>/<bucket>/<key>")
    if store is None or store.url(key) != url:
        store = S3.from_env(bucket=bucket)
        if urllib.parse.urlsplit(store.url(key))[:2] != parsed[:2]:
            raise ConfigError(f"the release is on {parsed.scheme}://{parsed.netloc} but AWS_ENDPOINT_URL_S3 "
                              "points elsewhere; set it to the endpoint the release was uploaded to")
    return store, key


def _fetch_release(store: Any, key: str, workdir: str, sha256: str | None) -> tuple[dict, str]:
    """Download, verify and unpack a release into ``workdir``; returns ``(manifest, tree)``."""
    tarball = os.path.join(workdir, "release.tar.gz")
    digest = store.download(key, tarball)
    if sha256 and digest.lower() != sha256.lower():
        raise AgentError(f"hash mismatch for {key}: expected sha256 {sha256.lower()}, downloaded {digest}; "
                         "the stored tarball is not the recorded release. Nothing was written; push it again.")
    tree = os.path.join(workdir, "tree")
    return unpack_release(tarball, tree, expected_sha256=sha256), tree


def _install_release(app: str, store: Any, key: str, sha256: str | None, *,
                     deployed_at: str | None = None, in_process: bool) -> dict:
    """Download, verify and write a release on this machine; record it in the state file.

    Destinations come from where this machine's processes loaded their
    modules: the agents' answers, plus this process's own modules when
    ``in_process``.  Holds the machine lock while writing.  Returns the new
    state (version, sha256, files written and unchanged).
    """
    with tempfile.TemporaryDirectory(prefix="flydeploy-release-") as workdir:
        manifest, tree = _fetch_release(store, key, workdir, sha256)
        hashes = manifest["files"]
        paths = sorted(hashes)
        located: dict[str, str] = {}
        cwd = os.getcwd()
        for entry in _ask_agents(app, {"op": "locate", "paths": paths}, timeout=10.0,
                                 exclude_pid=os.getpid() if in_process else None):
            reply = entry.get("reply") or {}
            if reply.get("ok") and isinstance(reply.get("located"), dict):
                for rel, dest in reply["located"].items():
                    if rel in hashes and isinstance(dest, str) and _under_as(dest, rel):
                        located.setdefault(rel, dest)
                cwd = reply.get("cwd") or cwd
        if in_process:
            for rel, dest in _locate_members(paths, *_loaded_locations(paths)).items():
                located.setdefault(rel, dest)
            cwd = os.getcwd()
        plan = _plan_destinations(paths, located, _choose_app_root(located, cwd))
        with _machine_lock(app):
            written, unchanged = _install_files(plan, hashes, tree)
            state = {"app": app, "version": manifest.get("version"), "sha256": sha256,
                     "source_image_ref": manifest.get("source_image_ref"),
                     "deployed_at": deployed_at, "image_ref": os.environ.get("FLY_IMAGE_REF"),
                     "installed_at": _iso_utc(_utc_now())}
            _write_state(app, state)
    log.info("flydeploy: %s %s: wrote %d files, %d unchanged", app, state["version"], len(written), unchanged)
    return {**state, "files_written": len(written), "files_unchanged": unchanged}


def _machine_result(replies: list[dict], *, version: str | None, started: float,
                    installed: dict | None = None, error: str | None = None) -> dict:
    """The per-machine result (the result-file shape of DESIGN.md) from the agents' replies."""
    succeeded, failed, failures, modules, processes = [], [], [], set(), []
    suspend_ms = 0.0
    for entry in replies:
        reply = entry.get("reply") or {}
        report = reply.get("report") or {}
        name = reply.get("name") or f"pid {entry['pid']}"
        suspend_ms = max(suspend_ms, float(report.get("suspend_ms") or 0.0))
        if reply.get("ok"):
            succeeded.append(name)
            modules.update(report.get("modules") or [])
        else:
            failed.append(name)
            failures.append(f"process {name} failed: "
                            f"{entry.get('error') or report.get('error') or reply.get('error') or 'no reason given'}")
        processes.append({"pid": entry["pid"], "name": name, "ok": bool(reply.get("ok")),
                          "error": None if reply.get("ok") else failures[-1],
                          "modules": report.get("modules") or [], "suspend_ms": report.get("suspend_ms"),
                          "rolled_back": report.get("rolled_back")})
    error = error or ("; ".join(failures) if failures else None)
    return {"machine_id": os.environ.get("FLY_MACHINE_ID") or socket.gethostname(),
            "region": os.environ.get("FLY_REGION") or "", "status": "failed" if error else "completed",
            "success": error is None, "error": error, "modules_reloaded": len(modules),
            "module_names": sorted(modules), "processes_succeeded": len(succeeded),
            "process_names": succeeded + failed, "processes_failed": len(failed),
            "suspend_duration_ms": round(suspend_ms, 3),
            "total_duration_ms": round((time.monotonic() - started) * 1000, 3), "applied_at": _iso_utc(_utc_now()),
            "version": version, "files_written": (installed or {}).get("files_written", 0),
            "files_unchanged": (installed or {}).get("files_unchanged", 0), "processes": processes}


def hot_upgrade(tarball_url: str, app: str, *, sha256: str | None = None, suspend_timeout: float = 10.0,
                upgrade_id: str | None = None, store: Any = None) -> dict:
    """Upgrade every Python process of ``app`` on this machine to the release at ``tarball_url``.

    Downloads the tarball (signed, streamed, retried; an S3 URL of the
    configured endpoint or a ``file://`` URL of a local store), verifies
    ``sha256`` when given and unpacks it safely, then writes only the files
    whose content changed, each atomically, to where the running processes
    loaded them from (else under the app root), records the version in the
    machine's state file and asks every live agent to apply it, concurrently.

    Returns the per-machine result (DESIGN.md's result-file shape): success
    only if every process succeeded.  Operational failures are reported in
    it, never raised; a bad tarball, a hash mismatch or unreachable storage
    fail before any file is written.  The result is also stored, best effort,
    at ``releases/<app>-results/<upgrade_id>/<machine_id>.json`` (the upgrade
    id defaults to the release version).
    """
    _check_app_name(app)
    if suspend_timeout <= 0:
        raise ConfigError(f"suspend_timeout must be a positive number of seconds, not {suspend_timeout!r}")
    started = time.monotonic()
    installed, replies, error, key = None, [], None, None
    try:
        store, key = _store_for_url(tarball_url, store)
        log.info("flydeploy: downloading %s", key)
        installed = _install_release(app, store, key, sha256, in_process=False)
        request = {"op": "apply", "version": installed["version"], "suspend_timeout": suspend_timeout,
                   "source_image_ref": installed["source_image_ref"], "deployed_at": installed["deployed_at"]}
        replies = _ask_agents(app, request, timeout=suspend_timeout + 120.0)
        if not replies:
            log.warning("flydeploy: no agent of %s runs on this machine: the files are written and "
                        "processes started from now on run them", app)
    except FlyDeployError as exc:
        error = str(exc)
    result = _machine_result(replies, version=(installed or {}).get("version"), started=started,
                             installed=installed, error=error)
    for process in result["processes"]:
        log.info("flydeploy: %s %s", process["name"], "ok" if process["ok"] else process["error"])
    if store is not None and key is not None:
        _store_result(store, app, upgrade_id or result["version"], result)
    return result


def _store_result(store: Any, app: str, upgrade_id: str | None, result: dict) -> None:
    if not upgrade_id:
        return
    key = f"releases/{app}-results/{upgrade_id}/{result['machine_id']}.json"
    try:
        store.put(key, json.dumps(result, sort_keys=True).encode(), content_type="application/json")
    except Exception as exc:  # the result file is a convenience; the upgrade stands without it
        log.warning("flydeploy: could not store the result at %s: %s", key, exc)


# --- Boot catch-up and poller -----------------------------------------------

_poller: _Poller | None = None


def _current_hot_upgrade(doc: dict) -> dict | None:
    """The ``hot_upgrade`` entry of a current.json document; a malformed one raises."""
    hot = doc.get("hot_upgrade")
    if hot is None:
        return None
    if not isinstance(hot, dict) or not all(isinstance(hot.get(k), str) for k in ("version", "tarball_url")):
        raise FlyDeployError("malformed release metadata: current.json's hot_upgrade lacks version or "
                             "tarball_url; push the hot upgrade again, or cold deploy to reset it")
    return hot


def _catch_up_machine(store: Any, app: str, hot: dict) -> str:
    """Bring this machine and this process to the recorded hot upgrade ``hot``.

    Under the machine lock, the first process to get here downloads and writes
    the files and tells the other agents; everyone else finds the state file
    current.  This process then reloads its own changed modules.  Returns
    ``applied`` or ``up_to_date``.
    """
    version = hot["version"]
    release = {"version": version, "source_image_ref": hot.get("source_image_ref"),
               "deployed_at": hot.get("deployed_at"), "image_ref": os.environ.get("FLY_IMAGE_REF")}
    state = _read_state(app)
    if not state or state.get("version") != version or state.get("image_ref") != release["image_ref"]:
        store, key = _store_for_url(hot["tarball_url"], store)
        _install_release(app, store, key, hot.get("sha256"), deployed_at=hot.get("deployed_at"), in_process=True)
        request = {"op": "apply", **{k: release[k] for k in ("version", "source_image_ref", "deployed_at")}}
        for entry in _ask_agents(app, request, timeout=130.0, exclude_pid=os.getpid()):
            reply = entry.get("reply") or {}
            if not reply.get("ok"):
                log.error("flydeploy: process %s did not apply %s: %s", entry["pid"], version,
                          entry.get("error") or (reply.get("report") or {}).get("error") or reply.get("error"))
    if (_held or {}).get("version") == version and not modified_modules():
        return "up_to_date"
    report = _apply_here(release)
    if not report["ok"]:
        raise FlyDeployError(f"this process could not load hot upgrade {version}: {report['error']}")
    return "applied"


def _reconcile(store: Any, app: str, image_ref: str) -> tuple[str, str | None]:
    """One boot-time pass over current.json; returns ``(status, version)``."""
    doc, _etag = read_current(store, app)
    status = "up_to_date"
    if doc is None or doc.get("image_ref") != image_ref:
        # Conditional on what is there when writing: a machine of this image
        # that got in first (or a hot upgrade recorded for it) is kept.
        doc = update_current(store, app, lambda found: found if found and found.get("image_ref") == image_ref
                             else _fresh_current(image_ref))
        status = "reset"
    hot = _current_hot_upgrade(doc)
    if hot is None:
        return status, None
    return _catch_up_machine(store, app, hot), hot["version"]


def _poll_interval(poll_interval: float | None) -> float | None:
    if poll_interval is None:
        raw = os.environ.get("FLYDEPLOY_POLL_INTERVAL", "").strip()
        if not raw:
            return None
        try:
            poll_interval = float(raw)
        except ValueError:
            raise ConfigError(f"FLYDEPLOY_POLL_INTERVAL={raw!r} is not a number of seconds") from None
    if poll_interval <= 0:
        raise ConfigError(f"the poll interval must be a positive number of seconds, not {poll_interval!r}")
    return float(poll_interval)


class _Poller:
    """Polls current.json and applies a hot upgrade for this image that the machine missed."""

    def __init__(self, store: Any, app: str, image_ref: str, interval: float) -> None:
        self.store, self.app, self.image_ref, self.interval = store, app, image_ref, interval
        self._etag: str | None = None
        self._failed_version: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"flydeploy-poller[{app}]", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # a poll that fails is retried at the next interval
                log.warning("flydeploy: polling %s metadata failed: %s", self.app, exc)

    def poll(self) -> None:
        """Check current.json once (a HEAD while it is unchanged) and catch up when needed."""
        head = self.store.head(f"releases/{self.app}-current.json")
        if head is not None and head.get("etag") == self._etag:
            return
        doc, etag = read_current(self.store, self.app)
        hot = _current_hot_upgrade(doc) if doc is not None and doc.get("image_ref") == self.image_ref else None
        # A version this process failed to load is not retried: it would fail the same way.
        if hot is not None and hot["version"] not in ((_held or {}).get("version"), self._failed_version):
            try:
                status = _catch_up_machine(self.store, self.app, hot)
            except FlyDeployError:
                self._failed_version = hot["version"]
                raise
            log.info("flydeploy: poller: %s %s", status, hot["version"])
        self._etag = etag

    def stop(self) -> None:
        """Stop polling."""
        self._stopped.set()
        self._thread.join(timeout=5)


def startup_reapply_current(app: str | None = None, *, poll_interval: float | None = None,
                            agent: bool = True, store: Any = None) -> dict:
    """Make this process (and machine) run the release recorded for its image; call it early at boot.

    ``app`` defaults to ``FLY_APP_NAME``; ``store`` to ``S3.from_env()``.
    Starts tracking and, with ``agent``, this process's agent.  Never raises
    for an operational problem: returns ``{"status", "error", "version",
    "duration_ms"}`` where status is ``applied`` (a recorded hot upgrade was
    loaded), ``up_to_date``, ``reset`` (no metadata, or metadata of another
    image after a cold deploy: rewritten for this image, the stale hot upgrade
    never applied), ``skipped`` (no ``FLY_IMAGE_REF``: local development) or
    ``error`` (the app continues on the image's code).  With nothing pending it
    costs one metadata GET.  ``poll_interval`` (or ``FLYDEPLOY_POLL_INTERVAL``,
    seconds) starts a thread that applies hot upgrades this machine missed.
    """
    global _poller, _process_app
    started = time.perf_counter()
    status, version, error = "error", None, None
    try:
        app = app or os.environ.get("FLY_APP_NAME") or ""
        if not app:
            raise ConfigError("no app name: pass startup_reapply_current(app=...) or set FLY_APP_NAME")
        _check_app_name(app)
        _process_app = app
        _ensure_tracking()
        _register_process_hooks()
        if agent:
            start_agent(app)
        image_ref = os.environ.get("FLY_IMAGE_REF")
        interval = _poll_interval(poll_interval)
        if not image_ref:
            status, error = "skipped", "FLY_IMAGE_REF is not set (local development): nothing to reapply"
        else:
            store = store if store is not None else S3.from_env()
            try:
                status, version = _reconcile(store, app, image_ref)
            finally:
                if interval and _poller is None:
                    _poller = _Poller(store, app, image_ref, interval)
    except Exception as exc:  # boot must go on with the image's code
        status, error = "error", str(exc) or repr(exc)
        log.error("flydeploy: startup reapply of %s failed, continuing on the image's code: %s", app, error)
    outcome = {"status": status, "error": error, "version": version,
               "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
    if status != "error":
        log.info("flydeploy: startup reapply of %s: %s%s", app, status, f" {version}" if version else "")
    return outcome


def get_current_hot_upgrade_info(app: str | None = None) -> dict:
    """What hot upgrade this process runs.

    ``{"hot_upgrade_applied": False}``, or ``{"hot_upgrade_applied": True,
    "version", "source_image_ref", "deployed_at", "current_image_ref"}``.  A
    process that started after its machine installed a hot upgrade reports
    that upgrade (from the machine's state file for ``app``, default the
    agent's app or ``FLY_APP_NAME``).
    """
    held = _held
    app = app or (_agent.app if _agent is not None else None) or os.environ.get("FLY_APP_NAME")
    if held is None and app:
        state = _read_state(app)
        if state and state.get("image_ref") == os.environ.get("FLY_IMAGE_REF") and not modified_modules():
            held = state
    if not held or not held.get("version"):
        return {"hot_upgrade_applied": False}
    return {"hot_upgrade_applied": True, "version": held["version"],
            "source_image_ref": held.get("source_image_ref"), "deployed_at": held.get("deployed_at"),
            "current_image_ref": os.environ.get("FLY_IMAGE_REF")}


# ===========================================================================
# 6. Entry points: python -m flydeploy rpc | orchestrate
# ===========================================================================


def _print_agents_missing(app: str) -> int:
    print(f"no flydeploy agent is running for app {app!r} on this machine (looked in "
          f"{os.path.join(_runtime_root(), app)}); the app starts one with "
          "flydeploy.startup_reapply_current() or flydeploy.start_agent()", file=sys.stderr)
    return 1


def _rpc_query(args: argparse.Namespace) -> int:
    replies = _ask_agents(args.app, {"op": args.rpc_command}, timeout=args.timeout)
    if not replies:
        return _print_agents_missing(args.app)
    failed = [entry for entry in replies if not (entry.get("reply") or {}).get("ok")]
    if args.rpc_command == "info":
        print(json.dumps([entry.get("reply") if entry.get("reply") is not None
                          else {"pid": entry["pid"], "ok": False, "error": entry.get("error")}
                          for entry in replies], indent=2, sort_keys=True))
    else:
        for entry in replies:
            reply = entry.get("reply") or {}
            print(f"{reply.get('name') or entry['pid']}: "
                  f"{'ok' if reply.get('ok') else entry.get('error') or reply.get('error')}")
    return 1 if failed else 0


def _rpc_upgrade(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        result = hot_upgrade(args.url, args.app, sha256=args.sha256, suspend_timeout=args.suspend_timeout,
                             upgrade_id=args.upgrade_id)
    finally:
        log.removeHandler(handler)
    if result["success"]:
        print(f"upgraded {result['processes_succeeded']} processes to {result['version']}: "
              f"{result['modules_reloaded']} modules, suspended {result['suspend_duration_ms']:.0f} ms")
    else:
        print(f"upgrade failed: {result['error']}")
    print(f"{RESULT_MARKER}{json.dumps(result, sort_keys=True)}{RESULT_MARKER}", flush=True)
    return 0 if result["success"] else 1


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def _add_rpc_parser(commands: argparse._SubParsersAction) -> None:
    rpc = commands.add_parser("rpc", help="talk to the agents of this machine (what exec runs)",
                              description="Talk to the flydeploy agents of the app's processes on this machine.")
    rpc_commands = rpc.add_subparsers(dest="rpc_command", metavar="RPC", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--app", required=True, help="the Fly app name")
    upgrade = rpc_commands.add_parser("upgrade", parents=[common],
                                      help="install a release and upgrade every process")
    upgrade.add_argument("--url", required=True, help="URL of the release tarball (https:// or file://)")
    upgrade.add_argument("--sha256", help="expected sha256 of the tarball")
    upgrade.add_argument("--suspend-timeout", type=_positive_seconds, default=10.0, metavar="S",
                         help="seconds servers may take to reach a safe point (default 10)")
    upgrade.add_argument("--upgrade-id", help="where the result is stored (default: the release version)")
    upgrade.set_defaults(handler=_rpc_upgrade)
    for name, text in (("info", "print every process's info as JSON"), ("ping", "check every agent answers")):
        query = rpc_commands.add_parser(name, parents=[common], help=text)
        query.add_argument("--timeout", type=_positive_seconds, default=10.0, metavar="S",
                           help="seconds to wait for each agent (default 10)")
        query.set_defaults(handler=_rpc_query)


def _entry_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flydeploy",
                                     description="flydeploy's machine-side commands.")
    parser.add_argument("--version", action="version", version=f"flydeploy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_rpc_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m flydeploy``; returns the process exit code (2 for bad usage)."""
    try:
        args = _entry_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error or the help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FlyDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run through the importable module, not this __main__ copy, so that the
    # process has one flydeploy whatever way it was started.
    import flydeploy

    sys.exit(flydeploy.main())
