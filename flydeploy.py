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

import contextlib
import datetime
import functools
import hashlib
import hmac
import http.client
import json
import logging
import os
import random
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
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


def _read_body(response: http.client.HTTPResponse, sink: Callable[[bytes], object]) -> int:
    """Feed the whole response body to ``sink``; a body shorter than its Content-Length
    raises ``_TruncatedBody`` (http.client would silently return what it got)."""
    expected = response.getheader("Content-Length")
    received = 0
    while chunk := response.read(_IO_CHUNK):
        sink(chunk)
        received += len(chunk)
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
              payload_hash: str = _EMPTY_SHA256, stream_to: BinaryIO | None = None) -> _Reply:
        """One S3 operation with retries.  With ``stream_to`` the body goes into that file
        and the reply's ``body`` is the sha256 hex of what was written."""
        path = self._key_path(key) if key is not None else self._bucket_path
        target = f"{path}?{query}" if query else path
        what = f"{method} s3://{self.bucket}/{key if key is not None else ''}"
        for attempt in range(1, self.retry_attempts + 1):
            try:
                return self._attempt(method, target, key, headers or {}, body, payload_hash,
                                     stream_to, what)
            except _Retryable as retryable:
                error = retryable.error
                if attempt == self.retry_attempts:
                    raise type(error)(f"{error.message} (gave up after {attempt} attempts)",
                                      status=error.status, code=error.code,
                                      request_id=error.request_id, key=key) from None
                delay = random.uniform(0, min(self.retry_max_delay_s,
                                              self.retry_base_delay_s * 2 ** (attempt - 1)))
                log.warning("%s; retry %d of %d in %.2fs", error.message, attempt,
                            self.retry_attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _attempt(self, method: str, target: str, key: str | None, headers: dict[str, str],
                 body: bytes | _FileBody, payload_hash: str, stream_to: BinaryIO | None,
                 what: str) -> _Reply:
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
                _read_body(response, parts.append)
                reply_body = b"".join(parts)
            if response.will_close:
                self._drop_connection()
            return _Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                          reply_body)
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


class _Reply(NamedTuple):
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

    def sink(chunk: bytes) -> None:
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
