"""Local mode, no Fly and no S3: ``hot --local`` on a running app (twice), ``status --local``, then
``rollback --local`` to the previous release, with websocket sessions and HTTP requests running through
all of it; and an app of several processes (gunicorn's master and 2 preloaded workers) upgraded as one."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from tests.e2e import examples
from tests.e2e.load import HttpLoad, Sessions
from tests.machine_apps import wait_for


@pytest.fixture
def chat():
    app = examples.LocalApp("chat", "chat-local")
    try:
        yield app.start()
    finally:
        app.close()


def _check(result, what: str) -> str:
    assert result.returncode == 0, f"{what} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def _status(chat) -> list[dict]:
    return json.loads(_check(chat.cli("status", "--json"), "status --local"))


def test_hot_local_then_rollback_local_keep_process_sessions_and_state(chat):
    pid = chat.process.pid
    sessions = Sessions([chat.url], 10).start()
    load = HttpLoad([chat.url], threads=2).start()
    try:
        examples.to_v2("chat", chat.root)
        out = _check(chat.cli("hot", "--version", "v2"), "hot --local")
        assert "1/1 machine upgraded to v2" in out, out
        load.wait_for_version("v2", since=time.monotonic())
        sessions.wait_for_more(sessions.answered(), 2)
        assert {s.version for s in sessions.sessions} == {"v2"}
        assert [(r["machine_id"], r["hot_upgrade_version"]) for r in _status(chat)] == [("local", "v2")]
        assert (chat.root / ".flydeploy").is_dir(), "the local store lives under the app root"

        examples.set_version(chat.root, "chat.py", "v3")
        _check(chat.cli("hot", "--version", "v3"), "hot --local")
        load.wait_for_version("v3", since=time.monotonic())

        out = _check(chat.cli("rollback"), "rollback --local")  # back to the previous release: v2
        assert "1/1 machine upgraded to v2" in out, out
        rolled_back = time.monotonic()
        load.wait_for_version("v2", since=rolled_back)
        sessions.wait_for_more(sessions.answered(), 2)
        assert {s.version for s in sessions.sessions} == {"v2"}
        assert _status(chat)[0]["hot_upgrade_version"] == "v2"
    finally:
        requests = load.stop()
        closed = sessions.stop()
    assert not [r for r in requests if not r.ok], [r for r in requests if not r.ok][:3]
    assert not [s.closed for s in closed if s.closed]
    assert not [w for s in closed for w in s.wrong]
    assert {r.pid for r in requests} == {pid}, "the app process was restarted"
    assert {r.version for r in requests if r.started >= rolled_back} == {"v2"}


def _answers_from_workers(url: str, count: int) -> dict[int, dict]:
    """Ask until ``count`` different worker processes have answered (the kernel picks the worker)."""
    answers: dict[int, dict] = {}

    def enough() -> bool:
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.loads(response.read())
        answers[answer["pid"]] = answer
        return len(answers) >= count
    wait_for(enough, timeout=30, what=f"answers from {count} workers")
    return answers


def test_hot_local_upgrades_every_process_of_the_app():
    shop = examples.LocalApp("shop", "shop-local", command=examples.SHOP_COMMAND, ready="Listening at")
    try:
        shop.start()
        before = _answers_from_workers(shop.url, 2)
        assert {a["version"] for a in before.values()} == {"v1"}, before

        examples.to_v2("shop", shop.root)
        out = _check(shop.cli("hot", "--version", "v2"), "hot --local")
        assert "1/1 machine upgraded to v2" in out and "3 processes" in out, out  # the master and both workers

        after = _answers_from_workers(shop.url, 2)
        assert after.keys() == before.keys(), "a worker was restarted"
        assert {(a["version"], a["price"]) for a in after.values()} == {("v2", 90)}, after
        assert all(after[pid]["hits"] > before[pid]["hits"] for pid in before), (before, after)
    finally:
        shop.close()
