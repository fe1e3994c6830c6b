"""Two-phase upgrades on one machine, on real processes: `rpc prepare`, `rpc apply`, `rpc discard`, `--revert`."""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import flydeploy
from tests.bucket_proxy import BucketProxy
from tests.engine_tree import tree  # noqa: F401  (the fixture)
from tests.machine_apps import COUNTER_PY, MAIN_PY, make_release, parse_result, wait_for
from tests.test_machine_failures import APP_AS_NOBODY, NOBODY, ROOT_ONLY, open_machine  # noqa: F401

pytest_plugins = ["tests.machine_apps"]

# v2: greet imports a module the release adds; the counter's state goes through code_change.
COUNTER_V2 = COUNTER_PY.replace('LABEL = "count-v1"', 'LABEL = "count-v2"').replace(
    "    vsn = 1\n", "    vsn = 2\n    def code_change(self, old_vsn, state, extra):\n"
                    "        return {**state, \"from\": old_vsn}\n")
GREET_V2 = 'import helpers\n\ndef greeting():\n    return helpers.word() + " v2"\n'
HELPERS = 'def word():\n    return "hello"\n'
GREET_V3 = 'def greeting():\n    return "hello v3"\n'
V2 = {"main.py": MAIN_PY, "counter.py": COUNTER_V2, "greet.py": GREET_V2, "helpers.py": HELPERS}
V3 = {"main.py": MAIN_PY, "counter.py": COUNTER_V2, "greet.py": GREET_V3}
COLOR_V1 = "import enum\n\nclass Color(enum.Enum):\n    RED = 1\n"
COLOR_V2 = COLOR_V1 + "    BLUE = 2\n"


def snapshot(root: pathlib.Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too: a staged file is one) with its bytes."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def leftovers(machine) -> list[str]:
    """What a staging keeps in the runtime directory: the journal and undo records."""
    return sorted(path.name for path in machine.socket_dir().iterdir()
                  if path.name == "journal.json" or path.name.startswith("undo-"))


def phase(machine, command: str, *args: str) -> tuple[int, dict, str]:
    """Run ``rpc <command>`` detached, waiting for it as the orchestrator does; (exit code, result, output)."""
    done = machine.rpc(command, "--app", "shop", *args, "--detach", "--wait", "100")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.returncode, parse_result(done.stdout), done.stdout


def stored_result(store, key: str) -> dict:
    """The result object at ``key``, which a detached job stores just after its exec answered."""
    wait_for(lambda: store.head(key), what=f"the result object {key}")
    return store.get_json(key)[0]


def test_one_refusing_process_leaves_everything_live_as_it_was(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.write({"extra.py": COLOR_V1})
    good = machine.start().wait_ready()
    refusing = machine.start(env={"APP_EXTRA": "1"}).wait_ready()  # only this one imports extra
    good.get("/bump")
    before = snapshot(machine.app_root)
    release, url = make_release(tmp_path, local_store, {**V2, "extra.py": COLOR_V2}, version="v2")

    prepare = machine.rpc("prepare", "--app", "shop", "--url", url, "--sha256", release.sha256,
                          "--upgrade-id", "up-1")
    assert prepare.returncode == 1, prepare.stdout + prepare.stderr
    result = parse_result(prepare.stdout)
    assert result["status"] == "refused" and result["success"] is False
    assert "cold deploy required: Enum extra.Color members changed" in result["error"]
    assert result["expires_at"] is None and result["version"] == "v2" and result["upgrade_id"] == "up-1"
    by_pid = {process["pid"]: process for process in result["processes"]}
    assert by_pid[good.pid]["ok"] is True and by_pid[good.pid]["plan"]["refused"] is None
    assert by_pid[refusing.pid]["ok"] is False
    assert by_pid[refusing.pid]["plan"]["refused"].startswith("cold deploy required: Enum extra.Color")
    assert str(refusing.pid) in result["error"] or "main.py" in result["error"]

    # Nothing live changed: files, code, state; nothing staged is left.
    assert snapshot(machine.app_root) == before
    assert leftovers(machine) == []
    assert good.get()["greeting"] == "hello v1" and good.get()["count"] == "count-v1:1"
    assert refusing.get()["greeting"] == "hello v1"
    stored, _ = local_store.get_json(f"releases/shop-results/up-1/prepare/{result['machine_id']}.json")
    assert stored["status"] == "refused"


def test_prepare_plans_and_changes_nothing_then_apply_applies_everywhere(machine, tmp_path, seaweed, s3):
    machine.env.update(seaweed.env())
    machine.write_web_app()
    first, second = machine.start().wait_ready(), machine.start().wait_ready()
    for _ in range(3):
        first.get("/bump")
    before = snapshot(machine.app_root)
    release, url = make_release(tmp_path, s3, V2, version=f"v2-{tmp_path.name[-8:]}")

    _code, prepared, _out = phase(machine, "prepare", "--url", url, "--sha256", release.sha256,
                                  "--upgrade-id", "up-2", "--expires-in", "300")
    assert prepared["status"] == "ready" and prepared["success"] is True and prepared["error"] is None
    assert prepared["version"] == release.manifest["version"] and prepared["expires_at"]
    assert prepared["files_to_write"] == 3 and prepared["files_unchanged"] == 1
    assert prepared["release_bytes"] == pathlib.Path(release.path).stat().st_size
    assert prepared["apply_accepts"] == ["--deployed-at"]  # what an orchestrator may give its apply
    assert {process["pid"] for process in prepared["processes"]} == {first.pid, second.pid}
    for process in prepared["processes"]:
        plan = process["plan"]
        assert sorted(plan["modules_changed"]) == ["counter", "greet"] and plan["modules_added"] == ["helpers"]
        assert plan["code_change"] == [{"server": "counter", "vsn_old": 1, "vsn_new": 2}]
        assert plan["refused"] is None
    # Prepared: the staging waits, but nothing the app uses changed.
    assert leftovers(machine) == ["journal.json", "undo-up-2"]
    assert {name: data for name, data in snapshot(machine.app_root).items()
            if not name.startswith(".") and "/." not in name} == before
    assert first.get()["greeting"] == "hello v1" and first.get()["count"] == "count-v1:3"
    assert stored_result(s3, f"releases/shop-results/up-2/prepare/{prepared['machine_id']}.json")["status"] == "ready"

    _code, applied, out = phase(machine, "apply", "--url", url, "--sha256", release.sha256, "--upgrade-id", "up-2")
    assert applied["success"] is True and applied["applied"] is True and applied["health"] is None, out
    assert applied["processes_succeeded"] == 2 and applied["upgrade_id"] == "up-2"
    assert not any("preparing it first" in note for note in applied["notes"])  # the prepared staging was used
    assert sorted(applied["module_names"]) == ["counter", "greet"]
    assert first.get()["greeting"] == "hello v2" and first.get()["count"] == "count-v2:3"
    assert second.get()["greeting"] == "hello v2"
    assert (machine.app_root / "helpers.py").read_text() == HELPERS
    assert not [name for name in snapshot(machine.app_root) if "flydeploy-" in name]
    assert leftovers(machine) == ["undo-up-2"]  # kept to revert this apply
    assert stored_result(s3, f"releases/shop-results/up-2/apply/{applied['machine_id']}.json")["applied"] is True


def test_discard_is_idempotent_and_apply_without_a_staging_still_ends_on_the_release(machine, tmp_path,
                                                                                    local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    before = snapshot(machine.app_root)
    release, url = make_release(tmp_path, local_store, V2, version="v2")
    phase(machine, "prepare", "--url", url, "--upgrade-id", "up-3")
    assert snapshot(machine.app_root) != before  # the staged files

    discarded = machine.rpc("discard", "--app", "shop", "--upgrade-id", "up-3")
    assert discarded.returncode == 0 and "discarded the staging of up-3" in discarded.stdout
    assert snapshot(machine.app_root) == before and leftovers(machine) == []
    again = machine.rpc("discard", "--app", "shop", "--upgrade-id", "up-3")
    assert again.returncode == 0 and "nothing staged for up-3" in again.stdout

    _code, applied, out = phase(machine, "apply", "--url", url, "--sha256", release.sha256, "--upgrade-id", "up-3")
    assert any("preparing it first" in note for note in applied["notes"])
    assert applied["success"] is True and applied["applied"] is True and applied["version"] == "v2"
    assert process.get()["greeting"] == "hello v2"


def test_a_prepare_of_another_upgrade_discards_the_older_staging_first(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    _release, url2 = make_release(tmp_path, local_store, V2, version="v2")
    _release, url3 = make_release(tmp_path, local_store, V3, version="v3")
    phase(machine, "prepare", "--url", url2, "--upgrade-id", "up-a")
    assert (machine.app_root / ".helpers.py.flydeploy-new").exists()
    _code, prepared, _out = phase(machine, "prepare", "--url", url3, "--upgrade-id", "up-b")
    assert prepared["status"] == "ready"
    assert not (machine.app_root / ".helpers.py.flydeploy-new").exists()  # v3 has no helpers.py
    assert leftovers(machine) == ["journal.json", "undo-up-b"]
    # The older id's staging is gone: its apply does the whole upgrade itself.
    _code, applied, out = phase(machine, "apply", "--url", url2, "--upgrade-id", "up-a")
    assert any("preparing it first" in note for note in applied["notes"]) and applied["success"] is True
    assert process.get()["greeting"] == "hello v2"


def test_a_one_phase_upgrade_discards_a_staging_first(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    _release, url2 = make_release(tmp_path, local_store, V2, version="v2")
    _release, url3 = make_release(tmp_path, local_store, V3, version="v3")
    phase(machine, "prepare", "--url", url2, "--upgrade-id", "up-a", "--expires-in", "3600")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url3)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert process.get()["greeting"] == "hello v3"
    assert leftovers(machine) == [] and not (machine.app_root / ".helpers.py.flydeploy-new").exists()


def test_revert_goes_back_to_the_previous_hot_release(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    process.get("/bump")
    _release, url2 = make_release(tmp_path, local_store, V2, version="v2")
    _release, url3 = make_release(tmp_path, local_store, V3, version="v3")
    phase(machine, "prepare", "--url", url2, "--upgrade-id", "up-2")
    phase(machine, "apply", "--url", url2, "--upgrade-id", "up-2")
    on_v2 = snapshot(machine.app_root)
    phase(machine, "prepare", "--url", url3, "--upgrade-id", "up-3")
    phase(machine, "apply", "--url", url3, "--upgrade-id", "up-3")
    assert process.get()["greeting"] == "hello v3"

    _code, prepared, _out = phase(machine, "prepare", "--revert", "up-3", "--upgrade-id", "up-3-back")
    assert prepared["status"] == "ready" and prepared["version"] == "v2" and prepared["files_to_write"] == 1
    assert process.get()["greeting"] == "hello v3"
    _code, applied, _out = phase(machine, "apply", "--revert", "up-3", "--upgrade-id", "up-3-back")
    assert applied["success"] is True and applied["applied"] is True and applied["version"] == "v2"
    assert process.get()["greeting"] == "hello v2" and process.get()["count"] == "count-v2:1"
    assert snapshot(machine.app_root) == on_v2
    info = json.loads(machine.rpc("info", "--app", "shop").stdout)
    assert [entry["version"] for entry in info] == ["v2"]
    assert stored_result(local_store, f"releases/shop-results/up-3-back/apply/{applied['machine_id']}.json")[
        "version"] == "v2"


def test_revert_goes_back_to_the_images_own_code(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    image = snapshot(machine.app_root)
    _release, url = make_release(tmp_path, local_store, V2, version="v2")
    _code, applied, _out = phase(machine, "apply", "--url", url, "--upgrade-id", "up-2")  # one run: no prepare
    assert applied["success"] is True and process.get()["greeting"] == "hello v2"

    _code, prepared, _out = phase(machine, "prepare", "--revert", "up-2", "--upgrade-id", "up-2-back")
    assert prepared["status"] == "ready" and prepared["version"] is None
    _code, back, _out = phase(machine, "apply", "--revert", "up-2", "--upgrade-id", "up-2-back")
    assert back["success"] is True and back["applied"] is True
    assert snapshot(machine.app_root) == image  # helpers.py, which the upgrade created, is gone
    assert not (machine.socket_dir() / "state.json").exists()
    assert process.get()["greeting"] == "hello v1"
    assert process.get()["info"] == {"hot_upgrade_applied": False}

    missing = machine.rpc("prepare", "--app", "shop", "--revert", "never-applied", "--upgrade-id", "x-back")
    assert missing.returncode == 1
    assert "nothing to revert never-applied with on this machine" in parse_result(missing.stdout)["error"]
    assert parse_result(missing.stdout)["status"] == flydeploy.NOTHING_KEPT


def test_an_apply_of_the_release_a_machine_already_runs_keeps_nothing_to_revert(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    _release, url = make_release(tmp_path, local_store, V2, version="v2")
    phase(machine, "apply", "--url", url, "--upgrade-id", "up-2")
    # The same release again, as on a machine that caught up at boot from current.json
    # before its apply came: nothing changes, and a revert could only put v2 back.
    _code, again, _out = phase(machine, "apply", "--url", url, "--upgrade-id", "up-2-again")
    assert again["success"] is True and process.get()["greeting"] == "hello v2"
    _code, prepared, _out = phase(machine, "prepare", "--revert", "up-2-again", "--upgrade-id", "up-2-again-back")
    assert prepared["status"] == flydeploy.NOTHING_KEPT and "nothing to revert" in prepared["error"]
    assert process.get()["greeting"] == "hello v2"


@pytest.fixture
def answering_500():
    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_health_check_fails_the_apply_and_keeps_the_release(machine, tmp_path, local_store, answering_500):
    machine.write_web_app()
    process = machine.start().wait_ready()
    app_port = int(process.port_file.read_text())
    _release, url = make_release(tmp_path, local_store, V2, version="v2")
    _code, healthy, _out = phase(machine, "apply", "--url", url, "--upgrade-id", "up-ok", "--health-check", "/",
                                 "--health-port", str(app_port))
    assert healthy["success"] is True and healthy["health"] == {
        "ok": True, "processes_alive": True, "checks": [{"port": app_port, "status": 200, "error": None}]}

    _release, url3 = make_release(tmp_path, local_store, V3, version="v3")
    nobody = unused_port()
    _code, applied, _out = phase(machine, "apply", "--url", url3, "--upgrade-id", "up-bad", "--health-check",
                                 "/", "--health-port", str(app_port), "--health-port", str(answering_500),
                                 "--health-port", str(nobody), "--health-timeout", "2")
    assert applied["success"] is False and applied["applied"] is True and applied["status"] == "failed"
    health = applied["health"]
    assert health["ok"] is False and health["processes_alive"] is True
    checks = {check["port"]: check for check in health["checks"]}
    assert checks[app_port] == {"port": app_port, "status": 200, "error": None}
    assert checks[answering_500]["status"] == 500 and "answered 500" in checks[answering_500]["error"]
    assert checks[nobody]["status"] is None and "refused" in checks[nobody]["error"].lower()
    assert "health check failed" in applied["error"] and "release stays" in applied["error"]
    assert process.get()["greeting"] == "hello v3"  # kept: the orchestrator decides
    assert (machine.app_root / "greet.py").read_text() == GREET_V3


def expire_after(prepared: dict) -> None:
    ends = flydeploy._parse_time(prepared["expires_at"]).timestamp()
    wait_for(lambda: time.time() > ends + 0.05, timeout=30, what="the staging to expire")


def test_an_expired_staging_is_not_applied_and_is_cleaned_at_boot(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    before = snapshot(machine.app_root)
    _release, url = make_release(tmp_path, local_store, V2, version="v2")
    _code, prepared, _out = phase(machine, "prepare", "--url", url, "--upgrade-id", "up-e", "--expires-in", "3")
    # A process starting while the staging is live leaves it alone ...
    machine.start().wait_ready()
    assert leftovers(machine) == ["journal.json", "undo-up-e"]
    expire_after(prepared)
    # ... and once it expired, the next boot discards it.
    machine.start().wait_ready()
    assert leftovers(machine) == [] and snapshot(machine.app_root) == before

    _code, prepared, _out = phase(machine, "prepare", "--url", url, "--upgrade-id", "up-f", "--expires-in", "1")
    expire_after(prepared)
    _code, applied, out = phase(machine, "apply", "--url", url, "--upgrade-id", "up-f")
    assert any("preparing it first" in note for note in applied["notes"]) and applied["success"] is True  # the next run did not use it
    assert process.get()["greeting"] == "hello v2"


def test_the_poller_discards_an_expired_staging(machine, tmp_path, seaweed, s3):
    machine.env.update(seaweed.env())
    machine.env["FLYDEPLOY_POLL_INTERVAL"] = "0.2"
    machine.write_web_app()
    machine.start().wait_ready()
    before = snapshot(machine.app_root)
    _release, url = make_release(tmp_path, s3, V2, version=f"v2-{tmp_path.name[-8:]}")
    _code, prepared, _out = phase(machine, "prepare", "--url", url, "--upgrade-id", "up-p", "--expires-in", "2")
    assert leftovers(machine) == ["journal.json", "undo-up-p"]
    expire_after(prepared)
    wait_for(lambda: leftovers(machine) == [], what="the poller to discard the expired staging")
    assert snapshot(machine.app_root) == before


def test_a_restarted_machine_discards_the_staging_at_boot(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.start().wait_ready()
    before = snapshot(machine.app_root)
    _release, url = make_release(tmp_path, local_store, V2, version="v2")
    phase(machine, "prepare", "--url", url, "--upgrade-id", "up-r", "--expires-in", "3600")
    journal_path = machine.socket_dir() / "journal.json"
    journal = json.loads(journal_path.read_text())
    journal["boot_id"] = "the-boot-before-a-restart"  # the runtime directory outlived a restart
    journal_path.write_text(json.dumps(journal))
    machine.start().wait_ready()
    assert leftovers(machine) == [] and snapshot(machine.app_root) == before


def test_the_plan_reads_staged_files_and_changes_nothing_live(tree):
    # In this process: a tracked module, its new source staged beside it; the plan reads it there.
    tree.write("planned.py", "import flydeploy\n\nclass Keeper(flydeploy.Server):\n    vsn = 'a'\n")
    module = tree.load("planned")
    tree.start(module.Keeper, name="keeper")
    staged = tree.write(".planned.py.flydeploy-new",
                        "import flydeploy\nfrom . import added\n\nclass Keeper(flydeploy.Server):\n    vsn = 'b'\n")
    added = tree.write(".added.py.flydeploy-new", "VALUE = (\n")  # a syntax error
    files = {tree.path("planned.py"): staged, tree.path("added.py"): added}
    before = sorted(tree.path("").iterdir())

    plan = flydeploy.plan_upgrade(files)
    assert plan.modules_added == [tree.name("added")]
    assert plan.refused.startswith("syntax error in ") and "added.py, line 1" in plan.refused

    added.write_text("VALUE = 1\n")
    plan = flydeploy.plan_upgrade(files)
    assert plan.refused is None and plan.modules_changed == [tree.name("planned")]
    assert plan.to_dict()["code_change"] == [{"server": "keeper", "vsn_old": "a", "vsn_new": "b"}]
    # Nothing live changed: the module, the server's class, the files.
    assert flydeploy.modified_modules() == [] and module.Keeper.vsn == "a"
    assert tree.name("added") not in sys.modules and sorted(tree.path("").iterdir()) == before
    assert flydeploy.plan_upgrade({}).modules_changed == []


@ROOT_ONLY
def test_root_prepares_applies_and_reverts_with_the_app_users_rights(open_machine):
    machine = open_machine
    store = flydeploy.LocalStore(machine.base / "store")
    machine.write_web_app()
    for path in (machine.base, machine.app_root, *machine.app_root.iterdir(), machine.runtime):
        os.chown(path, NOBODY, NOBODY)
    process = machine.start([sys.executable, "-c", APP_AS_NOBODY]).wait_ready()
    image = snapshot(machine.app_root)
    _release, url = make_release(machine.base, store, V2, version="v2")

    _code, prepared, out = phase(machine, "prepare", "--url", url, "--upgrade-id", "up-n")
    assert prepared["status"] == "ready", out
    for path in (machine.socket_dir() / "journal.json", machine.socket_dir() / "undo-up-n",
                 machine.app_root / ".greet.py.flydeploy-new"):
        assert path.stat().st_uid == NOBODY, path
    _code, applied, out = phase(machine, "apply", "--url", url, "--upgrade-id", "up-n")
    assert applied["success"] is True, out
    assert process.get()["greeting"] == "hello v2"
    for path in (machine.app_root / "greet.py", machine.app_root / "helpers.py"):
        assert path.stat().st_uid == NOBODY, path

    phase(machine, "prepare", "--revert", "up-n", "--upgrade-id", "up-n-back")
    _code, back, out = phase(machine, "apply", "--revert", "up-n", "--upgrade-id", "up-n-back")
    assert back["success"] is True, out
    assert process.get()["greeting"] == "hello v1" and snapshot(machine.app_root) == image
    assert (machine.app_root / "greet.py").stat().st_uid == NOBODY


def test_a_plan_asked_for_by_code_an_upgrade_runs_is_refused_not_waited_for(tree):
    tree.write("calls_plan.py", "X = 1\n")
    tree.load("calls_plan")
    tree.write("calls_plan.py", "import flydeploy\nX = 2\nflydeploy.plan_upgrade()\n")
    reports = []
    worker = threading.Thread(target=lambda: reports.append(tree.reload("calls_plan")), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the upgrade waits for a plan that waits for the upgrade"
    assert reports[0].ok is False and "plan_upgrade() was called from code an upgrade runs" in reports[0].error


# --- the exec answers before the job stores its result ---------------------------

@pytest.fixture
def proxied(machine, seaweed):
    """The machine reaches the bucket through a ``BucketProxy``, under an app name of its own
    (so that its current.json is its own); yields ``(proxy, store)``, the store proxied too."""
    with BucketProxy(seaweed.endpoint) as proxy:
        machine.app = f"shop-{secrets.token_hex(4)}"
        machine.env.update(seaweed.env(), AWS_ENDPOINT_URL_S3=proxy.endpoint, FLY_APP_NAME=machine.app)
        yield proxy, seaweed.client(endpoint=proxy.endpoint)


def app_phase(machine, command: str, *args: str, wait: str = "100") -> tuple[dict, str]:
    """``phase`` for the machine's own app name: (result, output)."""
    done = machine.rpc(command, "--app", machine.app, *args, "--detach", "--wait", wait)
    assert done.returncode == 0, done.stdout + done.stderr
    return parse_result(done.stdout), done.stdout


def test_the_exec_answers_before_its_job_stores_the_result(machine, tmp_path, proxied):
    proxy, store = proxied
    machine.write_web_app()
    process = machine.start().wait_ready()
    release, url = make_release(tmp_path, store, V2, version="v2", app=machine.app)
    results = f"releases/{machine.app}-results/up-1/"
    # The bucket keeps the prepare's result object waiting: the exec answers all the same.
    proxy.hold(lambda method, path: method == "PUT" and "/prepare/" in path)
    prepared, out = app_phase(machine, "prepare", "--url", url, "--sha256", release.sha256, "--upgrade-id", "up-1",
                              wait="10")
    assert prepared["status"] == "ready", out
    # The job hands its result over first, then sends the PUT that the bucket holds.
    assert proxy.holding.wait(timeout=60) and store.head(f"{results}prepare/{prepared['machine_id']}.json") is None
    # The next phase runs while the prepare's job is still storing its result.
    applied, out = app_phase(machine, "apply", "--url", url, "--sha256", release.sha256, "--upgrade-id", "up-1")
    assert applied["applied"] is True and applied["success"] is True, out
    assert process.get()["greeting"] == "hello v2"
    assert store.head(f"{results}prepare/{prepared['machine_id']}.json") is None  # still held
    proxy.release()
    assert stored_result(store, f"{results}prepare/{prepared['machine_id']}.json") == prepared
    assert stored_result(store, f"{results}apply/{applied['machine_id']}.json") == applied


def test_a_job_that_dies_leaves_its_exec_without_a_result(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.start().wait_ready()
    release, url = make_release(tmp_path, local_store, V2, version="v2")
    exec_ = subprocess.Popen([sys.executable, "-m", "flydeploy", "rpc", "prepare", "--app", "shop", "--url", url,
                              "--upgrade-id", "up-1", "--detach", "--wait", "600"],
                             cwd=machine.app_root, env={**machine.env, "FLYDEPLOY_TEST_STOP_AT": "unpack"},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = json.loads(exec_.stdout.readline())
    stopped = machine.socket_dir() / "stopped-at-unpack"
    wait_for(lambda: stopped.exists() or exec_.poll() is not None, what="the job to reach unpack")
    assert exec_.poll() is None
    # The machine lock held elsewhere: the job's guardian, which recovers under it once the
    # job is gone, waits; the exec must not wait for it.
    with open(machine.socket_dir() / "upgrade.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.kill(started["pid"], signal.SIGKILL)
        out, err = exec_.communicate(timeout=60)
    assert exec_.returncode == 0, err
    assert "__FLYDEPLOY_RESULT__" not in out and out == "", out  # no result: the orchestrator reports none
    assert leftovers(machine) == []  # killed before it staged anything: nothing to recover
    assert local_store.head("releases/shop-results/up-1/prepare/" + machine.env["FLY_MACHINE_ID"] + ".json") is None


DEPLOYED_AT = "2099-01-01T00:00:00.000Z"  # later than any real recording: never superseded


def test_an_apply_told_when_the_release_was_recorded_reads_no_current_json(machine, tmp_path, proxied):
    proxy, store = proxied
    machine.write_web_app()
    process = machine.start().wait_ready()
    current = f"/releases/{machine.app}-current.json"
    for run, given in (("up-1", None), ("up-2", DEPLOYED_AT)):
        release, url = make_release(tmp_path, store, V2 if run == "up-1" else V3, version=run, app=machine.app)
        recorded = flydeploy.record_hot_upgrade(store, machine.app, release.hot_upgrade_record(url))
        before = len(proxy.seen("GET", current))
        prepared, out = app_phase(machine, "prepare", "--url", url, "--upgrade-id", run)
        assert prepared["status"] == "ready", out
        applied, out = app_phase(machine, "apply", "--url", url, "--upgrade-id", run,
                                 *(["--deployed-at", given] if given else []))
        assert applied["applied"] is True, out
        info = json.loads(machine.rpc("info", "--app", machine.app).stdout)
        if given is None:  # as an older orchestrator runs it: read from current.json
            assert len(proxy.seen("GET", current)) > before
            assert [entry["deployed_at"] for entry in info] == [recorded["hot_upgrade"]["deployed_at"]]
        else:
            assert len(proxy.seen("GET", current)) == before
            assert [entry["deployed_at"] for entry in info] == [given] != [recorded["hot_upgrade"]["deployed_at"]]
    assert process.get()["greeting"] == "hello v3"
    # The one-phase upgrade too.
    release, url = make_release(tmp_path, store, V2, version="up-3", app=machine.app)
    flydeploy.record_hot_upgrade(store, machine.app, release.hot_upgrade_record(url))
    # Given in another zone, it is recorded as current.json's records are written, which is how they compare.
    before, later = len(proxy.seen("GET", current)), "2099-01-02T01:00:00+01:00"
    done = machine.rpc("upgrade", "--app", machine.app, "--url", url, "--deployed-at", later)
    assert done.returncode == 0 and parse_result(done.stdout)["success"], done.stdout + done.stderr
    assert len(proxy.seen("GET", current)) == before
    info = json.loads(machine.rpc("info", "--app", machine.app).stdout)
    assert [entry["deployed_at"] for entry in info] == ["2099-01-02T00:00:00.000Z"]
    assert process.get()["greeting"] == "hello v2"


def test_an_apply_of_a_release_deployed_before_the_installed_one_is_refused(machine, tmp_path, local_store):
    # Two upgrades that raced, or a stale read: the two-phase apply never rolls a machine back,
    # as the one-phase upgrade does not.
    machine.write_web_app()
    process = machine.start().wait_ready()
    _release, url3 = make_release(tmp_path, local_store, V3, version="v3")
    done = machine.rpc("upgrade", "--app", "shop", "--url", url3, "--deployed-at", DEPLOYED_AT)
    assert done.returncode == 0 and parse_result(done.stdout)["success"], done.stdout + done.stderr
    _release, url2 = make_release(tmp_path, local_store, V2, version="v2")
    _code, prepared, _out = phase(machine, "prepare", "--url", url2, "--upgrade-id", "up-old")
    assert prepared["status"] == "ready"
    _code, applied, out = phase(machine, "apply", "--url", url2, "--upgrade-id", "up-old",
                               "--deployed-at", "2026-12-07T21:00:00.000Z")
    assert applied["success"] is False and applied["applied"] is False, out
    assert "deployed later (2099-01-01T00:00:00.000Z)" in applied["error"]
    assert process.get()["greeting"] == "hello v3"
    assert leftovers(machine) == []  # the staging went with the refusal


@pytest.mark.parametrize("value", ["soon", "2026-12-07T21:42:41", ""])
@pytest.mark.parametrize("detach", [True, False])
def test_a_deployed_at_that_is_no_time_is_bad_usage(machine, value, detach):
    for command in ("apply", "upgrade"):
        done = machine.rpc(command, "--app", "shop", "--url", "file:///nowhere/shop-v2.tar.gz", "--upgrade-id",
                           "up-1", "--deployed-at", value, *(["--detach", "--wait", "10"] if detach else []))
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"--deployed-at {value!r} is not an ISO 8601 time with its zone" in done.stderr
        assert "Traceback" not in done.stderr and done.stdout == ""
    revert = machine.rpc("apply", "--app", "shop", "--revert", "up-0", "--upgrade-id", "up-1",
                         "--deployed-at", DEPLOYED_AT)
    assert revert.returncode == 2 and "--deployed-at goes with the release's --url" in revert.stderr
