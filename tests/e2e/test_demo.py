"""``python -m flydeploy_cli demo``: the newcomer's first command, run as a user runs it."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

from tests.machine_apps import wait_for

REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def _demo(**kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLY_", "FLYDEPLOY_", "AWS_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.Popen([sys.executable, "-m", "flydeploy_cli", "demo"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, **kwargs)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_shows_a_hot_upgrade_that_keeps_process_stream_and_state():
    demo = _demo()
    out, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()}
    pid = re.search(r"started it \(pid (\d+)\)", out).group(1)
    assert re.fullmatch(rf"pid\s+{pid}\s+{pid}\s+same process", rows["pid"]), out
    assert "never closed" in rows["stream"] and re.search(r"v1 tick \d+\s+v2 tick \d+", rows["stream"]), out
    ticks_before = int(re.search(r'"n": (\d+)', rows["counter"]).group(1))
    ticks_after = int(re.search(r'"ticks": (\d+)', rows["counter"]).group(1))
    assert ticks_after >= ticks_before, out
    assert re.search(r"GET /\s+v1\s+v2\s+v2 answers", rows["GET"]), out
    assert re.search(r"suspended\s+\d+\.\d ms", rows["suspended"]), out
    folder = re.search(r"wrote a small app to (\S+):", out).group(1)
    assert not os.path.exists(folder), "the demo left its folder behind"
    assert not _alive(int(pid)), "the demo left its app running"
    seconds = float(re.search(r"done in ([\d.]+) s", out).group(1))
    assert seconds < 10, out


def test_demo_cleans_up_on_ctrl_c():
    demo = _demo()
    lines: list[str] = []
    for line in demo.stdout:
        lines.append(line)
        if "started it" in line:
            break
    out = "".join(lines)
    pid = int(re.search(r"started it \(pid (\d+)\)", out).group(1))
    folder = re.search(r"wrote a small app to (\S+):", out).group(1)
    assert _alive(pid) and os.path.isdir(folder), out
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=30)
    assert demo.returncode == 130, out + rest
    wait_for(lambda: not _alive(pid), timeout=10, what="the demo app to be gone")
    assert not os.path.exists(folder), "the demo left its folder behind after Ctrl-C"
