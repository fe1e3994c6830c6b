"""Boot-time catch-up (startup_reapply_current, every outcome) and the poller, against SeaweedFS."""

from __future__ import annotations

import json
import secrets
import sys

import pytest

import flydeploy
from machine_apps import COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, Machine, wait_for
from test_machine_upgrade import make_release


BOOT_PY = '''\
import json, os
import greet  # imported before the catch-up, as apps often do
import flydeploy
outcome = flydeploy.startup_reapply_current(agent=bool(os.environ.get("BOOT_AGENT")))
print(json.dumps({"outcome": outcome, "greeting": greet.greeting(),
                  "info": flydeploy.get_current_hot_upgrade_info()}))
'''

IMAGE = "registry.fly.io/{app}:deployment-{n}"


@pytest.fixture
def machine(tmp_path, seaweed):
    app = f"shop-{secrets.token_hex(4)}"
    machine = Machine(tmp_path, app=app, image_ref=IMAGE.format(app=app, n=2), env=seaweed.env())
    machine.write({"boot.py": BOOT_PY, "greet.py": GREET_V1})
    yield machine
    machine.close()


def boot(machine: Machine, env: dict[str, str] | None = None) -> dict:
    result = machine.run([sys.executable, "boot.py"], cwd=machine.app_root, env=env)
    assert result.returncode == 0, result.stderr  # whatever happened, the app boots
    return json.loads(result.stdout.splitlines()[-1])


def record(machine: Machine, tmp_path, s3, *, image_ref: str, version: str = "v2"):
    """Record a hot upgrade (greet v2) for ``image_ref`` as the orchestrator would."""
    release, url = make_release(tmp_path, s3, {"boot.py": BOOT_PY, "greet.py": GREET_V2}, version=version,
                                app=machine.app)
    flydeploy.reset_current(s3, machine.app, image_ref)
    flydeploy.record_hot_upgrade(s3, machine.app, release.hot_upgrade_record(url))
    return release


def test_without_an_image_ref_it_skips(machine, s3):
    out = boot(machine, env={"FLY_IMAGE_REF": ""})
    assert out["outcome"]["status"] == "skipped" and "FLY_IMAGE_REF" in out["outcome"]["error"]
    assert out["greeting"] == "hello v1"
    assert flydeploy.read_current(s3, machine.app) == (None, None)


def test_without_metadata_it_writes_it_for_this_image(machine, s3):
    out = boot(machine)
    assert out["outcome"] == {**out["outcome"], "status": "reset", "error": None, "version": None}
    doc, _etag = flydeploy.read_current(s3, machine.app)
    assert doc["image_ref"] == machine.env["FLY_IMAGE_REF"] and doc["hot_upgrade"] is None
    assert boot(machine)["outcome"]["status"] == "up_to_date"


def test_after_a_cold_deploy_it_resets_and_never_applies_the_stale_upgrade(machine, tmp_path, s3):
    record(machine, tmp_path, s3, image_ref=IMAGE.format(app=machine.app, n=1))
    out = boot(machine)
    assert out["outcome"]["status"] == "reset"
    assert out["greeting"] == "hello v1" and out["info"] == {"hot_upgrade_applied": False}
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
    doc, _etag = flydeploy.read_current(s3, machine.app)
    assert doc["image_ref"] == machine.env["FLY_IMAGE_REF"] and doc["hot_upgrade"] is None


def test_a_recorded_hot_upgrade_is_applied_then_up_to_date(machine, tmp_path, s3):
    release = record(machine, tmp_path, s3, image_ref=machine.env["FLY_IMAGE_REF"])
    out = boot(machine)
    assert out["outcome"]["status"] == "applied" and out["outcome"]["version"] == "v2"
    assert out["greeting"] == "hello v2"  # the already-imported module was reloaded
    doc, _etag = flydeploy.read_current(s3, machine.app)
    assert out["info"] == {"hot_upgrade_applied": True, "version": "v2", "source_image_ref": None,
                           "deployed_at": doc["hot_upgrade"]["deployed_at"],
                           "current_image_ref": machine.env["FLY_IMAGE_REF"]}
    assert (machine.app_root / "greet.py").read_text() == GREET_V2
    assert doc["hot_upgrade"]["sha256"] == release.sha256
    again = boot(machine)  # another process on the same machine
    assert again["outcome"]["status"] == "up_to_date" and again["greeting"] == "hello v2"
    assert again["info"]["version"] == "v2"


WEB_PY = '''\
import flydeploy
flydeploy.startup_reapply_current(agent=False)

def page():
    return "page v1"
'''

RUN_WEB_PY = '''\
import json, time
import flydeploy
import web  # calls startup_reapply_current while it is being imported, as a gunicorn app module does
deadline = time.monotonic() + 30
while not flydeploy.get_current_hot_upgrade_info()["hot_upgrade_applied"] and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"page": web.page(), "info": flydeploy.get_current_hot_upgrade_info()}))
'''


def test_the_module_calling_it_at_import_gets_its_new_code(machine, tmp_path, s3):
    machine.write({"web.py": WEB_PY, "run_web.py": RUN_WEB_PY})
    release, url = make_release(tmp_path, s3, {"web.py": WEB_PY.replace("page v1", "page v2")}, version="v2",
                                app=machine.app)
    flydeploy.reset_current(s3, machine.app, machine.env["FLY_IMAGE_REF"])
    flydeploy.record_hot_upgrade(s3, machine.app, release.hot_upgrade_record(url))
    result = machine.run([sys.executable, "run_web.py"], cwd=machine.app_root)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    # The rest of the old body, which ran after the call, did not put the old page back.
    assert out == {"page": "page v2", "info": {**out["info"], "hot_upgrade_applied": True, "version": "v2"}}


def test_a_state_file_from_before_a_reboot_is_not_trusted(machine, tmp_path, s3):
    record(machine, tmp_path, s3, image_ref=machine.env["FLY_IMAGE_REF"])
    # A runtime directory that survived a reboot, when the image put the old files back.
    state_dir = machine.socket_dir()
    state_dir.mkdir(mode=0o700, parents=True)
    (state_dir / "state.json").write_text(json.dumps({"version": "v2", "image_ref": machine.env["FLY_IMAGE_REF"],
                                                      "boot_id": "an-earlier-boot"}))
    out = boot(machine)
    assert out["outcome"]["status"] == "applied" and out["greeting"] == "hello v2"


def test_without_an_agent_the_boot_catch_up_still_runs(machine, tmp_path, s3):
    record(machine, tmp_path, s3, image_ref=machine.env["FLY_IMAGE_REF"])
    # Too long for a unix socket path (108 bytes), fine for the state file and the lock.
    long_runtime = machine.runtime / ("r" * 100)
    out = boot(machine, env={"BOOT_AGENT": "1", "FLYDEPLOY_RUNTIME_DIR": str(long_runtime)})
    assert out["outcome"]["agent"] is None and "cannot listen on" in out["outcome"]["agent_error"]
    assert out["outcome"]["status"] == "applied" and out["greeting"] == "hello v2"


@pytest.mark.parametrize("fault", ["unreachable", "not an object", "malformed hot upgrade"])
def test_storage_problems_leave_the_app_on_the_image_code(machine, s3, fault):
    env = None
    key = f"releases/{machine.app}-current.json"
    if fault == "unreachable":
        env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    elif fault == "not an object":
        s3.put(key, b'["image_ref"]')
    else:
        s3.put(key, json.dumps({"image_ref": machine.env["FLY_IMAGE_REF"], "hot_upgrade": "v2"}).encode())
    out = boot(machine, env=env)
    assert out["outcome"]["status"] == "error" and out["outcome"]["error"]
    assert out["greeting"] == "hello v1"
    assert (machine.app_root / "greet.py").read_text() == GREET_V1


def test_poller_applies_a_missed_upgrade_once_per_machine(machine, tmp_path, s3):
    machine.write({"main.py": MAIN_PY, "counter.py": COUNTER_PY})
    machine.env["FLYDEPLOY_POLL_INTERVAL"] = "0.5"
    first, second = machine.start().wait_ready(), machine.start().wait_ready()
    assert {first.get()["outcome"]["status"], second.get()["outcome"]["status"]} <= {"reset", "up_to_date"}
    first.get("/bump")

    # Recorded while no push reached this machine: only the pollers can find it.
    files = {"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2}
    release, url = make_release(tmp_path, s3, files, version="v2", app=machine.app)
    flydeploy.record_hot_upgrade(s3, machine.app, release.hot_upgrade_record(url))

    for process in (first, second):
        wait_for(lambda: process.get()["greeting"] == "hello v2", what=f"process {process.pid} to poll and apply")
    assert first.get()["count"] == "count-v1:1"  # state kept
    assert second.get()["info"]["version"] == "v2"
    writes = [line for p in (first, second) for line in p.log().splitlines() if ": wrote " in line]
    assert len(writes) == 1, writes  # one process did the file work, the other was told
