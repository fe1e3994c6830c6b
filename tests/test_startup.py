"""Boot-time catch-up (startup_reapply_current, every outcome) and the poller, against SeaweedFS."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import urllib.parse

import pytest

import flydeploy
from tests.machine_apps import COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, Machine, make_release, wait_for


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


COUNTING_BOOT = '''\
import json
import flydeploy
applied = []
apply_here = flydeploy._apply_here
flydeploy._apply_here = lambda release: applied.append(release["version"]) or apply_here(release)
outcome = flydeploy.startup_reapply_current(agent=True)
print(json.dumps({"outcome": outcome, "applied": applied}))
'''


def test_a_process_whose_agent_caught_up_at_start_does_not_catch_up_again(machine, tmp_path, s3):
    record(machine, tmp_path, s3, image_ref=machine.env["FLY_IMAGE_REF"])
    assert boot(machine)["outcome"]["status"] == "applied"
    done = machine.python(COUNTING_BOOT)  # the next process on the machine starts its agent first
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["outcome"]["status"] == "up_to_date" and out["outcome"]["version"] == "v2"
    assert out["applied"] == ["v2"], "the release was applied to the process twice"


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


RECORDING_BOOT = '''\
import json, sys, time
import flydeploy
calls = []

class Recording:
    """The store, recording each call: (method, key, if_none_match, answered "not modified")."""
    def __init__(self, store):
        self.store = store
    def __getattr__(self, name):
        method = getattr(self.store, name)
        def call(*args, **kwargs):
            result = method(*args, **kwargs)
            calls.append([name, args[0] if args else None, kwargs.get("if_none_match"), result is None])
            return result
        return call

outcome = flydeploy.startup_reapply_current(agent=False, store=Recording(flydeploy.S3.from_env()),
                                            poll_interval=0.05)
boot = list(calls)
deadline = time.monotonic() + 30
while len(calls) < len(boot) + 3 and time.monotonic() < deadline:
    time.sleep(0.01)
flydeploy.stop_poller()
print(json.dumps({"outcome": outcome, "boot": boot, "polls": calls[len(boot):len(boot) + 3]}))
'''


def test_nothing_pending_costs_one_get_and_polls_are_conditional(machine, s3):
    flydeploy.reset_current(s3, machine.app, machine.env["FLY_IMAGE_REF"])
    _doc, etag = s3.get_json(f"releases/{machine.app}-current.json")
    done = machine.python(RECORDING_BOOT)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["outcome"]["status"] == "up_to_date"
    key = f"releases/{machine.app}-current.json"
    assert out["boot"] == [["get_json", key, None, False]]
    # Each poll is one conditional GET that the unchanged document answers with "not modified".
    assert out["polls"] == [["get_json", key, etag, True]] * 3


def test_conditional_reads_of_both_stores(s3, tmp_path):
    for store in (s3, flydeploy.LocalStore(tmp_path / "store")):
        store.put("releases/x-current.json", b'{"a": 1}')
        doc, etag = store.get_json("releases/x-current.json")
        assert store.get_json("releases/x-current.json", if_none_match=etag) is None
        store.put("releases/x-current.json", b'{"a": 2}')
        assert store.get_json("releases/x-current.json", if_none_match=etag)[0] == {"a": 2}


def test_poller_retries_a_failed_download_and_applies_within_two_intervals(machine, tmp_path, s3):
    machine.write({"main.py": MAIN_PY, "counter.py": COUNTER_PY})
    machine.env["FLYDEPLOY_POLL_INTERVAL"] = "0.2"
    process = machine.start().wait_ready()

    def poller():
        return json.loads(machine.rpc("info", "--app", machine.app).stdout)[0]["poller"]

    # Recorded before its tarball is readable: the first downloads fail, later polls retry.
    files = {"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2}
    release, url = make_release(tmp_path, s3, files, version="v2", app=machine.app)
    s3.delete(flydeploy.release_key(machine.app, "v2"))
    flydeploy.record_hot_upgrade(s3, machine.app, release.hot_upgrade_record(url))
    failed_from = poller()["polls"]
    wait_for(lambda: poller()["polls"] >= failed_from + 3, what="polls that fail to download")
    assert process.get()["greeting"] == "hello v1"
    s3.upload(flydeploy.release_key(machine.app, "v2"), release.path)
    wait_for(lambda: process.get()["greeting"] == "hello v2", what="the poller to retry")

    files["greet.py"] = GREET_V2.replace("v2", "v3")
    release, url = make_release(tmp_path, s3, files, version="v3", app=machine.app)
    flydeploy.record_hot_upgrade(s3, machine.app, release.hot_upgrade_record(url))
    # Counted once the record is in: on a loaded host the query itself can span several polls.
    before = poller()["polls"]
    wait_for(lambda: process.get()["greeting"] == "hello v3", what="the poller to apply v3")
    assert poller()["caught_up_at_poll"] <= before + 2


def test_a_bad_poll_interval_is_reported_and_the_catch_up_still_runs(machine, tmp_path, s3):
    record(machine, tmp_path, s3, image_ref=machine.env["FLY_IMAGE_REF"])
    out = boot(machine, env={"FLYDEPLOY_POLL_INTERVAL": "30s"})
    assert out["outcome"]["status"] == "applied" and out["greeting"] == "hello v2"
    assert "FLYDEPLOY_POLL_INTERVAL='30s' is not a number of seconds" in out["outcome"]["error"]


def test_an_agent_that_cannot_start_does_not_stop_the_reset(machine, s3):
    out = boot(machine, env={"BOOT_AGENT": "1", "FLYDEPLOY_RUNTIME_DIR": str(machine.base / "no" / "such" / "dir")})
    assert out["outcome"]["status"] == "reset" and "cannot use the runtime directory" in out["outcome"]["agent_error"]
    doc, _ = flydeploy.read_current(s3, machine.app)
    assert doc["image_ref"] == machine.env["FLY_IMAGE_REF"]


def test_a_republished_version_is_caught_up(machine, tmp_path, s3):
    record(machine, tmp_path, s3, image_ref=machine.env["FLY_IMAGE_REF"])
    assert boot(machine)["outcome"]["status"] == "applied"
    # The same version pushed again with other content (a fixed build): its sha256 differs.
    fixed = GREET_V2.replace("hello v2", "hello v2 fixed")
    release, url = make_release(tmp_path / "again", s3, {"boot.py": BOOT_PY, "greet.py": fixed}, version="v2",
                                app=machine.app)
    flydeploy.record_hot_upgrade(s3, machine.app, release.hot_upgrade_record(url))
    out = boot(machine)
    assert out["outcome"]["status"] == "applied" and out["greeting"] == "hello v2 fixed"


LATE_TRACKING = '''\
import json, os, sys, time
import before  # imported ahead of flydeploy
import flydeploy
import after  # imported once flydeploy is, before any root is declared
print("imported", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
flydeploy.track(os.getcwd())
modified = flydeploy.modified_modules()
report = flydeploy.reload_modules()
print(json.dumps({"modified": modified, "ok": report.ok, "values": [before.value(), after.value()],
                  "after_reload": flydeploy.modified_modules()}))
'''


def test_modules_changed_on_disk_before_tracking_starts_are_still_reloaded(machine, tmp_path):
    """Another process of the machine installed a release between this one's imports and its tracking."""
    module = "def value():\n    return {!r}\n"
    machine.write({"late.py": LATE_TRACKING, "before.py": module.format("v1"), "after.py": module.format("v1")})
    go = tmp_path / "go"
    process = subprocess.Popen([sys.executable, "late.py", str(go)], cwd=machine.app_root, env=machine.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "imported\n"
    machine.write({"before.py": module.format("v2"), "after.py": module.format("v2")})
    go.touch()
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert json.loads(out) == {"modified": ["after", "before"], "ok": True, "values": ["v2", "v2"],
                               "after_reload": []}


class StallingProxy:
    """A TCP proxy to the test S3 that, while ``stalled`` is set, accepts connections and never
    answers them: storage that has stalled."""

    def __init__(self, target: str) -> None:
        import socket
        import threading

        self.target = urllib.parse.urlsplit(target)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.stalled = threading.Event()
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                conn = self.server.accept()[0]
            except OSError:
                return
            if self.stalled.is_set():
                self.held.append(conn)
                continue
            upstream = socket.create_connection((self.target.hostname, self.target.port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        import socket

        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def proxy(seaweed):
    proxy = StallingProxy(seaweed.endpoint)
    yield proxy
    proxy.close()


@pytest.fixture
def stalled_s3(proxy):
    proxy.stalled.set()
    return proxy.endpoint, proxy.held


@pytest.mark.parametrize("how", ["variable", "argument"])
def test_boot_on_a_stalled_storage_ends_at_the_startup_deadline(machine, stalled_s3, how):
    endpoint, accepted = stalled_s3
    env = {"AWS_ENDPOINT_URL_S3": endpoint, "FLYDEPLOY_STARTUP_DEADLINE": "1" if how == "variable" else "60"}
    if how == "argument":
        machine.write({"boot.py": BOOT_PY.replace("startup_reapply_current(", "startup_reapply_current(deadline=1, ")})
    out = boot(machine, env=env)
    assert accepted  # the storage was reached, and never answered
    outcome = out["outcome"]
    assert outcome["status"] == "error" and "within the startup deadline of 1 s" in outcome["error"]
    assert "FLYDEPLOY_STARTUP_DEADLINE" in outcome["error"] and "booting on the image's code" in outcome["error"]
    assert out["greeting"] == "hello v1"
    assert outcome["duration_ms"] < 30_000  # not the minutes of every retry


def test_the_default_startup_deadline_is_a_few_seconds(machine, stalled_s3):
    out = boot(machine, env={"AWS_ENDPOINT_URL_S3": stalled_s3[0], "FLYDEPLOY_STARTUP_DEADLINE": ""})
    assert f"within the startup deadline of {flydeploy._DEFAULT_STARTUP_DEADLINE:g} s" in out["outcome"]["error"]
    bad = boot(machine, env={"AWS_ENDPOINT_URL_S3": stalled_s3[0], "FLYDEPLOY_STARTUP_DEADLINE": "soon"})
    assert "FLYDEPLOY_STARTUP_DEADLINE='soon' is not a number of seconds" in bad["outcome"]["error"]


def test_past_the_startup_deadline_the_poller_catches_up(machine, tmp_path, seaweed, proxy):
    via_proxy = seaweed.client(endpoint=proxy.endpoint)
    record(machine, tmp_path, via_proxy, image_ref=machine.env["FLY_IMAGE_REF"])
    machine.write({"main.py": MAIN_PY, "counter.py": COUNTER_PY})
    proxy.stalled.set()
    process = machine.start(env={"AWS_ENDPOINT_URL_S3": proxy.endpoint, "FLYDEPLOY_STARTUP_DEADLINE": "1",
                                 "FLYDEPLOY_POLL_INTERVAL": "0.2"}).wait_ready()
    reply = process.get()
    assert reply["greeting"] == "hello v1" and "the poller catches up later" in reply["outcome"]["error"]
    proxy.stalled.clear()  # the storage answers again
    wait_for(lambda: process.get()["greeting"] == "hello v2", what="the poller to catch up")
    assert process.get()["info"]["version"] == "v2"
