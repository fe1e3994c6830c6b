"""The machine side under failure: every `rpc upgrade` ends in one result, a failed write changes
nothing, stuck or dying processes, racing upgrades, forks, hostile peers and bad input."""

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
import threading
import time

import pytest

import flydeploy
from tests.machine_apps import (COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, MARKER, Machine, make_release, parse_result,
                                wait_for)

pytest_plugins = ["tests.machine_apps"]

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, like `fly machine exec`")
WEB_V2 = {"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2}


def upgrade(machine: Machine, url: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    done = machine.rpc("upgrade", "--app", machine.app, "--url", url, *args, env=env)
    return done.returncode, parse_result(done.stdout), done.stdout + done.stderr


def test_runtime_directory_failures_end_in_one_failed_result(machine, tmp_path, local_store):
    machine.write({"greet.py": GREET_V1})
    _release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2}, version="v2")
    app_root = {"FLYDEPLOY_APP_ROOT": str(machine.app_root)}
    (tmp_path / "a-file").write_text("")
    for runtime in (tmp_path / "missing" / "deeper", tmp_path / "a-file" / "run"):
        code, result, output = upgrade(machine, url, env={**app_root, "FLYDEPLOY_RUNTIME_DIR": str(runtime)})
        assert code == 1 and result["success"] is False, output
        assert "runtime directory" in result["error"] and "Traceback" not in output
        assert (machine.app_root / "greet.py").read_text() == GREET_V1

    # The state file cannot be written once the app files are in place: they are put back.
    (machine.socket_dir() / "state.json").mkdir(parents=True)
    code, result, output = upgrade(machine, url, env=app_root)
    assert code == 1 and "cannot write the state file" in result["error"], output
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
    assert sorted(p.name for p in machine.app_root.iterdir()) == ["greet.py"]  # no leftovers


def test_a_write_failing_part_way_changes_nothing(machine, tmp_path, local_store):
    machine.write({"greet.py": GREET_V1, "tool.py": "V = 1\n"})
    (machine.app_root / "zz" / "data.py").mkdir(parents=True)  # a directory where a member goes
    os.chmod(machine.app_root / "tool.py", 0o750)
    files = {"greet.py": GREET_V2, "tool.py": "V = 2\n", "new/mod.py": "X = 1\n", "zz/data.py": "X = 2\n"}
    _release, url = make_release(tmp_path, local_store, files, version="v2")
    code, result, output = upgrade(machine, url, env={"FLYDEPLOY_APP_ROOT": str(machine.app_root)})
    assert code == 1 and "no file was changed" in result["error"], output
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
    assert (machine.app_root / "tool.py").read_text() == "V = 1\n"
    assert (machine.app_root / "tool.py").stat().st_mode & 0o777 == 0o750
    assert not (machine.app_root / "new").exists()  # created directories are removed again
    assert [p.name for p in machine.app_root.rglob("*") if p.name.startswith(".")] == []


FORK_HOLDING_LOCK = '''
import os, sys, threading, time, flydeploy
entered, forked = threading.Event(), threading.Event()
def hold():
    with flydeploy._machine_lock("shop"):
        entered.set()
        forked.wait()
thread = threading.Thread(target=hold)
thread.start()
entered.wait()
child = os.fork()
if child == 0:
    time.sleep(60)
    os._exit(0)
forked.set()
thread.join()
print(child, flush=True)
sys.stdin.read()
os.kill(child, 9)
'''


def test_a_fork_does_not_keep_the_machine_lock(machine):
    holder = subprocess.Popen([sys.executable, "-c", FORK_HOLDING_LOCK], env=machine.env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert int(holder.stdout.readline())  # the parent let go; its child lives on
        probe = machine.python("import flydeploy\n"
                               "with flydeploy._machine_lock('shop', timeout=5):\n    print('acquired')")
        assert probe.stdout.strip() == "acquired", probe.stderr
    finally:
        holder.communicate("")


def test_a_stopped_process_fails_the_upgrade_within_the_suspend_timeout(machine, tmp_path, local_store):
    machine.write_web_app()
    running, stopped = machine.start().wait_ready(), machine.start().wait_ready()
    _release, url = make_release(tmp_path, local_store, WEB_V2, version="v2")
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        # Well inside the 30 s a Machines API exec waits by default.
        done = machine.run([sys.executable, "-m", "flydeploy", "rpc", "upgrade", "--app", "shop", "--url", url,
                            "--suspend-timeout", "1"], timeout=25, cwd=machine.app_root)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    result = parse_result(done.stdout)
    assert done.returncode == 1 and result["processes_succeeded"] == 0
    assert f"process {stopped.pid} did not answer within 11 s" in result["error"]
    # Not every process applied it: the release is taken off the disk and the process that
    # had applied it follows the disk back; the stopped one, resumed, never applies it late.
    assert f"process main.py[{running.pid}] failed: applied v2, then went back" in result["error"]
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
    assert not (machine.socket_dir() / "state.json").exists()
    assert running.get()["greeting"] == "hello v1"
    assert stopped.get()["greeting"] == "hello v1"


SLOW_GREET_V2 = "import os, time\nopen(os.environ['APP_PORT_FILE'] + '.applying', 'w').close()\ntime.sleep(60)\n" + GREET_V2


def test_a_process_dying_mid_apply_is_reported_and_its_socket_removed(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    _release, url = make_release(tmp_path, local_store, {**WEB_V2, "greet.py": SLOW_GREET_V2}, version="v2")
    rpc = subprocess.Popen([sys.executable, "-m", "flydeploy", "rpc", "upgrade", "--app", "shop", "--url", url],
                           cwd=machine.app_root, env=machine.env, stdout=subprocess.PIPE, text=True)
    wait_for(lambda: pathlib.Path(f"{process.port_file}.applying").exists(), what="the apply to start")
    os.kill(process.pid, signal.SIGKILL)
    process.proc.wait()
    result = parse_result(rpc.communicate(timeout=60)[0])
    assert rpc.returncode == 1 and f"process {process.pid} exited before it answered" in result["error"]
    assert not machine.socket_of(process.pid).exists()


def test_racing_upgrades_never_roll_the_machine_back(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    flydeploy.reset_current(local_store, "shop", machine.env["FLY_IMAGE_REF"])
    urls = {}
    for second, version in enumerate(("v2", "v3")):
        files = {**WEB_V2, "greet.py": GREET_V2.replace("v2", version)}
        release, urls[version] = make_release(tmp_path, local_store, files, version=version)
        record = release.hot_upgrade_record(urls[version], deployed_at=f"2026-11-20T10:00:0{second}.000Z")
        flydeploy.record_hot_upgrade(local_store, "shop", record)
    both = [subprocess.Popen([sys.executable, "-m", "flydeploy", "rpc", "upgrade", "--app", "shop", "--url", url],
                             cwd=machine.app_root, env=machine.env, stdout=subprocess.PIPE, text=True)
            for url in (urls["v2"], urls["v3"])]
    for rpc in both:
        result = parse_result(rpc.communicate(timeout=60)[0])
        assert rpc.returncode == 0 or "deployed later" in result["error"], result
    assert process.get()["greeting"] == "hello v3"  # whichever took the lock first
    # The upgrade to v2 was recorded first; arriving last, it must not undo v3.
    code, result, output = upgrade(machine, urls["v2"])
    assert code == 1 and "refusing" in result["error"] and "deployed later" in result["error"], output
    assert process.get()["greeting"] == "hello v3"
    assert json.loads((machine.socket_dir() / "state.json").read_text())["version"] == "v3"


PREEXEC_APP = '''\
import json, os, subprocess, sys, flydeploy
flydeploy.start_agent("shop")
for _ in range(5):
    subprocess.run(["true"], preexec_fn=lambda: None, check=True)
print(json.dumps(sorted(os.listdir(os.path.join(os.environ["FLYDEPLOY_RUNTIME_DIR"], "shop")))))
'''


def test_children_that_exec_start_no_agent(machine):
    done = machine.python(PREEXEC_APP)
    assert done.returncode == 0, done.stderr
    sockets = [name for name in json.loads(done.stdout) if name.endswith(".sock")]
    assert len(sockets) == 1, sockets  # the app's own, no child's


def test_state_records_the_image_of_the_apps_processes(machine, tmp_path, local_store):
    machine.write_web_app()
    parent = machine.start().wait_ready()
    _release, url = make_release(tmp_path, local_store, WEB_V2, version="v2")
    code, result, output = upgrade(machine, url, env={"FLY_IMAGE_REF": ""})  # exec without the app's env
    assert code == 0, output
    state = json.loads((machine.socket_dir() / "state.json").read_text())
    assert state["image_ref"] == machine.env["FLY_IMAGE_REF"]
    assert parent.get("/fork")["greeting"] == "hello v2"


def test_malformed_requests_get_errors(machine):
    machine.write({"idle.py": "import time, flydeploy\nflydeploy.start_agent('shop')\n"
                              "open(__import__('os').environ['APP_PORT_FILE'], 'w').close()\ntime.sleep(3600)\n"})
    process = machine.start([sys.executable, "idle.py"]).wait_ready()
    path = str(machine.socket_of(process.pid))
    for payload in (b'{"op": "apply", "suspend_timeout": NaN}\n', b'{"op": "apply", "suspend_timeout": true}\n',
                    b'{"op": "apply", "suspend_timeout": Infinity}\n'):
        reply = flydeploy._request(path, json.loads(payload), timeout=10)
        assert reply["ok"] is False and "positive, finite number" in reply["error"], payload
    deep = b'{"op": "info", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(deep + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert reply["ok"] is False and "nested too deeply" in reply["error"]
    assert flydeploy._request(path, {"op": "ping"}, timeout=10)["ok"] is True


def test_a_flood_of_idle_clients_is_turned_away_and_the_agent_keeps_serving(machine):
    machine.write({"idle.py": "import time, flydeploy\nflydeploy.start_agent('shop')\n"
                              "open(__import__('os').environ['APP_PORT_FILE'], 'w').close()\ntime.sleep(3600)\n"})
    process = machine.start([sys.executable, "idle.py"]).wait_ready()
    path = str(machine.socket_of(process.pid))
    idle = []
    try:
        for _ in range(flydeploy._MAX_CONNECTIONS + 4):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            idle.append(sock)
        # The extra connections are answered at once instead of each holding a thread.
        busy = 0
        for sock in idle[flydeploy._MAX_CONNECTIONS:]:
            sock.settimeout(20)
            busy += b"busy" in sock.makefile("rb").readline()
        assert busy == 4
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: flydeploy._request(path, {"op": "ping"}, timeout=10).get("ok"), what="the agent to serve again")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@ROOT_ONLY
def test_a_refused_peer_is_let_go_at_once(machine):
    machine.write({"idle.py": "import time, flydeploy\nflydeploy.start_agent('shop')\n"
                              "open(__import__('os').environ['APP_PORT_FILE'], 'w').close()\ntime.sleep(3600)\n"})
    process = machine.start([sys.executable, "idle.py"]).wait_ready()
    path = machine.socket_of(process.pid)
    machine.runtime.chmod(0o711)
    machine.socket_dir().chmod(0o711)
    path.chmod(0o666)
    baseline = open_fds(process.pid)
    # The peer is its own interpreter that drops to uid 65534 after its imports (that user
    # cannot read this interpreter's files): forking the test process instead would run every
    # at-fork hook of a process that many tests have used, and could stall before connecting.
    peer = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys, time\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "sock = socket.socket(socket.AF_UNIX)\n"
        f"sock.connect({str(path)!r})\n"
        "try:  # the refusal may come, and the agent close its end, before this is sent\n"
        "    sock.sendall(b'{\"op\": \"info\", \"pad\": \"')\n"
        "except OSError:\n"
        "    pass\n"
        "sys.stdout.buffer.write(sock.makefile('rb').readline()); sys.stdout.flush()\n"
        "while True:  # a peer that trickles forever must not hold the agent\n"
        "    try:\n"
        "        sock.send(b'x')\n"
        "    except OSError:\n"
        "        pass\n"
        "    time.sleep(0.2)\n")], stdout=subprocess.PIPE)
    try:
        answer = []
        reader = threading.Thread(target=lambda: answer.append(peer.stdout.readline()), daemon=True)
        reader.start()
        wait_for(lambda: answer, timeout=30, what="the agent's answer to the refused peer")
        assert b"refused: peer uid 65534" in answer[0]
        wait_for(lambda: open_fds(process.pid) <= baseline, timeout=5, what="the agent to close the connection")
    finally:
        peer.kill()
        peer.wait()
        peer.stdout.close()


@ROOT_ONLY
def test_a_socket_replaced_by_another_user_is_refused(machine):
    victim = subprocess.Popen(["sleep", "60"])
    path = machine.socket_dir() / f"{victim.pid}.sock"
    machine.socket_dir().mkdir(mode=0o700)
    read, write = os.pipe()
    impostor = os.fork()
    if impostor == 0:  # pragma: no cover - runs in the child
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(str(path))
            os.chown(path, 65534, 65534)
            os.setgid(65534)
            os.setuid(65534)
            sock.listen()
            os.write(write, b"listening")
            while True:
                conn, _ = sock.accept()
                conn.sendall(json.dumps({"ok": True, "pid": victim.pid, "name": "impostor"}).encode() + b"\n")
                conn.close()
        finally:
            os._exit(0)
    try:
        assert os.read(read, 100) == b"listening"
        ping = machine.rpc("ping", "--app", "shop")
        assert ping.returncode == 1 and "impostor" not in ping.stdout
        assert "another user may have replaced the agent's socket" in ping.stdout
    finally:
        os.kill(impostor, 9)
        os.waitpid(impostor, 0)
        victim.kill()
        victim.wait()


def test_a_runtime_directory_others_may_write_is_refused(machine):
    machine.runtime.chmod(0o777)
    done = machine.python("import flydeploy\nflydeploy.start_agent('shop')")
    assert done.returncode == 1 and "writable by other users (mode 777)" in done.stderr
    assert "chmod 700" in done.stderr


@pytest.fixture
def open_machine():
    """A machine whose files another user may reach (pytest's own folders are root's alone)."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="fdo-", dir="/tmp"))
    base.chmod(0o755)
    machine = Machine(base)
    yield machine
    machine.close()
    shutil.rmtree(base, ignore_errors=True)


@ROOT_ONLY
def test_a_root_upgrade_before_any_agent_leaves_the_directory_to_the_app_user(open_machine):
    machine, tmp_path = open_machine, open_machine.base
    local_store = flydeploy.LocalStore(tmp_path / "store")
    machine.write({"greet.py": GREET_V1})
    for path in (machine.app_root, machine.app_root / "greet.py"):
        os.chown(path, 65534, 65534)
    machine.runtime.rmdir()  # nothing has run yet on this machine
    _release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2}, version="v2")
    code, result, _output = upgrade(machine, url, env={"FLYDEPLOY_APP_ROOT": str(machine.app_root)})
    assert code == 1 and result["files_written"] == 1  # no process yet to take it
    for directory in (machine.runtime, machine.socket_dir()):
        assert directory.stat().st_uid == 65534
    app_user = machine.python("import os, flydeploy, greet\nflydeploy.track(os.getcwd())\n"
                              "os.setgid(65534); os.setuid(65534)\n"
                              "print(os.getpid(), flydeploy.start_agent('shop').path, greet.greeting())")
    assert app_user.returncode == 0, app_user.stderr
    pid, path, greeting = app_user.stdout.split(maxsplit=2)
    assert path == str(machine.socket_of(int(pid))) and greeting.strip() == "hello v2"


def test_credentials_in_the_url_are_never_printed_or_stored(machine, tmp_path, local_store):
    url = "http://deployer:PASSWORDSECRET@127.0.0.1:9/bucket/releases/shop-v2.tar.gz?X-Amz-Signature=SIGSECRET789"
    done = machine.rpc("upgrade", "--app", "shop", "--url", url, "--upgrade-id", "u1",
                       env={"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRETKEY",
                            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    assert done.returncode == 1 and len([l for l in done.stdout.splitlines() if MARKER in l]) == 1
    for secret in ("PASSWORDSECRET", "SIGSECRET789", "SECRETKEY"):
        assert secret not in done.stdout + done.stderr


def test_a_failed_download_still_stores_a_result(machine, tmp_path, local_store):
    missing = local_store.url(flydeploy.release_key("shop", "v9"))
    code, result, output = upgrade(machine, missing, "--upgrade-id", "deploy-42")
    assert code == 1 and result["upgrade_id"] == "deploy-42" and result["version"] is None, output
    stored, _ = local_store.get_json(f"releases/shop-results/deploy-42/{result['machine_id']}.json")
    assert stored["success"] is False and "v9" in stored["error"]
    code, result, output = upgrade(machine, missing)
    assert code == 1 and result["upgrade_id"]  # a fresh id, since neither id nor sha256 was given
    assert local_store.head(f"releases/shop-results/{result['upgrade_id']}/{result['machine_id']}.json")


def test_a_release_of_another_app_is_refused(machine, tmp_path, local_store):
    machine.write({"greet.py": GREET_V1})
    _release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2}, version="v2", app="other")
    code, result, output = upgrade(machine, url, env={"FLYDEPLOY_APP_ROOT": str(machine.app_root)})
    assert code == 1 and "is a release of app 'other', not of 'shop'" in result["error"], output
    assert (machine.app_root / "greet.py").read_text() == GREET_V1


NOBODY = 65534
FAKE_AGENT = '''
import json, os, socket, sys
path, named = sys.argv[1], sys.argv[2]
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX)
sock.bind(os.path.join(path, f"{os.getpid()}.sock"))
sock.listen()
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    request = json.loads(conn.makefile("rb").readline())
    if request["op"] == "locate":
        reply = {"ok": True, "located": {"greet.py": named}, "cwd": "/", "image_ref": None}
    else:
        reply = {"ok": True, "pid": os.getpid(), "name": "fake", "report": {"ok": True, "modules": ["greet"]}}
    conn.sendall(json.dumps(reply).encode() + b"\\n")
    conn.close()
'''


@ROOT_ONLY
def test_root_never_writes_for_a_directory_and_agent_another_user_controls(open_machine):
    machine = open_machine
    store = flydeploy.LocalStore(machine.base / "store")
    machine.write({"greet.py": GREET_V1})  # the app's files are root's
    secret = machine.base / "root-only" / "greet.py"
    secret.parent.mkdir(mode=0o700)
    secret.write_text("ROOT = 1\n")
    secret.chmod(0o600)
    # Another user creates the app's runtime directory first and serves a fake agent there.
    os.chown(machine.runtime, NOBODY, NOBODY)
    machine.socket_dir().mkdir(mode=0o700)
    os.chown(machine.socket_dir(), NOBODY, NOBODY)
    fake = subprocess.Popen([sys.executable, "-c", FAKE_AGENT, str(machine.socket_dir()), str(secret)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline().strip() == "listening"
        _release, url = make_release(machine.base, store, {"greet.py": GREET_V2}, version="v2")
        code, result, output = upgrade(machine, url)
    finally:
        fake.kill()
        fake.wait()
    # Root acted with that user's rights only: it could write neither the file the agent named
    # nor the app's root-owned files, and says so.
    assert code == 1 and "no file was changed" in result["error"], output
    assert "Permission denied" in result["error"]
    assert secret.read_text() == "ROOT = 1\n"
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
    assert not (machine.socket_dir() / "state.json").exists()
    assert all(p.stat().st_uid == NOBODY for p in machine.socket_dir().iterdir())


# What the app imports is imported before it becomes nobody: this interpreter may sit in a
# folder only root can read, as no image's interpreter does.
APP_AS_NOBODY = ("import os, runpy, pkgutil, http.server, json, logging, flydeploy, concurrent.futures.thread, "
                 "encodings.idna; "
                 "os.setgid(65534); os.setuid(65534); runpy.run_path('main.py', run_name='__main__')")


@ROOT_ONLY
def test_root_acting_for_an_app_user_writes_as_that_user_under_the_app_root(open_machine):
    machine = open_machine
    store = flydeploy.LocalStore(machine.base / "store")
    # greet is loaded from a root-owned folder on the path, not from the app.
    rootlib = machine.base / "rootlib"
    rootlib.mkdir()
    (rootlib / "greet.py").write_text(GREET_V1)
    machine.env["PYTHONPATH"] += os.pathsep + str(rootlib)
    machine.write({"main.py": MAIN_PY, "counter.py": COUNTER_PY})
    for path in (machine.base, machine.app_root, *machine.app_root.iterdir(), machine.runtime):
        os.chown(path, NOBODY, NOBODY)
    process = machine.start([sys.executable, "-c", APP_AS_NOBODY]).wait_ready()
    assert process.get()["greeting"] == "hello v1"
    _release, url = make_release(machine.base, store, WEB_V2, version="v2")
    code, result, output = upgrade(machine, url)
    assert code == 0, output
    assert (rootlib / "greet.py").read_text() == GREET_V1
    assert any(str(rootlib / "greet.py") in note for note in result["notes"]), result["notes"]
    assert (machine.app_root / "greet.py").read_text() == GREET_V2
    for path in (machine.app_root / "greet.py", machine.socket_dir() / "state.json"):
        assert path.stat().st_uid == NOBODY, path
    assert process.get()["greeting"] == "hello v1"  # its greet is the root-owned one, left alone
