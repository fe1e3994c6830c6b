"""A WSGI app for gunicorn's sync workers: ``GET /`` answers the version, the worker's pid and its hit count.

With ``--preload`` the master imports this module once and forks the workers
from it; ``startup_reapply_current`` starts the master's agent, and every
forked worker gets its own, so a hot upgrade reaches the master and each
worker, and a worker forked later starts on the code the machine runs.
Threads do not survive a fork: each worker starts its own ``Hits`` server in
gunicorn's ``post_fork`` hook (gunicorn.conf.py).
"""

import json
import os

import flydeploy

flydeploy.startup_reapply_current()

import pricing  # noqa: E402  (imported after the catch-up: it loads the code this machine runs)


class Hits(flydeploy.Server):
    """This worker's request count."""

    vsn = 1

    def init(self):
        return 0

    def handle_call(self, request, state):
        return state + 1, state + 1


HITS = None


def start_worker():
    """Called in each worker right after the fork."""
    global HITS
    HITS = Hits.start()


def application(environ, start_response):
    body = json.dumps({"version": pricing.VERSION, "pid": os.getpid(), "hits": HITS.call("hit"),
                       "price": pricing.price(100)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
