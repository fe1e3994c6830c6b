"""Stand-ins for the fleet tests: stub flyctl scripts, Machine JSON, a stub
Machines client, a project and an app root, and a run of ``orchestrate``.
Load the fixtures with ``pytest_plugins = ["tests.fleet_doubles"]``."""

import io
import json
import os
import stat
import sys
import textwrap
import threading

import pytest

import flydeploy

MARKER = flydeploy.ORCHESTRATOR_MARKER


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def script(path, body):
    """An executable Python script (a stand-in for flyctl in these tests)."""
    write(path, f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def interruptible_orchestrator(path, ready, interrupted):
    """A stand-in orchestrator, run directly or as `fly machine run` (other fly commands fail):
    it says it started and writes ``ready``; on Ctrl-C it writes ``interrupted``, says its
    last words as the real one does, and exits."""
    return script(path, f"""
        import pathlib, signal, sys, time
        if sys.argv[1:3] not in ([], ["machine", "run"]):
            sys.exit(1)  # e.g. tokens create: no session, nothing minted
        def stop(signum, frame):
            pathlib.Path({str(interrupted)!r}).write_text("SIGINT")
            print("interrupted; the deploy lock was released", flush=True)
            print("{MARKER} exit 130", flush=True)
            sys.exit(1)
        signal.signal(signal.SIGINT, stop)
        print("{MARKER} started", flush=True)
        pathlib.Path({str(ready)!r}).write_text("yes")
        time.sleep(60)
    """)


@pytest.fixture
def project(tmp_path):
    write(tmp_path / "fly.toml", """
        app = "shop"
        [env]
          BUCKET_NAME = "shop-releases"
          STRIPE_SECRET_KEY = "sk_live_123"
          LOG_LEVEL = "info"
        [build.args]
          PYTHON_VERSION = "3.12"
        [processes]
          app = "python server.py"
          worker = "python worker.py"
    """)
    return tmp_path


@pytest.fixture
def stub_fly(tmp_path, monkeypatch):
    """A `fly` that logs its argv, knows `auth whoami`, and fails everything else."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "fly.log"
    script(bin_dir / "fly", f"""
        import json, sys
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        if sys.argv[1:3] == ["auth", "whoami"]:
            print("ann@example.com")
            sys.exit(0)
        sys.exit(3)
    """)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def machine(mid, state="started", group="app", v2=True, services=(), region="ams",
            image="registry.fly.io/shop:deployment-1"):
    metadata = {"fly_process_group": group}
    if v2:
        metadata["fly_platform_version"] = "v2"
    return {"id": mid, "state": state, "region": region, "image_ref": {"registry": "registry.fly.io",
            "repository": "shop", "tag": image.rsplit(":", 1)[1]},
            "config": {"image": image, "metadata": metadata, "services": list(services)}}


def result_line(**fields):
    return f"__FLYDEPLOY_RESULT__{json.dumps(fields)}__FLYDEPLOY_RESULT__"


class StubMachines:
    """The Machines client's list/exec, answering exec with ``answer(machine_id, argv)``;
    ``rpc preflight`` (which explains a failed phase 1) answers ``preflight`` (default: all is well)."""

    def __init__(self, machines, answer, preflight=None):
        self.machines = machines
        self.answer = answer
        self.preflight = preflight
        self.calls = []
        self.lock = threading.Lock()

    def list(self):
        return [dict(m) for m in self.machines]

    def exec(self, machine_id, argv, *, timeout=30):
        with self.lock:
            self.calls.append((machine_id, list(argv), timeout))
        if _rpc_command(argv) == "preflight":
            return flydeploy.ExecResult(0, 0, json.dumps(self.preflight or PREFLIGHT_OK), "")
        return self.answer(machine_id, argv)

    def phase_calls(self, command):
        """The exec calls of ``rpc <command>`` (prepare, apply, discard)."""
        return [call for call in self.calls if _rpc_command(call[1]) == command]


def _rpc_command(argv):
    """The rpc command of a machine-side argv (``... rpc <command> ...``)."""
    return argv[argv.index("rpc") + 1] if "rpc" in argv else None


PREFLIGHT_OK = {"flydeploy": flydeploy.__version__, "python": "/usr/local/bin/python3", "python_version": "3.12.1",
                "agents": 1, "agents_ok": 1, "agent_errors": []}


def ready(machine_id, argv, **fields):
    """What ``rpc prepare`` prints on a machine whose one process is ready for the release:
    a ``PrepareResult``, its process's plan an ``UpgradePlan``, as the machine side makes them."""
    plan = flydeploy.UpgradePlan(modules_changed=["shop"]).to_dict()
    process = flydeploy.ProcessPlan(pid=7, name="web", ok=True, error=None, plan=plan)
    result = flydeploy.PrepareResult(
        machine_id=machine_id, region="ams", status="ready", success=True, error=None, version="v1",
        upgrade_id=_flag(argv, "--upgrade-id"), expires_at="2026-12-07T20:00:00Z", release_bytes=321,
        files_to_write=1, files_unchanged=1, processes=[process], apply_accepts=list(flydeploy.APPLY_ACCEPTS))
    assert result.keys() == flydeploy.PrepareResult.__annotations__.keys()
    return flydeploy.ExecResult(0, 0, "prepared\n" + result_line(**{**result, **fields}), "")


def succeed(machine_id, argv):
    """A machine that prepares, applies (or upgrades in one phase) and discards as asked."""
    command = _rpc_command(argv)
    if command == "prepare":
        return ready(machine_id, argv)
    if command == "discard":
        return flydeploy.ExecResult(0, 0, "discarded\n", "")
    return flydeploy.ExecResult(0, 0, "upgraded\n" + result_line(
        success=True, applied=True, modules_reloaded=2, processes_succeeded=1, suspend_duration_ms=3.2), "")


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.fixture
def store(tmp_path):
    return flydeploy.LocalStore(tmp_path / "bucket")


@pytest.fixture
def app_root(tmp_path):
    write(tmp_path / "app" / "shop" / "__init__.py", "VERSION = 1\n")
    write(tmp_path / "app" / "main.py", "import shop\n")
    return tmp_path / "app"


def run(store, api, app_root, image="registry.fly.io/shop:l1", **options):
    """``orchestrate`` app shop from ``app_root`` (version v1 unless given); returns (report, its output)."""
    out = io.StringIO()
    options.setdefault("version", "v1")
    report = flydeploy.orchestrate("shop", image, store=store, api=api, root=app_root,
                                   self_id="orch", out=out, **options)
    return report, out.getvalue()


def lock_key_exists(store):
    return store.head("releases/shop-deploy.lock") is not None
