"""Boot the chat app under uvicorn on a socket of our own (``PORT``, default a free one).

The socket listens before uvicorn starts, so clients that connect early wait
in the backlog until the lifespan (``startup_reapply_current`` + ``attach_loop``)
has run: the first request is served by the code the machine should run.
"""

import os
import socket

import uvicorn

# IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on sockets it sees as TCP, and
# without it every response written in two parts waits for a delayed ACK (40 ms).
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(os.environ.get("PORT", "0"))))
sock.listen(512)
print(f"listening on port {sock.getsockname()[1]}", flush=True)
uvicorn.Server(uvicorn.Config("chat:app", log_level="warning", lifespan="on")).run(sockets=[sock])
