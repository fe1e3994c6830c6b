"""Two-phase fleet upgrades end to end through the local Fly: SeaweedFS as the
bucket, machines of two process groups running the web app of the machine-side
tests, `python -m flydeploy_cli hot` from the orchestrator machine or --direct.

A release that any machine refuses reaches none; a failed apply sends every
machine back; a canary whose health check fails leaves the others alone;
`hot --plan` says what would happen per group; a killed orchestrator and a
machine restarted mid-upgrade still end with the fleet on one release."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

import flydeploy
from tests.machine_apps import COUNTER_PY, GREET_V2, wait_for
from tests.test_fleet_e2e import BOTH_PATHS, REPO, Project, get, serving

pytest_plugins = ["tests.fakefly.fixtures"]

# The worker group alone imports extra.py (APP_EXTRA): an Enum there that gains a
# member needs a cold deploy, which only the worker's process can see.
EXTRA_V1 = "import enum\n\nclass Color(enum.Enum):\n    RED = 1\n"
EXTRA_COLD = EXTRA_V1 + "    GREEN = 2\n"
GROUPS = {"app": "python3 main.py", "worker": "env APP_EXTRA=1 python3 main.py"}
# Counter code that keeps the state's shape (so the way back needs no migration) and
# whose code_change raises on a machine whose counter stands at 2.
COUNTER_RAISES = COUNTER_PY.replace("count-v1", "count-v2").replace("vsn = 1", "vsn = 2") + """\
    def code_change(self, old_vsn, state, extra):
        if state["n"] == 2:
            raise RuntimeError("this machine's counter cannot be migrated")
        return state
"""
UNHEALTHY_V2 = GREET_V2 + "HEALTHY = False\n"


def fleet(fakefly, seaweed, tmp_path, app_machines=2, workers=1, **options):
    """A project whose app machines have their own HTTP port in their services, plus
    ``workers`` machines of the worker group (no services) in another region."""
    project = Project(fakefly, seaweed, tmp_path, machines=app_machines, files={"extra.py": EXTRA_V1},
                      processes=GROUPS, internal_port="own", **options)
    for _ in range(workers):
        project.machines.append(serving(project.app.add_machine(project.image, process_group="worker",
                                                                region="syd")))
    return project


def current(project):
    return flydeploy.read_current(project.seaweed.client(), project.name)[0]


def staged_files(project):
    return [path for machine in project.machines
            for path in machine.root.rglob(f"*{flydeploy._STAGED_SUFFIX}")]


def greetings(project):
    return {machine.id: get(machine)[0] for machine in project.machines}


def result_keys(project, phase):
    prefix = f"releases/{project.name}-results/"
    return [key for key in project.release_keys() if key.startswith(prefix) and f"/{phase}/" in key]


@BOTH_PATHS
def test_one_refusing_machine_stops_the_release_everywhere(fakefly, seaweed, tmp_path, direct):
    project = fleet(fakefly, seaweed, tmp_path)
    worker = project.machines[-1]
    before = current(project)
    pids = {m.id: m.pid for m in project.machines}
    project.edit({"greet.py": GREET_V2, "extra.py": EXTRA_COLD})
    hot = project.push("hot", "--version", "v2", direct=direct)
    assert hot.returncode == 1, hot.output
    assert f"✗ {worker.id} ({worker.region}) refused: " in hot.output and "cold deploy required" in hot.output
    assert "v2 was not applied anywhere" in hot.output
    assert set(greetings(project).values()) == {"hello v1"}
    assert {m.id: m.pid for m in project.machines} == pids
    assert staged_files(project) == []
    assert current(project) == before
    assert result_keys(project, "apply") == []
    assert f"releases/{project.name}-deploy.lock" not in project.release_keys()


def test_plan_shows_a_cold_deploy_in_one_group_only(fakefly, seaweed, tmp_path):
    project = fleet(fakefly, seaweed, tmp_path)
    first, second, worker = project.machines
    before = current(project)
    project.edit({"greet.py": GREET_V2, "extra.py": EXTRA_COLD})

    plan = project.push("hot", "--plan", "--version", "v2", direct=True)
    assert plan.returncode == 1, plan.output
    assert "uploaded now: the only change this plan made" in plan.output
    assert f"group app (2 machines: {', '.join(sorted([first.id, second.id]))}): ready" in plan.output
    assert "modules changed: greet" in plan.output
    assert f"group worker (1 machine: {worker.id}): REFUSED" in plan.output
    assert "refused: " in plan.output and "Enum extra.Color members changed" in plan.output

    as_json = project.push("hot", "--plan", "--json", "--version", "v2", direct=False)
    assert as_json.returncode == 1, as_json.output
    assert as_json.stdout.count("\n") == 1, as_json.output  # the JSON alone; the progress on stderr
    document = json.loads(as_json.stdout)
    assert not document["would_apply"] and not document["uploaded"] and document["version"] == "v2"
    groups = {group["group"]: group for group in document["groups"]}
    assert groups["app"]["plan"]["modules_changed"] == ["greet"] and groups["app"]["plan"]["refused"] == []
    assert "cold deploy required" in groups["worker"]["plan"]["refused"][0]

    assert set(greetings(project).values()) == {"hello v1"}
    assert staged_files(project) == [] and current(project) == before
    assert f"releases/{project.name}-deploy.lock" not in project.release_keys()


@BOTH_PATHS
def test_a_code_change_that_raises_on_one_machine_sends_the_fleet_back(fakefly, seaweed, tmp_path, direct):
    project = fleet(fakefly, seaweed, tmp_path)
    stubborn = project.machines[1]
    for _ in range(2):
        get(stubborn, "/bump")
    before = current(project)
    project.edit({"counter.py": COUNTER_RAISES, "greet.py": GREET_V2})
    hot = project.push("hot", "--version", "v2", direct=direct)
    assert hot.returncode == 1, hot.output
    assert f"✗ {stubborn.id}" in hot.output and "cannot be migrated" in hot.output
    assert "v2 was rolled back" in hot.output
    assert {get(m) for m in project.machines if m is not stubborn} == {("hello v1", "count-v1:0")}
    assert get(stubborn) == ("hello v1", "count-v1:2")
    assert (current(project) or {}).get("hot_upgrade") == (before or {}).get("hot_upgrade")
    assert staged_files(project) == []


def test_keep_leaves_the_machines_that_applied_on_the_release(fakefly, seaweed, tmp_path):
    project = fleet(fakefly, seaweed, tmp_path)
    stubborn = project.machines[1]
    for _ in range(2):
        get(stubborn, "/bump")
    project.edit({"counter.py": COUNTER_RAISES, "greet.py": GREET_V2})
    hot = project.push("hot", "--version", "v2", "--on-failure", "keep", direct=True)
    assert hot.returncode == 1, hot.output
    others = [m for m in project.machines if m is not stubborn]
    assert {get(m) for m in others} == {("hello v2", "count-v2:0")} and get(stubborn)[0] == "hello v1"
    assert f"runs v2: {', '.join(sorted(m.id for m in others))}" in hot.output
    assert current(project)["hot_upgrade"]["version"] == "v2"


@BOTH_PATHS
def test_a_canary_failing_its_health_check_leaves_the_others_unchanged(fakefly, seaweed, tmp_path, direct):
    project = fleet(fakefly, seaweed, tmp_path, app_machines=3, workers=0)
    before = current(project)
    project.edit({"greet.py": UNHEALTHY_V2})
    hot = project.push("hot", "--version", "v2", "--canary", "1", "--health-check", "/healthz", direct=direct)
    assert hot.returncode == 1, hot.output
    assert "a canary failed: the other 2 machines did not change" in hot.output
    canary_keys = [key for key in result_keys(project, "apply") if "-back/" not in key]
    assert len(canary_keys) == 1  # only the canary applied (and was reverted)
    # The revert's result object is stored just after its exec answered.
    assert wait_for(lambda: [key for key in result_keys(project, "apply") if "-back/" in key],
                    what="the revert's result object") == [canary_keys[0].replace("/apply/", "-back/apply/")]
    canary = canary_keys[0].rsplit("/", 1)[1].removesuffix(".json")
    port = [m for m in project.machines if m.id == canary][0].env["PORT"]
    assert f"{port}" in hot.output and "503" in hot.output
    assert set(greetings(project).values()) == {"hello v1"}
    assert (current(project) or {}).get("hot_upgrade") == (before or {}).get("hot_upgrade")


def test_a_healthy_canary_then_the_rest(fakefly, seaweed, tmp_path):
    project = fleet(fakefly, seaweed, tmp_path)
    project.edit({"greet.py": GREET_V2})
    hot = project.push("hot", "--version", "v2", "--canary", "2", "--canary-wait", "0.5",
                       "--health-check", "/healthz", direct=True)
    assert hot.returncode == 0, hot.output
    assert "canaries first" in hot.output and "watching them 0.5 s" in hot.output
    assert set(greetings(project).values()) == {"hello v2"}
    assert "3/3 machines upgraded to v2" in hot.output


def start_hot(project, *args, direct: bool = True):
    """``hot --direct`` (or by the orchestrator machine) in the background; its output lines
    are collected as they come."""
    env = project.fly.env()
    env["PYTHONPATH"] = str(REPO)
    for name, value in project.seaweed.env().items():
        env.pop(name, None)
        if direct:
            env[name] = value
    process = subprocess.Popen([sys.executable, "-m", "flydeploy_cli", "hot", *(["--direct"] if direct else []),
                                *args],
                               cwd=project.tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    return process, lines


def test_a_killed_orchestrator_between_the_phases_is_cleaned_up(fakefly, seaweed, tmp_path):
    project = fleet(fakefly, seaweed, tmp_path)
    project.edit({"greet.py": GREET_V2})
    process, lines = start_hot(project, "--version", "v2", "--canary", "1", "--canary-wait", "120",
                               "--lock-timeout", "3")
    try:
        wait_for(lambda: any("watching them" in line for line in lines), timeout=120,
                 what="the canary to apply")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert sorted(greetings(project).values()) == ["hello v1", "hello v1", "hello v2"], lines
    prepared = [m for m in project.machines if get(m)[0] == "hello v1"]
    restarted = prepared[0]
    restarted.stop()
    restarted.start()  # boots again: discards what it prepared, catches up from current.json
    assert get(serving(restarted))[0] == "hello v2"
    wait_for(lambda: f"releases/{project.name}-deploy.lock" not in project.release_keys()
             or flydeploy._parse_time(seaweed.client().get_json(f"releases/{project.name}-deploy.lock")[0]
                                      ["expires_at"]) < flydeploy._utc_now(),
             timeout=30, what="the killed run's lock to expire")
    again = project.push("hot", "--version", "v2", direct=True)
    assert again.returncode == 0, again.output
    assert "already stored" in again.output
    assert set(greetings(project).values()) == {"hello v2"} and staged_files(project) == []


def test_a_machine_restarted_during_phase_two_ends_on_the_release(fakefly, seaweed, tmp_path):
    project = fleet(fakefly, seaweed, tmp_path)
    project.edit({"greet.py": GREET_V2})
    process, lines = start_hot(project, "--version", "v2", "--canary", "1", "--canary-wait", "10")
    try:
        wait_for(lambda: any("watching them" in line for line in lines), timeout=120,
                 what="the canary to apply")
        racer = [m for m in project.machines if get(m)[0] == "hello v1"][0]
        racer.stop()
        racer.start()
        assert get(serving(racer))[0] == "hello v2"  # caught up at boot: current.json was recorded
        assert process.wait(timeout=180) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    assert set(greetings(project).values()) == {"hello v2"}
    assert staged_files(project) == []


def test_health_check_settings_from_pyproject_and_bad_flags(fakefly, seaweed, tmp_path):
    project = fleet(fakefly, seaweed, tmp_path, app_machines=1, workers=0)
    (machine,) = project.machines
    assert machine.config["services"][0]["internal_port"] == int(machine.env["PORT"])
    bad = project.cli("hot", "--health-port", "0")
    assert bad.returncode == 2 and "argument --health-port: '0'" in bad.output and "1 to 65535" in bad.output
    bad = project.cli("hot", "--json")
    assert bad.returncode == 2 and "--json goes with --plan" in bad.output
    bad = project.cli("hot", "--on-failure", "retry")
    assert bad.returncode == 2 and "invalid choice: 'retry'" in bad.output
    pyproject = project.tree / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'health_check = "/healthz"\n')
    project.edit({"greet.py": UNHEALTHY_V2})
    hot = project.push("hot", "--version", "v2", direct=True)
    assert hot.returncode == 1 and "503" in hot.output, hot.output
    assert get(machine)[0] == "hello v1"


@BOTH_PATHS
def test_a_machine_restarted_during_phase_two_is_restarted_again_by_the_rollback(fakefly, seaweed, tmp_path,
                                                                                  direct):
    """The orchestrator machine's minted token may only exec: the restart is done with the
    app's FLY_API_TOKEN secret, as phase 1 falls back to it."""
    project = fleet(fakefly, seaweed, tmp_path, app_machines=3, workers=0)
    before = current(project)
    project.edit({"counter.py": COUNTER_RAISES, "greet.py": GREET_V2})
    process, lines = start_hot(project, "--version", "v2", "--canary", "1", "--canary-wait", "10", direct=direct)
    try:
        wait_for(lambda: any("watching them" in line for line in lines), timeout=120,
                 what="the canary to apply")
        stubborn, racer = [m for m in project.machines if get(m)[0] == "hello v1"]
        for _ in range(2):
            get(stubborn, "/bump")  # its code_change raises when the rest apply
        racer.stop()
        racer.start()
        assert get(serving(racer)) == ("hello v2", "count-v2:0")  # caught up at boot: nothing kept to undo
        assert process.wait(timeout=180) == 1, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines)
    assert "cannot be migrated" in output and "v2 was rolled back" in output, output
    assert f"restarting {racer.id}" in output, output
    assert get(stubborn) == ("hello v1", "count-v1:2")
    assert {get(m) for m in project.machines if m is not stubborn} == {("hello v1", "count-v1:0")}
    assert f"runs {flydeploy._IMAGE_CODE}: {', '.join(sorted(m.id for m in project.machines))}" in output, output
    assert (current(project) or {}).get("hot_upgrade") == (before or {}).get("hot_upgrade")
    assert staged_files(project) == []
