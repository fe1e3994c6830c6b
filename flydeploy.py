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

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import functools
import hashlib
import hmac
import http.client
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import BinaryIO
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
    "S3",
    # 1. Storage: local directory store
    # 2. Releases
    # 3. Machines API
    "Machines",
    "ExecResult",
    "MachinesAPIError",
    "authorization_header",
    # 3. Fleet orchestration
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
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_IO_CHUNK = 1 << 20
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


class _TruncatedBody(Exception):
    """A response body ended before its Content-Length (the connection was cut)."""


class _Retryable(Exception):
    """One attempt failed in a way another attempt may not (wraps the last error)."""

    def __init__(self, error: S3Error) -> None:
        super().__init__(str(error))
        self.error = error


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

    Path-style URLs (``<endpoint>/<bucket>/<key>``), SigV4 on every request,
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
                 timeout: float = 30) -> None:
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
        self.endpoint = urllib.parse.urlunsplit((parts.scheme, parts.netloc,
                                                 parts.path.rstrip("/"), "", ""))
        self.bucket = bucket
        self.access_key = access_key
        self.region = region
        self.timeout = timeout
        self._secret_key = secret_key
        self._session_token = session_token
        self._parts = parts
        self._host = _host_header(parts.scheme, parts.netloc)
        self._bucket_path = f"{parts.path.rstrip('/')}/{urllib.parse.quote(bucket, safe='')}"
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._local = threading.local()

    @classmethod
    def from_env(cls, bucket: str | None = None) -> S3:
        """A client configured like the AWS tools and the Fly platform configure them.

        Reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (both required),
        ``AWS_SESSION_TOKEN`` (optional), ``AWS_ENDPOINT_URL_S3`` (default Tigris),
        ``AWS_REGION`` (default ``auto``) and ``BUCKET_NAME`` (required unless ``bucket``
        is given).  Raises ``ConfigError`` naming every missing variable at once.
        """
        env = {name: os.environ.get(name, "").strip() for name in (
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "BUCKET_NAME")}
        bucket = bucket or env["BUCKET_NAME"]
        missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env[name]]
        if not bucket:
            missing.append("BUCKET_NAME")
        if missing:
            raise ConfigError(
                f"missing environment variable(s) {', '.join(missing)}: set them (`fly storage "
                "create` prints them)" + ("; the bucket may also be given as [tool.flydeploy] "
                                          "bucket in pyproject.toml" if not bucket else ""))
        return cls(env["AWS_ENDPOINT_URL_S3"] or _DEFAULT_S3_ENDPOINT, bucket,
                   env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                   region=env["AWS_REGION"] or "auto",
                   session_token=env["AWS_SESSION_TOKEN"] or None)

    def __repr__(self) -> str:
        return f"S3(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # -- public operations --

    def url(self, key: str) -> str:
        """The object's plain (unsigned) path-style URL."""
        return f"{self._parts.scheme}://{self._parts.netloc}{self._key_path(key)}"

    def presigned_url(self, key: str, *, method: str = "GET", expires: int = 3600) -> str:
        """A presigned URL for ``key``: anyone holding it may ``method`` it for ``expires`` s."""
        return presign_url(method, self.url(key), access_key=self.access_key,
                           secret_key=self._secret_key, region=self.region, expires=expires,
                           session_token=self._session_token)

    def put(self, key: str, data: bytes | bytearray | memoryview | str | os.PathLike, *,
            content_type: str | None = None, if_none_match: str | None = None,
            if_match: str | None = None) -> str:
        """Store ``data`` (bytes, or the path of a file to stream) under ``key``; return its ETag.

        ``if_none_match="*"`` creates the object only if it does not exist yet and
        ``if_match=<etag>`` replaces it only if it is still that version; either raises
        ``PreconditionFailed`` otherwise.  A file is hashed in a first pass and then
        streamed, so memory use does not grow with its size.
        """
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if if_none_match:
            headers["If-None-Match"] = if_none_match
        if if_match:
            headers["If-Match"] = if_match
        if isinstance(data, (bytes, bytearray, memoryview)):
            body: bytes | _FileBody = bytes(data)
            payload_hash = hashlib.sha256(body).hexdigest()
        elif isinstance(data, (str, os.PathLike)):
            body = _FileBody(os.fspath(data))
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

    def get_json(self, key: str) -> tuple[Any, str]:
        """The object parsed as JSON, with its ETag (for a later ``if_match``)."""
        data, etag = self._get(key)
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
        it is still that version, else ``PreconditionFailed``."""
        self._call("DELETE", key, headers={"If-Match": if_match} if if_match else None)

    def list(self, prefix: str = "", *, page_size: int = 1000) -> Iterator[str]:
        """Every key that starts with ``prefix``, in the server's (lexicographic) order,
        fetched page by page with ListObjectsV2."""
        token = None
        while True:
            params = [("list-type", "2"), ("max-keys", str(page_size)), ("prefix", prefix)]
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
            for element in root:
                if element.tag.rpartition("}")[2] == "Contents":
                    yield _xml_children(element)["Key"]
            fields = _xml_children(root)
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
        path = os.fspath(path)
        partial = f"{path}.{secrets.token_hex(6)}.part"
        try:
            with open(partial, "xb") as out:
                digest = self._call("GET", key, stream_to=out).body
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
            raise
        return digest.decode()

    # -- plumbing --

    def _key_path(self, key: str) -> str:
        if not key:
            raise ValueError("an S3 key must not be empty")
        return f"{self._bucket_path}/{urllib.parse.quote(key, safe='/')}"

    def _get(self, key: str) -> tuple[bytes, str]:
        response = self._call("GET", key)
        return response.body, response.headers.get("etag", "")

    def _connection(self) -> http.client.HTTPConnection:
        """This thread's persistent connection (a fresh one after a fork)."""
        pid, conn = getattr(self._local, "conn", (None, None))
        if conn is None or pid != os.getpid():
            host, port = self._parts.hostname, self._parts.port
            if self._tls is not None:
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                   context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
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
        and the reply's ``body`` is the sha256 hex of what was written."""
        path = self._key_path(key) if key is not None else self._bucket_path
        target = f"{path}?{query}" if query else path
        what = f"{method} s3://{self.bucket}/{key if key is not None else ''}"
        attempt = 1
        while True:
            try:
                return self._attempt(method, target, key, headers or {}, body, payload_hash,
                                     stream_to, what)
            except _Retryable as retryable:
                error = retryable.error
                if attempt >= self.retry_attempts:
                    raise type(error)(f"{error.message} (gave up after {attempt} attempts)",
                                      status=error.status, code=error.code,
                                      request_id=error.request_id, key=key) from None
                delay = random.uniform(0, min(self.retry_max_delay_s,
                                              self.retry_base_delay_s * 2 ** (attempt - 1)))
                log.warning("%s; retry %d of %d in %.2fs", error.message, attempt,
                            self.retry_attempts - 1, delay)
                time.sleep(delay)
                attempt += 1

    def _attempt(self, method: str, target: str, key: str | None, headers: dict[str, str],
                 body: bytes | _FileBody, payload_hash: str, stream_to: BinaryIO | None,
                 what: str) -> _S3Response:
        headers = {"x-tigris-consistent": "true", **headers}
        headers.update(sign_request(
            method, f"{self._parts.scheme}://{self._parts.netloc}{target}",
            [("Host", self._host), *headers.items()], payload_hash=payload_hash,
            access_key=self.access_key, secret_key=self._secret_key, region=self.region,
            session_token=self._session_token))
        conn = self._connection()
        try:
            response = self._exchange(conn, method, target, headers, body)
            if response.status >= 300:
                error_body = response.read(_MAX_ERROR_BODY) if method != "HEAD" else b""
                self._drop_connection()
                error = self._error(what, key, response, error_body)
                if response.status in _RETRYABLE_STATUSES:
                    raise _Retryable(error)
                raise error
            if method == "HEAD":
                reply_body = response.read()  # empty, but frees the connection for reuse
            elif stream_to is not None:
                reply_body = _stream_into(response, stream_to)
            else:
                parts: list[bytes] = []
                _read_body(response, lambda chunk: parts.append(bytes(chunk)))
                reply_body = b"".join(parts)
            if response.will_close:
                self._drop_connection()
            return _S3Response(response.status,
                               {k.lower(): v for k, v in response.getheaders()}, reply_body)
        except (_TruncatedBody, OSError, http.client.HTTPException) as exc:
            # Local file errors never get here: _FileBody and _stream_into raise them as
            # FlyDeployError, so every OSError left is about the connection.
            self._drop_connection()
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise S3Error(f"{what}: the TLS certificate of {self.endpoint} could not be "
                              f"verified ({exc.verify_message}): fix AWS_ENDPOINT_URL_S3 or "
                              "the system's CA certificates", key=key) from None
            reason = str(exc) or type(exc).__name__
            raise _Retryable(S3Error(
                f"{what} failed: {reason}; check that {self.endpoint} is reachable",
                code="ConnectionError", key=key)) from None

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
        server_message = fields.get("Message") or response.reason
        request_id = (response.getheader("x-amz-request-id") or fields.get("RequestId")
                      or None)
        hint = _S3_HINTS.get(code)
        if hint is None and status == 412:
            hint = "the object changed or already exists: read it again and retry"
        message = (f"{what} failed: HTTP {status} {code}: {server_message}"
                   + (f" (request id {request_id})" if request_id else "")
                   + (f"; {hint}" if hint else ""))
        cls = {404: NotFound, 412: PreconditionFailed}.get(status, S3Error)
        return cls(message, status=status, code=code, request_id=request_id, key=key)


class _S3Response(NamedTuple):
    """A successful S3 response: status, lower-cased headers, body (or sha256 hex)."""

    status: int
    headers: dict[str, str]
    body: bytes


class _FileBody:
    """A file to upload: hashed once up front, then streamed in chunks on each attempt."""

    def __init__(self, path: str) -> None:
        self.path = path
        with _local_file_errors(path), open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self.sha256 = hashlib.file_digest(f, "sha256").hexdigest()

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


@contextlib.contextmanager
def _local_file_errors(path: str) -> Iterator[None]:
    """Re-raise an OSError of a local file as FlyDeployError, so that it is never mistaken
    for a network error and retried."""
    try:
        yield
    except OSError as exc:
        raise FlyDeployError(f"{path}: {exc.strerror or exc}: check the path, its "
                             "permissions and the free disk space") from exc


def _stream_into(response: http.client.HTTPResponse, out: BinaryIO) -> bytes:
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
    return hasher.hexdigest().encode()


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
_FLAPS_RETRYABLE_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
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

        ``timeout`` is how many seconds the command may run (the API answers
        408 past it).  A command that fails is a result with a non-zero
        ``exit_code``, not an error; errors are for requests the API refused
        or never answered.  Requests to one machine leave at most one a
        second; requests to different machines do not wait for each other.
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
              retry_statuses: frozenset[int] = _FLAPS_RETRYABLE_STATUSES) -> object:
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
            except ssl.SSLCertVerificationError as exc:
                raise MachinesAPIError(0, f"the TLS certificate of {self.base_url} could not be "
                                          f"verified ({exc.verify_message}): fix FLY_FLAPS_BASE_URL "
                                          "or the system's CA certificates",
                                       method=method, path=shown_path) from None
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

# One condition guards every server's safe-point flags (``_held_by`` and
# ``_running``) and the registry, so a pause marks a thousand idle servers in
# one short critical section without waking any of their threads.  Replaced
# in a forked child, where a lock may have been held by a thread that is gone.
_safe_points = threading.Condition(threading.Lock())
_live_servers: dict[int, Server] = {}
_server_names: dict[str, Server] = {}
_server_serials = itertools.count(1)


class _Reply:
    """The answer slot of one call: each call waits on its own, so a late reply lands nowhere."""

    __slots__ = ("_done", "caller", "value", "error", "stopped")

    def __init__(self) -> None:
        self._done = threading.Event()
        self.caller = threading.get_ident()
        self.value: Any = None
        self.error: BaseException | None = None
        self.stopped = False

    def set(self, value: Any = None, *, error: BaseException | None = None,
            stopped: bool = False) -> None:
        self.value, self.error, self.stopped = value, error, stopped
        self._done.set()

    def wait(self, timeout: float | None) -> bool:
        return self._done.wait(timeout)


class _Mailbox:
    """A server's message queue; once closed it refuses new messages."""

    __slots__ = ("_ready", "_queue", "closed")

    def __init__(self, messages: Iterable[tuple] = ()) -> None:
        self._ready = threading.Condition(threading.Lock())
        self._queue: collections.deque[tuple] = collections.deque(messages)
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
    call from another marked server that is busy (blocked in that very call):
    nothing has been changed so far, and refusing would make both wait for
    the deadline.  Once every server is held, nothing gets through.
    """

    __slots__ = ("thread", "acquiring", "busy_threads")

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.acquiring = True
        # Threads of marked servers in the middle of a message.
        self.busy_threads: set[int | None] = set()

    def lets_through(self, message: tuple) -> bool:
        return (self.acquiring and message[0] == _CALL
                and message[2].caller in self.busy_threads)


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
        with _safe_points:
            if name is not None:
                if name in _server_names:
                    raise FlyDeployError(
                        f"a server named {name!r} is already running ({_server_names[name]!r}); "
                        f"stop it first or choose another name")
                _server_names[name] = server
        outcome: list[BaseException] = []
        started = threading.Event()
        server._thread = threading.Thread(
            target=server._main, args=(args, kwargs, started, outcome),
            name=f"flydeploy-server-{server._label()}", daemon=True)
        try:
            server._thread.start()
        except BaseException:
            server._unregister()
            raise
        started.wait()
        if outcome:
            raise outcome[0]
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
        (None waits forever), ``ServerStopped`` at once if the server is not
        running.
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
            self._thread.join(timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
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
        # Running while init runs, so nothing holds a server before it exists.
        self._running = True
        self._alive = False

    def _label(self) -> str:
        return repr(self._name) if self._name is not None else f"#{self._serial}"

    def _on_own_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def _stopped_error(self, what: str) -> ServerStopped:
        return ServerStopped(f"{self!r} is not running, so the {what} was not handled; "
                             f"start the server again")

    def _main(self, args: tuple, kwargs: dict, started: threading.Event,
              outcome: list[BaseException]) -> None:
        try:
            self._state = self.init(*args, **kwargs)
        except BaseException as error:  # raised in the caller of start()
            outcome.append(error)
            self._unregister()
            started.set()
            return
        with _safe_points:
            self._alive = True
            _live_servers[self._serial] = self
        self._leave_message()
        started.set()
        self._serve()

    def _serve(self) -> None:
        """Handle messages until a stop; each one between two safe points."""
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
            self._mailbox.closed = True
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
            self._running = False
            if self._held_by is not None:
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


def _hold_servers(targets: Iterable[Server], hold: _Hold,
                  deadline: float) -> tuple[list[Server], list[Server]]:
    """Hold servers at their safe points; returns (held, not reached by the deadline).

    An idle server is held by setting a flag under the shared lock: its
    thread is not woken.  A busy one is marked so it starts no new message
    (but see ``_Hold``), and waited for until ``deadline``; the hold is
    complete at the first moment every marked server is between messages.
    Servers that did not make it in time are unmarked again.  A server whose
    own thread is asking cannot be held; one already held by another hold of
    this thread counts as held (and stays that hold's to release).
    """
    me = threading.get_ident()
    marked: list[Server] = []
    missed: list[Server] = []
    with _safe_points:
        for server in targets:
            if not server._alive:
                continue
            if server._thread.ident == me:
                missed.append(server)
            elif server._held_by is None:
                server._held_by = hold
                marked.append(server)
            else:
                marked.append(server)  # held by another: wait until it lets go
        while True:
            for server in marked:
                if server._held_by is None and server._alive:
                    server._held_by = hold
            busy = [server for server in marked if server._alive and (
                server._running or (server._held_by is not hold and server._held_by.thread != me))]
            hold.busy_threads = {server._thread.ident for server in busy}
            remaining = deadline - time.monotonic()
            if not busy or remaining <= 0:
                break
            _safe_points.wait(None if remaining == math.inf else remaining)
        hold.acquiring = False
        if busy:
            for server in busy:
                if server._held_by is hold:
                    server._held_by = None
            _safe_points.notify_all()
        held = [server for server in marked if server._held_by is hold]
    return held, missed + busy


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
    if holder is not None and holder.thread == threading.get_ident():
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
        within = "" if timeout is None else f" within {timeout} s"
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
    """A callback that parks one event loop until released."""

    # How often a waiting pause looks whether a loop stopped running (a
    # stopped loop never runs the callback, yet has nothing to pause).
    _RECHECK_S = 0.05

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.parked_at: float | None = None
        self._parked = threading.Event()
        self._released = threading.Event()

    def schedule(self) -> bool:
        """Ask the loop to park; False if it closed meanwhile (nothing to pause)."""
        try:
            self.loop.call_soon_threadsafe(self._park)
        except RuntimeError:
            return False
        return True

    def _park(self) -> None:
        if self._released.is_set():  # the pause gave up on this loop already
            return
        self.parked_at = time.monotonic()
        self._parked.set()
        self._released.wait()

    def wait_parked(self, deadline: float) -> bool:
        """Wait until the loop is parked or idle; False if the deadline passed first."""
        while True:
            remaining = deadline - time.monotonic()
            if self._parked.wait(max(0.0, min(remaining, self._RECHECK_S))):
                return True
            if not self.loop.is_running() or self.loop.is_closed():
                return True
            if remaining <= 0:
                return False

    def release(self) -> None:
        self._released.set()


def _running_loop_here() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Pause:
    """Hold servers at their safe points and park every attached event loop.

    ``with _Pause(servers, timeout=10.0) as pause:`` — inside, no given server
    handles a message and no attached loop runs a callback, so the holder may
    read and replace ``server._state`` and call ``server.code_change``.  Loops
    are parked first (a coroutine blocked in ``server.call`` finishes that
    call), then servers are held; one deadline covers both.  Whatever does not
    get there in time is named in ``SuspendTimeout``, after everything already
    held was released.  On exit everything is released and ``held_ms`` is the
    longest time any server or loop was held.  Messages that arrive meanwhile
    are handled afterwards, in order.  The loop running in the pausing thread
    itself counts as parked: nothing else runs on it while the pause lasts.
    """

    def __init__(self, servers: Iterable[Server], *, timeout: float) -> None:
        self.timeout = timeout
        self.held_ms = 0.0
        self._servers = list(servers)
        self._hold = _Hold()
        self._held: list[Server] = []
        self._blocks: list[_LoopBlock] = []
        self._held_since: float | None = None

    def __enter__(self) -> _Pause:
        global _pause_owner
        if _pause_owner == threading.get_ident():
            raise FlyDeployError("a pause was entered while this thread already holds one; "
                                 "do the work inside the first pause")
        deadline = time.monotonic() + self.timeout
        if not _pause_lock.acquire(timeout=max(0.0, self.timeout)):
            raise SuspendTimeout(["another pause in progress"], self.timeout)
        _pause_owner = threading.get_ident()
        try:
            missed = self._park_loops(deadline)
            held_since = time.monotonic()
            self._held, missed_servers = _hold_servers(self._servers, self._hold, deadline)
        except BaseException:
            self._release()
            raise
        missed += [server.name or repr(server) for server in missed_servers]
        if missed:
            self._release()
            raise SuspendTimeout(missed, self.timeout)
        starts = [block.parked_at for block in self._blocks if block.parked_at is not None]
        if self._held:
            starts.append(held_since)
        self._held_since = min(starts, default=None)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release()

    def _park_loops(self, deadline: float) -> list[str]:
        here = _running_loop_here()
        for loop in _live_loops():
            if loop is here:
                continue
            block = _LoopBlock(loop)
            if block.schedule():
                self._blocks.append(block)
        return [repr(block.loop) for block in self._blocks if not block.wait_parked(deadline)]

    def _release(self) -> None:
        global _pause_owner
        released_at = time.monotonic()
        try:
            _release_servers(self._held, self._hold)
            for block in self._blocks:
                block.release()
        finally:
            if self._held_since is not None:
                self.held_ms = (released_at - self._held_since) * 1000.0
            self._held, self._blocks, self._held_since = [], [], None
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
    _safe_points = threading.Condition(threading.Lock())
    _pause_lock = threading.Lock()
    _pause_owner = None
    _fork_hold = None
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
