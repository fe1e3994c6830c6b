"""The per-process agent: sockets, permissions, protocol, fork safety and `python -m flydeploy rpc`."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import stat
import sys

import pytest

from tests.machine_apps import Machine, wait_for


IDLE_APP = '''\
import os, signal, sys, time
import flydeploy
signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))
flydeploy.start_agent(sys.argv[1] if len(sys.argv) > 1 else None)
open(os.environ["APP_PORT_FILE"], "w").close()
if os.environ.get("APP_FORK_CHILD"):
    pid = os.fork()
    if pid == 0:
        open(os.environ["APP_PORT_FILE"] + ".child", "w").write(str(os.getpid()))
        time.sleep(float(os.environ["APP_FORK_CHILD"]))
        sys.exit(0)
while True:
    time.sleep(3600)
'''


@pytest.fixture
def machine(tmp_path):
    machine = Machine(tmp_path)
    machine.write({"idle.py": IDLE_APP})
    yield machine
    machine.close()


def start_idle(machine: Machine, *args: str, env: dict[str, str] | None = None):
    return machine.start([sys.executable, "idle.py", *args], env=env).wait_ready()


def raw_request(path: pathlib.Path, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent stopped reading an oversized request; its reply is still there
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(bytes(data))


def test_socket_and_directory_are_private_and_rpc_answers(machine):
    process = start_idle(machine)
    sock_path = machine.socket_of(process.pid)
    assert stat.S_ISSOCK(sock_path.lstat().st_mode)
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(machine.socket_dir().stat().st_mode) == 0o700

    ping = machine.rpc("ping", "--app", machine.app)
    assert ping.returncode == 0, ping.stderr
    assert f"[{process.pid}]: ok" in ping.stdout

    info = machine.rpc("info", "--app", machine.app)
    assert info.returncode == 0, info.stderr
    [entry] = json.loads(info.stdout)
    assert entry["pid"] == process.pid
    assert entry["app"] == machine.app
    assert entry["argv"][0] == "idle.py"
    assert entry["image_ref"] == machine.env["FLY_IMAGE_REF"]
    assert entry["version"] is None and entry["servers"] == []


def test_bad_requests_get_errors_and_the_agent_keeps_serving(machine):
    process = start_idle(machine)
    path = machine.socket_of(process.pid)
    not_json = raw_request(path, b"{not json\n")
    assert not_json["ok"] is False and "not JSON" in not_json["error"]
    no_op = raw_request(path, b'["ping"]\n')
    assert no_op["ok"] is False and '"op"' in no_op["error"]
    unknown = raw_request(path, b'{"op": "format-disk"}\n')
    assert unknown["ok"] is False and "unknown op 'format-disk'" in unknown["error"]
    oversized = raw_request(path, b'{"op": "ping", "pad": "' + b"x" * (3 << 20) + b'"}\n')
    assert oversized["ok"] is False and "larger than" in oversized["error"]
    bad_apply = raw_request(path, b'{"op": "apply", "suspend_timeout": -1}\n')
    assert bad_apply["ok"] is False and "suspend_timeout" in bad_apply["error"]
    assert raw_request(path, b'{"op": "ping"}\n') == {"ok": True, "pid": process.pid, "app": machine.app,
                                                       "name": f"idle.py[{process.pid}]"}


def test_socket_removed_at_exit_and_dead_sockets_cleaned(machine):
    clean = start_idle(machine)
    killed = start_idle(machine)
    assert machine.socket_of(clean.pid).exists()
    clean.stop()  # SIGTERM, which the app turns into a normal exit
    assert clean.proc.returncode == 0
    assert not machine.socket_of(clean.pid).exists()  # removed at exit
    os.kill(killed.pid, 9)
    killed.proc.wait()
    assert machine.socket_of(killed.pid).exists()  # a killed process leaves its socket behind
    ping = machine.rpc("ping", "--app", machine.app)
    assert ping.returncode == 1
    assert "no flydeploy agent is running for app 'shop'" in ping.stderr
    assert not machine.socket_of(killed.pid).exists()  # dead sockets are removed on contact


def test_forked_child_runs_its_own_agent(machine):
    process = start_idle(machine, env={"APP_FORK_CHILD": "3600"})
    child_file = pathlib.Path(str(process.port_file) + ".child")
    child_pid = int(wait_for(lambda: child_file.exists() and child_file.read_text(), what="the forked child"))
    wait_for(lambda: machine.socket_of(child_pid).exists(), what="the child's socket")
    info = machine.rpc("info", "--app", machine.app)
    assert info.returncode == 0, info.stderr
    assert sorted(entry["pid"] for entry in json.loads(info.stdout)) == sorted([process.pid, child_pid])
    os.kill(child_pid, 15)  # the child exits normally and removes its own socket
    wait_for(lambda: not machine.socket_of(child_pid).exists(), what="the child's socket to go")
    assert machine.socket_of(process.pid).exists()  # the child's exit left the parent's socket alone
    assert machine.rpc("ping", "--app", machine.app).returncode == 0


def test_unsafe_runtime_directories_are_refused(machine, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    machine.runtime.chmod(0o700)
    (machine.runtime / machine.app).symlink_to(elsewhere)
    linked = machine.python("import flydeploy; flydeploy.start_agent()")
    assert linked.returncode != 0
    assert "is a symbolic link" in linked.stderr
    assert list(elsewhere.iterdir()) == []

    if os.geteuid() != 0:
        pytest.skip("refusing another user's directory needs root to create one")
    (machine.runtime / machine.app).unlink()
    (machine.runtime / machine.app).mkdir(mode=0o700)
    os.chown(machine.runtime / machine.app, 65534, 65534)
    foreign = machine.python("import flydeploy; flydeploy.start_agent()")
    assert foreign.returncode != 0
    assert "belongs to uid 65534" in foreign.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_peer_of_another_uid_is_refused(machine):
    process = start_idle(machine)
    path = machine.socket_of(process.pid)
    # Loosen the file permissions on purpose: the uid check must hold on its own.
    machine.runtime.chmod(0o711)
    machine.socket_dir().chmod(0o711)
    path.chmod(0o666)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            reply = raw_request(path, b'{"op": "info"}\n')
            os.write(write, json.dumps(reply).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reply = json.loads(pipe.read())
    os.waitpid(child, 0)
    assert reply["ok"] is False
    assert "refused: peer uid 65534" in reply["error"]
    assert "argv" not in reply


def test_rpc_usage_errors_exit_2(machine):
    missing_app = machine.rpc("info")
    assert missing_app.returncode == 2 and "--app" in missing_app.stderr
    unknown = machine.rpc("reboot", "--app", "shop")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
    bad_timeout = machine.rpc("upgrade", "--app", "shop", "--url", "file:///x", "--suspend-timeout", "soon")
    assert bad_timeout.returncode == 2 and "not a number of seconds" in bad_timeout.stderr
    bad_url = machine.rpc("upgrade", "--app", "shop", "--url", "s3://bucket/releases/shop-v2.tar.gz")
    assert bad_url.returncode == 2 and "is not a release URL" in bad_url.stderr
    bad_name = machine.rpc("info", "--app", "../etc")
    assert bad_name.returncode == 2 and "app '../etc' cannot name a release" in bad_name.stderr
    nothing = machine.run([sys.executable, "-m", "flydeploy"])
    assert nothing.returncode == 2 and "usage:" in nothing.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, like `fly machine exec`")
def test_root_client_reaches_agents_in_an_app_users_directory(machine):
    process = start_idle(machine)
    # The app runs as its own user; exec runs the rpc as root.
    os.chown(machine.runtime, 65534, 65534)
    os.chown(machine.socket_dir(), 65534, 65534)
    ping = machine.rpc("ping", "--app", machine.app)
    assert ping.returncode == 0, ping.stderr
    assert f"[{process.pid}]: ok" in ping.stdout
