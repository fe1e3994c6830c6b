"""Exec fan-out through flydeploy.Machines against the fake Fly on loopback.

Runs ``sleep 0.1`` (a stand-in for the round trip and work of a real exec)
once on each of 20 machines with 10 requests in flight, and
again (on 20 other machines, so the per-machine pacing does not interfere)
one at a time.  Right after the first round comes a second one on the same
20 machines: the one-exec-per-second-per-machine pacing holds each machine's
second exec until its second is up, so that round ends about 1.1 s after the
first began, not 20 paced seconds later.  Prints one JSON line.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flydeploy  # noqa: E402
from tests.fakefly import FakeFly  # noqa: E402

MACHINES = 20


def fan_out(api: flydeploy.Machines, machine_ids: list[str], concurrency: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda mid: api.exec(mid, ["sleep", "0.1"]), machine_ids))
    elapsed = time.perf_counter() - started
    assert all(r.ok for r in results), results
    return elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tree = pathlib.Path(tmp) / "src"
        tree.mkdir()
        (tree / "fly.toml").write_text('app = "bench"\n')
        with FakeFly(pathlib.Path(tmp) / "ff") as fly:
            app = fly.create_app("bench", tree, machines=2 * MACHINES, command=["sleep", "inf"])
            api = flydeploy.Machines("bench", app.token, base_url=fly.base_url)
            ids = [m.id for m in app.machines]
            parallel = fan_out(api, ids[:MACHINES], 10)
            paced = fan_out(api, ids[:MACHINES], 10)
            serial = fan_out(api, ids[MACHINES:], 1)
    print(json.dumps({
        "benchmark": "machines_exec_fanout", "machines": MACHINES,
        "concurrency_10_s": round(parallel, 3), "concurrency_1_s": round(serial, 3),
        "speedup": round(serial / parallel, 2),
        "second_round_paced_s": round(paced, 3),
    }))


if __name__ == "__main__":
    main()
