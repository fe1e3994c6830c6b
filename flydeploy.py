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

import datetime
import email.utils
import http.client
import json
import logging
import os
import random
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass

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
    "Machines",
    "ExecResult",
    "MachinesAPIError",
    "authorization_header",
    # 3. Fleet orchestration
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

_DEFAULT_FLAPS_BASE_URL = "https://api.machines.dev"
_MACAROON_PREFIXES = ("fm1r_", "fm1a_", "fm2_")
_RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
# Seconds between two exec requests to one machine: the Machines API allows one a
# second; the margin keeps network jitter from making two arrive closer than that.
_EXEC_INTERVAL = 1.1
# A Retry-After longer than this is not waited out: the caller sees the error.
_MAX_RETRY_AFTER = 60.0


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


def _machines_error_hint(status: int) -> str:
    if status in (401, 403):
        return ("; check that FLY_API_TOKEN (or FLYDEPLOY_API_TOKEN) holds a valid token for this"
                " app, e.g. from `fly tokens create deploy`")
    if status == 404:
        return "; check the app name and the machine id (`fly machines list`)"
    if status == 0:
        return "; check the network and FLY_FLAPS_BASE_URL"
    return ""


@dataclass(frozen=True)
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
    """Spaces out events per key: at most one per ``interval`` seconds.

    Each caller reserves its own slot under the lock and sleeps outside it,
    so callers on different keys never wait for one another.
    """

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next: dict[object, float] = {}
        self._lock = threading.Lock()

    def wait(self, key: object) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(key, now))
            self._next[key] = slot + self._interval
        if slot > now:
            time.sleep(slot - now)


# One pacer for the process: two clients of the same app share the limit.
_EXEC_PACER = _Pacer(_EXEC_INTERVAL)


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

    def exec(self, machine_id: str, command: Sequence[str], *, timeout: int = 30) -> ExecResult:
        """Run ``command`` (an argv list) on a machine and return its result.

        A command that fails is a result with a non-zero ``exit_code``, not
        an error; errors are for requests the API refused or never answered.
        """
        if isinstance(command, str) or not command or not all(isinstance(a, str) for a in command):
            raise FlyDeployError(f"exec takes a non-empty list of argument strings, got {command!r}; "
                                 'e.g. ["python3", "-m", "flydeploy", "rpc", "info"]')
        timeout = int(timeout)
        payload = self._call("POST", self._machine_path(machine_id) + "/exec",
                             body={"command": list(command), "timeout": timeout},
                             timeout=timeout + self._request_timeout,
                             pace=(self.base_url, self.app, machine_id))
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
                          timeout=timeout + self._request_timeout, retry_statuses=_RETRYABLE_STATUSES - {408})

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
        return text.replace(self._secret, "[redacted]") if self._secret else text

    def _call(self, method: str, path: str, *, query: Sequence[tuple[str, str]] = (),
              body: object = None, timeout: float | None = None, pace: object = None,
              lease_nonce: str | None = None,
              retry_statuses: frozenset[int] = _RETRYABLE_STATUSES) -> object:
        """One API call with retries; returns the decoded JSON (or raw bytes)."""
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
            except (OSError, http.client.HTTPException) as exc:
                if last_try:
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
                if (last_try or status not in retry_statuses
                        or (retry_after is not None and retry_after > _MAX_RETRY_AFTER)):
                    raise MachinesAPIError(status, message, method=method, path=shown_path)
                log.info("Machines API %s %s: %d %s, retrying", method, shown_path, status, message)
            time.sleep(self._backoff_delay(attempt, retry_after))
            attempt += 1

    def _backoff_delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        return min(self._backoff * (2 ** attempt), 10.0) * (0.5 + random.random() / 2)

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
