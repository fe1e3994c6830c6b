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

The two phases as the orchestrator runs them on the Machines API: ``rpc prepare``
then ``rpc apply``, each ``--detach --wait 10`` (one short exec that starts the
job and brings its result back), ``PHASE_ROUNDS`` of each, the machine's bucket
requests going through a proxy that makes each one a round trip of
``S3_ROUND_TRIP_S`` (as ``bench_fleet``'s model).  ``prepare_exec_ms`` and
``apply_exec_ms`` are the medians of each exec from command start to exit; the
apply is given ``--deployed-at``, as ``orchestrate`` gives it.  Their baseline,
in the same runs: ``*_job_ms``, from the same start until the job's result
object was stored, which is when the exec answered before the job handed its
result over first (it waited for the job to end); and
``apply_exec_reading_current_ms``, the apply without ``--deployed-at`` (an older
orchestrator: the machine reads current.json), in alternate rounds.
``*_bucket_requests`` count the machine's bucket requests answered before its
exec did (median).  ``lock_busy_after_answer_ms`` is the longest the machine
lock stayed taken after a prepare's exec answered (the job's guardian recovers
under it when the run ends): a next exec waits that long at most, less the
~0.1 s it spends importing flydeploy.

``prepare_cpu_ms`` and ``apply_cpu_ms`` are the CPU time (user + system,
median of ``CPU_ROUNDS``) of one such exec, with the argv the orchestrator
execs (``MachineCommands``: ``python -c BOOTSTRAP``), and everything it starts on the
machine: the exec's own process, its job and the job's guardian, until the
last of them ended.  Each exec runs under a small parent that is the child
subreaper of what it starts (the job and the guardian are reparented to it when
their parent returns first), reaps them all and reads their summed rusage;
``*_exec_cpu_ms`` is the exec's process alone.  On Fly each machine has its own
CPU; on one host running many machines (``bench_fleet``) their sum is the floor
of a phase's time.
"""

import fcntl
import json
import os
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
from tests.bucket_proxy import BucketProxy  # noqa: E402
from tests.conftest import run_seaweed  # noqa: E402

PROCESSES = 4
UPGRADE_ROUNDS = 6
BOOT_ROUNDS = 15
PHASE_ROUNDS = 8
CPU_ROUNDS = 8
S3_ROUND_TRIP_S = 0.05
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


# Runs argv[1:] and everything it leaves behind as a child subreaper (prctl
# PR_SET_CHILD_SUBREAPER = 36), reaps them all, prints their CPU seconds.
CPU_PARENT = """\
import ctypes, json, os, resource, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    raise SystemExit("prctl(PR_SET_CHILD_SUBREAPER) failed")
def cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
exec_cpu = cpu()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(json.dumps({"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr,
                  "exec_cpu_s": exec_cpu, "cpu_s": cpu()}))
"""


def timed(argv, env, cwd) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def lock_busy_ms(path: pathlib.Path) -> float:
    """How long, from now, the lock at ``path`` stays taken by someone else."""
    started = time.perf_counter()
    fd = os.open(path, os.O_RDWR)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return (time.perf_counter() - started) * 1000
            except BlockingIOError:
                time.sleep(0.0005)
    finally:
        os.close(fd)


def stored_at(proxy: BucketProxy, key: str, deadline_s: float = 30) -> float:
    """When the proxy answered the PUT of ``key`` (``time.perf_counter()``)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = [at for method, path, at in list(proxy.answered) if method == "PUT" and path.endswith("/" + key)]
        if found:
            return found[0]
        time.sleep(0.002)
    raise SystemExit(f"the result object {key} was never stored")


def phase_rounds(machine: Machine, s3, proxied, proxy: BucketProxy, releases) -> dict:
    """``PHASE_ROUNDS`` of prepare then apply, detached, the machine's bucket a round trip away."""
    env = {**machine.env, "AWS_ENDPOINT_URL_S3": proxy.endpoint}
    rpc = [sys.executable, "-m", "flydeploy", "rpc"]
    times: dict[str, list[float]] = {"prepare": [], "apply": [], "prepare_job": [], "apply_job": [],
                                     "apply_reading": [], "prepare_requests": [], "apply_requests": [],
                                     "apply_reading_requests": [], "lock": []}
    for round_ in range(PHASE_ROUNDS):
        key, sha = releases[round_ % 2]
        url = proxied.url(key)
        upgrade_id = f"phases-{round_}"
        hot = flydeploy.record_hot_upgrade(s3, APP, {"version": key, "tarball_url": url, "sha256": sha})
        given = round_ % 2 == 0
        for command, args in (("prepare", []), ("apply", ["--deployed-at", hot["hot_upgrade"]["deployed_at"]]
                                                if given else [])):
            seen = len(proxy.answered)
            started = time.perf_counter()
            done = subprocess.run([*rpc, command, "--app", APP, "--url", url, "--sha256", sha, "--upgrade-id",
                                   upgrade_id, *args, "--detach", "--wait", "10"],
                                  env=env, cwd=machine.app_root, capture_output=True, text=True)
            answered = time.perf_counter()
            if command == "prepare":
                times["lock"].append(lock_busy_ms(machine.socket_dir() / "upgrade.lock"))
            outcome = parse_result(done.stdout)
            if done.returncode != 0 or not outcome["success"]:
                raise SystemExit(f"{command} round {round_} failed:\n{done.stdout}\n{done.stderr}")
            name = command if command == "prepare" or given else "apply_reading"
            times[name].append((answered - started) * 1000)
            times[name + "_requests"].append(sum(1 for _m, _p, at in proxy.answered[seen:] if at < answered))
            if name != "apply_reading":
                result_key = f"releases/{APP}-results/{upgrade_id}/{command}/{outcome['machine_id']}.json"
                times[command + "_job"].append((stored_at(proxy, result_key) - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items() if name != "lock"} | {
        "lock": max(times["lock"])}


def exec_cpu_rounds(machine: Machine, s3, releases, app_dir: pathlib.Path = ROOT, tag: str = "cpu") -> dict:
    """``CPU_ROUNDS`` of detached prepare then apply, each under ``CPU_PARENT``: median CPU ms.

    Each is the argv the orchestrator execs (``MachineCommands``), with the flydeploy.py of ``app_dir``."""
    env = machine.env
    rpc = flydeploy.MachineCommands.for_app_dir(sys.executable, str(app_dir)).argv("rpc")
    cpu: dict[str, list[float]] = {"prepare": [], "apply": [], "prepare_exec": [], "apply_exec": []}
    for round_ in range(CPU_ROUNDS):
        key, sha = releases[round_ % 2]
        hot = flydeploy.record_hot_upgrade(s3, APP, {"version": key, "tarball_url": s3.url(key), "sha256": sha})
        for command, args in (("prepare", []), ("apply", ["--deployed-at", hot["hot_upgrade"]["deployed_at"]])):
            done = subprocess.run([sys.executable, "-c", CPU_PARENT, *rpc, command, "--app", APP, "--url", s3.url(key),
                                   "--sha256", sha, "--upgrade-id", f"{tag}-{round_}", *args, "--detach", "--wait",
                                   "10"], env=env, cwd=machine.app_root, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{command} round {round_} failed:\n{done.stderr}")
            measured = json.loads(done.stdout)
            outcome = parse_result(measured["stdout"])
            if measured["returncode"] != 0 or not outcome["success"]:
                raise SystemExit(f"{command} round {round_} failed:\n{measured['stdout']}\n{measured['stderr']}")
            cpu[command].append(measured["cpu_s"] * 1000)
            cpu[command + "_exec"].append(measured["exec_cpu_s"] * 1000)
    return {name: statistics.median(values) for name, values in cpu.items()}


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
                with BucketProxy(server.endpoint, delay=S3_ROUND_TRIP_S) as proxy:
                    proxied = server.client(endpoint=proxy.endpoint)
                    releases = [(flydeploy.release_key(APP, version), sha) for version, (_url, sha)
                                in zip(("v2", "v1"), urls)]
                    phases = phase_rounds(machine, s3, proxied, proxy, releases)
                cpu = exec_cpu_rounds(machine, s3, releases)
                flydeploy.reset_current(s3, APP, IMAGE)  # the boots below find no hot upgrade
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
        "s3_round_trip_s": S3_ROUND_TRIP_S,
        "prepare_exec_ms": round(phases["prepare"], 1),
        "prepare_job_ms": round(phases["prepare_job"], 1),
        "apply_exec_ms": round(phases["apply"], 1),
        "apply_job_ms": round(phases["apply_job"], 1),
        "apply_exec_reading_current_ms": round(phases["apply_reading"], 1),
        "prepare_bucket_requests": phases["prepare_requests"],
        "apply_bucket_requests": phases["apply_requests"],
        "apply_reading_current_bucket_requests": phases["apply_reading_requests"],
        "lock_busy_after_answer_ms": round(phases["lock"], 2),
        "prepare_cpu_ms": round(cpu["prepare"], 1),
        "prepare_exec_cpu_ms": round(cpu["prepare_exec"], 1),
        "apply_cpu_ms": round(cpu["apply"], 1),
        "apply_exec_cpu_ms": round(cpu["apply_exec"], 1),
        "goal_rpc_upgrade_under_1000_ms": rpc_upgrade < 1000,
        "goal_startup_added_under_30_ms": startup_added < 30,
    }))


if __name__ == "__main__":
    main()
