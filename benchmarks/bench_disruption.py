"""What a code change does to the people connected: a hot upgrade against a cold restart, same app, same load.

Prints one JSON line.  The app is the end-to-end tests' uvicorn + Starlette
chat (tests/e2e/apps/chat) running on this host; the load is 50 websocket
sessions (a message every 50 ms each, every answer checked against the
session's own count) and 4 HTTP clients sending ``GET /version`` every 10 ms
over keep-alive connections.  Each way runs on a fresh app process:

- ``hot``: the sources are edited to v2 and ``python -m flydeploy_cli hot
  --local`` upgrades the running process;
- ``cold``: the sources are edited to v2 and the process is stopped (SIGTERM)
  and started again on the same port, what ``fly deploy`` does to each
  machine.  Clients do not reconnect: a dropped session stays dropped.

For each: ``dropped_connections`` (sessions closed by the change),
``lost_state`` (answers whose count did not follow on), ``failed_requests``,
``max_latency_ms`` (the slowest request started during the change, from the
command's start until v2 answers plus 0.5 s; a failed or timed-out request
counts with the time it took to fail), ``v2_after_ms``
(from the command's start until the first answer from v2),
``suspend_ms`` (hot only: how long the app was held, from the machine's
stored result) and ``baseline_p99_ms`` (the p99 request latency over the 2 s before the change,
the same run's baseline).  Goal: the hot upgrade drops 0 connections, fails 0
requests, and its ``max_latency_ms`` stays within its ``baseline_p99_ms`` +
50 ms (``hot_within_goal``).
"""

import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e import examples  # noqa: E402
from tests.e2e.load import HttpLoad, Sessions, percentile  # noqa: E402

SESSIONS = 50
BASELINE_S = 2.0
AFTER_S = 0.5
GOAL_MARGIN_MS = 50.0


def hot_change(app: examples.LocalApp) -> dict:
    result = app.cli("hot", "--version", "v2")
    if result.returncode != 0:
        raise SystemExit(f"hot --local failed:\n{result.stdout}{result.stderr}")
    # The machine's result, as stored in the local store: how long the app was held.
    (path,) = (app.root / ".flydeploy" / "releases").glob(f"{app.app}-results/*/*.json")  # one machine
    return {"suspend_ms": json.loads(path.read_text())["suspend_duration_ms"]}


def cold_change(app: examples.LocalApp) -> dict:
    app.stop()
    app.start()
    return {}


def measure(change) -> dict:
    app = examples.LocalApp("chat", "bench-disruption")
    try:
        app.start()
        sessions = Sessions([app.url], SESSIONS).start()
        load = HttpLoad([app.url]).start()
        try:
            time.sleep(BASELINE_S)
            examples.to_v2("chat", app.root)
            started = time.monotonic()
            extra = change(app)
            load.wait_for_version("v2", since=started)
            v2_after = next(r.started + r.latency_ms / 1000 for r in load.snapshot()
                            if r.ok and r.version == "v2" and r.started >= started) - started
            time.sleep(AFTER_S)
        finally:
            requests = load.stop()
            closed = sessions.stop()
    finally:
        app.close()
    baseline = [r.latency_ms for r in requests if r.ok and started - BASELINE_S <= r.started < started]
    during = [r for r in requests if started <= r.started <= started + v2_after + AFTER_S]
    return {
        "dropped_connections": sum(1 for s in closed if s.closed),
        "lost_state": sum(len(s.wrong) for s in closed),
        "failed_requests": sum(1 for r in during if not r.ok),
        "requests_during_change": len(during),
        "max_latency_ms": round(max((r.latency_ms for r in during), default=0.0), 1),
        "v2_after_ms": round(v2_after * 1000, 1),
        "baseline_p99_ms": round(percentile(baseline, 0.99), 1),
        **extra,
    }


def main() -> None:
    hot = measure(hot_change)
    cold = measure(cold_change)
    within = (hot["dropped_connections"] == 0 and hot["failed_requests"] == 0 and hot["lost_state"] == 0
              and hot["max_latency_ms"] <= hot["baseline_p99_ms"] + GOAL_MARGIN_MS)
    print(json.dumps({"benchmark": "disruption", "sessions": SESSIONS, "http_clients": 4,
                      "hot": hot, "cold": cold, "hot_within_goal": within,
                      "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
