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
import functools
import hashlib
import hmac
import logging
import sys
import urllib.parse
from collections.abc import Iterable
from collections.abc import Mapping
from typing import NamedTuple

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
    "sign_request",
    "presign_url",
    # 1. Storage: local directory store
    # 2. Releases
    # 3. Machines API
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

_SIGV4_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_DEFAULT_PORT_SUFFIX = {"http": ":80", "https": ":443"}
_MAX_PRESIGN_EXPIRES_S = 7 * 24 * 3600


def _amz_date(now: datetime.datetime | None) -> str:
    """``now`` (an aware datetime, the current time when None) as ``YYYYMMDDTHHMMSSZ``."""
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
    elif now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("the signing time must be an aware datetime (e.g. datetime.now(timezone.utc))")
    return now.astimezone(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _host_header(scheme: str, netloc: str) -> str:
    """The Host header for a URL: lower-cased, the port kept only when not the scheme's default."""
    host = netloc.rpartition("@")[2].lower()
    default = _DEFAULT_PORT_SUFFIX.get(scheme.lower())
    if default and host.endswith(default):
        host = host[: -len(default)]
    return host


def _canonical_uri(path: str) -> str:
    """The S3 canonical URI: percent-decoded, then every byte outside ``A-Za-z0-9-_.~/`` encoded once."""
    return urllib.parse.quote(urllib.parse.unquote_to_bytes(path), safe="/") if path else "/"


def _canonical_query(query: str) -> str:
    """Query pairs decoded, strictly re-encoded and sorted by name then value (``acl`` -> ``acl=``)."""
    if not query:
        return ""
    quote, unquote = urllib.parse.quote, urllib.parse.unquote_to_bytes
    pairs = []
    for part in query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((quote(unquote(name), safe=""), quote(unquote(value), safe="")))
    pairs.sort()
    return "&".join([f"{name}={value}" for name, value in pairs])


def _canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header list): names lower-cased and sorted, values
    trimmed with inner whitespace collapsed, repeated names joined with commas."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(" ".join(str(value).split()))
    names = sorted(merged)
    block = "".join([f"{name}:{','.join(merged[name])}\n" for name in names])
    return block, ";".join(names)


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
    signature = hmac.new(key, string_to_sign.encode(), "sha256").hexdigest()
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
    parts = urllib.parse.urlsplit(url)
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    if not any(name.strip().lower() == "host" for name, _ in pairs):
        pairs.append(("host", _host_header(parts.scheme, parts.netloc)))
    added = {"X-Amz-Date": _amz_date(now), "X-Amz-Content-Sha256": payload_hash}
    if session_token:
        added["X-Amz-Security-Token"] = session_token
    pairs.extend(added.items())
    signed = _sign(method, parts.path, parts.query, pairs, payload_hash=payload_hash,
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
    parts = urllib.parse.urlsplit(url)
    amz_date = _amz_date(now)
    auth_params = [("X-Amz-Algorithm", _SIGV4_ALGORITHM),
                   ("X-Amz-Credential", f"{access_key}/{amz_date[:8]}/{region}/{service}/aws4_request"),
                   ("X-Amz-Date", amz_date),
                   ("X-Amz-Expires", str(expires)),
                   ("X-Amz-SignedHeaders", "host")]
    if session_token:
        auth_params.append(("X-Amz-Security-Token", session_token))
    auth_query = urllib.parse.urlencode(auth_params, quote_via=urllib.parse.quote, safe="")
    query = f"{parts.query}&{auth_query}" if parts.query else auth_query
    signed = _sign(method, parts.path, query, [("host", _host_header(parts.scheme, parts.netloc))],
                   payload_hash=payload_hash, secret_key=secret_key, region=region,
                   service=service, amz_date=amz_date)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/",
                                    f"{query}&X-Amz-Signature={signed.signature}", ""))


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
