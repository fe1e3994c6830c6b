"""Boot the notes app under uvicorn; the socket listens first, so early clients wait for the lifespan."""

import os
import socket

import uvicorn

sock = socket.create_server(("127.0.0.1", int(os.environ["PORT"])), backlog=512)
print("ready", flush=True)
uvicorn.Server(uvicorn.Config("notes:app", log_level="warning", lifespan="on")).run(sockets=[sock])
