"""Refuse early, with a clear message, before anything is recorded: limits the machines
enforce checked at pack time, every numeric option checked up front, a missing or wrong
--root, unreadable files and stores, a full TMPDIR, and the messages that used to mislead
(agents of another user, a busy agent, a directory where a module's file was)."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import flydeploy
import flydeploy_cli
from tests.machine_apps import GREET_V1, GREET_V2, make_release, parse_result, wait_for, write_tree

pytest_plugins = ["tests.machine_apps"]

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a second user, a tmpfs mount)")
OTHER_UID = 65534  # nobody


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project with one module, run in local mode as app ``probe``."""
    root = tmp_path / "project"
    write_tree(root, {"app.py": "VALUE = 1\n"})
    runtime = tempfile.mkdtemp(prefix="fdr-")  # agent sockets need a short path
    monkeypatch.setenv("FLY_APP_NAME", "probe")
    monkeypatch.setenv("FLYDEPLOY_RUNTIME_DIR", runtime)
    yield root
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def running(project):
    """The project's app running with its agent, so that `hot --local` gets past phase 1."""
    ready = project.parent / "ready"
    (project / "serve.py").write_text("import os, time, flydeploy\nimport app\nflydeploy.start_agent('probe')\n"
                                      "open(os.environ['READY'], 'w').close()\ntime.sleep(3600)\n")
    process = subprocess.Popen([sys.executable, "serve.py"], cwd=project, stdin=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO), "READY": str(ready)})
    try:
        wait_for(ready.exists, what="the app's agent to start")
        yield process
    finally:
        process.kill()
        process.wait()


def cli(*args: str, env: dict[str, str] | None = None, cwd: pathlib.Path | None = None):
    """``python -m flydeploy_cli`` in a subprocess (tracebacks would show in its stderr)."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flydeploy_cli", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=120)


def nothing_recorded(project: pathlib.Path) -> bool:
    releases = project / ".flydeploy" / "releases"
    return not releases.exists() or not any(releases.iterdir())


# --- 8. limits the machines enforce, checked when packing ---------------------


def test_a_release_over_the_machines_size_limit_is_refused_before_it_is_read(project, running):
    static = project / "static"
    static.mkdir()
    with open(static / "big.bin", "wb") as sparse:  # 2.2 GB that take no disk and no time to make
        sparse.truncate(2200 << 20)
    done = cli("hot", "--local", "--root", str(project))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "static/big.bin" in done.stderr and "decompression bomb" in done.stderr
    assert "nothing was uploaded" in done.stderr and "exclude" in done.stderr
    assert nothing_recorded(project)


def test_pack_and_unpack_enforce_the_same_limits(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    write_tree(tree, {"a.py": "A = 1\n", "b.py": "B = 2\n", "pkg/__init__.py": "", "pkg/c.py": "C = 3\n"})
    packed = flydeploy.pack_release(tree, tmp_path / "ok.tar.gz", app="shop", version="v1")

    monkeypatch.setattr(flydeploy, "_MAX_RELEASE_MEMBERS", 3)
    with pytest.raises(flydeploy.ReleaseError, match="4 files, more than the 3 limit every machine"):
        flydeploy.pack_release(tree, tmp_path / "many.tar.gz", app="shop", version="v2")
    with pytest.raises(flydeploy.ReleaseError, match="more than 3 members"):
        flydeploy.unpack_release(packed.path, tmp_path / "out-members")
    assert not (tmp_path / "many.tar.gz").exists()

    monkeypatch.setattr(flydeploy, "_MAX_RELEASE_MEMBERS", 100)
    monkeypatch.setattr(flydeploy, "_MAX_RELEASE_BYTES", 11)
    with pytest.raises(flydeploy.ReleaseError, match="more than 11 bytes of files") as caught:
        flydeploy.pack_release(tree, tmp_path / "big.tar.gz", app="shop", version="v3")
    assert caught.value.member == "b.py"  # a.py and b.py make 12 bytes
    with pytest.raises(flydeploy.ReleaseError, match="exceeds 11 bytes"):
        flydeploy.unpack_release(packed.path, tmp_path / "out-bytes")

    monkeypatch.setattr(flydeploy, "_MAX_RELEASE_BYTES", 2 << 30)
    monkeypatch.setattr(flydeploy, "_MAX_MANIFEST_BYTES", 100)
    with pytest.raises(flydeploy.ReleaseError, match="flydeploy-manifest.json of .* bytes, more than the 100-byte"):
        flydeploy.pack_release(tree, tmp_path / "manifest.tar.gz", app="shop", version="v4")
    with pytest.raises(flydeploy.ReleaseError, match="over the 100-byte limit"):
        flydeploy.unpack_release(packed.path, tmp_path / "out-manifest")


# --- 9. every numeric option, checked before anything runs --------------------

BAD_SECONDS = ["nan", "inf", "-inf", "0", "-1", "1e9", "soon"]
BAD_COUNTS = ["0", "-3", "1001", "nan", "2.5"]


@pytest.mark.parametrize("command", ["hot", "rollback"])
@pytest.mark.parametrize("option, values", [("--timeout", BAD_SECONDS), ("--lock-timeout", BAD_SECONDS),
                                            ("--suspend-timeout", BAD_SECONDS),
                                            ("--max-concurrency", BAD_COUNTS)])
def test_cli_numeric_options_are_checked_up_front(project, capsys, command, option, values):
    for value in values:
        with pytest.raises(SystemExit) as caught:
            flydeploy_cli.main([command, "--local", "--root", str(project), f"{option}={value}"])
        err = capsys.readouterr().err
        assert caught.value.code == 2, (option, value, err)
        assert f"argument {option}: {value!r} is" in err and "Traceback" not in err
        assert ("out of range" in err) or ("is not a" in err), err
    assert not (project / ".flydeploy").exists()


@pytest.mark.parametrize("argv", [
    ["orchestrate", "--image-ref", "img", "--timeout", "nan"],
    ["orchestrate", "--image-ref", "img", "--lock-timeout", "inf"],
    ["orchestrate", "--image-ref", "img", "--suspend-timeout", "inf"],
    ["orchestrate", "--image-ref", "img", "--max-concurrency", "0"],
    ["rpc", "upgrade", "--app", "probe", "--url", "file:///x", "--suspend-timeout", "inf"],
    ["rpc", "upgrade", "--app", "probe", "--url", "file:///x", "--suspend-timeout", "1e9"],
    ["rpc", "ping", "--app", "probe", "--timeout", "nan"],
    ["rpc", "info", "--app", "probe", "--timeout", "-1"],
])
def test_machine_side_numeric_options_are_checked_up_front(argv, capsys):
    assert flydeploy.main(argv) == 2
    err = capsys.readouterr().err
    assert "out of range" in err and "up to 86400" in err or "at most 1000" in err, err


def test_numeric_settings_in_pyproject_are_checked(project):
    (project / "pyproject.toml").write_text("[tool.flydeploy]\nlock_timeout = nan\n")
    done = cli("hot", "--local", "--root", str(project))
    assert done.returncode == 2 and "lock_timeout must be a number of seconds above 0 and up to 86400" in done.stderr
    (project / "pyproject.toml").write_text("[tool.flydeploy]\ntimeout = inf\n")
    done = cli("hot", "--local", "--root", str(project))
    assert done.returncode == 2 and "timeout must be" in done.stderr and "Traceback" not in done.stderr
    assert nothing_recorded(project)


# --- 10. a --root that does not exist ----------------------------------------


@pytest.mark.parametrize("command", ["hot", "status", "rollback"])
def test_a_missing_root_creates_nothing(tmp_path, project, capsys, command):
    missing = tmp_path / "typo" / "project"
    assert flydeploy_cli.main([command, "--local", "--root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: no such directory" in err and "--root" in err
    assert not (tmp_path / "typo").exists()


# --- 11. no tracebacks ------------------------------------------------------


@pytest.mark.parametrize("name", ["fly.toml", "pyproject.toml"])
def test_toml_that_is_not_utf8_is_named(project, name):
    (project / name).write_bytes(b'app = "caf\xe9"\n')  # Latin-1
    done = cli("status", "--local", "--root", str(project))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{project / name}: not UTF-8 text (byte 0xe9 at offset 10)" in done.stderr


def test_a_root_that_is_a_file_is_named(project):
    done = cli("hot", "--local", "--root", str(project / "app.py"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{project / 'app.py'}: not a directory" in done.stderr


@contextlib.contextmanager
def as_other_user(target, uid: int = OTHER_UID):
    """Run ``target()`` in a child process as ``uid`` (gid the same); yields (exit code, its output)."""
    errors = tempfile.TemporaryFile()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 70
        try:
            sys.stdout = sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(errors.fileno()), "wb"),
                                                       write_through=True)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = target()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 71)
    _pid, status = os.waitpid(child, 0)
    errors.seek(0)
    yield os.waitstatus_to_exitcode(status), errors.read().decode(errors="replace")
    errors.close()


@ROOT_ONLY
def test_status_local_by_a_user_who_cannot_read_the_store(project):
    flydeploy.reset_current(flydeploy.LocalStore(project / ".flydeploy"), "probe", "local")
    (project / ".flydeploy").chmod(0o700)
    for folder in (project, *project.parents):
        folder.chmod(folder.stat().st_mode | 0o005)  # the other user may reach the project
    with as_other_user(lambda: flydeploy_cli.main(["status", "--local", "--root", str(project)])) as (code, err):
        assert code == 1, err
        assert "Traceback" not in err
        assert f"cannot use the local store {project / '.flydeploy'}" in err and "belongs to root (uid 0)" in err


@ROOT_ONLY
def test_a_full_tmpdir_while_packing_is_named(project, running, tmp_path):
    (project / "static").mkdir()
    (project / "static" / "noise.bin").write_bytes(os.urandom(3 << 20))  # does not compress
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(scratch)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        done = cli("hot", "--local", "--root", str(project), env={"TMPDIR": str(scratch)})
    finally:
        subprocess.run(["umount", str(scratch)], check=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot write the release tarball" in done.stderr and "No space left on device" in done.stderr
    assert f"make room in {scratch}, or point TMPDIR at a folder with room" in done.stderr
    assert nothing_recorded(project)


# --- 12. messages that used to mislead ----------------------------------------


def _idle_agent(machine):
    machine.write({"idle.py": "import os, time, flydeploy\nimport greet\nflydeploy.start_agent('shop')\n"
                              "open(os.environ['APP_PORT_FILE'], 'w').close()\ntime.sleep(3600)\n",
                   "greet.py": GREET_V1})
    return machine.start([sys.executable, "idle.py"]).wait_ready()


@ROOT_ONLY
def test_rpc_ping_by_another_user_says_whose_agents_run(machine, monkeypatch):
    _idle_agent(machine)
    monkeypatch.setenv("FLYDEPLOY_RUNTIME_DIR", str(machine.runtime))
    for command in ("ping", "info"):  # `status --local` runs `rpc info`
        with as_other_user(lambda: flydeploy.main(["rpc", command, "--app", "shop"])) as (code, err):
            assert code == 1, err
            assert "no flydeploy agent is running" not in err
            assert "belongs to root (uid 0)" in err and "run this as that user, or as root" in err


@ROOT_ONLY
def test_rpc_ping_by_a_third_user_says_whose_agents_run(monkeypatch):
    runtime = pathlib.Path(tempfile.mkdtemp(prefix="fdo-"))  # agent sockets need a short path
    os.chown(runtime, OTHER_UID, OTHER_UID)
    runtime.chmod(0o711)  # others may pass through, not list
    monkeypatch.setenv("FLYDEPLOY_RUNTIME_DIR", str(runtime))
    read, write = os.pipe()
    agent = os.fork()
    if agent == 0:  # pragma: no cover - runs in the child: an app process of user nobody
        try:
            os.setgroups([])
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            flydeploy.start_agent("shop")
            os.write(write, b"serving")
            time.sleep(600)
        finally:
            os._exit(0)
    try:
        ready, _, _ = select.select([read], [], [], 30)
        assert ready and os.read(read, 16) == b"serving"
        with as_other_user(lambda: flydeploy.main(["rpc", "ping", "--app", "shop"]), uid=OTHER_UID - 1) as (code, err):
            assert code == 1, err
            assert "no flydeploy agent is running" not in err and "Remove it" not in err
            assert (f"{runtime} belongs to nobody (uid {OTHER_UID}), not to this user, uid {OTHER_UID - 1}: "
                    "the agents there run as that user; run this as that user, or as root") in err, err
    finally:
        os.kill(agent, 9)
        os.waitpid(agent, 0)
        os.close(read)
        os.close(write)
        shutil.rmtree(runtime, ignore_errors=True)


@ROOT_ONLY
def test_status_local_by_another_user_says_whose_agents_run(machine, tmp_path, monkeypatch):
    _idle_agent(machine)
    project = tmp_path / "project"
    write_tree(project, {"app.py": "VALUE = 1\n"})
    for folder in (project, *project.parents):
        folder.chmod(folder.stat().st_mode | 0o005)
    monkeypatch.setenv("FLYDEPLOY_RUNTIME_DIR", str(machine.runtime))
    monkeypatch.setenv("FLY_APP_NAME", "shop")
    monkeypatch.setenv("PYTHONPATH", str(REPO))

    def status() -> int:
        if not os.access(sys.executable, os.X_OK):
            return 77
        return flydeploy_cli.main(["status", "--local", "--root", str(project), "--store",
                                   tempfile.mkdtemp()])

    with as_other_user(status) as (code, out):
        if code == 77:
            pytest.skip(f"{sys.executable} cannot be run by another user here")
        assert "no flydeploy agent is running" not in out
        assert "belongs to root (uid 0)" in out, out


def test_every_connection_slot_taken_is_busy_not_a_broken_pipe(machine, monkeypatch):
    process = _idle_agent(machine)
    path = str(machine.socket_of(process.pid))
    monkeypatch.setenv("FLYDEPLOY_RUNTIME_DIR", str(machine.runtime))
    stalled = []
    try:
        for _ in range(flydeploy._MAX_CONNECTIONS):  # connected, and silent
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
            stalled.append(sock)
        checked = flydeploy._check_agent_identity

        def slow_client(sock, path, pid):
            # A client that sends its request only after the agent has turned it away.
            checked(sock, path, pid)
            ready, _, _ = select.select([sock], [], [], 10)
            assert ready, "the agent never answered the connection that found no free slot"
            wait_for(lambda: _peer_closed(sock), timeout=10, what="the agent to close the connection")

        monkeypatch.setattr(flydeploy, "_check_agent_identity", slow_client)
        (entry,) = flydeploy._ask_agents("shop", {"op": "ping"}, timeout=10)
    finally:
        for sock in stalled:
            sock.close()
    assert entry["pid"] == process.pid
    assert "error" not in entry, entry
    assert entry["reply"]["ok"] is False and entry["reply"]["error"].startswith("busy:"), entry


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has sent its reply and closed (the reply stays unread)."""
    data = sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    return data.endswith(b"\n")


def test_a_loaded_module_replaced_by_a_directory_is_named(machine, tmp_path, local_store):
    process = _idle_agent(machine)
    greet = machine.app_root / "greet.py"
    greet.unlink()
    greet.mkdir()  # the module the process loaded, now a directory
    (greet / "notes.txt").write_text("kept\n")
    idle = (machine.app_root / "idle.py").read_text()
    _release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2, "idle.py": idle + "# v2\n"},
                                 version="v2")
    done = machine.rpc("upgrade", "--app", "shop", "--url", url)
    result = parse_result(done.stdout)
    assert done.returncode == 1 and result["success"] is False, done.stdout + done.stderr
    assert f"{greet} is a directory, where the release has the file greet.py" in result["error"]
    assert "Operation not permitted" not in result["error"]
    assert (greet / "notes.txt").read_text() == "kept\n"
    assert (machine.app_root / "idle.py").read_text() == idle  # no file was changed
    assert process.proc.poll() is None
