"""gunicorn settings: 2 sync workers forked from a master that imported the app (``--preload``)."""

import os

bind = f"127.0.0.1:{os.environ.get('PORT', '0')}"
workers = 2
worker_class = "sync"
preload_app = True
graceful_timeout = 2


def post_fork(server, worker):
    # Servers are threads, and threads do not survive a fork: each worker starts its own.
    import wsgi

    wsgi.start_worker()
