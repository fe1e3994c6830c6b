"""The example apps of the end-to-end tests and how each is edited to its v2.

``apps/chat``: uvicorn + Starlette, websocket sessions with per-connection
state, ``GET /version``, a ``Tally`` server.  ``apps/shop``: gunicorn sync
workers with ``--preload``, a per-worker ``Hits`` server.  ``to_v2`` applies
the edit a developer would make: the v2 sources differ in a few places, among
them a server whose ``code_change`` migrates its state to a new shape.
``LocalApp`` runs an app tree as a process on this host (local mode).
"""

from __future__ import annotations

import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from tests.fakefly import write_app_tree

from tests.machine_apps import wait_for

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
APPS = pathlib.Path(__file__).resolve().parent / "apps"

CHAT_COMMAND = "python3 main.py"
SHOP_COMMAND = "python3 -m gunicorn -c gunicorn.conf.py wsgi:application"
SITE_COMMAND = "python3 -m gunicorn --bind 127.0.0.1:{port} --workers 1 site_project.wsgi"

_CHAT_V2 = {
    'VERSION = "v1"': 'VERSION = "v2"',
    # The tally's state takes a new shape; code_change migrates it (and a rollback's v1 code can use it).
    "    vsn = 1\n": "    vsn = 2\n",
    'return {"messages": 0}': 'return {"messages": 0, "since_upgrade": 0}',
    '        return {"messages": state["messages"] + 1}\n': """\
        return {"messages": state["messages"] + 1, "since_upgrade": state["since_upgrade"] + 1}

    def code_change(self, old_vsn, state, extra):
        if old_vsn == 1:
            return {"messages": state["messages"], "since_upgrade": 0}
        return state
""",
    '''    return {"version": VERSION, "sid": session.sid, "count": session.count, "last": session.last}''':
    '''    return {"version": VERSION, "sid": session.sid, "count": session.count, "last": session.last,
            "words": len(session.last.split())}''',
}

_SHOP_V2 = {
    'VERSION = "v1"': 'VERSION = "v2"',
    "    return cents\n": "    return cents * 9 // 10  # 10% off\n",
}

_SITE_V2 = {
    'VERSION = "v1"': 'VERSION = "v2"',
    '"visits": VISITS["n"]})': '"visits": VISITS["n"], "path": request.path})',
}

_EDITS = {"chat": {"chat.py": _CHAT_V2}, "shop": {"pricing.py": _SHOP_V2}, "site": {"hello/views.py": _SITE_V2}}


def app_files(name: str) -> dict[str, str]:
    """The v1 files of example app ``name``: sources, templates, static files (relative path -> text)."""
    root = APPS / name
    return {str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts}


def to_v2(name: str, root: pathlib.Path, *, version: str = "v2") -> None:
    """Edit the copy of app ``name`` under ``root`` to its v2 (answering ``version``)."""
    for relative, replacements in _EDITS[name].items():
        path = pathlib.Path(root) / relative
        text = path.read_text()
        for old, new in replacements.items():
            if old not in text:
                raise AssertionError(f"{relative} no longer holds the text its v2 edit replaces: {old[:60]!r}")
            text = text.replace(old, new.replace('"v2"', f'"{version}"'))
        path.write_text(text)


def set_version(root: pathlib.Path, relative: str, version: str) -> None:
    """Rewrite the ``VERSION = "..."`` line of ``relative`` (a cold image's own code)."""
    path = pathlib.Path(root) / relative
    path.write_text(re.sub(r'^VERSION = "[^"]*"$', f'VERSION = "{version}"', path.read_text(), flags=re.M))


class LocalApp:
    """An example app running on this host: its own tree, runtime dir, port and process group.

    The tree holds ``files`` (default: the app's own, ``app_files(name)``); ``command`` may name ``{port}``; the app has started once ``ready`` is in its output.
    """

    def __init__(self, name: str, app: str, *, command: str = CHAT_COMMAND, ready: str = "ready",
                 files: dict[str, str | bytes] | None = None) -> None:
        # One port for the app's whole life: a cold restart comes back where the clients are.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.name = name
        self.app = app
        self.base = pathlib.Path(tempfile.mkdtemp(prefix="fde2e-", dir="/tmp"))  # unix socket paths are short
        self.root = self.base / "app"
        self.root.mkdir()
        for relative, content in (app_files(name) if files is None else files).items():
            (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (self.root / relative).write_bytes(content)
            else:
                (self.root / relative).write_text(content)
        shutil.copy2(REPO / "flydeploy.py", self.root / "flydeploy.py")
        self.log_path = self.base / "app.log"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("FLY_", "FLYDEPLOY_", "AWS_", "BUCKET"))}
        self.env.update({"FLY_APP_NAME": app, "PORT": str(self.port), "PYTHONUNBUFFERED": "1",
                         "FLYDEPLOY_RUNTIME_DIR": str(self.base / "run"),
                         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
        self.process: subprocess.Popen | None = None
        self.command = command.format(port=self.port)
        self.ready = ready

    def start(self, *, timeout: float = 30.0) -> LocalApp:
        """Start the app and wait until it serves."""
        offset = len(self.logs())
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command.split(), cwd=self.root, env=self.env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.logs()}")
            return self.ready in self.logs()[offset:]

        wait_for(serving, timeout=timeout, what=f"{self.name} to serve")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the app's process group (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``python -m flydeploy_cli <args> --local --root <tree>`` against this app's processes."""
        env = dict(self.env, PYTHONPATH=str(REPO))
        return subprocess.run([sys.executable, "-m", "flydeploy_cli", *args, "--local", "--root", str(self.root),
                               "--app", self.app], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=self.base)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# --- on the fake Fly ----------------------------------------------------------


def fly_app(fakefly, seaweed, base: pathlib.Path, name: str, *, machines: int, command: str):
    """Example app ``name`` deployed (cold) to ``machines`` fake machines with S3 secrets; returns (tree, app).

    The Fly app gets a name unique to the test run: the S3 bucket is shared.
    """
    app_name = f"{name}-{secrets.token_hex(3)}"
    tree = write_app_tree(base / name, app_files(name), app=app_name, processes={"app": command})
    return tree, fakefly.create_app(app_name, tree, machines=machines, secrets=seaweed.env())


def machine_url(machine, *, timeout: float = 30.0) -> str:
    """The URL the machine's app serves on (its latest start), once it serves."""
    def port() -> str | None:
        logs = machine.logs().rsplit("[fakefly] starting", 1)[-1]
        found = (re.findall(r"listening on port (\d+)", logs)
                 or re.findall(r"Listening at: http://[\d.]+:(\d+)", logs))
        ready = "ready" in logs or "Booting worker" in logs
        return found[-1] if found and ready else None
    return f"http://127.0.0.1:{wait_for(port, timeout=timeout, what=f'machine {machine.id} to serve')}"


def hot(fakefly, tree: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m flydeploy_cli hot`` run by the developer in the app's project folder."""
    env = fakefly.env(dict(os.environ, PYTHONPATH=str(REPO)))
    return subprocess.run([sys.executable, "-m", "flydeploy_cli", "hot", *args], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=180)
