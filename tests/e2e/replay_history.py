"""Replay a web app's git history as hot upgrades of one running process, each step compared with a cold start.

    python -m tests.e2e.replay_history REPO REF REF ... [--json]

``REPO`` is a local clone of the app; nothing is downloaded and nothing of it
is kept here.  The first ``REF`` is started (gunicorn, 2 preloaded sync
workers, under HTTP load); every following ``REF`` is written into its tree
(files added, changed and deleted as ``git diff`` says) and applied with
``hot --local``; then every page of ``PATHS`` is fetched from each worker and
from a fresh process cold-started on the same files.  Each step's outcome is
printed: ``pass``, ``refused: <reason>`` or ``fail: <what differed>``, and at
the end the requests that failed under load.

The preset fits Flask apps laid out like Miguel Grinberg's microblog
(``microblog.py`` exposing ``app``, Flask-Migrate migrations, ``DATABASE_URL``):
the replay adds ``flydeploy_entry.py``, which starts flydeploy, answers
``/version`` and tags every answer with its worker's pid, and runs
``flask db upgrade`` before each start and upgrade, as a release command
would.  The app's own dependencies must be installed.  ``tests/e2e/
test_replay_history.py`` runs this when ``FLYDEPLOY_REPLAY_REPO`` names a clone.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

from tests.e2e import examples
from tests.e2e.web_steps import Replay, Step, run_steps

ENTRY = '''\
"""Added by the replay: flydeploy at boot, /version, and the worker's pid on every answer."""

import json
import os

import flydeploy

flydeploy.startup_reapply_current()

from microblog import app as flask_app  # noqa: E402


def app(environ, start_response):
    tag = ("X-Pid", str(os.getpid()))
    if environ.get("PATH_INFO") == "/version":
        start_response("200 OK", [("Content-Type", "application/json"), tag])
        return [json.dumps({"pid": os.getpid()}).encode()]
    return flask_app(environ, lambda status, headers, *exc: start_response(status, headers + [tag], *exc))
'''

PATHS = ["/", "/index", "/login", "/register", "/explore", "/user/nobody", "/reset_password_request",
         "/no-such-page"]


def git(repo: str, *args: str) -> bytes:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True).stdout


def files_at(repo: str, ref: str) -> dict[str, bytes]:
    names = git(repo, "ls-tree", "-r", "-z", "--name-only", ref).decode().split("\0")
    return {name: git(repo, "show", f"{ref}:{name}") for name in names if name}


def changes(repo: str, old: str, new: str) -> dict[str, bytes | None]:
    """The files ``new`` adds or changes (their content) and deletes (None)."""
    found: dict[str, bytes | None] = {}
    fields = git(repo, "diff", "--no-renames", "--name-status", "-z", old, new).decode().split("\0")
    for status, name in zip(fields[::2], fields[1::2]):
        found[name] = None if status == "D" else git(repo, "show", f"{new}:{name}")
    return found


def prepare(app: examples.LocalApp) -> None:
    """The database of this app outside its tree, migrated to the code in the tree."""
    app.env.update(DATABASE_URL=f"sqlite:///{app.base / 'app.db'}", FLASK_APP="microblog.py")
    if (app.root / "migrations" / "env.py").exists():
        subprocess.run([sys.executable, "-m", "flask", "db", "upgrade"], cwd=app.root, env=app.env, check=True,
                       capture_output=True, timeout=120)


def normalize(body: bytes) -> bytes:
    """A form's CSRF token differs in every answer."""
    return re.sub(rb'value="[A-Za-z0-9_.\-]{40,}"', b'value="*"', body)


def replay(repo: str, refs: list[str]) -> tuple[list[tuple[str, str]], list]:
    first = {**files_at(repo, refs[0]), "flydeploy_entry.py": ENTRY}
    how = Replay("python3 -m gunicorn --bind 127.0.0.1:{port} --workers 2 --preload flydeploy_entry:app",
                 ready="Booting worker", workers=2, files=first, prepare=prepare, normalize=normalize,
                 ok_statuses=(200, 302))
    steps = [Step(f"{old} -> {new}", changes(repo, old, new)) for old, new in zip(refs, refs[1:])]
    return run_steps("replay", how, steps, PATHS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo")
    parser.add_argument("refs", nargs="+", help="commits or tags, oldest first")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of a table")
    args = parser.parse_args(argv)
    outcomes, failed = replay(args.repo, args.refs)
    if args.json:
        print(json.dumps({"steps": outcomes, "failed_requests": len(failed)}))
    else:
        for name, outcome in outcomes:
            print(f"{name:<16} {outcome}")
        print(f"requests failed under load: {len(failed)}" + "".join(f"\n  {r.error}" for r in failed[:5]))
    return 0 if all(outcome == "pass" or outcome.startswith("refused") for _, outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
