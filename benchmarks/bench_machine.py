"""One machine with 4 app processes: `rpc upgrade` wall time, and the boot cost of startup_reapply_current.

Prints one JSON line.  SeaweedFS on loopback is the S3 server.  Four processes
of a small web app (a server with state, two changed modules per release) run
agents; ``rpc_upgrade_ms`` is the median wall time of
``python -m flydeploy rpc upgrade`` from command start to exit (download,
verify, write, every process applied, result stored), alternating between two
releases so that every round changes code.  Its baseline, measured in the same
run, is ``rpc_ping_ms``: the same command line reaching the same 4 agents
without upgrading.  Goal: ``rpc_upgrade_ms`` under 1,000 ms.

``startup_added_ms`` is the median wall time of booting a small app that
imports flydeploy and calls ``startup_reapply_current()`` with nothing pending
(metadata for its image, no hot upgrade: one GET), with its agent as by
default, minus the median of the same
boot without the call, runs interleaved.  Goal: under 30 ms.  ``import_ms``
is what importing flydeploy itself adds to a bare boot, for reference.
"""

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flydeploy  # noqa: E402
from tests.machine_apps import (COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, Machine, parse_result,  # noqa: E402
                                write_tree)
from tests.conftest import run_seaweed  # noqa: E402

PROCESSES = 4
UPGRADE_ROUNDS = 6
BOOT_ROUNDS = 15
APP = "bench"
IMAGE = "registry.fly.io/bench:deployment-1"

BOOT_PY = '''\
import sys
import greet
import flydeploy
if sys.argv[1] == "with":
    outcome = flydeploy.startup_reapply_current()  # the default, with the process's agent
    assert outcome["status"] == "up_to_date" and outcome["agent"], outcome
'''


def timed(argv, env, cwd) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-machine-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "seaweed").mkdir()
        with run_seaweed(tmp / "seaweed") as server:
            s3 = server.client()
            machine = Machine(tmp / "machine", app=APP, image_ref=IMAGE, env=server.env())
            try:
                machine.write({"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V1})
                flydeploy.reset_current(s3, APP, IMAGE)
                urls = []
                for version, greet in (("v2", GREET_V2), ("v1", GREET_V1)):
                    source = tmp / f"src-{version}"
                    counter = COUNTER_PY.replace("count-v1", f"count-{version}")
                    write_tree(source, {"main.py": MAIN_PY, "counter.py": counter, "greet.py": greet})
                    release = flydeploy.pack_release(source, tmp / f"{version}.tar.gz", app=APP, version=version)
                    key = flydeploy.release_key(APP, version)
                    s3.upload(key, release.path)
                    urls.append((s3.url(key), release.sha256))
                for _ in range(PROCESSES):
                    machine.start().wait_ready()
                rpc = [sys.executable, "-m", "flydeploy", "rpc"]
                upgrade_ms, ping_ms = [], []
                for round_ in range(UPGRADE_ROUNDS):
                    url, sha = urls[round_ % 2]
                    ping_ms.append(timed([*rpc, "ping", "--app", APP], machine.env, machine.base))
                    started = time.perf_counter()
                    result = subprocess.run([*rpc, "upgrade", "--app", APP, "--url", url, "--sha256", sha],
                                            env=machine.env, cwd=machine.app_root, capture_output=True, text=True)
                    upgrade_ms.append((time.perf_counter() - started) * 1000)
                    outcome = parse_result(result.stdout)
                    if result.returncode != 0 or outcome["processes_succeeded"] != PROCESSES \
                            or outcome["modules_reloaded"] != 2:
                        raise SystemExit(f"upgrade round {round_} did not upgrade every process:\n{result.stdout}")
                suspend_ms = outcome["suspend_duration_ms"]
            finally:
                machine.close()

            boot_root = tmp / "boot"
            write_tree(boot_root, {"boot.py": BOOT_PY, "greet.py": GREET_V1})
            env = {**machine.env, "FLYDEPLOY_RUNTIME_DIR": str(tmp / "boot-run")}
            with_ms, without_ms, bare_ms, call_ms = [], [], [], []
            for _ in range(BOOT_ROUNDS):
                bare_ms.append(timed([sys.executable, "greet.py"], env, boot_root))
                without_ms.append(timed([sys.executable, "boot.py", "without"], env, boot_root))
                with_ms.append(timed([sys.executable, "boot.py", "with"], env, boot_root))
            probe = subprocess.run([sys.executable, "-c", "import json, flydeploy; print(json.dumps("
                                    "flydeploy.startup_reapply_current()))"],
                                   env=env, cwd=boot_root, capture_output=True, text=True)
            call_ms.append(json.loads(probe.stdout)["duration_ms"])

    rpc_upgrade = statistics.median(upgrade_ms)
    startup_added = statistics.median(with_ms) - statistics.median(without_ms)
    print(json.dumps({
        "processes": PROCESSES,
        "rpc_upgrade_ms": round(rpc_upgrade, 1),
        "rpc_upgrade_ms_min": round(min(upgrade_ms), 1),
        "rpc_ping_ms": round(statistics.median(ping_ms), 1),
        "last_suspend_ms": suspend_ms,
        "startup_added_ms": round(startup_added, 1),
        "startup_call_ms": call_ms[0],
        "boot_without_ms": round(statistics.median(without_ms), 1),
        "import_ms": round(statistics.median(without_ms) - statistics.median(bare_ms), 1),
        "goal_rpc_upgrade_under_1000_ms": rpc_upgrade < 1000,
        "goal_startup_added_under_30_ms": startup_added < 30,
    }))


if __name__ == "__main__":
    main()
