"""flydeploy_cli: the developer-side command line of flydeploy.

    python -m flydeploy_cli hot        build, push and hot-upgrade every machine
    python -m flydeploy_cli status     what every machine runs
    python -m flydeploy_cli rollback   back to an earlier hot upgrade
    python -m flydeploy_cli demo       a live hot upgrade on this machine, shown side by side

Standard library only; the work itself is done by ``flydeploy``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable

import flydeploy

__all__ = ["main", "demo", "DEMO_APP"]


# --- demo -------------------------------------------------------------------

DEMO_APP = "flydeploy-demo"
"""The app name the demo's processes and its local store use."""

_DEMO_MAIN = '''\
"""The demo app: an HTTP endpoint, a TCP stream of ticks and a Counter server."""

import http.server
import json
import os
import socketserver
import threading
import time

import flydeploy

flydeploy.startup_reapply_current()  # the one line at boot: tracking and this process's agent

import counter  # noqa: E402  (the code the demo upgrades)

COUNTER = counter.Counter.start(name="counter")


class Stream(socketserver.StreamRequestHandler):
    """A client that stays connected: a tick line every 50 ms."""

    def handle(self):
        while True:
            COUNTER.cast("tick")
            self.wfile.write((counter.tick_line(COUNTER.call("get")) + "\\n").encode())
            time.sleep(0.05)


class Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "version": counter.VERSION,
                           "counter": COUNTER.call("get")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


socketserver.ThreadingTCPServer.daemon_threads = True
http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Http)
stream_server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Stream)
threading.Thread(target=stream_server.serve_forever, daemon=True).start()
print(json.dumps({"http": http_server.server_address[1], "stream": stream_server.server_address[1]}), flush=True)
http_server.serve_forever()
'''

_DEMO_COUNTER_V1 = '''\
import flydeploy

VERSION = "v1"


class Counter(flydeploy.Server):
    vsn = 1

    def init(self):
        return {"n": 0}

    def handle_call(self, request, state):
        return dict(state), state

    def handle_cast(self, message, state):
        return {"n": state["n"] + 1}


def tick_line(state):
    return f"v1 tick {state['n']}"
'''

_DEMO_COUNTER_V2 = '''\
import flydeploy

VERSION = "v2"


class Counter(flydeploy.Server):
    vsn = 2

    def init(self):
        return {"ticks": 0, "since_upgrade": 0}

    def handle_call(self, request, state):
        return dict(state), state

    def handle_cast(self, message, state):
        return {"ticks": state["ticks"] + 1, "since_upgrade": state["since_upgrade"] + 1}

    def code_change(self, old_vsn, state, extra):
        # v1 kept {"n": ...}; v2 keeps the same count under a new shape.
        return {"ticks": state["n"], "since_upgrade": 0}


def tick_line(state):
    return f"v2 tick {state['ticks']} ({state['since_upgrade']} since the upgrade)"
'''

_DEMO_DEADLINE_S = 8.0


class _StreamReader(threading.Thread):
    """Reads the demo app's tick stream; remembers every line, when it came, and how the stream ended."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True, name="demo-stream")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=_DEMO_DEADLINE_S)
        self.lines: list[tuple[float, str]] = []
        self.ended: str | None = None

    def run(self) -> None:
        try:
            with self.sock.makefile("r", encoding="utf-8") as stream:
                for line in stream:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.ended = "closed by the app"
        except OSError as exc:
            self.ended = self.ended or f"broken: {exc}"

    def close(self) -> None:
        self.ended = self.ended or "closed by the demo"
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _demo_wait(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + _DEMO_DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise flydeploy.FlyDeployError(f"demo: timed out waiting for {what}")
        time.sleep(0.02)


def _demo_get(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=_DEMO_DEADLINE_S) as response:
        return json.loads(response.read())


def _demo_suspend_ms(store: str) -> float | None:
    """The suspension the machine reported, from the result file the upgrade stored."""
    for path in glob.glob(os.path.join(store, "releases", f"{DEMO_APP}-results", "*", "*.json")):
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as file:
                return float(json.load(file)["suspend_duration_ms"])
    return None


def _demo_start(root: str, env: dict[str, str]) -> tuple[subprocess.Popen, dict]:
    """Start the demo app (its output goes to app.log) and return it with its ports."""
    log_path = os.path.join(root, "app.log")
    with open(log_path, "wb") as log:
        app = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=env, stdin=subprocess.DEVNULL,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def first_line() -> str | None:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            line = log.readline()
        return line if line.endswith("\n") or app.poll() is not None else None

    _demo_wait(first_line, "the app to start")
    try:
        return app, json.loads(first_line())
    except ValueError:
        _demo_stop(app)
        raise flydeploy.FlyDeployError(f"demo: the app did not start:\n{_demo_log(root)}") from None


def _demo_log(root: str) -> str:
    with open(os.path.join(root, "app.log"), encoding="utf-8", errors="replace") as log:
        return log.read()


def _demo_stop(app: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(app.pid, signal.SIGTERM)
    try:
        app.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(app.pid, signal.SIGKILL)
        app.wait()


def _demo_table(before: dict, after: dict, stream: _StreamReader, upgraded_at: float,
                suspend_ms: float | None) -> list[str]:
    times = [at for at, _ in stream.lines]
    gap_ms = max((b - a for a, b in zip(times, times[1:])), default=0.0) * 1000
    first_v2 = next((line for _, line in stream.lines if line.startswith("v2")), "(none)")
    last_v1 = next((line for _, line in reversed(stream.lines) if line.startswith("v1")), "(none)")
    suspension = f"{suspend_ms:.1f} ms" if suspend_ms is not None else "(not reported)"
    rows = [
        ("", "before (v1)", "after (v2)", ""),
        ("pid", before["pid"], after["pid"],
         "same process" if before["pid"] == after["pid"] else "A DIFFERENT PROCESS"),
        ("stream", last_v1, first_v2,
         f"never closed, {len(stream.lines)} lines, longest gap {gap_ms:.0f} ms" if stream.ended is None
         else f"ENDED: {stream.ended}"),
        ("counter", json.dumps(before["counter"]), json.dumps(after["counter"]),
         "kept and migrated by code_change"),
        ("GET /", before["version"], after["version"], "v2 answers" if after["version"] == "v2" else ""),
        ("suspended", "", suspension, f"upgrade took {upgraded_at * 1000:.0f} ms end to end"),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[3])
            for row in rows]


def demo() -> int:
    """``python -m flydeploy_cli demo``: a live hot upgrade on this machine, shown side by side.

    Writes a small app to a temporary folder, starts it, keeps a client
    streaming from it, edits the app to a v2 whose ``code_change`` migrates
    the counter's state, runs ``hot --local`` on it and prints what happened.
    Removes everything it made, also when interrupted.  Exit 0 when the
    upgrade kept the process, the stream and the state, and v2 answers.
    """
    started = time.monotonic()
    root = tempfile.mkdtemp(prefix="flydeploy-demo-")
    runtime = os.path.join(root, "run")
    saved_runtime = os.environ.get("FLYDEPLOY_RUNTIME_DIR")
    app = stream = None
    try:
        files = {"app.py": _DEMO_MAIN, "counter.py": _DEMO_COUNTER_V1}
        for name, text in files.items():
            with open(os.path.join(root, name), "w", encoding="utf-8") as file:
                file.write(text)
        os.environ["FLYDEPLOY_RUNTIME_DIR"] = runtime  # the agents and `hot --local` meet here
        library = os.path.dirname(os.path.abspath(flydeploy.__file__))
        env = dict(os.environ, FLY_APP_NAME=DEMO_APP, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [library, os.environ.get("PYTHONPATH")])))
        env.pop("FLY_IMAGE_REF", None)  # local mode: nothing to reapply at boot
        print(f"1. wrote a small app to {root}: an HTTP endpoint, a TCP stream, a Counter server")
        app, ports = _demo_start(root, env)
        before = _demo_get(ports["http"])
        print(f"2. started it (pid {before['pid']}); a client is streaming ticks from it")
        stream = _StreamReader(ports["stream"])
        stream.start()
        _demo_wait(lambda: len(stream.lines) >= 5, "the first ticks")
        before = _demo_get(ports["http"])
        with open(os.path.join(root, "counter.py"), "w", encoding="utf-8") as file:
            file.write(_DEMO_COUNTER_V2)
        print("3. edited counter.py to v2: a new tick line, the counter's state in a new shape")
        print(f"4. python -m flydeploy_cli hot --local --root {root}")
        store = os.path.join(root, ".flydeploy")
        upgrade_started = time.monotonic()
        output = io.StringIO()
        with contextlib.redirect_stdout(output):
            code = main(["hot", "--local", "--root", root, "--store", store, "--app", DEMO_APP])
        upgraded_at = time.monotonic() - upgrade_started
        print("\n".join("     " + line for line in output.getvalue().splitlines()))
        if code != 0:
            print(f"the hot upgrade failed (exit {code}); the app's output:\n{_demo_log(root)}", file=sys.stderr)
            return code
        count = len(stream.lines)
        _demo_wait(lambda: len(stream.lines) >= count + 3 and stream.lines[-1][1].startswith("v2"),
                   "v2 ticks on the stream")
        after = _demo_get(ports["http"])
        print()
        print("\n".join(_demo_table(before, after, stream, upgraded_at, _demo_suspend_ms(store))))
        ok = (before["pid"] == after["pid"] and stream.ended is None and after["version"] == "v2"
              and after["counter"]["ticks"] >= before["counter"]["n"])
        print(f"\n{'done' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s; cleaned up {root}")
        return 0 if ok else 1
    finally:
        if stream is not None:
            stream.close()
        if app is not None:
            _demo_stop(app)
        if saved_runtime is None:
            os.environ.pop("FLYDEPLOY_RUNTIME_DIR", None)
        else:
            os.environ["FLYDEPLOY_RUNTIME_DIR"] = saved_runtime
        shutil.rmtree(root, ignore_errors=True)


# --- Argument parsing -------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flydeploy_cli",
        description="Hot code upgrades for Python applications on Fly.io.",
    )
    parser.add_argument("--version", action="version", version=f"flydeploy {flydeploy.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", allow_abbrev=False,
                        help="see a live hot upgrade on this machine (nothing to set up)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = {"demo": lambda _: demo()}[args.command]
    try:
        return handler(args)
    except flydeploy.FlyDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
