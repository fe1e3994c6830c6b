"""A Starlette chat app: websocket sessions with per-connection state, an HTTP endpoint.

``GET /version`` answers the code version, the pid and the ``Tally`` server's
state; ``/ws/{sid}`` is a session: every text message is counted in the
session's own state and answered with a JSON line.  After a hot upgrade every
open session is told so (``on_upgrade``), and its next answer comes from the
new code with the count it had.
"""

import asyncio
import contextlib
import json
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

import flydeploy

VERSION = "v1"


class Tally(flydeploy.Server):
    """Every message of every session, counted in one server."""

    vsn = 1

    def init(self):
        return {"messages": 0}

    def handle_call(self, request, state):
        return dict(state), state

    def handle_cast(self, message, state):
        return {"messages": state["messages"] + 1}


class Session:
    """One websocket connection's state; it lives as long as the connection."""

    def __init__(self, sid):
        self.sid = sid
        self.count = 0
        self.last = None

    def take(self, text):
        self.count += 1
        self.last = text


def render(session):
    return {"version": VERSION, "sid": session.sid, "count": session.count, "last": session.last}


SESSIONS = {}  # sid -> (Session, websocket): module state, kept across upgrades
TALLY = Tally.start(name="tally")
LOOP = None


async def session(websocket):
    await websocket.accept()
    sid = websocket.path_params["sid"]
    state = Session(sid)
    SESSIONS[sid] = (state, websocket)
    try:
        while True:
            text = await websocket.receive_text()
            state.take(text)
            TALLY.cast("message")
            await websocket.send_text(json.dumps(render(state)))
    except Exception:  # the client went away
        pass
    finally:
        SESSIONS.pop(sid, None)


def version(request):
    # A sync endpoint: Starlette runs it in a worker thread, where a blocking call is fine.
    return JSONResponse({"version": VERSION, "pid": os.getpid(), "tally": TALLY.call("get", timeout=10)})


def notify_sessions(report):
    """After an upgrade, tell every open session which modules changed (on the loop's thread)."""
    if not report.ok:  # called after every attempt; a failed one left the old code running
        return
    notice = json.dumps({"event": "upgraded", "version": VERSION, "modules": list(report.modules)})
    for _, websocket in list(SESSIONS.values()):
        asyncio.run_coroutine_threadsafe(websocket.send_text(notice), LOOP)


flydeploy.on_upgrade(notify_sessions)


@contextlib.asynccontextmanager
async def lifespan(app):
    global LOOP
    flydeploy.startup_reapply_current()  # a restarted machine catches up before serving
    LOOP = flydeploy.attach_loop()       # paused while code is swapped
    print("ready", VERSION, flush=True)
    yield
    flydeploy.detach_loop(LOOP)


app = Starlette(routes=[Route("/version", version), WebSocketRoute("/ws/{sid}", session)], lifespan=lifespan)
