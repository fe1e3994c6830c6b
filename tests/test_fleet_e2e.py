"""End to end through the local Fly: `python -m flydeploy_cli hot | status | rollback`
against the fake Machines API and the fake `fly`, SeaweedFS as the bucket, and
machines that run a real app process (the web app of the machine-side tests)
with a live `flydeploy.Server` whose state must survive every upgrade."""

import json
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import pytest

import flydeploy
from tests.fakefly import write_app_tree
from tests.machine_apps import COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, wait_for

pytest_plugins = ["tests.fakefly.fixtures"]
REPO = pathlib.Path(__file__).resolve().parent.parent

# The counter server of the machine-side app, changed in shape: its state
# {"n": ...} becomes {"count": ...} through code_change.
COUNTER_V2 = """
import flydeploy

def label(n):
    return f"{LABEL}:{n}"

LABEL = "count-v2"

class Counter(flydeploy.Server):
    vsn = 2
    def init(self):
        return {"count": 0}
    def handle_call(self, request, state):
        return label(state["count"]), state
    def handle_cast(self, message, state):
        return {"count": state["count"] + 1}
    def code_change(self, old_vsn, state, extra):
        return {"count": state["n"]} if "n" in state else state
"""
V1 = {"counter.py": COUNTER_PY, "greet.py": GREET_V1}
V2 = {"counter.py": COUNTER_V2, "greet.py": GREET_V2}
V3 = {"counter.py": COUNTER_V2.replace("count-v2", "count-v3")}
# Every upgrade runs the same orchestration from two places: an orchestrator
# machine of a newly built image, or (--direct) the developer's own machine.
BOTH_PATHS = pytest.mark.parametrize("direct", [False, True], ids=["orchestrator", "direct"])


def app_name() -> str:
    return f"shop-{secrets.token_hex(3)}"


def port_file(machine) -> pathlib.Path:
    """Where a fake machine's app process (or a local one, given its folder) says its port."""
    return (machine if isinstance(machine, pathlib.Path) else machine.root) / "port"


def get(machine, path="/") -> tuple[str, str]:
    """The app's greeting and counter label (GET /bump counts one first)."""
    port = port_file(machine).read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        reply = json.loads(response.read())
    return reply["greeting"], reply["count"]


def serving(machine):
    wait_for(port_file(machine).exists, what=f"the app of machine {machine.id} to serve")
    return machine


class Project:
    """An app's project tree, its fake Fly app with machines, and the command line run in it."""

    def __init__(self, fly, seaweed, tmp_path, machines: int, files: dict[str, str] | None = None,
                 processes: dict[str, str] | None = None, **machine_options):
        self.fly = fly
        self.seaweed = seaweed
        self.name = app_name()
        pyproject = '[project]\nname = "shop"\n\n[tool.flydeploy]\ntimeout = 60\n'
        self.tree = write_app_tree(tmp_path / "src", {"main.py": MAIN_PY, "pyproject.toml": pyproject, **V1, **(files or {})},
                                   app=self.name, processes=processes or {"app": "python3 main.py"},
                                   env={"APP_PORT_FILE": "port"})
        self.app = fly.create_app(self.name, self.tree, machines=machines, secrets=seaweed.env(), **machine_options)
        self.machines = [serving(m) for m in self.app.machines]
        self.image = self.machines[0].image_ref

    def edit(self, files: dict[str, str]) -> None:
        for name, text in files.items():
            (self.tree / name).write_text(text)

    def cli(self, *args: str, local_s3: bool = False) -> subprocess.CompletedProcess:
        env = self.fly.env()
        env["PYTHONPATH"] = str(REPO)
        for name in self.seaweed.env():
            env.pop(name, None)
        if local_s3:
            env.update(self.seaweed.env())
        result = subprocess.run([sys.executable, "-m", "flydeploy_cli", *args], cwd=self.tree, env=env,
                                capture_output=True, text=True, timeout=240)
        result.output = result.stdout + result.stderr
        return result

    def push(self, command: str, *args: str, direct: bool) -> subprocess.CompletedProcess:
        """``hot`` or ``rollback`` by the orchestrator machine, or ``--direct`` from here
        with the bucket's credentials in this environment."""
        return self.cli(command, *(["--direct"] if direct else []), *args, local_s3=direct)

    def created_machines(self) -> list:
        """Machines API creates the fake received: an orchestrator machine each."""
        return [r for r in self.fly.requests if r.op == "create"]

    def release_keys(self) -> list[str]:
        return list(self.seaweed.client().list(f"releases/{self.name}-"))


@BOTH_PATHS
def test_hot_status_stopped_machine_and_rollback(fakefly, seaweed, tmp_path, direct):
    project = Project(fakefly, seaweed, tmp_path, machines=3)
    created = len(project.created_machines())
    first, second, third = project.machines
    pids = {m.id: m.pid for m in project.machines}
    for machine in project.machines:
        for _ in range(3):
            get(machine, "/bump")
    third.stop()

    project.edit(V2)
    hot = project.push("hot", "--version", "v2", direct=direct)
    assert hot.returncode == 0, hot.output
    for machine in (first, second):
        assert get(machine) == ("hello v2", "count-v2:3")  # new code, state migrated by code_change
        assert machine.pid == pids[machine.id]  # the same process: nothing restarted
        assert f"✓ {machine.id} ({machine.region}) 2 modules, 1 process" in hot.output
    assert f"· {third.id} ({third.region}) stopped: applies at next start" in hot.output
    assert "2/2 machines upgraded to v2" in hot.output
    if direct:  # no image built, no orchestrator machine: the release came from this tree
        assert project.fly.images(project.name) == [project.image]
        assert len(project.created_machines()) == created
        assert not [c for c in project.fly.fly_calls() if c[:2] in (["deploy"], ["machine", "run"])]
        assert "no image is built" in hot.output and "dependency files unchanged" in hot.output
        record = flydeploy.read_current(seaweed.client(), project.name)[0]["hot_upgrade"]
        assert record["source_image_ref"] == project.image
        assert record["local_tree"] == {"git_commit": None, "git_dirty": None}
    else:
        assert project.fly.images(project.name) != [project.image]  # a new image was built
        assert len(project.created_machines()) == created + 1
    assert f"releases/{project.name}-v2.tar.gz" in project.release_keys()
    assert f"releases/{project.name}-deploy.lock" not in project.release_keys()
    def results():
        return [k for k in project.release_keys() if k.startswith(f"releases/{project.name}-results/")]

    # Each phase's result of each machine (stored just after its exec answered).
    expected = sorted(f"{m.id}.json" for m in (first, second))
    wait_for(lambda: len(results()) >= 2 * len(expected), what="the result objects")
    for phase in ("prepare", "apply"):
        assert sorted(k.rsplit("/", 1)[1] for k in results() if f"/{phase}/" in k) == expected
    assert len({k.rsplit("/", 3)[1] for k in results()}) == 1  # one folder: this deploy's upgrade id

    status = project.cli("status", "--json", local_s3=True)
    assert status.returncode == 0, status.output
    rows = {row["machine_id"]: row for row in json.loads(status.stdout)}
    assert {rows[m.id]["verdict"] for m in (first, second)} == {"✓ up to date"}
    assert rows[first.id]["hot_upgrade_version"] == "v2" and rows[first.id]["processes"] == 1
    assert rows[third.id]["verdict"] == "stopped"

    third.start()  # boots from the image again: the old code, until the catch-up
    assert get(serving(third)) == ("hello v2", "count-v2:0")  # caught up before serving

    project.edit(V3)
    hot = project.push("hot", "--version", "v3", direct=direct)
    assert hot.returncode == 0, hot.output
    assert "3/3 machines upgraded to v3" in hot.output and get(first) == ("hello v2", "count-v3:3")

    rollback = project.push("rollback", direct=direct)
    assert rollback.returncode == 0, rollback.output
    assert "Rolling" in rollback.output and "3/3 machines upgraded to v2" in rollback.output
    assert get(first) == ("hello v2", "count-v2:3") and get(third) == ("hello v2", "count-v2:0")
    doc, _ = flydeploy.read_current(seaweed.client(), project.name)
    assert doc["hot_upgrade"]["version"] == "v2" and doc["history"][0]["version"] == "v3"

    table = project.cli("status", local_s3=True)
    assert table.returncode == 0, table.output
    assert table.stdout.count("✓ up to date") == 3 and table.stdout.count(" v2 ") == 3


def test_dry_run_lock_force_and_missing_secrets(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    (machine,) = project.machines
    project.edit(V2)
    images_before = project.fly.images(project.name)
    keys_before = project.release_keys()
    calls_before = len(project.fly.fly_calls())

    dry = project.cli("hot", "--dry-run")
    assert dry.returncode == 0, dry.output
    assert "fly deploy --build-only --push" in dry.stdout and '"FLYDEPLOY_API_TOKEN": "<redacted>"' in dry.stdout
    assert project.fly.images(project.name) == images_before
    assert project.release_keys() == keys_before  # no release, no lock
    assert project.fly.fly_calls()[calls_before:] == [["auth", "whoami"]]
    assert get(machine) == ("hello v1", "count-v1:0")

    flydeploy.acquire_lock(seaweed.client(), project.name, owner="bob@example.com",
                           deployment_id="other", timeout_s=600)
    held = project.cli("hot")
    assert held.returncode == 2, held.output
    assert "bob@example.com" in held.output and get(machine) == ("hello v1", "count-v1:0")

    forced = project.cli("hot", "--force")
    assert forced.returncode == 0, forced.output
    assert get(machine) == ("hello v2", "count-v2:0")
    assert f"releases/{project.name}-deploy.lock" not in project.release_keys()

    project.app.unset_secrets("AWS_SECRET_ACCESS_KEY")
    missing = project.cli("hot")
    assert missing.returncode == 2, missing.output
    assert "AWS_SECRET_ACCESS_KEY" in missing.output

    status = project.cli("status", "--json")  # no S3 variables on this side either
    assert status.returncode == 0, status.output
    assert "current.json could not be read" in status.stderr and "AWS_ACCESS_KEY_ID" in status.stderr
    (row,) = json.loads(status.stdout)
    assert f"1/1 machine upgraded to {row['hot_upgrade_version']} " in forced.output
    assert row["verdict"] == "? current.json not read"


@BOTH_PATHS
def test_failing_machines_are_named_and_fail_the_deploy(fakefly, seaweed, tmp_path, direct):
    project = Project(fakefly, seaweed, tmp_path, machines=3)
    good, broken, hung = project.machines
    # A damaged vendored copy: the running process keeps the module it loaded, but
    # `python3 /app/flydeploy.py` runs this file and fails.
    (broken.root / "flydeploy.py").write_text("def damaged(:\n")
    fakefly.faults.add("500", op="exec", machine=good.id, times=1)  # retried: a passing hiccup
    fakefly.faults.add("408", op="exec", machine=hung.id, times=None)  # every try times out
    project.edit(V2)
    hot = project.push("hot", "--timeout", "5", direct=direct)
    assert hot.returncode == 1, hot.output
    assert f"✓ {good.id} ({good.region}) ready: 2 files to write, 1 process prepared" in hot.output
    assert f"✗ {broken.id} ({broken.region}) rpc prepare exited 1 without a result: SyntaxError" in hot.output
    assert re.search(rf"✗ {hung.id} \({hung.region}\) timed out after \d+ s in all \(25 s per attempt\); "
                     "the command may still be running", hot.output), hot.output
    # Phase 1 failed on two machines: the release reached none, and the good one discarded it.
    refused = hot.output.rsplit("was not applied anywhere: ", 1)[1].split(" refuse")[0]
    assert sorted(refused.split(", ")) == sorted([broken.id, hung.id])
    assert get(good)[0] == "hello v1" and get(broken)[0] == "hello v1" and get(hung)[0] == "hello v1"
    assert not list(good.root.rglob(f"*{flydeploy._STAGED_SUFFIX}"))
    assert f"releases/{project.name}-deploy.lock" not in project.release_keys()


def test_usage_and_configuration_errors(tmp_path):
    tree = write_app_tree(tmp_path / "src", {"main.py": "print('hi')\n"}, app="shop",
                          vendor_flydeploy=False)
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{tmp_path / 'nofly'}{os.pathsep}/usr/bin:/bin")

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "flydeploy_cli", *args], cwd=tree, env=env,
                                capture_output=True, text=True, timeout=60)
        return result.returncode, result.stderr

    code, err = cli("hot", "--dryrun")
    assert code == 2 and "unrecognized arguments: --dryrun" in err and "did you mean --dry-run" in err
    (tree / "fly.toml").write_text('app = "shop"\n[processes\napp = "python3 main.py"\n')
    code, err = cli("hot")
    assert code == 2 and "fly.toml, line 2: invalid TOML" in err
    (tree / "fly.toml").write_text('primary_region = "ams"\n')
    code, err = cli("status")
    assert code == 2 and "no app name: pass --app" in err
    code, err = cli("status", "--app", "shop")
    assert code == 2 and "AWS_ACCESS_KEY_ID" in err and "BUCKET_NAME" in err


def test_local_mode_hot_status_and_rollback(tmp_path):
    name = app_name()
    tree = write_app_tree(tmp_path / "src", {"main.py": MAIN_PY, **V1}, app=name)
    runtime = tempfile.mkdtemp(prefix="fdl-")  # agent sockets need a short path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLY_", "BUCKET_NAME"))}
    env.update(FLY_APP_NAME=name, FLYDEPLOY_RUNTIME_DIR=runtime, APP_PORT_FILE=str(port_file(tmp_path)),
               PYTHONPATH=str(REPO))
    app = subprocess.Popen([sys.executable, "main.py"], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        wait_for(port_file(tmp_path).exists, what="the local app to serve")
        get(tmp_path, "/bump")
        get(tmp_path, "/bump")

        def cli(*args):
            result = subprocess.run([sys.executable, "-m", "flydeploy_cli", *args], cwd=tree, env=env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        for file, text in V2.items():
            (tree / file).write_text(text)
        out = cli("hot", "--local", "--version", "l2")
        assert "✓ local (local) 2 modules, 1 process" in out and "1/1 machine upgraded to l2" in out
        assert get(tmp_path) == ("hello v2", "count-v2:2") and app.poll() is None
        assert (tree / ".flydeploy" / "releases" / f"{name}-l2.tar.gz").is_file()

        (row,) = json.loads(cli("status", "--local", "--json"))
        assert row["verdict"] == "✓ up to date" and row["hot_upgrade_version"] == "l2"
        (process,) = row["process_list"]
        assert process["pid"] == app.pid and process["version"] == "l2" and process["applied_at"]
        text = cli("status", "--local")
        assert "1 flydeploy process of" in text
        assert any(line.split()[:2] == [str(app.pid), "l2"] for line in text.splitlines()), text

        (tree / "counter.py").write_text(V3["counter.py"])
        cli("hot", "--local", "--version", "l3")
        assert get(tmp_path) == ("hello v2", "count-v3:2")
        (tree / "greet.py").write_text(GREET_V1)  # the rollback must not take the files on disk
        out = cli("rollback", "--local", "--to", "l2")
        assert "Rolling" in out and get(tmp_path) == ("hello v2", "count-v2:2")
    finally:
        app.terminate()
        app.wait(timeout=30)
        shutil.rmtree(runtime, ignore_errors=True)
