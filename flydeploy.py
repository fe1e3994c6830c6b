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
import dataclasses
import datetime
import getpass
import json
import logging
import os
import pathlib
import queue
import re
import socket
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import TextIO

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
    "FleetConfig",
    "load_config",
    "check_version",
    "MachineSelection",
    "machine_group",
    "machine_image",
    "select_machines",
    "parse_result_marker",
    "MachineOutcome",
    "judge_upgrade",
    "FleetReport",
    "orchestrate",
    "status_row",
    "fleet_status",
    "add_fleet_arguments",
    "fleet_overrides",
    "ORCHESTRATOR_MARKER",
    # 4. Engine: servers and asyncio loops
    # 4. Engine: tracking, code swap, reload_modules
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

_RESULT_MARKER = "__FLYDEPLOY_RESULT__"
_RESULT_RE = re.compile(re.escape(_RESULT_MARKER) + r"(.*?)" + re.escape(_RESULT_MARKER))
# The orchestrator tells the developer's command line that it started and how it
# ended on lines of its own: `fly machine run` only passes on "failed or not".
ORCHESTRATOR_MARKER = "__FLYDEPLOY_ORCHESTRATOR__"
_INTERNAL_GROUPS = frozenset({"fly_app_release_command", "fly_app_console"})
_PENDING_STATES = frozenset({"stopped", "suspended"})
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Transport failures, 408 and 5xx of an exec are tried this many times more.
_EXEC_RETRIES = 3
_TOML_LINE_RE = re.compile(r"\(at line (\d+), column (\d+)\)")

# [tool.flydeploy] key -> (kind, default).  Flags use the same names with dashes.
_SETTINGS: dict[str, tuple[str, Any]] = {
    "app": ("name", None),
    "bucket": ("name", None),
    "root": ("name", "."),
    "include": ("names", None),
    "exclude": ("names", None),
    "python": ("name", "python3"),
    "max_concurrency": ("count", 10),
    "timeout": ("seconds", 120.0),
    "suspend_timeout": ("seconds", 10.0),
    "lock_timeout": ("seconds", 300.0),
    "process_groups": ("names", ()),
    "build_args": ("mapping", {}),
}
_FLAG_NAMES = {"process_groups": "--process-group", "build_args": "--build-arg"}


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """The settings of one app, resolved from flags, ``pyproject.toml``, ``fly.toml`` and defaults.

    ``project_dir`` holds ``fly.toml`` and ``pyproject.toml``; ``root`` is the
    app root that is packed (``[tool.flydeploy] root``, relative to the project).
    ``env``, ``processes`` and ``build`` are ``fly.toml``'s tables as read.
    ``sources`` says where each setting came from, e.g. ``"--app"``,
    ``"pyproject.toml [tool.flydeploy]"``, ``"fly.toml"`` or ``"default"``.
    """

    app: str | None
    project_dir: pathlib.Path
    fly_toml: pathlib.Path | None
    root: pathlib.Path
    bucket: str | None
    include: tuple[str, ...] | None
    exclude: tuple[str, ...] | None
    python: str
    max_concurrency: int
    timeout: float
    suspend_timeout: float
    lock_timeout: float
    process_groups: tuple[str, ...]
    build_args: Mapping[str, str]
    env: Mapping[str, str]
    processes: Mapping[str, Any]
    build: Mapping[str, Any]
    sources: Mapping[str, str]

    def require_app(self) -> str:
        """The app name, or a ``ConfigError`` naming every place that can provide it."""
        if not self.app:
            raise ConfigError(
                "no app name: pass --app, set `app` in fly.toml, or `app` under "
                "[tool.flydeploy] in pyproject.toml")
        return self.app


def _flag_name(key: str) -> str:
    return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file and the line."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        where = _TOML_LINE_RE.search(str(exc))
        line = f", line {where.group(1)}" if where else ""
        reason = _TOML_LINE_RE.sub("", str(exc)).strip()
        raise ConfigError(f"{path}{line}: invalid TOML ({reason}); fix the file and run again") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _check_setting(key: str, value: Any, where: str) -> Any:
    """Validate and normalise one setting; ``where`` names its origin for the error."""
    kind = _SETTINGS[key][0]
    problem = None
    if kind == "name":
        if not isinstance(value, str) or not value.strip():
            problem = "a non-empty string"
    elif kind == "names":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            problem = "a list of non-empty strings"
        else:
            value = tuple(value)
    elif kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problem = "a whole number of at least 1"
    elif kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problem = "a number of seconds above 0"
        else:
            value = float(value)
    elif kind == "mapping":
        if not isinstance(value, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, (str, int, float)) for k, v in value.items()):
            problem = "a table of NAME = value"
        else:
            value = {k: str(v) for k, v in value.items()}
    if problem:
        raise ConfigError(f"{where}: {key} must be {problem}, got {value!r}")
    return value


def load_config(project_dir: str | os.PathLike[str] = ".", *, config: str | os.PathLike[str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> FleetConfig:
    """Resolve an app's settings: flags > ``[tool.flydeploy]`` > ``fly.toml`` > defaults.

    ``config`` is the ``fly.toml`` path (relative to ``project_dir``); when it is
    None, ``fly.toml`` is read if present.  ``overrides`` holds the flags, by
    setting name (``app``, ``max_concurrency``, ...); None values are unset.
    TOML errors name the file and line; an unknown ``[tool.flydeploy]`` key, a
    malformed value or an unknown ``--process-group`` raises ``ConfigError``.
    """
    project = pathlib.Path(project_dir)
    fly_path = project / (config if config is not None else "fly.toml")
    if config is not None and not fly_path.is_file():
        raise ConfigError(f"{fly_path} not found: pass --config with the path of the app's fly.toml")
    fly = _read_toml(fly_path) if fly_path.is_file() else {}
    pyproject_path = project / "pyproject.toml"
    pyproject = _read_toml(pyproject_path) if pyproject_path.is_file() else {}
    tool = pyproject.get("tool", {}).get("flydeploy", {})
    if not isinstance(tool, dict):
        raise ConfigError(f"{pyproject_path}: [tool.flydeploy] must be a table")
    unknown = sorted(set(tool) - set(_SETTINGS))
    if unknown:
        raise ConfigError(f"{pyproject_path}: unknown key(s) {', '.join(unknown)} in [tool.flydeploy]; "
                          f"known keys: {', '.join(_SETTINGS)}")
    fly_tables = {}
    for table in ("env", "processes", "build"):
        value = fly.get(table, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{fly_path}: [{table}] must be a table")
        fly_tables[table] = value
    env = {str(k): str(v) for k, v in fly_tables["env"].items()}
    from_fly = {"app": fly.get("app"), "bucket": env.get("BUCKET_NAME"),
                "build_args": fly_tables["build"].get("args")}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (_kind, default) in _SETTINGS.items():
        flag = (overrides or {}).get(key)
        if flag is not None and flag != () and flag != {}:
            values[key], sources[key] = _check_setting(key, flag, _flag_name(key)), _flag_name(key)
        elif key in tool:
            values[key] = _check_setting(key, tool[key], f"{pyproject_path} [tool.flydeploy]")
            sources[key] = "pyproject.toml [tool.flydeploy]"
        elif from_fly.get(key) is not None:
            values[key], sources[key] = _check_setting(key, from_fly[key], str(fly_path)), "fly.toml"
        else:
            values[key], sources[key] = default, "default"
    groups = values["process_groups"]
    known_groups = set(fly_tables["processes"]) or {"app"}
    missing_groups = [g for g in groups if g not in known_groups]
    if fly_path.is_file() and missing_groups:
        raise ConfigError(f"unknown process group(s) {', '.join(missing_groups)}: {fly_path} defines "
                          f"{', '.join(sorted(known_groups))}; fix {sources['process_groups']}")
    return FleetConfig(
        app=values["app"], project_dir=project, fly_toml=fly_path if fly_path.is_file() else None,
        root=project / values["root"], bucket=values["bucket"], include=values["include"],
        exclude=values["exclude"], python=values["python"], max_concurrency=values["max_concurrency"],
        timeout=values["timeout"], suspend_timeout=values["suspend_timeout"],
        lock_timeout=values["lock_timeout"], process_groups=groups, build_args=values["build_args"],
        env=env, processes=fly_tables["processes"], build=fly_tables["build"], sources=sources)


def check_version(version: str) -> str:
    """Return ``version`` if it can name a release (letters, digits, ``. _ -``), else raise ``ConfigError``."""
    if not _VERSION_RE.fullmatch(version or ""):
        raise ConfigError(f"version {version!r} cannot name a release: use letters, digits, '.', '_' "
                          f"and '-' (at most 100, starting with a letter or digit)")
    return version


@dataclasses.dataclass(frozen=True)
class MachineSelection:
    """Which machines an upgrade reaches: ``targets`` now (started), ``pending``
    at their next start (stopped, suspended), ``skipped`` (machine, reason) not at all."""

    targets: tuple[dict, ...]
    pending: tuple[dict, ...]
    skipped: tuple[tuple[dict, str], ...]


def machine_group(machine: Mapping[str, Any]) -> str:
    """The process group of a Machine JSON object (``config.metadata.fly_process_group``)."""
    return ((machine.get("config") or {}).get("metadata") or {}).get("fly_process_group") or ""


def machine_image(machine: Mapping[str, Any]) -> str:
    """The image a Machine runs, as ``FLY_IMAGE_REF`` spells it (``registry/repository:tag``)."""
    image = (machine.get("config") or {}).get("image")
    if image:
        return image
    ref = machine.get("image_ref") or {}
    name = "/".join(p for p in (ref.get("registry"), ref.get("repository")) if p)
    return f"{name}:{ref['tag']}" if ref.get("tag") else name


def select_machines(machines: Iterable[Mapping[str, Any]], *, self_id: str | None = None,
                    process_groups: Iterable[str] = ()) -> MachineSelection:
    """Pick the app machines an upgrade goes to, from Machine JSON objects.

    App machines are those with ``config.metadata.fly_platform_version == "v2"``
    (or, without it, non-empty ``config.services``), outside the release-command
    and console groups, not ``self_id`` (the orchestrator), and in
    ``process_groups`` when given.  Started machines are targets; stopped and
    suspended ones apply the upgrade at their next start; machines in any other
    state are skipped with the reason.
    """
    groups = set(process_groups)
    targets, pending, skipped = [], [], []
    for machine in machines:
        config = machine.get("config") or {}
        metadata = config.get("metadata") or {}
        group = metadata.get("fly_process_group") or ""
        if self_id and machine.get("id") == self_id:
            continue
        if group in _INTERNAL_GROUPS or (groups and group not in groups):
            continue
        if metadata.get("fly_platform_version") != "v2" and not config.get("services"):
            continue
        state = machine.get("state") or "unknown"
        if state == "started":
            targets.append(machine)
        elif state in _PENDING_STATES:
            pending.append(machine)
        else:
            skipped.append((machine, f"{state}: not upgraded now; it catches up when it next boots"))
    return MachineSelection(tuple(targets), tuple(pending), tuple(skipped))


def parse_result_marker(output: str) -> dict | None:
    """The per-machine result from ``rpc upgrade`` output: the JSON between the
    last pair of ``__FLYDEPLOY_RESULT__`` markers, or None when there is none."""
    for match in reversed(_RESULT_RE.findall(output or "")):
        try:
            result = json.loads(match)
        except ValueError:
            continue
        if isinstance(result, dict):
            return result
    return None


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


@dataclasses.dataclass(frozen=True)
class MachineOutcome:
    """How one machine took an upgrade; ``result`` is its ``rpc upgrade`` result, if any."""

    machine_id: str
    region: str
    ok: bool
    error: str | None = None
    result: Mapping[str, Any] | None = None

    def line(self) -> str:
        """The line printed for this machine: ``✓ id (region) 3 modules, ...`` or ``✗ id (region) error``."""
        if not self.ok:
            return f"✗ {self.machine_id} ({self.region}) {self.error}"
        result = self.result or {}
        modules = result.get("modules_reloaded") or 0
        processes = result.get("processes_succeeded") or 0
        suspended = round(result.get("suspend_duration_ms") or 0)
        return (f"✓ {self.machine_id} ({self.region}) {_plural(modules, 'module')}, "
                f"{_plural(processes, 'process', 'processes')}, suspended {suspended} ms")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def judge_upgrade(machine: Mapping[str, Any], exit_code: int, stdout: str, stderr: str,
                  exit_signal: int = 0, *, python: str = "python3") -> MachineOutcome:
    """Judge one machine by its ``rpc upgrade`` result marker and exit code.

    It succeeded only when the command exited 0 and its result says success.
    Otherwise the error is the result's own, or what the exit says (a missing
    Python or flydeploy on the machine is named with what to do).
    """
    machine_id, region = machine.get("id", "?"), machine.get("region", "?")
    result = parse_result_marker(stdout)
    if result is not None and result.get("success") and exit_code == 0 and not exit_signal:
        return MachineOutcome(machine_id, region, True, None, result)
    if result is not None and result.get("error"):
        error = str(result["error"])
    elif exit_signal:
        error = f"rpc upgrade was killed by signal {exit_signal}"
    elif "No module named flydeploy" in stderr:
        error = "flydeploy is not importable on the machine: copy flydeploy.py into the app's image"
    elif exit_code == 127:
        error = (f"{python} not found on the machine: put it on the image's PATH or set "
                 "[tool.flydeploy] python")
    else:
        tail = _last_line(stderr) or _last_line(stdout)
        error = f"rpc upgrade exited {exit_code} without a result" + (f": {tail}" if tail else "")
    return MachineOutcome(machine_id, region, False, error, result)


@dataclasses.dataclass
class FleetReport:
    """What an ``orchestrate`` run did: the release, and one outcome per machine."""

    app: str
    version: str
    sha256: str
    tarball_url: str
    uploaded: bool
    outcomes: list[MachineOutcome]
    pending: list[Mapping[str, Any]]
    skipped: list[tuple[Mapping[str, Any], str]]
    duration_s: float = 0.0

    @property
    def failed(self) -> list[MachineOutcome]:
        """The machines that did not take the upgrade."""
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_code(self) -> int:
        """0 when every started machine succeeded, 1 when any failed or timed out."""
        return 1 if self.failed else 0

    def summary(self) -> str:
        """One line: how many machines took which version, which failed, which wait for their start."""
        done = len(self.outcomes) - len(self.failed)
        text = (f"{done}/{_plural(len(self.outcomes), 'machine')} upgraded to {self.version} "
                f"in {self.duration_s:.1f} s")
        if self.failed:
            text += f"; FAILED: {', '.join(o.machine_id for o in self.failed)}"
        if self.pending:
            text += f"; {_plural(len(self.pending), 'stopped machine')} will apply it at next start"
        return text


def _map_concurrently(fn: Callable[[Any], Any], items: Sequence[Any], limit: int) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item as each finishes, at most ``limit`` at a time.

    ``fn`` must not raise.  The worker threads are daemons and stop taking work
    when the caller stops iterating (Ctrl-C), so an interrupted run exits at once.
    """
    todo: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    for item in items:
        todo.put(item)

    def work() -> None:
        while not stop.is_set():
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            done.put(fn(item))

    for _ in range(min(limit, len(items))):
        threading.Thread(target=work, name="flydeploy-exec", daemon=True).start()
    try:
        for _ in items:
            yield done.get()
    finally:
        stop.set()


def _exec_failure(exc: MachinesAPIError, timeout: float) -> str:
    if exc.status == 408:
        return f"timed out after {timeout:g} s; raise --timeout if it needs longer"
    return f"exec failed: {exc}"


def _store_release(store: Any, key: str, release: Any) -> bool:
    """Upload a packed release unless the same content is there; True when it uploaded."""
    if store.head(key) is None:
        store.upload(key, release.path)
        return True
    with tempfile.TemporaryDirectory(prefix="flydeploy-check-") as scratch:
        existing = store.download(key, os.path.join(scratch, "existing.tar.gz"))
    if existing != release.sha256:
        raise FlyDeployError(f"{key} already exists with other content: choose another --version "
                             "(a stored release is never overwritten)")
    return False


def _pick_rollback(current: Mapping[str, Any] | None, to: str | None) -> dict:
    """The history entry a rollback goes to: version ``to``, or the previous one."""
    history = list((current or {}).get("history") or [])
    if not history:
        raise FlyDeployError("nothing to roll back to: no earlier hot upgrade is recorded in current.json")
    if to is None:
        return dict(history[0])
    for entry in history:
        if entry.get("version") == to:
            return dict(entry)
    known = ", ".join(str(e.get("version")) for e in history)
    raise FlyDeployError(f"version {to!r} is not in the hot upgrade history; pass --to one of: {known}")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def orchestrate(app: str, image_ref: str, *, store: Any, api: Any, root: str | os.PathLike[str] = ".",
                version: str | None = None, include: Iterable[str] | None = None,
                exclude: Iterable[str] | None = None, rollback: bool = False, rollback_to: str | None = None,
                force: bool = False, owner: str | None = None, lock_timeout: float = 300.0,
                timeout: float = 120.0, max_concurrency: int = 10, suspend_timeout: float = 10.0,
                process_groups: Iterable[str] = (), python: str = "python3", self_id: str | None = None,
                out: TextIO | None = None) -> FleetReport:
    """Push a release to every machine of ``app`` and report how each took it.

    Takes the deploy lock (``LockHeld`` when someone else holds it), packs the
    app under ``root`` into ``releases/<app>-<version>.tar.gz`` (the upload is
    skipped when the same content is already stored) and records it in
    ``current.json`` -- or, with ``rollback``, records the earlier history entry
    ``rollback_to`` (default: the previous one) instead of packing.  Then it
    execs ``rpc upgrade`` on every started machine (``select_machines``),
    ``max_concurrency`` at a time, printing a line per machine as it finishes
    and a summary to ``out``.  The lock is released in every case.
    """
    out = out or sys.stdout
    self_id = self_id if self_id is not None else os.environ.get("FLY_MACHINE_ID")

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    started = time.monotonic()
    deployment_id = uuid.uuid4().hex
    lock = acquire_lock(store, app, owner=owner or f"{getpass.getuser()}@{socket.gethostname()}",
                        deployment_id=deployment_id, timeout_s=lock_timeout, force=force)
    try:
        if rollback or rollback_to is not None:
            entry = _pick_rollback(read_current(store, app)[0], rollback_to)
            entry["deployed_at"] = _now_iso()
            uploaded = False
            say(f"Rolling {app} back to {entry['version']}")
        else:
            version = check_version(version or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
            key = f"releases/{app}-{version}.tar.gz"
            with tempfile.TemporaryDirectory(prefix="flydeploy-pack-") as scratch:
                release = pack_release(root, os.path.join(scratch, "release.tar.gz"), app=app,
                                       version=version, source_image_ref=image_ref,
                                       include=list(include) if include else None,
                                       exclude=list(exclude) if exclude else None)
                uploaded = _store_release(store, key, release)
            say(f"Release {version}: {_plural(len(release.manifest['files']), 'file')}, sha256 "
                f"{release.sha256[:12]}, {'uploaded' if uploaded else 'already stored'}")
            entry = {"version": version, "source_image_ref": image_ref, "tarball_url": store.url(key),
                     "sha256": release.sha256, "deployed_at": _now_iso()}
        record_hot_upgrade(store, app, entry)
        selection = select_machines(api.list(), self_id=self_id, process_groups=process_groups)
        report = FleetReport(app, entry["version"], entry["sha256"], entry["tarball_url"], uploaded,
                             [], list(selection.pending), list(selection.skipped))
        for machine in selection.pending:
            say(f"· {machine.get('id')} ({machine.get('region', '?')}) {machine.get('state')}: "
                "applies at next start")
        for machine, reason in selection.skipped:
            say(f"· {machine.get('id')} ({machine.get('region', '?')}) {reason}")
        argv = [python, "-m", "flydeploy", "rpc", "upgrade", "--app", app, "--url", entry["tarball_url"],
                "--sha256", entry["sha256"], "--suspend-timeout", f"{suspend_timeout:g}"]
        say(f"Upgrading {_plural(len(selection.targets), 'machine')} to {entry['version']}, "
            f"{max_concurrency} at a time")

        def upgrade(machine: Mapping[str, Any]) -> MachineOutcome:
            try:
                res = api.exec(machine["id"], argv, timeout=timeout)
            except MachinesAPIError as exc:
                return MachineOutcome(machine["id"], machine.get("region", "?"), False,
                                      _exec_failure(exc, timeout))
            return judge_upgrade(machine, res.exit_code, res.stdout, res.stderr, res.exit_signal,
                                 python=python)

        results = _map_concurrently(upgrade, selection.targets, max_concurrency)
        try:
            for outcome in results:
                report.outcomes.append(outcome)
                say(outcome.line())
        finally:
            results.close()
        report.duration_s = time.monotonic() - started
        say(report.summary())
        return report
    finally:
        lock.release()


def status_row(machine: Mapping[str, Any], current: Mapping[str, Any] | None,
               processes: Sequence[Mapping[str, Any]] | None = None, error: str | None = None) -> dict:
    """One ``status`` row for a machine, from its Machine JSON, ``current.json``
    and the ``rpc info`` of its processes (``error`` when that could not be had).

    ``verdict`` is ``✓ up to date``, ``✗ NOT APPLIED``, ``STALE image`` (the
    machine runs another image than the one ``current.json`` is for) or the
    state of a machine that is not running (``stopped``: applies at next start).
    """
    state = machine.get("state") or "unknown"
    image = machine_image(machine)
    hot = (current or {}).get("hot_upgrade")
    versions = sorted({str(p["version"]) for p in processes or () if p.get("version")})
    applied = [str(p.get("applied_at") or p["deployed_at"]) for p in processes or ()
               if p.get("applied_at") or p.get("deployed_at")]
    if state != "started":
        verdict = state
    elif current and current.get("image_ref") and image != current["image_ref"]:
        verdict = "STALE image"
    elif error is None and (hot is None or (processes and all(
            p.get("version") == hot.get("version") for p in processes))):
        verdict = "✓ up to date"
    else:
        verdict = "✗ NOT APPLIED"
    return {"machine_id": machine.get("id"), "region": machine.get("region"), "state": state,
            "process_group": machine_group(machine), "image": image,
            "hot_upgrade_version": ", ".join(versions) or None, "applied_at": max(applied, default=None),
            "processes": len(processes or ()), "verdict": verdict, "error": error}


def fleet_status(app: str, *, store: Any, api: Any, python: str = "python3", process_groups: Iterable[str] = (),
                 max_concurrency: int = 10, timeout: float = 30.0) -> list[dict]:
    """``status_row`` for every app machine: the Machines API list, ``current.json``
    and ``rpc info`` on the started machines, ``max_concurrency`` at a time."""
    current = read_current(store, app)[0]
    selection = select_machines(api.list(), process_groups=process_groups)
    argv = [python, "-m", "flydeploy", "rpc", "info", "--app", app]

    def info(machine: Mapping[str, Any]) -> tuple[str, list | None, str | None]:
        try:
            res = api.exec(machine["id"], argv, timeout=timeout)
        except MachinesAPIError as exc:
            return machine["id"], None, _exec_failure(exc, timeout)
        try:
            processes = json.loads(res.stdout)
        except ValueError:
            processes = None
        if not isinstance(processes, list):
            return machine["id"], None, (_last_line(res.stderr)
                                         or f"rpc info exited {res.exit_code} without a process list")
        processes = [p for p in processes if isinstance(p, dict)]
        errors = [f"pid {p.get('pid')}: {p.get('error')}" for p in processes if p.get("ok") is False]
        return machine["id"], processes, "; ".join(errors) or None

    found = {machine_id: (processes, error) for machine_id, processes, error
             in _map_concurrently(info, selection.targets, max_concurrency)}
    machines = list(selection.targets) + list(selection.pending) + [m for m, _ in selection.skipped]
    return [status_row(m, current, *found.get(m["id"], (None, None))) for m in machines]


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every fleet upgrade takes (``--app``, ``--force``, timeouts,
    ``--max-concurrency``, ``--process-group``) to an argparse parser."""
    parser.add_argument("--app", help="the Fly app (default: fly.toml's app)")
    parser.add_argument("--force", action="store_true", help="take the deploy lock even if someone holds it")
    parser.add_argument("--lock-timeout", type=float, metavar="S",
                        help="how long the deploy lock lasts, in seconds (default 300)")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="how long one machine may take to upgrade, in seconds (default 120)")
    parser.add_argument("--max-concurrency", type=int, metavar="N",
                        help="how many machines are upgraded at a time (default 10)")
    parser.add_argument("--suspend-timeout", type=float, metavar="S",
                        help="how long a server may take to reach a safe point (default 10)")
    parser.add_argument("--process-group", action="append", dest="process_groups", metavar="G",
                        help="only machines of this process group (repeatable)")


def fleet_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given by the flags of ``add_fleet_arguments`` (and any of
    the other setting names present on ``args``), for ``load_config``."""
    return {key: getattr(args, key) for key in _SETTINGS if getattr(args, key, None) is not None}


def _orchestrate_command(argv: list[str]) -> int:
    """``python -m flydeploy orchestrate``: run ``orchestrate`` with settings from
    the flags and the project in ``--root``; exit 0, 1 (a machine failed), 2
    (lock held, bad settings) or 130 (interrupted)."""
    parser = argparse.ArgumentParser(prog="python -m flydeploy orchestrate", allow_abbrev=False)
    add_fleet_arguments(parser)
    parser.add_argument("--image-ref", required=True, help="the image the release was built from")
    parser.add_argument("--version", help="the release version (default: a UTC timestamp)")
    parser.add_argument("--root", default=".", help="the project directory (default: the current one)")
    parser.add_argument("--python", help="the Python that runs flydeploy on the machines")
    parser.add_argument("--owner", help="who deploys, shown to anyone who finds the lock held")
    parser.add_argument("--rollback", action="store_true", help="push an earlier release instead of packing")
    parser.add_argument("--to", help="with --rollback: the version to go back to (default: the previous)")
    args = parser.parse_args(argv)
    print(f"{ORCHESTRATOR_MARKER} started", flush=True)
    try:
        config = load_config(args.root, overrides=fleet_overrides(args))
        app = config.require_app()
        token = os.environ.get("FLYDEPLOY_API_TOKEN") or os.environ.get("FLY_API_TOKEN")
        if not token:
            raise ConfigError("no Machines API token: set the FLY_API_TOKEN app secret "
                              "(fly secrets set FLY_API_TOKEN=\"$(fly tokens create deploy)\")")
        report = orchestrate(
            app, args.image_ref, store=S3.from_env(bucket=config.bucket), api=Machines(app, token, retries=_EXEC_RETRIES),
            root=config.root, version=args.version, include=config.include, exclude=config.exclude,
            rollback=args.rollback, rollback_to=args.to, force=args.force, owner=args.owner,
            lock_timeout=config.lock_timeout, timeout=config.timeout,
            max_concurrency=config.max_concurrency, suspend_timeout=config.suspend_timeout,
            process_groups=config.process_groups, python=args.python or config.python)
        code = report.exit_code
    except (LockHeld, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 2
    except FlyDeployError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("interrupted; the deploy lock was released", file=sys.stderr, flush=True)
        code = 130
    print(f"{ORCHESTRATOR_MARKER} exit {code}", flush=True)
    return code


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
