"""App trees and processes for the machine-side tests.

A ``Machine`` is a directory standing in for one Fly machine: the app tree,
a private runtime directory for the agents' sockets, and the environment the
platform would give its processes.  Apps run as real subprocesses that import
``flydeploy`` from this repository.  The ``machine`` and ``local_store``
fixtures load with ``pytest_plugins = ["tests.machine_apps"]``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import flydeploy

REPO = pathlib.Path(__file__).resolve().parent.parent
MARKER = "__FLYDEPLOY_RESULT__"

# A small web app: greeting() from greet.py, a counter server from counter.py.
MAIN_PY = '''\
import http.server, json, logging, os, sys
import flydeploy
logging.basicConfig(level=logging.INFO, format="%(process)d %(message)s")
OUTCOME = flydeploy.startup_reapply_current(**json.loads(os.environ.get("APP_STARTUP", "{}")))
import counter, greet
if os.environ.get("APP_EXTRA"):
    import extra
COUNTER = counter.Counter.start(name="counter")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":  # unhealthy while greet.py says so
            self.send_response(200 if getattr(greet, "HEALTHY", True) else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/bump":
            COUNTER.cast("inc")
        if self.path == "/fork":
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(write, json.dumps({"pid": os.getpid(), "greeting": greet.greeting(),
                                            "info": flydeploy.get_current_hot_upgrade_info()}).encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                body = pipe.read()
            os.waitpid(pid, 0)
        else:
            body = json.dumps({"pid": os.getpid(), "greeting": greet.greeting(), "count": COUNTER.call("get"),
                               "outcome": OUTCOME, "info": flydeploy.get_current_hot_upgrade_info()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT") or 0)), Handler)
port_file = os.environ["APP_PORT_FILE"]
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.replace(port_file + ".tmp", port_file)
server.serve_forever()
'''

COUNTER_PY = '''\
import flydeploy

def label(n):
    return f"{LABEL}:{n}"

LABEL = "count-v1"

class Counter(flydeploy.Server):
    vsn = 1
    def init(self):
        return {"n": 0}
    def handle_call(self, request, state):
        return label(state["n"]), state
    def handle_cast(self, message, state):
        return {"n": state["n"] + 1}
'''

GREET_V1 = 'def greeting():\n    return "hello v1"\n'
GREET_V2 = 'def greeting():\n    return "hello v2"\n'


def wait_for(condition, *, timeout: float = 30.0, what: str = "the condition"):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def short_tempdir() -> str:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    return tempfile.mkdtemp(prefix="fdm-", dir="/tmp")


def write_tree(root: pathlib.Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def parse_result(stdout: str) -> dict:
    """The one result between the markers of ``rpc upgrade`` output."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, f"expected exactly one result line, got {len(lines)}:\n{stdout}"
    assert lines[0].endswith(MARKER)
    return json.loads(lines[0][len(MARKER):-len(MARKER)])


class AppProcess:
    """A running app subprocess."""

    def __init__(self, machine: Machine, argv: list[str], env: dict[str, str], name: str) -> None:
        self.machine = machine
        self.port_file = pathlib.Path(env["APP_PORT_FILE"])
        self.log_path = machine.base / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=machine.app_root, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> AppProcess:
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"app process exited with {self.proc.returncode}:\n{self.log()}")
            return self.port_file.exists() and self.machine.socket_of(self.pid).exists()
        wait_for(ready, what=f"app process {self.pid} to listen")
        return self

    def get(self, path: str = "/") -> dict:
        port = int(self.port_file.read_text())
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: app\r\n\r\n".encode())
            return json.loads(_read_http_body(sock))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def _read_http_body(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    return body


def http_get_unix(path: str, url_path: str = "/") -> dict:
    """GET over a unix socket (gunicorn bound to ``unix:path``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(f"GET {url_path} HTTP/1.0\r\nHost: app\r\n\r\n".encode())
        return json.loads(_read_http_body(sock))


class Machine:
    """One stand-in Fly machine: an app tree, a runtime directory and an environment."""

    def __init__(self, base: pathlib.Path, *, app: str = "shop", image_ref: str | None = "registry.fly.io/shop:deploy-1",
                 env: dict[str, str] | None = None) -> None:
        self.base = base
        self.app = app
        self.app_root = base / "app"
        self.app_root.mkdir(parents=True, exist_ok=True)
        self.runtime = pathlib.Path(short_tempdir())
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("FLY_", "FLYDEPLOY_", "AWS_", "BUCKET"))}
        self.env.update({"PYTHONPATH": str(REPO), "FLY_APP_NAME": app, "FLY_MACHINE_ID": "m-" + base.name[-8:],
                         "FLY_REGION": "ams", "FLYDEPLOY_RUNTIME_DIR": str(self.runtime),
                         # Bytecode is cached, as on a real machine, but outside the app tree.
                         "PYTHONPYCACHEPREFIX": str(base / "pycache"),
                         # A boot catch-up on a busy test host may take longer than the default
                         # deadline of a real machine; the deadline's own tests set theirs.
                         "FLYDEPLOY_STARTUP_DEADLINE": "60"})
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        if image_ref:
            self.env["FLY_IMAGE_REF"] = image_ref
        self.env.update(env or {})
        self.processes: list[AppProcess] = []

    def write(self, files: dict[str, str]) -> None:
        write_tree(self.app_root, files)

    def write_web_app(self) -> None:
        self.write({"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V1})

    def socket_dir(self) -> pathlib.Path:
        return self.runtime / self.app

    def socket_of(self, pid: int) -> pathlib.Path:
        return self.socket_dir() / f"{pid}.sock"

    def start(self, argv: list[str] | None = None, *, env: dict[str, str] | None = None) -> AppProcess:
        name = f"proc{len(self.processes)}"
        full_env = {**self.env, "APP_PORT_FILE": str(self.base / f"{name}.port"), **(env or {})}
        process = AppProcess(self, argv or [sys.executable, "main.py"], full_env, name)
        self.processes.append(process)
        return process

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120,
            cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=cwd or self.base, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def rpc(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``python -m flydeploy rpc ...`` started in the app root, as ``hot --local`` and an exec
        in the app's directory start it: where the machine side takes the app root from."""
        return self.run([sys.executable, "-m", "flydeploy", "rpc", *args], env=env, cwd=self.app_root)

    def python(self, code: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-c", code], env=env, cwd=self.app_root)

    def close(self) -> None:
        for process in self.processes:
            process.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)


# --- releases and fixtures ------------------------------------------------------


def make_release(tmp_path: pathlib.Path, store, files: dict[str, str], *, version: str, app: str = "shop"):
    """Pack a source tree (the developer's checkout) and upload it; returns (release, url)."""
    source = tmp_path / f"src-{version}"
    write_tree(source, files)
    release = flydeploy.pack_release(source, tmp_path / f"{app}-{version}.tar.gz", app=app, version=version)
    key = flydeploy.release_key(app, version)
    store.upload(key, release.path)
    return release, store.url(key)


@pytest.fixture
def machine(tmp_path):
    machine = Machine(tmp_path)
    yield machine
    machine.close()


@pytest.fixture
def local_store(tmp_path):
    return flydeploy.LocalStore(tmp_path / "store")
