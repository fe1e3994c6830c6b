"""Load clients for the end-to-end tests and the disruption benchmark: real clients over loopback.

``Sessions`` holds websocket sessions open (the ``websockets`` library on an
event loop of its own) and sends each a message at a steady pace, checking
that every answer carries the session's own count; ``HttpLoad`` sends
``GET`` requests at a steady pace from a few threads over keep-alive
connections (``http.client``) and records every request's outcome.  Both
record rather than assert, so a test or benchmark reads what happened.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import http.client
import json
import math
import threading
import time
import urllib.parse
from collections.abc import Callable

import websockets

from tests.machine_apps import wait_for


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclasses.dataclass
class Session:
    """What one websocket session saw."""

    sid: str
    url: str
    connected: bool = False
    sent: int = 0
    answered: int = 0
    version: str | None = None
    notices: list[dict] = dataclasses.field(default_factory=list)
    wrong: list[str] = dataclasses.field(default_factory=list)   # answers that lost the session's state
    closed: str | None = None                                      # why it was closed, if not by us
    ended: bool = False                                            # its client finished, however it ended


class Sessions:
    """``count`` websocket sessions spread over ``base_urls`` (``http://host:port``), path ``/ws/<sid>``."""

    def __init__(self, base_urls: list[str], count: int, *, interval: float = 0.05, prefix: str = "s") -> None:
        self.sessions = []
        for number in range(count):
            base = urllib.parse.urlsplit(base_urls[number % len(base_urls)])
            sid = f"{prefix}{number}"
            self.sessions.append(Session(sid, f"ws://{base.netloc}/ws/{sid}"))
        self.interval = interval
        self._stopping: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="ws-sessions")

    def start(self, *, timeout: float = 30.0) -> Sessions:
        """Open every session; returns once each has had an answer."""
        self._thread.start()
        wait_for(lambda: all(s.answered or s.closed for s in self.sessions), timeout=timeout,
                   what="every websocket session to open and get an answer")
        failed = [f"{s.sid}: {s.closed}" for s in self.sessions if s.closed]
        if failed:
            self.stop()
            raise AssertionError("websocket sessions failed to open: " + "; ".join(failed[:5]))
        return self

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await asyncio.gather(*(self._session(s) for s in self.sessions))

    async def _session(self, session: Session) -> None:
        try:
            async with websockets.connect(session.url, open_timeout=20, ping_interval=None,
                                          close_timeout=2) as ws:
                session.connected = True
                while not self._stopping.is_set():
                    session.sent += 1
                    await ws.send(f"message {session.sent}")
                    answer = await self._answer(ws, session)
                    if answer.get("sid") != session.sid or answer.get("count") != session.sent:
                        session.wrong.append(f"sent {session.sent}, got {answer}")
                    session.answered, session.version = session.sent, answer.get("version")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.interval)
        except Exception as exc:  # a dropped connection is what the tests count
            session.closed = f"{type(exc).__name__}: {exc}"
        finally:
            session.ended = True

    @staticmethod
    async def _answer(ws, session: Session) -> dict:
        while True:
            message = json.loads(await ws.recv())
            if message.get("event"):
                session.notices.append(message)
                continue
            return message

    def answered(self) -> dict[str, int]:
        """Answers so far, by session."""
        return {s.sid: s.answered for s in self.sessions}

    def wait_for_more(self, mark: dict[str, int], more: int = 2, *, timeout: float = 30.0) -> None:
        """Wait until every open session has ``more`` answers past ``mark``."""
        wait_for(lambda: all(s.closed or s.answered >= mark[s.sid] + more for s in self.sessions),
                   timeout=timeout, what=f"{more} more answers on every websocket session")

    def stop(self, *, timeout: float = 30.0) -> list[Session]:
        """Close every session (a normal close, not counted as a drop); returns them.

        A session whose client has not finished ``timeout`` seconds after the stop is stuck
        (an answer that never came, a close the app never finished): it is
        counted as dropped, with that as the reason.
        """
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # every session already ended: the loop is closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=timeout)
        for session in self.sessions:
            if not session.ended and not session.closed:
                session.closed = (f"stuck: still not finished {timeout:g} s after the stop "
                                  f"({session.answered} of {session.sent} messages answered)")
        return self.sessions


@dataclasses.dataclass
class Request:
    """One HTTP request: when it started (monotonic), how long it took, what came back."""

    target: str
    started: float
    latency_ms: float
    ok: bool
    version: str | None = None
    pid: int | None = None
    error: str | None = None


class HttpLoad:
    """``threads`` threads each sending ``GET path`` to the ``base_urls`` in turn every ``interval`` seconds.

    An answer with a status outside ``ok_statuses`` is a failed request."""

    def __init__(self, base_urls: list[str], *, path: str = "/version", threads: int = 4,
                 interval: float = 0.01, timeout: float = 10.0, ok_statuses: tuple[int, ...] = (200,)) -> None:
        self.targets = [urllib.parse.urlsplit(url).netloc for url in base_urls]
        self.path = path
        self.ok_statuses = ok_statuses
        self.interval = interval
        self.timeout = timeout
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True, name=f"http-load-{n}")
                         for n in range(threads)]

    def start(self) -> HttpLoad:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, number: int) -> None:
        connections: dict[str, http.client.HTTPConnection] = {}
        turn = number
        next_at = time.monotonic()
        while not self._stopping.is_set():
            target = self.targets[turn % len(self.targets)]
            turn += 1
            connection = connections.get(target) or http.client.HTTPConnection(target, timeout=self.timeout)
            connections[target] = connection
            self._record(self._one(connection, connections, target))
            next_at += self.interval
            self._stopping.wait(max(0.0, next_at - time.monotonic()))
        for connection in connections.values():
            connection.close()

    def _one(self, connection: http.client.HTTPConnection, connections: dict, target: str) -> Request:
        started = time.monotonic()
        try:
            connection.request("GET", self.path)
            response = connection.getresponse()
            body = response.read()
            latency = (time.monotonic() - started) * 1000
            if response.status not in self.ok_statuses:
                raise OSError(f"HTTP {response.status}: {body[:200]!r}")
            json_body = (response.getheader("Content-Type") or "").startswith("application/json")
            answer = json.loads(body) if json_body else {}  # a page: its status is what counts
            return Request(target, started, latency, True, answer.get("version"), answer.get("pid"))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            connection.close()
            connections.pop(target, None)
            return Request(target, started, (time.monotonic() - started) * 1000, False,
                           error=f"{type(exc).__name__}: {exc}")

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def snapshot(self) -> list[Request]:
        """The requests so far."""
        with self._lock:
            return list(self.requests)

    def wait_for_version(self, version: str, *, since: float = 0.0, timeout: float = 30.0) -> float:
        """Wait for an answer from ``version`` to a request started after ``since``; returns its start."""
        def first() -> float | None:
            return next((r.started for r in self.snapshot() if r.ok and r.version == version
                         and r.started >= since), None)
        return wait_for(first, timeout=timeout, what=f"an HTTP answer from {version}")

    def wait_for_each_target(self, count: int, *, since: float, timeout: float = 30.0) -> None:
        """Wait until every target has answered ``count`` requests started after ``since``."""
        def answered() -> bool:
            done = collections.Counter(r.target for r in self.snapshot() if r.started >= since)
            return all(done[target] >= count for target in self.targets)
        wait_for(answered, timeout=timeout, what=f"{count} answered requests to every target")

    def stop(self) -> list[Request]:
        """Stop sending; returns every request."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        return self.snapshot()
