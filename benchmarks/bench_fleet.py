"""Fleet orchestration: 20 machines, 10 at a time against 1 at a time.

Prints one JSON line.  Twenty machines of the local fake Fly (tests/fakefly:
a real Machines API server on loopback, each machine a sandbox running a real
app process with a ``flydeploy.Server`` and its agent) take three releases in
a row through ``flydeploy.orchestrate`` and the real ``Machines`` client: a
warm-up (every sandbox compiles flydeploy once), then one at
``max_concurrency`` 1 (the baseline) and one at 10, in the same run.  Goals:
under 3 s at 10, and at least 5x faster than at 1.

The twenty fake machines share this host's cores, so at 10 at a time the
machines' own work (a Python process per ``rpc upgrade``) competes for them,
which real machines on their own hosts do not.  The same pair of runs is
therefore repeated with the Machines API answering each exec after
``LATENCY_S`` (the fake's ``slow`` fault), the network and platform time a
real exec spends off this host's CPU; those figures are reported apart.
"""

import io
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flydeploy  # noqa: E402
from tests.fakefly import FakeFly, write_app_tree  # noqa: E402

MACHINES = 20
APP = "bench-fleet"
LATENCY_S = 0.25

MAIN = """
import threading

import flydeploy

flydeploy.start_agent()
import counter  # noqa: E402

server = counter.Counter.start(name="counter")
print("ready", flush=True)
threading.Event().wait()
"""

COUNTER = """
import flydeploy

RELEASE = {release}


class Counter(flydeploy.Server):
    vsn = {release}

    def init(self):
        return {{"n": 0}}

    def handle_call(self, request, state):
        return RELEASE, state
"""


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as scratch:
        work = pathlib.Path(scratch)
        tree = write_app_tree(work / "src", {"main.py": MAIN, "counter.py": COUNTER.format(release=1)},
                              app=APP, processes={"app": "python3 main.py"})
        with FakeFly(work / "fly") as fly:
            app = fly.create_app(APP, tree, machines=MACHINES)
            for machine in app.machines:
                machine.wait_for_log("ready", timeout=120)
            store = flydeploy.LocalStore(work / "store")
            api = flydeploy.Machines(APP, app.token, base_url=fly.base_url)
            image = app.machines[0].image_ref

            def push(release: int, concurrency: int) -> float:
                (tree / "counter.py").write_text(COUNTER.format(release=release))
                started = time.perf_counter()
                report = flydeploy.orchestrate(APP, image, store=store, api=api, root=tree,
                                               version=f"r{release}", max_concurrency=concurrency,
                                               out=io.StringIO())
                elapsed = time.perf_counter() - started
                if report.exit_code != 0 or len(report.outcomes) != MACHINES:
                    raise SystemExit(f"release r{release} did not reach every machine: {report.summary()}")
                return elapsed

            push(2, 10)
            serial = push(3, 1)
            parallel = push(4, 10)
            fly.faults.add("slow", op="exec", times=None, delay=LATENCY_S)
            serial_latency = push(5, 1)
            parallel_latency = push(6, 10)
    print(json.dumps({
        "benchmark": "fleet",
        "machines": MACHINES,
        "wall_s_concurrency_10": round(parallel, 3),
        "wall_s_concurrency_1": round(serial, 3),
        "speedup": round(serial / parallel, 2),
        "goal_under_3s": parallel < 3.0,
        "goal_speedup_5x": serial / parallel >= 5.0,
        "api_latency_s": LATENCY_S,
        "wall_s_concurrency_10_with_latency": round(parallel_latency, 3),
        "wall_s_concurrency_1_with_latency": round(serial_latency, 3),
        "speedup_with_latency": round(serial_latency / parallel_latency, 2),
    }))


if __name__ == "__main__":
    main()
