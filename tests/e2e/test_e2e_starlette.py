"""uvicorn + Starlette under load: a fleet hot upgrade over 3 fake machines that nobody connected notices.

50 websocket sessions, each with its own state in the app, and an HTTP load
generator run against 3 machines while the developer runs
``python -m flydeploy_cli hot``: no session drops, no request fails, every
session's count goes on where it was, every session is told about the
upgrade, and afterwards every machine answers from v2 with its ``Tally``
server's state migrated by ``code_change``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

from tests.e2e import examples
from tests.e2e.load import HttpLoad, Sessions

pytest_plugins = ["tests.fakefly.fixtures"]

SESSIONS = 50


def test_fleet_hot_upgrade_under_load_drops_nothing(fakefly, seaweed, tmp_path):
    tree, app = examples.fly_app(fakefly, seaweed, tmp_path, "chat", machines=3, command=examples.CHAT_COMMAND)
    machines = list(app.machines)
    urls = [examples.machine_url(machine) for machine in machines]
    sessions = Sessions(urls, SESSIONS).start()
    load = HttpLoad(urls).start()
    try:
        sessions.wait_for_more(sessions.answered(), 2)
        pids = {url: _get(url)["pid"] for url in urls}

        examples.to_v2("chat", tree)
        result = examples.hot(fakefly, tree)
        assert result.returncode == 0, result.stdout + result.stderr
        upgraded_ids = set(re.findall(r"^✓ (\w+) \(\w+\) ", result.stdout, re.M))
        assert upgraded_ids == {m.id for m in machines}, result.stdout + result.stderr
        upgraded = time.monotonic()

        sessions.wait_for_more(sessions.answered(), 3)
        load.wait_for_version("v2", since=upgraded)
        load.wait_for_each_target(5, since=upgraded)
    finally:
        requests = load.stop()
        closed = sessions.stop()

    failed = [r for r in requests if not r.ok]
    assert not failed, f"{len(failed)} of {len(requests)} HTTP requests failed: {failed[:3]}"
    dropped = [f"{s.sid}: {s.closed}" for s in closed if s.closed]
    assert not dropped, f"{len(dropped)} websocket sessions dropped: {dropped[:3]}"
    lost = [w for s in closed for w in s.wrong]
    assert not lost, f"sessions lost their state: {lost[:3]}"
    assert {s.version for s in closed} == {"v2"}
    assert all(any(n.get("version") == "v2" for n in s.notices) for s in closed), "a session was not notified"

    after = [r for r in requests if r.started >= upgraded]
    assert {r.target for r in after} == {url.split("//")[1] for url in urls}
    assert {r.version for r in after} == {"v2"}
    for url in urls:
        answer = _get(url)
        assert answer["pid"] == pids[url], "the app process was restarted"
        sent = sum(s.sent for s in closed if s.url.startswith(url.replace("http", "ws", 1)))
        # v2's shape, every message of v1 and v2 counted: code_change migrated the state.
        assert set(answer["tally"]) == {"messages", "since_upgrade"}
        assert answer["tally"]["messages"] == sent and 0 < answer["tally"]["since_upgrade"] < sent


def _get(url: str) -> dict:
    with urllib.request.urlopen(url + "/version", timeout=10) as response:
        return json.loads(response.read())
