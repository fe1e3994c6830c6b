"""Requests of a WSGI app while an upgrade swaps its code, the same scenarios for every framework.

A scenario drives a ``GatedApp``: a site module serving ``WORD`` at ``/`` (its view waits on the
``in_view`` / ``leave_view`` events of the ``hooks`` module) and calling ``hooks.upgrade()`` at
``/upgrade``, written again with other statements in place of ``WORD = 'old'``.  It returns what it
saw, as JSON values: a Django app runs in a process of its own (``python -m tests.gated_requests ROOT
SCENARIO``), since Django's settings are set once per process.
"""

from __future__ import annotations

import json
import pathlib
import sys
import threading
import wsgiref.util
from collections.abc import Callable
from typing import Any, NamedTuple

import flydeploy
from tests.waiting import wait_until

HOOKS = ("import threading\n"
         "in_body, leave_body, in_view, leave_view = (threading.Event() for _ in range(4))\n"
         "upgrade = None\n")

FLASK_SITE = """\
from flask import Flask
from . import hooks

app = Flask(__name__)
{body}


@app.route("/")
def index():
    hooks.in_view.set()
    hooks.leave_view.wait(10)
    return WORD


@app.route("/upgrade")
def upgrade():
    return str(hooks.upgrade())
"""

DJANGO_SITE = """\
from django.http import HttpResponse
from django.urls import path
from . import hooks

{body}


def index(request):
    hooks.in_view.set()
    hooks.leave_view.wait(10)
    return HttpResponse(WORD)


def upgrade(request):
    return HttpResponse(str(hooks.upgrade()))


urlpatterns = [path("", index), path("upgrade", upgrade)]
"""


class GatedApp(NamedTuple):
    hooks: Any
    wsgi: object  # the object whose request method gets the gate
    get: Callable[[str], str]  # path -> the body served
    write: Callable[..., None]  # statements in place of ``WORD = 'old'``
    reload: Callable[..., flydeploy.UpgradeReport]  # the site module, with reload_modules' options


def flask_app(tree) -> GatedApp:
    """The Flask site in an engine test tree (tests/engine_tree.py)."""
    tree.write("hooks.py", HOOKS)
    hooks = tree.load("hooks")

    def write(*body: str) -> None:
        tree.write("site.py", FLASK_SITE.format(body="\n".join(body)))

    write("WORD = 'old'")
    app = tree.load("site").app
    client = app.test_client()
    return GatedApp(hooks, app, lambda path: client.get(path).text, write,
                    lambda **options: tree.reload("site", **options))


def django_app(root: pathlib.Path) -> GatedApp:
    """The Django site, package ``gatedsite`` under ``root``, served by a ``WSGIHandler``."""
    import django
    from django.conf import settings

    package = root / "gatedsite"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "hooks.py").write_text(HOOKS)

    def write(*body: str) -> None:
        (package / "site.py").write_text(DJANGO_SITE.format(body="\n".join(body)))

    write("WORD = 'old'")
    sys.path.insert(0, str(root))
    flydeploy.track(root)
    settings.configure(DEBUG=False, ALLOWED_HOSTS=["*"], ROOT_URLCONF="gatedsite.site", MIDDLEWARE=[],
                       INSTALLED_APPS=[], SECRET_KEY="only-a-test")
    django.setup()
    from django.core.wsgi import get_wsgi_application

    from gatedsite import hooks  # type: ignore[import-not-found]
    handler = get_wsgi_application()

    def get(path: str) -> str:
        environ = {"PATH_INFO": path}
        wsgiref.util.setup_testing_defaults(environ)
        response = handler(environ, lambda status, headers, exc_info=None: None)
        try:
            return b"".join(response).decode()
        finally:
            response.close()

    return GatedApp(hooks, handler, get, write,
                    lambda **options: flydeploy.reload_modules(["gatedsite.site"], **options))


def stack_runs(thread: threading.Thread, code) -> bool:
    """Whether ``thread`` is running ``code`` (somewhere on its stack) right now."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame is not None


def outcome(report: flydeploy.UpgradeReport) -> dict:
    return {"ok": report.ok, "error": report.error}


def gated(app: GatedApp) -> bool:
    """Whether the app's requests pass a gate."""
    return any(isinstance(value, flydeploy._RequestGate) for value in vars(app.wsgi).values())


def request_in_a_thread(app: GatedApp, answers: list) -> threading.Thread:
    request = threading.Thread(target=lambda: answers.append(app.get("/")))
    request.start()
    return request


# --- the scenarios ------------------------------------------------------------


def arriving_while_the_bodies_run(app: GatedApp) -> dict:
    """A request arrives while the new module body is halfway through."""
    app.hooks.leave_view.set()
    first = app.get("/")
    app.write("WORD = 'half'", "hooks.in_body.set()", "hooks.leave_body.wait(10)", "WORD = 'new'")
    reports, answers = [], []
    upgrade = threading.Thread(target=lambda: reports.append(app.reload()))
    upgrade.start()
    assert app.hooks.in_body.wait(10)
    request = request_in_a_thread(app, answers)
    wait_until(lambda: answers or stack_runs(request, flydeploy._RequestGate.__call__.__code__),
               "the request to be answered or to wait at the gate")
    app.hooks.leave_body.set()
    upgrade.join(10)
    request.join(10)
    return {"first": first, "answers": answers, **outcome(reports[0])}


def under_way_when_the_upgrade_starts(app: GatedApp) -> dict:
    """A request is under way (it started before any gate) when an upgrade starts."""
    answers, reports = [], []
    request = request_in_a_thread(app, answers)
    assert app.hooks.in_view.wait(10)
    app.write("hooks.in_body.set()", "WORD = 'new'")
    upgrade = threading.Thread(target=lambda: reports.append(app.reload(suspend_timeout=20)))
    upgrade.start()
    wait_until(lambda: app.hooks.in_body.is_set()
               or stack_runs(upgrade, flydeploy._requests_held.__wrapped__.__code__),
               "the upgrade to swap or to wait for the request")
    swapped_first = app.hooks.in_body.is_set()
    app.hooks.leave_view.set()
    request.join(10)
    upgrade.join(10)
    return {"swapped_first": swapped_first, "answers": answers, "after": app.get("/"), **outcome(reports[0])}


def under_way_at_the_deadline(app: GatedApp) -> dict:
    """A request is still under way when the suspend timeout runs out."""
    answers = []
    request = request_in_a_thread(app, answers)
    assert app.hooks.in_view.wait(10)
    app.write("hooks.in_body.set()", "WORD = 'new'")
    try:
        report = app.reload(suspend_timeout=0.2)
    finally:
        app.hooks.leave_view.set()
        request.join(10)
    return {"body_ran": app.hooks.in_body.is_set(), "answers": answers, "after": app.get("/"), **outcome(report)}


def started_by_a_request(app: GatedApp) -> list[dict]:
    """Requests start the upgrades; the second time through the gate the first one put up."""
    app.hooks.leave_view.set()
    reports, steps = [], []
    app.hooks.upgrade = lambda: reports.append(app.reload(suspend_timeout=5))
    for word in ("new", "newer"):
        app.write(f"WORD = {word!r}")
        app.get("/upgrade")
        steps.append({"word": word, "after": app.get("/"), "gated": gated(app), **outcome(reports[-1])})
    return steps


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[2]](django_app(pathlib.Path(sys.argv[1])))))
