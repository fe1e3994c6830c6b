"""End to end through a local Fly that behaves as Fly's own sources define it (3 machines,
SeaweedFS): the orchestrator as an API-created machine's main process, short execs that
start detached upgrades, results collected from S3, phase 1 as the check (with the token
fallback, and the preflight's fixes), interrupts, doctor."""

import io
import json
import shlex
import signal
import subprocess
import sys
import threading

import flydeploy
from tests.test_fleet_e2e import BOTH_PATHS, REPO, V2, V3, Project, get, serving
from tests.waiting import wait_until

pytest_plugins = ["tests.fakefly.fixtures"]

# V2's counter, whose code_change takes ``seconds`` and notes each run in code_change.log
# (relative: the app process runs in the image's WORKDIR, its machine's root).
SLOW_COUNTER = V2["counter.py"].replace(
    "    def code_change(self, old_vsn, state, extra):\n",
    "    def code_change(self, old_vsn, state, extra):\n"
    "        import time\n"
    "        with open('code_change.log', 'a') as log:\n"
    "            log.write('ran\\n')\n"
    "        time.sleep(SECONDS)\n")


def slow_v2(seconds: float) -> dict:
    assert "time.sleep" not in V2["counter.py"]
    return {**V2, "counter.py": SLOW_COUNTER.replace("SECONDS", str(seconds))}


def orchestrators(project) -> list:
    """The orchestrator machines of the project's app that are not destroyed."""
    return [m for m in project.app.machines
            if (m.config.get("metadata") or {}).get(flydeploy.ORCHESTRATOR_ROLE_KEY) and m.state != "destroyed"]


def lock_key(project) -> str:
    return f"releases/{project.name}-deploy.lock"


class Running:
    """``python -m flydeploy_cli ARGS`` in the project, its output collected as it comes."""

    def __init__(self, project, *args, local_s3: bool = False):
        env = project.fly.env()
        env["PYTHONPATH"] = str(REPO)
        for name in project.seaweed.env():
            env.pop(name, None)
        if local_s3:  # --direct reaches the bucket from here
            env.update(project.seaweed.env())
        self.process = subprocess.Popen([sys.executable, "-m", "flydeploy_cli", *args], cwd=project.tree, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.output or self.process.poll() is not None, f"{text!r} in the output",
                   timeout=timeout)
        assert text in self.output, self.output

    def finish(self, timeout: float = 90) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.reader.join(10)
        return code


def test_hot_doctor_status_and_rollback_through_the_real_fly(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=3)
    doctor = project.cli("doctor")
    assert doctor.returncode == 0, doctor.output
    for machine in project.machines:
        assert f"✓ machine {machine.id}: group app: {machine.id} ({machine.region}): " in doctor.output
    assert "✓ group app: 3 started" in doctor.output and "✓ exec token" in doctor.output
    bucket = seaweed.env()["BUCKET_NAME"]
    assert f"✓ bucket: {bucket} at http://127.0.0.1" in doctor.output and "path-style addressing" in doctor.output
    assert f"✓ current.json: for image {project.image}, no hot upgrade" in doctor.output

    project.edit(V2)
    before = len(fakefly.requests)
    hot = project.cli("hot", "--version", "v2")
    assert hot.returncode == 0, hot.output
    assert "3/3 machines upgraded to v2" in hot.output and "was refused" not in hot.output
    assert not orchestrators(project)  # destroyed when its main process exited
    requests = fakefly.requests[before:]
    created = [r for r in requests if r.op == "create"]
    assert len(created) == 1
    config = created[0].body["config"]
    argv = config["init"]["entrypoint"] + config["init"]["cmd"]
    assert argv[:7] == ["python3", "-c", flydeploy.MachineCommands.BOOTSTRAP, "/app", "orchestrate", "--root", "/app"]
    # fly.toml [env] reaches the orchestrator in its config; the exec token too, never on a command line.
    assert config["env"]["APP_PORT_FILE"] == "port" and config["env"]["FLYDEPLOY_API_TOKEN"].startswith("FlyV1 ")
    token = config["env"]["FLYDEPLOY_API_TOKEN"].split()[-1]
    assert not any(token in " ".join(call) for call in fakefly.fly_calls())
    execs = [r.body["command"] for r in requests if r.op == "exec"]
    assert all(c[:5] == ["python3", "-c", flydeploy.MachineCommands.BOOTSTRAP, "/app", "rpc"] for c in execs), execs
    assert {c[5] for c in execs} == {"prepare", "apply"}  # no preflight: phase 1 is the check
    assert all("--detach" in c for c in execs if c[5] == "upgrade")
    # The applies are told when current.json recorded the release: the machines need not read it.
    recorded = flydeploy.read_current(seaweed.client(), project.name)[0]["hot_upgrade"]["deployed_at"]
    applies = [c for c in execs if c[5] == "apply"]
    assert len(applies) == 3 and all(c[c.index("--deployed-at") + 1] == recorded for c in applies), applies
    assert not any("--deployed-at" in c for c in execs if c[5] != "apply")

    status = project.cli("status", "--json", local_s3=True)
    assert status.returncode == 0, status.output
    assert {row["verdict"] for row in json.loads(status.stdout)} == {"✓ up to date"}
    doctor = project.cli("doctor", "--json")
    assert doctor.returncode == 0, doctor.output
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["current.json"]["ok"] and "v2" in checks["current.json"]["detail"]

    project.edit(V3)
    assert project.cli("hot", "--version", "v3").returncode == 0
    assert get(project.machines[0])[1].startswith("count-v3")
    rollback = project.cli("rollback")
    assert rollback.returncode == 0, rollback.output
    assert "3/3 machines upgraded to v2" in rollback.output and not orchestrators(project)
    assert get(project.machines[0])[1].startswith("count-v2")


def test_fly_toml_env_reaches_the_orchestrator(fakefly, seaweed, tmp_path):
    # The bucket's endpoint and region only in fly.toml [env]: `fly machine run` would not pass
    # them (flyctl run.go:772-781); the orchestrator gets them in its machine config.
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    settings = {k: v for k, v in seaweed.env().items() if k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "BUCKET_NAME")}
    project.app.unset_secrets(*settings)
    for machine in project.machines:  # `fly deploy` gave the app machines fly.toml's [env]
        machine.config["env"].update(settings)
    fly_toml = project.tree / "fly.toml"
    fly_toml.write_text(fly_toml.read_text().replace("[env]", "[env]\n" + "".join(
        f'  {k} = "{v}"\n' for k, v in settings.items()), 1))
    project.edit(V2)
    hot = project.cli("hot")
    assert hot.returncode == 0, hot.output
    assert "1/1 machine upgraded" in hot.output


def test_the_exit_code_comes_through_when_a_destroyed_machine_is_gone_at_once(fakefly, seaweed, tmp_path):
    fakefly.destroyed_visible = False  # no exit event to read: the orchestrator's last line says it
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    flydeploy.acquire_lock(seaweed.client(), project.name, owner="bob@example.com", deployment_id="d",
                           timeout_s=600)
    held = project.cli("hot")
    assert held.returncode == 2 and "bob@example.com" in held.output, held.output


def test_an_upgrade_longer_than_the_exec_deadline_is_reported_once(fakefly, seaweed, tmp_path):
    fakefly.exec_deadline = 2.0  # the API cuts an exec off after this; the command goes on
    project = Project(fakefly, seaweed, tmp_path, machines=3)
    project.edit(slow_v2(3))
    hot = project.cli("hot", "--suspend-timeout", "20")
    assert hot.returncode == 0, hot.output
    assert "3/3 machines upgraded" in hot.output
    for machine in project.machines:
        assert f"✓ {machine.id} ({machine.region}) 2 modules, 1 process" in hot.output
        assert (machine.root / "code_change.log").read_text() == "ran\n"  # run once, never again
        assert get(machine)[0] == "hello v2"


@BOTH_PATHS
def test_ctrl_c_during_hot_leaves_no_machine_and_no_lock(fakefly, seaweed, tmp_path, direct):
    project = Project(fakefly, seaweed, tmp_path, machines=3)
    project.edit(slow_v2(8))
    hot = Running(project, "hot", *(["--direct"] if direct else []), "--suspend-timeout", "30", local_s3=direct)
    hot.wait_for("Phase 2: applying")
    hot.process.send_signal(signal.SIGINT)
    assert hot.finish() == 130, hot.output
    if direct:
        assert "interrupted: the orchestration stopped here and released the deploy lock" in hot.output
    else:
        assert "cleaned up: orchestrator machine" in hot.output and "it released the deploy lock" in hot.output
    assert not orchestrators(project)
    assert lock_key(project) not in project.release_keys()


def test_sigterm_during_rollback_cleans_up_too(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    project.edit(V2)
    assert project.cli("hot", "--version", "v2").returncode == 0
    project.edit(slow_v2(8))
    assert project.cli("hot", "--version", "v3", "--suspend-timeout", "30").returncode == 0
    rollback = Running(project, "rollback", "--suspend-timeout", "30")
    rollback.wait_for("Phase 2: applying")
    rollback.process.send_signal(signal.SIGTERM)
    assert rollback.finish() == 130, rollback.output
    assert "cleaned up: orchestrator machine" in rollback.output
    assert not orchestrators(project) and lock_key(project) not in project.release_keys()


def test_a_killed_hot_is_recovered_by_the_next(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    project.edit(slow_v2(20))
    hot = Running(project, "hot", "--suspend-timeout", "40", "--version", "v2")
    hot.wait_for("Phase 2: applying")
    hot.process.kill()
    hot.finish()
    (stale,) = orchestrators(project)  # the orchestrator goes on without its launcher
    lock, _etag = seaweed.client().get_json(lock_key(project))
    assert lock["deployment_id"] == stale.config["metadata"][flydeploy.ORCHESTRATOR_RUN_KEY]

    project.edit(V2)
    again = project.cli("hot", "--version", "v3", "--suspend-timeout", "40")
    assert again.returncode == 0, again.output
    assert (f"destroyed orchestrator machine {stale.id} left by an earlier run (run " in again.output
            and "its launcher pid" in again.output and "it released the deploy lock" in again.output)
    assert stale.state == "destroyed" and not orchestrators(project)
    assert lock_key(project) not in project.release_keys()
    assert "1/1 machine upgraded to v3" in again.output


def exec_commands(fakefly, since: int = 0) -> list[list[str]]:
    """The argv of every exec the local Fly was asked for, from request ``since`` on."""
    return [r.body["command"] for r in fakefly.requests[since:] if r.op == "exec"]


def stopped_with_nothing_changed(project, hot, before, pids) -> None:
    """Phase 1 failed: exit 1, said so, every machine runs what it ran in the same process,
    current.json as it was, the release stored but not named, the lock released."""
    assert hot.returncode == 1, hot.output
    assert "v2 was not applied anywhere" in hot.output, hot.output
    assert ("nothing live changed: every machine runs what it ran, current.json is unchanged; the release was "
            "uploaded and stays stored, current.json does not name it; the deploy lock is released") in hot.output
    assert all(get(m)[0] == "hello v1" for m in project.machines)
    assert {m.id: m.pid for m in project.machines} == pids
    assert flydeploy.read_current(project.seaweed.client(), project.name)[0] == before
    assert f"releases/{project.name}-v2.tar.gz" in project.release_keys()
    assert lock_key(project) not in project.release_keys()
    assert not [p for m in project.machines for p in m.root.rglob(f"*{flydeploy._STAGED_SUFFIX}")]


def fleet_state(project):
    return (flydeploy.read_current(project.seaweed.client(), project.name)[0],
            {m.id: m.pid for m in project.machines})


@BOTH_PATHS
def test_a_machine_that_cannot_run_flydeploy_fails_phase_one_with_the_fix(fakefly, seaweed, tmp_path, direct):
    project = Project(fakefly, seaweed, tmp_path, machines=3)
    before, pids = fleet_state(project)  # current.json recorded by the machines' boot
    # The running image keeps flydeploy elsewhere (its processes loaded it already); the new
    # image and the upgrade expect /app/flydeploy.py.
    for machine in project.machines:
        (machine.root / "flydeploy.py").rename(machine.root / "vendored_flydeploy.py")
    project.edit(V2)
    requests = len(fakefly.requests)
    hot = project.push("hot", "--version", "v2", direct=direct)
    stopped_with_nothing_changed(project, hot, before, pids)
    for machine in project.machines:
        assert f"✗ {machine.id} ({machine.region}) flydeploy is not importable the way the upgrade runs it" in hot.output
    assert "copy flydeploy.py to /app/flydeploy.py" in hot.output and "[tool.flydeploy] app_dir" in hot.output
    execs = exec_commands(fakefly, requests)
    # No exec before phase 1 (it was the check); then the discard of what they may have staged.
    assert [c[5] for c in execs] == ["prepare"] * 3 + ["discard"] * 3

    doctor = project.push("doctor", "--json", direct=direct)
    assert doctor.returncode == 1, doctor.output
    failed = [c for c in json.loads(doctor.stdout) if not c["ok"]]
    assert failed and all("not importable" in c["detail"] for c in failed)

    # Nothing was left in the way (the lock, a staging): with flydeploy where the upgrade runs it, it goes through.
    for machine in project.machines:
        (machine.root / "vendored_flydeploy.py").rename(machine.root / "flydeploy.py")
    again = project.push("hot", "--version", "v2", direct=direct)
    assert again.returncode == 0 and "3/3 machines upgraded to v2" in again.output, again.output
    assert all(get(m) == ("hello v2", "count-v2:0") for m in project.machines)


def test_a_machine_with_no_agent_fails_phase_one_with_the_startup_fix(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=2)
    first, second = project.machines
    second.config["env"]["APP_STARTUP"] = json.dumps({"agent": False})  # it never starts its agent
    second.stop()
    second.start()
    serving(second)
    before, pids = fleet_state(project)
    project.edit(V2)
    hot = project.push("hot", "--version", "v2", direct=True)
    stopped_with_nothing_changed(project, hot, before, pids)
    assert (f"✗ {second.id} ({second.region}) failed: no flydeploy agent of {project.app.name} runs on this "
            "machine, so no running process could prepare v2; the app must call "
            "flydeploy.startup_reapply_current() at boot") in hot.output
    assert f"✓ {first.id} ({first.region}) ready" in hot.output  # and then discarded: it runs v1


def test_a_machine_that_cannot_reach_the_bucket_fails_phase_one_naming_the_secrets(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=2)
    before, pids = fleet_state(project)
    project.app.unset_secrets("AWS_SECRET_ACCESS_KEY")  # what the machines' execs run with from now on
    project.edit(V2)
    hot = project.push("hot", "--version", "v2", direct=True)
    stopped_with_nothing_changed(project, hot, before, pids)
    for machine in project.machines:
        assert (f"✗ group app: {machine.id} ({machine.region}): the bucket is not reachable from the machine with "
                "its own credentials (missing environment variable(s) AWS_SECRET_ACCESS_KEY") in hot.output
    assert hot.output.count("give the app its bucket secrets (`fly storage create` sets BUCKET_NAME, "
                            "AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)") == 2


def test_a_token_refused_in_phase_one_falls_back_to_the_app_secret(fakefly, seaweed, tmp_path, monkeypatch):
    # Whether the API checks a token's command restriction against `command` or the deprecated
    # `cmd` is not documented; with `cmd` checked, a token of another prefix is refused.
    fakefly.token_checks = "cmd"
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    project.edit(V2)
    hot = project.cli("hot")
    assert hot.returncode == 0, hot.output
    assert "was refused" not in hot.output  # the minted token allows exactly what is run, in either field

    # The orchestrator's own way, here: the minted token first, then the app's FLY_API_TOKEN secret.
    project = Project(fakefly, seaweed, tmp_path / "second", machines=2)
    before, pids = fleet_state(project)
    store, commands = seaweed.client(), flydeploy.MachineCommands.for_app_dir("python3", "/app")
    monkeypatch.setenv("FLYDEPLOY_API_TOKEN", project.app.exec_token(prefixes=[["python3", "-c", "print(1)"]]))

    def orchestrate():
        out = io.StringIO()
        report = flydeploy.orchestrate(project.name, project.image, store=store, root=project.tree,
                                       version="v2", commands=commands, out=out)
        return report, out.getvalue()

    # The minted token alone: phase 1 says the token fix, and nothing changes.
    project.edit(V2)
    report, out = orchestrate()
    assert report.exit_code == 1 and report.refused, out
    assert out.count('the token does not allow `') == 2 and out.count('fly secrets set FLY_API_TOKEN=') == 2
    assert "nothing live changed" in out and "was refused by the Machines API" not in out
    assert all(get(m)[0] == "hello v1" for m in project.machines) and fleet_state(project) == (before, pids)
    assert lock_key(project) not in project.release_keys()

    # The app's secret there too: phase 1 says so, runs again with it, and the upgrade goes through.
    monkeypatch.setenv("FLY_API_TOKEN", project.app.token)
    requests = len(fakefly.requests)
    report, out = orchestrate()
    assert report.exit_code == 0, out
    assert (f"the minted exec token was refused by the Machines API (HTTP 403 on the exec of "
            f"`{shlex.join(commands.token_prefix())} prepare`); using the app's FLY_API_TOKEN secret instead") in out
    assert out.count("was refused by the Machines API") == 1 and "the token does not allow" not in out
    assert "2/2 machines upgraded to v2" in out
    assert all(get(m) == ("hello v2", "count-v2:0") for m in project.machines)
    assert {c[5] for c in exec_commands(fakefly, requests)} == {"prepare", "apply"}  # no preflight


def test_an_orchestrator_that_cannot_run_in_the_new_image_says_why(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    keys_before = project.release_keys()
    (project.tree / "pyproject.toml").write_text('[tool.flydeploy]\ntimeout = 60\napp_dir = "/srv/shop"\n')
    project.edit(V2)
    hot = project.cli("hot")
    assert hot.returncode == 1, hot.output
    assert "No module named 'flydeploy'" in hot.output
    assert "the orchestrator did not start" in hot.output and "[tool.flydeploy] app_dir" in hot.output
    assert project.release_keys() == keys_before and not orchestrators(project)
