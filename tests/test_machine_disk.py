"""The files on a machine equal what its processes run: a refused release is taken back off the
disk, a process started meanwhile runs one version whole, and a run killed at any step is
finished or undone by the next one."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import flydeploy
from tests.machine_apps import (COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, Machine, make_release, parse_result,
                                wait_for)

pytest_plugins = ["tests.machine_apps"]

WEB_V2 = {"main.py": MAIN_PY, "counter.py": COUNTER_PY.replace("count-v1", "count-v2"), "greet.py": GREET_V2}


def upgrade(machine: Machine, url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    done = machine.rpc("upgrade", "--app", machine.app, "--url", url, *args, env=env)
    return done.returncode, parse_result(done.stdout), done.stdout + done.stderr


def tree(root: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_refused_release_is_taken_back_off_the_disk(machine, tmp_path, local_store):
    machine.write_web_app()
    before = tree(machine.app_root)
    process = machine.start().wait_ready()
    broken = {**WEB_V2, "greet.py": "def greeting(:\n"}
    _release, url = make_release(tmp_path, local_store, broken, version="v2")
    code, result, output = upgrade(machine, url)
    assert code == 1 and "syntax error in" in result["error"], output
    assert tree(machine.app_root) == before  # every file as it was, nothing left beside them
    assert not (machine.socket_dir() / "state.json").exists()
    assert not (machine.socket_dir() / "journal.json").exists()
    assert process.get()["greeting"] == "hello v1"
    # A process started afterwards boots the same code, not the refused release.
    late = machine.start().wait_ready()
    assert late.get() | {"pid": 0, "outcome": None, "info": None} == {
        "pid": 0, "greeting": "hello v1", "count": "count-v1:0", "outcome": None, "info": None}


def holds_open(pid: int, path: pathlib.Path) -> bool:
    """Whether process ``pid`` has ``path`` open (a process waiting for the machine lock does)."""
    fds = pathlib.Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False


REFUSING_COUNTER = COUNTER_PY.replace("count-v1", "count-v2") + '''\
    vsn = 2
    def code_change(self, old_vsn, state, extra):
        import os, time
        open(os.environ["APP_PORT_FILE"] + ".migrating", "w").close()
        while not os.path.exists(os.environ["APP_PORT_FILE"] + ".go"):
            time.sleep(0.01)
        raise RuntimeError("cannot migrate this state")
'''


def test_a_process_started_during_an_upgrade_runs_one_version_whole(machine, tmp_path, local_store):
    machine.write_web_app()
    first = machine.start().wait_ready()
    _release, url = make_release(tmp_path, local_store, {**WEB_V2, "counter.py": REFUSING_COUNTER}, version="v2")
    rpc = subprocess.Popen([sys.executable, "-m", "flydeploy", "rpc", "upgrade", "--app", "shop", "--url", url,
                            "--suspend-timeout", "60"], cwd=machine.app_root, env=machine.env,
                           stdout=subprocess.PIPE, text=True)
    # The v2 files are published and the first process is in the middle of applying them.
    wait_for(lambda: pathlib.Path(f"{first.port_file}.migrating").exists(), what="code_change to start")
    assert (machine.app_root / "greet.py").read_text() == GREET_V2
    second = machine.start()
    # It waits for the upgrade in flight (on the machine lock) before it reads the files.
    lock = machine.socket_dir() / "upgrade.lock"
    wait_for(lambda: holds_open(second.pid, lock), what="the second process to wait for the upgrade")
    assert not second.port_file.exists()
    pathlib.Path(f"{first.port_file}.go").touch()  # the first process refuses: the release is undone
    result = parse_result(rpc.communicate(timeout=90)[0])
    assert rpc.returncode == 1 and "cannot migrate this state" in result["error"]
    second.wait_ready()
    for process in (first, second):
        reply = process.get()
        assert (reply["greeting"], reply["count"].split(":")[0]) == ("hello v1", "count-v1"), process.pid
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
