"""The e2e load clients count what they must: a websocket session stuck at the stop is a dropped one."""

from __future__ import annotations

import json
import threading

from websockets.sync.server import serve

from tests.e2e.load import Sessions
from tests.machine_apps import wait_for


def test_a_session_stuck_waiting_for_an_answer_counts_as_dropped():
    def answer_once(ws):
        ws.recv()
        ws.send(json.dumps({"sid": "s0", "count": 1, "version": "v1"}))
        for _ in ws:  # every later message goes unanswered: the client waits forever
            pass

    with serve(answer_once, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        sessions = Sessions([f"http://127.0.0.1:{port}"], 1).start()
        wait_for(lambda: sessions.sessions[0].sent == 2, timeout=10, what="the second message to be sent")
        (session,) = sessions.stop(timeout=0.5)
        reason = session.closed  # read before the server goes: its close would end the stuck client
        server.shutdown()
    assert reason and reason.startswith("stuck: "), session
    assert "1 of 2 messages answered" in reason, session
