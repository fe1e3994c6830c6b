"""``python -m flydeploy_cli demo``: the newcomer's first command, run as a user runs it."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import flydeploy_cli
from tests.machine_apps import wait_for

REPO = pathlib.Path(__file__).resolve().parent.parent.parent

# A shell of someone who also deploys for real: none of it may reach the demo's app or its upgrade.
USER_SETTINGS = {
    "FLYDEPLOY_APP_ROOT": "/nonexistent/app", "FLYDEPLOY_RUNTIME_DIR": "/nonexistent/run",
    "FLYDEPLOY_POLL_INTERVAL": "0.01", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
    "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_REGION": "auto", "BUCKET_NAME": "someone-elses-bucket",
    "FLY_APP_NAME": "someone-elses-app", "FLY_IMAGE_REF": "registry.fly.io/other:deployment-1",
    "FLY_MACHINE_ID": "148e21ea7d1089", "FLY_API_TOKEN": "FlyV1 secret",
}


def _demo(**kwargs) -> subprocess.Popen:
    env = dict(os.environ, **USER_SETTINGS, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "flydeploy_cli", "demo"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _apps_in(folder: str) -> list[int]:
    """The pids of the demo apps running in ``folder`` (past their exec: ``app.py`` in their command line)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                in_folder = os.readlink(f"/proc/{entry}/cwd").removesuffix(" (deleted)") == folder
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if in_folder and b"app.py" in cmdline.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _read_until(demo: subprocess.Popen, marker: str) -> str:
    lines: list[str] = []
    for line in demo.stdout:
        lines.append(line)
        if marker in line:
            break
    return "".join(lines)


def test_demo_shows_a_hot_upgrade_that_keeps_process_stream_and_state():
    demo = _demo()
    out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    pid = re.search(r"started it \(pid (\d+)\)", out).group(1)
    assert re.fullmatch(rf"pid\s+{pid}\s+{pid}\s+same process", rows["pid"]), out
    assert "never closed" in rows["stream"] and re.search(r"v1 tick \d+\s+v2 tick \d+", rows["stream"]), out
    ticks_before = int(re.search(r'"n": (\d+)', rows["counter"]).group(1))
    after = re.search(r'"ticks": (\d+), "since_upgrade": (\d+)', rows["counter"])
    assert int(after.group(1)) - int(after.group(2)) >= ticks_before, out
    assert rows["counter"].endswith("kept and migrated by code_change"), out
    assert re.search(r"GET /\s+v1\s+v2\s+v2 answers", rows["GET"]), out
    assert re.search(r"suspended\s+\d+\.\d ms", rows["suspended"]), out
    folder = re.search(r"wrote a small app to (\S+):", out).group(1)
    step4 = re.search(r"^4\. FLYDEPLOY_RUNTIME_DIR=(\S+) python -m flydeploy_cli (hot --local .*)$", out, re.M)
    assert step4.group(1) == f"{folder}/run" and f"--root {folder} " in step4.group(2), out
    assert not os.path.exists(folder), "the demo left its folder behind"
    assert not _alive(int(pid)), "the demo left its app running"
    assert out.rstrip().endswith(f"cleaned up {folder}"), out
    seconds = float(re.search(r"done in ([\d.]+) s", out).group(1))
    assert seconds < 10, out


def test_demo_ctrl_c_while_the_app_starts_stops_it():
    demo = _demo()
    out = _read_until(demo, "wrote a small app")
    folder = re.search(r"wrote a small app to (\S+):", out).group(1)
    wait_for(lambda: _apps_in(folder), timeout=10, what="the demo app to be started")
    # Held before it can announce its ports, the demo is surely still waiting for them at the Ctrl-C.
    # It stays held: only the demo's cleanup (SIGTERM, then SIGKILL) can end it.
    (app,) = _apps_in(folder)
    os.kill(app, signal.SIGSTOP)
    try:
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=30)
        assert demo.returncode == 130, out + rest
        wait_for(lambda: not _alive(app), timeout=10, what="the demo app to be gone")
        assert not os.path.exists(folder), "the demo left its folder behind after Ctrl-C"
    finally:
        if _alive(app):
            os.kill(app, signal.SIGKILL)


def _interrupt_after_start(signum: int) -> None:
    demo = _demo()
    out = _read_until(demo, "started it")
    pid = int(re.search(r"started it \(pid (\d+)\)", out).group(1))
    folder = re.search(r"wrote a small app to (\S+):", out).group(1)
    assert _alive(pid) and os.path.isdir(folder), out
    demo.send_signal(signum)
    rest, _ = demo.communicate(timeout=30)
    assert demo.returncode == 130, out + rest
    wait_for(lambda: not _alive(pid), timeout=10, what="the demo app to be gone")
    assert not os.path.exists(folder), f"the demo left its folder behind after {signal.Signals(signum).name}"


def test_demo_cleans_up_on_ctrl_c():
    _interrupt_after_start(signal.SIGINT)


def test_demo_cleans_up_on_sigterm():
    _interrupt_after_start(signal.SIGTERM)


def test_demo_cleans_up_on_sighup():
    _interrupt_after_start(signal.SIGHUP)


def test_signals_held_during_start_and_cleanup_act_only_when_it_is_done():
    done = []
    try:
        # As in the demo: the signals interrupt it, and are held around its start and its cleanup.
        with flydeploy_cli._signal_handlers(flydeploy_cli._interrupt, flydeploy_cli._DEMO_SIGNALS), \
                flydeploy_cli._signals_deferred(flydeploy_cli._DEMO_SIGNALS):
            os.kill(os.getpid(), signal.SIGINT)   # a second Ctrl-C in the middle of the cleanup
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("cleanup finished")
    except KeyboardInterrupt as interrupt:
        assert str(interrupt) == "SIGINT"
    else:
        raise AssertionError("the held Ctrl-C was lost")
    assert done == ["cleanup finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handlers were not restored"


def test_demo_ports_come_from_the_ready_file_not_the_apps_output(tmp_path):
    (tmp_path / "app.py").write_text(textwrap.dedent("""\
        import json, os, sys, time
        print("DeprecationWarning: something the app's libraries say first", file=sys.stderr, flush=True)
        print("and a line on stdout too", flush=True)
        with open(sys.argv[1] + ".tmp", "w") as file:
            json.dump({"http": 1, "stream": 2}, file)
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
        time.sleep(60)
        """))
    app = flydeploy_cli._demo_launch(str(tmp_path), {"PATH": os.environ["PATH"]})
    try:
        assert flydeploy_cli._demo_ports(str(tmp_path), app, time.monotonic() + 10) == {"http": 1, "stream": 2}
    finally:
        flydeploy_cli._demo_stop(app)
