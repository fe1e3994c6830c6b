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
import copy
import dataclasses
import datetime
import email.utils
import fcntl
import functools
import gzip
import hashlib
import io
import json
import logging
import mimetypes
import os
import pathlib
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import BinaryIO

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

# Under a store's root, this folder holds the store's own files (its lock file
# and the temporary files of writes in progress); it is never a key, and its
# presence is how a ``file://`` URL is traced back to the store that holds it.
_STORE_INTERNAL_DIR = ".flydeploy-store"
_MAX_KEY_BYTES = 1024
_COPY_CHUNK = 1 << 20


def _quoted_md5(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def _file_digest(path: str, algorithm: str) -> str:
    """Hex digest of a file's content, read in bounded chunks."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _same_etag(a: str, b: str) -> bool:
    return a.strip().strip('"') == b.strip().strip('"')


def _check_store_key(key: object) -> str:
    """Return ``key`` if it maps to a path inside a store, else raise ``S3Error``."""
    def refuse(why: str) -> S3Error:
        return S3Error(f"key {key!r} cannot be stored in a local store: {why}; "
                       "use a key of '/'-separated names without '.' or '..' parts",
                       status=400, code="InvalidKey", key=str(key))
    if not isinstance(key, str) or not key:
        raise refuse("a key is a non-empty string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise refuse("it is not valid UTF-8") from None
    if size > _MAX_KEY_BYTES:
        raise refuse(f"it is longer than {_MAX_KEY_BYTES} bytes")
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
        os.makedirs(self._internal, exist_ok=True)
        self._real_root = os.path.realpath(self.root)

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
        path = os.path.abspath(urllib.request.url2pathname(parsed.path))
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

    # Paths, locking and temporary files.

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
        fd = os.open(os.path.join(self._internal, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _spool(self, data: bytes | bytearray | memoryview | str | os.PathLike[str]) -> tuple[str, str]:
        """Copy ``data`` (bytes or a file path) to a temporary file; return (path, etag)."""
        fd, tmp = tempfile.mkstemp(dir=self._internal, prefix="put-")
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    digest.update(data)
                    out.write(data)
                else:
                    with open(data, "rb") as src:
                        while chunk := src.read(_COPY_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp, '"' + digest.hexdigest() + '"'

    def _etag_of(self, path: str) -> str | None:
        try:
            return '"' + _file_digest(path, "md5") + '"'
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

        ``if_none_match="*"`` writes only if the key does not exist;
        ``if_match`` (an ETag or ``*``) only if it exists with that ETag.
        ``content_type`` is accepted for interface parity; a directory keeps
        no per-file metadata.
        """
        if if_none_match is not None and if_none_match.strip() != "*":
            raise S3Error(f"If-None-Match on put supports only '*', not {if_none_match!r}",
                          status=501, code="NotImplemented", key=key)
        path = self._path(key)
        tmp, etag = self._spool(data)
        try:
            with self._locked():
                self._check_conditions(key, path, if_match=if_match, if_none_match=if_none_match)
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    os.replace(tmp, path)
                except (FileExistsError, NotADirectoryError, IsADirectoryError) as err:
                    raise self._conflict(key, err) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return etag

    def upload(self, key: str, path: str | os.PathLike[str], *,
               content_type: str | None = None) -> str:
        """Copy the file at ``path`` to ``key`` in bounded chunks; return the ETag."""
        return self.put(key, os.fspath(path), content_type=content_type)

    def get(self, key: str) -> bytes:
        """Return the content of ``key``; raise ``NotFound`` when it does not exist."""
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"{key!r} does not exist in {self.root}",
                           status=404, code="NoSuchKey", key=key) from None

    def get_json(self, key: str) -> tuple[Any, str]:
        """Return ``(parsed JSON, ETag)`` of ``key``, both from the same read."""
        data = self.get(key)
        try:
            return json.loads(data), _quoted_md5(data)
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
                digest = hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        headers = {
            "etag": '"' + digest.hexdigest() + '"',
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
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=f".{os.path.basename(dest)}.")
        try:
            with src, os.fdopen(fd, "wb") as out:
                while chunk := src.read(_COPY_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except BaseException:
            os.unlink(tmp)
            raise
        return digest.hexdigest()

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove ``key``; with ``if_match``, only if its ETag still matches.

        Deleting a missing key without a condition succeeds, as on S3.
        """
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
# Top-level build outputs, which hold copies of the sources.
_BUILD_OUTPUT_DIRS = frozenset({"build", "dist"})
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
        return {
            "version": self.manifest["version"],
            "source_image_ref": self.manifest["source_image_ref"],
            "tarball_url": tarball_url,
            "sha256": self.sha256,
            "deployed_at": deployed_at or _iso_utc(_utc_now()),
        }


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

    As in ``.gitignore``: a pattern without '/' matches a file name or a folder
    name at any depth; one with '/' is anchored at the root; a pattern that
    matches a folder (or ends in '/') matches everything below it.
    """
    folders_only = pattern.endswith("/")
    pattern = pattern.strip("/").removeprefix("./")
    if not pattern:
        return False
    regex = _glob_regex(pattern)
    parts = path.split("/")
    if "/" not in pattern:
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


def _release_files(root: str, include: Sequence[str] | None, exclude: Sequence[str] | None,
                   skip: str) -> list[str]:
    """Relative paths of the files to pack under ``root``, sorted."""
    candidates = []
    for folder, dirnames, filenames in os.walk(root):
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
        # The application's modules and packages: top-level .py files, every
        # top-level folder with Python sources below it (with its package
        # data), and the conventional templates/ and static/ folders.
        python_tops = {p.split("/", 1)[0] for p in candidates if "/" in p and p.endswith(".py")}
        python_tops -= {t for t in _BUILD_OUTPUT_DIRS if f"{t}/__init__.py" not in candidates}
        chosen = [p for p in candidates
                  if ("/" not in p and p.endswith(".py"))
                  or ("/" in p and p.split("/", 1)[0] in python_tops | _APP_DATA_DIRS)]
    if exclude:
        chosen = [p for p in chosen if not any(_path_matches(pat, p) for pat in exclude)]
    return sorted(chosen)


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
                 exclude: Sequence[str] | None = None) -> Release:
    """Pack the application under ``root`` into a deterministic ``.tar.gz`` at ``out_path``.

    By default every file of the application's modules and packages is
    packed: top-level ``.py`` files, every top-level folder with Python
    sources below it (sources and package data such as templates and static
    files) and top-level ``templates/`` and ``static/`` folders.  ``include``
    (patterns) replaces that choice and ``exclude`` (patterns) removes from
    it; patterns work as in ``.gitignore`` (``*.sqlite3``, ``media/``,
    ``app/static/**/*.map``).  Never packed: ``__pycache__``, ``*.pyc``,
    hidden files and folders (``.git``, ``.env``), virtual environments,
    ``node_modules``, ``site-packages`` and ``*.egg-info``.

    The first member is ``flydeploy-manifest.json`` (``app``, ``version``,
    ``source_image_ref``, ``created_at``, ``files: {path: sha256}``).  The same
    tree and arguments give the same bytes: sorted members, fixed mtime,
    uid/gid 0, modes 0644/0755, no timestamp in the gzip header.
    ``created_at`` comes from ``SOURCE_DATE_EPOCH`` when it is set and is
    null otherwise.
    """
    _check_name("app", app)
    _check_name("version", version)
    root = os.path.abspath(os.fspath(root))
    out_path = os.path.abspath(os.fspath(out_path))
    if not os.path.isdir(root):
        raise ReleaseError(f"cannot pack {root}: it is not a folder; pass the application's root")
    epoch = _source_date_epoch()
    files = _release_files(root, include, exclude, skip=out_path)
    if not files:
        raise ReleaseError(f"nothing to pack under {root}: no Python modules or packages found "
                           "(or include/exclude left nothing); check the root and the patterns")

    # Pass 1: hash every file (the manifest leads the archive), keeping small
    # contents so that pass 2 need not read them again.
    hashes: dict[str, str] = {}
    cached: dict[str, bytes] = {}
    modes: dict[str, int] = {}
    budget = _PACK_CACHE_BYTES
    for rel in files:
        path = os.path.join(root, *rel.split("/"))
        with open(path, "rb") as f:
            info = os.fstat(f.fileno())
            if info.st_size <= budget:
                data = f.read()
                budget -= len(data)
                cached[rel] = data
                hashes[rel] = hashlib.sha256(data).hexdigest()
            else:
                hashes[rel] = hashlib.file_digest(f, "sha256").hexdigest()
        modes[rel] = 0o755 if info.st_mode & 0o111 else 0o644

    created_at = (None if epoch is None else
                  _iso_utc(datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)))
    manifest = {"app": app, "version": version, "source_image_ref": source_image_ref,
                "created_at": created_at, "files": hashes}
    manifest_bytes = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    mtime = epoch or 0

    def member(name: str, size: int, mode: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, mode, mtime
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out_path), prefix=f".{os.path.basename(out_path)}.")
    try:
        with os.fdopen(fd, "wb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz, \
                tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(member(MANIFEST_NAME, len(manifest_bytes), 0o644), io.BytesIO(manifest_bytes))
            for rel in files:
                data = cached.get(rel)
                if data is None:
                    with open(os.path.join(root, *rel.split("/")), "rb") as f:
                        data = f.read()
                    if hashlib.sha256(data).hexdigest() != hashes[rel]:
                        raise ReleaseError(f"{rel} changed while it was being packed; pack again "
                                           "once nothing writes to the tree", member=rel)
                tar.addfile(member(rel, len(data), modes[rel]), io.BytesIO(data))
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise
    return Release(out_path, _file_digest(out_path, "sha256"), manifest)


def _check_member_name(name: str) -> None:
    why = None
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        why = "is an absolute path"
    elif "\\" in name or "\x00" in name:
        why = "contains a backslash or a NUL character"
    elif any(part == ".." for part in name.split("/")):
        why = "contains '..'"
    elif any(part in ("", ".") for part in name.split("/")):
        why = "is not a normalised path (empty or '.' parts)"
    if why:
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
                   expected_sha256: str | None = None, max_bytes: int = _MAX_RELEASE_BYTES,
                   max_members: int = _MAX_RELEASE_MEMBERS) -> dict[str, Any]:
    """Check and extract a release tarball into ``dest``; return its manifest.

    The archive's sha256 is checked against ``expected_sha256`` before
    anything is extracted.  Refused, each with a ``ReleaseError`` naming the
    member: absolute paths, ``..``, links, devices and anything but regular
    files, members missing from the manifest, listed twice or whose sha256
    differs, manifest entries missing from the archive, and archives over
    ``max_bytes`` of content or ``max_members`` members.  ``dest`` must not
    exist or be an empty folder; the release is extracted beside it and
    moved into place only when complete, so on any error nothing is left in
    ``dest``.
    """
    path = os.fspath(path)
    dest = os.path.abspath(os.fspath(dest))
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
        manifest = _extract_release(path, staging, max_bytes, max_members)
        os.chmod(staging, 0o755)
        os.rename(staging, dest)  # onto a missing or empty folder: atomic
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _extract_release(path: str, into: str, max_bytes: int, max_members: int) -> dict[str, Any]:
    header_allowance = (max_members + 1) * 3 * tarfile.BLOCKSIZE + _MAX_MANIFEST_BYTES
    last = None
    try:
        with gzip.open(path, "rb") as gz, \
                tarfile.open(fileobj=_BoundedReader(gz, max_bytes + header_allowance), mode="r|") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST_NAME or not first.isreg():
                raise ReleaseError(f"release tarball starts with {first.name if first else 'nothing'!r}, "
                                   f"not {MANIFEST_NAME}: it was not made by pack_release",
                                   member=first.name if first else None)
            if first.size > _MAX_MANIFEST_BYTES:
                raise ReleaseError(f"{MANIFEST_NAME} is {first.size} bytes, over the "
                                   f"{_MAX_MANIFEST_BYTES}-byte limit; refusing the release",
                                   member=MANIFEST_NAME)
            manifest = _parse_manifest(tar.extractfile(first).read())
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
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
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
        while chunk := src.read(_COPY_CHUNK):
            digest.update(chunk)
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
    time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** attempt)))


def read_current(store: Any, app: str) -> tuple[dict[str, Any] | None, str | None]:
    """Return ``(current.json, ETag)`` of ``app``, or ``(None, None)`` when there is none.

    ``store`` is an ``S3`` or a ``LocalStore``.
    """
    key = _current_key(app)
    try:
        doc, etag = store.get_json(key)
    except NotFound:
        return None, None
    if not isinstance(doc, dict):
        raise ReleaseError(f"{key} holds {type(doc).__name__}, not a JSON object; fix it, or "
                           "write a fresh one with reset_current (a cold deploy does)")
    return doc, etag


def update_current(store: Any, app: str,
                   change: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
    """Apply ``change`` to ``current.json`` atomically; return the document written.

    ``change`` receives the current document (None when there is none) and
    returns the new one.  The write is conditional on the ETag read
    (``If-None-Match: *`` when there was none) and is retried from a fresh
    read when another writer got in first, so no concurrent update is lost.
    """
    key = _current_key(app)
    for attempt in range(_CAS_ATTEMPTS):
        doc, etag = read_current(store, app)
        new = change(copy.deepcopy(doc))
        try:
            if etag is None:
                store.put(key, _json_body(new), content_type="application/json", if_none_match="*")
            else:
                store.put(key, _json_body(new), content_type="application/json", if_match=etag)
            return new
        except (PreconditionFailed, NotFound):
            # NotFound: S3 answers If-Match on a key deleted meanwhile with 404.
            _backoff(attempt)
    raise ReleaseError(f"{key} kept changing under us ({_CAS_ATTEMPTS} conditional writes lost "
                       "the race): other deploys are writing it; wait for them and retry")


def _check_hot_upgrade(hot_upgrade: object) -> dict[str, Any]:
    if not isinstance(hot_upgrade, dict):
        raise ReleaseError(f"a hot upgrade record is a dict (Release.hot_upgrade_record gives "
                           f"one), not {type(hot_upgrade).__name__}")
    missing = [f for f in ("version", "tarball_url", "sha256") if not hot_upgrade.get(f)]
    if missing:
        raise ReleaseError(f"hot upgrade record lacks {', '.join(missing)}; build it with "
                           "Release.hot_upgrade_record")
    if not _SHA256_PATTERN.fullmatch(str(hot_upgrade["sha256"])):
        raise ReleaseError(f"hot upgrade record has a malformed sha256 {hot_upgrade['sha256']!r}; "
                           "expected 64 lowercase hex digits")
    record = {"source_image_ref": None, **hot_upgrade}
    record.setdefault("deployed_at", _iso_utc(_utc_now()))
    return record


def _fresh_current(image_ref: str | None) -> dict[str, Any]:
    return {"image_ref": image_ref, "set_at": _iso_utc(_utc_now()), "hot_upgrade": None, "history": []}


def record_hot_upgrade(store: Any, app: str, hot_upgrade: dict[str, Any], *,
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


def reset_current(store: Any, app: str, image_ref: str) -> dict[str, Any]:
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

    store: Any = dataclasses.field(repr=False)
    app: str
    owner: str
    deployment_id: str
    locked_at: str
    expires_at: str
    etag: str

    def release(self) -> bool:
        """Remove the lock if it is still this one; return whether it was removed.

        A lock that expired and was taken over by another deploy is left alone.
        """
        try:
            self.store.delete(_lock_key(self.app), if_match=self.etag)
        except (PreconditionFailed, NotFound):
            log.warning("deploy lock of %s was taken over or removed by someone else; left as is",
                        self.app)
            return False
        return True

    def renew(self, timeout_s: float = 300) -> None:
        """Push the expiry to ``timeout_s`` from now; raise ``LockHeld`` if the lock was lost."""
        now = _utc_now()
        body = {"locked_by": self.owner, "locked_at": self.locked_at,
                "expires_at": _iso_utc(now + datetime.timedelta(seconds=timeout_s)),
                "deployment_id": self.deployment_id}
        try:
            self.etag = self.store.put(_lock_key(self.app), _json_body(body),
                                       content_type="application/json", if_match=self.etag)
        except (PreconditionFailed, NotFound):
            holder, _ = _read_lock(self.store, _lock_key(self.app))
            raise LockHeld(self.app, holder or {}, now=now) from None
        self.expires_at = body["expires_at"]

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_lock(store: Any, key: str) -> tuple[dict[str, Any] | None, str | None]:
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


def acquire_lock(store: Any, app: str, *, owner: str, deployment_id: str,
                 timeout_s: float = 300, force: bool = False) -> Lock:
    """Take the deploy lock of ``app`` for ``timeout_s`` seconds; return the ``Lock``.

    The lock object is created with ``If-None-Match: *``.  A lock past its
    ``expires_at`` (or unreadable) is taken over conditionally on its ETag,
    and ``force`` takes over a live one the same way, so of two deployers
    racing exactly one holds the lock.  A live lock raises ``LockHeld``
    naming its owner, when it was taken and how long is left.
    """
    key = _lock_key(app)
    for attempt in range(_CAS_ATTEMPTS):
        now = _utc_now()
        body = {"locked_by": owner, "locked_at": _iso_utc(now),
                "expires_at": _iso_utc(now + datetime.timedelta(seconds=timeout_s)),
                "deployment_id": deployment_id}

        def held(etag: str) -> Lock:
            return Lock(store, app, owner, deployment_id, body["locked_at"], body["expires_at"], etag)

        try:
            return held(store.put(key, _json_body(body), content_type="application/json",
                                  if_none_match="*"))
        except PreconditionFailed:
            pass
        holder, etag = _read_lock(store, key)
        if holder is None:
            continue  # released between our write and our read: try again
        if holder == body and etag:
            return held(etag)  # our write landed, but its reply was lost and the retry refused
        expires = _parse_time(holder.get("expires_at"))
        if not (force or expires is None or expires <= now):
            raise LockHeld(app, holder, now=now)
        log.warning("taking over the deploy lock of %s held by %r since %s (%s)", app,
                    holder.get("locked_by"), holder.get("locked_at"),
                    "forced" if force else "expired")
        try:
            return held(store.put(key, _json_body(body), content_type="application/json",
                                  if_match=etag))
        except (PreconditionFailed, NotFound):
            _backoff(attempt)  # someone else took it over first: look again
    raise FlyDeployError(f"could not take the deploy lock of {app!r}: {key} kept changing "
                         f"({_CAS_ATTEMPTS} attempts); another deploy is fighting for it, retry later")


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
