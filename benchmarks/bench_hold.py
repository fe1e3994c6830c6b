"""Holding 1,000 idle servers: the pause against suspending each one with a message.

Prints one JSON line.  ``pause_ms`` is the median time to hold and release
1,000 idle servers with ``_Pause`` (a flag set under one lock, no thread woken);
``naive_ms`` the median time, measured in the same run, to suspend the same
servers the naive way (a message to each, wait until every thread parked,
release).  Goal: ``pause_ms`` a few milliseconds and far below ``naive_ms``.
"""

import json
import pathlib
import statistics
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import flydeploy  # noqa: E402

SERVERS = 1000
ROUNDS = 7


class Idle(flydeploy.Server):
    def init(self):
        return 0

    def handle_cast(self, message, state):
        parked, release = message
        parked.release()
        release.wait()
        return state


def pause_once(servers):
    started = time.perf_counter()
    with flydeploy._Pause(servers, timeout=10.0):
        pass
    return (time.perf_counter() - started) * 1000


def naive_once(servers):
    started = time.perf_counter()
    parked, release = threading.Semaphore(0), threading.Event()
    for server in servers:
        server.cast((parked, release))
    for _ in servers:
        parked.acquire()
    release.set()
    return (time.perf_counter() - started) * 1000


def main():
    servers = [Idle.start() for _ in range(SERVERS)]
    pause, naive = [], []
    for _ in range(ROUNDS):
        pause.append(pause_once(servers))
        naive.append(naive_once(servers))
        for server in servers:  # every naive message handled before the next round
            flydeploy.get_state(server)
    for server in servers:
        server.stop()
    pause_ms, naive_ms = statistics.median(pause), statistics.median(naive)
    print(json.dumps({"benchmark": "hold_idle_servers", "servers": SERVERS, "rounds": ROUNDS,
                      "pause_ms": round(pause_ms, 3), "naive_ms": round(naive_ms, 3),
                      "speedup": round(naive_ms / pause_ms, 1)}))


if __name__ == "__main__":
    main()
