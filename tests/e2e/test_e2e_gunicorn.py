"""gunicorn, 2 sync workers with ``--preload``: a fleet hot upgrade reaches the master and both workers,
and a worker killed afterwards is replaced by one that serves v2."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

from tests.e2e import examples
from tests.machine_apps import wait_for

pytest_plugins = ["tests.fakefly.fixtures"]


def _processes(machine, app: str) -> list[dict]:
    """``rpc info`` on the machine (as exec runs it, in ``/``): one entry per Python process with an agent."""
    reply = machine.exec(["python3", "/app/flydeploy.py", "rpc", "info", "--app", app])
    assert reply["exit_code"] == 0, reply
    return json.loads(reply["stdout"])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _answers_from(url: str, pids: set[int]) -> dict[int, dict]:
    """Ask until every worker in ``pids`` has answered (the kernel picks the worker)."""
    answers: dict[int, dict] = {}

    def all_answered() -> bool:
        answer = _get(url)
        answers[answer["pid"]] = answer
        return pids <= answers.keys()
    wait_for(all_answered, timeout=30, what=f"answers from workers {sorted(pids)}")
    return answers


def test_preloaded_sync_workers_upgraded_and_a_replacement_worker_serves_v2(fakefly, seaweed, tmp_path):
    tree, app = examples.fly_app(fakefly, seaweed, tmp_path, "shop", machines=1, command=examples.SHOP_COMMAND)
    machine = app.machines[0]
    url = examples.machine_url(machine)
    processes = wait_for(lambda: len(_processes(machine, app.name)) == 3 and _processes(machine, app.name),
                           timeout=30, what="the gunicorn master and 2 workers to run agents")
    master = machine.pid
    workers = {p["pid"] for p in processes} - {master}
    assert len(workers) == 2, processes
    before = _answers_from(url, workers)
    assert {a["version"] for a in before.values()} == {"v1"} and {a["price"] for a in before.values()} == {100}

    examples.to_v2("shop", tree)
    result = examples.hot(fakefly, tree, "--version", "v2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 processes" in result.stdout, result.stdout

    versions = {p["pid"]: p["version"] for p in _processes(machine, app.name)}
    assert versions == dict.fromkeys(workers | {master}, "v2")
    after = _answers_from(url, workers)
    assert {a["version"] for a in after.values()} == {"v2"} and {a["price"] for a in after.values()} == {90}
    # Each worker's Hits server kept counting across the upgrade.
    assert all(after[pid]["hits"] > before[pid]["hits"] for pid in workers)

    killed = min(workers)
    os.kill(killed, signal.SIGKILL)
    replacement = wait_for(lambda: ({p["pid"] for p in _processes(machine, app.name)} - workers - {master}),
                             timeout=30, what="gunicorn to fork a replacement worker")
    (new_pid,) = replacement
    assert {p["pid"]: p["version"] for p in _processes(machine, app.name)}[new_pid] == "v2"
    answer = _answers_from(url, {new_pid})[new_pid]
    assert (answer["version"], answer["price"], answer["hits"]) == ("v2", 90, 1)
