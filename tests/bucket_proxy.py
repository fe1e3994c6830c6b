"""An HTTP proxy in front of the test S3 server: what a machine asks the bucket, and when it gets it.

``BucketProxy(endpoint)`` listens on 127.0.0.1 (``proxy.endpoint``) and forwards every request
as it came (its ``Host`` header too, so SigV4 signatures made for the proxy still hold) to the
server at ``endpoint``.  ``requests`` lists ``(method, path)`` of each request in arrival order,
``answered`` ``(method, path, time.perf_counter())`` of each as its answer went out;
``hold(predicate)`` keeps the requests it matches waiting until ``release()`` (or ``HOLD_LIMIT_S``),
``holding`` is set once one waits; ``delay`` adds that many seconds to every request, a bucket
that far away.  ``close()`` stops it.  A context manager.
"""

from __future__ import annotations

import http.client
import http.server
import threading
import time
import urllib.parse
from collections.abc import Callable

# A held request goes on after this long whatever happens: a failing test must not hang.
HOLD_LIMIT_S = 30.0
_HOP_BY_HOP = ("connection", "keep-alive", "transfer-encoding", "content-length")


class BucketProxy:
    def __init__(self, endpoint: str, *, delay: float = 0.0) -> None:
        self.target = urllib.parse.urlsplit(endpoint)
        self.delay = delay
        self.requests: list[tuple[str, str]] = []
        self.answered: list[tuple[str, str, float]] = []
        self.holding = threading.Event()
        self._released = threading.Event()
        self._hold: Callable[[str, str], bool] | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                proxy._forward(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hold(self, predicate: Callable[[str, str], bool]) -> None:
        """Keep each request whose ``(method, path)`` ``predicate`` matches waiting until ``release()``."""
        self._released.clear()
        self.holding.clear()
        self._hold = predicate

    def release(self) -> None:
        self._hold = None
        self._released.set()

    def seen(self, method: str, path_end: str) -> list[tuple[str, str]]:
        """The requests so far of ``method`` whose path ends with ``path_end``."""
        with self._lock:
            return [(m, p) for m, p in self.requests if m == method and p.endswith(path_end)]

    def _forward(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        method, path = handler.command, urllib.parse.urlsplit(handler.path).path
        with self._lock:
            self.requests.append((method, path))
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        hold = self._hold
        if hold is not None and hold(method, path):
            self.holding.set()
            self._released.wait(HOLD_LIMIT_S)
        if self.delay:
            time.sleep(self.delay)
        upstream = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
        try:
            upstream.putrequest(method, handler.path, skip_host=True, skip_accept_encoding=True)
            for name, value in handler.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        handler.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                handler.send_header(name, value)
        handler.send_header("Content-Length", (response.getheader("Content-Length") or "0") if method == "HEAD"
                            else str(len(data)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(data)
        handler.wfile.flush()
        with self._lock:
            self.answered.append((method, path, time.perf_counter()))

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> BucketProxy:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
