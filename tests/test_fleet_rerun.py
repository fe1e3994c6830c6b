"""Fixes found by the review of fleet orchestration and the command line:
re-runs, settings plumbing, the lock's renewal, process groups, suspended
machines, the launch and rollback."""

import pytest

import flydeploy
from tests.fleet_doubles import StubMachines, lock_key_exists, machine, script, succeed, write
from tests.fleet_doubles import run as orchestrate

pytest_plugins = ["tests.fleet_doubles"]


def test_rerunning_a_version_from_another_image_reuses_the_stored_release(store, app_root):
    api = StubMachines([machine("a")], succeed)
    first, _ = orchestrate(store, api, app_root, image="registry.fly.io/shop:l1")
    again, out = orchestrate(store, api, app_root, image="registry.fly.io/shop:l2")
    assert not again.uploaded and "already stored" in out
    assert again.sha256 == first.sha256 and again.exit_code == 0
    hot = flydeploy.read_current(store, "shop")[0]["hot_upgrade"]
    assert hot["sha256"] == first.sha256 and hot["source_image_ref"] == "registry.fly.io/shop:l1"
    write(app_root / "shop" / "__init__.py", "VERSION = 2\n")
    with pytest.raises(flydeploy.FlyDeployError, match="already exists with other content"):
        orchestrate(store, api, app_root, image="registry.fly.io/shop:l3")
    assert not lock_key_exists(store)


# --- settings plumbing -------------------------------------------------------


@pytest.fixture
def src_project(tmp_path):
    write(tmp_path / "fly.toml", 'app = "shop"\n')
    write(tmp_path / "pyproject.toml", '[tool.flydeploy]\nroot = "src"\n')
    write(tmp_path / "src" / "main.py", "VERSION = 1\n")
    return tmp_path


def test_the_orchestrator_packs_the_root_pyproject_names(src_project):
    import argparse
    parser = argparse.ArgumentParser()
    flydeploy._add_orchestrate_parser(parser.add_subparsers())
    args = parser.parse_args(["orchestrate", "--image-ref", "img", "--root", str(src_project)])
    config = flydeploy.load_config(args.root, overrides=flydeploy.fleet_overrides(args))
    assert config.root == src_project / "src" and config.sources["root"].startswith("pyproject.toml")


def test_local_root_is_the_project_and_files_beat_fly_app_name(src_project, monkeypatch):
    import flydeploy_cli
    monkeypatch.setenv("FLY_APP_NAME", "from-the-shell")
    args = flydeploy_cli._parser()[0].parse_args(["hot", "--local", "--root", str(src_project)])
    config = flydeploy_cli._config(args)
    assert config.root == src_project / "src"
    assert (config.app, config.sources["app"]) == ("shop", "fly.toml")
    (src_project / "fly.toml").unlink()
    config = flydeploy_cli._config(args)
    assert (config.app, config.sources["app"]) == ("from-the-shell", "FLY_APP_NAME")
    options = config.orchestrate_options()
    assert options["root"] == src_project / "src" and options["max_concurrency"] == 10


# --- the deploy lock ----------------------------------------------------------


def test_the_lock_is_renewed_while_orchestrate_runs(store, app_root):
    import datetime
    import threading

    from tests.waiting import wait_until

    def lock_doc():
        return store.get_json("releases/shop-deploy.lock")[0]

    seen = {}

    def answer(machine_id, argv):
        first = lock_doc()
        first_expiry = flydeploy._parse_time(first["expires_at"])
        # Past the expiry the lock was taken with, it must still be held, renewed.
        wait_until(lambda: flydeploy._utc_now() > first_expiry + datetime.timedelta(seconds=0.2),
                   "the first expiry to pass")
        seen["expires_at"] = flydeploy._parse_time(lock_doc()["expires_at"])
        try:
            flydeploy.acquire_lock(store, "shop", owner="bob", deployment_id="other", timeout_s=60)
        except flydeploy.LockHeld as exc:
            seen["refused"] = str(exc)
        seen["threads"] = [t.name for t in threading.enumerate()]
        return succeed(machine_id, argv)

    api = StubMachines([machine("a")], answer)
    report, _ = orchestrate(store, api, app_root, lock_timeout=3.0)
    assert report.exit_code == 0
    assert "refused" in seen, "a second deployer took the lock while the first ran"
    assert seen["expires_at"] > flydeploy._utc_now() - datetime.timedelta(seconds=1)
    assert "flydeploy-lock" in seen["threads"]
    assert "flydeploy-lock" not in [t.name for t in threading.enumerate()]
    assert not lock_key_exists(store)


# --- process groups -------------------------------------------------------------


def test_a_process_group_upgrade_is_recorded_for_its_groups_only(store, app_root, monkeypatch):
    api = StubMachines([machine("a", group="app"), machine("w", group="worker")], succeed)
    orchestrate(store, api, app_root, version="v1")
    doc = flydeploy.read_current(store, "shop")[0]
    assert doc["hot_upgrade"]["process_groups"] is None
    write(app_root / "shop" / "__init__.py", "VERSION = 2\n")
    api.calls.clear()
    orchestrate(store, api, app_root, version="v2", process_groups=["worker"])
    assert [call[0] for call in api.calls] == ["w", "w"]  # prepared, then applied
    doc = flydeploy.read_current(store, "shop")[0]
    assert doc["hot_upgrade"]["process_groups"] == ["worker"]

    # Startup catch-up: a worker takes v2, an app machine keeps v1.
    monkeypatch.setenv("FLY_PROCESS_GROUP", "worker")
    assert flydeploy._current_hot_upgrade(doc)["version"] == "v2"
    monkeypatch.setenv("FLY_PROCESS_GROUP", "app")
    assert flydeploy._current_hot_upgrade(doc)["version"] == "v1"

    on_v1 = [{"pid": 1, "version": "v1", "applied_at": "2026-11-22T00:00:00Z"}]
    app_row = flydeploy.status_row(machine("a", group="app"), doc, on_v1)
    worker_row = flydeploy.status_row(machine("w", group="worker"), doc, on_v1)
    assert app_row["verdict"] == "✓ up to date"
    assert worker_row["verdict"] == "✗ NOT APPLIED"


# --- suspended machines ---------------------------------------------------------


def test_suspended_machines_are_listed_apart_from_stopped_ones(store, app_root):
    api = StubMachines([machine("a"), machine("s", state="stopped"), machine("z", state="suspended")], succeed)
    report, out = orchestrate(store, api, app_root)
    assert "· s (ams) stopped: applies at next start" in out
    assert ("· z (ams) suspended: applies when it next boots; after a resume only through the poller "
            "(FLYDEPLOY_POLL_INTERVAL)") in out
    assert "1 stopped machine will apply it at next start" in out
    assert "1 suspended machine will apply it when booted again" in out
    doc = flydeploy.read_current(store, "shop")[0]
    row = flydeploy.status_row(machine("z", state="suspended"), doc)
    assert "FLYDEPLOY_POLL_INTERVAL" in row["verdict"] and row["state"] == "suspended"
    assert flydeploy.status_row(machine("s", state="stopped"), doc)["verdict"] == "stopped"


# --- timeouts, launch retries, SIGTERM ----------------------------------------------


def test_the_timeout_line_states_the_time_waited_in_all(store, app_root):
    import re
    import time

    def answer(machine_id, argv):
        time.sleep(1.2)  # the server's own deadline passing, attempts included
        raise flydeploy.MachinesAPIError(408, "deadline_exceeded")

    report, out = orchestrate(store, StubMachines([machine("c")], answer), app_root, timeout=0.3)
    waited = re.search(r"✗ c \(ams\) timed out after (\d+) s in all \(0.3 s per attempt", out)
    assert report.exit_code == 1 and waited, out
    assert int(waited.group(1)) >= 1


class CreateRefused:
    """A Machines client whose machine creation fails with ``status`` and ``message``."""

    def __init__(self, status, message):
        self.status, self.message, self.creates = status, message, 0

    def create(self, config):
        self.creates += 1
        raise flydeploy.MachinesAPIError(self.status, self.message, method="POST", path="/v1/apps/shop/machines")

    def list(self, metadata=None):
        return []


def test_an_auth_error_is_not_retried_as_image_propagation(capsys):
    import flydeploy_cli
    config = {"metadata": {flydeploy.ORCHESTRATOR_RUN_KEY: "r"}}
    denied = CreateRefused(401, "Authenticate: token validation error")
    with pytest.raises(flydeploy.FlyDeployError, match="could not be created"):
        flydeploy_cli.launch_orchestrator(denied, config, lambda m: ["true"], retry_delay_s=0)
    assert denied.creates == 1 and "trying again" not in capsys.readouterr().out
    missing = CreateRefused(400, "failed to launch VM: failed to get manifest registry.fly.io/shop:x: manifest unknown")
    with pytest.raises(flydeploy.FlyDeployError, match="could not be created"):
        flydeploy_cli.launch_orchestrator(missing, config, lambda m: ["true"], attempts=3, retry_delay_s=0)
    assert missing.creates == 3 and capsys.readouterr().out.count("still be propagating") == 2


# --- rollback ---------------------------------------------------------------------


def test_repeated_rollbacks_go_further_back(store, app_root):
    api = StubMachines([machine("a")], succeed)
    for number in range(1, 5):
        write(app_root / "shop" / "__init__.py", f"VERSION = {number}\n")
        orchestrate(store, api, app_root, version=f"v{number}")
    versions = [orchestrate(store, api, app_root, version=None, rollback=True)[0].version for _ in range(3)]
    assert versions == ["v3", "v2", "v1"]
    with pytest.raises(flydeploy.FlyDeployError, match="nothing earlier to roll back to"):
        orchestrate(store, api, app_root, version=None, rollback=True)
    write(app_root / "shop" / "__init__.py", "VERSION = 5\n")
    orchestrate(store, api, app_root, version="v5")  # pushed on top of v1: v1 is what ran before
    assert orchestrate(store, api, app_root, version=None, rollback=True)[0].version == "v1"
    assert orchestrate(store, api, app_root, version=None, rollback_to="v3")[0].version == "v3"
    assert orchestrate(store, api, app_root, version=None, rollback=True)[0].version == "v1"
    assert not lock_key_exists(store)


# --- dry-run redaction, the build's silence limit ---------------------------------------


def test_dry_run_hides_url_passwords_and_secret_values(project, capsys, monkeypatch):
    import flydeploy_cli
    monkeypatch.chdir(project)
    monkeypatch.setattr(flydeploy_cli, "_owner", lambda: ("ann@example.com", False))
    code = flydeploy_cli.main(["hot", "--dry-run", "--build-arg", "DATABASE_URL=postgres://app:hunter2@db:5432/x",
                               "--build-arg", "NPM_TOKEN=npm_abc"])
    out = capsys.readouterr().out
    assert code == 0
    assert "hunter2" not in out and "npm_abc" not in out and "sk_live_123" not in out
    assert "postgres://app:<redacted>@db:5432/x" in out
    assert flydeploy_cli.redact(["fly", "x", "https://u:pw@h/p"]) == ["fly", "x", "https://u:<redacted>@h/p"]


def test_the_build_silence_limit_is_read_at_call_time(tmp_path, monkeypatch):
    import flydeploy_cli
    silent = script(tmp_path / "silent", "import time\ntime.sleep(10)\n")
    monkeypatch.setattr(flydeploy_cli, "BUILD_SILENCE_S", 0.3)
    with pytest.raises(flydeploy.FlyDeployError, match="printed nothing"):
        flydeploy_cli.run_build([str(silent)], "x")


# --- the orchestrator's working directory -------------------------------------------------


def test_the_orchestrator_and_every_exec_use_the_app_dir(project):
    import flydeploy_cli

    def argv():
        config = flydeploy.load_config(project)
        return config, flydeploy_cli.orchestrate_argv(config, "img")

    config, words = argv()
    assert words[:7] == ["python3", "-c", flydeploy.MachineCommands.BOOTSTRAP, "/app", "orchestrate", "--root", "/app"]
    assert config.sources["app_dir"] == "default"
    write(project / "Dockerfile", "FROM python:3.12\nWORKDIR /srv\nCOPY . .\nWORKDIR /srv/shop\nCMD python main.py\n")
    config, words = argv()
    assert words[3] == "/srv/shop" and words[6] == "/srv/shop"
    assert config.sources["app_dir"] == "Dockerfile WORKDIR"
    assert config.machine_commands().rpc("info", "shop")[:5] == ["python3", "-c", flydeploy.MachineCommands.BOOTSTRAP, "/srv/shop", "rpc"]
    write(project / "pyproject.toml", '[tool.flydeploy]\napp_dir = "/opt/my app"\npython = "/venv/bin/python"\n')
    config, words = argv()
    assert words[:7] == ["/venv/bin/python", "-c", flydeploy.MachineCommands.BOOTSTRAP, "/opt/my app", "orchestrate", "--root", "/opt/my app"]
    assert config.sources["app_dir"].startswith("pyproject.toml")
