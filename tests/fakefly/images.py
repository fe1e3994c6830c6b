"""Fake container images: snapshots of a project tree, shared by the fake API and the fake ``fly``.

An image lives under ``<state>/images/<app>/<label>/``: ``tree/`` is the
project as it was built and ``image.json`` what a registry would know about
it (ref, digest, the Dockerfile's ``CMD`` and ``ENV``, ``fly.toml``'s
``[processes]``, ``[env]``, ``kill_signal`` and ``kill_timeout``).  The ref is ``registry.fly.io/<app>:<label>``.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
import pathlib
import secrets
import shlex
import shutil
import tomllib

REGISTRY = "registry.fly.io"
# Never part of an image, whatever .dockerignore says: build leftovers.
_ALWAYS_EXCLUDED = (".git", "__pycache__", "*.pyc", ".venv", ".pytest_cache", ".flydeploy")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class ImageError(Exception):
    """An image cannot be built or found; the message says which and why."""


def ulid() -> str:
    """A ULID-shaped identifier (26 Crockford base32 characters, time-ordered)."""
    value = (int(datetime.datetime.now().timestamp() * 1000) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def now_rfc3339() -> str:
    """The current UTC time the way the Machines API prints it."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_ref(app: str, label: str) -> str:
    """``registry.fly.io/<app>:<label>``."""
    return f"{REGISTRY}/{app}:{label}"


def parse_ref(ref: str) -> tuple[str, str]:
    """``(app, label)`` of ``registry.fly.io/<app>:<label>[@sha256:...]``."""
    bare = ref.split("@", 1)[0]
    if not bare.startswith(REGISTRY + "/") or ":" not in bare[len(REGISTRY) + 1:]:
        raise ImageError(f"image {ref!r} is not of the form {REGISTRY}/<app>:<label>")
    repository, label = bare[len(REGISTRY) + 1:].rsplit(":", 1)
    return repository, label


def read_fly_toml(path: pathlib.Path) -> dict:
    """``fly.toml`` as a dict; a TOML error names the file (as flyctl does)."""
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ImageError(f"failed loading app config from {path}: {exc}") from None


def _dockerfile_settings(tree: pathlib.Path) -> tuple[list[str], dict[str, str], str]:
    """The ``CMD`` (exec or shell form), ``ENV`` and last ``WORKDIR`` (default ``/app``,
    where the fake images put the app) of the tree's Dockerfile."""
    dockerfile = tree / "Dockerfile"
    cmd: list[str] = []
    env: dict[str, str] = {}
    workdir = "/app"
    if not dockerfile.is_file():
        return cmd, env, workdir
    for raw in dockerfile.read_text().splitlines():
        keyword, _, rest = raw.strip().partition(" ")
        rest = rest.strip()
        if keyword.upper() == "WORKDIR":
            workdir = rest.strip("\"'")
        elif keyword.upper() == "CMD":
            cmd = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
        elif keyword.upper() == "ENV":
            if "=" in rest.split(" ", 1)[0]:
                for item in shlex.split(rest):
                    key, _, value = item.partition("=")
                    env[key] = value
            else:
                key, _, value = rest.partition(" ")
                env[key] = value.strip()
    return cmd, env, workdir


def _ignored(relative: str, patterns: list[str]) -> bool:
    parts = relative.split("/")
    for pattern in patterns:
        if fnmatch.fnmatch(relative, pattern) or any(fnmatch.fnmatch(p, pattern) for p in parts):
            return True
    return False


def snapshot(state_dir: pathlib.Path, app: str, tree: pathlib.Path, label: str | None = None,
             *, build_args: dict[str, str] | None = None) -> dict:
    """Build an "image" of ``tree`` for ``app``; returns its ``image.json``."""
    tree = pathlib.Path(tree)
    label = label or f"deployment-{ulid()}"
    target = state_dir / "images" / app / label
    if target.exists():
        raise ImageError(f"image {image_ref(app, label)} already exists: use a new --image-label")
    patterns = list(_ALWAYS_EXCLUDED)
    ignore_file = tree / ".dockerignore"
    if ignore_file.is_file():
        patterns += [line.strip().rstrip("/") for line in ignore_file.read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
    digest = hashlib.sha256()
    staging = target.with_name(target.name + ".partial")
    for path in sorted(tree.rglob("*")):
        relative = path.relative_to(tree).as_posix()
        if _ignored(relative, patterns) or not path.is_file():
            continue
        destination = staging / "tree" / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)
        digest.update(relative.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    (staging / "tree").mkdir(parents=True, exist_ok=True)
    cmd, env, workdir = _dockerfile_settings(tree)
    config = read_fly_toml(tree / "fly.toml") if (tree / "fly.toml").is_file() else {}
    info = {
        "ref": image_ref(app, label), "app": app, "label": label,
        "digest": "sha256:" + digest.hexdigest(), "created_at": now_rfc3339(),
        "cmd": cmd, "env": env, "workdir": workdir,
        "processes": dict(config.get("processes") or {}),
        "fly_env": {k: str(v) for k, v in (config.get("env") or {}).items()},
        "build_args": dict(build_args or {}),
        "stop_config": {key: value for key, value in (
            ("signal", config.get("kill_signal")),
            ("timeout", f"{config['kill_timeout']}s" if isinstance(config.get("kill_timeout"), int)
             else config.get("kill_timeout"))) if value},
    }
    (staging / "image.json").write_text(json.dumps(info, indent=2))
    os.replace(staging, target)
    return info


def load(state_dir: pathlib.Path, ref: str) -> dict:
    """The ``image.json`` of a pushed image, with ``tree`` set to its directory."""
    app, label = parse_ref(ref)
    target = state_dir / "images" / app / label
    try:
        info = json.loads((target / "image.json").read_text())
    except FileNotFoundError:
        raise ImageError(f"failed to get manifest {ref}: manifest unknown") from None
    info["tree"] = str(target / "tree")
    return info
