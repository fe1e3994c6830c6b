"""A small Starlette app: Jinja2 templates, static files, a routes list, notes from SQLAlchemy models.

The lifespan catches up and attaches the event loop, so an upgrade pauses it.
"""

import contextlib
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

import flydeploy
import models

VERSION = "v1"

templates = Jinja2Templates(directory="templates")


@contextlib.asynccontextmanager
async def lifespan(app):
    flydeploy.startup_reapply_current()
    loop = flydeploy.attach_loop()
    yield
    flydeploy.detach_loop(loop)


async def version(request):
    return JSONResponse({"version": VERSION, "pid": os.getpid()})


async def index(request):
    return templates.TemplateResponse(request, "index.html", {"notes": models.texts()})


async def old(request):
    return PlainTextResponse("an old page")


routes = [
    Route("/version", version),
    Route("/", index),
    Route("/old", old),
    Mount("/static", StaticFiles(directory="static"), name="static"),
]

app = Starlette(routes=routes, lifespan=lifespan)
