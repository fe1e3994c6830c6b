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
1. Storage        the SigV4 signer (``sign_request``, ``presign_url``), the
                  addressing rule (``s3_addressing_style``, ``s3_object_address``)
                  and the S3/Tigris client (``S3``); ``LocalStore``, the same
                  interface on a directory, for local mode.
2. Releases       deterministic release tarballs (``pack_release``,
                  ``unpack_release``), what a developer's tree holds for
                  ``hot --direct`` (``DockerIgnore``, ``dependency_fingerprint``,
                  ``LocalTree``), the ``current.json`` metadata
                  (``read_current``, ``record_hot_upgrade``, ``reset_current``)
                  and the deploy lock (``acquire_lock``).
3. Machines API   the Fly Machines API client (``Machines``), the one builder
                  of machine-side commands (``MachineCommands``), the
                  preflight (``doctor``'s check), and the fleet orchestration
                  that pushes a release to every machine (``orchestrate``) in
                  two phases, named in ``FLEET_PHASES`` with their point of no
                  return: prepare everywhere, which is also the check that
                  every machine can run the upgrade (a token the API refuses
                  falls back to the next), judged by pure functions
                  (``judge_exec_refusals``, ``judge_prepare``, ``to_explain``,
                  ``pick_canaries``, ``accepting``, ``to_revert``,
                  ``to_restart``, ``plan_document``), then apply (canaries
                  first) or the fleet back (a machine that kept nothing to
                  revert from restarted to boot on the previous release);
                  short execs start detached phases, whose
                  result objects it collects.  It runs on an orchestrator
                  machine or, with ``hot --direct``, on the developer's own.
4. Engine         what happens inside one process: servers (``Server``),
                  asyncio loop pausing (``attach_loop``), change tracking
                  (``track``, ``modified_modules``), the plan (analysis of
                  old and new source that changes nothing live: what runs
                  again, what takes new code in place; ``plan_upgrade``
                  runs it alone on staged files), the swap (the
                  executor and its undo log) and ``reload_modules``, whose
                  phases (prepare, pause, swap, migrate, resume, commit;
                  the point of no return after migrate) are named in
                  ``UPGRADE_PHASES`` and its docstring.
4b. Frameworks    inside the same pause and undo log: web framework state
                  (Jinja2 template caches, Flask and Starlette/FastAPI
                  routes and handlers, Django template loaders and URL
                  caches, SQLAlchemy models) made what a cold start of the
                  new code builds, then the ``on_reload`` callbacks; Flask
                  and Django (WSGI) requests wait at a gate while the code
                  swaps.
5. Agent          the per-process agent on a unix socket, the per-machine
                  upgrade in one run (``hot_upgrade``) or in two phases
                  (``prepare_release``, then ``apply_release`` with its
                  health check, or ``discard_prepared``; ``--revert``), whose
                  phases are named in ``MACHINE_PHASES``, boot-time catch-up
                  (``startup_reapply_current``) and the poller.
6. Entry points   ``rpc ...`` (what exec runs, started by the bootstrap
                  ``MachineCommands`` builds: upgrade, prepare, apply,
                  detached or not, discard, info, ping, preflight) and
                  ``orchestrate ...`` (the orchestrator machine's main
                  process); ``main``; the ``__main__`` hook is right after
                  the imports.

Every error raised on purpose is a ``FlyDeployError``; its message says what
went wrong and what to do about it.  Secrets never appear in messages or logs.
"""

from __future__ import annotations

import abc
import argparse
import ast
import atexit
import builtins
import collections
import concurrent.futures
import contextlib
import copy
import copyreg
import dataclasses
import datetime
import email.utils
import enum
import fcntl
import functools
import gc
import getpass
import gzip
import hashlib
import hmac
import http.client
import importlib
import importlib.machinery
import importlib.util
import inspect
import io
import itertools
import json
import linecache
import logging
import marshal
import math
import mimetypes
import operator
import os
import pathlib
import pwd
import pickle
import queue
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import site
import socket
import ssl
import stat
import struct
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import traceback
import types
import urllib.parse
import weakref
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import BinaryIO
from typing import Generic
from typing import NamedTuple
from typing import Protocol
from typing import TYPE_CHECKING
from typing import TextIO
from typing import TypedDict

# asyncio, subprocess and tomllib are imported where they are used, so that
# `python -m flydeploy rpc` (run on every machine at every upgrade) and an
# application's boot do without them.  What our own threads may need stays
# above: a first import in a thread racing a fork would leave the child an
# import lock that nobody releases.
if TYPE_CHECKING:
    import asyncio

if __name__ == "__main__":
    # `python -m flydeploy` runs the importable module instead of this copy:
    # a process has one flydeploy whatever way it was started, and the body
    # below runs once, not twice, in every exec'd command.
    import flydeploy

    sys.exit(flydeploy.main())


__version__ = "0.1.0"

__all__ = [
    # 0. Foundations
    "FlyDeployError",
    "ConfigError",
    "ConflictError",
    # 1. Storage
    "Store",
    "S3Error",
    "NotFound",
    "PreconditionFailed",
    # 1. Storage: SigV4 and S3 client
    "sign_request",
    "presign_url",
    "s3_addressing_style",
    "s3_object_address",
    "S3",
    # 1. Storage: local directory store
    "LocalStore",
    # 2. Releases
    "ReleaseError",
    "Release",
    "MANIFEST_NAME",
    "release_key",
    "pack_release",
    "unpack_release",
    "HISTORY_LIMIT",
    "read_current",
    "update_current",
    "record_hot_upgrade",
    "reset_current",
    "LockHeld",
    "Lock",
    "acquire_lock",
    # 3. Machines API
    "Machines",
    "ExecResult",
    "MachinesAPIError",
    "authorization_header",
    "missing_program",
    "EXEC_DEADLINE_S",
    # 3. Fleet orchestration
    "MachineCommands",
    "FleetConfig",
    "load_config",
    "default_version",
    "MachineSelection",
    "machine_group",
    "machine_image",
    "select_machines",
    "parse_result_marker",
    "upgrade_applies_to",
    "pending_note",
    "hot_upgrade_for_group",
    "MachineOutcome",
    "command_failure",
    "judge_result",
    "judge_upgrade",
    "PreflightCheck",
    "judge_preflight",
    "run_preflight",
    "result_poll_interval",
    "results_prefix",
    "FLEET_PHASES",
    "FLEET_POINT_OF_NO_RETURN",
    "prepare_line",
    "PrepareVerdict",
    "judge_prepare",
    "judge_exec_refusals",
    "to_explain",
    "to_discard",
    "accepting",
    "pick_canaries",
    "health_ports_for",
    "to_revert",
    "applied_version",
    "withdraw_hot_upgrade",
    "prepare_expiry_s",
    "plan_document",
    "plan_lines",
    "FleetReport",
    "orchestrate",
    "status_row",
    "fleet_status",
    "LocalMachines",
    "add_fleet_arguments",
    "fleet_overrides",
    "ORCHESTRATOR_MARKER",
    "ORCHESTRATOR_ROLE_KEY",
    "ORCHESTRATOR_ROLE",
    "ORCHESTRATOR_RUN_KEY",
    "ORCHESTRATOR_LAUNCHER_KEY",
    # 4. Engine: servers and asyncio loops
    "Server",
    "CallError",
    "CallTimeout",
    "ServerStopped",
    "Upgraded",
    "get_state",
    "servers",
    "SuspendTimeout",
    "attach_loop",
    "detach_loop",
    # 4. Engine: tracking, plan, swap, reload_modules
    "track",
    "modified_modules",
    "reload_modules",
    "plan_upgrade",
    "UpgradePlan",
    "PlannedCodeChange",
    "UPGRADE_PHASES",
    "UpgradeReport",
    "UpgradeRefused",
    "on_upgrade",
    # 5. Agent
    "Agent",
    "AgentError",
    "start_agent",
    "hot_upgrade",
    "prepare_release",
    "apply_release",
    "discard_prepared",
    "PrepareResult",
    "APPLY_ACCEPTS",
    "ProcessPlan",
    "HealthReport",
    "HealthCheck",
    "MACHINE_PHASES",
    "MACHINE_POINT_OF_NO_RETURN",
    "RESULT_MARKER",
    "startup_reapply_current",
    "get_current_hot_upgrade_info",
    "stop_poller",
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


class ConflictError(FlyDeployError):
    """A conditional write lost the race to other writers every time it was tried."""


# The chunk size of every streamed read and write (files, request and response bodies).
_IO_CHUNK = 1 << 20


def _is_positive_seconds(value: object) -> bool:
    """Whether ``value`` is a finite number of seconds above 0 (a bool is not a number here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


# Every option in seconds is above 0 and at most a day (more is a typo, and a deadline
# that far away overflows time arithmetic); every count option is 1 to 1000.
_MAX_OPTION_SECONDS = 24 * 3600
_MAX_OPTION_COUNT = 1000


def _number_problem(kind: str, value: object) -> str | None:
    """What is wrong with ``value`` as an option of ``kind`` (``"seconds"`` or
    ``"count"``), said as what it must be; None when nothing is."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "seconds" and not (number and math.isfinite(value) and 0 < value <= _MAX_OPTION_SECONDS):
        return f"a number of seconds above 0 and up to {_MAX_OPTION_SECONDS} (a day)"
    if kind == "count" and not (isinstance(value, int) and number and 1 <= value <= _MAX_OPTION_COUNT):
        return f"a whole number of at least 1 and at most {_MAX_OPTION_COUNT}"
    return None


def _number_argument(kind: str) -> Callable[[str], float | int]:
    """An argparse ``type`` for an option of ``kind`` (``"seconds"`` or ``"count"``): a
    value ``_number_problem`` finds wrong is a usage error (exit 2) before anything runs."""
    def parse(text: str) -> float | int:
        try:
            value = float(text) if kind == "seconds" else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a {'number of seconds' if kind == 'seconds' else 'whole number'}") from None
        problem = _number_problem(kind, value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: it must be {problem}")
        return value
    parse.__name__ = kind
    return parse


def _backoff_delay(attempt: int, *, base: float, cap: float, floor: float = 0.0,
                   retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    ``retry_after`` (what the server asked for) wins when given; otherwise the
    wait grows as ``base * 2**attempt`` up to ``cap`` and is jittered down to a
    ``floor`` fraction of that, so that clients that failed together do not
    retry together.
    """
    if retry_after is not None:
        return retry_after
    return min(cap, base * 2 ** attempt) * random.uniform(floor, 1.0)


# A Retry-After longer than this is not waited out: the caller sees the error.
_MAX_RETRY_AFTER = 60.0


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


@contextlib.contextmanager
def _local_file_errors(path: str) -> Iterator[None]:
    """Re-raise an OSError of a local file as FlyDeployError, so that it is never mistaken
    for a network error and retried."""
    try:
        yield
    except OSError as exc:
        raise FlyDeployError(f"{path}: {exc.strerror or exc}: check the path, its "
                             "permissions and the free disk space") from exc


def _user_name(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _owner_name(path: str) -> str:
    try:
        return _user_name(os.stat(path).st_uid)
    except OSError:
        return "another user"


def _digest(f: BinaryIO, algorithm: str) -> str:
    """Hex digest of an open file's content from where it stands, read in bounded chunks."""
    return hashlib.file_digest(f, lambda: hashlib.new(algorithm, usedforsecurity=False)).hexdigest()


def _file_digest(path: str, algorithm: str) -> str:
    """Hex digest of the file at ``path``, read in bounded chunks."""
    with open(path, "rb") as f:
        return _digest(f, algorithm)


def _write_atomically(path: str, write: Callable[[BinaryIO], Any], *, mode: int = 0o644,
                      temp_dir: str | None = None,
                      replace: Callable[[str, str], None] = os.replace) -> Any:
    """Create or replace the file ``path`` with what ``write(out)`` writes; return its result.

    The data goes to a temporary file (beside ``path``, or in ``temp_dir``), is
    fsynced and then moved into place by ``replace(temp, path)``; on any failure
    the temporary file is removed, so readers see the old file or the whole new
    one, never a part.
    """
    folder = temp_dir or os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FlyDeployError(f"cannot write {path}: the folder {folder} does not exist: "
                             "check the path, or create the folder first")
    with _local_file_errors(path):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        out = os.fdopen(fd, "wb")
        try:
            result = write(out)
            with _local_file_errors(path):
                out.flush()
                os.fsync(out.fileno())
        finally:
            # Flushed above when all went well; after a failure (a full disk) the data
            # left in the buffer cannot be written either, and the first error says why.
            with contextlib.suppress(OSError):
                out.close()
        os.chmod(tmp, mode)
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return result


# ===========================================================================
# 1. Storage: SigV4 signer, S3/Tigris client, local directory store
# ===========================================================================


class S3Error(FlyDeployError):
    """A storage request failed.

    ``str(error)`` is the whole actionable text.  ``status`` is the HTTP status
    (0 when no reply came), ``code`` and ``message`` are the server's own
    ``<Code>`` and ``<Message>`` from its XML error body (``message`` is empty
    when there was none), ``request_id`` comes from its headers; ``key`` is the
    object the request was about.
    """

    def __init__(self, text: str, *, status: int = 0, code: str = "", message: str = "",
                 request_id: str | None = None, key: str | None = None) -> None:
        super().__init__(text)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.key = key


class NotFound(S3Error):
    """The object does not exist (HTTP 404)."""


class PreconditionFailed(S3Error):
    """A conditional request (``If-Match`` / ``If-None-Match``) did not hold (HTTP 412)."""


class Store(Protocol):
    """What ``S3`` and ``LocalStore`` share, and what releases, metadata and the lock use.

    Keys are non-empty '/'-separated strings of at most 1024 bytes of UTF-8.
    ETags are opaque quoted strings, passed back unchanged as ``if_match``.
    A write with ``if_match`` (an ETag or ``*``) or ``if_none_match="*"`` that
    does not hold raises ``PreconditionFailed``; reading a missing key raises
    ``NotFound``; every other failure is an ``S3Error``.
    """

    def put(self, key: str, data: bytes | bytearray | memoryview | str | os.PathLike[str], *,
            content_type: str | None = None, if_none_match: str | None = None,
            if_match: str | None = None) -> str:
        """Store bytes (or the file at a path) under ``key``; return the new ETag."""

    def upload(self, key: str, path: str | os.PathLike[str], *,
               content_type: str | None = None) -> str:
        """Store the file at ``path`` under ``key`` in bounded memory; return the ETag."""

    def get(self, key: str) -> bytes:
        """The content of ``key``."""

    def get_json(self, key: str, *, if_none_match: str | None = None) -> tuple[Any, str] | None:
        """The content of ``key`` parsed as JSON, with the ETag of that content; None
        (not modified) when ``if_none_match`` is given and still the ETag of ``key``."""

    def head(self, key: str) -> dict[str, Any] | None:
        """``{"etag", "size", "content_type", "last_modified", "headers"}``, None if absent."""

    def download(self, key: str, path: str | os.PathLike[str]) -> str:
        """Write ``key`` into the file ``path`` (whole or not at all); return its sha256 hex."""

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key`` (a missing key is no error unless ``if_match`` is given)."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with ``prefix``, in UTF-8 byte order."""

    def url(self, key: str) -> str:
        """A URL naming ``key`` (unsigned)."""


_MAX_KEY_BYTES = 1024


def _invalid_key(key: object, why: str, advice: str) -> S3Error:
    return S3Error(f"key {key!r} is not valid: {why}; {advice}", status=400, code="InvalidKey",
                   key=key if isinstance(key, str) else None)


def _check_key(key: object) -> str:
    """Return ``key`` if it can name an object (a non-empty string of at most 1024 bytes
    of UTF-8), else raise ``S3Error`` code ``InvalidKey``."""
    advice = "use a non-empty text key of at most 1024 bytes of UTF-8"
    if not isinstance(key, str) or not key:
        raise _invalid_key(key, "a key is a non-empty string", advice)
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        # A lone surrogate: typically a file name decoded with surrogateescape.
        raise _invalid_key(key, "it is not valid UTF-8", advice) from None
    if size > _MAX_KEY_BYTES:
        raise _invalid_key(key, f"it is longer than {_MAX_KEY_BYTES} bytes", advice)
    return key


def _condition_headers(if_match: str | None, if_none_match: str | None) -> dict[str, str]:
    """The conditional headers of a request.  An empty condition is refused rather than
    dropped: dropping it would turn a conditional write into an unconditional one."""
    headers = {}
    for name, value in (("If-Match", if_match), ("If-None-Match", if_none_match)):
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} is {value!r}: a condition is an ETag or '*' (pass None "
                             "for an unconditional request); an ETag the server did not "
                             "give cannot be used as one")
        headers[name] = value
    return headers


def _open_put_file(data: str | os.PathLike[str]) -> BinaryIO:
    """Open the file a ``put`` was given.  A str naming no file is most likely text meant
    as the content, so the error says how to store text."""
    path = os.fspath(data)
    try:
        return open(path, "rb")
    except FileNotFoundError:
        if isinstance(data, str):
            raise FlyDeployError(f"put() got the str {data[:200]!r}, which names no file: "
                                 "check the path; put takes bytes or the path of a file, so "
                                 "to store text, pass text.encode()") from None
        raise FlyDeployError(f"{path}: no such file: check the path") from None
    except OSError:
        with _local_file_errors(path):
            raise


# --- SigV4 signing ----------------------------------------------------------

_SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_DEFAULT_PORT_SUFFIX = {"http": ":80", "https": ":443"}
_MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600
# A percent-escape that stays one in canonical form: upper-case hex, and not the escape of
# an unreserved character (which decodes to itself) nor, in a path, of "/".
_KEPT_ESCAPE = r"%(?!2D|2E|3[0-9]|4[1-9A-F]|5[0-9A]|5F|6[1-9A-F]|7[0-9A]|7E{slash})[0-9A-F]{{2}}"
# Paths and query parts already in canonical form (what the S3 client sends) are used as
# they are: decoding and re-encoding them is most of the cost of a signature.
_CANONICAL_PATH = re.compile(r"(?:[A-Za-z0-9._~/-]|" + _KEPT_ESCAPE.format(slash="|2F") + ")*")
_CANONICAL_QUERY_WORD = r"(?:[A-Za-z0-9._~-]|" + _KEPT_ESCAPE.format(slash="") + ")*"
_CANONICAL_QUERY_PART = re.compile(f"{_CANONICAL_QUERY_WORD}(?:={_CANONICAL_QUERY_WORD})?")


def _amz_date(now: datetime.datetime | None) -> str:
    """``now`` (an aware datetime, the current time when None) as ``YYYYMMDDTHHMMSSZ``."""
    if now is None:
        return _format_amz_date(int(time.time()))
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("the signing time must be an aware datetime (e.g. datetime.now(timezone.utc))")
    return _format_amz_date(math.floor(now.timestamp()))


@functools.lru_cache(maxsize=16)
def _format_amz_date(epoch_second: int) -> str:
    """A Unix time as ``YYYYMMDDTHHMMSSZ`` (cached: many requests share a second)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(epoch_second))


_URL_PARTS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(?:\?([^#]*))?")


def _split_url(url: str) -> tuple[str, str, str, str]:
    """(scheme, netloc, path, query) of an absolute URL; much cheaper than urlsplit."""
    match = _URL_PARTS.match(url)
    if match is None:
        raise ValueError(f"{url!r} is not an absolute http(s) URL")
    scheme, netloc, path, query = match.groups()
    return scheme, netloc, path, query or ""


def _host_header(scheme: str, netloc: str) -> str:
    """The Host header for a URL: lower-cased, the port kept only when not the scheme's default."""
    host = netloc.rpartition("@")[2].lower()
    default = _DEFAULT_PORT_SUFFIX.get(scheme.lower())
    if default and host.endswith(default):
        host = host[: -len(default)]
    return host


def _canonical_uri(path: str) -> str:
    """The S3 canonical URI: percent-decoded, then every byte outside ``A-Za-z0-9-_.~/`` encoded once."""
    if not path:
        return "/"
    if _CANONICAL_PATH.fullmatch(path):
        return path
    return urllib.parse.quote(urllib.parse.unquote_to_bytes(path), safe="/")


def _canonical_query(query: str) -> str:
    """Query pairs decoded, strictly re-encoded and sorted by name then value (``acl`` -> ``acl=``)."""
    if not query:
        return ""
    quote, unquote = urllib.parse.quote, urllib.parse.unquote_to_bytes
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if not _CANONICAL_QUERY_PART.fullmatch(part):
            name, value = quote(unquote(name), safe=""), quote(unquote(value), safe="")
        pairs.append((name, value))
    pairs.sort()
    return "&".join([f"{name}={value}" for name, value in pairs])


def _canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header list): names lower-cased and sorted, values
    trimmed with inner whitespace collapsed, repeated names joined with commas."""
    # Sorted by name only: the values of a repeated header keep their order.
    entries = sorted([(name.strip().lower(), " ".join(str(value).split()))
                      for name, value in headers], key=operator.itemgetter(0))
    names: list[str] = []
    lines: list[str] = []
    for name, value in entries:
        if names and names[-1] == name:
            lines[-1] += "," + value
        else:
            names.append(name)
            lines.append(f"{name}:{value}")
    lines.append("")
    return "\n".join(lines), ";".join(names)


@functools.lru_cache(maxsize=64)
def _signing_key(secret_key: str, datestamp: str, region: str, service: str) -> bytes:
    """The derived SigV4 key; cached because it only changes once a day per credential."""
    key = hmac.digest(("AWS4" + secret_key).encode(), datestamp.encode(), "sha256")
    for part in (region, service, "aws4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


class _Signature(NamedTuple):
    """The intermediate SigV4 values of one request (tests compare them with published vectors)."""

    canonical_request: str
    string_to_sign: str
    signed_headers: str
    scope: str
    signature: str


def _sign(method: str, path: str, query: str, headers: Iterable[tuple[str, str]], *,
          payload_hash: str, secret_key: str, region: str, service: str,
          amz_date: str) -> _Signature:
    """Sign exactly the given headers (host included by the caller) of a request."""
    header_block, signed_headers = _canonical_headers(headers)
    canonical_request = "\n".join((method.upper(), _canonical_uri(path), _canonical_query(query),
                                   header_block, signed_headers, payload_hash))
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join((_SIGV4_ALGORITHM, amz_date, scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()))
    key = _signing_key(secret_key, amz_date[:8], region, service)
    signature = hmac.digest(key, string_to_sign.encode(), "sha256").hex()
    return _Signature(canonical_request, string_to_sign, signed_headers, scope, signature)


def sign_request(method: str, url: str, headers: Mapping[str, str] | Iterable[tuple[str, str]], *,
                 payload_hash: str, access_key: str, secret_key: str, region: str = "auto",
                 service: str = "s3", session_token: str | None = None,
                 now: datetime.datetime | None = None) -> dict[str, str]:
    """Sign a request with AWS Signature Version 4 (S3 rules) and return the headers to add.

    The result holds ``Authorization``, ``X-Amz-Date``, ``X-Amz-Content-Sha256``
    (= ``payload_hash``: the body's sha256 hex, or ``UNSIGNED-PAYLOAD``) and, with a
    ``session_token``, ``X-Amz-Security-Token``.  ``host`` (taken from ``url``, with
    the port unless it is the scheme's default, unless ``headers`` carries one), those
    headers and every header in ``headers`` are signed; send them all unchanged.
    ``headers`` is a mapping or a sequence of (name, value) pairs (repeated names are
    joined with commas).  The path of ``url`` is the key as it goes on the wire: it is
    percent-decoded and re-encoded once, without ``.``/``..``/``//`` normalisation.
    ``now`` is an aware datetime (the current UTC time when None).
    """
    scheme, netloc, path, query = _split_url(url)
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if "host" not in [name.strip().lower() for name, _ in pairs]:
        pairs.append(("host", _host_header(scheme, netloc)))
    added = {"X-Amz-Date": _amz_date(now), "X-Amz-Content-Sha256": payload_hash}
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    pairs.extend(added.items())
    signed = _sign(method, path, query, pairs, payload_hash=payload_hash,
                   secret_key=secret_key, region=region, service=service,
                   amz_date=added["X-Amz-Date"])
    added["Authorization"] = (f"{_SIGV4_ALGORITHM} Credential={access_key}/{signed.scope}, "
                              f"SignedHeaders={signed.signed_headers}, Signature={signed.signature}")
    return added


def _presign(method: str, url: str, *, payload_hash: str, access_key: str, secret_key: str,
             region: str, service: str, expires: int, session_token: str | None,
             now: datetime.datetime | None) -> str:
    """The query-string form of SigV4 with the given payload hash (S3 uses UNSIGNED-PAYLOAD)."""
    if not 1 <= expires <= _MAX_PRESIGN_EXPIRES_S:
        raise ValueError(f"expires={expires} is out of range: a presigned URL lives "
                         f"1 to {_MAX_PRESIGN_EXPIRES_S} seconds")
    scheme, netloc, path, query = _split_url(url)
    amz_date = _amz_date(now)
    auth_params = [("X-Amz-Algorithm", _SIGV4_ALGORITHM),
                   ("X-Amz-Credential", f"{access_key}/{amz_date[:8]}/{region}/{service}/aws4_request"),
                   ("X-Amz-Date", amz_date),
                   ("X-Amz-Expires", str(expires)),
                   ("X-Amz-SignedHeaders", "host")]
    if session_token:
        auth_params.append(("X-Amz-Security-Token", session_token))
    auth_query = urllib.parse.urlencode(auth_params, quote_via=urllib.parse.quote, safe="")
    query = f"{query}&{auth_query}" if query else auth_query
    signed = _sign(method, path, query, [("host", _host_header(scheme, netloc))],
                   payload_hash=payload_hash, secret_key=secret_key, region=region,
                   service=service, amz_date=amz_date)
    return f"{scheme}://{netloc}{path or '/'}?{query}&X-Amz-Signature={signed.signature}"


def presign_url(method: str, url: str, *, access_key: str, secret_key: str, region: str = "auto",
                service: str = "s3", expires: int = 3600, session_token: str | None = None,
                now: datetime.datetime | None = None) -> str:
    """A presigned URL for ``method`` on ``url``, valid ``expires`` seconds from ``now``.

    The signature travels in the query string (``UNSIGNED-PAYLOAD``, only ``host``
    signed, ``X-Amz-Signature`` last), so any HTTP client can use the URL without
    credentials.  ``expires`` is 1 to 604800 seconds.
    """
    return _presign(method, url, payload_hash=_UNSIGNED_PAYLOAD, access_key=access_key,
                    secret_key=secret_key, region=region, service=service, expires=expires,
                    session_token=session_token, now=now)


# --- S3 client --------------------------------------------------------------

_DEFAULT_S3_ENDPOINT = "https://fly.storage.tigris.dev"
# How a request names its bucket; "auto" lets s3_addressing_style pick by endpoint.  The
# variable bears the name of botocore's own `addressing_style` option.
_ADDRESSING_STYLES = ("auto", "virtual", "path")
_ADDRESSING_STYLE_VARIABLE = "AWS_S3_ADDRESSING_STYLE"
# Tigris (fly.storage.tigris.dev, t3.storage.dev): buckets created since 2025-02-19 answer
# only virtual-hosted requests (tigrisdata.com/blog/virtual-hosted-urls).
_VIRTUAL_HOSTED_DOMAINS = ("tigris.dev", "storage.dev")
# A bucket name that can be one label of a host name and stay under the endpoint's TLS
# wildcard certificate: lower-case letters, digits and inner hyphens, no dots.
_DNS_SAFE_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Statuses whose Retry-After header is honoured.
_RETRY_AFTER_STATUSES = frozenset({429, 503})
# Credentials are printable ASCII: anything else would end up in a header line.
_CREDENTIAL = re.compile(r"[\x21-\x7e]+")
_MAX_ERROR_BODY = 1 << 16
_S3_HINTS = {
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (and AWS_REGION) for this endpoint",
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID for this endpoint",
    "AccessDenied": "check that these credentials may use this bucket",
    "NoSuchBucket": "check BUCKET_NAME, or create the bucket",
    "ExpiredToken": "refresh AWS_SESSION_TOKEN (temporary credentials expired)",
    "InvalidToken": "check AWS_SESSION_TOKEN",
    "RequestTimeTooSkewed": "fix this machine's clock",
}


def _is_ip_address(host: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
        except (OSError, ValueError):
            continue
        return True
    return False


def _under_domain(host: str, domains: Iterable[str]) -> bool:
    return any(host == domain or host.endswith("." + domain) for domain in domains)


def s3_addressing_style(endpoint_host: str, bucket: str, setting: str = "auto") -> str:
    """How requests reach ``bucket`` at an endpoint whose host name is ``endpoint_host``:
    ``"virtual"`` (``https://<bucket>.<host>/<key>``) or ``"path"``
    (``https://<host>/<bucket>/<key>``).

    ``setting`` is ``"auto"``, ``"virtual"`` or ``"path"`` (``AWS_S3_ADDRESSING_STYLE``,
    ``[tool.flydeploy] s3_addressing_style``).  Automatic: virtual-hosted on Tigris
    (``*.tigris.dev``, ``*.storage.dev``) for a bucket name that can be a host name label,
    path style everywhere else (IP addresses, ``localhost``, other S3 servers).  A setting
    that is none of the three, or ``"virtual"`` where the bucket cannot go into the host
    name, raises ``ConfigError``.
    """
    host = endpoint_host.lower().rstrip(".")
    if setting not in _ADDRESSING_STYLES:
        raise ConfigError(f"S3 addressing style {setting!r} is not one of {', '.join(_ADDRESSING_STYLES)}: "
                          f"fix {_ADDRESSING_STYLE_VARIABLE} or [tool.flydeploy] s3_addressing_style")
    if setting == "path":
        return "path"
    if setting == "virtual" and _is_ip_address(host):
        raise ConfigError(f"virtual-hosted S3 addressing puts the bucket into the host name, but the endpoint "
                          f"is the IP address {host}: use a host name in AWS_ENDPOINT_URL_S3, or path "
                          "addressing")
    if setting == "virtual" and not _DNS_SAFE_BUCKET.fullmatch(bucket):
        raise ConfigError(f"bucket {bucket!r} cannot be part of a host name (3 to 63 lower-case letters, "
                          "digits and inner hyphens), so virtual-hosted S3 addressing cannot reach it: "
                          "use path addressing")
    if setting == "virtual":
        return "virtual"
    if _under_domain(host, _VIRTUAL_HOSTED_DOMAINS) and _DNS_SAFE_BUCKET.fullmatch(bucket):
        return "virtual"  # Tigris: new buckets answer nothing else
    return "path"  # IP addresses, localhost, other S3 servers, names no host can carry


def s3_object_address(url: str, endpoint: str) -> tuple[str, str, str] | None:
    """``(bucket, key, style)`` of an object URL on ``endpoint`` in either form, or None
    when the URL is not on that endpoint.

    ``https://<bucket>.<host>/<key>`` is virtual-hosted, ``https://<host>/<bucket>/<key>``
    path style (after the endpoint's own path, if it has one); the query (a presigned
    URL's signature) does not matter.  Bucket and key come back percent-decoded.
    """
    scheme, netloc, path, _query = _split_url(url)
    base = urllib.parse.urlsplit(endpoint)
    prefix = base.path.rstrip("/") + "/"
    if scheme.lower() != base.scheme.lower() or not path.startswith(prefix):
        return None
    rest = path[len(prefix):]
    host, endpoint_host = _host_header(scheme, netloc), _host_header(base.scheme, base.netloc)
    label = host[: -len(endpoint_host) - 1]
    if host == endpoint_host:
        bucket, _, key = rest.partition("/")
        style = "path"
    elif host.endswith("." + endpoint_host) and label and "." not in label:
        bucket, key, style = label, rest, "virtual"
    else:
        return None
    return urllib.parse.unquote(bucket), urllib.parse.unquote(key), style


def _s3_endpoint_from_env() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3", "").strip() or _DEFAULT_S3_ENDPOINT


def _loopback_name(host: str) -> str | None:
    """``localhost`` for a name under ``.localhost``, else None.  RFC 6761 (6.3) makes
    them loopback names; curl, browsers and systemd-resolved resolve them so without
    asking DNS, which often does not know them (a bucket of a local S3 server)."""
    return "localhost" if host.endswith(".localhost") else None


class _TruncatedBody(Exception):
    """A response body ended before its Content-Length (the connection was cut)."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not (wraps the last error)."""

    def __init__(self, error: S3Error, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _xml_children(element: ET.Element) -> dict[str, str]:
    """Text of an element's direct children by tag name, namespaces dropped."""
    return {child.tag.rpartition("}")[2]: child.text or "" for child in element}


def _read_body(response: http.client.HTTPResponse, sink: Callable[[memoryview], object]) -> int:
    """Feed the whole response body to ``sink`` in chunks (views of one reused buffer, valid
    only during the call); a body shorter than its Content-Length raises ``_TruncatedBody``
    (http.client would silently return what it got)."""
    expected = response.getheader("Content-Length")
    received = 0
    view = memoryview(bytearray(_IO_CHUNK))
    while count := response.readinto(view):
        sink(view[:count])
        received += count
    if expected is not None and expected.isdigit() and received != int(expected):
        raise _TruncatedBody(f"connection closed after {received} of {expected} bytes")
    return received


class S3:
    """A small S3 client for Tigris (and any S3-compatible server), standard library only.

    Virtual-hosted URLs (``https://<bucket>.<host>/<key>``) on Tigris, path-style ones
    (``<endpoint>/<bucket>/<key>``) elsewhere, as ``s3_addressing_style`` decides from
    ``addressing_style`` (``auto``, ``virtual`` or ``path``; ``addressing_style`` says which
    one is in use).  SigV4 on every request, signing the host the request goes to,
    ``x-tigris-consistent: true`` on every request, TLS certificates always verified.
    ETags are returned exactly as the server sends them (quoted) and are passed back
    unchanged to ``if_match``.  Connection errors, timeouts and HTTP 408/429/5xx are
    retried ``retry_attempts`` times in all with exponential backoff and full jitter;
    other errors are raised at once as ``S3Error`` (``NotFound`` for 404,
    ``PreconditionFailed`` for 412).  One instance may be shared between threads: each
    thread keeps its own persistent connection.  Secrets never appear in messages,
    logs or ``repr``.
    """

    retry_attempts = 5
    retry_base_delay_s = 0.25
    retry_max_delay_s = 4.0

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, *,
                 region: str = "auto", session_token: str | None = None,
                 timeout: float = 30, addressing_style: str = "auto") -> None:
        if "@" in urllib.parse.urlsplit(endpoint).netloc:
            # Not echoed: the part before "@" is a password.
            raise ConfigError("the S3 endpoint URL holds credentials (user:password@host): "
                              "remove them from AWS_ENDPOINT_URL_S3 and set AWS_ACCESS_KEY_ID "
                              "and AWS_SECRET_ACCESS_KEY instead")
        parts = urllib.parse.urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ConfigError(f"S3 endpoint {endpoint!r} is not an http(s) URL: set "
                              f"AWS_ENDPOINT_URL_S3 to e.g. {_DEFAULT_S3_ENDPOINT}")
        if not bucket or "/" in bucket:
            raise ConfigError(f"bucket name {bucket!r} is not valid: set BUCKET_NAME "
                              "(or [tool.flydeploy] bucket) to the bucket's name")
        if not access_key or not secret_key:
            raise ConfigError("S3 credentials are empty: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY")
        for variable, value in (("AWS_ACCESS_KEY_ID", access_key),
                                ("AWS_SECRET_ACCESS_KEY", secret_key),
                                ("AWS_SESSION_TOKEN", session_token or "x")):
            if not _CREDENTIAL.fullmatch(value):
                # The value is never shown: it is a secret, or part of one.
                raise ConfigError(f"{variable} holds a space, a line break or another character "
                                  "that no credential has (often a trailing newline from a "
                                  "file); set it again without them")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", region):
            raise ConfigError(f"AWS_REGION {region!r} is not a region name: set it to e.g. "
                              "auto (Tigris) or us-east-1, or unset it")
        self.endpoint = urllib.parse.urlunsplit((parts.scheme, parts.netloc,
                                                 parts.path.rstrip("/"), "", ""))
        self.bucket = bucket
        self.access_key = access_key
        self.region = region
        self.timeout = timeout
        self._secret_key = secret_key
        self._session_token = session_token
        self._parts = parts
        self.addressing_style = s3_addressing_style(parts.hostname, bucket, addressing_style)
        base = parts.path.rstrip("/")
        if self.addressing_style == "virtual":
            self._hostname = f"{bucket}.{parts.hostname}"
            netloc = f"{bucket}.{parts.netloc}"
            self._bucket_path = f"{base}/"
        else:
            self._hostname = parts.hostname
            netloc = parts.netloc
            self._bucket_path = f"{base}/{urllib.parse.quote(bucket, safe='')}"
        self._key_prefix = self._bucket_path.rstrip("/") + "/"
        self._origin = f"{parts.scheme}://{netloc}"
        self._host = _host_header(parts.scheme, netloc)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._local = threading.local()

    @classmethod
    def from_env(cls, bucket: str | None = None, *, addressing_style: str | None = None) -> S3:
        """A client configured like the AWS tools and the Fly platform configure them.

        Reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (both required),
        ``AWS_SESSION_TOKEN`` (optional), ``AWS_ENDPOINT_URL_S3`` (default Tigris),
        ``AWS_REGION`` (default ``auto``), ``BUCKET_NAME`` (required unless ``bucket``
        is given) and ``AWS_S3_ADDRESSING_STYLE`` (``auto``, ``virtual`` or ``path``;
        default ``auto``, unless ``addressing_style`` is given).  Raises ``ConfigError``
        naming every missing variable at once.
        """
        env = {name: os.environ.get(name, "").strip() for name in (
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_REGION", "BUCKET_NAME", _ADDRESSING_STYLE_VARIABLE)}
        bucket = bucket or env["BUCKET_NAME"]
        missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env[name]]
        if not bucket:
            missing.append("BUCKET_NAME")
        if missing:
            raise ConfigError(
                f"missing environment variable(s) {', '.join(missing)}: set them (`fly storage "
                "create` prints them)" + ("; the bucket may also be given as [tool.flydeploy] "
                                          "bucket in pyproject.toml" if not bucket else ""))
        return cls(_s3_endpoint_from_env(), bucket,
                   env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                   region=env["AWS_REGION"] or "auto",
                   session_token=env["AWS_SESSION_TOKEN"] or None,
                   addressing_style=addressing_style or env[_ADDRESSING_STYLE_VARIABLE].lower() or "auto")

    def __repr__(self) -> str:
        return f"S3(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # -- public operations --

    def url(self, key: str) -> str:
        """The object's plain (unsigned) URL, in this client's addressing style."""
        return f"{self._origin}{self._key_path(key)}"

    def presigned_url(self, key: str, *, method: str = "GET", expires: int = 3600) -> str:
        """A presigned URL for ``key``: anyone holding it may ``method`` it for ``expires`` s."""
        return presign_url(method, self.url(key), access_key=self.access_key,
                           secret_key=self._secret_key, region=self.region, expires=expires,
                           session_token=self._session_token)

    def put(self, key: str, data: bytes | bytearray | memoryview | str | os.PathLike, *,
            content_type: str | None = None, if_none_match: str | None = None,
            if_match: str | None = None) -> str:
        """Store ``data`` (bytes, or the path of a file to stream) under ``key``; return its ETag.

        A ``str`` is always a path: to store text, pass ``text.encode()``.
        ``if_none_match="*"`` creates the object only if it does not exist yet and
        ``if_match=<etag>`` replaces it only if it is still that version; either raises
        ``PreconditionFailed`` otherwise (an empty condition raises ``ValueError``).  A
        conditional write whose reply was lost is retried, and the retry may then
        report ``PreconditionFailed`` although the first try landed: read the object
        back to tell.  A file is hashed in a first pass and then streamed, so memory
        use does not grow with its size.  The ETag is empty if the server sent none.
        """
        headers = _condition_headers(if_match, if_none_match)
        if content_type:
            headers["Content-Type"] = content_type
        if isinstance(data, (bytes, bytearray, memoryview)):
            body: bytes | _FileBody = bytes(data)
            payload_hash = hashlib.sha256(body).hexdigest()
        elif isinstance(data, (str, os.PathLike)):
            body = _FileBody(data)
            payload_hash = body.sha256
        else:
            raise TypeError(f"put() takes bytes or a file path, not {type(data).__name__}")
        response = self._call("PUT", key, headers=headers, body=body, payload_hash=payload_hash)
        return response.headers.get("etag", "")

    def upload(self, key: str, path: str | os.PathLike, *, content_type: str | None = None) -> str:
        """Stream the file at ``path`` to ``key`` (hashed first, memory bounded); return the ETag."""
        return self.put(key, os.fspath(path), content_type=content_type)

    def get(self, key: str) -> bytes:
        """The object's content; ``NotFound`` if there is none."""
        return self._get(key)[0]

    def get_json(self, key: str, *, if_none_match: str | None = None) -> tuple[Any, str] | None:
        """The object parsed as JSON, with its ETag (for a later ``if_match``); with
        ``if_none_match`` (an ETag) a conditional GET: None when the object is unchanged."""
        response = self._call("GET", key, headers=_condition_headers(None, if_none_match))
        if response.sha256 == _NOT_MODIFIED:
            return None
        data, etag = response.body, response.headers.get("etag", "")
        try:
            return json.loads(data), etag
        except ValueError as exc:
            raise S3Error(f"s3://{self.bucket}/{key} is not valid JSON ({exc}): fix or delete "
                          "the object", status=200, code="InvalidJSON", key=key) from None

    def head(self, key: str) -> dict[str, Any] | None:
        """``{"etag", "size", "content_type", "last_modified", "headers"}`` of the object,
        or None when it does not exist (``headers`` holds every response header,
        names lower-cased)."""
        try:
            response = self._call("HEAD", key)
        except NotFound:
            return None
        return {"etag": response.headers.get("etag", ""),
                "size": int(response.headers.get("content-length", "0")),
                "content_type": response.headers.get("content-type"),
                "last_modified": response.headers.get("last-modified"),
                "headers": response.headers}

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove the object (no error when it is already gone); with ``if_match`` only if
        it is still that version, else ``PreconditionFailed`` (or ``NotFound`` when it is
        gone).  A conditional delete whose reply was lost is retried, and the retry then
        reports ``PreconditionFailed`` or ``NotFound`` although the first try landed."""
        self._call("DELETE", key, headers=_condition_headers(if_match, None))

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """Every key that starts with ``prefix``, in the server's (lexicographic) order,
        fetched page by page with ListObjectsV2."""
        token = None
        while True:
            # URL-encoded keys: XML cannot carry control characters.
            params = [("list-type", "2"), ("max-keys", str(page_size)), ("prefix", prefix),
                      ("encoding-type", "url")]
            if token:
                params.append(("continuation-token", token))
            query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="")
            body = self._call("GET", None, query=query).body
            try:
                root = ET.fromstring(body)
            except ET.ParseError as exc:
                raise S3Error(f"listing s3://{self.bucket}/{prefix}* returned a malformed "
                              f"XML page ({exc}): check that AWS_ENDPOINT_URL_S3 is an S3 "
                              "endpoint", status=200, code="MalformedXML") from None
            fields = _xml_children(root)
            # A server that ignores encoding-type says so by not echoing it.
            decode = (urllib.parse.unquote_plus if fields.get("EncodingType") == "url"
                      else str)
            for element in root:
                if element.tag.rpartition("}")[2] == "Contents":
                    yield decode(_xml_children(element)["Key"])
            if fields.get("IsTruncated", "false").lower() != "true":
                return
            token = fields.get("NextContinuationToken")
            if not token:
                raise S3Error(f"listing s3://{self.bucket}/{prefix}* was cut short: the server "
                              "said more keys follow but gave no continuation token",
                              status=200, code="MalformedXML")

    def download(self, key: str, path: str | os.PathLike) -> str:
        """Stream the object into the file ``path`` and return its sha256 hex.

        The data goes to a temporary file next to ``path`` that replaces it only once
        the whole body has arrived; on any failure nothing is left behind.
        """
        return _write_atomically(os.fspath(path),
                                 lambda out: self._call("GET", key, stream_to=out).sha256)

    # -- plumbing --

    def _key_path(self, key: str) -> str:
        return f"{self._key_prefix}{urllib.parse.quote(_check_key(key), safe='/')}"

    def _get(self, key: str) -> tuple[bytes, str]:
        response = self._call("GET", key)
        return response.body, response.headers.get("etag", "")

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's persistent connection (a fresh one after a fork)."""
        pid, conn = getattr(self._local, "conn", (None, None))
        if conn is None or pid != os.getpid():
            host, port = self._hostname, self._parts.port
            if self._tls is not None:
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                   context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            loopback = _loopback_name(host)
            if loopback is not None:
                # Connect to the loopback name; TLS still checks the real host name.
                conn._create_connection = (lambda address, *args, **kwargs: socket.create_connection(
                    (loopback, address[1]), *args, **kwargs))
            self._local.conn = (os.getpid(), conn)
        return conn

    def _drop_connection(self) -> None:
        _, conn = getattr(self._local, "conn", (None, None))
        if conn is not None:
            conn.close()
        self._local.conn = (None, None)

    def _call(self, method: str, key: str | None, *, query: str = "",
              headers: dict[str, str] | None = None, body: bytes | _FileBody = b"",
              payload_hash: str = _EMPTY_SHA256, stream_to: BinaryIO | None = None) -> _S3Response:
        """One S3 operation with retries.  With ``stream_to`` the body goes into that file
        and the reply's ``sha256`` is the hex digest of what was written."""
        path = self._key_path(key) if key is not None else self._bucket_path
        target = f"{path}?{query}" if query else path
        what = f"{method} s3://{self.bucket}/{key if key is not None else ''}"
        attempt = 1
        while True:
            try:
                return self._attempt(method, target, key, headers or {}, body, payload_hash,
                                     stream_to, what)
            except _Retryable as retryable:
                error, retry_after = retryable.error, retryable.retry_after
                if attempt >= self.retry_attempts:
                    raise self._gave_up(error, f"gave up after {attempt} attempts") from None
                if retry_after is not None and retry_after > _MAX_RETRY_AFTER:
                    raise self._gave_up(error, f"gave up: the server asked to retry after "
                                               f"{retry_after:.0f}s") from None
                delay = _backoff_delay(attempt - 1, base=self.retry_base_delay_s,
                                       cap=self.retry_max_delay_s, retry_after=retry_after)
                log.warning("%s; retry %d of %d in %.2fs", error, attempt,
                            self.retry_attempts - 1, delay)
                time.sleep(delay)
                attempt += 1

    @staticmethod
    def _gave_up(error: S3Error, why: str) -> S3Error:
        return type(error)(f"{error} ({why})", status=error.status, code=error.code,
                           message=error.message, request_id=error.request_id, key=error.key)

    def _attempt(self, method: str, target: str, key: str | None, headers: dict[str, str],
                 body: bytes | _FileBody, payload_hash: str, stream_to: BinaryIO | None,
                 what: str) -> _S3Response:
        headers = {"x-tigris-consistent": "true", **headers}
        headers.update(sign_request(
            method, f"{self._origin}{target}",
            [("Host", self._host), *headers.items()], payload_hash=payload_hash,
            access_key=self.access_key, secret_key=self._secret_key, region=self.region,
            session_token=self._session_token))
        conn = self._connection()
        try:
            response = self._exchange(conn, method, target, headers, body)
            if response.status == 304 and "If-None-Match" in headers:
                response.read()
                return _S3Response({k.lower(): v for k, v in response.getheaders()}, b"", _NOT_MODIFIED)
            if response.status >= 300:
                error_body = response.read(_MAX_ERROR_BODY) if method != "HEAD" else b""
                self._drop_connection()
                error = self._error(what, key, response, error_body)
                if response.status in _RETRYABLE_STATUSES:
                    raise _Retryable(error, _retry_after_seconds(
                        response.getheader("Retry-After"))
                        if response.status in _RETRY_AFTER_STATUSES else None)
                raise error
            reply_body, sha256 = b"", None
            if method == "HEAD":
                response.read()  # empty, but frees the connection for reuse
            elif stream_to is not None:
                sha256 = _stream_into(response, stream_to)
            else:
                parts: list[bytes] = []
                _read_body(response, lambda chunk: parts.append(bytes(chunk)))
                reply_body = b"".join(parts)
            if response.will_close:
                self._drop_connection()
            return _S3Response({k.lower(): v for k, v in response.getheaders()}, reply_body, sha256)
        except (_TruncatedBody, OSError, http.client.HTTPException) as exc:
            # Local file errors never get here: _FileBody and _stream_into raise them as
            # FlyDeployError, so every OSError left is about the connection.
            self._drop_connection()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise S3Error(f"{what}: the TLS certificate of {self._origin} could not be "
                              f"verified ({exc.verify_message}): fix AWS_ENDPOINT_URL_S3 or "
                              "the system's CA certificates", key=key) from None
            reason = str(exc) or type(exc).__name__
            raise _Retryable(S3Error(
                f"{what} failed: {reason}; check that {self._origin} is reachable",
                code="ConnectionError", key=key)) from None
        except BaseException:
            # Whatever stopped this attempt (a local file error, Ctrl-C, a bug), the
            # connection may be mid-request: the next request must start on a fresh one.
            self._drop_connection()
            raise

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str,
                  headers: dict[str, str], body: bytes | _FileBody) -> http.client.HTTPResponse:
        """Send one request and return the response (also when the server answered early,
        e.g. with an auth error, and closed before the whole body was sent)."""
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", self._host)
        for name, value in headers.items():
            conn.putheader(name, value)
        if method in ("PUT", "POST"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            if isinstance(body, _FileBody):
                body.send(conn)
            elif body:
                conn.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before the body was complete; its reply says why
        return conn.getresponse()

    def _error(self, what: str, key: str | None, response: http.client.HTTPResponse,
               body: bytes) -> S3Error:
        status = response.status
        try:
            fields = _xml_children(ET.fromstring(body)) if body else {}
        except ET.ParseError:
            fields = {}
        code = fields.get("Code") or {404: "NotFound", 412: "PreconditionFailed"}.get(
            status, response.reason.replace(" ", "") or f"HTTP{status}")
        server_message = fields.get("Message", "")
        request_id = (response.getheader("x-amz-request-id") or fields.get("RequestId")
                      or None)
        hint = _S3_HINTS.get(code)
        if hint is None and status == 412:
            hint = "the object changed or already exists: read it again and retry"
        if hint is None and status == 403:
            # A HEAD reply has no body to name the reason: the usual ones.
            hint = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, that they may use "
                    "this bucket, and this machine's clock")
        text = (f"{what} failed: HTTP {status} {code}: {server_message or response.reason}"
                + (f" (request id {request_id})" if request_id else "")
                + (f"; {hint}" if hint else ""))
        cls = {404: NotFound, 412: PreconditionFailed}.get(status, S3Error)
        return cls(text, status=status, code=code, message=server_message,
                   request_id=request_id, key=key)


# The sha256 of a 304 reply to a conditional GET: nothing was sent.
_NOT_MODIFIED = "not modified"


class _S3Response(NamedTuple):
    """A successful S3 response: lower-cased headers, the body (empty when it went to a
    file) and the sha256 hex of what went to the file (None otherwise, ``_NOT_MODIFIED``
    for a 304)."""

    headers: dict[str, str]
    body: bytes
    sha256: str | None


class _FileBody:
    """A file to upload: hashed once up front, then streamed in chunks on each attempt."""

    def __init__(self, data: str | os.PathLike[str]) -> None:
        self.path = os.fspath(data)
        with _open_put_file(data) as f, _local_file_errors(self.path):
            self.size = os.fstat(f.fileno()).st_size
            self.sha256 = _digest(f, "sha256")

    def __len__(self) -> int:
        return self.size

    def send(self, conn: http.client.HTTPConnection) -> None:
        """Write exactly ``size`` bytes of the file to ``conn``."""
        remaining = self.size
        with _local_file_errors(self.path):
            f = open(self.path, "rb")
        with f:
            while remaining:
                with _local_file_errors(self.path):
                    chunk = f.read(min(_IO_CHUNK, remaining))
                if not chunk:
                    raise FlyDeployError(f"{self.path} shrank while it was being uploaded: "
                                         "upload a file that does not change")
                conn.send(chunk)
                remaining -= len(chunk)


def _stream_into(response: http.client.HTTPResponse, out: BinaryIO) -> str:
    """Write the whole body into ``out`` from its start; return the sha256 hex of it."""
    with _local_file_errors(out.name):
        out.seek(0)
        out.truncate()
    hasher = hashlib.sha256()

    def sink(chunk: memoryview) -> None:
        hasher.update(chunk)
        with _local_file_errors(out.name):
            out.write(chunk)

    _read_body(response, sink)
    return hasher.hexdigest()


# --- Local directory store --------------------------------------------------

# Under a store's root, this folder holds the store's own files (its lock file
# and the temporary files of writes in progress); it is never a key, and its
# presence is how a ``file://`` URL is traced back to the store that holds it.
_STORE_INTERNAL_DIR = ".flydeploy-store"
# A write's temporary file untouched this long was left by a process that died.
_STALE_TEMP_S = 3600


def _quoted(hexdigest: str) -> str:
    """An ETag as S3 gives it: the hex MD5 in double quotes."""
    return f'"{hexdigest}"'


def _same_etag(a: str, b: str) -> bool:
    return a.strip().strip('"') == b.strip().strip('"')


def _check_store_key(key: object) -> str:
    """Return ``key`` if it maps to a path inside a store, else raise ``S3Error``."""
    def refuse(why: str) -> S3Error:
        return _invalid_key(key, f"a local store cannot hold it: {why}",
                            "use a key of '/'-separated names without '.' or '..' parts")
    _check_key(key)
    if "\x00" in key:
        raise refuse("it contains a NUL character")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise refuse("it has an empty, '.' or '..' part (a leading, trailing or double '/')")
    if _STORE_INTERNAL_DIR in parts:
        raise refuse(f"{_STORE_INTERNAL_DIR} is the name of the store's own folder")
    return key


class LocalStore:
    """The ``S3`` client's interface on a local directory, for local mode.

    Each key is a file under ``root`` (``releases/app-current.json`` is
    ``root/releases/app-current.json``), so the directory mirrors a bucket and
    ``current.json``, history, rollback and the deploy lock work as they do on
    S3.  It keeps S3's semantics: an ETag is the quoted hex MD5 of the
    content; ``If-Match`` (an ETag or ``*``) and ``If-None-Match: *`` on
    ``put`` and ``delete`` raise ``PreconditionFailed`` when they do not hold;
    a missing key raises ``NotFound``; deleting a missing key without a
    condition succeeds.  Every write goes to a temporary file first and is
    moved into place with ``os.replace``, so readers see the old or the new
    content, never a mix; the check of a condition and the replace happen
    under an exclusive ``fcntl`` lock, so threads and processes sharing the
    directory see one order of writes.

    Keys that would leave the root (``..``, absolute paths, links pointing
    out) are refused with ``S3Error`` code ``InvalidKey``.  Unlike a bucket, a
    directory cannot hold both ``a`` and ``a/b``: such a write raises
    ``S3Error`` code ``KeyConflict``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self._internal = os.path.join(self.root, _STORE_INTERNAL_DIR)
        with self._access():
            os.makedirs(self._internal, exist_ok=True)
            self._real_root = os.path.realpath(self.root)
            cutoff = time.time() - _STALE_TEMP_S
            for entry in os.scandir(self._internal):
                with contextlib.suppress(FileNotFoundError):
                    if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    @classmethod
    def from_url(cls, url: str) -> tuple[LocalStore, str]:
        """Return ``(store, key)`` for a ``file://`` URL made by ``url()``.

        The store is the nearest folder above the file that holds a store's
        own folder, so a URL recorded in ``current.json`` is enough to fetch
        a release.
        """
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"{url!r} is not a file:// URL of this host; local stores "
                              "are reached through the file:// URLs LocalStore.url() gives")
        # The inverse of Path.as_uri(), which quotes the path's bytes.
        path = os.path.abspath(os.fsdecode(urllib.parse.unquote_to_bytes(parsed.path)))
        folder = os.path.dirname(path)
        while not os.path.isdir(os.path.join(folder, _STORE_INTERNAL_DIR)):
            parent = os.path.dirname(folder)
            if parent == folder:
                raise NotFound(f"no local store holds {path}: it is not under a folder "
                               f"with a {_STORE_INTERNAL_DIR}/ subfolder; check the URL",
                               status=404, code="NoSuchKey", key=path)
            folder = parent
        store = cls(folder)
        return store, os.path.relpath(path, folder).replace(os.sep, "/")

    # Paths, access, locking and temporary files.

    @contextlib.contextmanager
    def _access(self) -> Iterator[None]:
        """A store this user may not use is an ``S3Error`` (code ``AccessDenied``) saying whose it is."""
        try:
            yield
        except PermissionError as exc:
            raise S3Error(f"cannot use the local store {self.root} ({exc.strerror}: {exc.filename}): it "
                          f"belongs to {_owner_name(self.root)}; run as that user, or pass --store a folder "
                          "of your own",
                          status=403, code="AccessDenied") from None

    def _path(self, key: str) -> str:
        path = os.path.join(self.root, *_check_store_key(key).split("/"))
        real = os.path.realpath(path)
        if not real.startswith(self._real_root + os.sep):
            raise S3Error(f"key {key!r} resolves to {real}, outside the store {self.root} "
                          "(a symbolic link inside the store points out); remove that link",
                          status=400, code="InvalidKey", key=key)
        return path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # flock locks belong to the open file description, so a fresh open per
        # critical section excludes other threads of this process as well.
        with self._access():
            fd = os.open(os.path.join(self._internal, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @staticmethod
    def _spool(data: bytes | bytearray | memoryview | str | os.PathLike[str],
               out: BinaryIO) -> str:
        """Copy ``data`` (bytes or a file path) into ``out``; return its ETag."""
        digest = hashlib.md5(usedforsecurity=False)
        if isinstance(data, (bytes, bytearray, memoryview)):
            digest.update(data)
            out.write(data)
        elif isinstance(data, (str, os.PathLike)):
            with _open_put_file(data) as src, _local_file_errors(os.fspath(data)):
                while chunk := src.read(_IO_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
        else:
            raise TypeError(f"put() takes bytes or a file path, not {type(data).__name__}")
        return _quoted(digest.hexdigest())

    def _etag_of(self, path: str) -> str | None:
        try:
            return _quoted(_file_digest(path, "md5"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def _check_conditions(self, key: str, path: str, *, if_match: str | None,
                          if_none_match: str | None) -> None:
        if if_none_match is None and if_match is None:
            return
        current = self._etag_of(path)
        if if_none_match is not None and current is not None:
            raise PreconditionFailed(f"{key!r} already exists (If-None-Match: *)",
                                     status=412, code="PreconditionFailed", key=key)
        if if_match is not None:
            if current is None:
                raise PreconditionFailed(f"{key!r} does not exist (If-Match: {if_match})",
                                         status=412, code="PreconditionFailed", key=key)
            if if_match.strip() != "*" and not _same_etag(current, if_match):
                raise PreconditionFailed(f"{key!r} changed: its ETag is {current}, "
                                         f"not {if_match} (If-Match)",
                                         status=412, code="PreconditionFailed", key=key)

    def _conflict(self, key: str, err: OSError) -> S3Error:
        return S3Error(f"cannot store {key!r}: a local store cannot hold a key that is also "
                       f"the folder of another key ({err.strerror}); pick another key",
                       status=409, code="KeyConflict", key=key)

    # The S3 interface.

    def put(self, key: str, data: bytes | bytearray | memoryview | str | os.PathLike[str], *,
            content_type: str | None = None, if_none_match: str | None = None,
            if_match: str | None = None) -> str:
        """Store ``data`` (bytes, or the path of a file to copy) under ``key``; return the ETag.

        A ``str`` is always a path: to store text, pass ``text.encode()``.
        ``if_none_match="*"`` writes only if the key does not exist;
        ``if_match`` (an ETag or ``*``) only if it exists with that ETag
        (an empty condition raises ``ValueError``).
        ``content_type`` is accepted for interface parity; a directory keeps
        no per-file metadata.
        """
        _condition_headers(if_match, if_none_match)
        if if_none_match is not None and if_none_match.strip() != "*":
            raise S3Error(f"If-None-Match on put supports only '*', not {if_none_match!r}",
                          status=501, code="NotImplemented", key=key)
        path = self._path(key)

        def commit(tmp: str, target: str) -> None:
            with self._locked():
                self._check_conditions(key, target, if_match=if_match, if_none_match=if_none_match)
                try:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.replace(tmp, target)
                except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
                    raise self._conflict(key, err) from None

        return _write_atomically(path, functools.partial(self._spool, data),
                                 temp_dir=self._internal, replace=commit)

    def upload(self, key: str, path: str | os.PathLike[str], *,
               content_type: str | None = None) -> str:
        """Copy the file at ``path`` to ``key`` in bounded chunks; return the ETag."""
        return self.put(key, os.fspath(path), content_type=content_type)

    def get(self, key: str) -> bytes:
        """Return the content of ``key``; raise ``NotFound`` when it does not exist."""
        try:
            with self._access(), open(self._path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key!r} does not exist in {self.root}",
                           status=404, code="NoSuchKey", key=key) from None

    def get_json(self, key: str, *, if_none_match: str | None = None) -> tuple[Any, str] | None:
        """Return ``(parsed JSON, ETag)`` of ``key``, both from the same read; None when
        ``if_none_match`` is the ETag of what is there (not modified)."""
        data = self.get(key)
        etag = _quoted(hashlib.md5(data, usedforsecurity=False).hexdigest())
        if if_none_match is not None and if_none_match == etag:
            return None
        try:
            return json.loads(data), etag
        except ValueError as err:
            raise S3Error(f"{key!r} in {self.root} is not valid JSON ({err}); fix or delete it",
                          status=200, code="InvalidJSON", key=key) from None

    def head(self, key: str) -> dict[str, Any] | None:
        """Return ``{"etag", "size", "content_type", "last_modified", "headers"}`` of ``key``.

        The shape of ``S3.head``: ``last_modified`` is an HTTP date and
        ``headers`` the response headers S3 would send (names lower-cased);
        the content type is derived from the key's extension.  None when the
        key does not exist.
        """
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                etag = _quoted(_digest(f, "md5"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        headers = {
            "etag": etag,
            "content-length": str(info.st_size),
            "content-type": mimetypes.guess_type(key)[0] or "application/octet-stream",
            "last-modified": email.utils.formatdate(info.st_mtime, usegmt=True),
        }
        return {"etag": headers["etag"], "size": info.st_size, "content_type": headers["content-type"],
                "last_modified": headers["last-modified"], "headers": headers}

    def download(self, key: str, path: str | os.PathLike[str]) -> str:
        """Copy ``key`` to the file ``path``; return the sha256 hex of what was written.

        The copy goes to a temporary file beside ``path`` and replaces it only
        when complete, so a failure never leaves a partial file.
        """
        src_path = self._path(key)
        dest = os.path.abspath(os.fspath(path))
        try:
            src = open(src_path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key!r} does not exist in {self.root}",
                           status=404, code="NoSuchKey", key=key) from None

        def copy(out: BinaryIO) -> str:
            digest = hashlib.sha256()
            with _local_file_errors(dest):
                while chunk := src.read(_IO_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()

        with src:
            return _write_atomically(dest, copy)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key``; with ``if_match``, only if its ETag still matches.

        Deleting a missing key without a condition succeeds, as on S3.
        """
        _condition_headers(if_match, None)
        path = self._path(key)
        with self._locked():
            self._check_conditions(key, path, if_match=if_match, if_none_match=None)
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            # A bucket has no folders: drop the ones this key alone kept alive.
            folder = os.path.dirname(path)
            while folder != self.root:
                try:
                    os.rmdir(folder)
                except OSError:
                    break
                folder = os.path.dirname(folder)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Yield every key starting with ``prefix``, in S3's order (UTF-8 bytes)."""
        *folders, _ = prefix.split("/")
        if any(part in ("", ".", "..") for part in folders) or "\x00" in prefix:
            return iter(())  # no valid key lies below such a folder
        start = os.path.join(self.root, *folders)
        keys = []
        for folder, dirnames, filenames in os.walk(start):
            if folder == self.root and _STORE_INTERNAL_DIR in dirnames:
                dirnames.remove(_STORE_INTERNAL_DIR)
            relative = os.path.relpath(folder, self.root)
            base = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            for name in filenames:
                key = base + name
                if key.startswith(prefix) and not os.path.islink(os.path.join(folder, name)):
                    keys.append(key)
        keys.sort(key=lambda k: k.encode("utf-8", "surrogateescape"))
        return iter(keys)

    def url(self, key: str) -> str:
        """Return the ``file://`` URL of ``key`` (``LocalStore.from_url`` maps it back)."""
        return pathlib.Path(self._path(key)).as_uri()


# ===========================================================================
# 2. Releases: tarballs, current.json metadata, deploy lock
# ===========================================================================


# --- Release tarballs ------------------------------------------------------

MANIFEST_NAME = "flydeploy-manifest.json"
# Folders never packed, wherever they are: caches, dependencies, environments.
_NEVER_PACKED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages"})
# Top-level folders that belong to the application even without Python files
# in them (Flask and Django keep templates and static files there).
_APP_DATA_DIRS = frozenset({"templates", "static"})
# Top-level folders that are not the application even when they hold Python
# files; ``include`` can still name them.
_NOT_APP_DIRS = frozenset({"tests", "test", "docs", "doc", "benchmarks"})
# Top-level build outputs, which hold copies of the sources: a package only
# when they have an __init__.py.
_BUILD_OUTPUT_DIRS = frozenset({"build", "dist"})
# What a machine accepts in one release (more is refused as a possible decompression
# bomb); packing checks the same limits, so that no release is uploaded to be refused.
_MAX_RELEASE_BYTES = 2 << 30
_MAX_RELEASE_MEMBERS = 100_000
_MAX_MANIFEST_BYTES = 64 << 20
# Packing keeps small files' content from the hashing pass up to this much,
# so most trees are read once.
_PACK_CACHE_BYTES = 64 << 20
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class ReleaseError(FlyDeployError):
    """A release tarball is malformed, unsafe or not the expected one.

    ``member`` names the archive member at fault, when there is one.
    """

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


@dataclasses.dataclass(frozen=True)
class Release:
    """A packed release: the tarball's ``path``, its ``sha256`` and its ``manifest``."""

    path: str
    sha256: str
    manifest: dict[str, Any]

    def hot_upgrade_record(self, tarball_url: str, *, deployed_at: str | None = None) -> dict[str, Any]:
        """Return the ``hot_upgrade`` object of ``current.json`` for this release.

        ``deployed_at`` defaults to now (ISO 8601, UTC).
        """
        record = {
            "version": self.manifest["version"],
            "source_image_ref": self.manifest["source_image_ref"],
            "tarball_url": tarball_url,
            "sha256": self.sha256,
            "deployed_at": deployed_at or _iso_utc(_utc_now()),
        }
        if "local_tree" in self.manifest:  # packed from a developer's tree, not from an image
            record["local_tree"] = self.manifest["local_tree"]
        return record


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso_utc(moment: datetime.datetime) -> str:
    """ISO 8601 in UTC with millisecond precision and a ``Z``, as the wire formats use."""
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME_PATTERN.fullmatch(value):
        raise ConfigError(f"{what} {value!r} cannot name a release: use 1 to 128 letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    return value


def release_key(app: str, version: str) -> str:
    """Return the storage key of a release tarball: ``releases/<app>-<version>.tar.gz``."""
    return f"releases/{_check_name('app', app)}-{_check_name('version', version)}.tar.gz"


@functools.lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``*`` and ``?`` stay within a folder, ``**`` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _path_matches(pattern: str, path: str) -> bool:
    """Whether the file ``path`` (relative, '/'-separated) matches a pack pattern.

    As in ``.gitignore``: a pattern without '/' (but a trailing one) matches a
    file name or a folder name at any depth; one with a leading or inner '/'
    is anchored at the root; a pattern that matches a folder (or ends in '/')
    matches everything below it.
    """
    folders_only = pattern.endswith("/")
    anchored = pattern.startswith(("/", "./"))
    pattern = pattern.removeprefix("./").strip("/")
    if not pattern:
        return False
    regex = _glob_regex(pattern)
    parts = path.split("/")
    if "/" not in pattern and not anchored:
        candidates = parts[:-1] if folders_only else parts
        return any(regex.fullmatch(part) for part in candidates)
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + (0 if folders_only else 1))]
    return any(regex.fullmatch(prefix) for prefix in prefixes)


def _never_packed_dir(folder: str, name: str) -> bool:
    if name.startswith(".") or name in _NEVER_PACKED_DIRS or name.endswith(".egg-info"):
        return True
    here = os.path.join(folder, name)
    # A virtual environment (old virtualenv writes no pyvenv.cfg, but always
    # an activate script) or a conda environment, whatever it is called.
    return any(os.path.exists(os.path.join(here, marker))
               for marker in ("pyvenv.cfg", "conda-meta", "bin/activate", "Scripts/activate"))


def _unreadable_folder(err: OSError) -> None:
    raise ReleaseError(f"cannot read the folder {err.filename} ({err.strerror}): fix its "
                       "permissions, or leave it out with exclude") from None


def _release_files(root: str, include: Sequence[str] | None, exclude: Sequence[str] | None,
                   skip: str, dockerignore: DockerIgnore | None = None) -> list[str]:
    """Relative paths of the files to pack under ``root``, sorted; without those
    ``dockerignore`` keeps out of the image build's context."""
    # A lone string is one pattern, not a sequence of one-letter patterns.
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    candidates = []
    for folder, dirnames, filenames in os.walk(root, onerror=_unreadable_folder):
        dirnames[:] = [d for d in dirnames if not _never_packed_dir(folder, d)]
        relative = os.path.relpath(folder, root)
        base = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        for name in filenames:
            path = os.path.join(folder, name)
            if (name.startswith(".") or name.endswith((".pyc", ".pyo")) or path == skip
                    or base + name == MANIFEST_NAME or not os.path.isfile(path)):
                continue
            candidates.append(base + name)
    if include is not None:
        chosen = [p for p in candidates if any(_path_matches(pat, p) for pat in include)]
    else:
        chosen = _application_files(candidates)
    if exclude:
        chosen = [p for p in chosen if not any(_path_matches(pat, p) for pat in exclude)]
    if dockerignore is not None:
        chosen = [p for p in chosen if not dockerignore.ignores(p)]
    for rel in chosen:
        if why := _member_name_problem(rel):
            raise ReleaseError(f"cannot pack {rel!r}: its name {why}, so the release could "
                               "not be unpacked; rename it, or leave it out with exclude",
                               member=rel)
    return sorted(chosen)


def _application_files(candidates: Sequence[str]) -> list[str]:
    """The application's packages and modules among ``candidates`` (relative paths).

    Top-level modules (``*.py``), top-level packages (folders with an
    ``__init__.py``: their whole subtree, package data included), top-level
    namespace packages (folders holding ``.py`` files directly: their whole
    subtree; build outputs excepted) and the conventional ``templates/`` and
    ``static/`` folders; never the folders of ``_NOT_APP_DIRS``.
    """
    packages = {p.split("/", 1)[0] for p in candidates
                if p.count("/") == 1 and p.endswith("/__init__.py")}
    namespaces = {p.split("/", 1)[0] for p in candidates
                  if p.count("/") == 1 and p.endswith(".py")} - _BUILD_OUTPUT_DIRS
    app_dirs = (packages | namespaces | _APP_DATA_DIRS) - _NOT_APP_DIRS
    return [p for p in candidates
            if ("/" not in p and p.endswith(".py"))
            or ("/" in p and p.split("/", 1)[0] in app_dirs)]


def _source_date_epoch() -> int | None:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds "
                          "since 1970; set it to e.g. $(git log -1 --format=%ct) or unset it") from None


def pack_release(root: str | os.PathLike[str], out_path: str | os.PathLike[str], *, app: str,
                 version: str, source_image_ref: str | None = None,
                 include: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, dockerignore: DockerIgnore | None = None,
                 local_tree: Mapping[str, Any] | None = None) -> Release:
    """Pack the application under ``root`` into a deterministic ``.tar.gz`` at ``out_path``.

    By default the application's packages and modules are packed: top-level
    modules (``*.py``), top-level packages (folders with an ``__init__.py``,
    with everything below them: subpackages and package data such as
    templates and static files), top-level namespace packages (folders that
    hold ``.py`` files directly, with everything below them) and top-level
    ``templates/`` and ``static/`` folders.  ``tests/``, ``test/``,
    ``docs/``, ``doc/`` and ``benchmarks/`` are not the application and are
    left out unless ``include`` names them.  ``include`` (patterns) replaces
    that choice and ``exclude`` (patterns) removes from it; patterns work as
    in ``.gitignore`` (``*.sqlite3``, ``media/``, ``app/static/**/*.map``).
    Never packed: ``__pycache__``, ``*.pyc``, hidden files and folders
    (``.git``, ``.env``), virtual environments, ``node_modules``,
    ``site-packages`` and ``*.egg-info``.  A file name that
    ``unpack_release`` would refuse (a backslash, invalid UTF-8) and a folder
    or file that cannot be read raise ``ReleaseError`` naming it, and so does a
    tree over the limits every machine enforces on a release (2 GiB of files,
    100,000 files, a 64 MiB manifest), before its large files are read.

    The first member is ``flydeploy-manifest.json`` (``app``, ``version``,
    ``source_image_ref``, ``created_at``, ``files: {path: sha256}``).  The same
    tree and arguments give the same bytes: sorted members, fixed mtime,
    uid/gid 0, modes 0644/0755, no timestamp in the gzip header.
    ``created_at`` comes from ``SOURCE_DATE_EPOCH`` when it is set and is
    null otherwise.  A link to a file is packed as the file it points to;
    linked folders are not followed.

    Packing from a developer's tree (``hot --direct``), ``dockerignore``
    leaves out what the image build's ``.dockerignore`` keeps out, and
    ``local_tree`` (``{"git_commit", "git_dirty"}``, each null when the tree
    is no git checkout) is recorded in the manifest as ``local_tree``.
    """
    _check_name("app", app)
    _check_name("version", version)
    root = os.path.abspath(os.fspath(root))
    out_path = os.path.abspath(os.fspath(out_path))
    if not os.path.isdir(root):
        raise ReleaseError(f"cannot pack {root}: it is not a folder; pass the application's root")
    epoch = _source_date_epoch()
    files = _release_files(root, include, exclude, skip=out_path, dockerignore=dockerignore)
    if not files:
        raise ReleaseError(f"nothing to pack under {root}: no Python modules or packages found "
                           "(or include/exclude left nothing); check the root and the patterns")
    if len(files) > _MAX_RELEASE_MEMBERS:
        raise _over_limit(f"{len(files)} files, more than the {_MAX_RELEASE_MEMBERS}", "folders")

    # Pass 1: hash every file (the manifest leads the archive), keeping small
    # contents so that pass 2 need not read them again.
    hashes: dict[str, str] = {}
    cached: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    modes: dict[str, int] = {}
    budget = _PACK_CACHE_BYTES
    total = 0
    for rel in files:
        path = os.path.join(root, *rel.split("/"))
        with _pack_read_errors(rel), open(path, "rb") as f:
            info = os.fstat(f.fileno())
            total += info.st_size
            if total > _MAX_RELEASE_BYTES:  # checked before the file is read
                raise _over_limit(f"more than {_MAX_RELEASE_BYTES} bytes of files (at {rel}, "
                                  f"{info.st_size} bytes), over the", "large files", member=rel)
            if info.st_size <= budget:
                data = f.read()
                budget -= len(data)
                cached[rel] = data
                hashes[rel] = hashlib.sha256(data).hexdigest()
            else:
                hashes[rel] = _digest(f, "sha256")
        sizes[rel] = info.st_size
        modes[rel] = 0o755 if info.st_mode & 0o111 else 0o644

    created_at = (None if epoch is None else
                  _iso_utc(datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)))
    manifest = {"app": app, "version": version, "source_image_ref": source_image_ref,
                "created_at": created_at, "files": hashes}
    if local_tree is not None:
        manifest["local_tree"] = dict(local_tree)
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    if len(manifest_bytes) > _MAX_MANIFEST_BYTES:
        raise _over_limit(f"a {MANIFEST_NAME} of {len(manifest_bytes)} bytes, more than the "
                          f"{_MAX_MANIFEST_BYTES}-byte", "folders")
    mtime = epoch or 0

    def member(name: str, size: int, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, mode, mtime
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def write(raw: BinaryIO) -> str:
        hashed = _HashingWriter(raw, out_path)  # the tarball's hash as it is written, not read back
        with gzip.GzipFile(filename="", mode="wb", fileobj=hashed, compresslevel=6, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(member(MANIFEST_NAME, len(manifest_bytes), 0o644), io.BytesIO(manifest_bytes))
            for rel in files:
                if rel in cached:
                    tar.addfile(member(rel, sizes[rel], modes[rel]), io.BytesIO(cached[rel]))
                    continue
                # Streamed, and checked against pass 1: the manifest is already out.
                with _pack_read_errors(rel), open(os.path.join(root, *rel.split("/")), "rb") as f:
                    reader = _PackedFileReader(f, rel, sizes[rel])
                    tar.addfile(member(rel, sizes[rel], modes[rel]), reader)
                if reader.digest.hexdigest() != hashes[rel]:
                    raise _changed_while_packing(rel)
        hashed.flush()
        return hashed.sha256.hexdigest()

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    return Release(out_path, _write_atomically(out_path, write), manifest)


# --- What a developer's tree holds (``hot --direct``) -----------------------

# Dependency files whose whole content counts; pyproject.toml counts by its
# dependency tables alone (_PYPROJECT_DEPENDENCY_KEYS).
_DEPENDENCY_FILE_RE = re.compile(r"requirements[^/]*\.txt|uv\.lock|poetry\.lock")
# What moby/patternmatcher escapes before a pattern becomes a regular expression.
_DOCKERIGNORE_ESCAPED = frozenset(".+()|{}$")
_PYPROJECT_DEPENDENCY_KEYS = (("build-system", "requires"), ("project", "dependencies"),
                              ("project", "optional-dependencies"), ("dependency-groups",),
                              ("tool", "poetry", "dependencies"), ("tool", "poetry", "group"))


@dataclasses.dataclass(frozen=True)
class DockerIgnore:
    """A ``.dockerignore`` file's rules, to pack what the image build copies.

    Docker's rules (https://docs.docker.com/build/concepts/context/#dockerignore-files,
    implemented by moby/patternmatcher and its ignorefile reader): a line
    starting with ``#`` is a comment; each line is trimmed, cleaned like a
    path (``filepath.Clean``) and taken relative to the context root (a
    leading ``/`` is dropped); ``*`` and ``?`` stay within a folder, ``**``
    spans any number of folders (zero too); a pattern matches a path or any
    folder above it; ``!`` makes an exception; the last line that matches a
    path decides.  Unlike ``.gitignore``, ``*.pyc`` matches at the root only.
    ``prefix`` is where the packed root is in the context (``""`` when the app
    root is the context root, else ``"src/"``).  ``source`` is the file the
    rules were read from; None when there was none, and flyctl's default
    applied (``for_context``).
    """

    rules: tuple[tuple[bool, re.Pattern[str]], ...]  # (is an exception, pattern)
    prefix: str = ""
    source: str | None = None

    @classmethod
    def parse(cls, text: str, prefix: str = "", source: str | None = None) -> DockerIgnore:
        """The rules of a ``.dockerignore`` file's ``text``."""
        rules = []
        for line in text.removeprefix("\ufeff").splitlines():
            if line.startswith("#"):
                continue
            pattern = line.strip()
            exception = pattern.startswith("!")
            if exception:
                pattern = pattern[1:].strip()
            if not pattern:
                continue
            pattern = _clean_path(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
            rules.append((exception, _dockerignore_regex(pattern)))
        return cls(tuple(rules), prefix, source)

    @classmethod
    def for_context(cls, context: str | os.PathLike[str], root: str | os.PathLike[str],
                    path: str | os.PathLike[str] | None = None) -> DockerIgnore:
        """The rules flyctl builds ``context`` with, for files packed from ``root`` (inside
        ``context``): those of the file ``path`` (``FleetConfig.ignore_file``), by default
        ``context``'s ``.dockerignore``.  As flyctl's readDockerignore
        (internal/build/imgsrc/archive.go): when that file does not exist, the
        context is everything but ``fly.toml``."""
        path = os.fspath(path) if path is not None else os.path.join(context, ".dockerignore")
        relative = os.path.relpath(os.path.abspath(root), os.path.abspath(context)).replace(os.sep, "/")
        prefix = "" if relative == "." else relative + "/"
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return cls.parse("fly.toml", prefix)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}; flyctl could not build the image from it "
                              "either: fix the file, or the path in fly.toml [build] ignorefile") from None
        return cls.parse(text, prefix, path)

    def ignores(self, rel: str) -> bool:
        """Whether the image build leaves out the file ``rel`` (relative to the packed root)."""
        path = self.prefix + rel
        parts = path.split("/")
        candidates = [path] + ["/".join(parts[:n]) for n in range(1, len(parts))]
        ignored = False
        for exception, regex in self.rules:
            if any(regex.fullmatch(candidate) for candidate in candidates):
                ignored = not exception
        return ignored


def _clean_path(path: str) -> str:
    """Go's ``path.Clean``: no empty, ``.`` or resolvable ``..`` parts."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == ".." and parts and parts[-1] != "..":
            parts.pop()
        elif part != ".." or not rooted:
            parts.append(part)
    cleaned = ("/" if rooted else "") + "/".join(parts)
    return cleaned or "."


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """moby/patternmatcher's translation of one pattern into a regular expression."""
    out, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out.append(".*" if i >= len(pattern) else "(?:.*/)?")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif char in _DOCKERIGNORE_ESCAPED:
            out.append("\\" + char)
        else:  # the rest goes to the regular expression as it is: `[a-c]`, `[^a-c]` are classes
            out.append(char)
        i += 1
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as exc:
        raise ConfigError(f".dockerignore: {pattern!r} is not a valid pattern ({exc}); Docker refuses it too") from None


def list_release_files(root: str | os.PathLike[str], *, include: Sequence[str] | None = None,
                       exclude: Sequence[str] | None = None,
                       dockerignore: DockerIgnore | None = None) -> list[tuple[str, int]]:
    """``(path, size)`` of every file ``pack_release`` would pack from ``root``, sorted by path."""
    root = os.path.abspath(os.fspath(root))
    files = _release_files(root, include, exclude, skip="", dockerignore=dockerignore)
    return [(rel, os.path.getsize(os.path.join(root, *rel.split("/")))) for rel in files]


def dependency_fingerprint(project: str | os.PathLike[str]) -> dict[str, Any]:
    """What an image's dependencies were installed from, as found in ``project``.

    ``{"sha256": <of all below>, "files": {name: sha256}}`` over the files
    ``requirements*.txt``, ``uv.lock`` and ``poetry.lock`` and, for
    ``pyproject.toml``, its dependency tables only (``[build-system]
    requires``, ``[project] dependencies`` and ``optional-dependencies``,
    ``[dependency-groups]``, ``[tool.poetry] dependencies`` and ``group``),
    so that other settings in it can change freely.  Recorded in
    ``current.json`` when a machine of a new image boots; ``hot --direct``
    compares its own tree's against it.
    """
    import tomllib

    files: dict[str, str] = {}
    try:
        names = sorted(os.listdir(project))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(project, name)
        if not os.path.isfile(path):
            continue
        try:
            if _DEPENDENCY_FILE_RE.fullmatch(name):
                files[name] = _file_digest(path, "sha256")
            elif name == "pyproject.toml":
                with open(path, "rb") as handle:
                    doc = tomllib.load(handle)
                tables = {}
                for keys in _PYPROJECT_DEPENDENCY_KEYS:
                    value: Any = doc
                    for key in keys:
                        value = value.get(key) if isinstance(value, dict) else None
                    if value is not None:
                        tables[".".join(keys)] = value
                files[name] = hashlib.sha256(json.dumps(tables, sort_keys=True, default=str).encode()).hexdigest()
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            files[name] = f"unreadable: {exc}"
    return {"sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(), "files": files}


def dependency_changes(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """The dependency files that differ between two ``dependency_fingerprint`` results."""
    old, new = recorded.get("files") or {}, here.get("files") or {}
    return [f"{name} ({'added' if name not in old else 'removed' if name not in new else 'changed'})"
            for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]



@dataclasses.dataclass(frozen=True)
class LocalTree:
    """A release packed from a developer's tree rather than from an image: the
    ``.dockerignore`` rules it is packed with, and the git checkout it is
    (``git_commit`` and ``git_dirty`` are None when it is none)."""

    dockerignore: DockerIgnore | None = None
    git_commit: str | None = None
    git_dirty: bool | None = None

    def record(self) -> dict[str, Any]:
        """The ``local_tree`` field of the manifest and of the ``hot_upgrade`` record."""
        return {"git_commit": self.git_commit, "git_dirty": self.git_dirty}

@contextlib.contextmanager
def _pack_read_errors(rel: str) -> Iterator[None]:
    """Re-raise a failure to read the file ``rel`` being packed as a ReleaseError naming it."""
    try:
        yield
    except OSError as err:
        raise ReleaseError(f"cannot read {rel} ({err.strerror}): fix its permissions, or "
                           "leave it out with exclude", member=rel) from None


def _over_limit(what: str, leave_out: str, *, member: str | None = None) -> ReleaseError:
    return ReleaseError(f"the release would hold {what} limit every machine enforces (a larger release is "
                        f"refused as a possible decompression bomb); nothing was uploaded. Leave {leave_out} out "
                        "with [tool.flydeploy] exclude, or ship them in the image", member=member)


def _changed_while_packing(rel: str) -> ReleaseError:
    return ReleaseError(f"{rel} changed while it was being packed; pack again once nothing "
                        "writes to the tree", member=rel)


class _HashingWriter:
    """The write side of the release tarball at ``path``, hashing what goes through it;
    a failed write (a full disk) is a ``ReleaseError`` that says where to make room."""

    def __init__(self, raw: BinaryIO, path: str) -> None:
        self._raw = raw
        self._path = path
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        with self._write_errors():
            return self._raw.write(data)

    def flush(self) -> None:
        with self._write_errors():
            self._raw.flush()

    @contextlib.contextmanager
    def _write_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            folder, scratch = os.path.dirname(self._path), tempfile.gettempdir()
            where = (f"{scratch}, or point TMPDIR at a folder with room (packing writes there)"
                     if _is_under(folder, scratch) else folder)
            raise ReleaseError(f"cannot write the release tarball {self._path} ({exc.strerror}): "
                               f"make room in {where}") from None


class _PackedFileReader:
    """Reads a file being packed, hashing it and refusing it if it shrank since pass 1."""

    def __init__(self, raw: BinaryIO, rel: str, size: int) -> None:
        self._raw, self._rel, self._left = raw, rel, size
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        with _pack_read_errors(self._rel):
            data = self._raw.read(size)
        if len(data) < (self._left if size < 0 else min(size, self._left)):
            raise _changed_while_packing(self._rel)  # ended early: it shrank
        self._left -= len(data)
        self.digest.update(data)
        return data


def _member_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a release member, or None.  pack_release and
    unpack_release both ask, so a release that packs also unpacks."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # os.walk decodes undecodable file names with surrogateescape.
        return "is not valid UTF-8"
    parts = name.split("/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path"
    if "\\" in name or "\x00" in name:
        return "contains a backslash or a NUL character"
    if ".." in parts:
        return "contains '..'"
    if "" in parts or "." in parts:
        return "is not a normalised path (empty or '.' parts)"
    return None


def _check_member_name(name: str) -> None:
    if why := _member_name_problem(name):
        raise ReleaseError(f"release member {name!r} {why}; refusing the release", member=name)


def _parse_manifest(data: bytes) -> dict[str, Any]:
    def bad(why: str) -> ReleaseError:
        return ReleaseError(f"{MANIFEST_NAME} {why}; the tarball was not made by pack_release "
                            "or is damaged", member=MANIFEST_NAME)
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise bad(f"is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise bad("has no 'files' object")
    for name, digest in manifest["files"].items():
        _check_member_name(name)
        if not isinstance(digest, str) or not _SHA256_PATTERN.fullmatch(digest):
            raise bad(f"gives {name!r} a malformed sha256 {digest!r}")
    return manifest


class _BoundedReader:
    """A file reader that refuses to deliver more than ``limit`` bytes in all.

    tarfile reads headers (PAX ones can be large) before any member is seen;
    this bounds what a decompression bomb can make it read.
    """

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw, self._left = raw, limit

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if 0 <= size <= self._left + 1 else self._left + 1)
        self._left -= len(data)
        if self._left < 0:
            raise ReleaseError("release tarball decompresses to more than its size limit; "
                               "refusing a possible decompression bomb")
        return data


def unpack_release(path: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                   expected_sha256: str | None = None, max_bytes: int | None = None,
                   max_members: int | None = None) -> dict[str, Any]:
    """Check and extract a release tarball into ``dest``; return its manifest.

    The archive's sha256 is checked against ``expected_sha256`` before
    anything is extracted.  Refused, each with a ``ReleaseError`` naming the
    member: absolute paths, ``..``, links, devices and anything but regular
    files, members missing from the manifest, listed twice or whose sha256
    differs, manifest entries missing from the archive, and archives over
    ``max_bytes`` of content or ``max_members`` members (by default the limits
    ``pack_release`` checks too).  ``dest`` must not
    exist or be an empty folder; the release is extracted beside it and
    moved into place only when complete, so on any error nothing is left in
    ``dest``.
    """
    path = os.fspath(path)
    dest = os.path.abspath(os.fspath(dest))
    if not os.path.isfile(path):
        raise ReleaseError(f"release tarball {path} does not exist or is not a file; "
                           "check the path (or the download that should have written it)")
    if expected_sha256 is not None:
        actual = _file_digest(path, "sha256")
        if actual != expected_sha256.strip().lower():
            raise ReleaseError(f"release {path} has sha256 {actual}, not the expected "
                               f"{expected_sha256}: the download is damaged or not this release; "
                               "fetch it again")
    if os.path.lexists(dest) and (not os.path.isdir(dest) or os.path.islink(dest) or os.listdir(dest)):
        raise ReleaseError(f"cannot unpack into {dest}: it exists and is not an empty folder; "
                           "pass a new folder")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(dest)}.unpack-")
    try:
        manifest = _extract_release(path, staging, _MAX_RELEASE_BYTES if max_bytes is None else max_bytes,
                                    _MAX_RELEASE_MEMBERS if max_members is None else max_members)
        os.chmod(staging, 0o755)
        os.rename(staging, dest)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _read_manifest_member(tar: tarfile.TarFile) -> dict[str, Any]:
    """The manifest of a release, from the tarball's first member (it must be there)."""
    first = tar.next()
    if first is None or first.name != MANIFEST_NAME or not first.isreg():
        raise ReleaseError(f"release tarball starts with {first.name if first else 'nothing'!r}, "
                           f"not {MANIFEST_NAME}: it was not made by pack_release",
                           member=first.name if first else None)
    if first.size > _MAX_MANIFEST_BYTES:
        raise ReleaseError(f"{MANIFEST_NAME} is {first.size} bytes, over the "
                           f"{_MAX_MANIFEST_BYTES}-byte limit; refusing the release", member=MANIFEST_NAME)
    return _parse_manifest(tar.extractfile(first).read())


def _extract_release(path: str, into: str, max_bytes: int, max_members: int) -> dict[str, Any]:
    header_allowance = (max_members + 1) * 3 * tarfile.BLOCKSIZE + _MAX_MANIFEST_BYTES
    last = None
    try:
        with gzip.open(path, "rb") as gz, \
                tarfile.open(fileobj=_BoundedReader(gz, max_bytes + header_allowance), mode="r|") as tar:
            manifest = _read_manifest_member(tar)
            expected: dict[str, str] = manifest["files"]
            seen: set[str] = set()
            total = 0
            last = MANIFEST_NAME
            while (member := tar.next()) is not None:
                name = last = member.name
                _check_member_name(name)
                if len(seen) + 1 > max_members:
                    raise ReleaseError(f"release has more than {max_members} members (at {name!r}); "
                                       "refusing a possible decompression bomb", member=name)
                if not member.isreg() or member.issparse():
                    kind = ("a link" if member.islnk() or member.issym() else
                            "a device" if member.ischr() or member.isblk() else
                            "a folder entry" if member.isdir() else "not a regular file")
                    raise ReleaseError(f"release member {name!r} is {kind}; releases hold regular "
                                       "files only", member=name)
                if name in seen or name == MANIFEST_NAME:
                    raise ReleaseError(f"release member {name!r} appears twice", member=name)
                if name not in expected:
                    raise ReleaseError(f"release member {name!r} is not listed in {MANIFEST_NAME}",
                                       member=name)
                total += member.size
                if total > max_bytes:
                    raise ReleaseError(f"release content exceeds {max_bytes} bytes at {name!r}; "
                                       "refusing a possible decompression bomb", member=name)
                digest = _write_member(tar.extractfile(member), into, name, member.mode)
                if digest != expected[name]:
                    raise ReleaseError(f"release member {name!r} has sha256 {digest}, but "
                                       f"{MANIFEST_NAME} says {expected[name]}", member=name)
                seen.add(name)
    except ReleaseError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        where = f" after member {last!r}" if last else ""
        raise ReleaseError(f"release tarball {path} is damaged{where} ({err}); "
                           "fetch it again or pack it again", member=last) from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise ReleaseError(f"release member {missing[0]!r} is listed in {MANIFEST_NAME} but "
                           f"missing from the archive ({len(missing)} missing)", member=missing[0])
    return manifest


def _write_member(src: BinaryIO, into: str, name: str, mode: int) -> str:
    """Write one member below ``into`` (never through a link); return its sha256."""
    target = os.path.join(into, *name.split("/"))
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                     0o755 if mode & 0o111 else 0o644)
    except (FileExistsError, NotADirectoryError) as err:
        raise ReleaseError(f"release member {name!r} collides with another member "
                           f"({err.strerror})", member=name) from None
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(_IO_CHUNK):
            digest.update(chunk)
            with _local_file_errors(target):  # only the writes: read errors mean a damaged archive
                out.write(chunk)
    return digest.hexdigest()


# --- current.json metadata --------------------------------------------------

HISTORY_LIMIT = 20
# Conditional read-modify-write attempts before giving up on a hot object.
_CAS_ATTEMPTS = 12


def _current_key(app: str) -> str:
    return f"releases/{_check_name('app', app)}-current.json"


def _json_body(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _backoff(attempt: int) -> None:
    # Jittered so that writers that collided do not collide again in step.
    time.sleep(_backoff_delay(attempt, base=0.005, cap=0.5))


def _require_etag(etag: str | None, key: str) -> str:
    """``etag`` if the server gave one; a conditional write needs it (an empty condition
    would make it unconditional), so its absence is an error, never a silent pass."""
    if not etag:
        raise S3Error(f"the storage server gave no ETag for {key}, so it cannot be changed "
                      "safely (conditionally); use an S3 server that returns ETags (Tigris, "
                      "AWS S3, SeaweedFS and MinIO do)", code="MissingETag", key=key)
    return etag


def read_current(store: Store, app: str, *,
                 if_none_match: str | None = None) -> tuple[dict[str, Any] | None, str | None] | None:
    """Return ``(current.json, ETag)`` of ``app``, or ``(None, None)`` when there is none.

    ``store`` is an ``S3`` or a ``LocalStore``.  With ``if_none_match`` (an
    ETag read before) the read is conditional: None while it is unchanged.
    """
    key = _current_key(app)
    try:
        got = store.get_json(key, if_none_match=if_none_match)
    except NotFound:
        return None, None
    if got is None:
        return None
    doc, etag = got
    if not isinstance(doc, dict):
        raise ReleaseError(f"{key} holds {type(doc).__name__}, not a JSON object; fix it, or "
                           "write a fresh one with reset_current (a cold deploy does)")
    return doc, etag


def update_current(store: Store, app: str,
                   change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
    """Apply ``change`` to ``current.json`` atomically; return the document written.

    ``change`` receives the current document (None when there is none) and
    returns the new one.  The write is conditional on the ETag read
    (``If-None-Match: *`` when there was none) and is retried from a fresh
    read when another writer got in first, so no concurrent update is lost;
    ``ConflictError`` when every attempt lost.  A document the server gives
    no ETag for raises ``S3Error`` code ``MissingETag`` instead of being
    overwritten unconditionally.
    """
    key = _current_key(app)
    for attempt in range(_CAS_ATTEMPTS):
        doc, etag = read_current(store, app)
        new = change(copy.deepcopy(doc))
        try:
            if doc is None:
                store.put(key, _json_body(new), content_type="application/json", if_none_match="*")
            else:
                store.put(key, _json_body(new), content_type="application/json",
                          if_match=_require_etag(etag, key))
            return new
        except (PreconditionFailed, NotFound):
            # NotFound: S3 answers If-Match on a key deleted meanwhile with 404.
            _backoff(attempt)
    raise ConflictError(f"{key} kept changing under us ({_CAS_ATTEMPTS} conditional writes lost "
                        "the race): other deploys are writing it; wait for them and retry")


def _check_hot_upgrade(hot_upgrade: object) -> dict[str, Any]:
    # A bad record is the caller's programming error: TypeError / ValueError.
    if not isinstance(hot_upgrade, dict):
        raise TypeError(f"a hot upgrade record is a dict (Release.hot_upgrade_record gives "
                        f"one), not {type(hot_upgrade).__name__}")
    missing = [f for f in ("version", "tarball_url", "sha256") if not hot_upgrade.get(f)]
    if missing:
        raise ValueError(f"hot upgrade record lacks {', '.join(missing)}; build it with "
                         "Release.hot_upgrade_record")
    if not _SHA256_PATTERN.fullmatch(str(hot_upgrade["sha256"])):
        raise ValueError(f"hot upgrade record has a malformed sha256 {hot_upgrade['sha256']!r}; "
                         "expected 64 lowercase hex digits")
    record = {"source_image_ref": None, **hot_upgrade}
    record.setdefault("deployed_at", _iso_utc(_utc_now()))
    return record


def _fresh_current(image_ref: str | None, dependencies: Mapping[str, Any] | None = None) -> dict[str, Any]:
    doc = {"image_ref": image_ref, "set_at": _iso_utc(_utc_now()), "hot_upgrade": None, "history": []}
    if dependencies is not None:  # what the image's dependencies came from (dependency_fingerprint)
        doc["dependencies"] = dict(dependencies)
    return doc


def record_hot_upgrade(store: Store, app: str, hot_upgrade: dict[str, Any], *,
                       image_ref: str | None = None) -> dict[str, Any]:
    """Make ``hot_upgrade`` the app's current hot upgrade; return the new ``current.json``.

    The previous hot upgrade moves to the front of ``history`` (at most
    ``HISTORY_LIMIT`` kept).  ``image_ref`` is the image the machines run:
    it seeds a missing document, and when it differs from the recorded one
    (a cold deploy nobody recorded) the document starts afresh for it, since
    the old history belongs to another image.  Safe against concurrent
    writers (see ``update_current``).
    """
    record = _check_hot_upgrade(hot_upgrade)

    def change(doc: dict[str, Any] | None) -> dict[str, Any]:
        if doc is None or (image_ref is not None and doc.get("image_ref") != image_ref):
            doc = _fresh_current(image_ref)
        elif doc.get("hot_upgrade") == record:
            return doc  # already recorded (a write whose reply was lost): not history
        previous = doc.get("hot_upgrade")
        history = [h for h in doc.get("history") or [] if isinstance(h, dict)]
        if previous:
            history.insert(0, previous)
        doc["hot_upgrade"] = record
        doc["history"] = history[:HISTORY_LIMIT]
        return doc

    return update_current(store, app, change)


def reset_current(store: Store, app: str, image_ref: str) -> dict[str, Any]:
    """Start ``current.json`` afresh for a new image (after a cold deploy); return it.

    No hot upgrade is current and the history is emptied: the releases in
    it were hot upgrades of another image.
    """
    return update_current(store, app, lambda _doc: _fresh_current(image_ref))


# --- Deploy lock ------------------------------------------------------------


def _lock_key(app: str) -> str:
    return f"releases/{_check_name('app', app)}-deploy.lock"


def _parse_time(value: object) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def _describe_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LockHeld(FlyDeployError):
    """Another deploy holds the app's deploy lock.

    ``owner``, ``deployment_id``, ``locked_at``, ``expires_at`` describe the
    holder; ``remaining_s`` is how long until the lock expires.
    """

    def __init__(self, app: str, holder: dict[str, Any], *, now: datetime.datetime) -> None:
        self.app = app
        self.owner = holder.get("locked_by")
        self.deployment_id = holder.get("deployment_id")
        self.locked_at = holder.get("locked_at")
        self.expires_at = holder.get("expires_at")
        expires = _parse_time(self.expires_at)
        self.remaining_s = max(0.0, (expires - now).total_seconds()) if expires else 0.0
        super().__init__(
            f"the deploy lock of app {app!r} is held by {self.owner!r} "
            f"(deployment {self.deployment_id!r}) since {self.locked_at}; it expires in "
            f"{_describe_duration(self.remaining_s)} (at {self.expires_at}). Wait for that "
            "deploy to finish, or take the lock over with --force if it is dead")


@dataclasses.dataclass
class Lock:
    """A held deploy lock; ``release()`` (or leaving a ``with`` block) gives it back."""

    store: Store = dataclasses.field(repr=False)
    app: str
    owner: str
    deployment_id: str
    locked_at: str
    expires_at: str
    etag: str

    def release(self) -> bool:
        """Remove the lock if it is still this one; return whether it was removed.

        A lock that was taken over by another deploy (expired, or forced) is
        left alone and False returned, with a warning.  A delete whose reply
        was lost is retried, and the retry is refused although the first try
        landed; that is recognised, not reported as a takeover: the lock is
        then gone, or held by another deployment that took it after this
        release began.
        """
        key = _lock_key(self.app)
        # Millisecond precision, as locked_at is written.
        started = _parse_time(_iso_utc(_utc_now()))
        try:
            self.store.delete(key, if_match=self.etag)
            return True
        except (PreconditionFailed, NotFound):
            holder, _ = _read_lock(self.store, key)
        if holder is None:
            return True  # our delete landed (or someone removed the lock): it is gone
        if holder.get("deployment_id") != self.deployment_id:
            taken = _parse_time(holder.get("locked_at"))
            if taken is not None and started is not None and taken >= started:
                return True  # our delete landed, and another deploy took the lock since
            log.warning("deploy lock of %s was taken over by %r (deployment %r); left as is",
                        self.app, holder.get("locked_by"), holder.get("deployment_id"))
        else:
            log.warning("deploy lock of %s is still this deployment's (%s) but was rewritten "
                        "since it was taken (renewed elsewhere?); left in place", self.app,
                        self.deployment_id)
        return False

    def renew(self, timeout_s: float = 300) -> None:
        """Push the expiry to ``timeout_s`` from now; raise ``LockHeld`` if the lock was lost."""
        now = _utc_now()
        body = {"locked_by": self.owner, "locked_at": self.locked_at,
                "expires_at": _iso_utc(now + datetime.timedelta(seconds=timeout_s)),
                "deployment_id": self.deployment_id}
        key = _lock_key(self.app)
        try:
            self.etag = _require_etag(self.store.put(key, _json_body(body),
                                                     content_type="application/json",
                                                     if_match=self.etag), key)
        except (PreconditionFailed, NotFound):
            holder, _ = _read_lock(self.store, _lock_key(self.app))
            raise LockHeld(self.app, holder or {}, now=now) from None
        self.expires_at = body["expires_at"]

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_lock(store: Store, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """Return ``(lock document, ETag)``, ``({}, ETag)`` if unreadable, ``(None, None)`` if absent."""
    try:
        doc, etag = store.get_json(key)
    except NotFound:
        return None, None
    except (ValueError, S3Error) as err:
        if isinstance(err, S3Error) and err.code != "InvalidJSON":
            raise
        head = store.head(key)  # a damaged lock: only its ETag is of use
        return ({}, head["etag"]) if head else (None, None)
    return (doc if isinstance(doc, dict) else {}), etag


def acquire_lock(store: Store, app: str, *, owner: str, deployment_id: str,
                 timeout_s: float = 300, force: bool = False) -> Lock:
    """Take the deploy lock of ``app`` for ``timeout_s`` seconds; return the ``Lock``.

    The lock object is created with ``If-None-Match: *``.  A lock past its
    ``expires_at`` (or unreadable) is taken over conditionally on its ETag,
    and ``force`` takes over a live one the same way, so of two deployers
    racing exactly one holds the lock.  A live lock raises ``LockHeld``
    naming its owner, when it was taken and how long is left.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r}: a deploy lock must last a positive number "
                         "of seconds (e.g. 300)")
    key = _lock_key(app)
    start = _utc_now()
    # One body for every attempt, so that a write of ours that landed while
    # its reply was lost is recognised as ours when read back.
    body = {"locked_by": owner, "locked_at": _iso_utc(start),
            "expires_at": _iso_utc(start + datetime.timedelta(seconds=timeout_s)),
            "deployment_id": deployment_id}

    def held(etag: str) -> Lock:
        return Lock(store, app, owner, deployment_id, body["locked_at"], body["expires_at"], etag)

    for attempt in range(_CAS_ATTEMPTS):
        now = _utc_now()
        try:
            return held(_require_etag(store.put(key, _json_body(body),
                                                content_type="application/json",
                                                if_none_match="*"), key))
        except PreconditionFailed:
            pass
        holder, etag = _read_lock(store, key)
        if holder is None:
            continue  # released between our write and our read: try again
        etag = _require_etag(etag, key)
        if holder == body:
            return held(etag)  # our write landed, but its reply was lost and the retry refused
        expires = _parse_time(holder.get("expires_at"))
        if not (force or expires is None or expires <= now):
            raise LockHeld(app, holder, now=now)
        log.warning("taking over the deploy lock of %s held by %r since %s (%s)", app,
                    holder.get("locked_by"), holder.get("locked_at"),
                    "forced" if force else "expired")
        try:
            return held(_require_etag(store.put(key, _json_body(body),
                                                content_type="application/json",
                                                if_match=etag), key))
        except (PreconditionFailed, NotFound):
            _backoff(attempt)  # someone else took it over first: look again
    raise ConflictError(f"could not take the deploy lock of {app!r}: {key} kept changing "
                         f"({_CAS_ATTEMPTS} attempts); another deploy is fighting for it, retry later")


# ===========================================================================
# 3. Machines API: Fly Machines client, fleet orchestration
# ===========================================================================


# --- Machines API client ----------------------------------------------------

_DEFAULT_FLAPS_BASE_URL = "https://api.machines.dev"
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
_FLAPS_RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
# Exec requests to one machine: the Machines API allows "1 request, per second, per
# action" with "a short-term burst limit up to 3 req/s" (docs: working-with-machines-api,
# rate limits).  The margin keeps network jitter from making two arrive closer than that;
# a stricter limit answers 429, which an exec retries (it did not start the command).
_EXEC_INTERVAL = 1.1
_EXEC_BURST = 3
# The longest an exec is asked to run, in seconds.  Past about 30 s the API answers
# 408 deadline_exceeded while the command goes on running (fly-platform-facts M5), so
# every machine-side command is short: long work runs detached and reports to S3.
EXEC_DEADLINE_S = 25
# How long the exec that starts a detached upgrade waits for its result (handed over by
# the job), so that it brings it back and nothing needs collecting: well within the deadline.
_DETACHED_WAIT_S = 10.0
# init runs an exec's argv directly: a program that does not exist is an API error
# (init exec.rs spawns with `.output().await.map_err(...)`), not exit status 127.
_MISSING_PROGRAM_RE = re.compile(r"no such file|ENOENT|executable file not found|not found in \$PATH",
                                 re.IGNORECASE)


class MachinesAPIError(FlyDeployError):
    """A Machines API request failed.

    ``status`` is the HTTP status (0 when no reply came), ``message`` the
    server's own error text (``{"error": ...}`` or ``{"message": ...}``);
    ``method`` and ``path`` name the request.  Tokens never appear here.
    """

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        self.status = status
        self.message = message
        self.method = method
        self.path = path
        where = f" ({method} {path})" if method else ""
        head = f"Machines API error {status}" if status else "Machines API unreachable"
        super().__init__(f"{head}{where}: {message}{_machines_error_hint(status)}")


def missing_program(exc: MachinesAPIError) -> bool:
    """Whether an exec failed because its program (``argv[0]``) does not exist on the machine."""
    return exc.status != 0 and bool(_MISSING_PROGRAM_RE.search(exc.message))


def _machines_error_hint(status: int) -> str:
    if status in (401, 403):
        return ("; check that FLY_API_TOKEN (or FLYDEPLOY_API_TOKEN) holds a valid token for this"
                " app, e.g. from `fly tokens create deploy`")
    if status == 404:
        return "; check the app name and the machine id (`fly machines list`)"
    if status == 0:
        return "; check the network and FLY_FLAPS_BASE_URL"
    return ""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What a command run through the Machines API exec endpoint returned."""

    exit_code: int = 0
    exit_signal: int = 0
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0 and no signal."""
        return self.exit_code == 0 and self.exit_signal == 0


def authorization_header(token: str) -> str:
    """The ``Authorization`` value for a Fly API token.

    Macaroon tokens (``fm1r_``, ``fm1a_``, ``fm2_``) use the ``FlyV1``
    scheme, any other token ``Bearer``; whatever scheme was pasted in front
    of the token (``FlyV1 ...``, ``Bearer ...``) is replaced.
    """
    value = token.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() in ("flyv1", "bearer"):
        value = rest.strip()
    if not value:
        raise ConfigError("the Fly API token is empty: set FLY_API_TOKEN "
                          "(e.g. from `fly tokens create deploy`)")
    if value.startswith(_MACAROON_PREFIXES):
        return f"FlyV1 {value}"
    return f"Bearer {value}"


class _Pacer:
    """Spaces out events per key as a token bucket does: up to ``burst`` at
    once, then one per ``interval`` seconds.

    Each caller reserves its own slot under the lock and sleeps outside it,
    so callers on different keys never wait for one another.
    """

    def __init__(self, interval: float, burst: int = 1) -> None:
        self._interval = interval
        self._burst = burst
        self._next: dict[object, float] = {}  # per key: when the bucket would be full again, less one
        self._lock = threading.Lock()

    def reserve(self, key: object, now: float) -> float:
        """The time (on ``now``'s clock) at which the next event for ``key`` may happen."""
        with self._lock:
            due = max(now, self._next.get(key, now))
            self._next[key] = due + self._interval
            return max(now, due - (self._burst - 1) * self._interval)

    def wait(self, key: object) -> None:
        now = time.monotonic()
        slot = self.reserve(key, now)
        if slot > now:
            time.sleep(slot - now)


# One pacer for the process: two clients of the same app share the limit.
_EXEC_PACER = _Pacer(_EXEC_INTERVAL, _EXEC_BURST)


def _api_error_text(body: bytes, reason: str) -> str:
    """The server's own error text from a Machines API error body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:500] or reason
    if isinstance(payload, dict):
        for field in ("error", "message"):
            if isinstance(payload.get(field), str) and payload[field]:
                return payload[field]
    return text[:500] or reason


class Machines:
    """A client of the Fly Machines API for one app.

    ``token`` is a Fly API token (deploy, org or machine-exec); ``base_url``
    defaults to ``FLY_FLAPS_BASE_URL``, else ``https://api.machines.dev``.
    Connection errors, 408, 429 and 5xx are retried ``retries`` times with
    exponential backoff from ``backoff`` seconds, honouring ``Retry-After``
    (a wait of more than a minute is not waited out: the error is raised).
    Exec requests are paced to one per second per machine.  Thread-safe.
    """

    def __init__(self, app: str, token: str, *, base_url: str | None = None,
                 retries: int = 4, backoff: float = 0.5, request_timeout: float = 30.0) -> None:
        if not app:
            raise ConfigError("no Fly app name: pass --app or set FLY_APP_NAME")
        self.app = app
        self._authorization = authorization_header(token)
        self._secret = self._authorization.split(" ", 1)[1]
        base = (base_url or os.environ.get("FLY_FLAPS_BASE_URL") or _DEFAULT_FLAPS_BASE_URL).rstrip("/")
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"FLY_FLAPS_BASE_URL {base!r} is not an http(s) URL; "
                              f"unset it to use {_DEFAULT_FLAPS_BASE_URL}")
        self.base_url = base
        self._parts = parts
        self._retries = retries
        self._backoff = backoff
        self._request_timeout = request_timeout
        self._ssl_context = ssl.create_default_context() if parts.scheme == "https" else None

    # An exec past EXEC_DEADLINE_S is cut off by the API: upgrades run detached.
    runs_detached = True

    def __repr__(self) -> str:
        return f"Machines(app={self.app!r}, base_url={self.base_url!r})"

    # The public calls -----------------------------------------------------

    def list(self, *, state: str | Iterable[str] | None = None, include_deleted: bool = False,
             metadata: Mapping[str, str] | None = None, region: str | None = None) -> list[dict]:
        """The app's machines as Machine JSON objects, filtered.

        ``state`` is one state or several (``"started"``, ``["stopped",
        "suspended"]``); ``metadata`` keeps machines whose
        ``config.metadata`` has every given key/value.  The filters are sent
        to the server and applied again here, so an older server that
        ignores them gives the same answer.
        """
        states = [state] if isinstance(state, str) else list(state or [])
        query: list[tuple[str, str]] = []
        if include_deleted:
            query.append(("include_deleted", "true"))
        if region:
            query.append(("region", region))
        if states:
            query.append(("state", ",".join(states)))
        for key, value in (metadata or {}).items():
            query.append((f"metadata.{key}", str(value)))
        machines = self._call("GET", f"/apps/{self._quoted_app()}/machines", query=query)
        if not isinstance(machines, list):
            raise MachinesAPIError(200, "the machine list is not a JSON array",
                                   method="GET", path=f"/v1/apps/{self.app}/machines")
        return [m for m in machines if isinstance(m, dict)
                and _machine_matches(m, states, include_deleted, metadata or {}, region)]

    def get(self, machine_id: str) -> dict:
        """One machine's Machine JSON."""
        return self._call("GET", self._machine_path(machine_id))

    def exec(self, machine_id: str, command: Sequence[str], *, timeout: int = EXEC_DEADLINE_S,
             idempotent: bool = True) -> ExecResult:
        """Run ``command`` (an argv list) on a machine and return its result.

        The command runs as root in ``/``, without a shell.  ``timeout`` is
        how many seconds it may run, at most ``EXEC_DEADLINE_S`` (the API
        answers 408 past about 30 s and the command goes on running).  A
        command that fails is a result with a non-zero ``exit_code``, not an
        error; errors are for requests the API refused or never answered.  A
        program that does not exist is such an error (``missing_program``)
        and is not retried.  Unless ``idempotent``, a request that may have
        started the command (408, 5xx, a lost reply) is not sent again.
        The argv goes both as ``command`` and as the deprecated ``cmd``
        string that flyctl sends: an exec token's command restriction then
        matches whichever of the two the API checks.  Requests to one machine
        leave three at once, then one a second (``_EXEC_BURST``); requests to
        different machines do not wait for each other.
        """
        if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
            raise FlyDeployError(f"exec takes a non-empty list of argument strings, got {command!r}; "
                                 'e.g. ["python3", "/app/flydeploy.py", "rpc", "info"]')
        timeout = max(1, min(int(timeout), EXEC_DEADLINE_S))
        payload = self._call("POST", self._machine_path(machine_id) + "/exec",
                             body={"command": list(command), "cmd": shlex.join(command), "timeout": timeout},
                             timeout=timeout + self._request_timeout,
                             pace=(self.base_url, self.app, machine_id),
                             retry_statuses=_FLAPS_RETRYABLE_STATUSES if idempotent else frozenset({429}),
                             resend=idempotent, final=_MISSING_PROGRAM_RE)
        if isinstance(payload, (bytes, str)):
            # Older API versions answer with the raw output bytes.
            text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
            return ExecResult(stdout=text)
        return ExecResult(exit_code=int(payload.get("exit_code") or 0),
                          exit_signal=int(payload.get("exit_signal") or 0),
                          stdout=payload.get("stdout") or "",
                          stderr=payload.get("stderr") or "")

    def wait(self, machine_id: str, state: str = "started", *, timeout: int = 60,
             instance_id: str | None = None) -> dict:
        """Block until the machine reaches ``state`` (at most ``timeout`` s).

        Raises ``MachinesAPIError`` with status 408 when the state was not
        reached in time; that one is not retried.
        """
        query = [("state", state), ("timeout", str(int(timeout)))]
        if instance_id:
            query.append(("instance_id", instance_id))
        return self._call("GET", self._machine_path(machine_id) + "/wait", query=query,
                          timeout=timeout + self._request_timeout, retry_statuses=_FLAPS_RETRYABLE_STATUSES - {408})

    def start(self, machine_id: str, *, lease_nonce: str | None = None) -> dict:
        """Start a stopped (or resume a suspended) machine."""
        return self._call("POST", self._machine_path(machine_id) + "/start", lease_nonce=lease_nonce)

    def stop(self, machine_id: str, *, signal: str | None = None, timeout: int | None = None,
             lease_nonce: str | None = None) -> dict:
        """Stop a machine, optionally with a signal and a grace period in seconds."""
        body: dict[str, object] = {}
        if signal:
            body["signal"] = signal
        if timeout is not None:
            body["timeout"] = f"{int(timeout)}s"
        return self._call("POST", self._machine_path(machine_id) + "/stop", body=body,
                          lease_nonce=lease_nonce)

    def restart(self, machine_id: str, *, timeout: int | None = None, lease_nonce: str | None = None) -> dict:
        """Restart a machine: its processes are stopped and started again, from its image
        (``POST /v1/apps/{app_name}/machines/{machine_id}/restart``, ``Machines_restart`` in
        the Machines API spec; ``timeout``, in seconds, goes as its query parameter)."""
        return self._call("POST", self._machine_path(machine_id) + "/restart",
                          query=[("timeout", str(int(timeout)))] if timeout is not None else (),
                          lease_nonce=lease_nonce)

    def create(self, config: Mapping[str, Any], *, region: str | None = None, name: str | None = None) -> dict:
        """Create and start a machine from ``config`` (the Machines API ``MachineConfig``)."""
        body: dict[str, Any] = {"config": dict(config)}
        if region:
            body["region"] = region
        if name:
            body["name"] = name
        return self._call("POST", f"/apps/{self._quoted_app()}/machines", body=body,
                          retry_statuses=_FLAPS_RETRYABLE_STATUSES - {408}, resend=False)

    def destroy(self, machine_id: str, *, force: bool = False) -> None:
        """Destroy a machine; ``force`` also a running one.  One already gone is no error."""
        try:
            self._call("DELETE", self._machine_path(machine_id),
                       query=[("force", "true")] if force else ())
        except MachinesAPIError as exc:
            if exc.status != 404:
                raise

    def get_lease(self, machine_id: str) -> dict:
        """The machine's current lease (``nonce``, ``owner``, ``expires_at`` ...)."""
        return _lease_data(self._call("GET", self._machine_path(machine_id) + "/lease"))

    def acquire_lease(self, machine_id: str, *, ttl: int = 30, description: str = "") -> dict:
        """Take the machine's lease for ``ttl`` seconds; returns it with its ``nonce``."""
        return _lease_data(self._call("POST", self._machine_path(machine_id) + "/lease",
                                      body={"ttl": int(ttl), "description": description}))

    def release_lease(self, machine_id: str, nonce: str) -> None:
        """Give back a lease taken with ``acquire_lease``."""
        self._call("DELETE", self._machine_path(machine_id) + "/lease", lease_nonce=nonce)

    # The transport ---------------------------------------------------------

    def _quoted_app(self) -> str:
        return urllib.parse.quote(self.app, safe="")

    def _machine_path(self, machine_id: str) -> str:
        if not machine_id:
            raise FlyDeployError("no machine id given; `fly machines list` shows them")
        return f"/apps/{self._quoted_app()}/machines/{urllib.parse.quote(machine_id, safe='')}"

    def _redact(self, text: str) -> str:
        # A token can be several comma-separated macaroons; any one of them is secret.
        for secret in sorted(self._secret.split(","), key=len, reverse=True):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def _call(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
              body: object = None, timeout: float | None = None, pace: object = None,
              lease_nonce: str | None = None,
              retry_statuses: frozenset[int] = _FLAPS_RETRYABLE_STATUSES, resend: bool = True,
              final: re.Pattern[str] | None = None) -> object:
        """One API call with retries; returns the decoded JSON (or raw bytes).

        Without ``resend`` a request whose reply was lost is not sent again (it
        may have been carried out); an error whose text matches ``final`` is
        never retried.
        """
        prefix = self._parts.path.rstrip("/")
        full_path = f"{prefix}/v1{path}"
        target = full_path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Authorization": self._authorization, "Accept": "application/json",
                   "User-Agent": f"flydeploy/{__version__}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if lease_nonce:
            headers["fly-machine-lease-nonce"] = lease_nonce
        shown_path = f"/v1{path}"
        attempt = 0
        while True:
            if pace is not None:
                _EXEC_PACER.wait(pace)
            last_try = attempt >= self._retries
            try:
                status, reason, reply_headers, reply = self._send(
                    method, target, headers, data, timeout or self._request_timeout)
            except ssl.SSLCertVerificationError as exc:
                raise MachinesAPIError(0, f"the TLS certificate of {self.base_url} could not be "
                                          f"verified ({exc.verify_message}): fix FLY_FLAPS_BASE_URL "
                                          "or the system's CA certificates",
                                       method=method, path=shown_path) from None
            except (OSError, http.client.HTTPException) as exc:
                if last_try or not resend:
                    raise MachinesAPIError(0, self._redact(f"no reply from {self.base_url} after "
                                                           f"{attempt + 1} attempts: {exc!r}"),
                                           method=method, path=shown_path) from None
                log.info("Machines API %s %s: %r, retrying", method, shown_path, exc)
                retry_after = None
            else:
                if 200 <= status < 300:
                    return _decode_reply(reply, reply_headers.get("Content-Type", ""))
                message = self._redact(_api_error_text(reply, reason))
                retry_after = _retry_after_seconds(reply_headers.get("Retry-After"))
                if (last_try or status not in retry_statuses or (final and final.search(message))
                        or (retry_after is not None and retry_after > _MAX_RETRY_AFTER)):
                    raise MachinesAPIError(status, message, method=method, path=shown_path)
                log.info("Machines API %s %s: %d %s, retrying", method, shown_path, status, message)
            time.sleep(_backoff_delay(attempt, base=self._backoff, cap=10.0, floor=0.5,
                                      retry_after=retry_after))
            attempt += 1

    def _send(self, method: str, target: str, headers: Mapping[str, str], data: bytes | None,
              timeout: float) -> tuple[int, str, http.client.HTTPMessage, bytes]:
        host, port = self._parts.hostname, self._parts.port
        if self._ssl_context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._ssl_context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request(method, target, body=data, headers=dict(headers))
            response = conn.getresponse()
            return response.status, response.reason, response.headers, response.read()
        finally:
            conn.close()


def _decode_reply(reply: bytes, content_type: str) -> object:
    if not reply.strip():
        return {}
    if "json" in content_type or reply.lstrip()[:1] in (b"{", b"["):
        try:
            return json.loads(reply)
        except ValueError:
            pass
    return reply


def _lease_data(payload: object) -> dict:
    """The Lease object, whether bare (the spec) or wrapped in ``{"data": ...}`` (the live API)."""
    if isinstance(payload, dict) and isinstance(payload.get("data"), dict):
        return payload["data"]
    return payload if isinstance(payload, dict) else {}


def _machine_matches(machine: Mapping, states: Sequence[str], include_deleted: bool,
                     metadata: Mapping[str, str], region: str | None) -> bool:
    state = machine.get("state", "")
    if states and state not in states:
        return False
    if not include_deleted and not states and state == "destroyed":
        return False
    if region and machine.get("region") != region:
        return False
    have = (machine.get("config") or {}).get("metadata") or {}
    return all(have.get(key) == str(value) for key, value in metadata.items())


# --- Fleet orchestration ----------------------------------------------------

# The orchestrator tells the developer's command line that it started and how it
# ended on lines of its own: `fly machine run` only passes on "failed or not".
ORCHESTRATOR_MARKER = "__FLYDEPLOY_ORCHESTRATOR__"
# Groups fly-go reserves for its own machines (machine_types.go): never upgraded.
_INTERNAL_GROUPS = frozenset({"fly_app_release_command", "fly_app_console", "fly_app_test_machine_command"})
# Metadata of a machine that runs ``orchestrate``: its role, the run it serves
# and who launched it (``user@host:pid``), so that a later ``hot`` finds one left
# behind by a launcher that died, and an interrupted one finds its own.
ORCHESTRATOR_ROLE_KEY = "flydeploy_role"
ORCHESTRATOR_ROLE = "orchestrator"
ORCHESTRATOR_RUN_KEY = "flydeploy_run"
ORCHESTRATOR_LAUNCHER_KEY = "flydeploy_launcher"
_PENDING_STATES = frozenset({"stopped", "suspended"})
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
    "app_dir": ("name", None),
    "s3_addressing_style": ("style", None),
    # Files of the app root the image build makes (`hot --direct` needs them here too).
    "generated": ("names", ()),
    # The fleet's two phases: canaries first, what a failed apply leads to, machines that
    # may be missing, and the health check run on each machine after its apply.
    "canary": ("count", None),
    "canary_wait": ("seconds", None),
    "on_failure": ("choice", "rollback"),
    "allow_missing": ("flag", False),
    "health_check": ("url_path", None),
    "health_ports": ("ports", ()),
    "health_timeout": ("seconds", 5.0),
}
# The values a "choice" setting takes; the first is its default.
_CHOICES = {"on_failure": ("rollback", "keep")}
# Where the app lives on a machine when neither [tool.flydeploy] app_dir nor a
# Dockerfile WORKDIR says.
_DEFAULT_APP_DIR = "/app"
_WORKDIR_RE = re.compile(r"^\s*WORKDIR\s+(\S.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_FLAG_NAMES = {"process_groups": "--process-group", "build_args": "--build-arg", "health_ports": "--health-port"}
# The settings ``python -m flydeploy orchestrate`` takes as flags; the rest it
# reads from the project it runs in.
_ORCHESTRATE_FLAG_SETTINGS = ("app", "python", "app_dir", "lock_timeout", "timeout", "max_concurrency",
                              "suspend_timeout", "process_groups", "canary", "canary_wait", "on_failure",
                              "allow_missing", "health_check", "health_ports", "health_timeout")


@dataclasses.dataclass(frozen=True)
class MachineCommands:
    """The one builder of every command flydeploy runs on a machine.

    Each is ``[python, -c, BOOTSTRAP, <app_dir>, ...]``: an exec runs its argv
    directly, as root, in ``/``, with no shell and the image's PATH (init
    exec.rs), so there is no ``cd`` and no ``-m`` (``/`` does not hold the
    app).  ``BOOTSTRAP`` puts ``app_dir`` first on ``sys.path`` (and the
    working directory off it), imports flydeploy from there and runs its
    ``main`` with the words after ``app_dir``: an imported module is loaded
    from its cached bytecode, where a script (``python .../flydeploy.py``)
    would be compiled whole on every exec.  The exec token's command
    restriction is ``token_prefix``, so a token minted for these commands
    allows exactly them (the fixed program cannot run anything else).
    """

    python: str
    app_dir: str

    # No comma, quote, backslash or ``#``: flyctl reads ``--command-prefix`` as
    # comma-separated values and splits each like a shell (create.go:681-691).
    BOOTSTRAP = ("import sys; sys.path[:] = [sys.argv.pop(1)] + [p for p in sys.path if p]; "
                 "import flydeploy; sys.exit(flydeploy.main())")

    @classmethod
    def for_app_dir(cls, python: str, app_dir: str) -> MachineCommands:
        """Commands for a ``flydeploy.py`` copied into ``app_dir`` on the machines."""
        return cls(python, app_dir.rstrip("/") or "/")

    @property
    def script(self) -> str:
        """Where flydeploy.py must be on the machines."""
        return self.app_dir.rstrip("/") + "/flydeploy.py"

    def argv(self, *args: str) -> list[str]:
        """``[python, -c, BOOTSTRAP, app_dir, *args]``."""
        return [self.python, "-c", self.BOOTSTRAP, self.app_dir, *args]

    def rpc(self, command: str, app: str, *args: str) -> list[str]:
        """``... rpc <command> --app <app> ...``: what exec runs."""
        return self.argv("rpc", command, "--app", app, *args)

    def orchestrate(self, *args: str) -> list[str]:
        """``... orchestrate ...``: the orchestrator machine's main process."""
        return self.argv("orchestrate", *args)

    def token_prefix(self) -> list[str]:
        """The argv prefix a minted exec token allows: every ``rpc`` command, nothing else."""
        return self.argv("rpc")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    """The settings of one app, resolved from flags, ``pyproject.toml``, ``fly.toml`` and defaults.

    ``project_dir`` holds ``fly.toml`` and ``pyproject.toml``; ``root`` is the
    app root that is packed (``[tool.flydeploy] root``, relative to the project).
    ``env``, ``processes`` and ``build`` are ``fly.toml``'s tables as read.
    ``app_dir`` is the app's directory on the machines, where the orchestrator
    command runs: ``[tool.flydeploy] app_dir``, else the Dockerfile's last
    ``WORKDIR``, else ``/app``.  ``s3_addressing_style`` (``auto``, ``virtual``,
    ``path`` or None: then ``AWS_S3_ADDRESSING_STYLE`` decides) is how ``s3()``
    reaches the bucket; ``fly.toml`` ``[env]`` may set it as on the machines.
    ``generated`` lists files of the app root that the image build makes
    (patterns): ``hot --direct`` refuses to pack a tree that lacks one.
    ``sources`` says where each setting came from, e.g. ``"--app"``,
    ``"pyproject.toml [tool.flydeploy]"``, ``"fly.toml"`` or ``"default"``.
    The fleet's phases: ``canary`` machines take the release first and are
    watched ``canary_wait`` seconds; ``on_failure`` (``rollback`` or ``keep``)
    is what a failed apply leads to; ``allow_missing`` lets a machine that
    cannot be reached before the apply catch up at its next boot; the
    ``health_check`` path is fetched on each machine after its apply, on
    ``health_ports`` (else its services' internal ports) within ``health_timeout``.
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
    app_dir: str
    s3_addressing_style: str | None
    env: Mapping[str, str]
    processes: Mapping[str, Any]
    build: Mapping[str, Any]
    sources: Mapping[str, str]
    generated: tuple[str, ...] = ()
    canary: int | None = None
    canary_wait: float | None = None
    on_failure: str = "rollback"
    allow_missing: bool = False
    health_check: str | None = None
    health_ports: tuple[int, ...] = ()
    health_timeout: float = 5.0

    def require_app(self) -> str:
        """The app name, or a ``ConfigError`` naming every place that can provide it."""
        if not self.app:
            raise ConfigError(
                "no app name: pass --app, set `app` in fly.toml, or `app` under "
                "[tool.flydeploy] in pyproject.toml")
        return self.app

    def s3(self) -> S3:
        """The app's bucket, reached as these settings and the environment say (``S3.from_env``)."""
        return S3.from_env(bucket=self.bucket, addressing_style=self.s3_addressing_style)

    def ignore_file(self) -> tuple[pathlib.Path, str]:
        """The file the image build's ignore rules come from, and which setting named it.

        As flyctl resolves it (internal/command/deploy/deploy_build.go,
        ``resolveIgnorefilePath``): ``fly.toml`` ``[build] ignorefile`` joined
        to fly.toml's folder with Go's ``filepath.Join`` (so a leading ``/``
        stays under that folder), in place of the context's ``.dockerignore``,
        which is then not read.  flyctl applies it when it makes the build
        context itself (a Docker daemon without BuildKit); a BuildKit build
        (Depot, internal/build/imgsrc/depot.go; a daemon whose builder is
        BuildKit, dockerfile_builder.go) gets the context folder and no
        excludes, and BuildKit reads the context's ``.dockerignore``.
        """
        value = self.build.get("ignorefile")
        if value is None or value == "":
            return self.project_dir / ".dockerignore", ".dockerignore"
        if not isinstance(value, str):
            raise ConfigError(f"{self.fly_toml}: [build] ignorefile must be a path (a string), got {value!r}")
        return (pathlib.Path(os.path.normpath(f"{self.fly_toml.parent}/{value}")),
                "fly.toml [build] ignorefile")

    def dockerignore(self) -> DockerIgnore:
        """The rules the image build copies the app root with (``ignore_file``, ``DockerIgnore.for_context``)."""
        return DockerIgnore.for_context(self.project_dir, self.root, self.ignore_file()[0])

    def orchestrate_options(self) -> dict[str, Any]:
        """The keyword arguments of ``orchestrate`` these settings decide: one
        place, so that every caller runs with the same resolved settings."""
        return {"root": self.root, "include": self.include, "exclude": self.exclude,
                "lock_timeout": self.lock_timeout, "timeout": self.timeout,
                "max_concurrency": self.max_concurrency, "suspend_timeout": self.suspend_timeout,
                "process_groups": self.process_groups, "commands": self.machine_commands(),
                "canary": self.canary, "canary_wait": self.canary_wait, "on_failure": self.on_failure,
                "allow_missing": self.allow_missing, "health_check": self.health_check,
                "health_ports": self.health_ports, "health_timeout": self.health_timeout}

    def machine_commands(self) -> MachineCommands:
        """The builder of every command run on this app's machines (``python`` and ``app_dir``)."""
        return MachineCommands.for_app_dir(self.python, self.app_dir)

    def orchestrate_flags(self) -> list[str]:
        """These settings as flags of ``python -m flydeploy orchestrate``: what
        ``fleet_overrides`` reads from them gives the same settings back."""
        flags: list[str] = []
        for key in _ORCHESTRATE_FLAG_SETTINGS:
            kind, value = _SETTINGS[key][0], getattr(self, key)
            if kind in ("names", "ports"):
                flags += [part for item in value for part in (_flag_name(key), str(item))]
            elif kind == "flag":
                flags += [_flag_name(key)] if value else []
            elif value is not None:
                flags += [_flag_name(key), f"{value:g}" if kind == "seconds" else str(value)]
        return flags


def _dockerfile_workdir(project: pathlib.Path, build: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(directory, source)`` from the last ``WORKDIR`` of the app's Dockerfile
    (``fly.toml`` ``[build] dockerfile``, else ``Dockerfile``), or None."""
    dockerfile = project / str(build.get("dockerfile") or "Dockerfile")
    try:
        text = dockerfile.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = _WORKDIR_RE.findall(text)
    if not found:
        return None
    workdir = found[-1].strip("\"'")
    return workdir, f"{dockerfile.name} WORKDIR"


def _flag_name(key: str) -> str:
    return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _url_path_problem(value: object) -> str | None:
    """What is wrong with ``value`` as the path of a health check URL, or None."""
    if not isinstance(value, str) or not value.startswith("/") or any(c.isspace() or c == "#" for c in value):
        return "a URL path starting with / (e.g. /healthz), without spaces or #"
    return None


def _port_problem(value: object) -> str | None:
    """What is wrong with ``value`` as a TCP port, or None."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        return "a TCP port from 1 to 65535"
    return None


def _checked_argument(problem: Callable[[Any], str | None], convert: Callable[[str], Any] = str
                      ) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert`` the text, and a value ``problem`` finds wrong is a usage error."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = text
        found = problem(value)
        if found is not None:
            raise argparse.ArgumentTypeError(f"{text!r}: it must be {found}")
        return value
    parse.__name__ = problem.__name__.strip("_").removesuffix("_problem")
    return parse


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error names the file and the line."""
    import tomllib

    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "TOML files are UTF-8: save it as UTF-8 and run again") from None
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
    elif kind in ("count", "seconds"):
        problem = _number_problem(kind, value)
        if problem is None and kind == "seconds":
            value = float(value)
    elif kind == "style":
        if value not in _ADDRESSING_STYLES:
            problem = f"one of {', '.join(map(repr, _ADDRESSING_STYLES))}"
    elif kind == "choice":
        if value not in _CHOICES[key]:
            problem = f"one of {', '.join(map(repr, _CHOICES[key]))}"
    elif kind == "flag":
        if not isinstance(value, bool):
            problem = "true or false"
    elif kind == "url_path":
        problem = _url_path_problem(value)
    elif kind == "ports":
        if isinstance(value, int):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(_port_problem(v) is None for v in value):
            problem = "a list of TCP ports (1 to 65535)"
        else:
            value = tuple(value)
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
                overrides: Mapping[str, Any] | None = None,
                environment: Mapping[str, tuple[Any, str]] | None = None) -> FleetConfig:
    """Resolve an app's settings: flags > ``[tool.flydeploy]`` > ``fly.toml`` >
    environment defaults > defaults.

    ``config`` is the ``fly.toml`` path (relative to ``project_dir``); when it is
    None, ``fly.toml`` is read if present.  ``overrides`` holds the flags, by
    setting name (``app``, ``max_concurrency``, ...); None values are unset.
    ``environment`` holds defaults taken from the environment, by setting name,
    as ``(value, source)``, e.g. ``{"app": ("shop", "FLY_APP_NAME")}``; they
    rank below the files.
    TOML errors name the file and line; an unknown ``[tool.flydeploy]`` key, a
    malformed value or an unknown ``--process-group`` raises ``ConfigError``.
    """
    project = pathlib.Path(project_dir)
    fly_path = project / (config if config is not None else "fly.toml")
    if config is not None and not fly_path.is_file():
        raise ConfigError(f"{fly_path} not found: pass --config with the path of the app's fly.toml")
    if not project.is_dir():
        raise ConfigError(f"{project}: " + ("not a directory" if project.exists() else "no such directory")
                          + "; pass --root (or --config) the project folder, the one with fly.toml "
                            "and pyproject.toml")
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
                "build_args": fly_tables["build"].get("args"),
                "s3_addressing_style": env.get(_ADDRESSING_STYLE_VARIABLE)}
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
        elif (environment or {}).get(key, (None,))[0] is not None:
            value, source = environment[key]
            values[key], sources[key] = _check_setting(key, value, source), source
        else:
            values[key], sources[key] = default, "default"
    if values["app_dir"] is None:
        values["app_dir"], sources["app_dir"] = (_dockerfile_workdir(project, fly_tables["build"])
                                                 or (_DEFAULT_APP_DIR, "default"))
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
        app_dir=values["app_dir"], s3_addressing_style=values["s3_addressing_style"], env=env,
        processes=fly_tables["processes"], build=fly_tables["build"], sources=sources, generated=values["generated"],
        canary=values["canary"], canary_wait=values["canary_wait"], on_failure=values["on_failure"],
        allow_missing=values["allow_missing"], health_check=values["health_check"],
        health_ports=values["health_ports"], health_timeout=values["health_timeout"])


@dataclasses.dataclass(frozen=True)
class MachineSelection:
    """Which machines an upgrade reaches: ``targets`` now (started), ``pending``
    at their next start (stopped, suspended), ``skipped`` (machine, reason) not at all."""

    targets: tuple[dict, ...]
    pending: tuple[dict, ...]
    skipped: tuple[tuple[dict, str], ...]


def machine_group(machine: Mapping[str, Any]) -> str:
    """The process group of a Machine JSON object: ``config.metadata.fly_process_group``,
    else the legacy ``process_group`` key that older machines carry (fly-go machine_types.go)."""
    metadata = (machine.get("config") or {}).get("metadata") or {}
    return metadata.get("fly_process_group") or metadata.get("process_group") or ""


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
        group = machine_group(machine)
        if (self_id and machine.get("id") == self_id) or metadata.get(ORCHESTRATOR_ROLE_KEY) == ORCHESTRATOR_ROLE:
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


def upgrade_applies_to(hot_upgrade: Mapping[str, Any], group: str | None) -> bool:
    """Whether a ``hot_upgrade`` record reaches a machine of process ``group``.

    Its ``process_groups`` list names the groups an upgrade pushed with
    ``--process-group`` went to; null (or absent) means the whole app.  A
    machine whose group is unknown (no ``FLY_PROCESS_GROUP``) takes every record.
    """
    groups = hot_upgrade.get("process_groups")
    return not groups or not group or group in groups


def hot_upgrade_for_group(current: Mapping[str, Any] | None, group: str | None) -> dict | None:
    """The hot upgrade a machine of process ``group`` should run, from a
    ``current.json`` document: the current record when it reaches the group,
    else the latest of ``history`` that does, else None (the image's own code)."""
    records = [(current or {}).get("hot_upgrade"), *((current or {}).get("history") or [])]
    for record in records:
        if isinstance(record, dict) and upgrade_applies_to(record, group):
            return record
    return None


def parse_result_marker(output: str) -> dict | None:
    """The per-machine result from ``rpc upgrade`` output: the JSON between the
    last pair of ``RESULT_MARKER`` markers, or None when there is none."""
    marker = re.escape(RESULT_MARKER)
    for match in reversed(re.findall(marker + r"(.*?)" + marker, output or "")):
        try:
            result = json.loads(match)
        except ValueError:
            continue
        if isinstance(result, dict):
            return result
    return None


def pending_note(state: str) -> str:
    """When a machine that is not running takes a hot upgrade.  A stopped one
    boots again and startup reapply catches it up; a suspended one resumes
    without booting, so only the poller can."""
    if state == "suspended":
        return ("applies when it next boots; after a resume only through the poller "
                "(FLYDEPLOY_POLL_INTERVAL)")
    return "applies at next start"


def _plural(count: int, word: str, words: str | None = None) -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


@dataclasses.dataclass(frozen=True)
class MachineOutcome:
    """How one machine took one phase of an upgrade; ``result`` is what its machine-side
    command reported (``rpc upgrade``, ``prepare``, ``apply``), if anything.  ``answered``
    is False when the exec itself got no answer (the machine was not reached), and
    ``api_status`` is then the Machines API's status (401/403: it refused the token);
    ``elapsed_s`` is the phase's wall time on it, as the orchestrator saw it."""

    machine_id: str
    region: str
    ok: bool
    error: str | None = None
    result: Mapping[str, Any] | None = None
    answered: bool = True
    elapsed_s: float = 0.0
    api_status: int | None = None

    @property
    def token_refused(self) -> bool:
        """Whether the Machines API refused the exec for the token (401/403): the command never ran."""
        return not self.answered and self.api_status in (401, 403)

    def line(self) -> str:
        """The line printed for this machine: ``✓ id (region) 3 modules, ...`` (with the
        phase's wall time on it, when measured) or ``✗ id (region) error``."""
        if not self.ok:
            return f"✗ {self.machine_id} ({self.region}) {self.error}"
        result = self.result or {}
        modules = result.get("modules_reloaded") or 0
        processes = result.get("processes_succeeded") or 0
        suspended = result.get("suspend_duration_ms") or 0
        # Below a millisecond, rounding would say 0: the pause would look skipped.
        shown = f"{suspended:.1f}" if 0 < suspended < 1 else f"{round(suspended)}"
        took = f", {self.elapsed_s:.2f} s in all" if self.elapsed_s else ""
        return (f"✓ {self.machine_id} ({self.region}) {_plural(modules, 'module')}, "
                f"{_plural(processes, 'process', 'processes')}, suspended {shown} ms{took}")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def command_failure(what: str, commands: MachineCommands, exit_code: int, stdout: str, stderr: str,
                    exit_signal: int = 0) -> str:
    """Why a machine-side command (``what``) failed, from its exit, with the fix when it is known:
    flydeploy.py not where the command looks for it, or a Python that cannot run it."""
    if exit_signal:
        return f"{what} was killed by signal {exit_signal}"
    if "can't open file" in stderr or "No module named" in stderr or "No such file" in stderr:
        return (f"flydeploy is not importable the way the upgrade runs it ({shlex.join(commands.argv())}): "
                f"copy flydeploy.py to {commands.script} in the image, or set [tool.flydeploy] app_dir to "
                "the directory that holds it")
    if exit_code == 127:
        return (f"{commands.python} not found on the machine: set [tool.flydeploy] python to the "
                "interpreter's absolute path (e.g. /usr/local/bin/python3)")
    tail = _last_line(stderr) or _last_line(stdout)
    return f"{what} exited {exit_code} without a result" + (f": {tail}" if tail else "")


def judge_result(machine: Mapping[str, Any], result: Mapping[str, Any]) -> MachineOutcome:
    """Judge one machine by the result its ``rpc upgrade`` reported (marker or result object)."""
    machine_id, region = machine.get("id", "?"), machine.get("region", "?")
    if result.get("success"):
        return MachineOutcome(machine_id, region, True, None, result)
    problems = "; ".join(_process_problem(p) for p in result.get("processes") or ()
                         if isinstance(p, Mapping) and not p.get("ok"))
    return MachineOutcome(machine_id, region, False,
                          str(result.get("error") or problems or "failed, no reason given"), result)


def judge_upgrade(machine: Mapping[str, Any], exit_code: int, stdout: str, stderr: str,
                  exit_signal: int = 0, *, commands: MachineCommands | None = None,
                  what: str = "rpc upgrade") -> MachineOutcome:
    """Judge one machine by the result marker and exit code of its ``what`` (``rpc upgrade``).

    It succeeded only when the command exited 0 and its result says success.
    Otherwise the error is the result's own, or what the exit says (a missing
    Python or flydeploy on the machine is named with what to do).
    """
    result = parse_result_marker(stdout)
    if result is not None and (not result.get("success") or (exit_code == 0 and not exit_signal)):
        return judge_result(machine, result)
    commands = commands or MachineCommands.for_app_dir("python3", _DEFAULT_APP_DIR)
    error = command_failure(what, commands, exit_code, stdout, stderr, exit_signal)
    return MachineOutcome(machine.get("id", "?"), machine.get("region", "?"), False, error, result)


# --- The two phases of a fleet upgrade: the decisions ----------------------------

# The phases of ``orchestrate``, in order.  Nothing live changes before RECORD:
# lock, pack (the release is stored: an object, nothing live), prepare (every
# target downloads, stages and every process prepares against the staged files:
# also the check that each machine can run flydeploy, reach the bucket with its
# own credentials and has agents that answer; an exec the API refuses for the
# token runs again with the next client), judge (all ready? else the staged
# files are discarded everywhere and the run stops: ``--plan`` always stops
# here).  RECORD is the point of no return: ``current.json`` names the
# release, so a machine that boots from then on takes it.  Then apply (canaries
# first, each checked), revert (only after a failed apply with ``--on-failure
# rollback``: the machines that applied go back the same two-phase way and
# ``current.json`` names the previous release again; one that kept nothing to
# revert from is then restarted, to boot on it) and release (the lock).
FLEET_PHASES = ("lock", "pack", "prepare", "judge", "record", "apply", "revert", "release")
FLEET_POINT_OF_NO_RETURN = "record"
# What a machine runs when no hot upgrade reaches it.
_IMAGE_CODE = "the image's code"
# The upgrade id of the way back from upgrade ID is ID + this.
_REVERT_SUFFIX = "-back"
# How often a machine restarted by a fleet rollback is asked what it runs, until it runs the
# previous release or the run's --timeout is spent.
_RESTART_POLL_S = 1.0


def _process_problem(process: ProcessPlan) -> str:
    """``pid 12 (web): why`` for one process of a phase result."""
    name = f" ({process['name']})" if process.get("name") else ""
    why = process.get("error") or (process.get("plan") or {}).get("refused") or "failed, no reason given"
    return f"pid {process.get('pid')}{name}: {why}"


def prepare_line(outcome: MachineOutcome) -> str:
    """The line printed for one machine's phase 1: ``✓ id (region) ready: 2 files to write,
    2 processes prepared`` or ``✗ id (region) refused: why``."""
    result = outcome.result or {}
    if not outcome.ok:
        status = f"{result['status']}: " if result.get("status") else ""
        return f"✗ {outcome.machine_id} ({outcome.region}) {status}{outcome.error}"
    return (f"✓ {outcome.machine_id} ({outcome.region}) ready: "
            f"{_plural(int(result.get('files_to_write') or 0), 'file')} to write, "
            f"{_plural(len(result.get('processes') or ()), 'process', 'processes')} prepared")


@dataclasses.dataclass(frozen=True)
class PrepareVerdict:
    """Phase 1 judged: ``ready`` machines, ``refused`` ones (refused, failed, or not
    reached), and ``missing`` ones (not reached, left to catch up at their next boot
    because ``--allow-missing`` said so).  ``go`` when none refused."""

    ready: tuple[MachineOutcome, ...]
    refused: tuple[MachineOutcome, ...]
    missing: tuple[MachineOutcome, ...]

    @property
    def go(self) -> bool:
        return not self.refused

    def notes(self) -> list[str]:
        """One line per machine left out (each machine's own line was printed as it came)."""
        return [f"· {o.machine_id} ({o.region}) not reached: --allow-missing, it catches up at its next boot"
                for o in self.missing]

    def summary(self, version: str, *, planned: bool, uploaded: bool = False) -> str:
        """The last line of a run that stopped after phase 1 (``uploaded``: its release was
        stored by this run, and stays stored)."""
        if self.go:
            return (f"{version} would apply on {_plural(len(self.ready), 'machine')}: "
                    "nothing was applied, the staged files were discarded (--plan)")
        ids = ", ".join(o.machine_id for o in self.refused)
        head = f"{version} would be refused" if planned else f"{version} was not applied anywhere"
        stored = "; the release was uploaded and stays stored, current.json does not name it" if uploaded else ""
        return (f"{head}: {ids} {'refuses' if len(self.refused) == 1 else 'refuse'} it or could not prepare it; "
                f"nothing live changed: every machine runs what it ran, current.json is unchanged{stored}; "
                "the deploy lock is released")


def judge_prepare(outcomes: Iterable[MachineOutcome], *, allow_missing: bool = False) -> PrepareVerdict:
    """Phase 1's verdict from each target's outcome: all ready, or who stops the upgrade.

    A machine that was not reached (its exec got no answer) stops it too,
    unless ``allow_missing``: then it catches up at its next boot from
    ``current.json``.  One whose exec the API refused for the token was
    reached: it stops it.
    """
    ready, refused, missing = [], [], []
    for outcome in outcomes:
        if outcome.ok:
            ready.append(outcome)
        elif allow_missing and not outcome.answered and not outcome.token_refused:
            missing.append(outcome)
        else:
            refused.append(outcome)
    return PrepareVerdict(tuple(ready), tuple(refused), tuple(missing))


def judge_exec_refusals(outcomes: Iterable[MachineOutcome], *,
                        fallback: bool) -> tuple[list[MachineOutcome], list[MachineOutcome]]:
    """A phase's outcomes judged for the token: ``(to run again, kept)``.

    An exec the Machines API refused for the token (HTTP 401/403) never ran, so
    running it again is safe: with a ``fallback`` client it runs again with that
    one; without one it is kept, a failure whose error says the token fix.  Every
    other outcome is kept as it is.
    """
    again: list[MachineOutcome] = []
    kept: list[MachineOutcome] = []
    for outcome in outcomes:
        if outcome.token_refused and fallback:
            again.append(outcome)
        else:
            kept.append(outcome)
    return again, kept


def to_explain(outcomes: Iterable[MachineOutcome]) -> list[str]:
    """The machines whose phase 1 failed before it had the release (nothing downloaded, no
    process asked): the preflight (``judge_preflight``) says why with the fix, e.g. the bucket
    out of reach with the machine's own credentials.  A machine that got further, or whose
    command did not run, says why in its own result."""
    return [o.machine_id for o in outcomes
            if not o.ok and o.result is not None and o.result.get("status") == "failed"
            and not o.result.get("release_bytes") and not o.result.get("processes")]


def accepting(outcomes: Iterable[MachineOutcome], flag: str) -> list[str]:
    """The machines whose phase-1 result says their ``rpc apply`` takes ``flag``
    (``PrepareResult.apply_accepts``): the apply runs the flydeploy.py a machine
    has, which may be older than this one, so a flag it would refuse is left out."""
    return [o.machine_id for o in outcomes if o.ok and flag in ((o.result or {}).get("apply_accepts") or ())]


def to_discard(outcomes: Iterable[MachineOutcome]) -> list[str]:
    """The machines whose staged files the orchestrator discards after a refusal or a
    plan: those that said ready, and those that answered without a result (they may
    have staged).  A machine that refused or failed discarded its own already."""
    return [o.machine_id for o in outcomes
            if o.ok or (o.answered and o.result is None)]


def pick_canaries(machines: Sequence[Mapping[str, Any]], count: int) -> list[dict]:
    """``count`` machines to apply first, spread across process groups and regions:
    each pick prefers a group not picked yet, then a region not picked yet; ties go
    to the lowest machine id (the same fleet gives the same canaries)."""
    left = sorted((dict(m) for m in machines), key=lambda m: str(m.get("id")))
    chosen: list[dict] = []
    groups: set[str] = set()
    regions: set[str] = set()
    while left and len(chosen) < count:
        best = max(left, key=lambda m: (machine_group(m) not in groups, m.get("region") not in regions))
        left.remove(best)
        chosen.append(best)
        groups.add(machine_group(best))
        regions.add(best.get("region"))
    return chosen


def health_ports_for(machine: Mapping[str, Any], given: Sequence[int] = ()) -> list[int]:
    """The ports the health check fetches on ``machine``: ``given`` (``--health-port``),
    else the internal ports its services declare (``config.services[].internal_port``,
    fly.MachineService in the Machines API spec), in order, each once."""
    if given:
        return list(dict.fromkeys(given))
    services = (machine.get("config") or {}).get("services") or ()
    return list(dict.fromkeys(s["internal_port"] for s in services
                              if isinstance(s, Mapping) and _port_problem(s.get("internal_port")) is None))


# The status of a ``rpc prepare --revert`` result on a machine that kept nothing to revert
# that upgrade from (it restarted, or caught up at boot, during phase 2): only a restart,
# booting from current.json once it names the previous release again, takes it back.
NOTHING_KEPT = "nothing kept"


def to_revert(outcomes: Iterable[MachineOutcome]) -> list[str]:
    """The machines a fleet rollback returns to the previous release: those whose apply
    left them on the release (its result says ``applied``: a failed health check
    keeps the release), and those with no result, which may have."""
    return [o.machine_id for o in outcomes
            if (o.result or {}).get("applied", o.ok) or (o.answered and o.result is None)]


def to_restart(reverted: Iterable[MachineOutcome]) -> list[str]:
    """The machines a fleet rollback restarts: those whose revert could not be prepared because
    they kept nothing for the upgrade (status ``NOTHING_KEPT``); never one whose revert failed
    for another reason."""
    return [o.machine_id for o in reverted if not o.ok and (o.result or {}).get("status") == NOTHING_KEPT]


def judge_restart(machine: Mapping[str, Any], processes: Sequence[Mapping[str, Any]] | None,
                  error: str | None, expected: str) -> MachineOutcome:
    """A machine restarted by a fleet rollback, by what its processes run after its boot
    (``rpc info``): back on ``expected`` (a version, or ``_IMAGE_CODE``) when every one of
    them answers with it, else failed, saying what it runs."""
    machine_id, region = machine.get("id", "?"), machine.get("region", "?")
    runs = sorted({str(p.get("version") or _IMAGE_CODE) for p in processes or ()})
    if processes and error is None and runs == [expected]:
        return MachineOutcome(machine_id, region, True, None, {"restarted": True, "version": expected})
    why = error or ("no process answered" if not processes else f"it runs {', '.join(runs)}")
    return MachineOutcome(machine_id, region, False, f"restarted to go back to {expected}, but {why}",
                          {"restarted": True, "version": ", ".join(runs) or None})


def applied_version(applied: MachineOutcome, reverted: MachineOutcome | None, version: str,
                    previous: str) -> str:
    """The version a machine runs after phase 2 (``applied``) and the way back, if any
    (``reverted``): the release where the apply left it there and no revert took it back;
    what a machine restarted on the way back (``judge_restart``) was found running."""
    if reverted is not None and reverted.ok:
        return previous
    if reverted is not None and (reverted.result or {}).get("restarted"):
        return str(reverted.result.get("version") or f"{previous} or {version} (not known after its restart)")
    if applied.result is None and not applied.ok or reverted is not None and reverted.result is None:
        return f"{previous} or {version} (no result)"
    return version if (applied.result or {}).get("applied", applied.ok) else previous


def withdraw_hot_upgrade(doc: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """``current.json`` with ``record`` taken back off: the previous hot upgrade is current
    again.  A document whose current record is another (someone recorded since) is kept."""
    current = doc.get("hot_upgrade") or {}
    if (current.get("version"), current.get("sha256")) != (record.get("version"), record.get("sha256")):
        return dict(doc)
    history = [h for h in doc.get("history") or [] if isinstance(h, dict)]
    return {**doc, "hot_upgrade": history[0] if history else None, "history": history[1:],
            "set_at": _iso_utc(_utc_now())}


def prepare_expiry_s(targets: int, *, timeout: float, max_concurrency: int, canary_wait: float) -> float:
    """How long a machine keeps its prepared state: the whole of phase 1 (every wave of
    ``max_concurrency`` machines taking up to ``timeout``), the canaries' apply and wait,
    and one more ``timeout``; a lost orchestrator leaves nothing behind longer."""
    waves = -(-max(targets, 1) // max_concurrency)
    return timeout * (waves + 2) + canary_wait


def _plan_of(outcome: MachineOutcome) -> dict[str, Any]:
    """One machine's phase 1 plan, its processes' plans merged (each item once, in order);
    ``outcome.result`` is its ``PrepareResult``, each process's plan an ``UpgradePlan``."""
    result = outcome.result or {}
    merged: dict[str, list] = {"modules_changed": [], "modules_added": [], "code_change": [], "refused": []}
    for process in result.get("processes") or ():
        plan = process.get("plan") or {} if isinstance(process, Mapping) else {}
        for key in ("modules_changed", "modules_added", "code_change"):
            merged[key] += [item for item in plan.get(key) or () if item not in merged[key]]
        if isinstance(process, Mapping) and not process.get("ok"):
            merged["refused"].append(_process_problem(process))
    if not merged["refused"] and not outcome.ok:
        merged["refused"].append(outcome.error or "failed, no reason given")
    return merged


def plan_document(report: FleetReport, machines: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``hot --plan --json``: the release, whether it would apply everywhere, and the plan
    per process group (``machines`` lists the machines whose plan differs from the group's)."""
    groups_of = {m.get("id"): machine_group(m) for m in machines}
    rows = [{"machine_id": o.machine_id, "region": o.region, "group": groups_of.get(o.machine_id, ""),
             "status": (o.result or {}).get("status") or ("ready" if o.ok else "failed"), "plan": _plan_of(o)}
            for o in sorted(report.prepared, key=lambda o: o.machine_id)]
    groups: list[dict[str, Any]] = []
    for group in sorted({row["group"] for row in rows}):
        members = [row for row in rows if row["group"] == group]
        plans = {json.dumps(row["plan"], sort_keys=True) for row in members}
        groups.append({"group": group, "machines": [row["machine_id"] for row in members],
                       "same_plan": len(plans) == 1,
                       "plan": members[0]["plan"] if len(plans) == 1 else None})
    sizes = [(o.result or {}).get("release_bytes") for o in report.prepared if (o.result or {}).get("release_bytes")]
    return {"app": report.app, "version": report.version, "sha256": report.sha256,
            "release_bytes": sizes[0] if sizes else None, "uploaded": report.uploaded,
            "would_apply": report.verdict is not None and report.verdict.go,
            "groups": groups, "machines": rows,
            "missing": [o.machine_id for o in (report.verdict.missing if report.verdict else ())]}


def plan_lines(document: Mapping[str, Any]) -> list[str]:
    """``hot --plan``'s text: per process group, or per machine where a group's differ."""
    size = document.get("release_bytes")
    lines = [f"Plan for {document['version']}"
             + (f" (release {size} bytes" if size else " (release")
             + (", uploaded now: the only change this plan made)" if document.get("uploaded")
                else ", already stored)")]
    rows = {row["machine_id"]: row for row in document["machines"]}

    def block(head: str, plan: Mapping[str, Any]) -> None:
        lines.append(f"{head}: {'REFUSED' if plan['refused'] else 'ready'}")
        for key, label in (("modules_changed", "modules changed"), ("modules_added", "modules added")):
            if plan[key]:
                lines.append(f"  {label}: {', '.join(plan[key])}")
        for change in plan["code_change"]:
            lines.append(f"  code_change: {change.get('server')} vsn {change.get('vsn_old')!r} -> "
                         f"{change.get('vsn_new')!r}")
        if not (plan["modules_changed"] or plan["modules_added"] or plan["refused"]):
            lines.append("  no module changes")
        lines.extend(f"  refused: {why}" for why in plan["refused"])

    for group in document["groups"]:
        name = group["group"] or "-"
        if group["same_plan"]:
            block(f"group {name} ({_plural(len(group['machines']), 'machine')}: {', '.join(group['machines'])})",
                  group["plan"])
        else:
            for machine_id in group["machines"]:
                row = rows[machine_id]
                block(f"group {name}, machine {machine_id} ({row['region']})", row["plan"])
    return lines


@dataclasses.dataclass
class FleetReport:
    """What an ``orchestrate`` run did: the release, and one outcome per machine and phase.

    ``upgrade_id`` is the run's deployment id: the deploy lock's, and the folder
    ``releases/<app>-results/<upgrade_id>/`` where each machine stores its result
    (one folder per phase).  ``prepared`` holds phase 1's outcomes and
    ``verdict`` its judgement (None when no phase 1 ran); ``outcomes`` phase 2's;
    ``reverted`` those of the way back (``--on-failure rollback``);
    ``previous`` the version each machine ran before (``the image's code``
    when none); ``rolled_back`` when a failure sent the fleet back (and
    ``current.json`` with it).  ``planned``: a ``--plan`` run, which stops
    after phase 1, with its ``plan`` (``plan_document``).
    ``prepare_s`` and ``apply_s`` are the two phases' fleet-wide wall times.
    """

    app: str
    version: str
    sha256: str
    tarball_url: str
    uploaded: bool
    upgrade_id: str
    outcomes: list[MachineOutcome]
    pending: list[Mapping[str, Any]]
    skipped: list[tuple[Mapping[str, Any], str]]
    duration_s: float = 0.0
    prepared: list[MachineOutcome] = dataclasses.field(default_factory=list)
    verdict: PrepareVerdict | None = None
    reverted: list[MachineOutcome] = dataclasses.field(default_factory=list)
    previous: Mapping[str, str] = dataclasses.field(default_factory=dict)
    planned: bool = False
    rolled_back: bool = False
    plan: dict[str, Any] | None = None
    prepare_s: float = 0.0
    apply_s: float = 0.0

    @property
    def failed(self) -> list[MachineOutcome]:
        """The machines that did not take the upgrade."""
        return [o for o in self.outcomes if not o.ok]

    @property
    def refused(self) -> bool:
        """Whether phase 1 stopped the upgrade (nothing was applied anywhere)."""
        return self.verdict is not None and not self.verdict.go

    @property
    def exit_code(self) -> int:
        """0 when every started machine succeeded (or, planned, would), 1 when any
        refused, failed or timed out."""
        return 1 if self.failed or self.refused else 0

    def machine_versions(self) -> dict[str, str]:
        """Which version each machine of phase 2 runs now (``applied_version``)."""
        back = {o.machine_id: o for o in self.reverted}
        return {o.machine_id: applied_version(o, back.get(o.machine_id), self.version,
                                              self.previous.get(o.machine_id, _IMAGE_CODE))
                for o in self.outcomes}

    def summary(self) -> str:
        """One line: how many machines took which version, which failed, which wait for their start."""
        if self.verdict is not None and (self.planned or not self.verdict.go):
            return self.verdict.summary(self.version, planned=self.planned, uploaded=self.uploaded)
        done = len(self.outcomes) - len(self.failed)
        if self.rolled_back:
            text = (f"{self.version} was rolled back in {self.duration_s:.1f} s (--on-failure rollback), "
                    "current.json names the previous release again")
        else:
            text = (f"{done}/{_plural(len(self.outcomes), 'machine')} upgraded to {self.version} "
                    f"in {self.duration_s:.1f} s")
        if self.failed:
            text += f"; FAILED: {', '.join(o.machine_id for o in self.failed)}"
            runs: dict[str, list[str]] = {}
            for machine_id, version in sorted(self.machine_versions().items()):
                runs.setdefault(version, []).append(machine_id)
            text += "".join(f"; runs {version}: {', '.join(ids)}" for version, ids in runs.items())
        if self.verdict is not None and self.verdict.missing:
            text += (f"; not reached, catch up at next boot: "
                     f"{', '.join(o.machine_id for o in self.verdict.missing)}")
        suspended = sum(1 for m in self.pending if m.get("state") == "suspended")
        if len(self.pending) > suspended:
            text += f"; {_plural(len(self.pending) - suspended, 'stopped machine')} will apply it at next start"
        if suspended:
            text += (f"; {_plural(suspended, 'suspended machine')} will apply it when booted again, or "
                     "after a resume through the poller (FLYDEPLOY_POLL_INTERVAL)")
        return text


def _map_concurrently(fn: Callable[[Any], Any], items: Sequence[Any], limit: int) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item as each finishes, at most ``limit`` at a time.

    An exception ``fn`` raises is raised here.  The worker threads are daemons
    and stop taking work when the caller stops iterating (an error, Ctrl-C), so
    an interrupted run exits at once.
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
            try:
                done.put((fn(item), None))
            except BaseException as exc:  # handed to the caller, who would otherwise wait forever
                done.put((None, exc))

    try:
        for _ in range(min(limit, len(items))):
            threading.Thread(target=work, name="flydeploy-exec", daemon=True).start()
        for _ in items:
            result, error = done.get()
            if error is not None:
                raise error
            yield result
    finally:
        stop.set()


def _exec_on(api: Any, machine: Mapping[str, Any], argv: list[str], timeout: float,
             commands: MachineCommands | None = None) -> tuple[ExecResult, None, None] | tuple[None, str, int]:
    """Exec ``argv`` on ``machine``: ``(result, None, None)``, or ``(None, why it failed, the API's
    status)`` when the API gave none (``_exec_failure``, with ``commands``' token fix)."""
    began = time.monotonic()
    try:
        return api.exec(machine["id"], argv, timeout=timeout), None, None
    except MachinesAPIError as exc:
        return None, _exec_failure(exc, argv, timeout, time.monotonic() - began, commands), exc.status


def _token_refused_error(detail: str, commands: MachineCommands) -> str:
    """Why a machine-side command did not run when the Machines API refused its exec for the
    token (HTTP 401/403; ``detail`` is the API's message), with the fix: the one text of the
    preflight (``judge_preflight``) and of the phases (``_upgrade_machines``)."""
    return (f"the Machines API refused the exec ({detail}): the token does not allow "
            f"`{shlex.join(commands.token_prefix())} ...`; set the app's FLY_API_TOKEN secret "
            "(fly secrets set FLY_API_TOKEN=\"$(fly tokens create deploy)\"), which the orchestrator machine "
            "falls back to; with --direct the token is yours: a FLY_API_TOKEN that may exec on the app's "
            "machines, or `fly auth login`")


def _exec_failure(exc: MachinesAPIError, argv: Sequence[str], timeout: float, waited_s: float,
                  commands: MachineCommands | None = None) -> str:
    """What a failed exec says; ``waited_s`` is the time spent on it, all attempts together.
    With ``commands`` (what built ``argv``) a refusal of the token says the token fix."""
    if commands is not None and exc.status in (401, 403):
        return _token_refused_error(exc.message, commands)
    if missing_program(exc):
        return (f"{argv[0]} does not exist on the machine ({exc.message}): set [tool.flydeploy] python to "
                "the absolute path of the image's interpreter (`doctor` prints it)")
    if exc.status == 408:
        return (f"timed out after {waited_s:.0f} s in all ({timeout:g} s per attempt); the command may "
                "still be running on the machine")
    return f"exec failed: {exc}" if waited_s < 0.5 else f"exec failed after {waited_s:.0f} s: {exc}"


def _stored_manifest(path: str) -> dict[str, Any]:
    """The manifest of a release tarball, read from its first member alone."""
    with tarfile.open(path, "r:gz") as tar:
        return _read_manifest_member(tar)


def _store_release(store: Store, key: str, release: Release) -> tuple[Release, bool]:
    """Upload a packed release unless the same content is there.

    Returns the release to record and whether it was uploaded now.  A stored
    tarball whose manifest lists the same files (paths and hashes) is the same
    content although its metadata (the image it was packed from, the packing
    time) differ, as when a failed run is repeated: it is reused as stored.
    """
    if store.head(key) is None:
        store.upload(key, release.path)
        return release, True
    with tempfile.TemporaryDirectory(prefix="flydeploy-check-") as scratch:
        path = os.path.join(scratch, "existing.tar.gz")
        existing = store.download(key, path)
        if existing == release.sha256:
            return release, False
        try:
            manifest = _stored_manifest(path)
        except (ReleaseError, tarfile.TarError, OSError, EOFError):
            manifest = None
    if manifest is None or manifest.get("files") != release.manifest["files"]:
        raise FlyDeployError(f"{key} already exists with other content: choose another --version "
                             "(a stored release is never overwritten)")
    return Release(release.path, existing, manifest), False


def _pick_rollback(current: Mapping[str, Any] | None, to: str | None) -> dict:
    """The history entry a rollback goes to: version ``to``, or the previous one.

    "Previous" is the newest entry of an older release (in the order releases
    were first pushed) that was not rolled back from: a rollback's record lists
    the newer versions it left in ``rolled_back_from``, so that rollback after
    rollback goes further back instead of toggling.
    """
    history = [e for e in (current or {}).get("history") or [] if isinstance(e, dict)]
    if not history:
        raise FlyDeployError("nothing to roll back to: current.json records no earlier hot upgrade (the "
                             "image's own code is not a stored release); push the old code with `hot`, "
                             "or make a cold `fly deploy`")
    hot = (current or {}).get("hot_upgrade") or {}
    age: dict[Any, int] = {}  # version -> when it was first pushed, oldest 0
    for record in reversed([hot, *history]):
        age.setdefault(record.get("version"), len(age))
    left = [hot.get("version"), *(hot.get("rolled_back_from") or [])]

    def wanted(version: Any) -> bool:
        if to is not None:
            return version == to
        return version not in left and age[version] < age[hot.get("version")]

    for index, entry in enumerate(history):
        target = entry.get("version")
        if wanted(target):
            passed = left + [e.get("version") for e in history[:index]]
            gone = [v for n, v in enumerate(passed) if v in age and age[v] > age[target] and v not in passed[:n]]
            return {**entry, "rolled_back_from": gone}
    if to is None:
        raise FlyDeployError(f"nothing earlier to roll back to: every version in the hot upgrade history "
                             f"({', '.join(str(e.get('version')) for e in history)}) was rolled back from; "
                             "pass --to VERSION to pick one")
    known = ", ".join(str(e.get("version")) for e in history)
    raise FlyDeployError(f"version {to!r} is not in the hot upgrade history; pass --to one of: {known}")


def default_version() -> str:
    """A new release version: the UTC time, sortable, and a random suffix (``20261121T101500Z-3f2a``)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(2)


def _release_entry(store: Store, app: str, image_ref: str, *, root: str | os.PathLike[str],
                   version: str | None, include: Iterable[str] | None, exclude: Iterable[str] | None,
                   rollback: bool, rollback_to: str | None, say: Callable[[str], None],
                   local_tree: LocalTree | None = None) -> tuple[dict, bool]:
    """The ``hot_upgrade`` record to push and whether its tarball was uploaded now."""
    if rollback or rollback_to is not None:
        entry = _pick_rollback(read_current(store, app)[0], rollback_to)
        entry["deployed_at"] = _iso_utc(_utc_now())
        say(f"Rolling {app} back to {entry['version']}")
        return entry, False
    version = version or default_version()
    key = release_key(app, version)
    with tempfile.TemporaryDirectory(prefix="flydeploy-pack-") as scratch:
        release = pack_release(root, os.path.join(scratch, "release.tar.gz"), app=app, version=version,
                               source_image_ref=image_ref, include=list(include) if include else None,
                               exclude=list(exclude) if exclude else None,
                               dockerignore=local_tree.dockerignore if local_tree else None,
                               local_tree=local_tree.record() if local_tree else None)
        release, uploaded = _store_release(store, key, release)
    say(f"Release {version}: {_plural(len(release.manifest['files']), 'file')}, sha256 "
        f"{release.sha256[:12]}, {'uploaded' if uploaded else 'already stored'}")
    return release.hot_upgrade_record(store.url(key)), uploaded


@contextlib.contextmanager
def _renewing(lock: Lock, timeout_s: float) -> Iterator[None]:
    """Keep ``lock`` alive while the block runs: renew it every third of
    ``timeout_s``, so that a deploy longer than the timeout is not taken over;
    renewing stops when the block ends, before the lock is released."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(timeout_s / 3):
            try:
                lock.renew(timeout_s)
            except LockHeld as exc:
                log.warning("the deploy lock was lost, no longer renewing it: %s", exc)
                return
            except FlyDeployError as exc:  # a passing store error: the next round tries again
                log.warning("could not renew the deploy lock of %s: %s", lock.app, exc)

    thread = threading.Thread(target=renew, name="flydeploy-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _machines_from_env(app: str) -> list[tuple[Machines, str]]:
    """The Machines API clients an orchestrator may use, in order: the minted exec
    token (``FLYDEPLOY_API_TOKEN``), then the app's ``FLY_API_TOKEN`` secret."""
    clients = [(Machines(app, os.environ[name], retries=_EXEC_RETRIES), what)
               for name, what in (("FLYDEPLOY_API_TOKEN", "the minted exec token"),
                                  ("FLY_API_TOKEN", "the app's FLY_API_TOKEN secret"))
               if os.environ.get(name, "").strip()]
    if not clients:
        raise ConfigError("no Machines API token: set the FLY_API_TOKEN app secret "
                          "(fly secrets set FLY_API_TOKEN=\"$(fly tokens create deploy)\")")
    return clients


# --- Preflight: can a machine run what an upgrade runs? ----------------------------
# ``doctor`` runs it on every machine; an upgrade runs it only to explain a machine's failure
# in phase 1 (``to_explain``): phase 1 itself is the check, on every machine.


@dataclasses.dataclass(frozen=True)
class PreflightCheck:
    """One machine's answer to ``rpc preflight``: ``report`` is the JSON it printed
    (``preflight_report``); ``status`` the Machines API status when the exec was refused."""

    machine_id: str
    region: str
    group: str
    ok: bool
    error: str | None = None
    report: Mapping[str, Any] | None = None
    status: int | None = None

    def line(self) -> str:
        """``✓ group app: machine (region) python ..., flydeploy 0.1.0, 2 agents`` or ``✗ ... why``."""
        head = f"group {self.group or '-'}: {self.machine_id} ({self.region})"
        if not self.ok:
            return f"✗ {head}: {self.error}"
        report = self.report or {}
        return (f"✓ {head}: {report.get('python')} (Python {report.get('python_version')}), flydeploy "
                f"{report.get('flydeploy')}, {_plural(int(report.get('agents_ok') or 0), 'agent')} answering")


def judge_preflight(machine: Mapping[str, Any], commands: MachineCommands, result: ExecResult | None,
                    refusal: MachinesAPIError | None) -> PreflightCheck:
    """Judge one machine's ``rpc preflight`` exec (its result, or the API's refusal), with the fix."""
    head = (machine.get("id", "?"), machine.get("region", "?"), machine_group(machine))
    if refusal is not None:
        return PreflightCheck(*head, False, _exec_failure(refusal, commands.argv(), EXEC_DEADLINE_S, 0, commands),
                              None, refusal.status)
    assert result is not None
    try:
        report = json.loads(result.stdout)
    except ValueError:
        report = None
    if not isinstance(report, dict):
        return PreflightCheck(*head, False, command_failure("rpc preflight", commands, result.exit_code,
                                                            result.stdout, result.stderr, result.exit_signal))
    if not report.get("agents"):
        error = ("no flydeploy agent runs on the machine: the app must call flydeploy.startup_reapply_current() "
                 "(or flydeploy.start_agent()) in every process at boot")
        return PreflightCheck(*head, False, error, report)
    if report.get("agents_ok") != report.get("agents"):
        return PreflightCheck(*head, False, f"agents do not answer: {report.get('agent_errors')}", report)
    store = report.get("store")
    if isinstance(store, dict) and not store.get("ok"):
        error = (f"the bucket is not reachable from the machine with its own credentials ({store.get('error')}): "
                 "give the app its bucket secrets (`fly storage create` sets BUCKET_NAME, AWS_ENDPOINT_URL_S3, "
                 "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        return PreflightCheck(*head, False, error, report)
    return PreflightCheck(*head, True, None, report)


def run_preflight(api: Any, app: str, machines: Sequence[Mapping[str, Any]], commands: MachineCommands, *,
                  extra: Sequence[str] = (), max_concurrency: int = 10) -> list[PreflightCheck]:
    """``rpc preflight`` on each of ``machines`` (one short exec each), judged."""
    argv = commands.rpc("preflight", app, *extra)

    def check(machine: Mapping[str, Any]) -> PreflightCheck:
        try:
            return judge_preflight(machine, commands, api.exec(machine["id"], argv, timeout=EXEC_DEADLINE_S), None)
        except MachinesAPIError as exc:
            return judge_preflight(machine, commands, None, exc)

    return list(_map_concurrently(check, list(machines), max_concurrency))


# --- Upgrading the machines -------------------------------------------------------

# Results are looked for at an interval that grows with the time already waited
# (this share of it), between these bounds: a fast machine is seen within tens of
# milliseconds, and a slow one does not cost a request every 50 ms.
_RESULT_POLL_MIN_S = 0.05
_RESULT_POLL_MAX_S = 1.0
_RESULT_POLL_SHARE = 0.2


def result_poll_interval(waited_s: float) -> float:
    """Seconds until the next look for results, ``waited_s`` after the youngest wait began."""
    return min(_RESULT_POLL_MAX_S, max(_RESULT_POLL_MIN_S, waited_s * _RESULT_POLL_SHARE))


def results_prefix(app: str, upgrade_id: str) -> str:
    """The folder of one upgrade's per-machine result objects."""
    return f"releases/{app}-results/{upgrade_id}/"


class _ResultBoard:
    """The result objects machines store under ``prefix`` (``<machine_id>.json`` each),
    as they come: one upgrade's, or one phase's of it.

    Every machine waiting for its result shares one poller: whoever finds the
    next poll due lists the folder (one request, whatever the number of
    machines); the others wait for it.  Each waiter then reads its own object,
    so the objects one listing shows are read at once, not one after another.
    """

    def __init__(self, store: Store, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._cond = threading.Condition()
        self._listed: set[str] = set()
        self._waiting: dict[str, float] = {}
        self._polling = False
        # The first look is _RESULT_POLL_MIN_S after the first wait begins: the upgrade was just started.
        self._next_poll = float("inf")
        self.error: str | None = None
        self.polls = 0

    def wait(self, machine_id: str, began: float, deadline: float) -> dict | None:
        """The result of ``machine_id`` (waited for since ``began``), or None at ``deadline``."""
        with self._cond:
            self._waiting[machine_id] = began
            self._next_poll = min(self._next_poll, time.monotonic() + _RESULT_POLL_MIN_S)
        try:
            while True:
                with self._cond:
                    now = time.monotonic()
                    listed = machine_id in self._listed
                    self._listed.discard(machine_id)
                    if not listed:
                        if now >= deadline:
                            return None
                        if self._polling or now < self._next_poll:
                            self._cond.wait(min(deadline, self._next_poll if not self._polling else deadline) - now)
                            continue
                        self._polling = True
                if listed:
                    result = self._read(machine_id)
                    if result is not None:
                        return result
                    continue
                try:
                    self._poll()
                finally:
                    with self._cond:
                        self._polling = False
                        youngest = max(self._waiting.values(), default=time.monotonic())
                        self._next_poll = time.monotonic() + result_poll_interval(time.monotonic() - youngest)
                        self._cond.notify_all()
        finally:
            with self._cond:
                self._waiting.pop(machine_id, None)
                self._listed.discard(machine_id)

    def _poll(self) -> None:
        """List the folder: the machines waiting whose object is there may read it."""
        self.polls += 1
        try:
            keys = self._store.list(self._prefix)
        except FlyDeployError as exc:  # a passing store error: the next poll tries again
            self._failed(exc)
            return
        with self._cond:
            self._listed.update(machine_id for machine_id in (key[len(self._prefix):].removesuffix(".json")
                                                              for key in keys) if machine_id in self._waiting)

    def _read(self, machine_id: str) -> dict | None:
        """The result object of ``machine_id``, None while it is missing or says pending."""
        try:
            found = self._store.get_json(f"{self._prefix}{machine_id}.json")
        except FlyDeployError as exc:
            self._failed(exc)
            return None
        if found is not None and isinstance(found[0], dict) and found[0].get("status") != "pending":
            return found[0]
        return None

    def _failed(self, exc: FlyDeployError) -> None:
        self.error = str(exc)
        log.warning("flydeploy: could not read the upgrade results: %s", exc)


def _upgrade_machines(api: Any, targets: Sequence[Mapping[str, Any]],
                      argv: list[str] | Callable[[Mapping[str, Any]], list[str]], *, timeout: float,
                      max_concurrency: int, commands: MachineCommands,
                      board: _ResultBoard | None, on_outcome: Callable[[MachineOutcome], None],
                      stop_after_failure: bool = False, what: str = "rpc upgrade",
                      settle: Callable[[Mapping[str, Any], MachineOutcome], MachineOutcome | None] | None = None
                      ) -> None:
    """Run one machine-side command (``what``: ``rpc upgrade``, or a phase of one) on every
    target, ``max_concurrency`` at a time; ``on_outcome`` as each finishes.

    ``argv`` is the command, or a function of the machine giving its own.  With
    ``stop_after_failure`` a target not started yet when one has failed is left
    alone (no outcome).  ``settle(machine, outcome)`` may take an outcome back
    (None: no outcome, no failure) before it counts.
    With a ``board`` the exec starts the upgrade on the machine, detached
    (``argv`` has ``--detach``; starting twice starts it once, so the start
    may be retried), and waits for it ``_DETACHED_WAIT_S`` at most: the outcome
    is the result it brings back, else the result object the machine stores;
    without one the exec runs the whole upgrade and prints its result.
    """

    failed = threading.Event()

    def upgrade(machine: Mapping[str, Any]) -> MachineOutcome | None:
        if stop_after_failure and failed.is_set():
            return None
        began = time.monotonic()
        outcome = dataclasses.replace(run(machine, began), elapsed_s=time.monotonic() - began)
        if settle is not None:
            outcome = settle(machine, outcome)
        if outcome is None:
            return None
        if not outcome.ok:
            failed.set()
        return outcome

    def run(machine: Mapping[str, Any], began: float) -> MachineOutcome:
        command = argv(machine) if callable(argv) else argv
        res, failure, status = _exec_on(api, machine, command, timeout if board is None else EXEC_DEADLINE_S,
                                        commands)
        if res is None:
            return MachineOutcome(machine["id"], machine.get("region", "?"), False, failure, answered=False,
                                  api_status=status)
        if board is None or not res.ok:
            return judge_upgrade(machine, res.exit_code, res.stdout, res.stderr, res.exit_signal,
                                 commands=commands, what=what)
        # Had its result within the exec's wait: it came back with it.  Else it is collected.
        result = parse_result_marker(res.stdout) or board.wait(machine["id"], began, began + timeout)
        if result is None:
            why = f" (last storage error: {board.error})" if board.error else ""
            return MachineOutcome(machine["id"], machine.get("region", "?"), False,
                                  f"no result within {timeout:g} s{why}; the upgrade may still be running on the "
                                  "machine: `status` shows what it runs, raise --timeout if it needs longer")
        return judge_result(machine, result)

    results = _map_concurrently(upgrade, targets, max_concurrency)
    try:
        for outcome in results:
            if outcome is not None:
                on_outcome(outcome)
    finally:
        results.close()


class _Fleet:
    """The I/O of one run's phases: a machine-side command on many machines (``run``),
    each phase's results collected from its own folder, and the discard.

    ``clients`` are the Machines API clients it may use, each with what it is (``the
    minted exec token``), in order: it uses the first until ``fall_back`` moves on."""

    def __init__(self, clients: Sequence[tuple[Any, str]], store: Store, app: str, commands: MachineCommands, *,
                 timeout: float, max_concurrency: int, say: Callable[[str], None]) -> None:
        self.clients = list(clients)
        self.client = 0
        self.store, self.app, self.commands = store, app, commands
        self.timeout, self.max_concurrency, self.say = timeout, max_concurrency, say
        self.detached = bool(getattr(self.api, "runs_detached", False))

    @property
    def api(self) -> Any:
        return self.clients[self.client][0]

    @property
    def restarters(self) -> list[Any]:
        """What a restart may use: ``api``, then the others (a minted exec token may only exec)."""
        return [self.api, *(api for api, _what in self.clients if api is not self.api)]

    def fallback(self) -> str | None:
        """What the next client is, if there is one."""
        return self.clients[self.client + 1][1] if self.client + 1 < len(self.clients) else None

    def fall_back(self, status: int, command: str) -> None:
        """The API refused this client's token (``status`` on the exec of ``rpc command``):
        say so, and use the next client for the rest of the run."""
        self.say(f"{self.clients[self.client][1]} was refused by the Machines API (HTTP {status} on the exec "
                 f"of `{shlex.join(self.commands.token_prefix())} {command}`); using {self.fallback()} instead")
        self.client += 1

    def run(self, command: str, machines: Sequence[Mapping[str, Any]], run_id: str,
            args: Callable[[Mapping[str, Any]], list[str]], line: Callable[[MachineOutcome], str | None], *,
            stop_after_failure: bool = False,
            settle: Callable[[Mapping[str, Any], MachineOutcome], MachineOutcome | None] | None = None
            ) -> list[MachineOutcome]:
        """``rpc <command> ... --upgrade-id <run_id>`` on every machine; the outcomes, each
        printed (``line``, unless it gives None) as it comes (``_upgrade_machines``).  Detached on the Machines
        API: the results are collected from ``releases/<app>-results/<run_id>/<command>/``."""
        detach = ["--detach", "--wait", f"{min(self.timeout, _DETACHED_WAIT_S):g}"] if self.detached else []
        board = (_ResultBoard(self.store, f"{results_prefix(self.app, run_id)}{command}/")
                 if self.detached else None)
        outcomes: list[MachineOutcome] = []

        def finished(outcome: MachineOutcome) -> None:
            outcomes.append(outcome)
            text = line(outcome)
            if text is not None:
                self.say(text)

        _upgrade_machines(self.api, machines,
                          lambda machine: self.commands.rpc(command, self.app, *args(machine),
                                                            "--upgrade-id", run_id, *detach),
                          timeout=self.timeout, max_concurrency=self.max_concurrency, commands=self.commands,
                          board=board, on_outcome=finished, stop_after_failure=stop_after_failure,
                          what=f"rpc {command}", settle=settle)
        return outcomes

    def short(self, command: str, machine_ids: Sequence[str], *args: str) -> dict[str, str | None]:
        """``rpc <command> ... args`` on each machine, one short exec each, concurrently:
        why it failed on each machine, None where it succeeded."""
        argv = self.commands.rpc(command, self.app, *args)

        def run(machine_id: str) -> tuple[str, str | None]:
            res, failure, _status = _exec_on(self.api, {"id": machine_id}, argv, EXEC_DEADLINE_S, self.commands)
            if res is not None and not res.ok:
                failure = (_last_line(res.stdout) if command == "ping" and res.exit_code == 1 else
                           command_failure(f"rpc {command}", self.commands, res.exit_code, res.stdout,
                                           res.stderr, res.exit_signal))
            return machine_id, failure

        return dict(_map_concurrently(run, list(machine_ids), self.max_concurrency))

    def restart(self, machines: Sequence[Mapping[str, Any]],
                expected: Mapping[str, str]) -> list[MachineOutcome]:
        """Restart each machine through the Machines API, so that it boots from what
        ``current.json`` names, wait for it to be started and for its processes to run
        ``expected[id]`` (at most ``timeout``), and judge it by what they run (``judge_restart``)."""
        argv = self.commands.rpc("info", self.app)

        def one(machine: Mapping[str, Any]) -> MachineOutcome:
            deadline = time.monotonic() + self.timeout
            want = expected.get(machine["id"], _IMAGE_CODE)
            for number, api in enumerate(self.restarters, 1):
                try:
                    api.restart(machine["id"])
                    api.wait(machine["id"], "started", timeout=max(1, min(60, int(self.timeout))))
                    break
                except MachinesAPIError as exc:
                    refused = exc.status in (401, 403)
                    if refused and number < len(self.restarters):
                        continue  # the next token may restart machines
                    fix = " (this token may not restart machines: a machine-exec token only execs)" if refused else ""
                    return MachineOutcome(machine["id"], machine.get("region", "?"), False,
                                          f"could not restart it to go back to {want}: {exc}{fix}; "
                                          f"`fly machine restart {machine['id']} -a {self.app}` does, and it "
                                          "boots from current.json")
            while True:
                # Its processes answer once they have booted (and caught up from current.json).
                outcome = judge_restart(machine, *machine_processes(self.api, machine, argv, EXEC_DEADLINE_S), want)
                if outcome.ok or time.monotonic() >= deadline:
                    return outcome
                time.sleep(_RESTART_POLL_S)

        outcomes = []
        for outcome in _map_concurrently(one, list(machines), self.max_concurrency):
            outcomes.append(outcome)
            self.say("↻ " + (f"✓ {outcome.machine_id} ({outcome.region}) restarted: runs {expected.get(outcome.machine_id, _IMAGE_CODE)}"
                             if outcome.ok else outcome.line()))
        return outcomes

    def discard(self, machine_ids: Sequence[str], run_id: str) -> None:
        """``rpc discard`` on each machine; one that fails is named: its staged files
        expire by themselves."""
        for machine_id, failure in self.short("discard", machine_ids, "--upgrade-id", run_id).items():
            if failure:
                self.say(f"· {machine_id} could not discard its staged files ({failure}); they expire by themselves")


def _previous_version(current: Mapping[str, Any] | None, machine: Mapping[str, Any]) -> str:
    hot = hot_upgrade_for_group(current, machine_group(machine))
    return str(hot["version"]) if hot else _IMAGE_CODE


def orchestrate(app: str, image_ref: str, *, store: Store | None = None, api: Any = None,
                root: str | os.PathLike[str] = ".",
                version: str | None = None, include: Iterable[str] | None = None,
                exclude: Iterable[str] | None = None, rollback: bool = False, rollback_to: str | None = None,
                force: bool = False, owner: str | None = None, lock_timeout: float = 300.0,
                timeout: float = 120.0, max_concurrency: int = 10, suspend_timeout: float = 10.0,
                process_groups: Iterable[str] = (), commands: MachineCommands | None = None,
                self_id: str | None = None, upgrade_id: str | None = None,
                local_tree: LocalTree | None = None, out: TextIO | None = None,
                canary: int | None = None, canary_wait: float | None = None, on_failure: str = "rollback",
                allow_missing: bool = False, health_check: str | None = None, health_ports: Sequence[int] = (),
                health_timeout: float = 5.0, plan: bool = False) -> FleetReport:
    """Push a release to every machine of ``app`` in two phases and report how each took it.

    Takes the deploy lock (``LockHeld`` when someone else holds it), packs the
    app under ``root`` into ``releases/<app>-<version>.tar.gz`` (the upload is
    skipped when the same content is already stored) -- or, with ``rollback``,
    takes the earlier history entry ``rollback_to`` (default: the previous one)
    instead of packing.  The phases are ``FLEET_PHASES``: phase 1 runs ``rpc
    prepare`` on every started machine (``select_machines``), which stages the
    release and has every process prepare it, touching nothing live; when any
    machine refuses, fails or cannot be reached (unless ``allow_missing``),
    every staged file is discarded, ``current.json`` is left as it was and the
    report says who refused and why.  Otherwise ``current.json`` records the
    release (the point of no return) and phase 2 runs ``rpc apply``: first on
    ``canary`` machines (``pick_canaries``), which then run it ``canary_wait``
    seconds, then on the rest, ``max_concurrency`` at a time.  With
    ``health_check`` each machine's apply ends with that HTTP check on itself
    (``health_ports_for``).  A failed apply with ``on_failure`` ``rollback``
    stops the machines not started yet and returns those that applied to the
    previous release the same two-phase way (``rpc prepare/apply --revert``),
    and ``current.json`` names the previous release again (a machine that kept
    nothing to revert from, having caught up at boot, is then restarted, to boot
    on it: ``to_restart``); with ``keep`` they
    stay.  ``plan`` stops after phase 1 (the staged files are discarded) and
    puts the plan in ``report.plan`` (``plan_document``), printed per process
    group.  A line per machine and phase as it finishes, and a summary, go to
    ``out``.  The lock is released in every case, Ctrl-C too.

    Phase 1 is also the check that every machine can take part, with no exec of
    its own before it: when the Machines API refuses the token on a machine and
    another client is there, the run says so, uses that one from then on and runs
    phase 1 again there (``judge_exec_refusals``); a failure before a machine had
    the release is explained by the preflight, with its fix (``to_explain``).  Such
    a failure stops the run like any refusal: exit 1, nothing live changed.  On the Machines API
    (``api.runs_detached``) each phase runs detached on its machine and its
    outcome is the result object it stores in ``releases/<app>-results/
    <upgrade_id>/<phase>/``: every exec stays short.  ``commands`` builds every
    machine-side command (default ``python3 /app/flydeploy.py``).

    ``store`` defaults to ``S3.from_env()``; ``api`` to the Machines API with
    the token in ``FLYDEPLOY_API_TOKEN`` (a minted exec token), falling back to
    ``FLY_API_TOKEN`` when the API refuses the first.

    Two places run it: the orchestrator machine (``orchestrate`` command,
    packing the new image's tree) and the developer's own machine with ``hot
    --direct`` (``local_tree``: the tree is packed as the image build would
    have copied it, and the release says it came from that tree; ``image_ref``
    is then the image the machines run).
    """
    if on_failure not in _CHOICES["on_failure"]:
        raise ConfigError(f"on_failure must be one of {', '.join(_CHOICES['on_failure'])}, got {on_failure!r}")
    out = out or sys.stdout
    store = store if store is not None else S3.from_env()
    clients = [(api, "the given token")] if api is not None else _machines_from_env(app)
    api = clients[0][0]
    commands = commands or MachineCommands.for_app_dir("python3", _DEFAULT_APP_DIR)
    self_id = self_id if self_id is not None else os.environ.get("FLY_MACHINE_ID")
    process_groups = tuple(process_groups)

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    started = time.monotonic()
    upgrade_id = upgrade_id or secrets.token_hex(16)
    lock = acquire_lock(store, app, owner=owner or f"{getpass.getuser()}@{socket.gethostname()}",
                        deployment_id=upgrade_id, timeout_s=lock_timeout, force=force)
    try:
        with _renewing(lock, lock_timeout):
            # Listed first to fail early on a bad token, and to learn the image the
            # machines run, which a missing current.json is seeded with.
            before = select_machines(api.list(), self_id=self_id, process_groups=process_groups)
            images = {machine_image(m) for m in before.targets + before.pending}
            entry, uploaded = _release_entry(store, app, image_ref, root=root, version=version, include=include,
                                             exclude=exclude, rollback=rollback, rollback_to=rollback_to, say=say,
                                             local_tree=local_tree)
            entry["process_groups"] = list(process_groups) or None
            current = read_current(store, app)[0]
            selection = select_machines(api.list(), self_id=self_id, process_groups=process_groups)
            report = FleetReport(app, entry["version"], entry["sha256"], entry["tarball_url"], uploaded,
                                 upgrade_id, [], list(selection.pending), list(selection.skipped))
            for machine in selection.pending:
                say(f"· {machine.get('id')} ({machine.get('region', '?')}) {machine.get('state')}: "
                    f"{pending_note(machine.get('state') or '')}")
            for machine, reason in selection.skipped:
                say(f"· {machine.get('id')} ({machine.get('region', '?')}) {reason}")
            fleet = _Fleet(clients, store, app, commands, timeout=timeout, max_concurrency=max_concurrency, say=say)
            release = ["--url", entry["tarball_url"], "--sha256", entry["sha256"]]

            # PREPARE, also the check that every machine can take part.
            targets = list(selection.targets)
            expiry = prepare_expiry_s(len(targets), timeout=timeout, max_concurrency=max_concurrency,
                                      canary_wait=canary_wait or 0)
            expires = ["--expires-in", f"{expiry:g}"]
            say(f"Phase 1: preparing {entry['version']} on {_plural(len(targets), 'machine')}, "
                f"{max_concurrency} at a time; nothing live changes")
            began = time.monotonic()
            # What explains a failure: the bucket too, from the machine, with its own credentials.
            bucket = ["--store", "--bucket", store.bucket] if isinstance(store, S3) else []
            report.prepared = _prepare_fleet(fleet, targets, upgrade_id, release + expires, bucket)
            report.prepare_s = time.monotonic() - began
            # JUDGE.
            report.verdict = judge_prepare(report.prepared, allow_missing=allow_missing)
            for line in report.verdict.notes():
                say(line)
            if plan or not report.verdict.go:
                fleet.discard(to_discard(report.prepared), upgrade_id)
                if plan:
                    report.planned = True
                    report.plan = plan_document(report, targets)
                    for line in plan_lines(report.plan):
                        say(line)
                report.duration_s = time.monotonic() - started
                say(report.summary())
                return report
            # RECORD: the point of no return.
            record_hot_upgrade(store, app, entry, image_ref=images.pop() if len(images) == 1 else None)
            report.previous = {m["id"]: _previous_version(current, m) for m in selection.targets}
            # Listed again: a machine that started meanwhile read the old record and prepared
            # nothing; its apply runs the whole upgrade.
            ready = {o.machine_id for o in report.verdict.ready}
            prepared = {o.machine_id for o in report.prepared}
            late = [m for m in select_machines(fleet.api.list(), self_id=self_id, process_groups=process_groups).targets
                    if m["id"] not in prepared]
            report.previous.update({m["id"]: _previous_version(current, m) for m in late})
            # In the order they became ready: should the API's pacing of execs per machine make
            # one wait, the first to have prepared applies first.
            order = {o.machine_id: index for index, o in enumerate(report.prepared)}
            apply_targets = sorted((m for m in targets if m["id"] in ready), key=lambda m: order[m["id"]]) + late
            # Told when current.json recorded the release, a machine reads no current.json.
            told = {machine_id: ["--deployed-at", entry["deployed_at"]]
                    for machine_id in accepting(report.prepared, "--deployed-at")}
            _apply_fleet(fleet, report, apply_targets, release=release, told=told, upgrade_id=upgrade_id,
                         canary=canary or 0,
                         canary_wait=canary_wait or 0.0, on_failure=on_failure,
                         health=(health_check, tuple(health_ports), health_timeout),
                         suspend_timeout=suspend_timeout)
            if report.failed and on_failure == "rollback":
                _revert_fleet(fleet, report, apply_targets, entry, suspend_timeout=suspend_timeout,
                              expires=expires)
            report.duration_s = time.monotonic() - started
            say(report.summary())
            return report
    finally:
        lock.release()


def _prepare_fleet(fleet: _Fleet, targets: Sequence[Mapping[str, Any]], run_id: str, args: list[str],
                   explain: list[str]) -> list[MachineOutcome]:
    """Phase 1: ``rpc prepare ... args`` on every target, each outcome printed as it comes.

    An exec the Machines API refuses for the token runs again with the next
    client, if there is one (``judge_exec_refusals``), which the fleet then uses
    for the rest of the run.  The failures ``to_explain`` picks get the
    preflight's reason and fix (``rpc preflight ... explain``), printed too.
    """
    outcomes: list[MachineOutcome] = []
    machines = list(targets)
    while machines:
        fallback = fleet.fallback() is not None
        ran = fleet.run("prepare", machines, run_id, lambda m: args,
                        lambda o: None if judge_exec_refusals([o], fallback=fallback)[0] else prepare_line(o))
        again, kept = judge_exec_refusals(ran, fallback=fallback)
        outcomes += kept
        if again:
            fleet.fall_back(again[0].api_status or 0, "prepare")
        machines = [m for m in machines if m["id"] in {o.machine_id for o in again}]
    failed = set(to_explain(outcomes))
    if not failed:
        return outcomes
    checks = {check.machine_id: check for check in run_preflight(
        fleet.api, fleet.app, [m for m in targets if m["id"] in failed], fleet.commands, extra=explain,
        max_concurrency=fleet.max_concurrency) if not check.ok}
    for check in checks.values():
        fleet.say(check.line())
    return [dataclasses.replace(o, error="; ".join(filter(None, (o.error, checks[o.machine_id].error))))
            if o.machine_id in checks else o for o in outcomes]


def _apply_fleet(fleet: _Fleet, report: FleetReport, machines: Sequence[Mapping[str, Any]], *,
                 release: list[str], told: Mapping[str, list[str]], upgrade_id: str, canary: int,
                 canary_wait: float, on_failure: str, health: tuple[str | None, tuple[int, ...], float],
                 suspend_timeout: float) -> None:
    """Phase 2: ``rpc apply`` on the canaries, then (when they took it and ran it
    ``canary_wait`` seconds) on the rest; with ``on_failure`` ``rollback`` a failure
    stops the machines not started yet.  ``told[machine_id]`` are flags of that
    machine's apply alone."""
    path, ports, health_timeout = health

    def args(machine: Mapping[str, Any]) -> list[str]:
        checks = ["--health-check", path, "--health-timeout", f"{health_timeout:g}",
                  *[word for port in health_ports_for(machine, ports) for word in ("--health-port", str(port))]]
        return [*release, *told.get(machine["id"], ()), "--suspend-timeout", f"{suspend_timeout:g}",
                *(checks if path else [])]

    def settle(machine: Mapping[str, Any], outcome: MachineOutcome) -> MachineOutcome | None:
        # Not reached because it stopped or suspended since phase 1 (Fly's proxy stops idle
        # machines): no failure, it boots on the release current.json names.
        if outcome.answered:
            return outcome
        state = next((m.get("state") for m in fleet.api.list() if m.get("id") == machine["id"]), None)
        if state not in _PENDING_STATES:
            return outcome
        report.pending.append({**machine, "state": state})
        fleet.say(f"· {machine['id']} ({machine.get('region', '?')}) {state} since phase 1: {pending_note(state)}")
        return None

    canaries = pick_canaries(machines, canary)
    chosen = {m["id"] for m in canaries}
    rest = [m for m in machines if m["id"] not in chosen]
    began = time.monotonic()
    if canaries:
        fleet.say(f"Phase 2: applying {report.version} to {_plural(len(canaries), 'canary', 'canaries')} first: "
                  + ", ".join(f"{m['id']} ({m.get('region', '?')}, {machine_group(m) or '-'})" for m in canaries))
        report.outcomes += fleet.run("apply", canaries, upgrade_id, args, MachineOutcome.line, settle=settle)
        if canary_wait and not report.failed:
            fleet.say(f"canaries took it; watching them {canary_wait:g} s before the rest")
            waited = time.monotonic()
            time.sleep(canary_wait)
            began += time.monotonic() - waited
            # Still there after the wait: every process alive, its agent answering.
            alive = fleet.short("ping", [m["id"] for m in canaries])
            report.outcomes = [dataclasses.replace(o, ok=False, error=f"after the canary wait: {alive[o.machine_id]}")
                               if alive.get(o.machine_id) else o for o in report.outcomes]
            for outcome in report.failed:
                fleet.say(outcome.line())
        if report.failed:
            report.apply_s = time.monotonic() - began
            fleet.say(f"a canary failed: the other {_plural(len(rest), 'machine')} did not change")
            return
    fleet.say(f"Phase 2: applying {report.version} to {_plural(len(rest), 'machine')}"
              + (" more" if canaries else "") + f", {fleet.max_concurrency} at a time")
    report.outcomes += fleet.run("apply", rest, upgrade_id, args, MachineOutcome.line,
                                 stop_after_failure=on_failure == "rollback", settle=settle)
    report.apply_s = time.monotonic() - began
    slowest = max((o.elapsed_s for o in report.outcomes), default=0.0)
    fleet.say(f"Phase 2 took {report.apply_s:.2f} s fleet-wide; the slowest machine {slowest:.2f} s")
    ids = {machine["id"] for machine in machines}
    untouched = len(machines) - len(report.outcomes) - sum(1 for m in report.pending if m["id"] in ids)
    if untouched:
        fleet.say(f"{_plural(untouched, 'machine')} not started after the failure: unchanged")


def _revert_fleet(fleet: _Fleet, report: FleetReport, machines: Sequence[Mapping[str, Any]],
                  entry: Mapping[str, Any], *, suspend_timeout: float, expires: list[str]) -> None:
    """``--on-failure rollback``: the machines that applied go back to what they ran
    before, prepared then applied (``--revert``), and ``current.json`` names the
    previous release again."""
    back = set(to_revert(report.outcomes))
    targets = [m for m in machines if m["id"] in back]
    run_id = report.upgrade_id + _REVERT_SUFFIX
    fleet.say(f"Rolling back: {_plural(len(targets), 'machine')} to the previous release "
              "(every machine that applied, the same two phases)")
    revert = ["--revert", report.upgrade_id]
    prepared = fleet.run("prepare", targets, run_id, lambda m: revert + expires, lambda o: "↩ " + prepare_line(o))
    ready = {o.machine_id for o in prepared if o.ok}
    report.reverted = [o for o in prepared if not o.ok]
    report.reverted += fleet.run("apply", [m for m in targets if m["id"] in ready], run_id,
                                 lambda m: [*revert, "--suspend-timeout", f"{suspend_timeout:g}"],
                                 lambda o: "↩ " + o.line())
    update_current(fleet.store, fleet.app, lambda doc: withdraw_hot_upgrade(doc or {}, entry))
    report.rolled_back = True
    fleet.say("current.json names the previous release again")
    # A machine that kept nothing to revert from (it caught up at boot during phase 2) goes
    # back the way it came: it restarts and boots from current.json, which names the previous
    # release now.
    restart = set(to_restart(report.reverted))
    if restart:
        fleet.say(f"restarting {', '.join(sorted(restart))}: kept nothing to revert from (caught up at boot "
                  "during phase 2); booting again from current.json")
        report.reverted = [o for o in report.reverted if o.machine_id not in restart] + fleet.restart(
            [m for m in targets if m["id"] in restart], report.previous)


def status_row(machine: Mapping[str, Any], current: Mapping[str, Any] | None,
               processes: Sequence[Mapping[str, Any]] | None = None, error: str | None = None, *,
               current_known: bool = True) -> dict:
    """One ``status`` row for a machine, from its Machine JSON, ``current.json``
    and the ``rpc info`` of its processes (``error`` when that could not be had);
    ``process_list`` has each process's pid, version and when it applied it.

    ``verdict`` is ``✓ up to date``, ``✗ NOT APPLIED``, ``STALE image`` (the
    machine runs another image than the one ``current.json`` is for) or the
    state of a machine that is not running (``stopped``: applies at next start;
    ``suspended``, with ``pending_note``: a resume does not boot it again).
    Without ``current_known`` (``current.json`` could not be read) a running
    machine's verdict is ``? current.json not read``: only what it runs is known.
    """
    state = machine.get("state") or "unknown"
    image = machine_image(machine)
    hot = hot_upgrade_for_group(current, machine_group(machine))
    versions = sorted({str(p["version"]) for p in processes or () if p.get("version")})
    applied = [str(p.get("applied_at") or p["deployed_at"]) for p in processes or ()
               if p.get("applied_at") or p.get("deployed_at")]
    if state == "suspended":
        verdict = f"suspended: {pending_note(state)}"
    elif state != "started":
        verdict = state
    elif not current_known and error is None:
        verdict = "? current.json not read"
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
            "processes": len(processes or ()), "verdict": verdict, "error": error,
            "process_list": [{"pid": p.get("pid"), "version": p.get("version"),
                              "applied_at": p.get("applied_at") or p.get("deployed_at")}
                             for p in processes or ()]}


def fleet_status(app: str, *, store: Store | None, api: Any, commands: MachineCommands | None = None,
                 process_groups: Iterable[str] = (), max_concurrency: int = 10,
                 timeout: float = EXEC_DEADLINE_S) -> list[dict]:
    """``status_row`` for every app machine: the Machines API list, ``current.json``
    and ``rpc info`` on the started machines, ``max_concurrency`` at a time.

    Without a ``store`` (no bucket credentials here) ``current.json`` is not
    read: the rows say what each machine runs, from ``rpc info`` alone.
    """
    current = read_current(store, app)[0] if store is not None else None
    selection = select_machines(api.list(), process_groups=process_groups)
    argv = (commands or MachineCommands.for_app_dir("python3", _DEFAULT_APP_DIR)).rpc("info", app)

    def info(machine: Mapping[str, Any]) -> tuple[str, list | None, str | None]:
        return machine["id"], *machine_processes(api, machine, argv, timeout)

    found = {machine_id: (processes, error) for machine_id, processes, error
             in _map_concurrently(info, selection.targets, max_concurrency)}
    machines = list(selection.targets) + list(selection.pending) + [m for m, _ in selection.skipped]
    return [status_row(m, current, *found.get(m["id"], (None, None)), current_known=store is not None)
            for m in machines]


def machine_processes(api: Any, machine: Mapping[str, Any], argv: list[str],
                      timeout: float) -> tuple[list[dict] | None, str | None]:
    """What ``rpc info`` (``argv``) says of the machine's processes: their info, and the
    errors of those that did not answer (None when all did); no list when it gave none."""
    res, failure, _status = _exec_on(api, machine, argv, timeout)
    if res is None:
        return None, failure
    try:
        processes = json.loads(res.stdout)
    except ValueError:
        processes = None
    if not isinstance(processes, list):
        return None, _last_line(res.stderr) or f"rpc info exited {res.exit_code} without a process list"
    processes = [p for p in processes if isinstance(p, dict)]
    errors = [f"pid {p.get('pid')}: {p.get('error')}" for p in processes if p.get("ok") is False]
    return processes, "; ".join(errors) or None


class LocalMachines:
    """The ``Machines`` interface for this host alone: local mode's "fleet".

    ``list`` shows one started machine, ``local``; ``exec`` runs the command
    here, so ``orchestrate`` and ``fleet_status`` reach every flydeploy agent
    of the app on this host through ``python -m flydeploy rpc`` exactly as on
    a Fly machine.  The command finds this copy of flydeploy first on its path.
    """

    MACHINE_ID = "local"
    # Upgrades run to the end inside the exec: there is no deadline here.
    runs_detached = False

    def __init__(self, app: str, *, cwd: str | os.PathLike[str] | None = None) -> None:
        self.app = app
        self.cwd = cwd

    def list(self) -> list[dict]:
        """One started machine: this host."""
        return [{"id": self.MACHINE_ID, "name": socket.gethostname(), "state": "started", "region": "local",
                 "config": {"image": "local", "metadata": {"fly_platform_version": "v2",
                                                           "fly_process_group": "app"}}}]

    def exec(self, machine_id: str, command: Sequence[str], *, timeout: float = 30) -> ExecResult:
        """Run ``command`` on this host; past ``timeout`` it is killed and 408 raised, as the API does."""
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
        try:
            done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, env=env,
                                  cwd=self.cwd, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise MachinesAPIError(408, f"the command ran past its {timeout:g} s timeout") from None
        except OSError as exc:
            return ExecResult(exit_code=127, stderr=f"{command[0]}: {exc.strerror}")
        code = done.returncode
        return ExecResult(exit_code=max(code, 0), exit_signal=max(-code, 0), stdout=done.stdout,
                          stderr=done.stderr)


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags every fleet upgrade takes (``--app``, ``--force``, timeouts,
    ``--max-concurrency``, ``--process-group``) to an argparse parser."""
    parser.add_argument("--app", help="the Fly app (default: fly.toml's app)")
    parser.add_argument("--force", action="store_true", help="take the deploy lock even if someone holds it")
    parser.add_argument("--lock-timeout", type=_number_argument("seconds"), metavar="S",
                        help="how long the deploy lock lasts, in seconds (default 300)")
    parser.add_argument("--timeout", type=_number_argument("seconds"), metavar="S",
                        help="how long one machine may take to upgrade, in seconds (default 120)")
    parser.add_argument("--max-concurrency", type=_number_argument("count"), metavar="N",
                        help="how many machines are upgraded at a time (default 10)")
    parser.add_argument("--suspend-timeout", type=_number_argument("seconds"), metavar="S",
                        help="how long a server may take to reach a safe point (default 10)")
    parser.add_argument("--process-group", action="append", dest="process_groups", metavar="G",
                        help="only machines of this process group (repeatable)")
    parser.add_argument("--canary", type=_number_argument("count"), metavar="N",
                        help="apply to N machines first (spread across regions and process groups), check "
                             "them, then the rest")
    parser.add_argument("--canary-wait", type=_number_argument("seconds"), metavar="S",
                        help="with --canary: how long the canaries run the release before the rest take it")
    parser.add_argument("--on-failure", choices=_CHOICES["on_failure"],
                        help="when a machine fails to apply: put every machine back on the previous release "
                             "(rollback, the default) or leave them as they are (keep)")
    parser.add_argument("--allow-missing", action="store_true", default=None,
                        help="a machine that cannot be reached before the apply catches up at its next boot "
                             "instead of stopping the upgrade")
    parser.add_argument("--health-check", type=_checked_argument(_url_path_problem), metavar="PATH",
                        help="after the apply, GET http://127.0.0.1:<port>PATH on each machine must answer 2xx")
    parser.add_argument("--health-port", type=_checked_argument(_port_problem, int), action="append",
                        dest="health_ports", metavar="P",
                        help="with --health-check: the port to check (repeatable; default: the internal "
                             "ports of the machine's services)")
    parser.add_argument("--health-timeout", type=_number_argument("seconds"), metavar="S",
                        help="with --health-check: how long each check may take, in seconds (default 5)")


def fleet_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given by the flags of ``add_fleet_arguments`` (and any of
    the other setting names present on ``args``), for ``load_config``.

    ``root`` is not one of them: a ``--root`` flag names the project directory,
    and the packed root inside it comes from ``[tool.flydeploy] root``.
    """
    return {key: getattr(args, key) for key in _SETTINGS
            if key != "root" and getattr(args, key, None) is not None}


def _add_orchestrate_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``python -m flydeploy orchestrate`` (what the orchestrator machine runs)."""
    parser = commands.add_parser(
        "orchestrate", allow_abbrev=False, help="push a release to every machine of the app",
        description="Pack the app in --root, store the release, record it and upgrade every machine.")
    add_fleet_arguments(parser)
    parser.add_argument("--image-ref", required=True, help="the image the release was built from")
    parser.add_argument("--version", help="the release version (default: the UTC time)")
    parser.add_argument("--root", default=".", help="the project directory (default: the current one)")
    parser.add_argument("--python", help="the Python that runs flydeploy on the machines")
    parser.add_argument("--owner", help="who deploys, shown to anyone who finds the lock held")
    parser.add_argument("--rollback", action="store_true", help="push an earlier release instead of packing")
    parser.add_argument("--to", help="with --rollback: the version to go back to (default: the previous)")
    parser.add_argument("--app-dir", help="where the app and flydeploy.py are on the machines (default /app)")
    parser.add_argument("--upgrade-id", type=_upgrade_id,
                        help="this run's id: the lock's deployment id and the folder of the results")
    parser.add_argument("--plan", action="store_true",
                        help="phase 1 only: print what the release would do on every machine, apply nothing")
    parser.add_argument("--json", action="store_true",
                        help=f"with --plan: the plan as JSON on a line of its own, after `{ORCHESTRATOR_MARKER} plan`")
    parser.set_defaults(handler=_orchestrate_command)


def _orchestrate_command(args: argparse.Namespace) -> int:
    """Run ``orchestrate`` with settings from the flags and the project in ``--root``.

    Exits 0, 1 (a machine failed), 2 (lock held, bad settings) or 130
    (interrupted), and says so on a marker line: ``fly machine run`` passes on
    only whether the command failed.
    """
    print(f"{ORCHESTRATOR_MARKER} started", flush=True)
    # Cancelling stops the machine with a signal: either one unwinds through the lock's release.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        config = load_config(args.root, overrides=fleet_overrides(args))
        app = config.require_app()
        options = config.orchestrate_options()
        if args.json and not args.plan:
            raise ConfigError("--json goes with --plan")
        report = orchestrate(app, args.image_ref, store=config.s3(),
                             version=args.version, rollback=args.rollback, rollback_to=args.to,
                             force=args.force, owner=args.owner, upgrade_id=args.upgrade_id, plan=args.plan,
                             **options)
        if args.json:
            print(f"{ORCHESTRATOR_MARKER} plan {json.dumps(report.plan, sort_keys=True)}", flush=True)
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
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{ORCHESTRATOR_MARKER} exit {code}", flush=True)
    return code


# ===========================================================================
# 4. Engine: servers, asyncio pause, change tracking, in-place code swap
# ===========================================================================


# --- Servers ----------------------------------------------------------------


class CallError(FlyDeployError):
    """A call got no reply.

    Either ``handle_call`` raised (the original exception is ``__cause__``;
    the server kept its previous state and keeps running), or the server is
    not running (``ServerStopped``), or no reply came in time (``CallTimeout``).
    """


class CallTimeout(CallError):
    """A call (or ``stop``, or ``get_state``) got no answer within its timeout.

    A reply that arrives later is dropped, never delivered to another call.
    """


class ServerStopped(CallError):
    """The server is not running: it was stopped, or stopped before it handled the call."""


@dataclasses.dataclass(frozen=True)
class Upgraded:
    """Sent to a server through ``handle_info`` after an upgrade changed its code.

    ``modules`` names the modules of that upgrade; it is the hook an
    application uses to re-render or notify its clients.
    """

    modules: tuple[str, ...]


_CALL = "call"
_CAST = "cast"
_INFO = "info"
_STOP = "stop"
# Not a message in the mailbox: the server's ``init``, which waits at the
# same gate as a message, so a pause also holds servers that are starting.
_INIT = "init"

# One condition guards every server's safe-point flags (``_held_by`` and
# ``_running``) and the registry, so a pause marks a thousand idle servers in
# one short critical section without waking any of their threads.  Replaced
# in a forked child, where a lock may have been held by a thread that is gone.
_safe_points = threading.Condition(threading.Lock())
_live_servers: dict[int, Server] = {}
# Servers whose ``init`` has not finished yet: a pause holds them too.
_starting_servers: dict[int, Server] = {}
_server_names: dict[str, Server] = {}
_server_serials = itertools.count(1)
# The hold of the pause in progress (gathering or holding), so a server that
# starts meanwhile joins it.
_active_hold: _Hold | None = None
# Which server, if any, the current thread runs.
_server_thread = threading.local()


class _Reply:
    """The answer slot of one call: each call waits on its own, so a late reply lands nowhere."""

    __slots__ = ("_done", "caller", "caller_loop", "value", "error", "stopped")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.caller = threading.get_ident()
        # The event loop the caller blocks, if it calls from a coroutine.
        self.caller_loop = _running_loop_here()
        self.value: Any = None
        self.error: BaseException | None = None
        self.stopped = False

    def set(self, value: Any = None, *, error: BaseException | None = None,
            stopped: bool = False) -> None:
        self.value, self.error, self.stopped = value, error, stopped
        self._done.set()

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(_wait_limit(timeout))


def _wait_limit(timeout: float | None) -> float | None:
    """A timeout as threading's waits take it: None (no limit) for None and ``math.inf``."""
    return None if timeout is None or timeout == math.inf else timeout


class _Mailbox:
    """A server's message queue; once closed it refuses new messages."""

    __slots__ = ("_ready", "_queue", "closed")

    def __init__(self) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple] = collections.deque()
        self.closed = False

    def put(self, message: tuple) -> bool:
        with self._ready:
            if self.closed:
                return False
            self._queue.append(message)
            self._ready.notify()
            return True

    def peek(self) -> tuple:
        """Wait for a message and return it, leaving it queued until ``pop``.

        Only the server's own thread takes messages out, so the one it looked
        at is still first when it pops; until then a fork's child still has it.
        """
        with self._ready:
            while not self._queue:
                self._ready.wait()
            return self._queue[0]

    def pop(self) -> tuple:
        with self._ready:
            return self._queue.popleft()

    def close(self) -> list[tuple]:
        """Refuse further messages and hand back the ones never handled."""
        with self._ready:
            self.closed = True
            left = list(self._queue)
            self._queue.clear()
            return left

    def reopen_after_fork(self) -> None:
        """Fresh lock in a forked child; calls queued in the parent have no caller here."""
        self._ready = threading.Condition(threading.Lock())
        self._queue = collections.deque(m for m in self._queue if m[0] != _CALL)


class _Hold:
    """Who holds servers at their safe points: a pause, ``get_state`` or a fork.

    While the hold is still being acquired, a marked server may yet answer a
    call (or run the ``init`` of a ``start``) for a thread the hold is waiting
    for: a marked server that is busy, or an event loop not parked yet,
    blocked in that very call.  Nothing has been changed so far, and refusing
    would make both wait for the deadline.  Once everything is held, only the
    holding thread itself gets through (``code_change`` may call or start a
    server).
    """

    __slots__ = ("thread", "helpers", "acquiring", "busy_threads", "waiting_loops", "adopted", "since")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        # Threads that act for the holding thread (a bounded code_change runs on one).
        self.helpers: set[int] = set()
        self.acquiring = True
        # Threads of marked servers in the middle of a message.
        self.busy_threads: set[int | None] = set()
        # Event loops asked to park that have not got there yet.
        self.waiting_loops: set[asyncio.AbstractEventLoop] = set()
        # Servers that started while a pause gathered or held (pauses only).
        self.adopted: list[Server] = []
        # When the first server was held (monotonic seconds), or None.
        self.since: float | None = None

    def acts_for(self, thread: int | None) -> bool:
        """Whether ``thread`` is the holding thread, or one acting for it."""
        return thread == self.thread or thread in self.helpers

    def lets_through(self, message: tuple) -> bool:
        if message[0] not in (_CALL, _INIT):
            return False
        sender: _Reply = message[2]
        return self.acts_for(sender.caller) or (self.acquiring and (
            sender.caller in self.busy_threads or sender.caller_loop in self.waiting_loops))


class Server:
    """A long-lived server: its own thread, a mailbox, state kept across upgrades.

    The GenServer of this library.  Subclass it and define the callbacks you
    need; start it with ``start``.  Messages are handled one at a time, in the
    order they arrived; between two messages the server is at a safe point,
    where an upgrade holds it, swaps its code and migrates its state through
    ``code_change``.  Do not override ``__init__``: ``init`` builds the state.

    Callbacks (run in the server's thread):

    - ``init(*args, **kwargs) -> state``
    - ``handle_call(request, state) -> (reply, new_state)``
    - ``handle_cast(message, state) -> new_state``
    - ``handle_info(message, state) -> new_state`` (also receives ``Upgraded``)
    - ``code_change(old_vsn, state, extra) -> new_state``
    - ``terminate(reason, state)``

    ``vsn`` is the version of the server's code, handed to ``code_change`` of
    the next version as ``old_vsn``.

    A handler that raises leaves the server with the state it had before the
    message (the same object: a handler that mutates its state in place and
    then raises keeps those mutations) and the server handles the next one.
    """

    vsn: Any = None

    # Attributes set by _setup; declared for readers and type checkers.
    _state: Any
    _name: str | None
    _serial: int
    _mailbox: _Mailbox
    _thread: threading.Thread
    _held_by: _Hold | None
    _running: bool
    _alive: bool
    _stopped: bool

    # --- callbacks (override these) ---

    def init(self, *args: Any, **kwargs: Any) -> Any:
        """Build and return the initial state; runs in the server's thread."""
        if args or kwargs:
            raise TypeError(f"{type(self).__qualname__} got start arguments but defines no "
                            f"init(); define init(self, ...) returning the initial state")
        return None

    def handle_call(self, request: Any, state: Any) -> tuple[Any, Any]:
        """Answer ``request``: return ``(reply, new_state)``."""
        raise NotImplementedError(f"{type(self).__qualname__} defines no handle_call(self, "
                                  f"request, state); define it to answer calls")

    def handle_cast(self, message: Any, state: Any) -> Any:
        """Handle a cast ``message``: return the new state."""
        raise NotImplementedError(f"{type(self).__qualname__} defines no handle_cast(self, "
                                  f"message, state); define it to handle casts")

    def handle_info(self, message: Any, state: Any) -> Any:
        """Handle a plain message (``send``, ``Upgraded``): return the new state."""
        if not isinstance(message, Upgraded):
            log.warning("%r got a message of type %s but defines no handle_info; ignored",
                        self, type(message).__name__)
        return state

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        """Migrate ``state`` from version ``old_vsn`` to this code; return the new state."""
        return state

    def terminate(self, reason: Any, state: Any) -> None:
        """Clean up when the server stops (``reason`` is what ``stop`` was given)."""

    # --- client API ---

    @classmethod
    def start(cls, *args: Any, name: str | None = None, **kwargs: Any) -> Server:
        """Start a server: run ``init(*args, **kwargs)`` in its own thread.

        Returns once ``init`` finished; an exception in ``init`` is raised here.
        ``name`` must be unique among live servers (``FlyDeployError`` otherwise).
        """
        server = cls.__new__(cls)
        server._setup(name)
        started = _Reply()
        server._thread = threading.Thread(
            target=server._main, args=(args, kwargs, started),
            name=f"flydeploy-server-{server._label()}", daemon=True)
        with _safe_points:
            if name is not None:
                if name in _server_names:
                    raise FlyDeployError(
                        f"a server named {name!r} is already running ({_server_names[name]!r}); "
                        f"stop it first or choose another name")
                _server_names[name] = server
            _starting_servers[server._serial] = server
            if _active_hold is not None:
                _adopt(server, _active_hold)
        try:
            server._thread.start()
        except BaseException:
            server._unregister()
            raise
        started.wait(None)
        if started.error is not None:
            raise started.error
        return server

    @property
    def name(self) -> str | None:
        """The name given to ``start``, or None."""
        return self._name

    @property
    def alive(self) -> bool:
        """True while the server runs (from the end of ``init`` until it stops)."""
        return self._alive

    def call(self, request: Any, timeout: float | None = 5.0) -> Any:
        """Send ``request`` and wait for the reply of ``handle_call``.

        Raises ``CallError`` (cause: the handler's exception) if the handler
        raised, ``CallTimeout`` if no reply came within ``timeout`` seconds
        (None or math.inf waits forever), ``ServerStopped`` at once if the
        server is not running.
        """
        if self._on_own_thread():
            raise CallError(f"{self!r} called itself: it would wait for its own reply; "
                            f"use the state handed to the handler instead")
        reply = _Reply()
        if not self._mailbox.put((_CALL, request, reply)):
            raise self._stopped_error("call")
        if not reply.wait(timeout):
            raise CallTimeout(f"{self!r} did not reply within {timeout} s to a call with a "
                              f"{type(request).__name__} request; the late reply will be dropped")
        if reply.stopped:
            raise self._stopped_error("call")
        if reply.error is not None:
            raise CallError(f"{self!r}.handle_call raised {type(reply.error).__name__}: "
                            f"{reply.error}; the server kept its previous state") from reply.error
        return reply.value

    def cast(self, message: Any) -> bool:
        """Queue ``message`` for ``handle_cast``; returns False (message dropped) if stopped."""
        return self._mailbox.put((_CAST, message, None))

    def send(self, message: Any) -> bool:
        """Queue ``message`` for ``handle_info``; returns False (message dropped) if stopped."""
        return self._mailbox.put((_INFO, message, None))

    def stop(self, reason: Any = "normal", timeout: float | None = 5.0) -> None:
        """Stop the server after the messages already queued; runs ``terminate``.

        Waits until its thread ended; ``CallTimeout`` if that takes longer
        than ``timeout``.  Calls still queued behind the stop fail with
        ``ServerStopped``.  Stopping a stopped server does nothing; a server
        stopping itself (from a handler) stops once that handler returned.
        """
        if self._on_own_thread():
            self._mailbox.put((_STOP, reason, None))
            return
        done = _Reply()
        if not self._mailbox.put((_STOP, reason, done)):
            self._thread.join(_wait_limit(timeout))
            return
        limit = _wait_limit(timeout)
        deadline = None if limit is None else time.monotonic() + limit
        if not done.wait(timeout):
            raise CallTimeout(f"{self!r} did not stop within {timeout} s: it is busy with "
                              f"earlier messages or held by an upgrade; it stops when it gets there")
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} server {self._label()}>"

    # --- the server's own thread ---

    def _setup(self, name: str | None) -> None:
        self._name = name
        self._serial = next(_server_serials)
        self._mailbox = _Mailbox()
        self._state = None
        self._held_by = None
        self._running = False
        self._alive = False
        self._stopped = False

    def _label(self) -> str:
        return repr(self._name) if self._name is not None else f"#{self._serial}"

    def _on_own_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _stopped_error(self, what: str) -> ServerStopped:
        return ServerStopped(f"{self!r} is not running, so the {what} was not handled; "
                             f"start the server again")

    def _main(self, args: tuple, kwargs: dict, started: _Reply) -> None:
        _server_thread.server = self
        # init waits at the gate of a message: a pause holding this server
        # keeps it from running code in the middle of a swap.
        self._enter_message((_INIT, None, started))
        try:
            self._state = self.init(*args, **kwargs)
        except BaseException as error:  # raised in the caller of start()
            self._unregister()
            self._leave_message()
            started.set(error=error)
            return
        with _safe_points:
            self._alive = True
            _starting_servers.pop(self._serial, None)
            _live_servers[self._serial] = self
        self._leave_message()
        started.set()
        self._serve()

    def _serve(self) -> None:
        """Handle messages until a stop; each one between two safe points."""
        _server_thread.server = self  # also for threads restarted after a fork
        reason: Any = "normal"
        done: _Reply | None = None
        try:
            while True:
                message = self._mailbox.peek()
                self._enter_message(message)
                self._mailbox.pop()
                if message[0] == _STOP:
                    _, reason, done = message
                    break
                try:
                    self._handle(message)
                finally:
                    self._leave_message()
        except BaseException as error:
            # A handler raised SystemExit/KeyboardInterrupt: the server dies
            # with it, but cleanly, so callers are not left waiting.
            reason = error
            log.error("%r stopped: a handler raised %s", self, type(error).__name__)
        finally:
            self._finish(reason, done)

    def _handle(self, message: tuple) -> None:
        kind, payload, reply = message
        if kind == _CALL:
            try:
                answer, state = _call_result(self, self.handle_call(payload, self._state))
            except Exception as error:
                reply.set(error=error)
            else:
                self._state = state
                reply.set(answer)
            return
        handler = self.handle_cast if kind == _CAST else self.handle_info
        try:
            self._state = handler(payload, self._state)
        except Exception:
            log.exception("%r: handle_%s raised; the state is kept", self, kind)

    def _finish(self, reason: Any, done: _Reply | None) -> None:
        try:
            self.terminate(reason, self._state)
        except Exception:
            log.exception("%r: terminate raised", self)
        finally:
            for kind, _, reply in self._mailbox.close():
                if reply is not None:
                    reply.set(stopped=kind == _CALL)
            self._unregister()
            self._leave_message()
            if done is not None:
                done.set()

    def _unregister(self) -> None:
        with _safe_points:
            self._alive = False
            self._stopped = True
            self._mailbox.closed = True
            _starting_servers.pop(self._serial, None)
            _live_servers.pop(self._serial, None)
            if self._name is not None and _server_names.get(self._name) is self:
                del _server_names[self._name]

    def _enter_message(self, message: tuple) -> None:
        with _safe_points:
            while self._held_by is not None and not self._held_by.lets_through(message):
                _safe_points.wait()
            self._running = True
            if self._held_by is not None:
                self._held_by.busy_threads.add(self._thread.ident)

    def _leave_message(self) -> None:
        with _safe_points:
            hold = self._held_by
            if hold is not None and hold.since is None:
                # Stamped before the server shows as held to readers without the lock.
                hold.since = time.monotonic()
            self._running = False
            if hold is not None:
                _safe_points.notify_all()


def _call_result(server: Server, result: Any) -> tuple[Any, Any]:
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{type(server).__qualname__}.handle_call must return (reply, new_state), "
                        f"not {type(result).__name__}")
    return result


def servers() -> list[Server]:
    """The live servers, in the order they were started."""
    with _safe_points:
        return list(_live_servers.values())


def _adopt(server: Server, hold: _Hold) -> None:
    """A server starting while a pause gathers or holds joins that pause.

    Once everything is held, its ``init`` waits until the pause ends (unless
    the holding thread itself started it); while the pause still gathers, it
    is waited for like any busy server.
    """
    hold.adopted.append(server)
    if not hold.acquiring:
        server._held_by = hold


def _hold_servers(targets: Iterable[Server], hold: _Hold,
                  deadline: float) -> tuple[list[Server], list[Server]]:
    """Hold servers at their safe points; returns (held, not reached by the deadline).

    Only busy servers are marked at first (they stop at their next safe
    point); idle ones are left alone, so calls to them keep working while the
    hold waits.  The moment no target is in the middle of a message, every
    idle one is held at once by setting a flag under the shared lock: no
    thread is woken.  A server that became busy meanwhile is marked in turn.
    At the deadline, those still busy are unmarked and the others held.
    Starting servers adopted by a pause count as targets.  A server whose
    own thread is asking cannot be held; one already held by another hold of
    this thread counts as held (and stays that hold's to release).
    """
    me = threading.get_ident()
    targets = list(targets)
    with _safe_points:
        while True:
            candidates = [server for server in itertools.chain(targets, hold.adopted)
                          if not server._stopped]
            own = [server for server in candidates if server._thread.ident == me]
            waiting = [server for server in candidates
                       if server._thread.ident != me and _waits_for(server, hold, me)]
            hold.busy_threads = {server._thread.ident for server in waiting if server._running}
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                break
            _safe_points.wait(_wait_limit(remaining))
        hold.busy_threads = set()
        for server in waiting:
            if server._held_by is hold:
                server._held_by = None
        late = {id(server) for server in itertools.chain(waiting, own)}
        held = []
        for server in {id(server): server for server in candidates}.values():
            if id(server) not in late and server._held_by is None:
                server._held_by = hold
            if server._held_by is hold:
                held.append(server)
        if held and hold.since is None:
            hold.since = time.monotonic()
        _safe_points.notify_all()
    return held, own + waiting


def _waits_for(server: Server, hold: _Hold, me: int) -> bool:
    """Whether ``hold`` must still wait for ``server``; marks it if it is busy.

    Call with ``_safe_points`` held.
    """
    holder = server._held_by
    if holder is not None and holder is not hold:
        return not holder.acts_for(me)  # another thread's hold: wait until it lets go
    if server._running and holder is None:
        server._held_by = hold  # stop at the next safe point
    return server._running


def _release_servers(held: Iterable[Server], hold: _Hold) -> None:
    """Let held servers go on; messages that arrived meanwhile are handled in order."""
    with _safe_points:
        for server in held:
            if server._held_by is hold:
                server._held_by = None
        _safe_points.notify_all()


def get_state(server: Server, timeout: float | None = 5.0) -> Any:
    """Read a server's state at a safe point (between two of its messages).

    Waits at most ``timeout`` seconds for the server to finish the message it
    is handling (``CallTimeout``); ``ServerStopped`` if it is not running.
    """
    if server._on_own_thread():
        raise CallError(f"{server!r} asked get_state for itself in the middle of a message; "
                        f"use the state handed to the handler instead")
    if not server.alive:
        raise server._stopped_error("get_state")
    holder = server._held_by
    if holder is not None and holder.acts_for(threading.get_ident()):
        return server._state
    hold = _Hold()
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    held, missed = _hold_servers([server], hold, deadline)
    try:
        if missed:
            raise CallTimeout(f"{server!r} did not reach a safe point within {timeout} s "
                              f"(a long message, or held by an upgrade)")
        if not held:
            raise server._stopped_error("get_state")
        return server._state
    finally:
        _release_servers(held, hold)


# --- asyncio loops and the pause --------------------------------------------


class SuspendTimeout(FlyDeployError):
    """Servers or event loops did not reach a safe point in time; nothing was changed.

    ``names`` lists every one that did not get there: server names (or
    reprs) and loop reprs.
    """

    def __init__(self, names: list[str], timeout: float | None = None) -> None:
        within = "" if _wait_limit(timeout) is None else f" within {timeout} s"
        super().__init__(
            f"did not reach a safe point{within}: {', '.join(names)}; everything was released "
            f"and nothing changed. Retry when they are less busy, or allow a longer suspend timeout")
        self.names = names


_attached_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_attached_loops_lock = threading.Lock()
# One pause at a time: two pauses each holding what the other waits for
# would both time out.
_pause_lock = threading.Lock()
_pause_owner: int | None = None


def attach_loop(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.AbstractEventLoop:
    """Register an event loop to be paused while code is swapped; returns it.

    Default: the loop running in this thread.  While paused, every coroutine
    of the loop is parked at an ``await``.  A closed or garbage-collected loop
    drops out by itself.
    """
    import asyncio

    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise FlyDeployError("attach_loop() found no running event loop in this thread: "
                                 "call it from a coroutine, or pass the loop: "
                                 "attach_loop(loop)") from None
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"attach_loop() needs an asyncio event loop, not {type(loop).__name__}")
    with _attached_loops_lock:
        _attached_loops.add(loop)
    return loop


def detach_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Stop pausing ``loop`` for upgrades (nothing happens if it was not attached)."""
    with _attached_loops_lock:
        _attached_loops.discard(loop)


def _live_loops() -> list[asyncio.AbstractEventLoop]:
    with _attached_loops_lock:
        closed = [loop for loop in _attached_loops if loop.is_closed()]
        for loop in closed:
            _attached_loops.discard(loop)
        return list(_attached_loops)


class _LoopBlock:
    """A callback that parks one event loop until released.

    Released before the loop got to it, it only records that the loop did:
    a probe of whether the loop still runs callbacks.
    """

    # How often a waiting pause looks whether a loop stopped running (a
    # stopped loop never runs the callback, yet has nothing to pause).
    _RECHECK_S = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop, *, park: bool = True) -> None:
        self.loop = loop
        self.parked_at: float | None = None
        self._reached = threading.Event()
        self._released = threading.Event()
        if not park:
            self._released.set()

    def schedule(self) -> bool:
        """Ask the loop to run the callback; False if it closed meanwhile (nothing to pause)."""
        try:
            self.loop.call_soon_threadsafe(self._park)
        except RuntimeError:
            return False
        return True

    def _park(self) -> None:
        if not self._released.is_set():
            self.parked_at = time.monotonic()
        self._reached.set()
        self._released.wait()

    def reached(self) -> bool:
        """Whether the loop got to the callback, or stopped running (nothing to wait for)."""
        return self._reached.is_set() or not self.loop.is_running() or self.loop.is_closed()

    def wait_reached(self, deadline: float) -> bool:
        """Wait until ``reached()``; False if the deadline passed first."""
        while not self.reached():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._reached.wait(min(remaining, self._RECHECK_S))
        return True

    def release(self) -> None:
        self._released.set()


def _running_loop_here() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, if any.

    Never imports asyncio: until something has, no loop can be running.
    """
    get_running_loop = getattr(sys.modules.get("asyncio"), "_get_running_loop", None)
    return get_running_loop() if get_running_loop is not None else None


def _check_pause_allowed() -> None:
    """Refuse a pause that could only wait for itself: clear misuse errors."""
    if _pause_owner == threading.get_ident():
        raise FlyDeployError(
            "a pause was entered while this thread already holds one (from code_change, "
            "__hot_upgrade__, an on-upgrade hook inside the swap, or a nested pause); do the "
            "work inside the first pause, or start the upgrade after it returned")
    server = getattr(_server_thread, "server", None)
    if server is not None and not server._stopped:
        raise FlyDeployError(
            f"a pause was started from the thread of {server!r}, which would have to wait "
            f"for itself to reach a safe point; start upgrades from another thread (e.g. "
            f"hand the request to a plain threading.Thread), not from a server's handler")


def _check_timeout(timeout: float, what: str = "a pause timeout") -> float:
    if not (_is_positive_seconds(timeout) or timeout == math.inf):
        raise FlyDeployError(f"{what} must be a positive number of seconds (or "
                             f"math.inf to wait without limit), got {timeout!r}")
    return float(timeout)


class _Pause:
    """Hold servers at their safe points and park every attached event loop.

    ``with _Pause(servers, timeout=10.0) as pause:`` — inside, no given server
    (nor one that started meanwhile) handles a message and no attached loop
    runs a callback, so the holder may read and replace ``server._state`` and
    call ``server.code_change``.  ``pause.servers`` lists every server held
    with a state: the given ones and those whose ``init`` finished while the
    pause gathered.  A server started while the pause holds runs its
    ``init`` once the pause ends.

    Gathering: busy servers are marked and waited for while idle servers and
    loops carry on (a server handler may wait on a loop, a coroutine may call
    a server); once no server is in a message, all of them are held in one
    step and then the loops are asked to park.  A loop that does not park
    within a short grace releases everything again, and the pause retries
    once that loop got to its callback: idle servers and loops are only held
    in short windows while the pause waits for a busy one.  One deadline
    (``timeout`` seconds, ``math.inf`` for none) covers everything; whatever
    did not get there in time is named in ``SuspendTimeout``, after
    everything was released.  ``held_ms`` is the longest time any server or
    loop was held, also when the pause failed.  Messages that arrive
    meanwhile are handled afterwards, in order.  The loop running in the
    pausing thread itself counts as parked: nothing else runs on it while the
    pause lasts.
    """

    # How long held servers wait for loops to park (and for calls from those
    # loops to be answered) before everything is released and tried again.
    _LOOP_GRACE_S = 0.05

    def __init__(self, servers: Iterable[Server], *, timeout: float, deadline: float | None = None) -> None:
        self.timeout = _check_timeout(timeout)
        # When the pause must end, code_change included: ``deadline`` when given (the upgrade's
        # one deadline, which began before the pause), else ``timeout`` after entry.
        self._given_deadline = deadline
        self.deadline = math.inf
        self.held_ms = 0.0
        self._servers = list(servers)
        self._hold = _Hold()
        self._held: list[Server] = []
        self._blocks: list[_LoopBlock] = []

    @property
    def servers(self) -> list[Server]:
        """The servers held with a state, in start order (valid inside the ``with``)."""
        return sorted((server for server in self._held if server._alive),
                      key=lambda server: server._serial)

    def __enter__(self) -> _Pause:
        global _pause_owner, _active_hold
        _check_pause_allowed()
        deadline = self.deadline = (self._given_deadline if self._given_deadline is not None
                                    else time.monotonic() + self.timeout)
        if not _pause_lock.acquire(timeout=_wait_limit(self.timeout) or -1):
            raise SuspendTimeout(["another pause in progress"], self.timeout)
        _pause_owner = threading.get_ident()
        with _safe_points:
            _active_hold = self._hold
            self._hold.adopted = list(_starting_servers.values())
        try:
            self._gather(deadline)
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end()

    def _gather(self, deadline: float) -> None:
        here = _running_loop_here()
        while True:
            probes = self._schedule(here, park=False)
            self._held, missed = _hold_servers(self._servers, self._hold, deadline)
            if missed:
                names = [server.name or repr(server) for server in missed]
                raise SuspendTimeout(names + [repr(probe.loop) for probe in probes
                                              if not probe.reached()], self.timeout)
            self._blocks = self._schedule(here, park=True)
            with _safe_points:
                self._hold.waiting_loops = {block.loop for block in self._blocks}
            grace = min(deadline, time.monotonic() + self._LOOP_GRACE_S)
            late = [block for block in self._blocks if not block.wait_reached(grace)]
            if not late and self._settle(grace):
                return
            # Try again once the late loops got to their callback; a server
            # still answering a loop's call is waited for by the next round.
            self._let_go()
            missed = [repr(block.loop) for block in late if not block.wait_reached(deadline)]
            if missed:
                raise SuspendTimeout(missed, self.timeout)

    def _schedule(self, here: asyncio.AbstractEventLoop | None, *,
                  park: bool) -> list[_LoopBlock]:
        blocks = []
        for loop in _live_loops():
            if loop is not here:
                block = _LoopBlock(loop, park=park)
                if block.schedule():
                    blocks.append(block)
        return blocks

    def _settle(self, grace: float) -> bool:
        """Wait until no held server is answering a loop's call; then let nothing through."""
        with _safe_points:
            self._hold.waiting_loops = set()
            while any(server._running for server in self._held):
                remaining = grace - time.monotonic()
                if remaining <= 0:
                    return False
                _safe_points.wait(remaining)
            self._hold.acquiring = False
            return True

    def _let_go(self) -> None:
        """Release every server and loop held so far and account for how long."""
        released_at = time.monotonic()
        starts = [block.parked_at for block in self._blocks if block.parked_at is not None]
        with _safe_points:
            if self._hold.since is not None:
                starts.append(self._hold.since)
            self._hold.since = None
            self._hold.waiting_loops = set()
            self._hold.acquiring = True
            held = self._held + self._hold.adopted
            self._held = []
        _release_servers(held, self._hold)
        for block in self._blocks:
            block.release()
        self._blocks = []
        if starts:
            self.held_ms = max(self.held_ms, (released_at - min(starts)) * 1000.0)

    def _end(self) -> None:
        global _pause_owner, _active_hold
        try:
            with _safe_points:
                _active_hold = None
            self._let_go()
        finally:
            _pause_owner = None
            _pause_lock.release()


# Fork: each child process gets its own running copy of every server (gunicorn
# --preload, multiprocessing).  Before the fork, servers are held at a safe
# point so the child's copy of each state lies between two messages; in the
# child, whose only thread is the forking one, every server thread is started
# again with fresh locks.
#
# How long a fork waits for busy servers to finish their message, so that the
# child's copy of each state is one between two messages.
_FORK_HOLD_TIMEOUT_S = 2.0
_fork_hold: tuple[_Hold, list[Server]] | None = None


def _before_fork() -> None:
    global _fork_hold
    hold = _Hold()
    held, missed = _hold_servers(servers(), hold, time.monotonic() + _FORK_HOLD_TIMEOUT_S)
    _fork_hold = (hold, held)
    for server in missed:
        if not server._on_own_thread():
            log.warning("fork while %r was busy: the child starts it with the state it had "
                        "before that message", server)


def _after_fork_in_parent() -> None:
    global _fork_hold
    if _fork_hold is not None:
        _release_servers(_fork_hold[1], _fork_hold[0])
        _fork_hold = None


def _after_fork_in_child() -> None:
    """Restart every server's thread (only the forking thread survives a fork)."""
    global _safe_points, _pause_lock, _pause_owner, _attached_loops_lock, _fork_hold
    global _active_hold
    _safe_points = threading.Condition(threading.Lock())
    _pause_lock = threading.Lock()
    _pause_owner = None
    _active_hold = None
    _fork_hold = None
    _starting_servers.clear()  # their init ran in threads the child does not have
    _attached_loops_lock = threading.Lock()
    here = _running_loop_here()
    for loop in list(_attached_loops):
        if loop is not here:  # its thread is gone; the child attaches its own loops
            _attached_loops.discard(loop)
    for name, server in list(_server_names.items()):
        if not server._alive and not server._on_own_thread():
            del _server_names[name]  # its init ran in a thread the child does not have
    for server in list(_live_servers.values()):
        server._held_by = None
        server._mailbox.reopen_after_fork()
        if server._on_own_thread():
            continue  # the forking thread is this server's: it carries on
        server._running = False
        server._thread = threading.Thread(target=server._serve, daemon=True,
                                          name=f"flydeploy-server-{server._label()}")
        server._thread.start()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


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

    def find_spec(self, fullname: str, path: list[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        """The spec the other finders give, with a tracking loader when tracked.

        Before any root is declared, every module that could turn out to be the
        application's (outside the standard library and site-packages) is
        recorded too, so that ``track`` later knows what was really loaded.
        """
        if fullname not in _tracker.started:
            _tracker.started[fullname] = len(_tracker.started)
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            # Another copy of this module (vendored twice, say) has its own.
            if type(finder).__name__ == type(self).__name__ or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        origin = spec.origin if spec.has_location else None
        if origin and (_tracker.covers(fullname, origin) if _tracker.roots else _tracker.may_cover(fullname, origin)):
            if type(spec.loader) is importlib.machinery.SourceFileLoader:
                spec.loader = _TrackingLoader(fullname, origin)
            elif _is_extension(origin):
                _tracker.remember(fullname, origin, None)
        return spec


def _in_site_packages(path: str) -> bool:
    parts = path.split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts


class _Tracker:
    """The tracked roots and what every tracked module was loaded from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.roots: tuple[str, ...] = ()
        self.loaded: dict[str, _Loaded] = {}
        # Recorded before any root was declared: name -> what it was loaded from.
        self.early: dict[str, _Loaded] = {}
        self.finder = _TrackingFinder()
        self._installation: tuple[str, ...] | None = None
        # The order modules first started importing (``sys.modules`` keeps the
        # order they finished): name -> position.
        self.started: dict[str, int] = {}

    def covers(self, name: str, path: str) -> bool:
        """Whether module ``name`` loaded from ``path`` is the application's.

        Under a root the app declared inside site-packages (an app installed
        there), all but the standard library is; under any other root, all
        but the standard library and site-packages.
        """
        if name in ("__main__", "__mp_main__", __name__) or not self.roots:
            return False
        path = os.path.realpath(path)
        roots = [root for root in self.roots if _is_under(path, root)]
        return bool(roots) and (not self._installed(path) or (
            _in_site_packages(path) and any(_in_site_packages(root) for root in roots)))

    def may_cover(self, name: str, path: str) -> bool:
        """Whether module ``name`` at ``path`` could be the application's once roots are declared."""
        # The main script runs once; this module must never swap itself.
        return name not in ("__main__", "__mp_main__", __name__) and not self._installed(os.path.realpath(path))

    def _installed(self, path: str) -> bool:
        if self._installation is None:
            self._installation = ()  # finding them imports modules, which come back here
            self._installation = _installation_dirs()
        return _in_site_packages(path) or any(_is_under(path, d) for d in self._installation)

    def remember(self, name: str, path: str, source: bytes | None) -> None:
        """Record what module ``name`` runs (for extensions: hash the file now)."""
        try:
            data = _read_bytes(path) if source is None else source
        except OSError:
            return
        with self.lock:
            (self.loaded if self.roots else self.early)[name] = _Loaded(path, _sha256(data), source)

    def add_roots(self, roots: list[str]) -> None:
        with self.lock:
            self.roots = tuple(dict.fromkeys(self.roots + tuple(roots)))
            self.install()
        for name, module in list(sys.modules.items()):
            origin = _module_origin(module) if module is not None else None
            if (origin is None or name in self.loaded or not self.covers(name, origin)
                    or not (origin.endswith(".py") or _is_extension(origin))):
                continue
            early = self.early.pop(name, None)
            if early is not None and early.path == origin:
                with self.lock:
                    self.loaded[name] = early
            elif _is_extension(origin):
                self.remember(name, origin, None)
            else:
                self.remember_imported(name, module, origin)
        self.early.clear()  # what no root covers is never needed

    def install(self) -> None:
        """Put the finder first on ``sys.meta_path`` (again, if something went before it)."""
        if self.finder not in sys.meta_path:
            sys.meta_path.insert(0, self.finder)

    def uninstall(self) -> None:
        """Take the finder off ``sys.meta_path`` (``track`` puts it back)."""
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self.finder)

    def remember_imported(self, name: str, module: types.ModuleType, path: str) -> None:
        """Record a module imported before anything recorded it: from its file, unless its code is not that file's.

        The file may have changed since the import (another process of the
        machine installed a release meanwhile): when a function or method of
        the live module differs from what the file compiles to, the module is
        recorded as loaded from unknown source, so ``modified_modules``
        reports it and an upgrade reloads it.
        """
        try:
            source = _read_bytes(path)
        except OSError:
            return
        if _code_differs(module, name, path, source):
            with self.lock:
                self.loaded[name] = _Loaded(path, _STALE, source)
        else:
            self.remember(name, path, source)

    def record_for(self, name: str) -> _Loaded | None:
        """What the live module ``name`` was loaded from, if it is tracked."""
        record = self.loaded.get(name)
        module = sys.modules.get(name)
        if record is None or module is None or _module_origin(module) != record.path:
            return None
        return record


# The digest of a module whose loaded code is not its file's: it matches no file.
_STALE = "stale"


def _live_functions(module: types.ModuleType, name: str, path: str) -> Iterator[types.FunctionType]:
    """The functions and methods that module ``name`` defined, as they are now."""
    def own(function: object) -> bool:
        return (isinstance(function, types.FunctionType) and function.__module__ == name
                and function.__code__.co_filename == path)

    for value in list(vars(module).values()):
        if own(value):
            yield value
        elif isinstance(value, type) and value.__module__ == name:
            for attribute in list(vars(value).values()):
                function = getattr(attribute, "__func__", attribute)
                if own(function):
                    yield function


def _code_differs(module: types.ModuleType, name: str, path: str, source: bytes) -> bool:
    """Whether a function or method of the live module is not what ``source`` compiles to."""
    try:
        compiled = compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return True
    written: dict[str, list[types.CodeType]] = collections.defaultdict(list)
    for code in _code_objects(compiled):
        written[code.co_qualname].append(code)
    return any(function.__code__ not in written.get(function.__code__.co_qualname, ())
               for function in _live_functions(module, name, path))


_tracker = _Tracker()
_tracker.install()  # from here on, what is imported is recorded as it is loaded


def track(*roots: str | os.PathLike[str]) -> list[str]:
    """Declare the application's source roots and start tracking its modules.

    Only modules whose file lies under a root are ever upgraded; the standard
    library never is, and site-packages only under a root inside it (an app
    installed there).  Without roots, the directory of ``__main__`` is used,
    else the current directory.  Each module's source hash is recorded from
    the bytes it is imported from, also for imports after flydeploy itself
    and before ``track``; a module imported earlier is hashed from its file
    now, and reported modified when its live code is not that file's.
    Calling ``track`` again adds roots.  Returns every tracked root.
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
    return _modified_modules({})


def _modified_modules(staged: Mapping[str, str]) -> list[str]:
    """``modified_modules`` with each file of ``staged`` (resolved path -> the
    path of the content it will have) read where it is staged."""
    changed = []
    for name in sorted(_tracker.loaded):
        record = _tracker.record_for(name)
        if record is None:
            if name not in sys.modules:  # unloaded: forget it
                with _tracker.lock:
                    _tracker.loaded.pop(name, None)
            continue
        try:
            data = _read_bytes(_staged_path(staged, record.path))
        except OSError:
            continue
        if _sha256(data) != record.digest:
            changed.append(name)
    return changed


def _staged_path(staged: Mapping[str, str], path: str) -> str:
    """Where the content ``path`` will have is read from: staged beside it, or the file itself."""
    return staged.get(os.path.realpath(path), path) if staged else path


# --- Plan: analysis of old and new source -----------------------------------
#
# Read-only: which statements of each module run again, which functions and
# classes take their new code in place, what must be refused, in what order
# the modules run.  The result, one ``_ModulePlan`` per module, is all the
# swap needs; nothing live is changed here.


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
# What ``@dataclass`` writes into a class: removed before it runs again.
_DATACLASS_GENERATED = frozenset({
    "__dataclass_fields__", "__dataclass_params__", "__match_args__", "__init__", "__repr__",
    "__eq__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__setattr__",
    "__delattr__", "__getstate__", "__setstate__"})
_SKIPPED_SCOPES = (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
# What a wrapper may hold on the way to the function it wraps.
_CODE_TYPES = (type, types.FunctionType, classmethod, staticmethod, property, types.MethodType,
               functools.partial, functools.cached_property, functools.singledispatchmethod)
# The accessor of a reused class statement (defs use "", "fget", "fset", "fdel").
_CLASS = "class"


def _is_a(value: object, kinds: type | tuple[type, ...]) -> bool:
    """``isinstance`` that never runs code of ``value`` (a proxy's ``__class__``)."""
    return issubclass(type(value), kinds)


def _dump(node: ast.AST) -> str:
    """A statement as its syntax tree: comments and formatting do not count."""
    return ast.dump(node, include_attributes=False)


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


def _surely_bound(statement: ast.stmt) -> set[str]:
    """The names a statement binds whenever it runs to its end: not those of
    an ``if`` branch the other branch lacks, of a loop's body, of a ``try``
    body or handler (only its ``finally`` block), or of a ``match`` case."""
    def block(statements: list[ast.stmt]) -> set[str]:
        return set().union(*map(_surely_bound, statements))
    if isinstance(statement, ast.If):
        return block(statement.body) & block(statement.orelse)
    if isinstance(statement, (ast.For, ast.AsyncFor, ast.While, ast.Match)):
        return set()
    if isinstance(statement, (ast.Try, ast.TryStar)):
        return block(statement.finalbody)
    if isinstance(statement, (ast.With, ast.AsyncWith)):
        return block(statement.body) | set().union(*(
            _bound_names(ast.Expr(item.optional_vars)) for item in statement.items if item.optional_vars))
    return _bound_names(statement)


def _read_names(statement: ast.stmt) -> set[str]:
    """Names a statement reads while it runs, with the dotted names it reads
    (``config.LIMIT``) and calls (``build()``), and ``NAME.*`` for a value it
    takes whole, neither called nor an attribute or item taken from it (what
    ``vars(Config)`` or ``app.config.from_object(Config)`` read is every
    attribute of ``Config``): function bodies and lambdas run later, so only
    their decorators, defaults and annotations count."""
    names: set[str] = set()
    stack: list[ast.AST] = [statement]
    held: set[int] = set()  # called, or an attribute taken from them: not read whole
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            stack.extend([*node.decorator_list, node.args, *([node.returns] if node.returns
                                                              else [])])
            continue
        if isinstance(node, ast.Lambda):
            stack.append(node.args)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            path = _dotted(node)  # ``b.VALUE``: the value another module gives
            if path is not None:
                names.add(path)
        elif isinstance(node, ast.Call):
            path = _dotted(node.func)  # ``build()``: what the code of ``build`` gives
            if path is not None:
                names.add(f"{path}()")
            held.add(id(node.func))
        if isinstance(node, (ast.Attribute, ast.Subscript)):  # ``del C.x``, ``C.x = 1``, ``C[x]``
            held.add(id(node.value))
        if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load) \
                and id(node) not in held:
            path = _dotted(node)
            if path is not None:
                names.add(f"{path}.*")
        stack.extend(ast.iter_child_nodes(node))
    return names


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of attributes on a name (items count as the
    object they are taken from); None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    if isinstance(node, ast.Subscript):
        return _dotted(node.value)
    return None


def _edited_objects(statement: ast.stmt, namespace: Mapping[str, object] | None = None
                    ) -> set[str]:
    """What a statement changes in place, as dotted names: items and
    attributes assigned or deleted, augmented assignments, and the objects
    whose methods it calls (``sys.meta_path.remove(hook)`` changes
    ``sys.meta_path``; a module's function, ``os.path.join(...)``, found
    such in ``namespace``, changes no module).  Function bodies and lambdas
    run later: not counted."""
    paths: set[str] = set()
    stack: list[ast.AST] = [statement]
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFS):
            stack.extend([*node.decorator_list, node.args])
            continue
        if isinstance(node, ast.Lambda):
            continue
        path = None
        if isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(node.ctx, (ast.Store,
                                                                                     ast.Del)):
            path = _dotted(node.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            path = _dotted(node.func.value)
            if path is not None and _is_a(_follow(namespace or {}, path), types.ModuleType):
                path = None
        elif isinstance(node, ast.AugAssign):
            path = _dotted(node.target)
        if path is not None:
            paths.add(path)
        stack.extend(ast.iter_child_nodes(node))
    return paths


def _follow(namespace: Mapping[str, object], path: str) -> object:
    """What a dotted name names in a module namespace, through modules only."""
    first, *rest = path.split(".")
    obj = namespace.get(first, _MISSING)
    for part in rest:
        if not _is_a(obj, types.ModuleType):
            return _MISSING
        obj = object.__getattribute__(obj, "__dict__").get(part, _MISSING)
    return obj


def _nested_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
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


def _definitions(body: list[ast.stmt], scope: str = ""
                 ) -> Iterator[tuple[str, str, ast.stmt]]:
    """Every def and class statement of a module and of its class bodies, as
    (qualname of the enclosing scope, qualname, statement), outer first."""
    for statement in _nested_statements(body):
        if isinstance(statement, (*_DEFS, ast.ClassDef)):
            qualname = f"{scope}.{statement.name}" if scope else statement.name
            yield scope, qualname, statement
            if isinstance(statement, ast.ClassDef):
                yield from _definitions(statement.body, qualname)


def _definition_key(qualname: str, statement: ast.stmt) -> tuple[str, str]:
    """How a def or class statement is recognised across versions: its
    qualname and, for a def, which property accessor it makes."""
    return qualname, (_accessor(statement) if isinstance(statement, _DEFS) else _CLASS)


def _accessor(definition: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """Which property accessor a ``def`` makes, from its decorators ("" if none)."""
    for decorator in definition.decorator_list:
        if isinstance(decorator, ast.Name) and decorator.id == "property":
            return "fget"
        if isinstance(decorator, ast.Attribute) and decorator.attr in ("getter", "setter",
                                                                      "deleter"):
            return {"getter": "fget", "setter": "fset", "deleter": "fdel"}[decorator.attr]
    return ""


@dataclasses.dataclass(frozen=True)
class _Scope:
    """One module or class body as written, compared by syntax tree."""

    dumps: tuple[str, ...]                  # each statement, in order
    statements: dict[str, tuple[str, ...]]  # name -> the statements that bind it
    header: str                             # a class's bases and keywords
    definitions: collections.Counter        # (qualname, accessor) -> how many statements
    decorators: dict[tuple[str, str], str]  # (qualname, accessor) -> its decorator list
    values: dict[str, str]                  # names assigned a value -> the assignment
    ignored: frozenset[str]                 # the names listed in an Enum's ``_ignore_``
    annotated: tuple[tuple[str, str], ...]  # annotated names in order, with the statement
    twice: frozenset[str]  # names bound by several plain defs (``_`` of singledispatch)
    # (qualname, accessor) of a def -> its parameters with their defaults and annotations
    signatures: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)


def _scope(body: list[ast.stmt], header: str, definitions: list[tuple[str, ast.stmt]]) -> _Scope:
    """The ``_Scope`` of one body, given the defs and classes written in it."""
    dumps = tuple(_dump(statement) for statement in body)
    statements: dict[str, list[str]] = collections.defaultdict(list)
    values: dict[str, str] = {}
    ignored: set[str] = set()
    annotated = []
    for statement, dump in zip(body, dumps):
        for name in _bound_names(statement):
            statements[name].append(dump)
        if isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in targets:
                values.update((name, dump) for name in _bound_names(ast.Expr(target)))
            if any(isinstance(t, ast.Name) and t.id == "_ignore_" for t in targets):
                value = statement.value
                for item in (value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]):
                    if isinstance(item, ast.Constant) and isinstance(item.value, str):
                        ignored.update(item.value.split())
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            annotated.append((statement.target.id, dump))
    counts = collections.Counter(_definition_key(q, s) for q, s in definitions)
    return _Scope(dumps, {name: tuple(d) for name, d in statements.items()}, header, counts,
                  {_definition_key(q, s): _dump(ast.List(s.decorator_list, ast.Load()))
                   for q, s in definitions},
                  values, frozenset(ignored), tuple(annotated),
                  frozenset(qualname.rpartition(".")[2] for (qualname, accessor), count
                            in counts.items() if count > 1 and not accessor),
                  signatures={_definition_key(q, s): _dump(ast.Tuple([s.args, *(
                      [s.returns] if s.returns else []), *getattr(s, "type_params", [])],
                      ast.Load())) for q, s in definitions if isinstance(s, _DEFS)})


def _scopes(tree: ast.Module) -> dict[str, _Scope]:
    """Every module-level and class scope of a module, keyed by qualname
    (``""`` is the module itself)."""
    children: dict[str, list[tuple[str, ast.stmt]]] = collections.defaultdict(list)
    classes: dict[str, ast.ClassDef] = {}
    for scope, qualname, statement in _definitions(tree.body):
        children[scope].append((qualname, statement))
        if isinstance(statement, ast.ClassDef):
            classes[qualname] = statement
    scopes = {"": _scope(tree.body, "", children[""])}
    for qualname, statement in classes.items():
        header = _dump(ast.Tuple(statement.bases + [k.value for k in statement.keywords],
                                 ast.Load())) + repr([k.arg for k in statement.keywords])
        scopes[qualname] = _scope(statement.body, header, children[qualname])
    return scopes


def _enum_members(scope: _Scope) -> dict[str, str]:
    """Member names of an Enum class as written, with the statement that
    assigns each (sunder and dunder names and ``_ignore_`` ones are no members)."""
    return {name: value for name, value in scope.values.items()
            if name not in scope.ignored and not (name.startswith("_") and name.endswith("_"))}


def _live_instances(classes: set[type]) -> dict[type, int]:
    """How many live objects are instances of each class (or a subclass)."""
    counts: dict[type, int] = collections.Counter()
    for owner, _ in _instances_of(classes):
        counts[owner] += 1
    return counts


def _instances_of(classes: set[type]) -> Iterator[tuple[type, object]]:
    """Every live object that is an instance of one of ``classes`` (or of a
    subclass), with that class."""
    owners: dict[type, type] = {}
    for cls in classes:
        pending = [cls]
        while pending:
            current = pending.pop()
            owners.setdefault(current, cls)
            pending.extend(type.__subclasses__(current))
    for obj in gc.get_objects():
        owner = owners.get(type(obj))
        if owner is not None:
            yield owner, obj


def _lookup(namespace: Mapping[str, object], qualname: str) -> object:
    """Follow a dotted qualname through a module namespace and class dicts."""
    parts = qualname.split(".")
    obj = namespace.get(parts[0], _MISSING)
    for part in parts[1:]:
        if not _is_a(obj, type):
            return _MISSING
        obj = obj.__dict__.get(part, _MISSING)
    return obj


def _defined_here(obj: object, module: str, qualname: str) -> bool:
    """Whether ``obj`` is the function or class a module defines at ``qualname``."""
    if not _is_a(obj, (types.FunctionType, type)):
        return False
    if _is_a(obj, types.FunctionType):
        return obj.__module__ == module and obj.__qualname__ == qualname
    return (type.__dict__["__module__"].__get__(obj) == module
            and type.__dict__["__qualname__"].__get__(obj) == qualname)


def _find_function(binding: object, module: str, qualname: str, accessor: str
                   ) -> tuple[types.FunctionType | None, list[object]]:
    """The function a module defines at ``qualname`` behind a live binding,
    looking through descriptors, bound methods, ``__wrapped__``, closures and
    partials without running any code of the objects; with the chain of
    wrappers that lead to it."""
    attribute = {"fget": property.fget, "fset": property.fset, "fdel": property.fdel}
    start = binding
    if _is_a(binding, property):
        start = attribute.get(accessor or "fget", property.fget).__get__(binding)
    pending: collections.deque = collections.deque([(start, [binding])])
    seen: set[int] = set()
    while pending and len(seen) < 64:
        obj, chain = pending.popleft()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if _defined_here(obj, module, qualname):
            return obj, [wrapper for wrapper in chain if wrapper is not obj]
        inner: list[object] = []
        if _is_a(obj, (classmethod, staticmethod, types.MethodType)):
            inner.append(obj.__func__)
        elif _is_a(obj, (functools.cached_property, functools.partial,
                         functools.singledispatchmethod)):
            inner.append(obj.func)
        wrapped = inspect.getattr_static(obj, "__wrapped__", None)
        if wrapped is not None:
            inner.append(wrapped)
        if _is_a(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    inner.append(cell.cell_contents)
                except ValueError:
                    pass
        else:  # an object keeping the function as an attribute (a click command's callback)
            inner.extend(_instance_values(obj))
        pending.extend((candidate, [*chain, obj] if obj is not binding else chain)
                       for candidate in inner
                       if _is_a(candidate, _CODE_TYPES)
                       or inspect.getattr_static(candidate, "__wrapped__", None) is not None)
    return None, []


def _instance_attributes(obj: object) -> dict:
    """An object's own attribute dict, the live one, read without running
    code of its class (empty when its ``__dict__`` is not the plain one)."""
    if _is_a(obj, type):
        return {}
    # The descriptor of the object's class, never the metaclass's (which
    # describes classes: a plain ``object()`` has no dict at all).
    descriptor = next((klass.__dict__["__dict__"] for klass in type(obj).__mro__
                       if "__dict__" in klass.__dict__), None)
    if type(descriptor) is not types.GetSetDescriptorType:
        return {}
    try:
        contents = descriptor.__get__(obj)
    except Exception:  # a descriptor of a base that does not apply to this object
        return {}
    return contents if type(contents) is dict else {}


def _instance_values(obj: object) -> list[object]:
    """The values of an object's own attributes, its ``__slots__`` included,
    read without running code of its class."""
    values = list(_instance_attributes(obj).values())
    for klass in type(obj).__mro__ if not _is_a(obj, type) else ():
        for descriptor in list(klass.__dict__.values()):
            if type(descriptor) is types.MemberDescriptorType:
                try:
                    values.append(descriptor.__get__(obj))
                except Exception:  # an empty slot, a descriptor that does not apply
                    continue
    return values


def _uses_class_cell(definition: ast.stmt) -> bool:
    """Whether a method needs the ``__class__`` cell (zero-argument ``super()``)."""
    return any(isinstance(node, ast.Name) and node.id in ("super", "__class__")
               for node in ast.walk(definition))


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and every code object nested in it."""
    yield code
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _code_objects(constant)


def _nested_codes(code: types.CodeType) -> dict[str, types.CodeType]:
    """The code of the functions defined inside ``code``, by unique qualname."""
    counts = collections.Counter(c.co_qualname for c in _code_objects(code))
    return {c.co_qualname: c for c in _code_objects(code)
            if c is not code and counts[c.co_qualname] == 1}


class _Target(NamedTuple):
    """The live function a def continues, the wrappers around it (a cache to
    clear) and what its name is bound to (kept when the decorators did not
    change; found while preparing, as only an upgrade rebinds a def's name)."""

    function: types.FunctionType
    wrappers: list[object]
    binding: object


@dataclasses.dataclass
class _InPlace:
    """The defs of one module that the swap does not run: their live
    functions with the new code and the code they run now, those whose
    docstring changes with the new and the current one, the caches to
    clear, and the names of those defined in a class, by its qualname."""

    functions: list[types.FunctionType] = dataclasses.field(default_factory=list)
    codes: list[types.CodeType] = dataclasses.field(default_factory=list)
    old_codes: list[types.CodeType] = dataclasses.field(default_factory=list)
    documented: list[types.FunctionType] = dataclasses.field(default_factory=list)
    docs: list[object] = dataclasses.field(default_factory=list)
    old_docs: list[object] = dataclasses.field(default_factory=list)
    caches: list[object] = dataclasses.field(default_factory=list)
    names: dict[str, set[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(set))


@dataclasses.dataclass
class _ModulePlan:
    """Everything prepared for reloading one module, before touching anything."""

    name: str
    module: types.ModuleType
    path: str
    source: bytes
    tree: ast.Module
    old: dict[str, _Scope]
    new: dict[str, _Scope]
    imports: set[str]
    doc: str | None
    rebuilt: set[str] = dataclasses.field(default_factory=set)  # classes made anew
    # Per scope qualname, the names whose binding statement runs again (the
    # statement changed, or it reads a name that takes a new value).
    rerun: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    # (qualname, accessor) -> the live function that takes the new code; a
    # def whose decorators did not change keeps its live binding and its
    # decorators are not run again.
    targets: dict[tuple[str, str], _Target] = dataclasses.field(default_factory=dict)
    undecorated: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    redecorated: set[str] = dataclasses.field(default_factory=set)  # dataclasses to regenerate
    changed_defs: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    # Qualnames several defs bind whose live function one new def continues.
    continuing: set[str] = dataclasses.field(default_factory=set)
    # Class qualname -> what its live instances get once the new code is in.
    migrations: dict[str, _Migration] = dataclasses.field(default_factory=dict)
    closures: list[tuple[types.FunctionType, types.CodeType]] = \
        dataclasses.field(default_factory=list)  # functions made by changed factories
    stars: list[_ModulePlan] = dataclasses.field(default_factory=list)  # ``import *`` sources
    # The decorators the rewrite took off unchanged defs: key -> (def, decorators).
    decorators: dict[tuple[str, str], tuple[ast.stmt, list[ast.expr]]] = \
        dataclasses.field(default_factory=dict)
    stale: set[int] = dataclasses.field(default_factory=set)  # closures made anew, by id
    stale_calls: set[str] = dataclasses.field(default_factory=set)  # their factories, as ``f()``
    kept: set[str] = dataclasses.field(default_factory=set)  # last bound by a statement left out
    # Class qualname -> the names (as the class dict holds them) of the statements left out.
    class_kept: dict[str, set[str]] = dataclasses.field(
        default_factory=lambda: collections.defaultdict(set))
    results: set[str] = dataclasses.field(default_factory=set)  # ``NAME()`` it imports changed
    # id of the code each live function runs now -> it and the code it runs after the swap
    # (by identity: equal code of another file is another function's).
    code_pairs: dict[int, tuple[types.CodeType, types.CodeType]] = \
        dataclasses.field(default_factory=dict)
    in_place: _InPlace = dataclasses.field(default_factory=lambda: _InPlace())
    swap_code: types.CodeType | None = None  # the rewritten new source


def _imported_modules(tree: ast.Module, package: str) -> set[str]:
    """Absolute names of the modules a module body imports (and their parents)."""
    names: set[str] = set()
    for statement in _nested_statements(tree.body):
        if isinstance(statement, ast.Import):
            targets = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            try:
                base = _imported_from(statement, package)
            except (ImportError, ValueError):
                continue
            targets = [base] + [f"{base}.{alias.name}" for alias in statement.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def _imported_from(statement: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module a ``from ... import`` reads."""
    if not statement.level:
        return statement.module or ""
    return importlib.util.resolve_name("." * statement.level + (statement.module or ""), package)


# The scopes of the source each module runs, kept from its last upgrade:
# module name -> (content hash of that source, its scopes).
_analysed: dict[str, tuple[str, dict[str, _Scope]]] = {}


def _syntax_refusal(exc: SyntaxError, path: str, module: str) -> UpgradeRefused:
    return UpgradeRefused(f"syntax error in {exc.filename or path}, line {exc.lineno}: "
                          f"{exc.msg}; fix it and upgrade again (nothing was changed)",
                          module=module)


def _plan_module(name: str, *, again: bool = False, staged: Mapping[str, str] = {}) -> _ModulePlan:
    """Read, parse and check one module's new source (``again``: run the
    source it runs now once more; ``staged``: read it where it is staged,
    as ``_modified_modules``); raises UpgradeRefused."""
    module = sys.modules.get(name)
    record = _tracker.record_for(name)
    if module is None or record is None:
        raise FlyDeployError(f"module {name!r} is not a tracked, imported module; "
                             "import it and call flydeploy.track(<source root>) first")
    try:
        source = (record.source if again and record.source is not None
                  else _read_bytes(_staged_path(staged, record.path)))
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
    except SyntaxError as exc:
        raise _syntax_refusal(exc, record.path, name) from None
    cached = _analysed.get(name)
    old = (cached[1] if cached is not None and cached[0] == record.digest
           else _scopes(ast.parse(record.source, record.path)))
    package = name if hasattr(module, "__path__") else name.rpartition(".")[0]
    plan = _ModulePlan(name, module, record.path, source, tree, old, _scopes(tree),
                       _imported_modules(tree, package), ast.get_docstring(tree, clean=False))
    _check_classes(plan)
    _check_instances(plan)
    _check_models(plan)
    return plan


def _within(qualname: str, prefixes: set[str]) -> bool:
    return any(qualname == p or qualname.startswith(p + ".") for p in prefixes)


def _live_class(plan: _ModulePlan, qualname: str) -> type | None:
    cls = _lookup(plan.module.__dict__, qualname)
    return cls if _defined_here(cls, plan.name, qualname) else None


def _check_classes(plan: _ModulePlan) -> None:
    """Refuse what cannot change in place: Enum members added, removed or
    given new values; a class whose resolved bases, metaclass, ``__slots__``
    names or named tuple or slotted dataclass fields changed and that has live
    instances or subclasses.  Such a class without either is rebuilt, and so
    is one whose bases are only written otherwise (``object``, ``Generic``
    or ``Protocol`` added or removed); with either, that one changes in place."""
    reshaped: dict[type, str] = {}
    changes: dict[type, str] = {}
    respelled: dict[type, str] = {}  # bases written otherwise, resolved the same
    statements = {qualname: statement for _, qualname, statement in _definitions(plan.tree.body)
                  if isinstance(statement, ast.ClassDef)}
    for qualname, scope in plan.new.items():
        before = plan.old.get(qualname)
        cls = _live_class(plan, qualname) if qualname else None
        if before is None or cls is None:
            continue
        where = f"{plan.name}.{qualname}"
        if issubclass(cls, enum.Enum):
            old_members, new_members = _enum_members(before), _enum_members(scope)
            if old_members.keys() != new_members.keys():
                added = sorted(new_members.keys() - old_members.keys())
                removed = sorted(old_members.keys() - new_members.keys())
                raise UpgradeRefused(f"cold deploy required: Enum {where} members changed "
                                     f"(added {added}, removed {removed}); live members cannot "
                                     "be added or removed in place: keep the members as they "
                                     "were to upgrade hot, or deploy cold", module=plan.name)
            changed = sorted(k for k in old_members if old_members[k] != new_members[k])
            if changed:
                raise UpgradeRefused(f"cold deploy required: Enum {where} members {changed} "
                                     "changed value: live members keep theirs, so keep the "
                                     "values to upgrade hot, or deploy cold", module=plan.name)
        change = _layout_change(plan, cls, before, scope, statements[qualname])
        if change:
            reshaped[cls], changes[cls] = qualname, change
        elif before.header != scope.header:
            respelled[cls] = qualname
    if respelled:  # the same class: made anew as a fresh import would, unless something holds it
        live = _live_instances(set(respelled))
        plan.rebuilt.update(qualname for cls, qualname in respelled.items()
                            if not live.get(cls) and not type.__subclasses__(cls))
    if not reshaped:
        return
    advice = ("; to upgrade it in place keep its bases, metaclass and slot names as they were "
              "(adding Generic[...] or Protocol, reordering __slots__ or spelling a base "
              "differently is fine), or give the new layout a new class name and convert "
              "the live objects in the module's __hot_upgrade__(old_globals); else deploy cold")
    for cls, qualname in reshaped.items():
        subclasses = [s for s in type.__subclasses__(cls) if s not in reshaped]
        if subclasses:
            raise UpgradeRefused(
                f"cold deploy required: class {plan.name}.{qualname} changed {changes[cls]} and "
                f"has subclasses ({', '.join(f'{s.__module__}.{s.__qualname__}' for s in subclasses)})"
                f" that would keep deriving from the old class{advice}", module=plan.name)
    for cls, count in _live_instances(set(reshaped)).items():
        raise UpgradeRefused(f"cold deploy required: class {plan.name}.{reshaped[cls]} changed "
                             f"{changes[cls]} and has {count} live instance(s){advice}",
                             module=plan.name)
    plan.rebuilt.update(reshaped.values())


# Bases that change neither the layout of instances nor an attribute lookup of
# existing ones: compared without them.
_NEUTRAL_BASES = (object, Generic, Protocol)


def _layout_change(plan: _ModulePlan, cls: type, before: _Scope, scope: _Scope,
                   statement: ast.ClassDef) -> str:
    """What a new class statement changes about the live class's instances
    ("" if nothing): its resolved bases (``Generic``, ``Protocol`` and
    ``object`` aside), its metaclass, its slot names, or the fields of a
    named tuple or of a slotted dataclass."""
    resolved = None
    if _spelled_bases(before.header) != _spelled_bases(scope.header):
        resolved = _resolve_bases(plan, statement)
        if resolved is None:  # bases the prepare phase cannot resolve
            return "its base list or metaclass"
    if resolved is not None:
        bases, metaclasses = resolved
        old_bases = tuple(b for b in cls.__bases__ if b not in _NEUTRAL_BASES)
        new_bases = tuple(b for b in bases if b not in _NEUTRAL_BASES)
        if old_bases != new_bases:
            names = ", ".join(b.__qualname__ for b in old_bases) or "object"
            return (f"its base list ({names} -> "
                    f"{', '.join(b.__qualname__ for b in new_bases) or 'object'})")
        if type(cls) not in metaclasses:
            return f"its metaclass ({type(cls).__qualname__} -> {metaclasses[0].__qualname__})"
    old_slots, new_slots = before.statements.get("__slots__"), scope.statements.get("__slots__")
    if old_slots != new_slots:  # same names in another order or spelling are no change
        value = next((s.value for s in statement.body if isinstance(s, (ast.Assign, ast.AnnAssign))
                      and "__slots__" in _bound_names(s)), None)
        try:
            new_names = _slot_names(ast.literal_eval(value)) if value is not None else None
        except (ValueError, TypeError, SyntaxError):
            new_names = None
        old_names = _slot_names(cls.__dict__.get("__slots__"))
        if old_slots is None or new_names is None or old_names != new_names:
            return f"its __slots__ ({sorted(old_names or ())} -> {sorted(new_names or ())})"
    if ((issubclass(cls, tuple) and hasattr(cls, "_fields"))
            or ("__slots__" in cls.__dict__ and "__dataclass_fields__" in cls.__dict__)):
        if before.annotated != scope.annotated:
            return "its fields"
    return ""


def _slot_names(slots: object) -> frozenset[str] | None:
    if slots is None:
        return None
    try:
        return frozenset([slots] if isinstance(slots, str) else slots)
    except TypeError:
        return None


def _spelled_bases(header: str) -> str:
    """A class header as written, without the bases that change nothing."""
    for neutral in ("Name(id='object', ctx=Load())", "Name(id='Generic', ctx=Load())",
                    "Name(id='Protocol', ctx=Load())"):
        header = header.replace(neutral + ", ", "").replace(", " + neutral, "").replace(neutral, "")
    return header


def _resolve_bases(plan: _ModulePlan, statement: ast.ClassDef
                   ) -> tuple[tuple, tuple[type, type]] | None:
    """The classes a class statement's bases name and its metaclass, found in
    the live module without running code, with the metaclass the bases
    other than ``Generic``, ``Protocol`` and ``object`` give (a live class
    may keep that one); None when a base is anything but
    a (subscripted) name or attribute of a module or class whose binding
    the upgrade keeps."""
    namespace, old, new = plan.module.__dict__, plan.old[""], plan.new[""]

    def resolve(node: ast.expr) -> object:
        if isinstance(node, ast.Subscript):  # Generic[T], Base[int]: the class it derives from
            return resolve(node.value)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value)
            if not _is_a(owner, (types.ModuleType, type)):
                return _MISSING
            return inspect.getattr_static(owner, node.attr, _MISSING)
        if not isinstance(node, ast.Name):
            return _MISSING
        value = namespace.get(node.id, _MISSING)
        if value is _MISSING:
            return getattr(builtins, node.id, _MISSING)
        if (old.statements.get(node.id) != new.statements.get(node.id)
                and not _defined_here(value, plan.name, node.id)):
            return _MISSING  # the upgrade may bind it anew
        return value

    bases = tuple(resolve(base) for base in statement.bases)
    explicit = [resolve(k.value) for k in statement.keywords if k.arg == "metaclass"]
    if not all(_is_a(b, type) for b in (*bases, *explicit)):
        return None
    if any(k.arg != "metaclass" for k in statement.keywords):
        return None  # class keywords go to __init_subclass__ or a metaclass: compare spelling

    def most_derived(bases: tuple) -> type:  # the metaclass type() would pick
        metaclass = explicit[0] if explicit else type
        for base in bases:
            if issubclass(type(base), metaclass):
                metaclass = type(base)
        return metaclass

    return bases, (most_derived(bases),
                   most_derived(tuple(b for b in bases if b not in _NEUTRAL_BASES)))


_MIGRATE = "__hot_migrate__"


@dataclasses.dataclass(frozen=True)
class _Migration:
    """What the live instances of one class get after its new code is in:
    fields of a dataclass made by their default factory, then the class's
    ``__hot_migrate__``; afterwards none may lack an attribute in ``needed``."""

    needed: frozenset[str]
    factories: frozenset[str]
    hook: bool


def _check_instances(plan: _ModulePlan) -> None:
    """Refuse to leave live instances that the new code of their class cannot
    use: it reads ``self.NAME``, which its ``__init__`` sets but the old one
    did not and the class provides no default for (or, in a dataclass, a new
    field without a default), and a live instance lacks it.  A class whose
    new body defines ``__hot_migrate__`` migrates them instead; new dataclass
    fields with a default factory are filled in."""
    old_classes = None
    for _, qualname, statement in _definitions(plan.tree.body):
        before = plan.old.get(qualname)
        if (not isinstance(statement, ast.ClassDef) or before is None
                or before.dumps == plan.new[qualname].dumps or _within(qualname, plan.rebuilt)):
            continue
        cls = _live_class(plan, qualname)
        if cls is None:
            continue
        reads, stores = _self_attributes(statement)
        needed = reads & stores
        required, factories = _new_dataclass_fields(cls, statement)
        needed = (needed - plan.new[qualname].statements.keys()) | required
        needed = {name for name in needed
                  if not any(name in base.__dict__ for base in cls.__mro__[1:])}
        if needed:
            if old_classes is None:
                old_classes = {q: s for _, q, s in _definitions(
                    ast.parse(_tracker.record_for(plan.name).source).body)}
            needed -= _self_attributes(old_classes[qualname])[1] - required
        hook = _MIGRATE in plan.new[qualname].statements
        if not (needed or factories or hook):
            continue
        if not hook:
            for name in sorted(needed):
                count = sum(1 for _, obj in _instances_of({cls}) if _lacks(obj, name))
                if count:
                    raise UpgradeRefused(
                        f"cold deploy required: class {plan.name}.{qualname}: its new code "
                        f"reads self.{name}, which its old __init__ never set, and {count} live "
                        f"instance(s) lack it; define `def {_MIGRATE}(self, old): self.{name} = "
                        "...` in the class (it runs on each live instance during the upgrade; "
                        "`old` holds the class's attributes from before), or give the class a "
                        f"default (`{name} = ...` in its body), or let no instance outlive the "
                        "upgrade", module=plan.name)
        plan.migrations[qualname] = _Migration(frozenset(needed), frozenset(factories), hook)


def _self_attributes(statement: ast.ClassDef) -> tuple[set[str], set[str]]:
    """The attributes the methods of a class body read on their first
    argument (``self``), and those its ``__init__`` (or a dataclass's
    ``__post_init__``) sets: what every instance is meant to have."""
    reads: set[str] = set()
    stores: set[str] = set()
    for method in statement.body:
        if not isinstance(method, _DEFS) or not method.args.args or any(
                isinstance(d, ast.Name) and d.id in ("staticmethod", "classmethod")
                for d in method.decorator_list):
            continue
        me = method.args.args[0].arg
        initialiser = method.name in ("__init__", "__post_init__")
        for node in ast.walk(method):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == me):
                if isinstance(node.ctx, ast.Load):
                    reads.add(node.attr)
                elif initialiser:
                    stores.add(node.attr)
    return reads, stores


def _new_dataclass_fields(cls: type, statement: ast.ClassDef) -> tuple[set[str], set[str]]:
    """The fields a new body adds to a live dataclass: those without a
    default, and those made by a default factory (a default stays a class
    attribute that old instances read)."""
    fields = cls.__dict__.get("__dataclass_fields__")
    required: set[str] = set()
    factories: set[str] = set()
    if fields is None:
        return required, factories
    for node in statement.body:
        if (not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name)
                or node.target.id in fields or "ClassVar" in _dump(node.annotation)):
            continue
        value = node.value
        if value is None:
            required.add(node.target.id)
        elif (isinstance(value, ast.Call) and (getattr(value.func, "id", None) == "field"
                                                or getattr(value.func, "attr", None) == "field")):
            keywords = {k.arg for k in value.keywords}
            if "default_factory" in keywords:
                factories.add(node.target.id)
            elif "default" not in keywords:
                required.add(node.target.id)
    return required, factories


def _lacks(obj: object, name: str) -> bool:
    """Whether a live object has no attribute ``name`` of its own nor from its
    class, found without running code of it."""
    if name in _instance_attributes(obj):
        return False
    attribute = inspect.getattr_static(type(obj), name, _MISSING)
    if type(attribute) is types.MemberDescriptorType:  # a slot: set or not
        try:
            attribute.__get__(obj)
        except AttributeError:
            return True
        return False
    return attribute is _MISSING and inspect.getattr_static(type(obj), "__getattr__",
                                                            None) is None


def _rerun_in_order(body: list[ast.stmt], old: _Scope | None, new: _Scope, outer: set[str],
                    namespace: Mapping[str, object] | None = None
                    ) -> tuple[set[str], list[int]]:
    """Which statements of a scope must run again, by the rule a kept value
    obeys: it is kept only when every statement that computes or edits it,
    and everything those read, is unchanged.

    Statements that bind or change the same object form one group (``TABLE
    = [...]`` and a later ``del TABLE[0]``; a loop removing a hook from
    ``sys.meta_path`` and the line appending it again), and a group runs
    again as a whole, in order, when any of its statements must: one that
    changed (compared as syntax trees), or one that reads a name taking a
    new value (``outer``: ``NAME``, ``module.NAME`` of another module,
    ``NAME()`` for a function whose code changed, ``NAME.*`` for a class
    whose attributes changed, read whole), or one that assigns a
    name missing from the live ``namespace`` (when given) that no ``del``
    of the body removes and that it binds whenever it runs (not one of a
    branch the first run did not take, ``if MAIL_SERVER: handler = ...``).
    ``def`` and ``class`` statements always run, through the hooks that
    keep their objects.  Returns the names the
    statements that run again bind, and the indexes of the statements that
    need not run."""
    remaining = collections.Counter(old.dumps if old is not None else ())
    must = set()
    for index, dump in enumerate(new.dumps):
        if remaining[dump] > 0:
            remaining[dump] -= 1
        else:
            must.add(index)
    definitions = (*_DEFS, ast.ClassDef, ast.Import, ast.ImportFrom)
    reads = [_read_names(statement) for statement in body]
    binds = [_bound_names(statement) for statement in body]
    if namespace:
        deleted = {target.id for statement in _nested_statements(body)
                   if isinstance(statement, ast.Delete)
                   for target in statement.targets if isinstance(target, ast.Name)}
        must.update(index for index, statement in enumerate(body)
                    if not isinstance(statement, definitions)
                    and not _surely_bound(statement) - deleted <= namespace.keys())
    keys = [set() if isinstance(statement, definitions)
            else binds[i] | _edited_objects(statement, namespace) for i, statement in enumerate(body)]
    # What a statement that runs again gives a new value: an import only the
    # names it binds to another object than the live one.
    gives = [_rebound(statement, namespace) if namespace and isinstance(
        statement, (ast.Import, ast.ImportFrom)) else binds[index]
             for index, statement in enumerate(body)]
    sharing: dict[str, list[int]] = collections.defaultdict(list)
    for index, names in enumerate(keys):
        for key in names:
            sharing[key].append(index)
    new_values = set(outer)
    pending = list(must)
    while True:
        while pending:
            index = pending.pop()
            if not isinstance(body[index], definitions[:3]):
                new_values |= gives[index] | keys[index]
            for key in keys[index]:
                for other in sharing[key]:
                    if other not in must:
                        must.add(other)
                        pending.append(other)
        pending = [index for index in range(len(body))
                   if index not in must and reads[index] & new_values]
        if not pending:
            break
        must.update(pending)
    rerun = set().union(*(gives[index] for index in must
                          if not isinstance(body[index], definitions[:3])))
    return rerun, [index for index in range(len(body)) if index not in must]


def _rebound(statement: ast.Import | ast.ImportFrom, namespace: Mapping[str, object]
             ) -> set[str]:
    """The names an import statement binds to another object than the one a
    module's live ``namespace`` holds (``from x import a, b`` becoming ``from
    x import a, b, c`` gives ``a`` and ``b`` nothing new)."""
    rebound = set()
    if isinstance(statement, ast.Import):
        for alias in statement.names:
            bound = alias.asname or alias.name.split(".")[0]
            module = sys.modules.get(alias.name if alias.asname else bound)
            if module is None or module is not namespace.get(bound, _MISSING):
                rebound.add(bound)
        return rebound
    try:
        base = _imported_from(statement, namespace.get("__package__") or "")
    except (ImportError, ValueError):
        return _bound_names(statement)
    module = sys.modules.get(base)
    contents = object.__getattribute__(module, "__dict__") if _is_a(module, types.ModuleType) \
        else {}
    for alias in statement.names:
        bound = alias.asname or alias.name
        value = contents.get(alias.name, sys.modules.get(f"{base}.{alias.name}", _MISSING))
        if alias.name != "*" and (value is _MISSING or value is not namespace.get(bound, _MISSING)):
            rebound.add(bound)
    return rebound


def _rewrite(plan: _ModulePlan, plans: Mapping[str, _ModulePlan]) -> None:
    """Turn the new source into what the swap executes, then compile it.

    A statement whose group need not run again (``_rerun_in_order``) is
    left out: its names keep their live values, no callback is registered
    twice, no server started twice.  A ``def`` of an existing function runs
    with a hook that moves its new code into the live function; when its
    decorators did not change and what they made is not stale they do not
    run again and the name keeps its live binding (a Flask route, an atexit
    or registry entry, a cache wrapper), else they run on the live function;
    a def whose only change is its code does not run at all
    (``_swap_without_running``).  Classes are updated in place the same way.
    What reads a name taking a new value (from this module, another one, or
    a def that binds a new object) runs again."""
    tree, namespace = plan.tree, plan.module.__dict__
    imported = _imported_values(plan.name, plan.module, tree.body, plans,
                                functools.partial(_new_values, plans=plans))
    # Names of classes made anew read by an unchanged statement: it runs again.
    imported |= {qualname for qualname in plan.rebuilt if "." not in qualname}
    called = _new_results(plan)
    rerun, unchanged = _rerun_in_order(tree.body, plan.old[""], plan.new[""], imported | called,
                                       namespace)
    plan.rerun[""] = rerun | called | {name for name in imported if name.isidentifier()}
    plan.results = {name for name in imported if name.endswith("()") and "." not in name}
    skipped: dict[int, ast.stmt] = {}
    for index in unchanged:
        statement = tree.body[index]
        if (isinstance(statement, (*_DEFS, ast.ClassDef, ast.Import, ast.ImportFrom))
                or (index == 0 and plan.doc is not None)):
            continue  # definitions and imports are handled below; a docstring stays first
        skipped[index] = statement
        tree.body[index] = ast.copy_location(ast.Pass(), statement)
    old_defs = new_defs = None  # defs by key, for names several defs bind
    for scope, qualname, statement in _definitions(tree.body):
        if isinstance(statement, ast.ClassDef):
            plan.rerun[qualname] = _keep_class_state(plan, qualname, statement)
        if scope not in plan.old or _within(qualname, plan.rebuilt):
            continue
        key = _definition_key(qualname, statement)
        if plan.old[scope].definitions.get(key) != 1 or plan.new[scope].definitions[key] != 1:
            if not isinstance(statement, _DEFS) or key not in plan.old[scope].definitions:
                continue
            old_defs = old_defs if old_defs is not None else _defs_by_key(plan, old=True)
            new_defs = new_defs if new_defs is not None else _defs_by_key(plan, old=False)
            live_def = _continued_def(plan, key, statement, old_defs[key], new_defs[key])
            if live_def is None:
                continue
            plan.continuing.add(qualname)
            _reuse_function(plan, key, scope, statement,
                            _dump(ast.List(live_def.decorator_list, ast.Load()))
                            == _dump(ast.List(statement.decorator_list, ast.Load())))
            continue
        same_decorators = (plan.old[scope].decorators[key] == plan.new[scope].decorators[key]
                           and _accessors(plan.old[scope], qualname)
                           == _accessors(plan.new[scope], qualname))
        if isinstance(statement, ast.ClassDef):
            _reuse_class(plan, qualname, statement, same_decorators)
        else:
            _reuse_function(plan, key, scope, statement, same_decorators)
    stale = plan.stale = _find_closures(plan)
    # A closure whose new code needs other free variables cannot change in
    # place: the statement that made it runs again and binds a new one.
    rerun = {name for name, value in namespace.items() if id(value) in stale}
    for index, statement in skipped.items():
        if _bound_names(statement) & rerun:
            tree.body[index] = statement
            plan.rerun[""] |= _bound_names(statement)
    redecorated = _redecorate(plan, stale.union(*(other.stale for other in plans.values())))
    # Names whose def binds a new object (its decorators run again, or no
    # live function continues it): what reads them runs again too.
    replaced = {statement.name for scope, qualname, statement in _definitions(tree.body)
                if not scope and isinstance(statement, _DEFS) and statement.name in namespace
                and (_definition_key(qualname, statement) not in plan.targets
                     or _definition_key(qualname, statement) not in plan.undecorated
                     and len(statement.decorator_list) > 1)}
    # A call of a factory whose closures need other free variables makes new ones.
    replaced |= {call for call in plan.stale_calls if "." not in call[:-2]}
    replaced |= _changed_class_attributes(plan)
    written = [skipped.get(index, statement) for index, statement in enumerate(tree.body)]
    again = set(skipped) - set(_rerun_in_order(written, plan.old[""], plan.new[""],
                                               imported | called | replaced, namespace)[1]
                               if replaced else skipped)
    for index in again:
        tree.body[index] = skipped[index]
        plan.rerun[""] |= _bound_names(skipped[index])
    plan.rerun[""] |= replaced
    # A name whose last binding statement does not run keeps its live value,
    # though an import or def before it runs (``from ._impl import C`` and
    # then ``C = wrap(C)``).
    last = {name: index for index, statement in enumerate(written)
            for name in _bound_names(statement)}
    plan.kept = {name for name, index in last.items() if tree.body[index] is not written[index]}
    if rerun or redecorated or again:
        _find_closures(plan)
    _swap_without_running(plan)
    plan.code_pairs = _code_pairs(plan)


def _changed_class_attributes(plan: _ModulePlan) -> set[str]:
    """``C.*`` and ``C.NAME`` for each live module-level class, kept and
    updated in place, whose attributes other than its methods take new
    values or go: a statement that reads the class whole or such an
    attribute of it (``app.config.from_object(Config)``, ``vars(Config)``,
    ``Config.LIMIT``) runs again, as in a cold start.  Calling the class or
    a method of it (``Config()``, ``Server.start()``) is no such read: live
    instances keep their state."""
    found = set()
    for qualname, names in plan.rerun.items():
        if not qualname or "." in qualname or _within(qualname, plan.rebuilt) \
                or _live_class(plan, qualname) is None:
            continue
        before, after = plan.old.get(qualname), plan.new[qualname]
        changed = names | (before.values.keys() - after.statements.keys() if before else set())
        if changed:
            found |= {f"{qualname}.*", *(f"{qualname}.{name}" for name in changed)}
    return found


def _keep_class_state(plan: _ModulePlan, qualname: str, statement: ast.ClassDef) -> set[str]:
    """The module rule in a live class's body: a statement whose group need
    not run again is left out, and the swap starts the body with the live
    class's values of what it binds (a marker ``__missing = object()`` that
    a method's default reads stays the one the class holds).  Annotated
    assignments (``__annotations__``, dataclass fields) and the docstring
    always run.  Returns the names the statements that run again bind."""
    cls = _live_class(plan, qualname)
    plain = (cls is not None and not _within(qualname, plan.rebuilt)
             and inspect.getattr_static(type(cls), "__prepare__") is type.__dict__["__prepare__"])
    private = f"_{statement.name.lstrip('_')}__"
    live = ({("__" + name[len(private):] if name.startswith(private) else name): name
             for name in cls.__dict__} if plain else {})
    rerun, unchanged = _rerun_in_order(statement.body, plan.old.get(qualname),
                                       plan.new[qualname], plan.rerun[""],
                                       {name: cls.__dict__[live[name]] for name in live} or None)
    for index in unchanged if plain else ():
        kept = statement.body[index]
        if (isinstance(kept, (*_DEFS, ast.ClassDef, ast.Import, ast.ImportFrom, ast.AnnAssign))
                or (index == 0 and isinstance(kept, ast.Expr)
                    and isinstance(kept.value, ast.Constant))):
            continue
        statement.body[index] = ast.copy_location(ast.Pass(), kept)
        plan.class_kept[qualname].update(live[name] for name in _bound_names(kept)
                                         if name in live)
    return rerun


def _redecorate(plan: _ModulePlan, stale: set[int]) -> bool:
    """Run the unchanged decorators of a def again when what they made is
    stale: a wrapper made by a decorator whose new inner function needs
    other free variables (in this module or another), or decorators that
    read a name taking a new value.  Returns whether any def was changed."""
    redecorated = False
    for key in sorted(plan.undecorated):
        if key not in plan.decorators:
            continue
        statement, decorators = plan.decorators[key]
        target, scope = plan.targets[key], key[0].rpartition(".")[0]
        reads = set().union(*(_read_names(ast.Expr(decorator)) for decorator in decorators))
        if not ({id(target.binding), *map(id, target.wrappers)} & stale
                or reads & plan.rerun.get(scope, set())):
            continue
        statement.decorator_list = [*decorators, _hook(key, statement)]
        plan.undecorated.discard(key)
        plan.rerun.setdefault(scope, set()).add(statement.name)
        redecorated = True
    return redecorated


_NO_DECORATORS = _dump(ast.List([], ast.Load()))


def _swap_without_running(plan: _ModulePlan) -> None:
    """Take out of what the swap runs the defs whose only change is their code:
    same decorators (not run again), same parameters, defaults and
    annotations, reading no name that takes a new value, in a class whose
    decorators do not run again.  The swap gives their live functions the
    new code before the module body runs, without making a function object
    inside the pause.  Recompiles what the swap runs."""
    codes = _nested_codes(plan.swap_code)
    taken: set[int] = set()
    read_in_class: dict[str, set[str]] = {}  # a class body's namespace starts empty
    for scope, qualname, statement in _definitions(plan.tree.body):
        if isinstance(statement, ast.ClassDef):
            read_in_class[qualname] = set().union(*map(_read_names, statement.body))
        key = _definition_key(qualname, statement)
        code = codes.get(qualname)
        if (key not in plan.undecorated or key[1] == _CLASS or code is None
                or statement.name in read_in_class.get(scope, ())
                or (scope and (scope, _CLASS) not in plan.undecorated
                    and (plan.new[scope.rpartition(".")[0]].decorators.get((scope, _CLASS))
                         != _NO_DECORATORS or scope in plan.redecorated))
                or plan.old[scope].signatures.get(key) != plan.new[scope].signatures.get(key)
                or _read_names(statement) & plan.rerun.get(scope, set())):
            continue
        target = plan.targets[key]
        if target.function.__code__.co_freevars != code.co_freevars:
            continue
        batch, function = plan.in_place, target.function
        batch.functions.append(function)
        batch.codes.append(code)
        batch.old_codes.append(function.__code__)
        cells = tuple(types.CellType() for _ in code.co_freevars)
        doc = types.FunctionType(code, {}, None, None, cells).__doc__  # as def would set it
        if doc != function.__doc__:
            batch.documented.append(function)
            batch.docs.append(doc)
            batch.old_docs.append(function.__doc__)
        batch.caches.extend(wrapper for wrapper in target.wrappers if key in plan.changed_defs
                            and hasattr(type(wrapper), "cache_clear"))  # results of old code
        batch.names[scope].add(statement.name)
        taken.add(id(statement))
    if taken:
        _drop_statements(plan.tree.body, taken)
        _compile_rewritten(plan)


def _drop_statements(body: list[ast.stmt], taken: set[int]) -> None:
    """Remove the statements whose ids are ``taken`` from a body and the
    blocks and class bodies in it (a block left empty gets a ``pass``)."""
    body[:] = ([statement for statement in body if id(statement) not in taken]
               or [ast.copy_location(ast.Pass(), body[0])])
    for statement in body:
        if isinstance(statement, _DEFS):
            continue
        for field in ("body", "orelse", "finalbody"):
            block = getattr(statement, field, None)
            if block:
                _drop_statements(block, taken)
        for block in (*getattr(statement, "handlers", ()), *getattr(statement, "cases", ())):
            _drop_statements(block.body, taken)


# Code objects nested in a function that make no function of their own to keep.
_INLINE_CODE = ("<lambda>", "<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>")


def _new_results(plan: _ModulePlan) -> set[str]:
    """``NAME()`` for the module-level functions whose code changed: a
    statement calling one at import time gets what the new code returns, so
    it runs again.  Not for factories (a function defining functions): the
    closures they made take the new inner code in place."""
    old, new = plan.old[""], plan.new[""]
    results = set()
    for (qualname, accessor), count in new.definitions.items():
        if "." in qualname or accessor or count != 1 or (
                old.statements.get(qualname) == new.statements.get(qualname)):
            continue
        function = plan.module.__dict__.get(qualname)
        if _defined_here(function, plan.name, qualname) and _is_a(function, types.FunctionType) \
                and not any(code.co_name not in _INLINE_CODE
                            for code in _code_objects(function.__code__) if code is not
                            function.__code__):
            results.add(f"{qualname}()")
    return results


def _imported_values(name: str, module: types.ModuleType, body: list[ast.stmt],
                     plans: Mapping[str, _ModulePlan],
                     values: Callable[[_ModulePlan], set[str]]) -> set[str]:
    """What module ``name`` (its live module and the body it runs) reads from
    the upgraded modules it imports that takes a new value (``values`` of
    each), as the names it reads them by:
    ``from .config import LIMIT`` gives ``LIMIT``, ``from .more import *``
    every name ``more`` changes, gains or loses, ``import config`` gives
    ``config.LIMIT``, a changed function ``build`` gives ``build()``, and a
    class whose attributes change gives ``Config.*`` and ``Config.NAME``."""
    imported: set[str] = set()
    package = name if hasattr(module, "__path__") else name.rpartition(".")[0]
    for statement in body:
        if isinstance(statement, ast.ImportFrom) and statement.module != "__future__":
            try:
                source = plans.get(_imported_from(statement, package))
            except (ImportError, ValueError):
                continue
            if source is None or source.name == name:
                continue
            new = values(source)
            if any(a.name == "*" for a in statement.names):  # names gained and lost count too
                imported |= new | (source.old[""].statements.keys()
                                   ^ source.new[""].statements.keys())
            for alias in statement.names:  # ``NAME``, ``NAME()``, ``NAME.*``, ``NAME.ATTR``
                imported.update(f"{alias.asname or alias.name}{value[len(alias.name):]}"
                                for value in new if value == alias.name or (
                                    value.startswith(alias.name)
                                    and value[len(alias.name)] in "(."))
    by_id = {id(other.module): other for other in plans.values()}
    for bound, value in list(module.__dict__.items()):
        source = by_id.get(id(value))
        if source is not None and source.name != name:
            imported.update(f"{bound}.{value_name}" for value_name in values(source))
    return imported


def _new_values(plan: _ModulePlan, plans: Mapping[str, _ModulePlan]) -> set[str]:
    """The module-level names of a module that runs again which take a new
    value or go, as ``NAME`` (and ``NAME()`` for a function whose code
    changed).  While it is not analysed yet (an import cycle), an estimate
    that counts everything it reads from modules not analysed yet either
    as new."""
    gone = plan.old[""].statements.keys() - plan.new[""].statements.keys()
    if "" in plan.rerun:
        return plan.rerun[""] | plan.results | gone
    outer = (_imported_values(plan.name, plan.module, plan.tree.body, plans, _new_values_known)
             | _new_results(plan))
    rerun = _rerun_in_order(plan.tree.body, plan.old[""], plan.new[""], outer,
                            plan.module.__dict__)[0]
    return rerun | gone | {name for name in outer if "." not in name}


def _new_values_known(plan: _ModulePlan) -> set[str]:
    """``_new_values`` of an analysed module; every name of one that is not."""
    if "" in plan.rerun:
        return plan.rerun[""] | plan.results
    names = plan.new[""].statements.keys() | plan.old[""].statements.keys()
    return names | {f"{name}()" for name in names}


def _defs_by_key(plan: _ModulePlan, *, old: bool) -> dict[tuple[str, str], list[ast.stmt]]:
    """The def statements of the old (live) or new source by definition key, in order."""
    tree = ast.parse(_tracker.record_for(plan.name).source) if old else plan.tree
    defs: dict[tuple[str, str], list[ast.stmt]] = collections.defaultdict(list)
    for _, qualname, statement in _definitions(tree.body):
        defs[_definition_key(qualname, statement)].append(statement)
    return defs


def _continued_def(plan: _ModulePlan, key: tuple[str, str], statement: ast.stmt,
                   old_defs: list[ast.stmt], new_defs: list[ast.stmt]) -> ast.stmt | None:
    """For a name several defs bind (``@overload`` stubs before the
    implementation, a def in each branch of an ``if``, the ``_`` of
    singledispatch registrations at module level, which the registry
    matches by type instead): the old def whose function the name is bound
    to now, if ``statement`` continues it.  That def is the one whose lines
    the live function has, or the last one after ``@overload`` stubs.  The
    last def continues the last; else the defs are matched by position when
    their number did not change."""
    target, _ = _find_function(_lookup(plan.module.__dict__, key[0]), plan.name, *key)
    if target is None or any(target in (_dispatch_registry(value) or {}).values()
                             for value in plan.module.__dict__.values()):
        return None  # a registered implementation continues the one of its type
    first_lines = [min([d.lineno for d in s.decorator_list] + [s.lineno]) for s in old_defs]
    if target.__code__.co_firstlineno in first_lines:
        index = first_lines.index(target.__code__.co_firstlineno)
    elif all(map(_is_overload_stub, old_defs[:-1])):  # a wrapper around the implementation
        index = len(old_defs) - 1
    else:
        return None
    if index == len(old_defs) - 1:
        return old_defs[index] if new_defs[-1] is statement else None
    same_place = len(old_defs) == len(new_defs) and new_defs[index] is statement
    return old_defs[index] if same_place else None


def _is_overload_stub(definition: ast.stmt) -> bool:
    return any((isinstance(d, ast.Name) and d.id == "overload")
               or (isinstance(d, ast.Attribute) and d.attr == "overload")
               for d in definition.decorator_list)


def _compile_rewritten(plan: _ModulePlan) -> None:
    """Compile what the swap runs (a syntax error only the compiler finds refuses)."""
    try:
        plan.swap_code = compile(plan.tree, plan.path, "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise _syntax_refusal(exc, plan.path, plan.name) from None


def _accessors(scope: _Scope, qualname: str) -> set[str]:
    """The property accessors the defs of one name make (a setter added or
    removed changes the property, whose decorators then run again)."""
    return {accessor for name, accessor in scope.definitions if name == qualname}


def _hook(key: tuple[str, str], statement: ast.stmt) -> ast.Call:
    """The call ``__flydeploy_reuse__(qualname, accessor)`` as a decorator,
    where the first decorator is (the line a function's code starts at)."""
    first = min((node.lineno for node in statement.decorator_list), default=statement.lineno)
    where = {"lineno": first, "col_offset": statement.col_offset,
             "end_lineno": first, "end_col_offset": statement.col_offset}
    return ast.Call(ast.Name(_REUSE, ast.Load(), **where),
                    [ast.Constant(part, **where) for part in key], [], **where)


def _reuse_function(plan: _ModulePlan, key: tuple[str, str], scope: str,
                    statement: ast.FunctionDef | ast.AsyncFunctionDef,
                    same_decorators: bool) -> None:
    """Put the reuse hook on the def of an existing function whose live object
    can take the new code (same free variables); else leave the def alone."""
    qualname, accessor = key
    binding = _lookup(plan.module.__dict__, qualname)
    target, chain = _find_function(binding, plan.name, qualname, accessor)
    cell = ("__class__",) if scope and _uses_class_cell(statement) else ()
    if target is None or target.__code__.co_freevars != cell:
        return  # the statement runs as written; the merge decides what to bind
    plan.targets[key] = _Target(target, chain, binding)
    name = qualname.rpartition(".")[2]
    if (plan.old[scope].statements.get(name) != plan.new[scope].statements.get(name)
            or _read_names(statement) & plan.rerun[scope]):
        plan.changed_defs.add(key)
    if same_decorators:
        plan.decorators[key] = (statement, statement.decorator_list)
        statement.decorator_list = [_hook(key, statement)]
        plan.undecorated.add(key)
    else:
        statement.decorator_list.append(_hook(key, statement))


def _reuse_class(plan: _ModulePlan, qualname: str, statement: ast.ClassDef,
                 same_decorators: bool) -> None:
    """Keep the live binding of an existing class whose decorators did not
    change; note the dataclasses whose decorator runs again."""
    cls = _live_class(plan, qualname)
    if cls is None:
        return
    dataclass = "__dataclass_fields__" in cls.__dict__
    if dataclass and plan.old[qualname].annotated != plan.new[qualname].annotated:
        same_decorators = False  # @dataclass derives its methods from the fields
    if same_decorators and statement.decorator_list:
        statement.decorator_list = [_hook((qualname, _CLASS), statement)]
        plan.undecorated.add((qualname, _CLASS))
    elif not same_decorators and dataclass:
        plan.redecorated.add(qualname)


def _find_closures(plan: _ModulePlan) -> set[int]:
    """Compile the rewritten source and find the live closures made by
    factories whose inner functions changed: they take the new code in place.
    Returns the ids of those whose free variables differ from the new code's."""
    _compile_rewritten(plan)
    new_codes = _nested_codes(plan.swap_code)
    changed: dict[types.CodeType, types.CodeType] = {}
    for (qualname, _), target in plan.targets.items():
        if qualname not in new_codes:
            continue
        fresh = _nested_codes(new_codes[qualname])
        for inner_qualname, code in _nested_codes(target.function.__code__).items():
            if "<locals>" in inner_qualname and fresh.get(inner_qualname, code) != code:
                changed[code] = fresh[inner_qualname]
    if not changed:
        return set()
    closures = [(function, changed[function.__code__])
                for function in gc.get_referrers(*changed)
                if type(function) is types.FunctionType and function.__code__ in changed]
    plan.closures = [(function, code) for function, code in closures
                     if function.__code__.co_freevars == code.co_freevars]
    stale = [function for function, code in closures
             if function.__code__.co_freevars != code.co_freevars]
    # ``make()`` of a module-level factory whose closures cannot take the new code.
    plan.stale_calls = {f"{function.__code__.co_qualname.partition('.<locals>')[0]}()"
                        for function in stale if function.__module__ == plan.name}
    return {id(function) for function in stale}


def _code_pairs(plan: _ModulePlan) -> dict[int, tuple[types.CodeType, types.CodeType]]:
    """The code each live function of a module that takes new code runs now,
    with the code it runs after the swap, by the id of the first."""
    pairs = list(zip(plan.in_place.old_codes, plan.in_place.codes))
    codes = _nested_codes(plan.swap_code)
    for (qualname, _), target in plan.targets.items():
        old, new = target.function.__code__, codes.get(qualname)
        if new is not None and new.co_freevars == old.co_freevars:
            pairs.append((old, new))
    pairs.extend((function.__code__, code) for function, code in plan.closures)
    return {id(old): (old, new) for old, new in pairs if old is not new}


def _code_holders(plans: list[_ModulePlan]
                  ) -> tuple[list[set | dict | list], dict[int, tuple[types.CodeType,
                                                                         types.CodeType]]]:
    """The module-level sets, dicts and lists of the tracked modules that hold
    code objects of functions taking new code (a registry of "internal" code
    to hide from tracebacks, a cache keyed by code), with every old code and
    its new one: a fresh import would have put the new code there."""
    pairs = {}
    for plan in plans:
        pairs.update(plan.code_pairs)
    holders: dict[int, set | dict | list] = {}
    for name in list(_tracker.loaded) if pairs else ():
        module = sys.modules.get(name)
        for value in list(module.__dict__.values()) if module is not None else ():
            kind = type(value)
            if kind in (set, dict, list) and any(
                    type(item) is types.CodeType and id(item) in pairs
                    for item in (itertools.chain(value, value.values()) if kind is dict
                                 else value)):
                holders[id(value)] = value
    return list(holders.values()), pairs


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


def _add_importers(plans: dict[str, _ModulePlan]) -> None:
    """Add the unchanged modules that import what the upgrade changes (``from
    .more import *`` when ``more`` gained names, ``from .config import
    LIMIT``, ``2 * config.LIMIT``): their statements that read it run again,
    as in a fresh import.  Repeated until no module is added."""
    checked: dict[str, set[str]] = {}  # module -> the upgraded modules it was checked against
    values = functools.partial(_new_values, plans=plans)
    while True:
        added = False
        stale = any(plan.stale for plan in plans.values())
        for name in list(_tracker.loaded):
            imports, statements = _import_statements(name)
            sources = imports & plans.keys()
            if name in plans or not sources - checked.get(name, set()):
                continue
            checked[name] = sources
            module = sys.modules[name]
            if not stale and not _imported_values(name, module, statements, plans, values):
                continue  # reads nothing the upgrade changes: no need to plan it
            with _analysing(name):
                plan = _plan_module(name, again=True)
                _rewrite(plan, plans)
            if any(plan.rerun.values()):
                plans[name], added = plan, True
        if not added:
            return


# What each module's source imports: name -> (content hash, the modules,
# its module-level ``from ... import`` statements).
_imports_cache: dict[str, tuple[str, set[str], list[ast.stmt]]] = {}


def _import_statements(name: str) -> tuple[set[str], list[ast.stmt]]:
    """The modules a loaded, tracked module imports and its module-level
    ``from ... import`` statements (none when it has no source)."""
    record = _tracker.record_for(name)
    if record is None or record.source is None:
        return set(), []
    cached = _imports_cache.get(name)
    if cached is None or cached[0] != record.digest:
        package = name if hasattr(sys.modules[name], "__path__") else name.rpartition(".")[0]
        try:
            tree = ast.parse(record.source, record.path)
        except (SyntaxError, ValueError):
            tree = ast.Module([], [])
        statements = [statement for statement in tree.body
                      if isinstance(statement, ast.ImportFrom)]
        cached = _imports_cache[name] = (record.digest, _imported_modules(tree, package),
                                         statements)
    return cached[1], cached[2]


def _star_sources(plan: _ModulePlan, plans: Mapping[str, _ModulePlan]) -> list[_ModulePlan]:
    """The upgraded modules that a module's ``from X import *`` statements read."""
    package = plan.name if hasattr(plan.module, "__path__") else plan.name.rpartition(".")[0]
    sources = []
    for statement in plan.tree.body:
        if isinstance(statement, ast.ImportFrom) and any(a.name == "*" for a in statement.names):
            try:
                source = plans.get(_imported_from(statement, package))
            except (ImportError, ValueError):
                continue
            if source is not None and source is not plan:
                sources.append(source)
    return sources


@contextlib.contextmanager
def _analysing(name: str) -> Iterator[None]:
    """Make an unexpected error while analysing module ``name`` (an object of
    the app no rule foresaw) a refusal: ``reload_modules`` reports, it never
    raises for the app's code or live objects."""
    try:
        yield
    except FlyDeployError:
        raise
    except Exception as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]
        raise UpgradeRefused(
            f"analysing module {name} failed ({type(exc).__name__}: {exc}, at "
            f"{os.path.basename(where.filename)} line {where.lineno}); nothing was changed: "
            "deploy this release cold and report the error", module=name) from None


# --- Swap: the executor and its undo log -----------------------------------
#
# What a failed upgrade cannot undo: changes made in place to mutable objects
# (a list a module body appended to, a registry an ``__init_subclass__`` hook
# extended, a file written).  Every binding is restored: module namespaces of
# every tracked module, class attributes, function code and attributes,
# closure cells, singledispatch registries, server states and the attribute
# dicts of the instances a migration touched.


def _defined_twice(old: _Scope | None, new: _Scope | None, name: str) -> bool:
    """Whether several plain ``def`` statements bind the name (``_`` for
    singledispatch registrations...): then the name says nothing about which
    old function a new one continues."""
    return (old is not None and name in old.twice) or (new is not None and name in new.twice)


_FUNCTION_ATTRIBUTES = ("__code__", "__defaults__", "__kwdefaults__", "__doc__",
                        "__annotations__", "__name__", "__qualname__")
_function_attributes = operator.attrgetter(*_FUNCTION_ATTRIBUTES)


def _set_all(objects: list[object], attribute: str, values: list[object]) -> None:
    """Set one attribute of many objects, each to its value, in one C loop."""
    collections.deque(map(setattr, objects, itertools.repeat(attribute), values), 0)


def _set_function_attributes(function: types.FunctionType, values: tuple) -> None:
    (function.__code__, function.__defaults__, function.__kwdefaults__, function.__doc__,
     function.__annotations__, function.__name__, function.__qualname__) = values


_build_class = builtins.__build_class__


def _is_singledispatch(obj: object) -> bool:
    return (type(obj) is types.FunctionType and "registry" in obj.__dict__
            and obj.__dict__.keys() >= {"register", "dispatch", "__wrapped__"})


def _dispatch_registry(obj: object) -> dict | None:
    """The registry dict of a singledispatch function or method, if ``obj`` is one."""
    kind = type(obj)
    if kind is not types.FunctionType and not issubclass(kind, functools.singledispatchmethod):
        return None  # the common case, quickly
    if kind is not types.FunctionType:
        obj = obj.dispatcher
    if not _is_singledispatch(obj):
        return None
    dispatch = obj.__dict__["dispatch"]
    cells = dict(zip(dispatch.__code__.co_freevars, dispatch.__closure__ or ()))
    registry = cells["registry"].cell_contents if "registry" in cells else None
    return registry if type(registry) is dict else None


# Where an object lives, for the report: module, then names; joined with dots
# only when needed.
_Label = tuple[str, ...]


class _Swap:
    """One in-place code swap with its undo log.

    Executes each rewritten module body in the live module's namespace, with
    two hooks: a decorator on every existing ``def`` that moves the new code
    into the live function object, and a ``__build_class__`` that updates an
    existing class in place instead of creating a new one.  Then module
    state is merged.  Every change is logged so ``rollback`` undoes it all.
    """

    def __init__(self, plans: list[_ModulePlan], clock: _Clock,
                 files: frozenset[str] | None = None) -> None:
        self.plans = plans
        self.clock = clock
        self.files = files  # the release files that changed, if known (section 4b)
        self.frameworks = _framework_objects()  # found before the pause (section 4b)
        self.paths = {plan.path for plan in plans}
        self.thread = threading.get_ident()
        self.undo: list[Callable[[], None]] = []
        self.saved: set[int] = set()
        self.merging: set[int] = set()
        # Functions changed so far, with what each was before.
        self.functions: dict[int, tuple[types.FunctionType, tuple, dict]] = {}
        self.batches: list[_InPlace] = []  # functions that took new code in place
        self.added: list[str] = []
        self.replaced: list[str] = []
        # Objects that could not keep their identity: id(old) -> (old, new).
        self.replacements: dict[int, tuple[object, object]] = {}
        self.classes_before: dict[int, dict] = {}  # id(class) -> its attributes before
        # Registered implementations a live one continues: id(new) -> live.
        self.continued: dict[int, types.FunctionType] = {}
        self.namespaces: dict[str, dict] = {}  # module name -> its namespace before
        self.plan: _ModulePlan | None = None  # the module whose body is running
        self.stage = ""
        self.module = ""  # the module the current stage concerns
        self.error = ""
        self.failed: list[str] = []
        self.failed_module: str | None = None
        self.modules_before = set(sys.modules)
        self.started: list[Server] = []  # servers the new module bodies started
        # Modules still to run, in the order they first started importing; a
        # body that imports one of them runs it there, as a fresh import would.
        position = {name: index for index, name in enumerate(sys.modules)}
        self.pending = {plan.name: plan for plan in sorted(plans, key=lambda plan: (
            _tracker.started.get(plan.name, -1), position[plan.name]))}
        self.finished: list[str] = []  # in the order they finished, as a fresh import
        self.imports: Callable[..., types.ModuleType] = builtins.__import__
        # The singledispatch functions a new body may register on (in any
        # tracked module, in the classes of the upgraded ones), found before
        # the pause: their registries are logged inside it.
        self.dispatchers = [value for value in _dispatcher_candidates(plans)
                            if _dispatch_registry(value) is not None]
        self.code_holders, self.code_pairs = _code_holders(plans)

    # -- the undo log --

    def _save_class(self, cls: type) -> None:
        if id(cls) in self.saved:
            return
        self.saved.add(id(cls))
        contents = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        self.classes_before[id(cls)] = contents

        def restore() -> None:
            _restore_mapping(cls.__dict__, contents, owner=cls, keep=("__dict__", "__weakref__"))
            if isinstance(cls, abc.ABCMeta):
                cls._abc_caches_clear()

        self.undo.append(restore)

    def _save_module(self, module: types.ModuleType) -> dict:
        """Log a module's namespace (once); returns it as it was."""
        contents = self.namespaces.get(module.__name__)
        if contents is None:
            contents = self.namespaces[module.__name__] = dict(module.__dict__)
            self.undo.append(lambda: _restore_mapping(module.__dict__, contents))
        return contents

    def _save_registries(self, values: Iterable[object]) -> None:
        """Log the singledispatch registries among ``values``: a new body may
        register implementations on the live dispatchers."""
        for value in values:
            registry = _dispatch_registry(value)
            if registry is not None and id(registry) not in self.saved:
                self.saved.add(id(registry))
                contents = dict(registry)
                dispatcher = value.dispatcher if _is_a(value, functools.singledispatchmethod) \
                    else value
                self.undo.append(lambda r=registry, c=contents, d=dispatcher: (
                    _restore_mapping(r, c), d._clear_cache()))

    def _save_function(self, function: types.FunctionType) -> None:
        if id(function) not in self.functions:
            self.functions[id(function)] = (function, _function_attributes(function),
                                            dict(function.__dict__))

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
        """Put every module, function, class and closure back as it was, and
        forget the modules first imported by this upgrade."""
        for restore in reversed(self.undo):
            try:
                restore()
            except Exception:  # keep undoing the rest whatever one step does
                log.exception("flydeploy: one step of the rollback failed")
        for function, attributes, contents in self.functions.values():
            _set_function_attributes(function, attributes)
            _restore_mapping(function.__dict__, contents)
        for batch in reversed(self.batches):
            _set_all(batch.functions, "__code__", batch.old_codes)
            _set_all(batch.documented, "__doc__", batch.old_docs)
        self.undo.clear()
        self.functions.clear()
        self.batches.clear()
        for name in set(sys.modules) - self.modules_before:
            module = sys.modules.pop(name, None)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                delattr(sys.modules[parent], child)

    # -- merging old and new objects --

    def merge(self, old: object, new: object, changed: bool, label: _Label) -> object:
        """What to bind where ``old`` was bound and the new source made ``new``:
        the old object carrying the new code wherever possible."""
        if old is new:
            return old
        if _is_singledispatch(old) and _is_singledispatch(new):
            return self._merge_singledispatch(old, new, label)
        if _is_a(old, types.FunctionType) and _is_a(new, types.FunctionType):
            if _defined_here(new, old.__module__, old.__qualname__):
                return self.swap_function(old, new, label)
        elif type(old) is type(new) and _is_a(old, (classmethod, staticmethod)):
            inner = self.merge(old.__func__, new.__func__, changed, label)
            return old if inner is old.__func__ else new
        elif type(old) is type(new) and _is_a(old, property):
            pairs = [(getattr(old, a), getattr(new, a)) for a in ("fget", "fset", "fdel")]
            if all((o is None) == (n is None) for o, n in pairs):
                merged = [o if o is None else self.merge(o, n, changed, label) for o, n in pairs]
                if all(m is o for m, (o, _) in zip(merged, pairs)):
                    return old
            return new
        elif _is_a(old, type) and _is_a(new, type):
            self._replace(label, old, new)  # a class rebuilt because its shape changed
            return new
        elif type(old) is type(new) and hasattr(type(old), "cache_clear"):
            self._replace(label, old, new)  # a cache decorator with new arguments
            return new
        if changed and _keeps_mapped_attribute(old, new):
            return old
        return new if changed else old

    def _replace(self, label: _Label, old: object, new: object) -> None:
        name = ".".join(label)
        if name not in self.replaced:
            self.replaced.append(name)
        self.replacements[id(old)] = (old, new)

    def swap_function(self, old: types.FunctionType, new: types.FunctionType,
                      label: _Label) -> types.FunctionType:
        """Give ``old`` the code, defaults and attributes of ``new``; returns
        ``new`` instead (listed as replaced) when their free variables differ."""
        if id(old) in self.merging:
            return old
        if old.__code__.co_freevars != new.__code__.co_freevars:
            self._replace(label, old, new)
            return new
        self._save_function(old)
        _set_function_attributes(old, _function_attributes(new))
        if new.__dict__ or old.__closure__:
            self.merging.add(id(old))
            try:
                self._merge_function_contents(old, new, label)
            finally:
                self.merging.discard(id(old))
        return old

    def _swap_in_place(self, batch: _InPlace) -> None:
        """Give live functions their new code and docstring, logged as one
        batch (what they were was read while preparing).  The pause's
        hottest path, thousands of methods in a large upgrade: the loops run
        in C, through ``map``."""
        self.batches.append(batch)
        _set_all(batch.functions, "__code__", batch.codes)
        _set_all(batch.documented, "__doc__", batch.docs)
        for cache in batch.caches:
            cache.cache_clear()

    def _merge_function_contents(self, old: types.FunctionType, new: types.FunctionType,
                                 label: _Label) -> None:
        """Attributes the new source gives (attributes set at run time stay)
        and closure cells: the old objects carrying the new code."""
        for key, value in new.__dict__.items():
            current = old.__dict__.get(key, _MISSING)
            old.__dict__[key] = value if current is _MISSING else self.merge(current, value,
                                                                             True, label)
        for old_cell, new_cell in zip(old.__closure__ or (), new.__closure__ or ()):
            try:
                before, after = old_cell.cell_contents, new_cell.cell_contents
            except ValueError:
                continue
            merged_value = self.merge(before, after, True, label)
            if merged_value is not before:
                self._set_cell(old_cell, merged_value)

    def _merge_singledispatch(self, old: types.FunctionType, new: types.FunctionType,
                              label: _Label) -> types.FunctionType:
        """Keep the old dispatcher; its registered implementations take the
        new code, and implementations registered only by the new source join."""
        self._save_registries([old])
        for cls, implementation in new.registry.items():
            current = old.registry.get(cls)
            merged = (implementation if current is None
                      else self.merge(current, implementation, True, label))
            if merged is not current:
                old.register(cls, merged)
            elif merged is not implementation:
                self.continued[id(implementation)] = merged
        old._clear_cache()
        return old

    # -- the hooks that run inside a new module body --

    def reuse(self, qualname: str, accessor: str) -> Callable[[object], object]:
        """The decorator the rewrite puts on existing defs and classes."""
        plan = self.plan
        key = (qualname, accessor)

        def decorate(new: object) -> object:
            if accessor == _CLASS:
                return _lookup(self.namespaces[plan.name], qualname)
            target = plan.targets[key]
            function = target.function
            if self.swap_function(function, new, (plan.name, qualname)) is not function:
                return new  # the rewrite made sure the free variables match
            if key not in plan.undecorated:
                # The changed decorators run on the live function: what the
                # old ones marked it with (``__isabstractmethod__``) goes.
                for attribute in function.__dict__.keys() - new.__dict__.keys():
                    del function.__dict__[attribute]
                return function
            if key in plan.changed_defs:
                for wrapper in target.wrappers:  # results of the old code or defaults
                    if hasattr(type(wrapper), "cache_clear"):
                        wrapper.cache_clear()
            return target.binding

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
            cls = _lookup(self.namespaces[plan.name], qualname)
            if _defined_here(cls, plan.name, qualname):
                return self._update_class(plan, cls, body, bases, keywords)
        return _build_class(body, name, *bases, **keywords)

    def import_module(self, name: str, globals: Mapping[str, object] | None = None,
                      locals: object = None, fromlist: Sequence[str] = (),
                      level: int = 0) -> types.ModuleType:
        """``builtins.__import__`` during the swap: importing a module that is
        still to run runs its new body first (not when it is already running:
        an import cycle gets the partly run module, as it would at first)."""
        if self.pending and threading.get_ident() == self.thread:
            target = name
            if level:
                package = (globals or {}).get("__package__") or ""
                try:
                    target = importlib.util.resolve_name("." * level + name, package)
                except (ImportError, ValueError):
                    target = ""
            parts = target.split(".") if target else []
            wanted = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            wanted += [f"{target}.{item}" for item in fromlist or () if item != "*"]
            for module in wanted:
                plan = self.pending.pop(module, None)
                if plan is not None:
                    stage, current = self.stage, self.module
                    self.swap_module(plan)
                    self.stage, self.module = stage, current
        return self.imports(name, globals, locals, fromlist, level)

    def start_server(self, cls: type[Server], *args: Any, name: str | None = None,
                     **kwargs: Any) -> Server:
        """``Server.start`` during the swap: a module body that starts a server
        by a name a live server of that class holds gets the live server."""
        ours = threading.get_ident() == self.thread
        live = _server_names.get(name) if name is not None else None
        if live is not None and ours and type(live) is cls and live.alive:
            return live
        server = _start_server.__func__(cls, *args, name=name, **kwargs)
        if ours:
            self.started.append(server)  # stopped again if the upgrade rolls back
        return server

    def _update_class(self, plan: _ModulePlan, cls: type, body: types.FunctionType,
                      bases: tuple, keywords: dict) -> type:
        """Run a class's new body and apply it to the live class; returns the class."""
        _, namespace, _ = types.prepare_class(body.__name__, types.resolve_bases(bases), keywords)
        namespace.update((name, cls.__dict__[name]) for name in plan.class_kept.get(
            cls.__qualname__, ()) if name in cls.__dict__)  # what the left-out statements bound
        exec(body.__code__, body.__globals__, namespace, closure=body.__closure__)
        cell = namespace.get("__classcell__")
        if cell is not None:  # zero-argument super() in the new methods
            cell.cell_contents = cls
        self._save_class(cls)
        self._set_attributes(plan, cls, namespace)
        if ({Generic, Protocol} & set(types.resolve_bases(bases))
                and not issubclass(cls, Generic)):
            # Generic[...] or Protocol added as a base (the live class keeps its bases and
            # layout): subscripting works as on a class made anew.
            cls.__orig_bases__ = bases
            cls.__parameters__ = tuple(dict.fromkeys(
                p for base in bases for p in getattr(base, "__parameters__", ())))
            cls.__class_getitem__ = Generic.__dict__["__class_getitem__"]
        if "__doc__" not in namespace:
            cls.__doc__ = None
        decorated = (cls.__qualname__, _CLASS) in plan.undecorated
        defined = namespace.keys() | plan.in_place.names.get(cls.__qualname__, set())
        if "__hash__" not in defined and not decorated:
            # What type() does for a class defining __eq__ (a decorator that
            # does not run again keeps what it set: @dataclass's __hash__).
            if "__eq__" in defined:
                cls.__hash__ = None
            elif "__hash__" in cls.__dict__ and cls.__dict__["__hash__"] is None:
                delattr(cls, "__hash__")
        if cls.__qualname__ in plan.redecorated:  # @dataclass runs again: let it
            for attribute in _DATACLASS_GENERATED & cls.__dict__.keys() - namespace.keys():
                delattr(cls, attribute)
        if isinstance(cls, abc.ABCMeta):
            abc.update_abstractmethods(cls)
            cls._abc_caches_clear()
        return cls

    def _set_attributes(self, plan: _ModulePlan, cls: type, namespace: dict) -> None:
        """Add, change and remove the attributes of a live class as its new body says."""
        qualname = cls.__qualname__
        old_scope, new_scope = plan.old.get(qualname), plan.new.get(qualname)
        rerun = plan.rerun.get(qualname)
        members = set(cls._member_map_) if isinstance(cls, enum.EnumMeta) else set()
        skipped = _CLASS_LAYOUT | members | {"_ignore_"}
        decorated = (qualname, _CLASS) in plan.undecorated
        for attribute, value in dict(namespace).items():
            if attribute in skipped:
                continue
            current = cls.__dict__.get(attribute, _MISSING)
            if decorated and (type(current) is types.MemberDescriptorType or (
                    current is _MISSING and old_scope is not None
                    and attribute in old_scope.statements)):
                continue  # what a decorator that does not run again made of it (attrs fields)
            if attribute in ("__init_subclass__", "__class_getitem__") and _is_a(
                    value, types.FunctionType):
                value = classmethod(value)
            elif attribute == "__new__" and _is_a(value, types.FunctionType):
                value = staticmethod(value)
            if current is value:
                continue  # most methods: the reuse hook kept the live object
            if current is not _MISSING and (f"{qualname}.{attribute}" in plan.continuing
                                            or not _defined_twice(old_scope, new_scope, attribute)):
                changed = (rerun is None or new_scope is None or attribute in rerun
                           or attribute not in new_scope.statements)
                value = self.merge(current, value, changed, (plan.name, qualname, attribute))
            if value is not current:  # else the merge kept the old object
                setattr(cls, attribute, value)
                set_name = getattr(type(value), "__set_name__", None)
                if set_name is not None:
                    set_name(value, cls, attribute)
        if old_scope is not None and new_scope is not None:
            for attribute in old_scope.statements.keys() - new_scope.statements.keys() - skipped:
                if attribute in cls.__dict__:
                    delattr(cls, attribute)

    def _swap_closures(self, plan: _ModulePlan) -> None:
        """Closures made by a factory whose inner function changed run the new
        inner code (their factory's statement does not run again)."""
        for function, code in plan.closures:
            self._save_function(function)
            function.__code__ = code

    # -- modules --

    def swap_module(self, plan: _ModulePlan) -> None:
        """Execute the new body of one module in place and merge its state."""
        namespace = plan.module.__dict__
        old = self._save_module(plan.module)
        namespace["__doc__"] = plan.doc
        namespace[_REUSE] = self.reuse
        outer = self.plan  # the module whose body imported this one, if any
        self.plan, self.stage, self.module = plan, f"executing module {plan.name}", plan.name
        self._swap_in_place(plan.in_place)
        try:
            exec(plan.swap_code, namespace)
        finally:
            namespace.pop(_REUSE, None)
            self.plan = outer
        self.stage = f"merging the state of module {plan.name}"
        self._swap_closures(plan)
        keep = namespace.get("__hot_keep__", old.get("__hot_keep__", ()))
        keep = {keep} if isinstance(keep, str) else set(keep)
        old_scope, new_scope = plan.old[""], plan.new[""]
        for name, value in list(namespace.items()):
            current = old.get(name, _MISSING)
            if name in plan.kept and value is not current:
                if current is _MISSING:  # ``import os`` ... ``del os``
                    del namespace[name]
                else:
                    namespace[name] = current
            elif current is _MISSING:
                if not (name.startswith("__") and name.endswith("__")):
                    self.added.append(f"{plan.name}.{name}")
            elif name in keep:
                namespace[name] = current
            elif (value is not current and name not in ("__doc__", "__annotations__")
                  and (name in plan.continuing or not _defined_twice(old_scope, new_scope, name))):
                namespace[name] = self.merge(current, value, name in plan.rerun[""]
                                             or name not in new_scope.statements,
                                             (plan.name, name))
        for name in new_scope.twice:  # ``_`` of registrations: the live one it continues
            live = self.continued.get(id(namespace.get(name)))
            if live is not None:
                namespace[name] = live
        gone = old_scope.statements.keys() - new_scope.statements.keys()
        for source in plan.stars:  # what ``from X import *`` gave and gives no more
            before = self.namespaces[source.name]
            gone |= {name for name in _public_names(before) - _public_names(source.module.__dict__)
                     if name not in new_scope.statements and old.get(name) is before[name]}
        for name in gone - keep:
            value = namespace.get(name, _MISSING)
            submodule = sys.modules.get(f"{plan.name}.{name}")
            if value is not _MISSING and (submodule is None or value is not submodule):
                del namespace[name]
        self.finished.append(plan.name)

    def run(self) -> None:
        """Swap every module in order, then run each new ``__hot_upgrade__``."""
        self._save_registries(self.dispatchers)
        for name in list(_tracker.loaded):  # a module body may assign to any of them
            module = sys.modules.get(name)
            if module is not None:
                self._save_module(module)
        # Patched for the whole process, as a class statement finds
        # ``__build_class__`` in the builtins of the frame and a module body
        # finds ``start`` on the class; both hooks act only for the thread
        # and the module being swapped, and hand everything else on.
        builtins.__build_class__ = self.build_class
        self.imports = builtins.__import__  # what imports, also when the app replaced it
        builtins.__import__ = self.import_module
        Server.start = classmethod(self.start_server)
        try:
            while self.pending:
                self.swap_module(self.pending.pop(next(iter(self.pending))))
        finally:
            builtins.__build_class__ = _build_class
            builtins.__import__ = self.imports
            Server.start = _start_server
        if self.replacements:
            self.stage = "rebinding replaced objects"
            self._rebind_aliases({plan.name for plan in self.plans})
        self._replace_codes()
        for plan in self.plans:
            for qualname, migration in plan.migrations.items():
                self.stage, self.module = f"migrating live instances of {plan.name}.{qualname}", \
                    plan.name
                self._migrate_instances(_lookup(plan.module.__dict__, qualname), migration)
        for plan in sorted(self.plans, key=lambda plan: self.finished.index(plan.name)):
            if "__hot_upgrade__" in plan.new[""].statements:
                self.stage, self.module = f"running {plan.name}.__hot_upgrade__", plan.name
                # a copy: the original is also what a rollback restores
                plan.module.__hot_upgrade__(dict(self.namespaces[plan.name]))

    def _replace_codes(self) -> None:
        """Where a set, dict or list holds the old code of a function that took
        new code, put the new code."""
        pairs = self.code_pairs

        def new(item: object) -> object:
            pair = pairs.get(id(item)) if type(item) is types.CodeType else None
            return pair[1] if pair is not None and pair[0] is item else item

        for holder in self.code_holders:
            if type(holder) is dict:
                changed = {key: value for key, value in holder.items()
                           if new(key) is not key or new(value) is not value}
                if changed:
                    before = dict(holder)
                    self.undo.append(lambda h=holder, b=before: _restore_mapping(h, b))
                    for key, value in changed.items():
                        del holder[key]
                        holder[new(key)] = new(value)
            else:
                found = [item for item in holder if new(item) is not item]
                if not found:
                    continue
                before = holder.copy()
                if type(holder) is set:
                    self.undo.append(lambda h=holder, b=before: (h.clear(), h.update(b)))
                    holder.difference_update(found)
                    holder.update(map(new, found))
                else:
                    self.undo.append(lambda h=holder, b=before: h.__setitem__(slice(None), b))
                    holder[:] = list(map(new, holder))

    def _migrate_instances(self, cls: type, migration: _Migration) -> None:
        """Fill in the new default-factory fields of each live instance and run
        the class's ``__hot_migrate__(old)`` on it; a rollback restores the
        instances' attribute dicts."""
        old = types.MappingProxyType(self.classes_before.get(id(cls), {}))
        fields = cls.__dict__.get("__dataclass_fields__", {})
        for _, obj in list(_instances_of({cls})):
            attributes = _instance_attributes(obj)
            before = dict(attributes)
            self.undo.append(lambda a=attributes, b=before: (a.clear(), a.update(b)))
            for name in migration.factories:
                if _lacks(obj, name):
                    object.__setattr__(obj, name, fields[name].default_factory())
            if migration.hook:
                obj.__hot_migrate__(old)
            missing = sorted(name for name in migration.needed if _lacks(obj, name))
            if missing:
                raise FlyDeployError(f"{cls.__qualname__}.{_MIGRATE} left a live instance "
                                     f"without self.{missing[0]}, which the new code reads")

    def _rebind_aliases(self, swapped: set[str]) -> None:
        """In the other tracked modules, names bound to an object that was
        replaced (``from .impl import Service`` in an unchanged package
        ``__init__``) now name its replacement; so do the reducers that
        ``copyreg.pickle`` registered (what pickle and copy call)."""
        table = copyreg.dispatch_table
        stale = {cls: self.replacements[id(reducer)][1] for cls, reducer in list(table.items())
                 if id(reducer) in self.replacements
                 and self.replacements[id(reducer)][0] is reducer}
        if stale:
            before = dict(table)
            self.undo.append(lambda: _restore_mapping(table, before))
            table.update(stale)
        for name in list(_tracker.loaded):
            module = sys.modules.get(name)
            if module is None or name in swapped:
                continue
            stale = [(key, self.replacements[id(value)][1])
                     for key, value in module.__dict__.items()
                     if id(value) in self.replacements and self.replacements[id(value)][0] is value]
            if stale:
                self._save_module(module)
                module.__dict__.update(stale)

    def transact(self, affected: list[Server], extra: object, helper: _PauseHelper) -> bool:
        """Inside the pause: swap the modules, then migrate the state of every
        affected server through its new ``code_change``, all of them in one
        batch on ``helper`` within the pause's deadline.  On any failure
        everything is rolled back; returns whether it all succeeded."""
        # The version each server ran, read before the swap changes the class attribute.
        versions = [(server, getattr(server, "vsn", None)) for server in affected]
        migrating: list[Server | None] = [None]  # the server whose code_change runs
        given_up = threading.Lock()  # held for good once the deadline passed

        def migrate(pairs: list[tuple[Server, Any]]) -> None:
            carry_on, done = given_up.acquire, given_up.release
            for server, old_vsn in pairs:
                migrating[0] = server
                state = server.code_change(old_vsn, server._state, extra)
                if not carry_on(False):
                    return  # too late: the pausing thread rolled back and resumed
                server._state = state
                done()
            migrating[0] = None

        try:
            with _frameworks_refreshed(self):
                self.run()
            self.clock.lap("swap")
            # Only an app's own code_change can change a state: only those states are kept for a
            # rollback, since copying them holds everything for as long as it takes.
            batch = _with_own_code_change(versions)
            before = _snapshot([server._state for server, _ in batch])
            self.undo.append(lambda: _restore_states([server for server, _ in batch], before()))
            if batch:
                try:
                    helper.call(migrate, batch)
                except CodeChangeTimeout:
                    given_up.acquire()
                    raise
            self.clock.lap("migrate")
        except BaseException as exc:
            self.rollback()
            if migrating[0] is not None:
                server = migrating[0]
                self.stage = f"code_change of server {_server_label(server)}"
                self.module = type(server).__module__
                self.failed = [_server_label(server)]
            self.error = _failure_message(self.stage, exc, self.paths)
            self.failed_module = self.module or None
            if not isinstance(exc, Exception):
                raise
            return False
        return True


_start_server = Server.__dict__["start"]


def _dispatcher_candidates(plans: list[_ModulePlan]) -> Iterator[object]:
    """The values of every tracked module and of the classes (nested ones
    too) that the upgraded modules define."""
    for name in list(_tracker.loaded):
        module = sys.modules.get(name)
        if module is not None:
            yield from list(module.__dict__.values())
    classes = [value for plan in plans for value in list(plan.module.__dict__.values())
               if _is_a(value, type) and value.__module__ == plan.name]
    seen: set[int] = set()
    while classes:
        cls = classes.pop()
        if id(cls) in seen:
            continue
        seen.add(id(cls))
        for value in list(cls.__dict__.values()):
            yield value
            if _is_a(value, type):
                classes.append(value)


class CodeChangeTimeout(FlyDeployError):
    """A ``code_change`` did not return before the pause's deadline; the upgrade was rolled back."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"code_change did not return within the {timeout:g} s the pause may last (the suspend "
                         "timeout); its result, whenever it comes, is thrown away. Make code_change quick, or "
                         "raise the suspend timeout.")


def _with_own_code_change(versions: list[tuple[Server, Any]]) -> list[tuple[Server, Any]]:
    """The (server, old version) pairs of the servers whose class has a
    ``code_change`` of its own, in order (the default one returns the state
    as it is: nothing to call)."""
    own: dict[type, bool] = {}
    for server, _ in versions:
        cls = type(server)
        if cls not in own:
            own[cls] = cls.code_change is not Server.code_change
    return [pair for pair in versions if own[type(pair[0])]]


class _PauseHelper:
    """A thread that runs one function for the pausing thread, within the pause's deadline.

    Started before the pause, so that the pause does not wait for a thread to
    start; from then on it acts for the pausing thread (its calls to held
    servers get through) until ``call`` handed it its function and that
    returned, or ``close`` let it go unused.  Past the deadline ``call``
    raises ``CodeChangeTimeout`` and the thread is left to finish on its own;
    the function must then make sure nothing it does later counts
    (``_Swap.transact`` stops assigning states).
    """

    def __init__(self, pause: _Pause) -> None:
        self._pause = pause
        self._work: tuple[Callable, tuple] | None = None
        self._handed, self._finished = threading.Event(), threading.Event()
        self._outcome: list[tuple[bool, Any]] = []
        thread = threading.Thread(target=self._run, name="flydeploy-code-change", daemon=True)
        thread.start()
        self._ident = thread.ident
        pause._hold.helpers.add(self._ident)

    def _run(self) -> None:
        self._handed.wait()
        if self._work is None:
            return  # let go unused
        function, args = self._work
        try:
            self._outcome.append((True, function(*args)))
        except BaseException as exc:  # handed to the pausing thread
            self._outcome.append((False, exc))
        self._finished.set()

    def call(self, function: Callable, *args: object) -> Any:
        """``function(*args)`` on the helper thread, by the pause's deadline."""
        deadline = self._pause.deadline
        self._work = (function, args)
        self._handed.set()
        try:
            self._finished.wait(None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
        finally:
            self.close()
        if not self._outcome:
            raise CodeChangeTimeout(self._pause.timeout)
        done, value = self._outcome[0]
        if done:
            return value
        raise value

    def close(self) -> None:
        """Stop acting for the pausing thread; an unused thread ends."""
        self._pause._hold.helpers.discard(self._ident)
        self._handed.set()


def _snapshot(states: list[object]) -> Callable[[], list[object]]:
    """Copies of server states that a ``code_change`` changing a state in
    place cannot touch, as a function that makes them when a rollback needs
    them.  One pickle of them all (fast for plain data, and shared objects
    stay shared); else, per state, a deep copy, else (a lock or socket in
    it) a shallow one, else the object itself."""
    try:
        frozen = pickle.dumps(states, pickle.HIGHEST_PROTOCOL)
        return lambda: pickle.loads(frozen)
    except Exception:
        pass
    copies = []
    for state in states:
        for copier in (copy.deepcopy, copy.copy, lambda state: state):
            try:
                copies.append(copier(state))
                break
            except Exception:
                continue
    return lambda: copies


def _public_names(namespace: Mapping[str, object]) -> set[str]:
    """The names ``from module import *`` binds, for a module's namespace."""
    names = namespace.get("__all__")
    if isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names):
        return set(names) & namespace.keys()
    return {name for name in namespace if not name.startswith("_")}


def _restore_states(servers: list[Server], states: list[object]) -> None:
    for server, state in zip(servers, states):
        server._state = state


def _restore_mapping(mapping: Mapping, contents: Mapping, owner: object = None,
                     keep: Iterable[str] = ()) -> None:
    """Make ``mapping`` equal ``contents`` again without ever emptying it; a
    class's read-only dict is written through its class, ``owner``."""
    if owner is None:
        set_item, del_item = mapping.__setitem__, mapping.__delitem__
    else:
        set_item = functools.partial(setattr, owner)
        del_item = functools.partial(delattr, owner)
    for key in mapping.keys() - contents.keys() - set(keep):
        del_item(key)
    for key, value in contents.items():
        if mapping.get(key, _MISSING) is not value:
            set_item(key, value)


# --- reload_modules ---------------------------------------------------------


@dataclasses.dataclass
class UpgradeReport:
    """What one ``reload_modules`` call did.

    ``modules`` are the reloaded modules (the changed ones and those that
    import what changed) in the order they finished running, as in a fresh
    import; ``added`` and ``replaced`` are ``module.name`` labels of new names
    and of objects that could not keep their identity; ``servers_upgraded``
    and ``servers_failed`` name servers; ``suspend_ms`` is the longest time
    any server or loop was held and ``total_ms`` the whole call; ``error`` is
    a readable message when ``ok`` is False, ``failed_module`` the module that
    was refused or whose new code failed (None if none was at fault), and
    ``rolled_back`` says that changes had begun and were all undone;
    ``phases_ms`` how long each phase it got to took (``UPGRADE_PHASES``).
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
    failed_module: str | None = None
    phases_ms: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        """The report as JSON-ready values."""
        return dataclasses.asdict(self)


# The phases of an upgrade, in order; ``reload_modules`` says what each does.
UPGRADE_PHASES = ("prepare", "pause", "swap", "migrate", "resume", "commit")
_upgrade_lock = threading.Lock()
_upgrading_thread: int | None = None  # the thread inside reload_modules or plan_upgrade, if any
_upgrade_callbacks: list[Callable[[UpgradeReport], object]] = []


def on_upgrade(callback: Callable[[UpgradeReport], object], *,
               remove: bool = False) -> Callable[[UpgradeReport], object]:
    """Register ``callback`` to be called with the report after every upgrade
    attempt (check ``report.ok``); ``remove=True`` unregisters it.  An
    exception in a callback is logged, never raised.  Returns ``callback``,
    so this works as a decorator."""
    return _register_callback(_upgrade_callbacks, callback, remove, "on_upgrade")


def _register_callback(callbacks: list, callback: Callable, remove: bool, what: str) -> Callable:
    if not callable(callback):
        raise FlyDeployError(f"{what}() needs a callable, got {callback!r}")
    if remove:
        if callback in callbacks:
            callbacks.remove(callback)
    elif callback not in callbacks:
        callbacks.append(callback)
    return callback


def _prepare(names: list[str], *, staged: Mapping[str, str] = {},
             added: Mapping[str, str] = {}) -> list[_ModulePlan]:
    """The prepare phase: plans for every module in import order, touching nothing live
    (modules outside the application that the new code imports for the first
    time are imported here, so the pause reads no files).  ``staged`` and
    ``added`` (module name -> the path of a module the release adds) plan
    files not yet published (``plan_upgrade``)."""
    plans = {}
    for name in dict.fromkeys(names):
        with _analysing(name):
            plans[name] = _plan_module(name, staged=staged)
    importlib.invalidate_caches()  # modules added next to the changed ones
    search_paths: dict[str, list[str]] = {}
    for name in sorted(set().union(*(plan.imports for plan in plans.values()))):
        if name in added:
            _compile_staged(name, added[name], staged)
        else:
            _prepare_import(name, search_paths, staged)
    for plan in _import_order(plans):
        with _analysing(plan.name):
            _rewrite(plan, plans)
    _add_importers(plans)
    for plan in plans.values():
        plan.stars = _star_sources(plan, plans)
    return _import_order(plans)


def _compile_staged(name: str, origin: str, staged: Mapping[str, str]) -> None:
    """Compile the staged source of module ``name`` (to be published at ``origin``); a syntax
    error refuses the upgrade.  No bytecode is cached: nothing is published yet."""
    try:
        compile(_read_bytes(_staged_path(staged, origin)), origin, "exec", dont_inherit=True)
    except OSError as exc:
        raise UpgradeRefused(f"cannot read the staged {origin} for module {name}: {exc.strerror}; "
                             "stage the release again", module=name) from None
    except SyntaxError as exc:
        raise _syntax_refusal(exc, origin, name) from None


def _prepare_import(name: str, search_paths: dict[str, list[str]], staged: Mapping[str, str] = {}) -> None:
    """Ready a module the new code imports for the first time: an
    application module is read and compiled (a syntax error refuses the
    upgrade), any other module is imported now.  A file of ``staged`` is
    only compiled, from where it is staged: no bytecode is cached for it."""
    parent = name.rpartition(".")[0]
    if name in sys.modules:
        return
    if parent:
        path = (getattr(sys.modules[parent], "__path__", None) if parent in sys.modules
                else search_paths.get(parent))
        if path is None:
            return  # not a package, or a package that will not be imported
    else:
        path = None
    try:
        spec = importlib.machinery.PathFinder.find_spec(name, path)
    except (ImportError, ValueError):
        spec = None
    origin = spec.origin if spec is not None and spec.has_location else None
    if origin is not None and _tracker.covers(name, origin):
        if spec.submodule_search_locations is not None:
            search_paths[name] = list(spec.submodule_search_locations)
        if origin.endswith(".py") and _staged_path(staged, origin) != origin:
            _compile_staged(name, origin, staged)
        elif origin.endswith(".py"):
            try:
                source = _read_bytes(origin)
                _prepared_imports[origin] = (source, _code_from_source(origin, source))
            except OSError:
                pass  # the import inside the swap reports it, and rolls back
            except SyntaxError as exc:
                raise _syntax_refusal(exc, origin, name) from None
        return
    if parent and parent not in sys.modules:
        return  # a name inside a new application package that is no module
    try:
        importlib.import_module(name)
    except Exception:  # not a module (``from m import name``), or broken: the swap says so
        pass


def _failure_message(stage: str, exc: BaseException, paths: set[str]) -> str:
    # Built inside the pause: file names and line numbers only, no source
    # lines read from disk.  The place shown is the deepest one in the
    # upgraded modules, where the new code went wrong.
    frames = traceback.StackSummary.extract(traceback.walk_tb(exc.__traceback__),
                                            lookup_lines=False)
    ours = [frame for frame in frames if frame.filename in paths] or frames
    where = f" ({ours[-1].filename}, line {ours[-1].lineno})" if ours else ""
    return (f"{stage} failed: {type(exc).__name__}: {exc}{where}; "
            "every change was rolled back")


def _remove_stale_bytecode(path: str) -> None:
    """Remove the cached bytecode of every optimisation level of a changed
    module, so a restarted process (``python -O`` too) compiles the new source."""
    for level in ("", 1, 2):
        try:
            os.unlink(importlib.util.cache_from_source(path, optimization=level))
        except (NotImplementedError, OSError):
            pass


def _commit(plans: list[_ModulePlan]) -> None:
    """After a successful swap: remember what runs now and refresh caches."""
    for plan in plans:
        _tracker.remember(plan.name, plan.path, plan.source)
        _analysed[plan.name] = (_sha256(plan.source), plan.new)
        _remove_stale_bytecode(plan.path)
        linecache.checkcache(plan.path)


def reload_modules(names: Iterable[str] | None = None, *, suspend_timeout: float = 10.0,
                   extra: object = None, files: Iterable[str] | None = None) -> UpgradeReport:
    """Upgrade modules in place from their source on disk.

    ``names`` defaults to ``modified_modules()``; the modules that import
    what they change join.  The phases (``UPGRADE_PHASES``, timed in
    ``UpgradeReport.phases_ms``), like the steps of a release handler:

    1. prepare  read, parse and compile every new source, plan what runs
                again and what takes new code in place (the plan section),
                refuse what cannot be done; nothing live changes and
                everything keeps running.  A refusal ends the call here.
    2. pause    let the requests under way in a Flask app finish and gate
                new ones (section 4b), then hold every server at a safe
                point, park every attached loop.
    3. swap     run the planned module bodies in the live modules, in the
                order a fresh import runs them, logging every change; then
                refresh the web frameworks' state (section 4b).
    4. migrate  each affected server's state through its new ``code_change``,
                within the pause's deadline: one batch, on a thread started
                before the pause, so that one that hangs ends the upgrade
                at the deadline.  A failure in 3 or 4 rolls everything
                back.  The end of migrate is the point of no return.
    5. resume   release the servers and loops, which now run the new code.
    6. commit   record what runs now, drop stale bytecode, send the upgraded
                servers ``Upgraded``; then the ``on_upgrade`` callbacks run.

    Failures are reported in the returned report (``ok`` False), never
    raised, whatever the app's code and objects are; this raises only on
    misuse, such as calling it from code an upgrade runs
    (``__hot_upgrade__``, ``code_change``, a module body).

    A module-level ``Server.start(..., name=...)`` that an upgrade runs again
    returns the live server of that name and class (its state goes through
    ``code_change``); give module-level servers a name, or an edit of their
    line would start a second one.

    ``files`` are the paths of the files that changed (templates, static
    files, sources: what a release wrote), handed to the framework
    refreshes and ``on_reload`` callbacks of section 4b inside the pause;
    changed files pause and refresh even when no module changed.  None means
    not known: a refresh then assumes any file may have changed.
    """
    if isinstance(names, str):
        raise FlyDeployError("reload_modules() takes a list of module names, not one string: "
                             f"write reload_modules([{names!r}])")
    _check_timeout(suspend_timeout, "suspend_timeout")
    started = time.perf_counter()
    report = UpgradeReport()
    clock = _Clock(report.phases_ms)
    files = None if files is None else frozenset(os.path.abspath(os.fspath(path)) for path in files)
    with _upgrading("reload_modules"):
        try:
            plans = _prepare(modified_modules() if names is None else list(names))
            report.modules = [plan.name for plan in plans]
            if plans or files:
                _swap_everything(plans, report, suspend_timeout, extra, clock, files)
            else:
                report.ok = True
        except UpgradeRefused as exc:
            report.error, report.failed_module = str(exc), exc.module
    report.total_ms = (time.perf_counter() - started) * 1000
    if report.modules or report.error:
        for callback in list(_upgrade_callbacks):
            try:
                callback(report)
            except Exception:
                log.exception("flydeploy: on_upgrade callback %r failed", callback)
    return report


@dataclasses.dataclass
class PlannedCodeChange:
    """A live server whose state goes through ``code_change`` when the plan is applied."""

    server: str
    vsn_old: Any
    vsn_new: Any


@dataclasses.dataclass
class UpgradePlan:
    """What applying a release would do in this process (``plan_upgrade``).

    ``modules_changed`` are the modules that run again (changed, and those
    importing what changed), ``modules_added`` the application modules the
    release adds, ``code_change`` the servers migrated with their ``vsn``
    before and after, ``refused`` why the release cannot be applied hot
    (None when it can).
    """

    modules_changed: list[str] = dataclasses.field(default_factory=list)
    modules_added: list[str] = dataclasses.field(default_factory=list)
    code_change: list[PlannedCodeChange] = dataclasses.field(default_factory=list)
    refused: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The plan as JSON-ready values."""
        return dataclasses.asdict(self)


def plan_upgrade(staged: Mapping[str, str] | None = None) -> UpgradePlan:
    """The prepare phase of ``reload_modules`` alone, on files not yet published.

    ``staged`` maps the path of each file a release changes (or adds) to
    where its new content waits (written beside it, unpublished); the other
    files are read where they are.  Reads, parses, compiles and plans every
    module that would change, with the refusals that say "cold deploy
    required", and changes nothing of the app: no module, no server, no file
    (no bytecode is cached).  As in ``reload_modules``, a library module
    (outside the app) that the new code imports for the first time is
    imported here.  A refusal is a value (``UpgradePlan.refused``): this
    never raises for the app's code, only on misuse (a call from code an
    upgrade runs).
    """
    staged = {os.path.realpath(os.fspath(path)): os.fspath(where) for path, where in (staged or {}).items()}
    plan = UpgradePlan()
    with _upgrading("plan_upgrade"):
        try:
            added = _added_modules(staged)
            plan.modules_added = sorted(added)
            plans = {module.name: module for module in _prepare(_modified_modules(staged), staged=staged,
                                                                  added=added)}
            plan.modules_changed = list(plans)
            changed = set(plans)
            plan.code_change = [PlannedCodeChange(_server_label(server), _json_ready(getattr(server, "vsn", None)),
                                                  _json_ready(_new_vsn(type(server), plans)))
                                for server in servers() if _runs_changed_code(type(server), changed)]
        except FlyDeployError as exc:
            plan.refused = str(exc)
        except Exception as exc:  # an object of the app no rule foresaw: still a value
            plan.refused = (f"planning failed ({type(exc).__name__}: {exc}); nothing was changed: deploy this "
                            "release cold and report the error")
    return plan


@contextlib.contextmanager
def _upgrading(what: str) -> Iterator[None]:
    """One upgrade or plan (``what``) of this process at a time, on this thread: the prepared
    imports are dropped at the end.  Called from code an upgrade runs, it is refused rather
    than deadlocked on the lock."""
    global _upgrading_thread
    if _upgrading_thread == threading.get_ident():
        raise FlyDeployError(f"{what}() was called from code an upgrade runs (a module body, __hot_upgrade__ "
                             "or code_change); call it from outside, for instance from an on_upgrade callback "
                             "or another thread")
    with _upgrade_lock:
        _upgrading_thread = threading.get_ident()
        try:
            yield
        finally:
            _upgrading_thread = None
            _prepared_imports.clear()


def _runs_changed_code(cls: type, changed: Collection[str]) -> bool:
    """Whether instances of ``cls`` run code of the ``changed`` modules (its class or a base)."""
    return any(c.__module__ in changed for c in cls.__mro__)


def _added_modules(staged: Mapping[str, str]) -> dict[str, str]:
    """The application modules that ``staged`` adds (files that do not exist yet): name -> path."""
    added = {}
    for path in staged:
        for root in _tracker.roots:
            name = _module_name(os.path.relpath(path, root).split(os.sep)) if _is_under(path, root) else None
            if name and name not in sys.modules and not os.path.lexists(path) and _tracker.covers(name, path):
                added[name] = path
    return added


def _new_vsn(cls: type, plans: Mapping[str, _ModulePlan]) -> Any:
    """The ``vsn`` that instances of ``cls`` have once ``plans`` ran: assigned in a class body
    of its new source (a literal, else the expression's text), else inherited."""
    for klass in cls.__mro__:
        plan = plans.get(klass.__module__)
        if plan is None:
            if "vsn" in vars(klass):
                return vars(klass)["vsn"]
            continue
        value = _assigned_in_class(plan.tree.body, klass.__qualname__.split("."), "vsn")
        if value is not _MISSING:
            return value
    return None


def _assigned_in_class(body: list[ast.stmt], qualname: list[str], name: str) -> Any:
    """The value last assigned to ``name`` in the body of class ``qualname`` of a source."""
    for statement in body:
        if isinstance(statement, ast.ClassDef) and statement.name == qualname[0]:
            if len(qualname) > 1:
                return _assigned_in_class(statement.body, qualname[1:], name)
            value: Any = _MISSING
            for item in statement.body:
                targets = (item.targets if isinstance(item, ast.Assign)
                           else [item.target] if isinstance(item, ast.AnnAssign) and item.value else [])
                if any(isinstance(target, ast.Name) and target.id == name for target in targets):
                    try:
                        value = ast.literal_eval(item.value)
                    except ValueError:
                        value = ast.unparse(item.value)
            return value
    return _MISSING


def _json_ready(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


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
                     extra: object, clock: _Clock, files: frozenset[str] | None = None) -> None:
    """The phases from the end of prepare on: hold every live server and
    attached loop in one pause, swap, migrate the state of the affected
    servers, and roll everything back on failure; resume; commit, and tell
    the upgraded servers."""
    changed = {plan.name for plan in plans}
    swap = _Swap(plans, clock, files)
    # One deadline for the requests under way and the pause: nothing waits longer than suspend_timeout.
    deadline = time.monotonic() + suspend_timeout
    pause = _Pause(servers(), timeout=suspend_timeout, deadline=deadline)
    try:
        helper = _PauseHelper(pause)
    except RuntimeError as exc:  # the process may start no more threads
        report.error = (f"could not start the thread that runs code_change ({exc}); nothing was changed "
                        "and no server was held: retry when the process runs fewer threads")
        return
    affected: list[Server] = []
    upgraded_class: dict[type, bool] = {}
    clock.lap("prepare")
    try:
        # The requests under way finish before the servers are held (section 4b).
        with (contextlib.closing(helper), _requests_held(swap.frameworks, suspend_timeout, deadline),
              pause, _garbage_collection_paused()):
            clock.lap("pause")
            # Read while held: servers that started meanwhile are held too.
            for server in pause.servers:
                cls = type(server)
                if cls not in upgraded_class:
                    upgraded_class[cls] = _runs_changed_code(cls, changed)
                if upgraded_class[cls]:
                    affected.append(server)
            report.ok = swap.transact(affected, extra, helper)
    except SuspendTimeout as exc:
        report.error = str(exc)
        report.servers_failed = list(exc.names)
        return
    finally:
        report.suspend_ms = pause.held_ms
        clock.lap("resume")
    if not report.ok:
        report.rolled_back = True
        report.error = swap.error
        report.servers_failed = swap.failed
        report.failed_module = swap.failed_module
        for server in swap.started:  # the code that started them is gone again
            try:
                server.stop("upgrade rolled back")
            except FlyDeployError:
                log.exception("flydeploy: stopping %r after the rollback failed", server)
        return
    report.modules, report.added, report.replaced = swap.finished, swap.added, swap.replaced
    _commit(plans)
    upgraded = Upgraded(modules=tuple(report.modules))
    for server in affected:
        server.send(upgraded)
    report.servers_upgraded = [_server_label(server) for server in affected]
    clock.lap("commit")


class _Clock:
    """Times the phases of one upgrade into ``UpgradeReport.phases_ms``."""

    def __init__(self, phases: dict[str, float]) -> None:
        self.phases = phases
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Record the time since the last lap as ``phase``'s."""
        now = time.perf_counter()
        self.phases[phase] = round((now - self.last) * 1000, 3)
        self.last = now


def _server_label(server: Server) -> str:
    return server.name or repr(server)


# ===========================================================================
# 4b. Frameworks: what a cold start of the new code would serve
# ===========================================================================
#
# Web frameworks keep what the old module bodies built: compiled templates,
# routes and handlers registered by decorators, URL resolvers.  Inside the
# pause of the code swap and under its undo log, each refresh below makes
# that state what a process cold-started on the new code would build, then
# the ``on_reload`` callbacks run.  A refresh acts only when its framework is
# already in ``sys.modules`` (none is ever imported here) and finds the live
# objects through the garbage collector, so apps need no registration.
#
# Registrations are made again the way a cold start makes them: before the
# new module bodies run, every registration of a reloaded module's function
# whose decorators run again (they changed) or whose def is gone is taken
# out; the new bodies then register what the new code registers, and the
# registrations of unchanged decorators stay as they are.


@dataclasses.dataclass(frozen=True)
class Reload:
    """What one upgrade changes, for ``on_reload`` callbacks.

    ``modules`` are the reloaded modules in execution order; ``files`` the
    absolute paths of the files the release changed on this machine
    (templates and static files too), or None when that is not known (then
    assume any file may have changed).
    """

    modules: tuple[str, ...]
    files: frozenset[str] | None
    _undo: Callable[[Callable[[], None]], None] = dataclasses.field(repr=False)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        """Have ``undo`` called if the upgrade is rolled back after all."""
        self._undo(undo)

    def changed(self, suffixes: tuple[str, ...] | None = None) -> bool:
        """Whether a file other than a Python source changed (or may have),
        or, with ``suffixes``, a file ending in one of them."""
        if self.files is None:
            return True
        return any(path.endswith(suffixes) if suffixes else not path.endswith(".py")
                   for path in self.files)


_reload_callbacks: list[Callable[[Reload], object]] = []


def on_reload(callback: Callable[[Reload], object], *,
              remove: bool = False) -> Callable[[Reload], object]:
    """Register ``callback`` to be called with a ``Reload`` inside the pause
    of every upgrade, after the code swap and the framework refreshes and
    before anything resumes: the place to drop an app's or a library's own
    caches of templates, files or module state.  It runs on the upgrading
    thread while the app is held, so it must not wait for the app; an
    exception fails the upgrade, which is rolled back (register undo steps
    with ``reload.on_rollback``).  ``remove=True`` unregisters it.  Returns
    ``callback``, so this works as a decorator."""
    return _register_callback(_reload_callbacks, callback, remove, "on_reload")


@contextlib.contextmanager
def _frameworks_refreshed(swap: _Swap) -> Iterator[None]:
    """Around the module bodies of a swap: take out the registrations the new
    code makes again, then, once the bodies ran, refresh the caches and run
    the ``on_reload`` callbacks.  Every change goes to the swap's undo log."""
    reload = Reload(tuple(plan.name for plan in swap.plans), swap.files, swap.undo.append)
    swap.stage, swap.module = "preparing the web frameworks for the new code", ""
    superseded = _superseded(swap.plans)
    live = swap.frameworks  # what the new bodies make anew starts empty
    _prune_registries(live["jinja2"], _JINJA2_REGISTRIES, superseded, swap.undo.append)
    flask_apps = _flask_before(live["flask"], superseded, swap.undo.append)
    starlette_apps = _starlette_before(live["starlette"], superseded, swap.undo.append)
    yield
    swap.stage, swap.module = "refreshing the web frameworks", ""
    _flask_after(flask_apps)
    _starlette_after(starlette_apps, swap, swap.undo.append)
    if reload.changed():
        _refresh_jinja2(live["jinja2"], swap.undo.append)
    _refresh_django(reload, swap.undo.append)
    for callback in list(_reload_callbacks):
        swap.stage = f"on_reload callback {getattr(callback, '__qualname__', callback)!r}"
        callback(reload)


def _set_logged(obj: object, attribute: str, value: object,
                undo: Callable[[Callable[[], None]], None]) -> None:
    """``setattr`` with the step that puts the old value back on the undo log."""
    before = obj.__dict__.get(attribute, _MISSING)

    def restore() -> None:
        if before is _MISSING:
            obj.__dict__.pop(attribute, None)
        else:
            setattr(obj, attribute, before)

    undo(restore)
    setattr(obj, attribute, value)


# The framework objects the refreshes act on: (module, class) -> what they are called below.
_FRAMEWORK_CLASSES = {("flask.sansio.scaffold", "Scaffold"): "flask",  # Flask >= 2.3
                      ("flask.scaffold", "Scaffold"): "flask",
                      ("starlette.applications", "Starlette"): "starlette",
                      ("jinja2.environment", "Environment"): "jinja2",
                      ("django.core.handlers.wsgi", "WSGIHandler"): "django"}


def _framework_objects() -> dict[str, list]:
    """The live instances of the framework classes whose modules are imported,
    and of their subclasses, by framework: one walk of the heap, through the
    garbage collector's referrers (an instance of a Python class refers to
    its class), and none when no framework is imported.  Found before the
    pause: a walk of a large heap takes milliseconds."""
    kinds: dict[type, str] = {}
    for (module, name), kind in _FRAMEWORK_CLASSES.items():
        todo = [getattr(sys.modules.get(module), name, None)]
        while todo:
            cls = todo.pop()
            if isinstance(cls, type) and cls not in kinds:
                kinds[cls] = kind
                todo.extend(type.__subclasses__(cls))
    found: dict[str, list] = {kind: [] for kind in _FRAMEWORK_CLASSES.values()}
    for obj in gc.get_referrers(*kinds) if kinds else ():
        kind = kinds.get(type(obj))
        if kind is not None:
            found[kind].append(obj)
    return found


def _unwrapped(obj: object) -> object:
    """The function under a registered callable's wrappers (``__wrapped__``, methods, partials)."""
    for _ in range(100):
        inner = (getattr(obj, "__func__", None) if _is_a(obj, (types.MethodType, classmethod, staticmethod))
                 else obj.func if _is_a(obj, functools.partial)
                 else obj.__dict__.get("__wrapped__") if _is_a(obj, types.FunctionType) else None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _superseded(plans: list[_ModulePlan]) -> Callable[[object], bool]:
    """Whether a registered callable is a ``def`` of a reloaded module that
    the new code registers again (its decorators changed and run again) or
    no longer defines: its live registration is not what a cold start makes."""
    by_name = {plan.name: plan for plan in plans}

    def superseded(obj: object) -> bool:
        function = _unwrapped(obj)
        if type(function) is not types.FunctionType:
            return False
        plan = by_name.get(function.__module__)
        qualname = function.__qualname__
        if plan is None or "<locals>" in qualname:
            return False
        old = plan.old.get(qualname.rpartition(".")[0])
        key = (qualname, "")
        return old is not None and key in old.definitions and key not in plan.undecorated

    return superseded


def _prune_registries(owners: list, attributes: tuple[str, ...], superseded: Callable[[object], bool],
                      undo: Callable[[Callable[[], None]], None]) -> None:
    """Give each of ``owners`` its registries ``attributes`` without the superseded callables."""
    for owner in owners:
        for attribute in attributes:
            value = owner.__dict__.get(attribute, _MISSING)
            if value is not _MISSING and (pruned := _pruned(value, superseded)) is not value:
                _set_logged(owner, attribute, pruned, undo)


def _pruned(value: object, superseded: Callable[[object], bool], depth: int = 3) -> object:
    """``value`` without the superseded callables in it (dict keys or values,
    list items, nested ``depth`` deep): a new container when any goes, never
    a change to the live one (which the undo log keeps)."""
    if depth < 0:
        return value
    if isinstance(value, dict):
        kept = {key: _pruned(item, superseded, depth - 1) for key, item in value.items()
                if not (superseded(key) or superseded(item))}
        if len(kept) == len(value) and all(kept[key] is value[key] for key in kept):
            return value
        fresh = copy.copy(value)  # keeps a defaultdict's factory
        fresh.clear()
        fresh.update(kept)
        return fresh
    if isinstance(value, list):
        kept = [_pruned(item, superseded, depth - 1) for item in value if not superseded(item)]
        return value if len(kept) == len(value) and all(a is b for a, b in zip(kept, value)) else kept
    return value


# --- Jinja2 -----------------------------------------------------------------

# What an environment registers functions in (Flask's ``template_filter``,
# ``template_test`` and ``template_global`` too).
_JINJA2_REGISTRIES = ("filters", "tests", "globals")


def _refresh_jinja2(environments: list, undo: Callable[[Callable[[], None]], None]) -> None:
    """Every live Jinja2 ``Environment`` (Flask's, Starlette's and FastAPI's
    ``Jinja2Templates``, Django's Jinja2 backend, plain ones) drops its
    compiled templates, as a cold start has none; auto-reload is off outside
    debug mode, so without this the old templates would keep rendering."""
    for environment in environments:
        cache = environment.__dict__.get("cache")
        if cache:
            fresh = copy.copy(cache)
            fresh.clear()
            _set_logged(environment, "cache", fresh, undo)


# --- Django -----------------------------------------------------------------


def _refresh_django(reload: Reload, undo: Callable[[Callable[[], None]], None]) -> None:
    """Django's cached template loaders forget their templates, the URL
    resolvers are built again from the (reloaded) URLconf, and a hashed
    static files manifest is read again."""
    urls = sys.modules.get("django.urls")
    if urls is not None:
        # Refilled on the next request from whatever code runs then, after a rollback too.
        urls.clear_url_caches()
    template = sys.modules.get("django.template")
    if template is not None and reload.changed():
        for backend in list(getattr(template.engines, "_engines", {}).values()):
            engine = getattr(backend, "engine", None)
            for loader in getattr(engine, "__dict__", {}).get("template_loaders", ()):
                if isinstance(getattr(loader, "get_template_cache", None), dict):
                    _set_logged(loader, "get_template_cache", {}, undo)
    storage = sys.modules.get("django.contrib.staticfiles.storage")
    wrapped = getattr(getattr(storage, "staticfiles_storage", None), "_wrapped", None)
    manifest = getattr(wrapped, "manifest_name", None)
    if manifest and hasattr(wrapped, "load_manifest") and (
            reload.files is None or any(path.endswith(manifest) for path in reload.files)):
        for attribute in ("hashed_files", "manifest_hash"):
            undo(functools.partial(setattr, wrapped, attribute, getattr(wrapped, attribute, None)))
        loaded = wrapped.load_manifest()
        wrapped.hashed_files, wrapped.manifest_hash = (loaded if isinstance(loaded, tuple)
                                                       else (loaded, getattr(wrapped, "manifest_hash", None)))


# --- Flask ------------------------------------------------------------------

# What a Flask app or blueprint registers functions in.
_FLASK_REGISTRIES = ("view_functions", "error_handler_spec", "before_request_funcs",
                     "after_request_funcs", "teardown_request_funcs", "template_context_processors",
                     "url_value_preprocessors", "url_default_functions", "teardown_appcontext_funcs",
                     "shell_context_processors")


def _flask_before(scaffolds: list, superseded: Callable[[object], bool],
                  undo: Callable[[Callable[[], None]], None]) -> list:
    """Take the superseded views, error handlers and hooks out of every Flask
    app and blueprint (and the URL rules of those views), and let the apps
    take new routes although they served requests (Flask refuses a setup
    method after the first request).  A registered blueprint still takes
    none: that refusal says what to do.  Returns the scaffolds to close again."""
    apps = []
    for scaffold in scaffolds:
        views = scaffold.__dict__.get("view_functions", {})
        _prune_registries([scaffold], _FLASK_REGISTRIES, superseded, undo)
        url_map = scaffold.__dict__.get("url_map")
        gone = views.keys() - scaffold.__dict__.get("view_functions", {}).keys()
        if url_map is not None and gone:
            _drop_rules(url_map, gone, undo)
        if "_got_first_request" in scaffold.__dict__:
            # Not by resetting the flag: a request served meanwhile (a WSGI
            # worker's thread is not held) would set it again.
            _set_logged(scaffold, "_check_setup_finished", _setup_allowed, undo)
            apps.append(scaffold)
        elif scaffold.__dict__.get("_got_registered_once"):
            _set_logged(scaffold, "_check_setup_finished",
                        functools.partial(_blueprint_registered, scaffold), undo)
            apps.append(scaffold)
    return apps


def _setup_allowed(f_name: str) -> None:
    """A Flask app's ``_check_setup_finished`` while the new code registers its routes."""


def _blueprint_registered(blueprint: Any, f_name: str) -> None:
    """A registered Flask blueprint's ``_check_setup_finished`` during the swap."""
    raise UpgradeRefused(f"cold deploy required: the new code calls {f_name}() on Flask blueprint "
                         f"{blueprint.name!r}, which is registered on the app already: Flask applies a "
                         "blueprint's routes and handlers when it is registered, so new or changed ones "
                         "need a cold deploy (`fly deploy`); changed view code alone can be hot upgraded",
                         module=None)


def _drop_rules(url_map: object, endpoints: set, undo: Callable[[Callable[[], None]], None]) -> None:
    """Remove the rules of ``endpoints`` from a werkzeug ``Map`` (which has no
    way to): a new matcher with the other rules replaces the live one."""
    matcher = url_map.__dict__.get("_matcher")
    if matcher is None or not isinstance(url_map.__dict__.get("_rules_by_endpoint"), dict):
        raise UpgradeRefused("cannot remove routes from this werkzeug version's URL map; "
                             "upgrade werkzeug to 2.2 or later, or cold deploy", module=None)
    fresh, by_endpoint = type(matcher)(matcher.merge_slashes), {}
    for endpoint, rules in url_map._rules_by_endpoint.items():
        if endpoint not in endpoints:
            by_endpoint[endpoint] = list(rules)
            for rule in rules:
                if not rule.build_only:
                    fresh.add(rule)
    _set_logged(url_map, "_matcher", fresh, undo)
    _set_logged(url_map, "_rules_by_endpoint", by_endpoint, undo)
    _set_logged(url_map, "_remap", True, undo)


def _flask_after(apps: list) -> None:
    for app in apps:
        del app._check_setup_finished


# A WSGI worker's request threads are no servers the pause holds: a request
# served while the module bodies run would see part of the new code (a login
# manager made anew before an unchanged module registered its user loader on
# it again, a URL map between its old and new rules, a ``urls.py`` half run).
# Each live WSGI app gets a gate on the method that serves its requests, once:
# while an upgrade swaps, requests wait at it, and the swap starts once the
# requests under way are finished.  Per framework: that method (looked up on
# the instance first, so the gate takes its place there) and how the app is
# named when it stays busy.
_GATED_METHODS: dict[str, tuple[str, Callable[[Any], str]]] = {
    "flask": ("wsgi_app", lambda app: f"Flask app {app.name!r}"),
    "django": ("get_response", lambda handler: "Django's WSGI handler"),
}


class _RequestGate:
    """What a WSGI app's request method becomes (Flask's ``wsgi_app``, the
    ``get_response`` of Django's ``WSGIHandler``): requests pass, or wait
    while an upgrade swaps on another thread (``closer``)."""

    def __init__(self, inner: Callable) -> None:
        self.inner = inner
        self.changed = threading.Condition(threading.Lock())
        self.active: dict[int, int] = {}  # thread -> requests inside
        self.closer: int | None = None  # the swapping thread, while closed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        me = threading.get_ident()
        with self.changed:  # counted with the lock held: a closing upgrade waits for it
            while self.closer not in (None, me):  # every request passes here: no closure, no Counter
                self.changed.wait()
            self.active[me] = self.active.get(me, 0) + 1
        try:
            return self.inner(*args, **kwargs)
        finally:
            with self.changed:
                left = self.active.pop(me) - 1
                if left:
                    self.active[me] = left


def _request_gate(app: Any, method: str) -> _RequestGate:
    gate = app.__dict__.get(method)
    if not isinstance(gate, _RequestGate):
        gate = _RequestGate(getattr(app, method))
        setattr(app, method, gate)
    return gate


@contextlib.contextmanager
def _requests_held(frameworks: dict[str, list], timeout: float, deadline: float) -> Iterator[None]:
    """Close the gate of every live WSGI app in ``frameworks`` (as
    ``_framework_objects`` finds them) and wait, until ``deadline`` at most
    (the upgrade's, ``timeout`` after it began), for the requests under way
    (also those that started before the gate was put up: a thread running the
    app's request method) to finish; open them again on the way out, after a
    rollback too.  Entered before the pause
    holds the servers: a request under way may be waiting for one."""
    apps = [(app, method, name(app)) for kind, (method, name) in _GATED_METHODS.items()
            for app in frameworks[kind] if callable(getattr(type(app), method, None))]
    if not apps:
        yield
        return
    codes = {getattr(inspect.getattr_static(type(app), method), "__code__", None) for app, method, _ in apps}
    gates = [_request_gate(app, method) for app, method, _ in apps]
    me = threading.get_ident()
    for gate in gates:
        with gate.changed:
            gate.closer = me

    def under_way() -> bool:  # a request of the upgrading thread itself does not count
        for gate in gates:
            with gate.changed:
                if gate.active.keys() - {me}:
                    return True
        for thread, frame in sys._current_frames().items():
            while thread != me and frame is not None:
                if frame.f_code in codes:
                    return True
                frame = frame.f_back
        return False

    try:
        while under_way():
            if time.monotonic() >= deadline:
                raise SuspendTimeout(list(dict.fromkeys(f"the requests under way in {name}"
                                                        for _, _, name in apps)), timeout)
            time.sleep(0.002)
        yield
    finally:
        for gate in gates:
            with gate.changed:
                gate.closer = None
                gate.changed.notify_all()


# --- Starlette / FastAPI ----------------------------------------------------


class _StarletteApp(NamedTuple):
    app: object
    # What the middleware stack is built from, and the stack, before the new code ran.
    router: object
    handlers: dict
    middleware: list
    stack: object


def _starlette_before(starlette_apps: list, superseded: Callable[[object], bool],
                      undo: Callable[[Callable[[], None]], None]) -> list[_StarletteApp]:
    """Take superseded endpoints out of every Starlette/FastAPI app's router
    (mounted routers too), exception handlers and dependency overrides, and
    let the new code add middleware (refused once the stack is built)."""
    apps = []
    for app in starlette_apps:
        _prune_router(getattr(app, "router", None), superseded, undo, set())
        _prune_registries([app], ("exception_handlers", "dependency_overrides"), superseded, undo)
        apps.append(_StarletteApp(app, app.__dict__.get("router"),
                                  dict(app.__dict__.get("exception_handlers") or {}),
                                  list(app.__dict__.get("user_middleware") or []),
                                  app.__dict__.get("middleware_stack")))
        if apps[-1].stack is not None:
            _set_logged(app, "middleware_stack", None, undo)
    return apps


def _prune_router(router: object, superseded: Callable[[object], bool],
                  undo: Callable[[Callable[[], None]], None], seen: set[int]) -> None:
    routes = getattr(router, "__dict__", {}).get("routes")
    if not isinstance(routes, list) or id(router) in seen:
        return
    seen.add(id(router))
    kept = [route for route in routes if not superseded(getattr(route, "endpoint", None))]
    if len(kept) != len(routes):
        _set_logged(router, "routes", kept, undo)
    for route in kept:  # Mount and Host hold routers of their own
        _prune_router(getattr(route, "app", None), superseded, undo, seen)


def _starlette_after(apps: list[_StarletteApp], swap: _Swap,
                     undo: Callable[[Callable[[], None]], None]) -> None:
    """An app object the new module body made again (``app = Starlette(routes=
    routes)`` runs again when ``routes`` changed) lends its routes, handlers
    and middleware to the live app, which the server holds, and the name
    keeps the live app.  The middleware stack (which holds the exception
    handlers and the router) is built again where they or the middleware
    changed, else the live one stays (with the state of its middleware);
    FastAPI's schema is made again."""
    if not apps:  # nothing to compare: the names of the swapped modules need no scan
        return
    for plan in swap.plans:
        namespace = plan.module.__dict__
        for name, old in swap.namespaces.get(plan.name, {}).items():
            new = namespace.get(name)
            if any(old is entry.app for entry in apps) and new is not old and type(new) is type(old):
                for attribute, value in new.__dict__.items():
                    if attribute != "state":  # what the lifespan set up stays
                        _set_logged(old, attribute, value, undo)
                namespace[name] = old  # the module's namespace is on the undo log
    for entry in apps:
        app = entry.app
        if (app.__dict__.get("router") is entry.router
                and dict(app.__dict__.get("exception_handlers") or {}) == entry.handlers
                and list(app.__dict__.get("user_middleware") or []) == entry.middleware):
            app.middleware_stack = entry.stack  # the undo log has it already
        if app.__dict__.get("openapi_schema") is not None:
            _set_logged(app, "openapi_schema", None, undo)


# --- SQLAlchemy -------------------------------------------------------------

# The calls that declare a mapped attribute in a model's class body.
_MAPPED_CALLS = frozenset({"mapped_column", "Column", "relationship", "column_property", "composite",
                           "synonym", "deferred", "relation", "backref", "dynamic_loader"})


# Class attributes that say how a model is mapped, read once when it is.
_MAPPING_SETTINGS = ("__tablename__", "__table__", "__table_args__", "__mapper_args__")


def _cold_deploy_for_model(cls: type, what: str, module: str) -> UpgradeRefused:
    return UpgradeRefused(f"cold deploy required: SQLAlchemy model {cls.__module__}.{cls.__qualname__} "
                          f"{what}; a mapped model cannot change in place: migrate the database if its "
                          "table changed, then cold deploy (`fly deploy`), which maps the model afresh",
                          module=module)


def _is_mapped(cls: object) -> bool:
    return isinstance(cls, type) and "__mapper__" in cls.__dict__ and "sqlalchemy.orm" in sys.modules


def _check_models(plan: _ModulePlan) -> None:
    """While preparing: refuse a new class statement of a live SQLAlchemy
    model that adds or removes a mapped attribute, changes how the model is
    mapped, or makes the class anew (a model is mapped once: a second class
    of the same name and table is refused by SQLAlchemy's registry)."""
    for qualname, scope in plan.new.items():
        cls = _live_class(plan, qualname) if qualname else None
        before = plan.old.get(qualname)
        if not _is_mapped(cls) or before is None:
            continue
        if _within(qualname, plan.rebuilt):
            raise _cold_deploy_for_model(cls, "changed its bases or metaclass", plan.name)
        mapped = set(cls.__mapper__.attrs.keys())
        removed = sorted(mapped & (before.statements.keys() - scope.statements.keys()))
        added = sorted(name for name in scope.statements.keys() - before.statements.keys()
                       if _declares_mapped(plan.tree, qualname, name))
        if removed or added:
            raise _cold_deploy_for_model(cls, f"columns changed (added {added}, removed {removed})", plan.name)
        for name in _MAPPING_SETTINGS:
            if before.statements.get(name) != scope.statements.get(name):
                raise _cold_deploy_for_model(cls, f"changed {name}", plan.name)


def _declares_mapped(tree: ast.Module, qualname: str, name: str) -> bool:
    """Whether the class body ``qualname`` assigns ``name`` a mapped attribute."""
    for _scope, found, statement in _definitions(tree.body):
        if found == qualname and isinstance(statement, ast.ClassDef):
            for child in statement.body:
                if name in _bound_names(child) and any(
                        isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                        in _MAPPED_CALLS for node in ast.walk(child)):
                    return True
    return False


def _keeps_mapped_attribute(old: object, new: object) -> bool:
    """Whether a statement of a live SQLAlchemy model that ran again (it reads
    a name that took a new value) declares the very column or relationship
    the model maps: then the mapped attribute stays.  A different one is a
    changed table, refused.  False for anything that is no mapped attribute."""
    if not type(old).__module__.startswith("sqlalchemy.") or "sqlalchemy.orm" not in sys.modules:
        return False
    cls, key = getattr(old, "class_", None), getattr(old, "key", None)
    if not _is_mapped(cls) or key not in cls.__mapper__.attrs:
        return False
    live = cls.__mapper__.attrs[key]
    if hasattr(live, "columns"):
        column = getattr(new, "column", new)
        same = hasattr(column, "foreign_keys") and _column_signature(column, live.columns[0]) == \
            _column_signature(live.columns[0], live.columns[0])
    else:
        same = hasattr(new, "argument") and _relationship_signature(new) == _relationship_signature(live)
    if not same:
        raise _cold_deploy_for_model(cls, f"attribute {key!r} changed", cls.__module__)
    return True


def _column_signature(column: Any, live: Any) -> tuple:
    """What a column declares about its table; what ``column`` leaves to the
    annotation (a ``mapped_column``'s type and nullability) is the live column's."""
    def default(value: Any) -> object:
        arg = getattr(value, "arg", None)
        return getattr(arg, "__name__", None) if callable(arg) else repr(arg)
    typed = type(column.type).__name__ != "NullType"
    nullable = column if isinstance(getattr(column, "_user_defined_nullable", None), bool) else live
    return (repr((column if typed else live).type), column.primary_key, column.unique, column.index,
            nullable.nullable, sorted(fk.target_fullname for fk in column.foreign_keys),
            default(column.server_default), default(column.default))


def _relationship_signature(prop: Any) -> tuple:
    argument = prop.argument
    target = argument if isinstance(argument, str) else getattr(argument, "__name__", repr(argument))
    secondary = getattr(prop, "secondary", None)
    return target, prop.back_populates, getattr(secondary, "name", secondary), prop.lazy


# ===========================================================================
# 5. Agent: per-process agent, per-machine upgrade, boot catch-up, poller
# ===========================================================================


# --- The per-process agent --------------------------------------------------

_DEFAULT_RUNTIME_DIR = "/tmp/flydeploy"
_MAX_REQUEST_BYTES = 1 << 20
_MAX_REPLY_BYTES = 64 << 20
# One deadline for a whole request line, however slowly its bytes trickle in.
_REQUEST_DEADLINE = 10.0
# Requests served at once; more connections are answered "busy" and closed,
# so a flood of clients cannot exhaust the app's threads or descriptors.
_MAX_CONNECTIONS = 16
# What is read of an oversized request after the reply, so the peer gets it.
_DRAIN_BYTES = 8 << 20
_DRAIN_SECONDS = 1.0
_STATE_FILE = "state.json"
_LOCK_FILE = "upgrade.lock"
_LOCK_TIMEOUT = 300.0
_DEFAULT_SUSPEND_TIMEOUT = 10.0
# How long a fork waits for an apply in progress before forking anyway.
_FORK_WAIT = 30.0
# How long a module that is still importing may take before its reload is given up.
_IMPORT_WAIT = 600.0
# Beyond the suspend timeout, what an apply may take (prepare, compile, code_change):
# `rpc upgrade` must answer well within the 30 s of a Machines API exec.
_APPLY_MARGIN = 10.0
_LOCATE_TIMEOUT = 5.0
_QUERY_TIMEOUT = 10.0
# How long a starting or forked process waits for an upgrade in flight to end
# (a published release is committed or undone within the apply wait).
_SETTLE_WAIT = 60.0
# How long startup_reapply_current may keep a booting app from serving.
_DEFAULT_STARTUP_DEADLINE = 5.0


class AgentError(FlyDeployError):
    """An agent could not be reached or refused a request, or its runtime directory is unsafe."""


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
    if info.st_uid not in (uid, 0) and not serving and uid != 0:
        raise AgentError(f"{path} belongs to {_user_name(info.st_uid)}, not to this user, {_user_name(uid)}: "
                         "the agents there run as that user; run this as that user, or as root")
    if info.st_uid not in (uid, 0) and serving:
        raise AgentError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid}); "
                         "flydeploy refuses it. Remove it, or set FLYDEPLOY_RUNTIME_DIR to a private directory.")
    if stat.S_IMODE(info.st_mode) & 0o022:
        # Anyone who may write there may replace an agent's socket with their own.
        raise AgentError(f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                         f"flydeploy refuses it. Run `chmod 700 {path}`, or set FLYDEPLOY_RUNTIME_DIR "
                         "to a private directory.")


def _exists_for_client(directory: str, app: str) -> bool:
    """Whether a runtime directory exists; one this user may not even look for is another
    user's, so the agents of ``app`` may well run there: an ``AgentError`` says so."""
    try:
        os.lstat(directory)
    except FileNotFoundError:
        return False
    except PermissionError:
        parent = os.path.dirname(directory)
        raise AgentError(f"cannot look for the agents of {app} in {directory}: {parent} belongs to "
                         f"{_owner_name(parent)}, and this user, {_user_name(os.geteuid())}, may not enter "
                         "it: agents there run as that user; run this as that user, or as root") from None
    return True


def _app_dir(app: str, *, create: bool, owner: tuple[int, int] | None = None) -> str | None:
    """The checked runtime directory of ``app``; None when it does not exist and ``create`` is false.

    Directories it creates are given to ``owner`` (uid, gid) when one is given.
    """
    _check_name("app", app)
    root = _runtime_root()
    path = os.path.join(root, app)
    try:
        for directory in (root, path):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(directory, 0o700)
                    if owner is not None:
                        os.chown(directory, *owner)
            elif not _exists_for_client(directory, app):
                return None
            _check_private_dir(directory, serving=create and owner is None)
        info = os.lstat(path)
        if create and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise AgentError(f"cannot use the runtime directory {path}: {exc}; set FLYDEPLOY_RUNTIME_DIR "
                         "to a writable directory") from exc
    return path


def _work_dir(app: str) -> str:
    """The runtime directory for the machine's file work (lock and state file), created if needed.

    A root ``rpc upgrade`` that runs before any process of the app creates
    it for the owner of the app root (``_machine_app_root``): made by root
    for root, it would lock out an app that runs as its own user.
    """
    if os.geteuid() != 0 or _process_app is not None:
        return _app_dir(app, create=True)
    existing = _app_dir(app, create=False)
    if existing is not None:
        return existing
    try:
        code = os.stat(_machine_app_root(in_process=False))
    except (OSError, AgentError):
        return _app_dir(app, create=True)
    return _app_dir(app, create=True, owner=(code.st_uid, code.st_gid))


def _adopt_dir_owner(path: str) -> None:
    """Give a file that root created in an app user's directory to that user."""
    if os.geteuid() != 0:
        return
    parent = os.stat(os.path.dirname(path))
    mine = os.lstat(path)
    if (mine.st_uid, mine.st_gid) != (parent.st_uid, parent.st_gid):
        os.chown(path, parent.st_uid, parent.st_gid, follow_symlinks=False)


def _state_path(app: str) -> str | None:
    directory = _app_dir(app, create=False)
    return None if directory is None else os.path.join(directory, _STATE_FILE)


@functools.cache  # a process never outlives a boot
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _read_state(app: str) -> dict | None:
    """The release this machine installed for ``app`` since it booted (the state file), or None.

    A state file from before a reboot describes files the image has put back.
    """
    try:
        path = _state_path(app)
        if path is None:
            return None
        with open(path, "rb") as handle:
            state = json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, FlyDeployError) as exc:
        log.warning("ignoring the flydeploy state file of %s: %s", app, exc)
        return None
    return state if isinstance(state, dict) and state.get("boot_id") == _boot_id() else None


def _write_state(app: str, state: dict) -> None:
    path = os.path.join(_work_dir(app), _STATE_FILE)
    content = json.dumps({**state, "boot_id": _boot_id()}, sort_keys=True).encode()
    try:
        _write_atomically(path, lambda out: out.write(content))
        _adopt_dir_owner(path)
    except OSError as exc:
        raise AgentError(f"cannot write the state file {path}: {exc}; check the runtime directory "
                         "(FLYDEPLOY_RUNTIME_DIR)") from exc


# Descriptors of the machine lock held in this process, by the pid that opened
# them: a forked child closes its copies, or it would hold the lock for life.
_lock_fds: dict[int, int] = {}


@contextlib.contextmanager
def _machine_lock(app: str, *, timeout: float = _LOCK_TIMEOUT, shared: bool = False) -> Iterator[None]:
    """Hold the per-machine upgrade lock, so one process at a time does the file work.

    ``shared``: only wait until no file work is in flight, and keep any from
    starting while held (processes that read the app's files).
    """
    path = os.path.join(_work_dir(app), _LOCK_FILE)
    _register_process_hooks()
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise AgentError(f"cannot open the upgrade lock {path}: {exc}; check the runtime directory "
                         "(FLYDEPLOY_RUNTIME_DIR)") from exc
    _lock_fds[fd] = os.getpid()
    try:
        _adopt_dir_owner(path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AgentError(f"another process has held the upgrade lock {path} for over {timeout:.0f} s; "
                                     "check for a stuck `python -m flydeploy rpc upgrade` and retry") from None
                time.sleep(0.02)
        yield
    finally:
        if _lock_fds.get(fd) == os.getpid():
            del _lock_fds[fd]
            os.close(fd)  # closing the last descriptor releases the lock


def _close_inherited_lock_fds() -> None:
    for fd in list(_lock_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _lock_fds.clear()


# Per-process state.  _held describes the release this process's modules hold
# (None: the image's own code).  Fork hooks replace the locks in the child.
_agent: Agent | None = None
_agent_lock = threading.Lock()
_apply_lock = threading.RLock()
_held: dict | None = None
_held_files: dict[str, str] | None = None  # path -> sha256 of every file of the release held
_process_app: str | None = None
_fork_lock_taken = False
_hooks_registered = False
# Set on the thread that runs reload_modules: a reloaded module body that
# calls startup_reapply_current again must not start another upgrade.
_reloading = threading.local()


def _ensure_tracking() -> None:
    """Start tracking unless the app chose its roots with ``track()``.

    The root is ``FLYDEPLOY_APP_ROOT`` when set, else the ``sys.path`` entry
    holding the app code that called flydeploy: the script's directory for
    ``python main.py``, the project directory for ``gunicorn app:wsgi`` or
    ``python -m app``, where the directory of ``__main__`` would be the server's.
    """
    if not _tracker.roots:
        track(os.environ.get("FLYDEPLOY_APP_ROOT") or _caller_root())


def _caller_root() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    file = frame.f_globals.get("__file__") if frame is not None else None
    if not isinstance(file, str):
        return os.getcwd()  # python -c, an interactive session
    name = getattr(frame.f_globals.get("__spec__"), "name", None) or "__main__"
    levels = name.count(".") + (os.path.basename(file).startswith("__init__.") and name != "__main__")
    root = os.path.dirname(os.path.abspath(file))
    for _ in range(levels):
        root = os.path.dirname(root)
    return root


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
            "deployed_at": held.get("deployed_at"), "applied_at": held.get("applied_at"),
            "image_ref": os.environ.get("FLY_IMAGE_REF"), "servers": _server_summaries(), "python": sys.version.split()[0], "cwd": os.getcwd(),
            "poller": None if _poller is None else {"interval": _poller.interval, "polls": _poller.polls,
                                                    "caught_up_at_poll": _poller.caught_up_at_poll}}


def _importing(name: str) -> bool:
    return bool(getattr(getattr(sys.modules.get(name), "__spec__", None), "_initializing", False))


def _apply_here(release: dict, *, suspend_timeout: float = _DEFAULT_SUSPEND_TIMEOUT, extra: Any = None) -> dict:
    """Reload this process's changed modules and, on success, record ``release`` as held.

    The files that changed (templates and static files too, for the
    framework refreshes of section 4b) are those of the installed release
    whose sha256 differs from the release this process held; all of them
    when it held none (it runs the image's files, of which no list is kept).

    A changed module that is still being imported (at boot, typically the one
    that called ``startup_reapply_current``) is reloaded as soon as its import
    finishes, on a thread: reloading it now would let the rest of its old body,
    still running, overwrite the new code.
    """
    global _held, _held_files
    with _apply_lock:
        installed = (_read_state(_process_app) or {}).get("files") if _process_app else None
        files = _changed_files(_held_files, installed)
        changed = modified_modules()
        importing = [name for name in changed if _importing(name)]
        _reloading.active = True
        try:
            report = reload_modules([name for name in changed if name not in importing],
                                    suspend_timeout=suspend_timeout, extra=extra, files=files)
            if report.ok:
                _held_files = installed
        finally:
            _reloading.active = False
        if report.ok and not importing:
            _held = {**release, "applied_at": _iso_utc(_utc_now())}
    if report.ok and importing:
        threading.Thread(target=_reload_after_import, args=(importing, release, suspend_timeout),
                         name="flydeploy-reload-after-import", daemon=True).start()
    return report.to_dict()


def _changed_files(held: dict | None, installed: object) -> list[str] | None:
    """The files of the installed release (path -> sha256) that differ from
    the held one's; every one of them without a held list; None when the
    machine's state records none."""
    if not isinstance(installed, dict):
        return None
    return [path for path, digest in installed.items() if held is None or held.get(path) != digest]


def _reload_after_import(names: list[str], release: dict, suspend_timeout: float) -> None:
    deadline = time.monotonic() + _IMPORT_WAIT
    while any(_importing(name) for name in names):
        if time.monotonic() > deadline:
            log.error("flydeploy: %s still importing after %.0f s; %s not loaded", ", ".join(names),
                      _IMPORT_WAIT, release.get("version"))
            return
        time.sleep(0.005)
    report = _apply_here(release, suspend_timeout=suspend_timeout)
    if not report["ok"]:
        log.error("flydeploy: process %s could not load %s: %s", _process_name(), release.get("version"),
                  report["error"])


# What names a release wherever it travels: state file, hot upgrade, apply request.
_RELEASE_FIELDS = ("version", "sha256", "source_image_ref", "deployed_at")


def _release_of(record: dict, image_ref: str | None) -> dict:
    """What a process records as the release it holds, from a state file, hot upgrade or apply request."""
    return {**{key: record.get(key) for key in _RELEASE_FIELDS}, "image_ref": image_ref}


def _for_this_image(state: dict | None) -> bool:
    """Whether a state file describes a release for this process's image.

    An ``rpc upgrade`` that found no agent to ask may not know the image
    (None); within one boot there is only one, so that matches.
    """
    return state is not None and state.get("image_ref") in (None, os.environ.get("FLY_IMAGE_REF"))


def _same_release(a: dict | None, b: dict | None) -> bool:
    """Whether two release records name the same release (a republished version is another one)."""
    return (a is not None and b is not None and a.get("version") == b.get("version")
            and (not a.get("sha256") or not b.get("sha256") or a["sha256"].lower() == b["sha256"].lower()))


def _catch_up_process(app: str, *, wait: float = _SETTLE_WAIT, check_files: bool = False) -> None:
    """Bring this process to the release the machine installed, if it holds another one.

    A fresh process imported the installed files already and only records the
    release; a forked child of an older parent reloads what differs on disk.
    An upgrade in flight is waited for first (up to ``wait`` seconds), so
    what is read is what it committed or put back.  With ``check_files`` it
    also reloads when its modules differ from the files (after an apply that
    nobody waited for, whose files may have been put back).
    """
    with contextlib.ExitStack() as settled:
        try:
            settled.enter_context(_machine_lock(app, timeout=wait, shared=True))
        except AgentError as exc:
            log.warning("flydeploy: process %s goes on without waiting for the upgrade in flight: %s",
                        _process_name(), exc)
        state = _read_state(app)
        release = _release_of(state, state.get("image_ref")) if _for_this_image(state) else None
        if (release is None or _same_release(_held, state)) and not (check_files and modified_modules()):
            return
        report = _apply_here(release or {})
    if not report["ok"]:
        log.error("flydeploy: process %s could not catch up to %s: %s",
                  _process_name(), (release or {}).get("version") or "the files on disk", report["error"])
    elif report["modules"]:
        log.info("flydeploy: process %s caught up to %s (%s)",
                 _process_name(), (release or {}).get("version") or "the files on disk", ", ".join(report["modules"]))


def _drain(conn: socket.socket) -> None:
    # Closing a unix socket with unread input resets the connection and the
    # peer loses the reply: read what is left of an oversized request first.
    deadline, left = time.monotonic() + _DRAIN_SECONDS, _DRAIN_BYTES
    while left > 0:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = conn.recv(1 << 20)
        if not chunk:
            return
        left -= len(chunk)


def _read_line(sock: socket.socket, deadline: float, limit: int) -> bytes:
    """The first line ``sock`` sends before ``deadline`` (the whole input when it has no newline).

    Raises ``TimeoutError`` at the deadline and ``AgentError`` beyond ``limit`` bytes.
    """
    data = bytearray()
    while b"\n" not in data:
        if len(data) > limit:
            raise AgentError(f"request larger than {limit} bytes; send one short JSON line")
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    line = bytes(data).split(b"\n", 1)[0]
    if len(line) > limit:
        raise AgentError(f"request larger than {limit} bytes; send one short JSON line")
    return line


def _send_and_close(conn: socket.socket, reply: dict) -> None:
    """Send a short reply without waiting on the peer, and close (refused and turned-away peers).

    What the peer sent already is discarded first, without waiting for more:
    closing over unread input would reset the connection and lose the reply.
    """
    with conn, contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(json.dumps(reply).encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)
        for _ in range(_DRAIN_BYTES >> 16):
            if not conn.recv(1 << 16):
                break


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
        self._slots = threading.BoundedSemaphore(_MAX_CONNECTIONS)
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
            refusal = _peer_refusal(conn)
            if refusal is not None:
                _send_and_close(conn, refusal)
            elif not self._slots.acquire(blocking=False):
                _send_and_close(conn, {"ok": False, "error": f"busy: {_MAX_CONNECTIONS} requests are being "
                                                           "served; retry shortly"})
            else:
                threading.Thread(target=self._handle, args=(conn,), daemon=True,
                                 name="flydeploy-agent-request").start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    reply = _dispatch(self, _read_request(conn))
                except AgentError as exc:
                    reply = {"ok": False, "error": str(exc)}
                except Exception as exc:  # an agent keeps serving whatever one request did
                    log.exception("flydeploy agent %s: request failed", self.path)
                    reply = {"ok": False, "error": f"internal error in {_process_name()}: {exc!r}"}
                with contextlib.suppress(OSError):
                    conn.settimeout(_REQUEST_DEADLINE)
                    conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
                    conn.shutdown(socket.SHUT_WR)
                    _drain(conn)
        finally:
            self._slots.release()

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


def _peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """``(pid, uid)`` of the process at the other end of a unix socket; None where the
    system does not say (there the 0700 runtime directory is the guard)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("3i")))
    return pid, uid


def _peer_refusal(conn: socket.socket) -> dict | None:
    _pid, uid = _peer_credentials(conn) or (None, os.geteuid())
    if uid in (os.geteuid(), 0):
        return None
    return {"ok": False, "error": f"refused: peer uid {uid} is neither this process's user "
                                  f"(uid {os.geteuid()}) nor root"}


def _read_request(conn: socket.socket) -> dict:
    try:
        line = _read_line(conn, time.monotonic() + _REQUEST_DEADLINE, _MAX_REQUEST_BYTES)
    except TimeoutError:
        raise AgentError(f"no complete request line within {_REQUEST_DEADLINE:.0f} s; "
                         "end the JSON request with a newline") from None
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise AgentError(f"malformed request, not JSON or nested too deeply ({type(exc).__name__}); "
                         'send one flat JSON object per line, e.g. {"op": "ping"}') from None
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
        return {"ok": True, "located": _locate_members(paths, *_loaded_locations(paths)), "cwd": os.getcwd(),
                "roots": list(_tracker.roots),
                "image_ref": os.environ.get("FLY_IMAGE_REF")}
    if op == "apply":
        timeout = request.get("suspend_timeout", _DEFAULT_SUSPEND_TIMEOUT)
        if not _is_positive_seconds(timeout):
            raise AgentError('malformed apply request: "suspend_timeout" must be a positive, finite number '
                             "of seconds")
        answer_by = request.get("answer_by")
        if _is_positive_seconds(answer_by) and time.time() > answer_by:
            return {"ok": False, "pid": os.getpid(), "name": _process_name(),
                    "error": "the apply request arrived after its asker gave up; nothing was applied"}
        report = _apply_here(_release_of(request, os.environ.get("FLY_IMAGE_REF")),
                             suspend_timeout=float(timeout), extra=request.get("extra"))
        if _is_positive_seconds(answer_by) and time.time() > answer_by:
            # Nobody waits for this answer: the asker counted the process failed and may
            # have put the files back, so the process follows what is on disk once settled.
            threading.Thread(target=_catch_up_process, args=(agent.app,),
                             kwargs={"wait": _LOCK_TIMEOUT, "check_files": True}, daemon=True,
                             name="flydeploy-follow-disk").start()
        return {"ok": bool(report["ok"]), "pid": os.getpid(), "name": _process_name(), "report": report}
    if op == "prepare":
        files = request.get("files")
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise AgentError('malformed prepare request: "files" must map each changed path to its staged copy')
        plan = plan_upgrade(files)
        return {"ok": plan.refused is None, "pid": os.getpid(), "name": _process_name(), "error": plan.refused,
                "plan": plan.to_dict()}
    raise AgentError(f"unknown op {op!r}; the agent answers ping, info, locate, prepare and apply")


def _agent_before_fork() -> None:
    # A child must not be forked in the middle of an apply: it would copy half-swapped code.
    global _fork_lock_taken
    _fork_lock_taken = _apply_lock.acquire(timeout=_FORK_WAIT)


def _agent_after_fork_in_parent() -> None:
    global _fork_lock_taken
    if _fork_lock_taken:
        _fork_lock_taken = False
        _apply_lock.release()


def _forked_to_exec() -> bool:
    """Whether this child was forked by ``subprocess`` to run ``preexec_fn`` and exec.

    CPython runs the fork hooks of such a child inside ``subprocess``'s
    ``_execute_child``; the child is about to become another program, so it
    needs neither an agent nor a catch-up.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_execute_child" and os.path.basename(code.co_filename) == "subprocess.py":
            return True
        frame = frame.f_back
    return False


def _agent_after_fork_in_child() -> None:
    global _agent, _agent_lock, _apply_lock, _fork_lock_taken, _poller
    _close_inherited_lock_fds()
    _agent_lock, _apply_lock, _fork_lock_taken = threading.Lock(), threading.RLock(), False
    _poller = None  # its thread stayed in the parent, which keeps polling for the machine
    parent, _agent = _agent, None
    serving = parent is not None and not parent._closed
    if parent is not None:
        parent._forget()
    if _forked_to_exec():
        return
    try:
        if _process_app is not None:
            _catch_up_process(_process_app)
    except Exception:  # the child runs on, on the code it has
        log.exception("flydeploy: the forked process %s could not catch up", os.getpid())
    if serving:
        threading.Thread(target=_start_child_agent, args=(parent.app,), daemon=True,
                         name="flydeploy-child-agent").start()


def _start_child_agent(app: str) -> None:
    global _agent
    try:
        with _agent_lock:
            if _agent is None or _agent.pid != os.getpid():
                _agent = Agent(app)
    except Exception:  # the child runs on, unreachable by upgrades; it says why
        log.exception("flydeploy: the forked process %s could not start its agent", os.getpid())


def _stop_own_agent() -> None:
    if _agent is not None and _agent.pid == os.getpid():
        _agent.stop()


def _register_process_hooks() -> None:
    global _hooks_registered
    if not _hooks_registered:
        _hooks_registered = True
        os.register_at_fork(before=_agent_before_fork, after_in_parent=_agent_after_fork_in_parent,
                            after_in_child=_agent_after_fork_in_child)
        atexit.register(_stop_own_agent)


def start_agent(app: str | None = None) -> Agent:
    """Start this process's agent for ``app`` (default ``FLY_APP_NAME``) and return it.

    Idempotent within a process.  Starts change tracking with the default
    roots when the app has not called :func:`track`, and brings the process to
    the release this machine installed when it holds another one.  A forked
    child gets its own agent automatically.
    """
    global _agent
    app = _adopt_app(app)
    with _agent_lock:
        if _agent is not None and _agent.pid == os.getpid():
            if _agent.app != app:
                raise ConfigError(f"this process already runs the agent of app {_agent.app!r}; "
                                  "one process serves one app")
            return _agent
        _agent = Agent(app)
    _catch_up_process(app)
    return _agent


def _adopt_app(app: str | None) -> str:
    """Make this process one of ``app``'s (default ``FLY_APP_NAME``): tracking and fork hooks on."""
    global _process_app
    app = app or os.environ.get("FLY_APP_NAME") or ""
    if not app:
        raise ConfigError("no app name: pass it (start_agent(app), startup_reapply_current(app)) "
                          "or set FLY_APP_NAME")
    _check_name("app", app)
    _process_app = app
    _ensure_tracking()
    _register_process_hooks()
    return app


def _expected_owner(pid: int) -> int | None:
    """The uid running process ``pid``, or None where /proc cannot tell."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _check_agent_identity(sock: socket.socket, path: str, pid: int) -> None:
    """Refuse a socket that is not the one process ``pid`` listens on as its own user.

    Whoever can write the runtime directory could put their own socket there;
    the socket file's owner and the listening peer (SO_PEERCRED) must be the
    process the file is named after, running as the user that owns it.
    """
    owner = _expected_owner(pid)
    if owner is None:
        return
    file_uid = os.lstat(path).st_uid
    peer_pid, peer_uid = _peer_credentials(sock) or (pid, file_uid)
    if file_uid != owner or peer_uid != owner or peer_pid != pid:
        raise AgentError(f"refused {path}: it is served by pid {peer_pid} as uid {peer_uid} (file owner uid "
                         f"{file_uid}), but process {pid} runs as uid {owner}; another user may have replaced "
                         "the agent's socket. Check who can write the runtime directory.")


def _request(path: str, request: dict, *, timeout: float, pid: int | None = None) -> dict:
    """One request to the agent at ``path`` (of process ``pid``), answered within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        if pid is not None:
            _check_agent_identity(sock, path, pid)
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent answered without reading (busy, refused) and closed: the reply says why
        line = _read_line(sock, deadline, _MAX_REPLY_BYTES)
    reply = json.loads(line or b"null")
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _exited(pid: int, *, within: float = 0.5) -> bool:
    """Whether process ``pid`` is gone, or goes within ``within`` seconds.

    A process that was killed closes its sockets a moment before it is gone.
    """
    deadline = time.monotonic() + within
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _ask_agents(app: str, request: dict, *, timeout: float, exclude_pid: int | None = None,
                skip: Collection[int] = ()) -> list[dict]:
    """Send ``request`` to every live agent of ``app`` on this machine (but ``exclude_pid`` and
    ``skip``), concurrently.

    Returns one entry per process: ``{"pid", "reply"}`` or ``{"pid", "error"}``.
    Sockets of dead processes are removed.
    """
    targets = [(pid, path) for pid, path in _agent_sockets(app) if pid != exclude_pid and pid not in skip]

    def forget(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def ask(target: tuple[int, str]) -> dict | None:
        pid, path = target
        try:
            return {"pid": pid, "reply": _request(path, request, timeout=timeout, pid=pid)}
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: the process died, or exec'd another program.
            forget(path)
            return None
        except TimeoutError:
            error = f"process {pid} did not answer within {timeout:.0f} s"
        except PermissionError:
            error = (f"process {pid}'s agent belongs to {_owner_name(path)}, not to this user, "
                     f"{_user_name(os.geteuid())}: run this as that user, or as root")
        except (OSError, ValueError, AgentError) as exc:
            error = f"process {pid}: {exc}"
        if _exited(pid):
            forget(path)
            error = f"process {pid} exited before it answered"
        return {"pid": pid, "error": error}

    if not targets:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        return [entry for entry in pool.map(ask, targets) if entry is not None]


# --- Per-machine upgrade ----------------------------------------------------
#
# The phases of one machine's upgrade, in order (``MACHINE_PHASES``).  ``rpc
# upgrade`` runs them all but PREPARE and CHECK in one go (``_upgrade_machine``);
# a fleet upgrade runs them in two: ``rpc prepare`` up to PREPARE on every
# machine, then ``rpc apply`` the rest (``prepare_release``, ``apply_release``).
#
#   DOWNLOAD  download, verify and unpack the release into this run's work
#             area in the runtime directory (``_download_release``).  Nothing
#             the app uses changes.
#   STAGE     under the machine lock: each member's destination is its own
#             path under the app root; every changed member is written beside
#             it as a temporary file, listed in the journal first
#             (``_stage_release``).  Nothing the app uses changes.
#   PREPARE   every process plans the staged release (``plan_upgrade``: the
#             modules that change, the refusals that say "cold deploy
#             required") while the journal says ``prepared`` with the upgrade
#             id, sha256 and ``expires_at``; what applying it replaces is
#             copied aside, so the apply can be reverted later (``_keep_undo``).
#             Nothing the app uses changes; a refusal discards the staging.
#             The staging waits, unlocked, for PUBLISH, a discard, its expiry
#             or a reboot (``_prepared_live``).
#   PUBLISH   the staged files replace the live ones, each old file kept
#             beside it, and the state file names the release
#             (``_publish_staged``).
#   APPLY     every process of the app reloads what changed
#             (``_apply_everywhere``).
#   COMMIT    every process applied: the journal says so, which is the point
#   or UNDO   of no return, and the old files are dropped (``_commit_staged``).
#             Otherwise every file and the state file are put back and the
#             processes follow the disk back (``_undo_staged``).
#   CHECK     with a health check: every process alive with its agent
#             answering, and the app's ports answering 2xx on 127.0.0.1
#             (``_health_check``).  A failure is reported; the release stays.
#
# A run that dies anywhere leaves its journal and work area behind; the run's
# guardian process, the next ``rpc upgrade`` and ``startup_reapply_current``
# replay a committed journal and undo any other (``_recover``) before anything
# else, and remove the work areas of dead runs.

MACHINE_PHASES = ("download", "stage", "prepare", "publish", "apply", "commit", "check")
MACHINE_POINT_OF_NO_RETURN = "commit"
RESULT_MARKER = "__FLYDEPLOY_RESULT__"


def _result_line(result: Mapping[str, Any]) -> str:
    """The line that carries a machine-side result (``parse_result_marker`` reads it back)."""
    return f"{RESULT_MARKER}{json.dumps(result, sort_keys=True)}{RESULT_MARKER}"


_JOURNAL_FILE = "journal.json"
# Journal phases in which nothing is published yet.
_UNPUBLISHED = ("staging", "prepared")
_WORK_AREA_PREFIX = "work-"
_STAGED_SUFFIX = ".flydeploy-new"
_KEPT_SUFFIX = ".flydeploy-old"


def _module_name(parts: list[str]) -> str | None:
    """The module a member is (``a/b.py``: ``a.b``, ``a/__init__.py``: ``a``); None for other files."""
    if not parts[-1].endswith(".py"):
        return None
    stem = parts[-1][:-3]
    return ".".join(parts[:-1] + ([] if stem == "__init__" else [stem]))


def _candidate_module_names(paths: list[str]) -> set[str]:
    names = set()
    for rel in paths:
        parts = rel.split("/")
        names.update(".".join(parts[:k]) for k in range(1, len(parts)))
        names.add(_module_name(parts) or "")
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
        origin = _module_origin(module)
        if origin is not None and origin.endswith(".py") and os.path.isabs(origin):
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
    """Map release members to where a process loaded the module of that name from.

    A member that is a loaded module maps to that module's file; any other
    member inside a loaded package to the same place under the package's
    directory.  Only ever informative: a release is written under the app
    root, and a module of the same name loaded from elsewhere is another
    module, left alone (``_elsewhere_notes``).
    """
    located = {}
    for rel in paths:
        parts = rel.split("/")
        origin = module_files.get(_module_name(parts) or "")
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


def _elsewhere_notes(located: Mapping[str, str], destinations: Mapping[str, str]) -> list[str]:
    """One line per member whose module name a process loaded from outside the app root."""
    notes = []
    for rel, where in sorted(located.items()):
        dest = destinations.get(rel)
        if dest is not None and os.path.realpath(where) != dest and rel.endswith(".py"):
            notes.append(f"{rel} was written to {dest}; the module {_module_name(rel.split('/'))} the processes "
                         f"loaded from {where} is another one, outside the app root, and was left alone")
    return notes


def _machine_app_root(*, in_process: bool) -> str:
    """The app root of this machine, resolved, from its own configuration, never from what a process says.

    ``FLYDEPLOY_APP_ROOT``; in an app process, else the root it tracks;
    else the working directory the command started in, unless that is
    ``/`` (where a Machines API exec starts); else the folder of this
    flydeploy.py when it is a copy vendored into the app.
    """
    root = os.environ.get("FLYDEPLOY_APP_ROOT") or (_tracker.roots[0] if in_process and _tracker.roots else None)
    if not root and os.getcwd() != os.sep:
        root = os.getcwd()
    if not root:
        here = os.path.dirname(os.path.realpath(__file__))
        if _tracker._installed(here):
            raise AgentError("cannot tell where the app lives on this machine (started in / with flydeploy "
                             f"installed in {here}); set FLYDEPLOY_APP_ROOT to the app's directory")
        root = here
    resolved = os.path.realpath(root)
    if not os.path.isdir(resolved):
        raise AgentError(f"the app root {root} is not a directory on this machine; set FLYDEPLOY_APP_ROOT to the "
                         "app's directory")
    return resolved


def _destination(app_root: str, rel: str) -> str:
    """Where member ``rel`` is written: its own path under the app root, links resolved, nowhere else."""
    dest = os.path.realpath(os.path.join(app_root, *rel.split("/")))
    if dest == app_root or not _is_under(dest, app_root):
        raise AgentError(f"refusing to write {rel}: a symbolic link leads it to {dest}, outside the app root "
                         f"{app_root}; nothing was written. Remove the link, or leave the file out of the release.")
    return dest


def _file_sha256(path: str) -> str | None:
    try:
        return _file_digest(path, "sha256")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _beside(dest: str, suffix: str) -> str:
    folder, name = os.path.split(dest)
    return os.path.join(folder, f".{name}{suffix}")


def _reached(app: str, step: str) -> None:
    """A named step of the file work: with ``FLYDEPLOY_TEST_STOP_AT=<step>`` (tests only) the run
    says so in a file ``stopped-at-<step>`` of its runtime directory and waits there to be killed."""
    if os.environ.get("FLYDEPLOY_TEST_STOP_AT") == step:
        with open(os.path.join(_work_dir(app), f"stopped-at-{step}"), "w"):
            pass
        while True:
            time.sleep(3600)


# --- the journal ---

def _journal_path(app: str) -> str:
    return os.path.join(_work_dir(app), _JOURNAL_FILE)


def _save_journal(app: str, journal: dict) -> None:
    path = _journal_path(app)
    content = json.dumps(journal, sort_keys=True).encode()
    try:
        _write_atomically(path, lambda out: out.write(content), mode=0o600)
    except OSError as exc:
        raise AgentError(f"cannot write the upgrade journal {path}: {exc}; check the runtime directory "
                         "(FLYDEPLOY_RUNTIME_DIR)") from exc


def _load_journal(app: str) -> dict | None:
    directory = _app_dir(app, create=False)
    if directory is None:
        return None
    try:
        with open(os.path.join(directory, _JOURNAL_FILE), "rb") as handle:
            journal = json.loads(handle.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read the upgrade journal in {directory}: {exc}; remove it only after "
                         "checking the app's files") from exc
    return journal if isinstance(journal, dict) else None


def _drop_journal(app: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_journal_path(app))


def _state_text(app: str) -> str | None:
    path = _state_path(app)
    try:
        with open(path or "", "rb") as handle:
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return None


def _put_back_state(app: str, text: str | None) -> None:
    path = os.path.join(_work_dir(app), _STATE_FILE)
    if _state_text(app) == text:
        return  # never written, or already put back
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    else:
        _write_atomically(path, lambda out: out.write(text.encode()))


def _undo_files(journal: dict) -> None:
    """Put back every file a journal lists and remove what it added (each step repeatable)."""
    published = journal.get("phase") not in _UNPUBLISHED
    for entry in reversed(journal.get("files") or []):
        dest = entry["dest"]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_beside(dest, _STAGED_SUFFIX))
        kept = _beside(dest, _KEPT_SUFFIX)
        if os.path.lexists(kept):
            os.replace(kept, dest)
        elif published and not entry.get("existed"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dest)
    for directory in reversed(journal.get("dirs") or []):
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _commit_files(journal: dict) -> None:
    for entry in journal.get("files") or []:
        for suffix in (_KEPT_SUFFIX, _STAGED_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_beside(entry["dest"], suffix))
    for directory in reversed(journal.get("remove_dirs") or []):  # a revert: those its upgrade made
        with contextlib.suppress(OSError):
            os.rmdir(directory)


def _remove_dead_work_areas(app: str) -> None:
    directory = _app_dir(app, create=False)
    if directory is None:
        return
    for entry in os.scandir(directory):
        pid = entry.name[len(_WORK_AREA_PREFIX):]
        if entry.name.startswith(_WORK_AREA_PREFIX) and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _recover(app: str, *, keep_prepared: bool = False) -> dict | None:
    """Finish what a run that died left: a committed journal is replayed, any other undone,
    with the state file put back; dead runs' work areas are removed.  A prepared staging
    is discarded too, unless ``keep_prepared`` and it is still live.  Callers hold the
    machine lock.  Returns the release the machine is back on when files were put back
    (``{}`` for the image's own code), else None."""
    _remove_dead_work_areas(app)
    journal = _load_journal(app)
    if journal is None:
        return None
    if journal.get("phase") == "prepared":
        if not (keep_prepared and _prepared_live(journal)):
            _discard_prepared(app, journal)
        return None
    if journal.get("phase") == "committed":
        _commit_files(journal)
        _drop_journal(app)
        log.info("flydeploy: finished committing %s, which a stopped upgrade left", journal.get("version"))
        return None
    _undo_files(journal)
    if journal.get("phase") != "staging":
        _put_back_state(app, journal.get("state_before"))
    _drop_journal(app)
    log.warning("flydeploy: undid the unfinished upgrade to %s that a stopped run left", journal.get("version"))
    if journal.get("phase") == "staging":
        return None
    return _previous_release(journal)


def _previous_release(journal: dict) -> dict:
    """The release a machine is back on once ``journal`` is undone: its state before, or ``{}``."""
    try:
        state = json.loads(journal.get("state_before") or "null")
    except ValueError:
        state = None
    return _release_of(state, state.get("image_ref")) if isinstance(state, dict) else {}


def _recover_and_resync(app: str, *, exclude_pid: int | None = None, keep_prepared: bool = False) -> None:
    """``_recover`` (callers hold the machine lock), then the processes follow the disk back."""
    previous = _recover(app, keep_prepared=keep_prepared)
    if previous is not None:
        for entry in _apply_everywhere(app, previous, _DEFAULT_SUSPEND_TIMEOUT, exclude_pid=exclude_pid):
            if not (entry.get("reply") or {}).get("ok"):
                log.error("flydeploy: process %s could not return to the files on disk: %s", entry["pid"],
                          _reply_error(entry))


def _start_guardian(app: str) -> int:
    """Fork a process that, once this run ends however it ends (a SIGKILL, a timeout's kill),
    recovers what it left; returns the descriptor whose closing ends the run."""
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the guardian
        try:
            os.close(write)
            pipe = _take_result_pipe()
            if pipe is not None:  # the exec waiting for the job's result must not wait for this
                os.close(pipe)
            while os.read(read, 1):
                pass
            with _machine_lock(app):
                _recover_and_resync(app, keep_prepared=True)
        except FlyDeployError as exc:
            log.error("flydeploy: recovering after the upgrade run failed: %s", exc)
        except BaseException:
            log.exception("flydeploy: recovering after the upgrade run failed")
        finally:
            sys.stdout.flush()
            os._exit(0)
    os.close(read)
    return write


# --- the phases ---

@dataclasses.dataclass
class _Staged:
    """A release downloaded and staged on this machine: what publishing it changes."""

    app: str
    state: dict  # the state file that names it once published
    journal: dict
    unchanged: int
    notes: list[str]

    @property
    def written(self) -> int:
        return len(self.journal["files"])


def _download_release(store: Store, key: str, area: str, sha256: str | None, app: str) -> tuple[dict, str, str]:
    """Phase DOWNLOAD: the release verified and unpacked in ``area``; ``(manifest, tree, sha256)``."""
    tarball = os.path.join(area, "release.tar.gz")
    digest = store.download(key, tarball)
    if sha256 and digest.lower() != sha256.lower():
        raise AgentError(f"hash mismatch for {key}: expected sha256 {sha256.lower()}, downloaded {digest}; "
                         "the stored tarball is not the recorded release. Nothing was written; push it again.")
    _reached(app, "unpack")
    tree = os.path.join(area, "tree")
    manifest = unpack_release(tarball, tree)  # its hash was checked as it was downloaded
    if manifest.get("app") not in (None, app):
        raise AgentError(f"{key} is a release of app {manifest['app']!r}, not of {app!r}; nothing was written. "
                         "Check the --app and --url of the upgrade.")
    return manifest, tree, digest


def _write_staged(source: str, staged: str, mode: int, owner: tuple[int, int] | None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staged)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
        if owner is not None:
            os.fchown(out.fileno(), *owner)
        shutil.copyfileobj(data, out, _IO_CHUNK)
        out.flush()
        os.fsync(out.fileno())
        os.fchmod(out.fileno(), mode)


def _stage_release(app: str, manifest: dict, tree: str, digest: str, *, app_root: str, image_ref: str | None,
                   deployed_at: str | None, located: Mapping[str, str]) -> _Staged:
    """Phase STAGE (under the machine lock): each changed member written beside its destination.

    Destinations are the members' own paths under ``app_root``; the journal
    lists them before any file is made, so a run that dies here leaves
    nothing the next one cannot remove.  A file keeps the mode and owner of
    the one it replaces (a new one: the release's mode, the folder's owner).
    The state records every file of the release where it is on this machine,
    with its sha256 (``files``), so each process can tell which changed.
    A failure removes everything staged and raises.
    """
    hashes = manifest["files"]
    destinations = {rel: _destination(app_root, rel) for rel in sorted(hashes)}
    changed = [(rel, dest) for rel, dest in destinations.items() if _file_sha256(dest) != hashes[rel]]
    for rel, dest in changed:
        if os.path.isdir(dest):
            raise AgentError(f"cannot write the release: {dest} is a directory, where the release has the "
                             f"file {rel}; no file was changed. Move the directory away (or rename the file in "
                             "the app), then upgrade again.")
    journal = {"version": manifest.get("version"), "app_root": app_root, "phase": "staging", "dirs": [],
               "files": [{"dest": dest, "existed": os.path.lexists(dest)} for _rel, dest in changed],
               "state_before": _state_text(app)}
    state = {"app": app, "version": manifest.get("version"), "sha256": digest,
             "source_image_ref": manifest.get("source_image_ref"), "deployed_at": deployed_at,
             "image_ref": image_ref, "installed_at": _iso_utc(_utc_now()),
             "files": {dest: hashes[rel] for rel, dest in destinations.items()}}
    _save_journal(app, journal)
    try:
        for number, (rel, dest) in enumerate(changed):
            if number == len(changed) // 2:
                _reached(app, "stage")
            source = os.path.join(tree, *rel.split("/"))
            try:
                current = os.stat(dest)
                mode, owner = stat.S_IMODE(current.st_mode), (current.st_uid, current.st_gid)
            except FileNotFoundError:
                _make_dirs(os.path.dirname(dest), app, journal)
                parent = os.stat(os.path.dirname(dest))
                mode, owner = stat.S_IMODE(os.stat(source).st_mode), (parent.st_uid, parent.st_gid)
            _write_staged(source, _beside(dest, _STAGED_SUFFIX), mode, owner if os.geteuid() == 0 else None)
    except (OSError, FlyDeployError) as exc:
        _undo_files(journal)
        _drop_journal(app)
        raise AgentError(f"cannot write the release: {exc}; no file was changed. "
                         "Check the permissions and free space of the app directory.") from exc
    return _Staged(app, state, journal, len(destinations) - len(changed),
                   _elsewhere_notes(located, destinations))


def _make_dirs(directory: str, app: str, journal: dict) -> None:
    """``os.makedirs`` that lists each directory in the journal before creating it (parents first)."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    if missing:
        journal["dirs"].extend(reversed(missing))
        _save_journal(app, journal)
    for path in reversed(missing):
        os.mkdir(path, 0o755)


def _publish_staged(staged: _Staged) -> None:
    """Phase PUBLISH: the staged files replace the live ones (the old ones kept) and the state file
    names the release.  A failure puts everything back and raises."""
    journal = staged.journal
    journal["phase"] = "publishing"
    _save_journal(staged.app, journal)
    try:
        for number, entry in enumerate(journal["files"]):
            if number == len(journal["files"]) // 2:
                _reached(staged.app, "publish")
            dest = entry["dest"]
            if entry["existed"]:
                kept = _beside(dest, _KEPT_SUFFIX)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(kept)
                os.link(dest, kept, follow_symlinks=False)
            if entry.get("remove"):  # a revert: a file the reverted upgrade created
                os.unlink(dest)
            else:
                os.replace(_beside(dest, _STAGED_SUFFIX), dest)
        for directory in sorted({os.path.dirname(entry["dest"]) for entry in journal["files"]}):
            _fsync_dir(directory)
    except OSError as exc:
        _undo_staged(staged)
        raise AgentError(f"cannot write the release: {exc}; no file was changed. "
                         "Check the permissions and free space of the app directory.") from exc
    try:
        if "state_after" in journal:  # a revert: the state file as it was before the reverted upgrade
            _put_back_state(staged.app, journal["state_after"])
        else:
            _write_state(staged.app, staged.state)
        journal["phase"] = "published"
        _save_journal(staged.app, journal)
    except BaseException:
        _undo_staged(staged)
        raise


def _undo_staged(staged: _Staged) -> None:
    """Phase UNDO: every file and the state file as they were before; the journal gone."""
    _undo_files(staged.journal)
    if staged.journal["phase"] not in _UNPUBLISHED:
        _put_back_state(staged.app, staged.journal["state_before"])
    _drop_journal(staged.app)


def _commit_staged(staged: _Staged) -> None:
    """Phase COMMIT: past the point of no return, the old files are dropped."""
    staged.journal["phase"] = "committed"
    _save_journal(staged.app, staged.journal)
    _reached(staged.app, "commit")
    _commit_files(staged.journal)
    _drop_journal(staged.app)


def _apply_everywhere(app: str, release: dict, suspend_timeout: float, *, exclude_pid: int | None = None,
                      here: bool = False, skip: Collection[int] = ()) -> list[dict]:
    """Phase APPLY: every agent of ``app`` (and, with ``here``, this process), but those in
    ``skip``, loads ``release`` from the disk; one ``_ask_agents`` entry per process."""
    entries = _ask_agents(app, _apply_request(release, suspend_timeout), timeout=_apply_wait(suspend_timeout),
                          exclude_pid=os.getpid() if here else exclude_pid, skip=skip)
    if here and os.getpid() not in skip:
        report = _apply_here(_release_of(release, os.environ.get("FLY_IMAGE_REF")), suspend_timeout=suspend_timeout)
        entries.append({"pid": os.getpid(), "reply": {"ok": bool(report["ok"]), "pid": os.getpid(),
                                                      "name": _process_name(), "report": report}})
    return entries


def _key_in(store: Store, url: str) -> str | None:
    """The key whose URL in ``store`` is ``url`` (tried for each tail of its path), if any."""
    segments = _split_url(url)[2].split("/")
    for start in range(1, len(segments)):
        key = urllib.parse.unquote("/".join(segments[start:]))
        with contextlib.suppress(S3Error):
            if key and store.url(key) == url:
                return key
    return None


def _store_for_url(url: str, store: Store | None = None) -> tuple[Store, str]:
    """The store and key behind a release URL: ``store`` when the URL is its own, else from the URL.

    A ``file://`` URL names a ``LocalStore``; an ``http(s)`` URL, virtual-hosted
    (``https://<bucket>.<host>/<key>``) or path style (``<endpoint>/<bucket>/<key>``),
    names a bucket on ``AWS_ENDPOINT_URL_S3``, reached in the URL's own style with the
    credentials of the environment.  A presigned URL's query is ignored.
    """
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "file":
        return LocalStore.from_url(url)
    if parsed.scheme not in ("http", "https"):
        raise ConfigError(f"unsupported release URL {_redact_url(url)!r}: use the https:// URL of the uploaded "
                          "tarball or the file:// URL of a local store")
    plain = urllib.parse.urlunsplit(parsed._replace(query="", fragment=""))
    key = _key_in(store, plain) if store is not None else None
    if key is not None:
        return store, key
    address = s3_object_address(plain, _s3_endpoint_from_env())
    if address is None:
        raise ConfigError(f"the release is on {_redact_url(f'{parsed.scheme}://{parsed.netloc}')} but "
                          "AWS_ENDPOINT_URL_S3 points elsewhere; set it to the endpoint the release was "
                          "uploaded to (credentials go in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                          "never in the URL)")
    bucket, key, style = address
    if not bucket or not key:
        raise ConfigError(f"{_redact_url(url)} is not a release URL: expected https://<bucket>.<endpoint host>/<key> "
                          "or <endpoint>/<bucket>/<key>")
    return S3.from_env(bucket=bucket, addressing_style=style), key


def _most_common(values: list[str], default: str | None) -> str | None:
    counts = collections.Counter(value for value in values if value)
    return min(counts, key=lambda value: (-counts[value], value)) if counts else default


def _locate_on_machine(app: str, paths: list[str], *, in_process: bool,
                       app_root: str) -> tuple[dict[str, str], str | None]:
    """Where this machine's processes loaded modules named like the members from, and their image.

    The locations only ever feed the notes of the result; the image is the
    one most of the processes share (an exec'd command may lack the app's
    environment).  With ``in_process`` this process answers for itself.
    Processes that track roots of which none overlaps ``app_root`` refuse
    the upgrade before anything is written: the command runs in the wrong
    place, and would write where no process looks.
    """
    located: dict[str, str] = {}
    image_refs, roots = [], set()
    for entry in _ask_agents(app, {"op": "locate", "paths": paths}, timeout=_LOCATE_TIMEOUT,
                             exclude_pid=os.getpid() if in_process else None):
        reply = entry.get("reply") or {}
        if reply.get("ok") and isinstance(reply.get("located"), dict):
            for rel, where in reply["located"].items():
                if rel in paths and isinstance(where, str):
                    located.setdefault(rel, where)
            image_refs.append(reply.get("image_ref"))
            roots.update(root for root in reply.get("roots") or () if isinstance(root, str))
    if roots and not any(_is_under(root, app_root) or _is_under(app_root, root) for root in roots):
        raise AgentError(f"the app root here is {app_root}, but the app's processes run code from "
                         f"{', '.join(sorted(roots))}; nothing was written. Run the command in the app's "
                         "directory, or set FLYDEPLOY_APP_ROOT to it.")
    if in_process:
        located.update(_locate_members(paths, *_loaded_locations(paths)))
        return located, os.environ.get("FLY_IMAGE_REF") or None
    return located, _most_common(image_refs, None)


class _Superseded(AgentError):
    """This machine already installed a release deployed after the one asked for."""


def _refuse_superseded(app: str, key: str | None, deployed_at: str | None) -> dict | None:
    """The state of what this machine installed; ``_Superseded`` when that was deployed after
    ``deployed_at`` (callers hold the machine lock): two upgrades that raced, or a stale read,
    never roll a machine back.  A revert does not ask: going back is what it is for."""
    state = _read_state(app)
    if state and deployed_at and (state.get("deployed_at") or "") > deployed_at:
        raise _Superseded(f"refusing {key} (deployed at {deployed_at}): this machine already installed "
                          f"{state.get('version')}, deployed later ({state['deployed_at']}); nothing was written")
    return state


@dataclasses.dataclass
class _MachineRun:
    """What the phases did on this machine: the state record of the release, one entry per
    process (``_ask_agents``'s shape), and whether the release stayed on disk."""

    state: dict
    entries: list[dict]
    committed: bool
    written: int
    unchanged: int
    notes: list[str]


def _went_back(entries: list[dict], back: list[dict], version: str | None, previous: dict) -> list[dict]:
    """The entries of an undone upgrade: each process as it ended up, after following the disk back."""
    back_by_pid = {entry["pid"]: entry for entry in back}
    target = previous.get("version") or "the image's code"
    ended = []
    for entry in entries:
        reply = entry.get("reply") or {}
        if not reply.get("ok"):
            ended.append(entry)
            continue
        returned = back_by_pid.get(entry["pid"]) or {}
        if (returned.get("reply") or {}).get("ok"):
            why = f"applied {version}, then went back to {target} with the files, since not every process applied it"
        else:
            why = (f"applied {version} but could not go back to {target} with the files ({_reply_error(returned)}); "
                   "restart it")
        ended.append({**entry, "error": why, "reply": {**reply, "ok": False,
                                                       "report": {**(reply.get("report") or {}), "rolled_back": True}}})
    known = {entry["pid"] for entry in entries}
    ended += [entry for entry in back if entry["pid"] not in known and not (entry.get("reply") or {}).get("ok")]
    return ended


def _upgrade_machine(app: str, store: Store, key: str, sha256: str | None, *, deployed_at: str | None,
                     suspend_timeout: float, in_process: bool, unless_installed: dict | None = None,
                     given_up: threading.Event | None = None) -> _MachineRun | None:
    """Every phase of one machine's upgrade (see the list at the top of this part).

    The download needs no lock; the rest runs under the machine lock, so one
    process at a time does the file work, and a dead run's journal is dealt
    with first.  With ``in_process`` this process applies too.  With
    ``unless_installed`` (a release record) it returns None when the state
    file shows that release installed.  A release deployed before the one
    installed raises ``_Superseded``: two upgrades that raced, or a stale
    metadata read, never roll a machine back.  Once ``given_up`` is set (the
    caller stopped waiting) it ends after the download, having changed nothing.
    """
    def check_installed() -> bool:
        state = _refuse_superseded(app, key, deployed_at)
        return unless_installed is not None and _same_release(state, unless_installed) and _for_this_image(state)

    if check_installed():
        return None
    area = os.path.join(_work_dir(app), f"{_WORK_AREA_PREFIX}{os.getpid()}")
    try:
        shutil.rmtree(area, ignore_errors=True)
        os.mkdir(area, 0o700)
        log.info("flydeploy: downloading %s", key)
        manifest, tree, digest = _download_release(store, key, area, sha256, app)
        if given_up is not None and given_up.is_set():
            raise _StartupLate
        with _machine_lock(app):
            _recover_and_resync(app, exclude_pid=os.getpid() if in_process else None)
            if check_installed():
                return None
            paths = sorted(manifest["files"])
            app_root = _machine_app_root(in_process=in_process)
            located, image_ref = _locate_on_machine(app, paths, in_process=in_process, app_root=app_root)
            staged = _stage_release(app, manifest, tree, digest, app_root=app_root, image_ref=image_ref,
                                    deployed_at=deployed_at, located=located)
            shutil.rmtree(area, ignore_errors=True)
            return _publish_and_apply(staged, suspend_timeout, in_process=in_process)
    finally:
        shutil.rmtree(area, ignore_errors=True)


def _publish_and_apply(staged: _Staged, suspend_timeout: float, *, in_process: bool = False) -> _MachineRun:
    """Phases PUBLISH, APPLY and COMMIT or UNDO of a staged release (callers hold the machine lock)."""
    app = staged.app
    _publish_staged(staged)
    try:
        entries = _apply_everywhere(app, staged.state, suspend_timeout, here=in_process)
    except BaseException:
        _undo_staged(staged)
        raise
    committed = all((entry.get("reply") or {}).get("ok") for entry in entries)
    if committed:
        _commit_staged(staged)
    else:
        _undo_staged(staged)
        previous = _previous_release(staged.journal)
        # Those that failed are back on their old code, or will follow the disk when done.
        failed = {entry["pid"] for entry in entries if not (entry.get("reply") or {}).get("ok")}
        back = _apply_everywhere(app, previous, suspend_timeout, here=in_process, skip=failed)
        entries = _went_back(entries, back, staged.state["version"], previous)
    log.info("flydeploy: %s %s: %s %d files, %d unchanged", app, staged.state["version"],
             "wrote" if committed else "put back", staged.written, staged.unchanged)
    for note in staged.notes:
        log.info("flydeploy: %s", note)
    return _MachineRun(staged.state, entries, committed, staged.written if committed else 0, staged.unchanged,
                       staged.notes)


def _apply_request(release: dict, suspend_timeout: float) -> dict:
    """An apply request; past its ``answer_by`` (seconds since the epoch) the asker has given up on it."""
    return {"op": "apply", "suspend_timeout": suspend_timeout, "answer_by": time.time() + _apply_wait(suspend_timeout),
            **{key: release.get(key) for key in _RELEASE_FIELDS}}


def _apply_wait(suspend_timeout: float) -> float:
    """How long to wait for one process's apply before reporting it failed."""
    return suspend_timeout + _APPLY_MARGIN


def _reply_error(entry: dict) -> str:
    """Why one agent's apply failed, from an ``_ask_agents`` entry."""
    reply = entry.get("reply") or {}
    return entry.get("error") or (reply.get("report") or {}).get("error") or reply.get("error") or "no reason given"


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
            failures.append(f"process {name} failed: {_reply_error(entry)}")
        processes.append({"pid": entry["pid"], "name": name, "ok": bool(reply.get("ok")),
                          "error": None if reply.get("ok") else failures[-1],
                          "modules": report.get("modules") or [], "suspend_ms": report.get("suspend_ms"),
                          "rolled_back": report.get("rolled_back")})
    error = error or ("; ".join(failures) if failures else None)
    return {"machine_id": _machine_id(),
            "region": os.environ.get("FLY_REGION") or "", "status": "failed" if error else "completed",
            "success": error is None, "error": error, "modules_reloaded": len(modules),
            "module_names": sorted(modules), "processes_succeeded": len(succeeded),
            "process_names": succeeded + failed, "processes_failed": len(failed),
            "suspend_duration_ms": round(suspend_ms, 3),
            "total_duration_ms": round((time.monotonic() - started) * 1000, 3), "applied_at": _iso_utc(_utc_now()),
            "version": version, "files_written": (installed or {}).get("files_written", 0),
            "files_unchanged": (installed or {}).get("files_unchanged", 0), "processes": processes}


def _redact_url(url: str) -> str:
    """``url`` without its userinfo and query (credentials, presigned signatures)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _scrub(text: str, *urls: str | None) -> str:
    """``text`` with the userinfo and query of each of ``urls`` masked."""
    for url in urls:
        if not url:
            continue
        parts = urllib.parse.urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        for secret in sorted({userinfo, *userinfo.split(":"), parts.query,
                              *(value for _name, value in urllib.parse.parse_qsl(parts.query))}, key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "***")
    return text


def _check_deployed_at(deployed_at: str | None, revert: str | None = None) -> str | None:
    """A ``deployed_at`` given for a release (what current.json records for it, so that the
    machine need not read it): an ISO 8601 time with its zone, and not for a revert.  Returns
    it as current.json's records have it (UTC, milliseconds, ``Z``), which is how they compare."""
    if deployed_at is None:
        return None
    if revert is not None:
        raise ConfigError("--deployed-at goes with the release's --url, not with --revert (a revert puts "
                          "back what the machine recorded before)")
    moment = None
    with contextlib.suppress(ValueError):
        moment = datetime.datetime.fromisoformat(deployed_at)
    if moment is None or moment.tzinfo is None:
        raise ConfigError(f"--deployed-at {deployed_at!r} is not an ISO 8601 time with its zone; give the "
                          "release's deployed_at as current.json records it (e.g. 2026-12-07T21:42:41.123Z), "
                          "or leave it out to have it read from current.json")
    return _iso_utc(moment)


def _recorded_deployed_at(store: Store, app: str, key: str) -> str | None:
    """When the release at ``key`` was recorded in current.json (hot upgrade or history), if it was.

    Storage that cannot be read fails the upgrade here, before the download
    would fail the same way.
    """
    doc, _etag = read_current(store, app)
    records = [(doc or {}).get("hot_upgrade"), *((doc or {}).get("history") or [])]
    for record in records:
        if isinstance(record, dict) and isinstance(record.get("tarball_url"), str):
            if urllib.parse.unquote(urllib.parse.urlsplit(record["tarball_url"]).path).endswith("/" + key):
                return record.get("deployed_at")
    return None


def _fresh_upgrade_id() -> str:
    return f"{_utc_now().strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def _acting_owner(app: str) -> tuple[int, int] | None:
    """The user (uid, gid) whose rights root's file work for ``app`` takes; None: its own.

    The runtime directory tells: one that belongs to another user than root
    (or a runtime root that does) is that user's, who could put anything
    there, so root acts as that user.  Before any process made it, the owner
    of the app root decides, as ``_work_dir`` does.
    """
    if os.geteuid() != 0:
        return None
    owners = set()
    for directory in (_runtime_root(), os.path.join(_runtime_root(), app)):
        try:
            info = os.lstat(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if info.st_uid != 0:
            owners.add((info.st_uid, info.st_gid))
    if not os.path.lexists(os.path.join(_runtime_root(), app)):
        code = os.stat(_machine_app_root(in_process=False))
        if code.st_uid != 0:
            owners.add((code.st_uid, code.st_gid))
    if len({uid for uid, _gid in owners}) > 1:
        raise AgentError(f"the runtime directory {os.path.join(_runtime_root(), app)} and what holds it belong to "
                         f"different users (uids {sorted(uid for uid, _gid in owners)}); flydeploy refuses it. "
                         "Remove them, or set FLYDEPLOY_RUNTIME_DIR to a private directory.")
    return owners.pop() if owners else None


def _run_as(owner: tuple[int, int], work: Callable[[], dict]) -> dict:
    """``work()`` in a forked process with the rights of ``owner`` alone; its JSON-ready result."""
    uid, gid = owner
    import concurrent.futures.thread  # noqa: F401  (loaded lazily: the user may not read the interpreter's files)
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read)
            try:
                os.initgroups(pwd.getpwuid(uid).pw_name, gid)
            except KeyError:
                os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            result = json.dumps(work(), default=str).encode()
            with os.fdopen(write, "wb") as out:
                out.write(result)
            code = 0
        except BaseException:
            log.exception("flydeploy: the upgrade as uid %d failed", uid)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        raise AgentError(f"the upgrade run as the app's user (uid {uid}) ended without a result; see its output")
    return json.loads(data)


def hot_upgrade(tarball_url: str, app: str, *, sha256: str | None = None,
                suspend_timeout: float = _DEFAULT_SUSPEND_TIMEOUT,
                upgrade_id: str | None = None, store: Store | None = None,
                deployed_at: str | None = None) -> dict:
    """Upgrade every Python process of ``app`` on this machine to the release at ``tarball_url``.

    Downloads the tarball (signed, streamed, retried; an S3 URL of the
    configured endpoint or a ``file://`` URL of a local store), verifies
    ``sha256`` when given and unpacks it safely, then stages the files whose
    content changed, each at its own path under the app root, publishes
    them, records the version in the machine's state file and asks every
    live agent to apply it, concurrently (the phases are listed at the top
    of this part); a process that has not answered ``suspend_timeout`` plus
    a margin later is reported failed.  Unless every process applied it,
    every file and the state file are put back and the processes that had
    applied it follow the disk back.  A release recorded in current.json
    before the one this machine installed is refused, so racing upgrades
    never roll back; ``deployed_at`` says when current.json recorded the
    release (the orchestrator knows it), else it is read from there.  Run as
    root for an app whose runtime directory belongs to another user, the
    work is done with that user's rights.

    Returns the per-machine result (DESIGN.md's result-file shape, plus
    ``upgrade_id`` and ``notes``): success only if every process succeeded,
    and there was at least one.  Every failure is reported in it, never
    raised; a bad tarball, a hash mismatch or unreachable storage fail
    before any file is written.  Credentials in the URL never appear in it.
    The result is also stored, best effort, at
    ``releases/<app>-results/<upgrade_id>/<machine_id>.json`` (the upgrade
    id defaults to ``sha256``, else a fresh one).
    """
    _check_name("app", app)
    if not _is_positive_seconds(suspend_timeout):
        raise ConfigError(f"suspend_timeout must be a positive number of seconds, not {suspend_timeout!r}")
    deployed_at = _check_deployed_at(deployed_at)
    upgrade_id = _check_name("upgrade id", upgrade_id or (sha256 or "").lower() or _fresh_upgrade_id())
    started = time.monotonic()
    run, key, errors = None, None, []
    with _reporting_failures(errors, tarball_url):
        owner = _acting_owner(app)
        if owner is not None:
            return _run_as(owner, functools.partial(hot_upgrade, tarball_url, app, sha256=sha256,
                                                    suspend_timeout=suspend_timeout, upgrade_id=upgrade_id,
                                                    store=store, deployed_at=deployed_at))
        store, key = _store_for_url(tarball_url, store)
        if deployed_at is None:
            deployed_at = _recorded_deployed_at(store, app, key)
        with _guarded(app):
            run = _upgrade_machine(app, store, key, sha256, deployed_at=deployed_at,
                                   suspend_timeout=suspend_timeout, in_process=False)
        if not run.entries:
            raise AgentError(_no_agent(app, f"loaded {run.state['version']} (its files are written)"))
        if not run.committed:
            failures = [f"process {(e.get('reply') or {}).get('name') or e['pid']} failed: {_reply_error(e)}"
                        for e in run.entries if not (e.get("reply") or {}).get("ok")]
            raise AgentError("; ".join(failures) + f"; {run.state['version']} was taken off the disk again: every "
                             "file and the state file are as before")
    error = errors[0] if errors else None
    result = _machine_result(run.entries if run else [], version=run.state["version"] if run else None,
                             started=started, error=error,
                             installed=run and {"files_written": run.written, "files_unchanged": run.unchanged})
    result["upgrade_id"] = upgrade_id
    result["notes"] = run.notes if run else []
    for process in result["processes"]:
        log.info("flydeploy: %s %s", process["name"], "ok" if process["ok"] else process["error"])
    _store_result(store if key is not None else None, app, upgrade_id, result)
    return result


@contextlib.contextmanager
def _reporting_failures(errors: list[str], url: str | None) -> Iterator[None]:
    """Run the block of a machine-side command; its failure is appended to ``errors`` as a message
    (credentials of ``url`` and of the endpoint masked), never raised: the caller gets a result."""
    try:
        yield
    except FlyDeployError as exc:
        errors.append(_scrub(str(exc), url, os.environ.get("AWS_ENDPOINT_URL_S3")))
    except Exception as exc:  # whatever went wrong, the caller gets a result
        log.error("flydeploy: unexpected error", exc_info=True)
        errors.append(_scrub(f"unexpected error: {exc!r}", url, os.environ.get("AWS_ENDPOINT_URL_S3")))


@contextlib.contextmanager
def _guarded(app: str) -> Iterator[None]:
    """Run the block's file work with a guardian (``_start_guardian``) that recovers what it leaves."""
    guardian = _start_guardian(app)
    try:
        yield
    finally:
        os.close(guardian)


# The pipe on which a detached job hands its result line to the exec that waits for it
# (``_start_detached``); None in any other process.
_result_pipe: int | None = None


def _take_result_pipe() -> int | None:
    """This process's end of the result pipe, taken: nothing else in it writes there again."""
    global _result_pipe
    pipe, _result_pipe = _result_pipe, None
    return pipe


def _hand_over(result: Mapping[str, Any]) -> None:
    """Give ``result``'s line to the exec waiting for this job, if one is: it answers at once, and
    the job then stores the result and ends without anyone waiting for it."""
    pipe = _take_result_pipe()
    if pipe is None:
        return
    data = (_result_line(result) + "\n").encode()
    try:
        while data:
            data = data[os.write(pipe, data):]
    except OSError as exc:  # the exec stopped waiting (its --wait ran out): the stored result stands
        log.info("flydeploy: the exec that started this job no longer waits for its result: %s", exc)
    finally:
        os.close(pipe)


def _store_result(store: Store | None, app: str, upgrade_id: str, result: Mapping[str, Any],
                  phase: str = "") -> None:
    """Hand ``result`` over (``_hand_over``), then store it at
    ``releases/<app>-results/<upgrade_id>/[<phase>/]<machine_id>.json`` (unless ``store`` is None,
    when there is nowhere to), best effort.  The machine lock is not held: a next exec on this
    machine may start its own run meanwhile."""
    _hand_over(result)
    if store is None:
        return
    key = f"{results_prefix(app, upgrade_id)}{phase + '/' if phase else ''}{result['machine_id']}.json"
    try:
        store.put(key, json.dumps(result, sort_keys=True).encode(), content_type="application/json")
    except Exception as exc:  # the result file is a convenience; the upgrade stands without it
        log.warning("flydeploy: could not store the result at %s: %s", key, exc)


# --- Two phases: prepare, apply, discard, revert ------------------------------

# How long a prepared staging waits for its apply unless ``--expires-in`` says.
_DEFAULT_PREPARED_TTL = 600.0
# How long one process may take to plan a release (read, parse, compile).
_PREPARE_WAIT = 60.0
_DEFAULT_HEALTH_TIMEOUT = 5.0
_UNDO_PREFIX = "undo-"
_UNDO_FILE = "undo.json"


class ProcessPlan(TypedDict):
    """One process's answer to a prepare: its plan (``UpgradePlan.to_dict()``) or why it has none."""

    pid: int
    name: str
    ok: bool
    error: str | None
    plan: dict | None


class PrepareResult(TypedDict):
    """What ``rpc prepare`` reports for one machine (stored under ``<upgrade id>/prepare/``)."""

    machine_id: str
    region: str
    status: str  # "ready" | "refused" | "failed" | "nothing kept" (a --revert with no record to revert from)
    success: bool
    error: str | None
    version: str | None
    upgrade_id: str
    expires_at: str | None
    release_bytes: int
    files_to_write: int
    files_unchanged: int
    processes: list[ProcessPlan]
    # The optional flags this machine's ``rpc apply`` takes (``APPLY_ACCEPTS``): until the apply
    # publishes the release, a machine runs its own flydeploy.py, which may be older than the
    # orchestrator's; it is given only these.
    apply_accepts: list[str]


# What ``rpc apply`` takes beyond what every version of it took (``PrepareResult.apply_accepts``).
APPLY_ACCEPTS = ("--deployed-at",)


class HealthCheck(TypedDict):
    """One port's answer to the health check's GET: its status, and why it failed if it did."""

    port: int
    status: int | None
    error: str | None


class HealthReport(TypedDict):
    """The health check after an apply: ``ok`` when every process is alive and every port answered 2xx."""

    ok: bool
    checks: list[HealthCheck]
    processes_alive: bool


@dataclasses.dataclass
class _Prepared:
    """What PREPARE did on this machine: the staging (discarded again unless ``error`` is None),
    one ``_ask_agents`` entry per process, the tarball's size."""

    staged: _Staged
    entries: list[dict]
    release_bytes: int
    error: str | None = None


def _prepared_live(journal: Mapping[str, Any]) -> bool:
    """Whether a prepared staging still waits for its apply: not expired, and made since this boot."""
    expires = _parse_time(journal.get("expires_at"))
    return (journal.get("phase") == "prepared" and journal.get("boot_id") == _boot_id()
            and expires is not None and expires > _utc_now())


def _discard_prepared(app: str, journal: Mapping[str, Any]) -> None:
    """Remove a prepared staging: its staged files, its journal, what it kept to undo (callers hold the lock)."""
    _undo_files(dict(journal))
    _drop_journal(app)
    _remove_undo_areas(app, lambda upgrade_id: upgrade_id == journal.get("upgrade_id"))
    log.info("flydeploy: discarded the staging of %s (%s)", journal.get("upgrade_id"), journal.get("version"))


def _undo_area(app: str, upgrade_id: str) -> str:
    return os.path.join(_work_dir(app), _UNDO_PREFIX + upgrade_id)


def _remove_undo_areas(app: str, doomed: Callable[[str], bool]) -> None:
    """Remove what was kept to undo the upgrades whose id is ``doomed``."""
    for entry in os.scandir(_work_dir(app)):
        if entry.name.startswith(_UNDO_PREFIX) and doomed(entry.name[len(_UNDO_PREFIX):]):
            shutil.rmtree(entry.path, ignore_errors=True)


def _keep_undo(staged: _Staged, upgrade_id: str, url: str | None) -> None:
    """Copy aside what publishing ``staged`` replaces, with the state file before it, so that
    ``--revert upgrade_id`` can put it back (the files it creates are listed, to be removed)."""
    area = _undo_area(staged.app, upgrade_id)
    shutil.rmtree(area, ignore_errors=True)
    os.makedirs(os.path.join(area, "files"), 0o700)
    files = []
    for number, entry in enumerate(staged.journal["files"]):
        kept = {"dest": entry["dest"], "copy": None, "sha256": None}
        if entry["existed"]:
            kept["copy"] = os.path.join("files", str(number))
            shutil.copyfile(entry["dest"], os.path.join(area, kept["copy"]), follow_symlinks=False)
            kept["sha256"] = _file_sha256(entry["dest"])
        files.append(kept)
    record = {"upgrade_id": upgrade_id, "url": url and _redact_url(url), "boot_id": _boot_id(),
              "state_before": staged.journal["state_before"], "files": files, "dirs": staged.journal["dirs"]}
    content = json.dumps(record, sort_keys=True).encode()
    _write_atomically(os.path.join(area, _UNDO_FILE), lambda out: out.write(content), mode=0o600)


def _kept_undo(app: str, upgrade_id: str) -> dict | None:
    """What ``_keep_undo`` kept for ``upgrade_id`` since this machine booted, if anything."""
    try:
        with open(os.path.join(_undo_area(app, upgrade_id), _UNDO_FILE), "rb") as handle:
            record = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("boot_id") == _boot_id() else None


def _state_digest(text: str | None) -> str | None:
    """The release sha256 a machine's state file (its text) names, if any."""
    with contextlib.suppress(ValueError):
        state = json.loads(text or "null")
        if isinstance(state, dict) and isinstance(state.get("sha256"), str):
            return state["sha256"].lower()
    return None


def _load_undo(app: str, upgrade_id: str) -> dict:
    """What ``_keep_undo`` kept for ``upgrade_id``; raises when this machine kept nothing for it."""
    record = _kept_undo(app, upgrade_id)
    if record is None:
        raise AgentError(f"nothing to revert {upgrade_id} with on this machine: it kept no record of that "
                         "upgrade's apply since it booted (a restarted machine runs its image's code and catches "
                         "up from current.json)")
    return record


def _stage_revert(app: str, undo: dict, *, app_root: str, revert: str) -> _Staged:
    """Phase STAGE of a revert: what the apply of ``revert`` replaced, written beside each file again,
    and what it created listed for removal; the state file as it was before it."""
    entries, sources = [], []
    for kept in undo["files"]:
        dest = kept["dest"]
        if not _is_under(dest, app_root):
            raise AgentError(f"cannot revert {revert}: {dest} is outside the app root {app_root}; nothing was "
                             "changed. Run the command in the app's directory, or set FLYDEPLOY_APP_ROOT.")
        if kept["copy"] is None and os.path.lexists(dest):
            entries.append({"dest": dest, "existed": True, "remove": True})
        elif kept["copy"] is not None and _file_sha256(dest) != kept["sha256"]:
            entries.append({"dest": dest, "existed": os.path.lexists(dest)})
            sources.append((dest, os.path.join(_undo_area(app, revert), kept["copy"])))
    state_after = undo.get("state_before")
    try:
        state = json.loads(state_after or "null") or {"version": None}
    except ValueError:
        state = {"version": None}
    journal = {"version": state.get("version"), "app_root": app_root, "phase": "staging", "dirs": [],
               "files": entries, "state_before": _state_text(app), "state_after": state_after,
               "remove_dirs": undo.get("dirs") or []}
    _save_journal(app, journal)
    try:
        for dest, source in sources:
            current = os.stat(dest) if os.path.exists(dest) else os.stat(source)
            _write_staged(source, _beside(dest, _STAGED_SUFFIX), stat.S_IMODE(current.st_mode),
                          (current.st_uid, current.st_gid) if os.geteuid() == 0 else None)
    except OSError as exc:
        _undo_files(journal)
        _drop_journal(app)
        raise AgentError(f"cannot stage the revert of {revert}: {exc}; no file was changed. Check the "
                         "permissions and free space of the app directory.") from exc
    back_to = state.get("version") or "the image's own code"
    return _Staged(app, state, journal, len(undo["files"]) - len(entries), [f"reverting {revert}: back to {back_to}"])


def _prepare_request(journal: Mapping[str, Any]) -> dict:
    """A prepare request: each changed file's path and where its new content is staged."""
    return {"op": "prepare", "files": {entry["dest"]: _beside(entry["dest"], _STAGED_SUFFIX)
                                       for entry in journal["files"] if not entry.get("remove")}}


def _prepare_machine(app: str, *, store: Store | None, key: str | None, sha256: str | None, upgrade_id: str,
                     expires_in: float, revert: str | None, url: str | None) -> _Prepared:
    """Phases DOWNLOAD, STAGE and PREPARE (of the release at ``key``, or of the revert of
    ``revert``): staged, journalled ``prepared``, planned by every process; discarded again
    unless every process is ready.  Another upgrade's staging is discarded first, and what
    was kept to undo upgrades other than this one and ``revert``."""
    area = os.path.join(_work_dir(app), f"{_WORK_AREA_PREFIX}{os.getpid()}")
    try:
        shutil.rmtree(area, ignore_errors=True)
        os.mkdir(area, 0o700)
        manifest = tree = digest = None
        release_bytes = 0
        if revert is None:
            log.info("flydeploy: downloading %s", key)
            manifest, tree, digest = _download_release(store, key, area, sha256, app)
            release_bytes = os.path.getsize(os.path.join(area, "release.tar.gz"))
        with _machine_lock(app):
            _recover_and_resync(app)
            _remove_undo_areas(app, lambda other: other not in (upgrade_id, revert))
            app_root = _machine_app_root(in_process=False)
            if revert is None:
                paths = sorted(manifest["files"])
                located, image_ref = _locate_on_machine(app, paths, in_process=False, app_root=app_root)
                staged = _stage_release(app, manifest, tree, digest, app_root=app_root, image_ref=image_ref,
                                        deployed_at=None, located=located)
            else:
                staged = _stage_revert(app, _load_undo(app, revert), app_root=app_root, revert=revert)
            shutil.rmtree(area, ignore_errors=True)
            staged.journal.update(
                phase="prepared", upgrade_id=upgrade_id, sha256=digest, revert=revert, boot_id=_boot_id(),
                expires_at=_iso_utc(_utc_now() + datetime.timedelta(seconds=expires_in)),
                state=staged.state, unchanged=staged.unchanged, notes=staged.notes)
            try:
                if revert is None and _state_digest(staged.journal["state_before"]) == digest.lower():
                    # It ran this release already (caught up at boot from current.json): its apply
                    # changes nothing, and a revert could only put this release back.
                    shutil.rmtree(_undo_area(app, upgrade_id), ignore_errors=True)
                else:
                    _keep_undo(staged, upgrade_id, url)
                _save_journal(app, staged.journal)
            except OSError as exc:
                _discard_prepared(app, staged.journal)
                raise AgentError(f"cannot keep what the apply would replace: {exc}; nothing was changed. "
                                 "Check the free space of the runtime directory (FLYDEPLOY_RUNTIME_DIR).") from exc
            entries = _ask_agents(app, _prepare_request(staged.journal), timeout=_PREPARE_WAIT)
            error = _prepare_error(entries, staged.state.get("version"), app)
            if error is not None:
                _discard_prepared(app, staged.journal)
            return _Prepared(staged, entries, release_bytes, error)
    finally:
        shutil.rmtree(area, ignore_errors=True)


def _no_agent(app: str, missed: str) -> str:
    """Why a machine-side phase found no process to work with: no agent of ``app``, so no
    running process ``missed`` what it would have done; with the fix."""
    return (f"no flydeploy agent of {app} runs on this machine, so no running process {missed}; the app must "
            "call flydeploy.startup_reapply_current() at boot")


def _prepare_error(entries: list[dict], version: str | None, app: str) -> str | None:
    """Why a machine is not ready for ``version`` after its processes answered ``entries``, if it is not."""
    if not entries:
        return _no_agent(app, f"could prepare {version}")
    failures = [f"process {(entry.get('reply') or {}).get('name') or entry['pid']}: {_reply_error(entry)}"
                for entry in entries if not (entry.get("reply") or {}).get("ok")]
    return "; ".join(failures) or None


def _prepare_result(prepared: _Prepared | None, *, upgrade_id: str, error: str | None) -> PrepareResult:
    """The per-machine result of a prepare (``PrepareResult``)."""
    staged = prepared.staged if prepared else None
    processes: list[ProcessPlan] = []
    refused = False
    for entry in prepared.entries if prepared else []:
        reply = entry.get("reply") or {}
        plan = reply.get("plan") if isinstance(reply.get("plan"), dict) else None
        refused = refused or bool(plan and plan.get("refused"))
        processes.append({"pid": entry["pid"], "name": reply.get("name") or f"pid {entry['pid']}",
                          "ok": bool(reply.get("ok")), "error": None if reply.get("ok") else _reply_error(entry),
                          "plan": plan})
    error = error or (prepared.error if prepared else None)
    return {"machine_id": _machine_id(), "region": os.environ.get("FLY_REGION") or "",
            "status": "ready" if error is None else "refused" if refused else "failed",
            "success": error is None, "error": error, "version": staged.state.get("version") if staged else None,
            "upgrade_id": upgrade_id, "expires_at": staged.journal["expires_at"] if staged and error is None else None,
            "release_bytes": prepared.release_bytes if prepared else 0,
            "files_to_write": staged.written if staged else 0, "files_unchanged": staged.unchanged if staged else 0,
            "processes": processes, "apply_accepts": list(APPLY_ACCEPTS)}


def _machine_id() -> str:
    return os.environ.get("FLY_MACHINE_ID") or socket.gethostname()


def _release_store(app: str, url: str | None, revert: str | None, store: Store | None) -> tuple[Store | None, str | None]:
    """The store and key of a release URL; for a revert, the store of the reverted upgrade's release
    (where the result is stored), if this machine kept it."""
    if revert is not None:
        with contextlib.suppress(FlyDeployError):
            kept = _load_undo(app, revert).get("url")
            if kept:
                return _store_for_url(kept, store)[0], None
        return store, None
    return _store_for_url(url, store)


def prepare_release(app: str, *, url: str | None = None, sha256: str | None = None, upgrade_id: str,
                    expires_in: float = _DEFAULT_PREPARED_TTL, revert: str | None = None,
                    store: Store | None = None) -> PrepareResult:
    """Phase 1 of a two-phase upgrade on this machine: download and verify the release at ``url``
    once (or, with ``revert``, take what this machine ran before the apply of that upgrade id),
    stage its files beside theirs without publishing them, and have every process plan it
    (``plan_upgrade``) against the staged files.  Nothing the app uses changes.

    Unless every process is ready, the staging is discarded again before this returns
    (status ``refused`` when a process refused the release, else ``failed``).  A ready
    staging waits, with the machine unlocked, for ``apply_release`` of the same upgrade id,
    ``discard_prepared``, ``expires_in`` seconds, or a reboot.  Returns the
    ``PrepareResult``, also stored at ``releases/<app>-results/<upgrade_id>/prepare/``;
    never raises for an operational failure.
    """
    _check_name("app", app)
    _check_name("upgrade id", upgrade_id)
    if (url is None) == (revert is None):
        raise ConfigError("prepare needs the release's --url, or --revert UPGRADE_ID, not both")
    if not _is_positive_seconds(expires_in):
        raise ConfigError(f"expires_in must be a positive number of seconds, not {expires_in!r}")
    prepared, errors = None, []
    with _reporting_failures(errors, url):
        owner = _acting_owner(app)
        if owner is not None:
            return _run_as(owner, functools.partial(prepare_release, app, url=url, sha256=sha256,
                                                    upgrade_id=upgrade_id, expires_in=expires_in,
                                                    revert=revert, store=store))
        store, key = _release_store(app, url, revert, store)
        with _guarded(app):
            prepared = _prepare_machine(app, store=store, key=key, sha256=sha256, upgrade_id=upgrade_id,
                                        expires_in=expires_in, revert=revert, url=url)
    result = _prepare_result(prepared, upgrade_id=upgrade_id, error=errors[0] if errors else None)
    if revert is not None and errors and _kept_undo(app, revert) is None:
        result["status"] = NOTHING_KEPT
    for process in result["processes"]:
        log.info("flydeploy: %s %s", process["name"], "ready" if process["ok"] else process["error"])
    _store_result(store, app, upgrade_id, result, "prepare")
    return result


def _prepared_for(journal: Mapping[str, Any] | None, upgrade_id: str, sha256: str | None,
                  revert: str | None) -> bool:
    """Whether ``journal`` is a live staging of this very apply: its upgrade id, release and revert."""
    return (journal is not None and _prepared_live(journal) and journal.get("upgrade_id") == upgrade_id
            and journal.get("revert") == revert
            and (not sha256 or (journal.get("sha256") or "").lower() == sha256.lower()))


def _apply_machine(app: str, *, store: Store | None, key: str | None, sha256: str | None, upgrade_id: str,
                   revert: str | None, url: str | None, suspend_timeout: float,
                   deployed_at: str | None) -> _MachineRun:
    """Phases PUBLISH, APPLY and COMMIT or UNDO of this upgrade's prepared staging.  Without one
    (the machine restarted between the phases, the staging expired or was discarded) the
    phases before run first, so that the machine still ends on the release.  ``deployed_at``
    None: read from current.json."""
    if deployed_at is None and key is not None:
        deployed_at = _recorded_deployed_at(store, app, key)
    notes = []
    for attempt in range(2):
        with _machine_lock(app):
            journal = _load_journal(app)
            if _prepared_for(journal, upgrade_id, sha256, revert):
                staged = _Staged(app, journal["state"], journal, journal["unchanged"], notes + journal["notes"])
                if revert is None:
                    try:
                        _refuse_superseded(app, key, deployed_at)
                    except _Superseded:
                        _discard_prepared(app, journal)
                        raise
                    staged.state["deployed_at"] = deployed_at
                return _publish_and_apply(staged, suspend_timeout)
        if attempt:
            raise AgentError(f"the staging of {upgrade_id} was taken away while applying it; nothing was "
                             "applied. Run the upgrade again.")
        notes.append(f"no live staging of {upgrade_id} here (the machine restarted, or it expired or was "
                     "discarded): preparing it first")
        log.info("flydeploy: %s", notes[0])
        prepared = _prepare_machine(app, store=store, key=key, sha256=sha256, upgrade_id=upgrade_id,
                                    expires_in=_DEFAULT_PREPARED_TTL, revert=revert, url=url)
        if prepared.error is not None:
            return _MachineRun(prepared.staged.state, prepared.entries, False, 0, prepared.staged.unchanged,
                               prepared.staged.notes)
    raise AssertionError("unreachable")


def _health_check(app: str, applied: Collection[int], *, path: str, ports: Sequence[int],
                  timeout: float) -> HealthReport:
    """Phase CHECK: every process that applied still alive with its agent answering, and a GET of
    ``http://127.0.0.1:<port><path>`` answered 2xx within ``timeout`` for each of ``ports``."""
    answering = {entry["pid"] for entry in _ask_agents(app, {"op": "ping"}, timeout=timeout)
                 if (entry.get("reply") or {}).get("ok")}
    alive = bool(answering) and set(applied) <= answering
    checks = [_http_check(port, path, timeout) for port in ports]
    return {"ok": alive and all(check["error"] is None for check in checks), "checks": checks,
            "processes_alive": alive}


def _http_check(port: int, path: str, timeout: float) -> HealthCheck:
    target = f"http://127.0.0.1:{port}{path}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": f"flydeploy/{__version__} health check"})
        response = conn.getresponse()
        response.read(1 << 16)
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        return {"port": port, "status": None, "error": f"GET {target} failed: {exc or type(exc).__name__}"}
    finally:
        conn.close()
    return {"port": port, "status": status,
            "error": None if 200 <= status < 300 else f"GET {target} answered {status}, not 2xx"}


def _health_failure(health: HealthReport) -> str:
    problems = [check["error"] for check in health["checks"] if check["error"]]
    if not health["processes_alive"]:
        problems.insert(0, "a process that applied the release is gone or its agent does not answer")
    return "health check failed: " + "; ".join(problems) + " (the release stays on this machine)"


def apply_release(app: str, *, url: str | None = None, sha256: str | None = None, upgrade_id: str,
                  revert: str | None = None, suspend_timeout: float = _DEFAULT_SUSPEND_TIMEOUT,
                  health_check: str | None = None, health_ports: Sequence[int] = (),
                  health_timeout: float = _DEFAULT_HEALTH_TIMEOUT, store: Store | None = None,
                  deployed_at: str | None = None) -> dict:
    """Phase 2 of a two-phase upgrade on this machine: publish what ``prepare_release`` staged
    for ``upgrade_id`` and have every process apply it, as ``hot_upgrade`` does after staging
    (a process that fails puts every file back).  Without a live staging of it, the whole
    upgrade runs here, so that the machine still ends on the release.  With ``health_check``
    (a path), then the health check (``_health_check``): a failure makes the result
    unsuccessful, with the reason, but the release stays (the orchestrator decides).

    What the apply replaced stays kept on the machine, so that a later ``revert=upgrade_id``
    puts back what ran before, even the image's own code.  ``deployed_at`` (not for a revert)
    is when current.json recorded the release, as the orchestrator that recorded it knows;
    without it the machine reads current.json for it.

    Returns the per-machine result (``hot_upgrade``'s) plus ``applied`` (the machine runs the
    release now) and ``health`` (a ``HealthReport``, or None); also stored at
    ``releases/<app>-results/<upgrade_id>/apply/``.  Never raises for an operational failure.
    """
    _check_name("app", app)
    _check_name("upgrade id", upgrade_id)
    if (url is None) == (revert is None):
        raise ConfigError("apply needs the release's --url, or --revert UPGRADE_ID, not both")
    if not _is_positive_seconds(suspend_timeout) or not _is_positive_seconds(health_timeout):
        raise ConfigError("suspend_timeout and health_timeout must be positive numbers of seconds")
    if health_check is not None and not health_check.startswith("/"):
        raise ConfigError(f"the health check path must start with /, not {health_check!r}")
    deployed_at = _check_deployed_at(deployed_at, revert)
    started = time.monotonic()
    run, health, errors = None, None, []
    with _reporting_failures(errors, url):
        owner = _acting_owner(app)
        if owner is not None:
            return _run_as(owner, functools.partial(
                apply_release, app, url=url, sha256=sha256, upgrade_id=upgrade_id, revert=revert,
                suspend_timeout=suspend_timeout, health_check=health_check, health_ports=health_ports,
                health_timeout=health_timeout, store=store, deployed_at=deployed_at))
        store, key = _release_store(app, url, revert, store)
        with _guarded(app):
            run = _apply_machine(app, store=store, key=key, sha256=sha256, upgrade_id=upgrade_id, revert=revert,
                                 url=url, suspend_timeout=suspend_timeout, deployed_at=deployed_at)
        if not run.entries:
            raise AgentError(_no_agent(app, f"loaded {run.state.get('version')}"))
        if run.committed and health_check is not None:
            health = _health_check(app, [entry["pid"] for entry in run.entries], path=health_check,
                                   ports=health_ports, timeout=health_timeout)
            if not health["ok"]:
                raise AgentError(_health_failure(health))
    result = _machine_result(run.entries if run else [], version=run.state.get("version") if run else None,
                             started=started, error=errors[0] if errors else None,
                             installed=run and {"files_written": run.written, "files_unchanged": run.unchanged})
    result.update(upgrade_id=upgrade_id, notes=run.notes if run else [], applied=bool(run and run.committed),
                  health=health)
    _store_result(store, app, upgrade_id, result, "apply")
    return result


def discard_prepared(app: str, upgrade_id: str) -> str:
    """Drop the staging of ``upgrade_id`` (its staged files, journal and undo record) if this
    machine holds it; idempotent.  Returns what it did, in one line."""
    _check_name("app", app)
    _check_name("upgrade id", upgrade_id)
    if _app_dir(app, create=False) is None:
        return f"nothing staged for {upgrade_id} on this machine"
    with _machine_lock(app):
        journal = _load_journal(app)
        if journal is None or journal.get("phase") != "prepared" or journal.get("upgrade_id") != upgrade_id:
            return f"nothing staged for {upgrade_id} on this machine"
        _discard_prepared(app, journal)
    return f"discarded the staging of {upgrade_id} ({journal.get('version')}: {len(journal['files'])} files)"


# --- Boot catch-up and poller -----------------------------------------------

_poller: _Poller | None = None


class _LoadFailed(FlyDeployError):
    """The files of a release are installed but this process could not load them."""


def _current_hot_upgrade(doc: dict) -> dict | None:
    """The hot upgrade of a current.json document for this machine's process
    group (``hot_upgrade_for_group``); a malformed one raises."""
    hot = doc.get("hot_upgrade")
    if isinstance(hot, dict):
        hot = hot_upgrade_for_group(doc, os.environ.get("FLY_PROCESS_GROUP"))
    if hot is None:
        return None
    if not isinstance(hot, dict) or not all(isinstance(hot.get(k), str) for k in ("version", "tarball_url")):
        raise FlyDeployError("malformed release metadata: current.json's hot_upgrade lacks version or "
                             "tarball_url; push the hot upgrade again, or cold deploy to reset it")
    return hot


def _catch_up_machine(store: Store, app: str, hot: dict, *, given_up: threading.Event | None = None) -> str:
    """Bring this machine and this process to the recorded hot upgrade ``hot``.

    The first process to get here downloads and installs the files, and it
    and every other agent apply them (``_upgrade_machine``); everyone else
    finds the state file current and only reloads its own changed modules.
    Returns ``applied`` when this call installed the files, else
    ``up_to_date`` (also when the machine installed a later release: a stale
    read never rolls back).
    """
    if _same_release(_held, hot):
        return "up_to_date"  # this process loaded it (its agent caught up at start): so did the machine
    release = _release_of(hot, os.environ.get("FLY_IMAGE_REF"))
    store, key = _store_for_url(hot["tarball_url"], store)
    try:
        run = _upgrade_machine(app, store, key, hot.get("sha256"), deployed_at=hot.get("deployed_at"),
                               suspend_timeout=_DEFAULT_SUSPEND_TIMEOUT, in_process=True, unless_installed=release,
                               given_up=given_up)
    except _Superseded as exc:
        log.info("flydeploy: %s", exc)
        return "up_to_date"
    if run is None:
        with _machine_lock(app, shared=True):
            report = _apply_here(release)
        if not report["ok"]:
            raise _LoadFailed(f"this process could not load hot upgrade {release['version']}: {report['error']}")
        return "up_to_date"
    if not run.committed:
        failures = [f"process {entry['pid']}: {_reply_error(entry)}" for entry in run.entries
                    if not (entry.get("reply") or {}).get("ok")]
        raise _LoadFailed(f"hot upgrade {release['version']} was not loaded by every process of this machine, "
                          f"so it was taken off the disk again: {'; '.join(failures)}")
    return "applied"


def _reconcile(store: Store, app: str, image_ref: str, *,
               given_up: threading.Event | None = None) -> tuple[str, str | None, str | None]:
    """One boot-time pass over current.json; returns ``(status, version, etag of what was read)``.

    Once ``given_up`` is set, it stops before writing anything."""
    doc, etag = read_current(store, app)
    if given_up is not None and given_up.is_set():
        raise _StartupLate
    status = "up_to_date"
    if doc is None or doc.get("image_ref") != image_ref:
        # Conditional on what is there when writing: a machine of this image
        # that got in first (or a hot upgrade recorded for it) is kept.
        # The image's dependency files are in the directory init starts the app in
        # (its WORKDIR), as they were in the build context: recorded for `hot --direct`.
        try:
            dependencies = dependency_fingerprint(os.getcwd())
        except OSError:  # no working directory left: nothing to record, the catch-up goes on
            dependencies = None
        doc = update_current(store, app, lambda found: found if found and found.get("image_ref") == image_ref
                             else _fresh_current(image_ref, dependencies))
        status, etag = "reset", None
    hot = _current_hot_upgrade(doc)
    if hot is None:
        return status, None, etag
    return _catch_up_machine(store, app, hot, given_up=given_up), hot["version"], etag


def _seconds_setting(value: float | None, variable: str, what: str, example: str) -> float | None:
    """``value``, else the environment variable ``variable``, as positive seconds; None when neither is set."""
    if value is None:
        raw = os.environ.get(variable, "").strip()
        if not raw:
            return None
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{variable}={raw!r} is not a number of seconds; "
                              f"set it to e.g. {example}, or unset it") from None
    if not _is_positive_seconds(value):
        raise ConfigError(f"the {what} must be a positive number of seconds, not {value!r}")
    return float(value)


def _poll_interval(poll_interval: float | None) -> float | None:
    return _seconds_setting(poll_interval, "FLYDEPLOY_POLL_INTERVAL", "poll interval", "30")


def _reconcile_within(deadline: float, store: Store, app: str, image_ref: str,
                      ) -> tuple[str, str | None, str | None]:
    """``_reconcile`` bounded by ``deadline`` (monotonic seconds).  Past it this raises and the
    pass is given up: a storage call that answers later changes nothing on this machine."""
    outcome: list = []
    given_up = threading.Event()

    def run() -> None:
        try:
            outcome.append(_reconcile(store, app, image_ref, given_up=given_up))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    worker = threading.Thread(target=run, name=f"flydeploy-startup[{app}]", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if not outcome:
        given_up.set()
        raise _StartupLate
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


class _StartupLate(FlyDeployError):
    """The boot-time pass did not end within the startup deadline."""


class _Poller:
    """Polls current.json (conditional GETs) and applies a hot upgrade for this image that the machine missed."""

    def __init__(self, store: Store, app: str, image_ref: str, interval: float, etag: str | None) -> None:
        self.store, self.app, self.image_ref, self.interval = store, app, image_ref, interval
        self.polls = 0
        self.caught_up_at_poll: int | None = None
        self._etag = etag
        self._failed: dict | None = None
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
        """Check current.json once (a conditional GET: no body while it is unchanged) and catch up when needed."""
        self.polls += 1
        _recover_left_work(self.app)
        got = read_current(self.store, self.app, if_none_match=self._etag)
        if got is None:
            return
        doc, etag = got
        hot = _current_hot_upgrade(doc) if doc is not None and doc.get("image_ref") == self.image_ref else None
        # A release this process failed to load is not retried: it would fail the same way.
        if hot is not None and not _same_release(_held, hot) and not _same_release(self._failed, hot):
            try:
                status = _catch_up_machine(self.store, self.app, hot)
            except _LoadFailed:
                self._failed = hot
                self._etag = etag
                raise
            self.caught_up_at_poll = self.polls
            log.info("flydeploy: poller: %s %s", status, hot["version"])
        self._etag = etag

    def stop(self) -> None:
        """Stop polling."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


def stop_poller() -> None:
    """Stop this process's poller, if ``startup_reapply_current`` started one."""
    global _poller
    poller, _poller = _poller, None
    if poller is not None:
        poller.stop()


def _outcome(status: str, *, error: str | None = None, version: str | None = None, agent: str | None = None,
             agent_error: str | None = None, started: float | None = None) -> dict:
    return {"status": status, "error": error, "version": version, "agent": agent, "agent_error": agent_error,
            "duration_ms": 0.0 if started is None else round((time.perf_counter() - started) * 1000, 3)}


def _recover_left_work(app: str) -> None:
    """Before anything else at boot, and at each poll: what a stopped upgrade left on disk is finished
    or undone, and a prepared staging that expired or was made before the machine restarted is discarded."""
    try:
        directory = _app_dir(app, create=False)
        if directory is not None and os.path.exists(os.path.join(directory, _JOURNAL_FILE)):
            with _machine_lock(app, timeout=_SETTLE_WAIT):
                _recover_and_resync(app, exclude_pid=os.getpid(), keep_prepared=True)
    except FlyDeployError as exc:
        log.error("flydeploy: could not recover what a stopped upgrade of %s left: %s", app, exc)


def startup_reapply_current(app: str | None = None, *, poll_interval: float | None = None,
                            agent: bool = True, store: Store | None = None, deadline: float | None = None) -> dict:
    """Make this process (and machine) run the release recorded for its image; call it early at boot.

    ``app`` defaults to ``FLY_APP_NAME``; ``store`` to ``S3.from_env()``.
    Starts tracking and, with ``agent``, this process's agent.  Never raises
    for an operational problem: returns ``{"status", "error", "version",
    "agent", "agent_error", "duration_ms"}`` (``agent`` is the socket path),
    where status is ``applied`` (a recorded hot upgrade was loaded),
    ``up_to_date``, ``reset`` (no metadata, or metadata of another image
    after a cold deploy: rewritten for this image, the stale hot upgrade
    never applied), ``skipped`` (no ``FLY_IMAGE_REF``: local development) or
    ``error`` (the app continues on the image's code).  With nothing pending
    it costs one metadata GET.  ``poll_interval`` (or
    ``FLYDEPLOY_POLL_INTERVAL``, seconds) starts a thread that applies hot
    upgrades this machine missed (:func:`stop_poller` stops it); a bad value
    is reported in ``error`` and the catch-up still runs.  An agent that
    cannot start is reported in ``agent_error`` and the catch-up still runs.

    It returns within ``deadline`` seconds (or ``FLYDEPLOY_STARTUP_DEADLINE``,
    default 5): storage that does not answer by then leaves the app on the
    image's code, with the reason in ``error`` and the log; the poller, when
    enabled, catches up later.

    A machine still on an older image that boots after a cold deploy resets
    the metadata to its own image, which drops a hot upgrade recorded for the
    new image: the new image's machines then run its own code until the next
    hot upgrade.  Finish rolling out a cold deploy before hot upgrading it.
    """
    global _poller
    if getattr(_reloading, "active", False):
        # The call that loaded this code is the one that counts.
        return _outcome("up_to_date", version=(_held or {}).get("version"),
                        agent=_agent.path if _agent is not None else None)
    started = time.perf_counter()
    status, version, error, agent_path, agent_error, config_error = "error", None, None, None, None, None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
    interval = None
    try:
        try:
            limit = _seconds_setting(deadline, "FLYDEPLOY_STARTUP_DEADLINE", "startup deadline", "5")
        except ConfigError as exc:
            limit, config_error = None, str(exc)
            log.error("flydeploy: %s; using the default startup deadline", exc)
        limit = limit or _DEFAULT_STARTUP_DEADLINE
        ends = time.monotonic() + limit
        app = _adopt_app(app)
        _recover_left_work(app)
        if agent:
            try:
                agent_path = start_agent(app).path
            except Exception as exc:  # the catch-up below needs no agent
                agent_error = _scrub(str(exc) or repr(exc), endpoint)
                log.error("flydeploy: %s runs without an agent, so hot upgrades cannot reach it: %s", app,
                          agent_error)
        try:
            interval = _poll_interval(poll_interval)
        except ConfigError as exc:
            config_error = str(exc)
            log.error("flydeploy: no poller for %s: %s", app, exc)
        image_ref = os.environ.get("FLY_IMAGE_REF")
        if not image_ref:
            status, error = "skipped", "FLY_IMAGE_REF is not set (local development): nothing to reapply"
        else:
            store = store if store is not None else S3.from_env()
            etag = None
            try:
                status, version, etag = _reconcile_within(ends, store, app, image_ref)
            finally:
                if interval and _poller is None:
                    _poller = _Poller(store, app, image_ref, interval, etag)
    except _StartupLate:
        status, error = "error", (f"the storage did not answer within the startup deadline of {limit:g} s "
                                  "(FLYDEPLOY_STARTUP_DEADLINE): booting on the image's code; "
                                  + ("the poller catches up later" if interval else
                                     "the next hot upgrade or restart catches up"))
        log.error("flydeploy: startup reapply of %s: %s", app, error)
    except Exception as exc:  # boot must go on with the image's code
        status, error = "error", _scrub(str(exc) or repr(exc), endpoint)
        log.error("flydeploy: startup reapply of %s failed, continuing on the image's code: %s", app, error)
    outcome = _outcome(status, error="; ".join(filter(None, (error, config_error))) or None, version=version,
                       agent=agent_path, agent_error=agent_error, started=started)
    if status != "error":
        log.info("flydeploy: startup reapply of %s: %s%s", app, status, f" {version}" if version else "")
    return outcome


# The state file already checked against the loaded modules: (state, info).
_info_checked: tuple[dict, dict] | None = None


def get_current_hot_upgrade_info(app: str | None = None) -> dict:
    """What hot upgrade this process runs.

    ``{"hot_upgrade_applied": False}``, or ``{"hot_upgrade_applied": True,
    "version", "source_image_ref", "deployed_at", "current_image_ref"}``.  A
    process that started after its machine installed a hot upgrade reports
    that upgrade (from the machine's state file for ``app``, default the
    agent's app or ``FLY_APP_NAME``), once its loaded modules are found to be
    that release's (checked once per installed release).
    """
    global _info_checked
    held = _held
    app = app or (_agent.app if _agent is not None else None) or os.environ.get("FLY_APP_NAME")
    if held is None and app:
        state = _read_state(app)
        if _for_this_image(state):
            checked = _info_checked
            if checked is None or checked[0] != state:
                checked = _info_checked = (state, state if not modified_modules() else {})
            held = checked[1]
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


def preflight_report(app: str, *, store_check: bool = False, bucket: str | None = None) -> dict:
    """What ``rpc preflight`` prints: how this machine runs flydeploy (interpreter,
    version, the script's path), its agents, and with ``store_check`` whether the
    bucket is reachable with this machine's credentials and what current.json says."""
    replies = _ask_agents(app, {"op": "ping"}, timeout=_QUERY_TIMEOUT)
    errors = [f"pid {e['pid']}: {e.get('error') or (e.get('reply') or {}).get('error')}"
              for e in replies if not (e.get("reply") or {}).get("ok")]
    report: dict[str, Any] = {
        "flydeploy": __version__, "python": sys.executable, "python_version": sys.version.split()[0],
        "script": os.path.abspath(__file__), "uid": os.geteuid(), "cwd": os.getcwd(),
        "machine_id": os.environ.get("FLY_MACHINE_ID"), "image_ref": os.environ.get("FLY_IMAGE_REF"),
        "agents": len(replies), "agents_ok": len(replies) - len(errors), "agent_errors": errors,
        "fly_api_token_set": bool(os.environ.get("FLY_API_TOKEN", "").strip())}
    if store_check:
        report["store"] = _store_check(app, bucket)
    return report


def _store_check(app: str, bucket: str | None) -> dict:
    """The bucket as this machine reaches it: endpoint, addressing, and current.json's record."""
    try:
        store = S3.from_env(bucket=bucket)
        doc, _etag = read_current(store, app)
    except FlyDeployError as exc:
        return {"ok": False, "error": _scrub(str(exc), os.environ.get("AWS_ENDPOINT_URL_S3"))}
    hot = (doc or {}).get("hot_upgrade") or {}
    # How the client addresses the bucket: its own ``addressing_style`` where it chooses one
    # (virtual-hosted or path), else path style, the only one it speaks.
    addressing = getattr(store, "addressing_style", None) or "path"
    return {"ok": True, "endpoint": store.endpoint, "bucket": store.bucket, "addressing": addressing,
            "current_found": doc is not None, "image_ref": (doc or {}).get("image_ref"),
            "hot_upgrade": hot.get("version")}


def _rpc_preflight(args: argparse.Namespace) -> int:
    report = preflight_report(args.app, store_check=args.store, bucket=args.bucket)
    print(json.dumps(report, sort_keys=True))
    store_ok = not args.store or report["store"]["ok"]
    return 0 if report["agents"] and report["agents_ok"] == report["agents"] and store_ok else 1


# Job markers and logs older than this are removed when the next job starts.
_JOB_KEEP_S = 86400.0


def _job_marker(app: str, job: str, upgrade_id: str) -> str:
    """The marker of a detached job, after removing those of jobs long finished."""
    directory = _work_dir(app)
    now = time.time()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if name.startswith("job-") and now - os.lstat(path).st_mtime > _JOB_KEEP_S:
                os.unlink(path)
    return os.path.join(directory, f"job-{job}-{upgrade_id}.json")


def _start_detached(args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``rpc <command> --detach``: start ``run(args)`` in the background and return at once,
    or with ``--wait S`` as soon as it has its result, at most ``S`` seconds later.

    The command and the upgrade id name the job: a second start of the same
    one (an exec retried after a lost reply) finds its marker and starts
    nothing.  The job is this process, forked (no second interpreter to start)
    into a session of its own with its output in a log next to the marker, so
    that the exec's pipes close when this command returns; what it reports
    goes to a result object, which the orchestrator collects (``_ResultBoard``).
    A job that has its result within the wait hands the result line over on a
    pipe (``_hand_over``) before it stores the object, and this command prints
    it, so that the exec that started it brings it back at once and nothing
    needs to be collected.  A job that ends without handing one over has its
    log read for it.  Any machine-side phase that may outlast an exec runs this way.
    """
    global _result_pipe
    marker = _job_marker(args.app, args.rpc_command, args.upgrade_id)
    try:
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(json.dumps({"detached": True, "started": False, "upgrade_id": args.upgrade_id}))
        return 0
    log_path = marker[:-5] + ".log"
    # The hand-over pipe, when this command waits for the result.
    handed, hand = os.pipe() if args.wait else (None, None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the job
        code = 1
        try:
            os.setsid()
            if handed is not None:
                os.close(handed)
            _result_pipe = hand
            output = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(output, 1)
            os.dup2(output, 2)
            os.close(fd)
            code = run(argparse.Namespace(**{**vars(args), "detach": False}))
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    with os.fdopen(fd, "w") as handle:
        json.dump({"pid": pid, "upgrade_id": args.upgrade_id, "started_at": _iso_utc(_utc_now())}, handle)
    print(json.dumps({"detached": True, "started": True, "upgrade_id": args.upgrade_id, "pid": pid}), flush=True)
    if handed is None:
        return 0  # at once, even when the job has already ended: its result is collected
    os.close(hand)
    with os.fdopen(handed, "rb", buffering=0) as pipe:
        result, ended = _await_hand_over(pipe, args.wait)
    if result is None and ended:  # the job ended without handing a result over: its log may hold one
        os.waitpid(pid, 0)
        with contextlib.suppress(OSError), open(log_path, encoding="utf-8", errors="replace") as output:
            result = parse_result_marker(output.read())
    if result is not None:
        print(_result_line(result), flush=True)
    return 0


def _await_hand_over(pipe: BinaryIO, wait: float) -> tuple[dict | None, bool]:
    """What a job hands over on ``pipe`` within ``wait`` seconds: ``(its result or None, whether
    the pipe closed without one)``; it waits on the pipe itself, never polling."""
    deadline = time.monotonic() + wait
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([pipe], [], [], left)[0]:
            return None, False
        chunk = pipe.read(1 << 16)
        if not chunk:
            return parse_result_marker(data.decode("utf-8", "replace")), True
        data += chunk
        result = parse_result_marker(data.decode("utf-8", "replace"))
        if result is not None:
            return result, False


def _run_machine_command(args: argparse.Namespace, run: Callable[[argparse.Namespace], int],
                         work: Callable[[], Mapping[str, Any]], failed: Callable[[str], Mapping[str, Any]],
                         success_line: Callable[[Mapping[str, Any]], str]) -> int:
    """An ``rpc`` command that reports one result: detached with ``--detach`` (``run`` is the
    command itself), else ``work()`` with its log on stdout, a line saying how it ended and the
    result line.  ``failed(error)`` is the result of a run that raised unexpectedly."""
    if args.detach:
        if not args.upgrade_id:
            raise ConfigError(f"rpc {args.rpc_command} --detach needs --upgrade-id: the result object is found by it")
        return _start_detached(args, run)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        result = work()
    except ConfigError:
        raise  # bad usage: exit 2, no result
    except Exception as exc:  # the orchestrator still gets its one result line
        log.error("flydeploy: unexpected error", exc_info=True)
        result = failed(_scrub(f"unexpected error: {exc!r}", getattr(args, "url", None)))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    print(success_line(result) if result["success"] else f"{args.rpc_command} failed: {result['error']}")
    print(_result_line(result), flush=True)
    return 0 if result["success"] else 1


def _rpc_upgrade(args: argparse.Namespace) -> int:
    _check_deployed_at(args.deployed_at)  # before a detached job starts: bad usage exits 2 here
    started = time.monotonic()
    return _run_machine_command(
        args, _rpc_upgrade,
        lambda: hot_upgrade(args.url, args.app, sha256=args.sha256, suspend_timeout=args.suspend_timeout,
                            upgrade_id=args.upgrade_id, deployed_at=args.deployed_at),
        lambda error: _machine_result([], version=None, started=started, error=error),
        lambda result: (f"upgraded {result['processes_succeeded']} processes to {result['version']}: "
                        f"{result['modules_reloaded']} modules, suspended {result['suspend_duration_ms']:.0f} ms"))


def _rpc_prepare(args: argparse.Namespace) -> int:
    return _run_machine_command(
        args, _rpc_prepare,
        lambda: prepare_release(args.app, url=args.url, sha256=args.sha256, upgrade_id=args.upgrade_id,
                                expires_in=args.expires_in, revert=args.revert),
        lambda error: _prepare_result(None, upgrade_id=args.upgrade_id, error=error),
        lambda result: (f"prepared {result['version'] or 'the revert'} in {len(result['processes'])} processes: "
                        f"{result['files_to_write']} files staged, until {result['expires_at']}"))


def _rpc_apply(args: argparse.Namespace) -> int:
    _check_deployed_at(args.deployed_at, args.revert)  # before a detached job starts: bad usage exits 2 here
    started = time.monotonic()
    return _run_machine_command(
        args, _rpc_apply,
        lambda: apply_release(args.app, url=args.url, sha256=args.sha256, upgrade_id=args.upgrade_id,
                              revert=args.revert, suspend_timeout=args.suspend_timeout,
                              health_check=args.health_check, health_ports=args.health_port or (),
                              health_timeout=args.health_timeout, deployed_at=args.deployed_at),
        lambda error: {**_machine_result([], version=None, started=started, error=error),
                       "upgrade_id": args.upgrade_id, "notes": [], "applied": False, "health": None},
        lambda result: (f"applied {result['version'] or 'the revert'} in {result['processes_succeeded']} processes: "
                        f"{result['modules_reloaded']} modules, suspended {result['suspend_duration_ms']:.0f} ms"))


def _rpc_discard(args: argparse.Namespace) -> int:
    print(discard_prepared(args.app, args.upgrade_id))
    return 0


def _release_url(text: str) -> str:
    if urllib.parse.urlsplit(text).scheme not in ("http", "https", "file"):
        raise argparse.ArgumentTypeError(f"{_redact_url(text)!r} is not a release URL: give the https:// URL "
                                         "of the uploaded tarball, or a file:// URL of a local store")
    return text


def _upgrade_id(text: str) -> str:
    try:
        return _check_name("upgrade id", text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


_DEPLOYED_AT_HELP = ("when current.json recorded the release (its deployed_at, as the orchestrator knows it); "
                     "default: read from current.json")


def _add_rpc_parser(commands: argparse._SubParsersAction) -> None:
    rpc = commands.add_parser("rpc", help="talk to the agents of this machine (what exec runs)",
                              description="Talk to the flydeploy agents of the app's processes on this machine.")
    rpc_commands = rpc.add_subparsers(dest="rpc_command", metavar="RPC", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--app", required=True, help="the Fly app name")
    # What a machine-side phase that may outlast an exec takes (``_start_detached``).
    detached = argparse.ArgumentParser(add_help=False)
    detached.add_argument("--detach", action="store_true",
                          help="run in the background and return at once; the result is only stored (needs "
                               "--upgrade-id; a second start of the same upgrade id starts nothing)")
    detached.add_argument("--wait", type=_number_argument("seconds"), metavar="S",
                          help="with --detach: return as soon as it has its result, with its result line, or "
                               "after S seconds at most (then the result is only stored)")
    upgrade = rpc_commands.add_parser("upgrade", parents=[common, detached],
                                      help="install a release and upgrade every process")
    upgrade.add_argument("--url", required=True, type=_release_url,
                         help="URL of the release tarball (https:// or file://)")
    upgrade.add_argument("--sha256", help="expected sha256 of the tarball")
    upgrade.add_argument("--suspend-timeout", type=_number_argument("seconds"), default=_DEFAULT_SUSPEND_TIMEOUT, metavar="S",
                         help="seconds servers may take to reach a safe point (default 10)")
    upgrade.add_argument("--upgrade-id", type=_upgrade_id,
                         help="where the result is stored: releases/<app>-results/<upgrade-id>/ "
                              "(default: the --sha256, else a fresh id)")
    upgrade.add_argument("--deployed-at", metavar="ISO", help=_DEPLOYED_AT_HELP)
    upgrade.set_defaults(handler=_rpc_upgrade)
    phases = argparse.ArgumentParser(add_help=False, parents=[common, detached])
    release = phases.add_mutually_exclusive_group(required=True)
    release.add_argument("--url", type=_release_url, help="URL of the release tarball (https:// or file://)")
    release.add_argument("--revert", type=_upgrade_id, metavar="UPGRADE_ID",
                         help="instead of a release: what this machine ran before the apply of UPGRADE_ID")
    phases.add_argument("--sha256", help="expected sha256 of the tarball")
    phases.add_argument("--upgrade-id", type=_upgrade_id, required=True,
                        help="names the staging, the job and the results: releases/<app>-results/<upgrade-id>/")
    prepare = rpc_commands.add_parser("prepare", parents=[phases],
                                      help="phase 1: stage a release and have every process plan it; nothing "
                                           "live changes")
    prepare.add_argument("--expires-in", type=_number_argument("seconds"), default=_DEFAULT_PREPARED_TTL,
                         metavar="S", help="discard the staging if no apply comes within S seconds (default 600)")
    prepare.set_defaults(handler=_rpc_prepare)
    apply = rpc_commands.add_parser("apply", parents=[phases],
                                    help="phase 2: publish the prepared release and apply it in every process")
    apply.add_argument("--suspend-timeout", type=_number_argument("seconds"), default=_DEFAULT_SUSPEND_TIMEOUT,
                       metavar="S", help="seconds servers may take to reach a safe point (default 10)")
    apply.add_argument("--health-check", metavar="PATH",
                       help="then GET http://127.0.0.1:<port>PATH on each --health-port: 2xx or the apply failed")
    apply.add_argument("--health-port", type=_checked_argument(_port_problem, int), action="append",
                       metavar="PORT",
                       help="a port the app listens on, on 127.0.0.1 (repeatable)")
    apply.add_argument("--health-timeout", type=_number_argument("seconds"), default=_DEFAULT_HEALTH_TIMEOUT,
                       metavar="S", help="seconds each health check may take (default 5)")
    apply.add_argument("--deployed-at", metavar="ISO", help=_DEPLOYED_AT_HELP + " (with --url)")
    apply.set_defaults(handler=_rpc_apply)
    discard = rpc_commands.add_parser("discard", parents=[common],
                                      help="drop the staging of an upgrade id, if this machine holds it")
    discard.add_argument("--upgrade-id", type=_upgrade_id, required=True, help="the upgrade whose staging to drop")
    discard.set_defaults(handler=_rpc_discard)
    preflight = rpc_commands.add_parser("preflight", parents=[common],
                                        help="print, as JSON, how this machine runs flydeploy and its agents")
    preflight.add_argument("--store", action="store_true",
                           help="also check the bucket with this machine's credentials")
    preflight.add_argument("--bucket", help="the bucket (default: BUCKET_NAME)")
    preflight.set_defaults(handler=_rpc_preflight)
    for name, text in (("info", "print every process's info as JSON"), ("ping", "check every agent answers")):
        query = rpc_commands.add_parser(name, parents=[common], help=text)
        query.add_argument("--timeout", type=_number_argument("seconds"), default=_QUERY_TIMEOUT, metavar="S",
                           help="seconds to wait for each agent (default 10)")
        query.set_defaults(handler=_rpc_query)


def _entry_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flydeploy",
                                     description="flydeploy's machine-side commands.")
    parser.add_argument("--version", action="version", version=f"flydeploy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_rpc_parser(commands)
    _add_orchestrate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m flydeploy``; returns the process exit code (2 for bad usage)."""
    if argv is None:
        # A process started for this command line runs no application code: nothing to track,
        # and what it has imported lives until it exits, so its collections and its exit's (and
        # those of the job and guardian it forks, ``_start_detached``) skip it.  Frozen objects
        # are hidden from gc.get_referrers, so never in a process that may run the engine.
        _tracker.uninstall()
        gc.freeze()
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
