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


# --- a run killed at a named step ------------------------------------------------

MANY = 400


def many_files(version: str) -> dict[str, str]:
    return {f"data/mod_{n:03}.py": f"VERSION = {version!r}\n" for n in range(MANY)}


def start_stopping_at(machine: Machine, url: str, step: str) -> subprocess.Popen:
    """``rpc upgrade`` in its own process group, stopped at ``step`` (it says so in a file)."""
    rpc = subprocess.Popen([sys.executable, "-m", "flydeploy", "rpc", "upgrade", "--app", "shop", "--url", url],
                           cwd=machine.app_root, env={**machine.env, "FLYDEPLOY_TEST_STOP_AT": step},
                           stdout=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: (machine.socket_dir() / f"stopped-at-{step}").exists() or rpc.poll() is not None,
             what=f"rpc upgrade to reach {step}")
    assert rpc.poll() is None, f"rpc upgrade ended before {step}"
    (machine.socket_dir() / f"stopped-at-{step}").unlink()
    return rpc


def kill(rpc: subprocess.Popen, *, guardian_too: bool) -> None:
    if guardian_too:
        os.killpg(rpc.pid, signal.SIGKILL)
    else:
        os.kill(rpc.pid, signal.SIGKILL)
    rpc.wait()


def mixed(root: pathlib.Path) -> bool:
    versions = {(root / rel).read_text() for rel in many_files("v1")}
    return versions == {"VERSION = 'v1'\n", "VERSION = 'v2'\n"}


def no_debris(machine: Machine) -> bool:
    return not (machine.socket_dir() / "journal.json").exists()


def test_a_run_killed_while_publishing_is_undone_by_its_guardian(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.write(many_files("v1"))
    process = machine.start().wait_ready()
    before = tree(machine.app_root)
    _release, url = make_release(tmp_path, local_store, {**WEB_V2, **many_files("v2")}, version="v2")
    rpc = start_stopping_at(machine, url, "publish")
    assert mixed(machine.app_root)  # killed with half the files published
    kill(rpc, guardian_too=False)
    wait_for(lambda: no_debris(machine), what="the guardian to undo the publishing")
    assert tree(machine.app_root) == before
    assert not (machine.socket_dir() / "state.json").exists()
    assert process.get()["greeting"] == "hello v1"


def test_a_run_killed_with_its_guardian_is_recovered_by_the_next_run(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.write(many_files("v1"))
    process = machine.start().wait_ready()
    files = {**WEB_V2, **many_files("v2")}
    _release, url = make_release(tmp_path, local_store, files, version="v2")
    kill(start_stopping_at(machine, url, "publish"), guardian_too=True)
    assert mixed(machine.app_root) and (machine.socket_dir() / "journal.json").exists()
    code, result, output = upgrade(machine, url)
    assert code == 0 and result["files_written"] == len(files) - 1, output  # main.py is unchanged
    assert tree(machine.app_root) == {rel: text.encode() for rel, text in files.items()}  # nothing else
    assert process.get()["greeting"] == "hello v2" and no_debris(machine)


def test_a_booting_process_recovers_first(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.write(many_files("v1"))
    before = tree(machine.app_root)
    _release, url = make_release(tmp_path, local_store, {**WEB_V2, **many_files("v2")}, version="v2")
    kill(start_stopping_at(machine, url, "publish"), guardian_too=True)
    assert mixed(machine.app_root)
    process = machine.start().wait_ready()
    assert tree(machine.app_root) == before and no_debris(machine)
    assert process.get()["count"] == "count-v1:0"


def test_a_run_killed_while_unpacking_leaves_its_work_area_to_the_next_run(machine, tmp_path, local_store):
    machine.write_web_app()
    before = tree(machine.app_root)
    _release, url = make_release(tmp_path, local_store, {**WEB_V2, **many_files("v2")}, version="v2")
    rpc = start_stopping_at(machine, url, "unpack")
    area = machine.socket_dir() / f"work-{rpc.pid}"
    assert (area / "release.tar.gz").exists()
    kill(rpc, guardian_too=True)
    assert area.exists() and tree(machine.app_root) == before
    missing = local_store.url(flydeploy.release_key("shop", "v9"))
    code, _result, output = upgrade(machine, missing)  # even a run that fails to download cleans up
    assert code == 1, output
    assert not area.exists()
    assert [p.name for p in machine.socket_dir().iterdir() if p.name.startswith("work-")] == []


def test_a_timeout_of_hot_local_ends_the_run_through_the_same_recovery(machine, tmp_path):
    machine.write_web_app()
    machine.write(many_files("v1"))
    process = machine.start().wait_ready()
    before = tree(machine.app_root)
    source = tmp_path / "checkout"
    for rel, text in {**WEB_V2, **many_files("v2")}.items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_text(text)
    env = {**machine.env, "FLYDEPLOY_APP_ROOT": str(machine.app_root), "FLYDEPLOY_TEST_STOP_AT": "publish"}
    done = subprocess.run([sys.executable, "-m", "flydeploy_cli", "hot", "--local", "--root", str(source),
                           "--app", "shop", "--store", str(tmp_path / "store"), "--timeout", "5"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    # The timeout killed rpc upgrade mid-publish; its guardian puts everything back.
    wait_for(lambda: no_debris(machine), what="the guardian to undo the publishing")
    assert tree(machine.app_root) == before
    assert process.get()["greeting"] == "hello v1"


STUCK_COUNTER = COUNTER_PY.replace("count-v1", "count-v2") + '''\
    vsn = 2
    def code_change(self, old_vsn, state, extra):
        import os, time
        port_file = os.environ["APP_PORT_FILE"]
        open(port_file + ".migrating", "w").close()
        while not os.path.exists(port_file + ".go"):
            time.sleep(0.01)
        open(port_file + ".returned", "w").close()
        return {"n": state["n"] + 1000}
'''


def test_a_code_change_that_never_returns_is_rolled_back_at_the_suspend_timeout(machine, tmp_path, local_store):
    machine.write_web_app()
    processes = [machine.start().wait_ready() for _ in range(2)]
    for process in processes:
        process.get("/bump")
    _release, url = make_release(tmp_path, local_store, {**WEB_V2, "counter.py": STUCK_COUNTER}, version="v2")
    code, result, output = upgrade(machine, url, "--suspend-timeout", "1")
    assert code == 1 and "did not return within the 1 s the pause may last" in result["error"], output
    for process in processes:
        assert pathlib.Path(f"{process.port_file}.migrating").exists()
        assert not pathlib.Path(f"{process.port_file}.returned").exists()  # still stuck in code_change
        # Rolled back and resumed: the server answers with the old code and state meanwhile.
        reply = process.get()
        assert (reply["greeting"], reply["count"]) == ("hello v1", "count-v1:1")
    # The late completion changes nothing: what was reported is what runs.
    for process in processes:
        pathlib.Path(f"{process.port_file}.go").touch()
    for process in processes:
        wait_for(lambda: pathlib.Path(f"{process.port_file}.returned").exists(), what="code_change to return")
        reply = process.get()
        assert (reply["greeting"], reply["count"]) == ("hello v1", "count-v1:1")
    assert (machine.app_root / "counter.py").read_text() == COUNTER_PY
    info = json.loads(machine.rpc("info", "--app", "shop").stdout)
    assert {entry["version"] for entry in info} == {None}
