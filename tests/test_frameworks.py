"""Section 4b in one process: framework state made what a cold start of the new code builds, inside the
upgrade's pause and under its undo log (the end-to-end tests run whole apps under load)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

import flydeploy
from tests import gated_requests
from tests.engine_tree import tree  # noqa: F401  (the fixture)
from tests.waiting import wait_until


def asgi_get(app, path: str) -> tuple[int, bytes]:
    """``GET path`` straight through an ASGI app: status and body."""
    messages = asgi_messages(app, path)
    return messages[0]["status"], b"".join(m.get("body", b"") for m in messages[1:])


def asgi_start(app, path: str) -> dict:
    """The response start message of ``GET path``."""
    return asgi_messages(app, path)[0]


def asgi_messages(app, path: str) -> list[dict]:
    messages = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [], "http_version": "1.1", "scheme": "http", "server": ("test", 80),
             "client": ("test", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return messages


# --- on_reload ----------------------------------------------------------------


def test_on_reload_runs_in_the_pause_with_files_and_modules_and_a_failure_rolls_back(tree):
    tree.write("mod.py", "def f():\n    return 1\n")
    mod = tree.load("mod")
    template = tree.write("page.html", "v2")
    seen, undone = [], []

    def record(reload):
        seen.append((reload.modules, reload.files, mod.f(), reload.changed(), reload.changed((".css",))))

    flydeploy.on_reload(record)
    try:
        tree.write("mod.py", "def f():\n    return 2\n")
        report = tree.reload("mod", files=[template])
        assert report.ok, report.error
        assert seen == [((tree.name("mod"),), frozenset({str(template)}), 2, True, False)]
    finally:
        flydeploy.on_reload(record, remove=True)

    @flydeploy.on_reload
    def fail(reload):
        reload.on_rollback(lambda: undone.append(mod.f()))
        raise RuntimeError("cache refused")

    try:
        tree.write("mod.py", "def f():\n    return 3\n")
        report = tree.reload("mod")
    finally:
        flydeploy.on_reload(fail, remove=True)
    assert not report.ok and report.rolled_back
    assert "on_reload callback" in report.error and "cache refused" in report.error
    assert mod.f() == 2 and undone == [3]  # undone before the code went back


def test_on_reload_needs_a_callable():
    with pytest.raises(flydeploy.FlyDeployError, match="on_reload"):
        flydeploy.on_reload("not a function")


def test_the_files_a_process_is_told_changed_come_from_the_installed_release():
    installed = {"/app/views.py": "b1", "/app/templates/page.html": "b2", "/app/static/site.css": "b3"}
    assert sorted(flydeploy._changed_files(None, installed)) == sorted(installed)  # held nothing known
    held = {"/app/views.py": "b1", "/app/templates/page.html": "a2", "/app/static/site.css": "b3"}
    assert flydeploy._changed_files(held, installed) == ["/app/templates/page.html"]
    assert flydeploy._changed_files({**held, "/app/templates/page.html": "b2"}, installed) == []
    assert flydeploy._changed_files(held, None) is None  # a state file without the list


# --- Jinja2 -------------------------------------------------------------------


def test_a_changed_template_alone_is_rendered_anew_by_a_plain_jinja2_environment(tree):
    page = tree.write("templates/page.html", "<p>{{ word }} one</p>")
    tree.write("render.py", f"""\
        import jinja2
        ENV = jinja2.Environment(loader=jinja2.FileSystemLoader({str(page.parent)!r}), auto_reload=False)

        def render():
            return ENV.get_template("page.html").render(word="page")
        """)
    render = tree.load("render")
    assert render.render() == "<p>page one</p>"
    page.write_text("<p>{{ word }} two</p>")
    assert render.render() == "<p>page one</p>"  # what Jinja2 alone does outside debug mode
    assert flydeploy.reload_modules([], files=[]).suspend_ms == 0.0  # nothing changed: no pause
    assert render.render() == "<p>page one</p>"
    report = flydeploy.reload_modules([], files=[page])
    assert report.ok and report.modules == []
    assert render.render() == "<p>page two</p>"


FLASK_FILTERS = """\
    from flask import Flask, render_template_string

    app = Flask(__name__)


    @app.template_filter("shout")
    def shout(text):
        return text.upper() + "!"


    @app.route("/")
    def index():
        return render_template_string("{{ 'hi' | shout }}")
    """


def test_flask_template_filters_and_error_handlers_as_a_cold_start_registers_them(tree):
    pytest.importorskip("flask")
    tree.write("site.py", FLASK_FILTERS)
    site = tree.load("site")
    client = site.app.test_client()
    assert client.get("/").data == b"HI!"
    assert client.get("/nope").status_code == 404
    tree.write("site.py", FLASK_FILTERS.replace('@app.template_filter("shout")', '@app.template_filter("loud")')
               .replace("'hi' | shout", "'hi' | loud") + """

    @app.errorhandler(404)
    def missing(error):
        return "nothing at " + error.description[:7], 404
    """)
    assert tree.reload("site").ok
    assert client.get("/").data == b"HI!" and client.get("/nope").data == b"nothing at The req"
    assert "shout" not in site.app.jinja_env.filters and site.app.jinja_env.filters["loud"] is site.shout


BLUEPRINT_APP = """\
    from flask import Blueprint, Flask

    bp = Blueprint("pages", __name__)


    @bp.route("/")
    def index():
        return "index"


    app = Flask(__name__)
    app.register_blueprint(bp)
    """


def test_a_new_route_on_a_registered_flask_blueprint_is_refused_with_what_to_do(tree):
    pytest.importorskip("flask")
    tree.write("site.py", BLUEPRINT_APP)
    site = tree.load("site")
    client = site.app.test_client()
    tree.write("site.py", BLUEPRINT_APP.replace('return "index"', 'return "new index"'))
    assert tree.reload("site").ok and client.get("/").data == b"new index"  # view code alone
    tree.write("site.py", BLUEPRINT_APP.replace(
        "\n\n    app = Flask", '\n\n    @bp.route("/about")\n    def about():\n        return "about"\n\n\n    app = Flask'))
    report = tree.reload("site")
    assert not report.ok and report.rolled_back
    assert "cold deploy required: the new code calls route() on Flask blueprint 'pages'" in report.error
    assert client.get("/").data == b"new index" and client.get("/about").status_code == 404


# --- FastAPI ------------------------------------------------------------------

FASTAPI_APP = """\
    from fastapi import Depends, FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()


    def name():
        return "real"


    @app.get("/")
    def index(who: str = Depends(name)):
        return {"who": who}


    @app.get("/old")
    def old():
        return {"old": True}


    @app.get("/moved")
    def moved():
        return {"moved": True}
    """


def test_fastapi_routes_handlers_and_overrides_as_a_cold_start_builds_them(tree):
    pytest.importorskip("fastapi")
    tree.write("api.py", FASTAPI_APP)
    api = tree.load("api")
    app = api.app
    assert asgi_get(app, "/old") == (200, b'{"old":true}')
    assert asgi_get(app, "/openapi.json")[0] == 200
    tree.write("api.py", FASTAPI_APP.replace(
        '@app.get("/old")\n    def old():\n        return {"old": True}\n', "").replace(
        '@app.get("/moved")', '@app.get("/moved-here")') + """

    @app.get("/new")
    def new():
        return {"new": True}


    def fake_name():
        return "fake"


    app.dependency_overrides[name] = fake_name


    class Tagged:
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            async def tagged(message):
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-tag", b"new")]
                await send(message)
            await self.app(scope, receive, tagged)


    app.add_middleware(Tagged)


    @app.exception_handler(404)
    async def not_found(request, exc):
        return JSONResponse({"missing": request.url.path}, status_code=404)
    """)
    report = tree.reload("api")
    assert report.ok, report.error
    assert api.app is app
    assert asgi_get(app, "/old") == (404, b'{"missing":"/old"}')
    assert asgi_get(app, "/moved") == (404, b'{"missing":"/moved"}')
    assert asgi_get(app, "/moved-here") == (200, b'{"moved":true}')
    assert asgi_get(app, "/new") == (200, b'{"new":true}')
    assert asgi_get(app, "/") == (200, b'{"who":"fake"}')
    assert (b"x-tag", b"new") in asgi_start(app, "/")["headers"]
    paths = json.loads(asgi_get(app, "/openapi.json")[1])["paths"]
    assert sorted(paths) == ["/", "/moved-here", "/new"]

    tree.write("api.py", FASTAPI_APP)  # back to the first version: the override goes too
    assert tree.reload("api").ok
    assert asgi_get(app, "/") == (200, b'{"who":"real"}')
    assert asgi_get(app, "/new")[0] == 404 and asgi_get(app, "/old") == (200, b'{"old":true}')


def test_a_failed_upgrade_puts_the_routes_back(tree):
    pytest.importorskip("fastapi")
    tree.write("api.py", FASTAPI_APP)
    api = tree.load("api")
    tree.write("api.py", FASTAPI_APP.replace('@app.get("/old")', '@app.get("/older")')
               + "\n    raise RuntimeError('boom')\n")
    report = tree.reload("api")
    assert not report.ok and report.rolled_back
    assert asgi_get(api.app, "/old") == (200, b'{"old":true}')
    assert asgi_get(api.app, "/older")[0] == 404


# --- SQLAlchemy ---------------------------------------------------------------

MODELS = """\
    from sqlalchemy import ForeignKey, Integer, String
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

    NAME_LENGTH = 80


    class Base(DeclarativeBase):
        pass


    class User(Base):
        __tablename__ = "users"
        id: Mapped[int] = mapped_column(Integer, primary_key=True)
        name: Mapped[str] = mapped_column(String(NAME_LENGTH))
        posts = relationship("Post", back_populates="author")

        def greeting(self):
            return "hello " + self.name


    class Post(Base):
        __tablename__ = "posts"
        id: Mapped[int] = mapped_column(primary_key=True)
        author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
        author = relationship("User", back_populates="posts")
    """


@pytest.mark.parametrize("edit, refusal", [
    (("NAME_LENGTH = 80", "NAME_LENGTH = 120"), "User attribute 'name' changed"),
    (("        def greeting", "        email: Mapped[str] = mapped_column(String(40))\n\n        def greeting"),
     r"User columns changed \(added \['email'\], removed \[\]\)"),
    (('        posts = relationship("Post", back_populates="author")\n', ""),
     r"User columns changed \(added \[\], removed \['posts'\]\)"),
    (("class User(Base):", "class User(Base, dict):"), "User changed its bases or metaclass"),
    (('__tablename__ = "users"', '__tablename__ = "people"'), "User changed __tablename__"),
    (('back_populates="author")\n', 'back_populates="author", lazy="joined")\n'), "User attribute 'posts' changed"),
])
def test_a_changed_table_is_refused_with_what_to_do(tree, edit, refusal):
    pytest.importorskip("sqlalchemy")
    tree.write("models.py", MODELS)
    models = tree.load("models")
    user = models.User
    tree.write("models.py", MODELS.replace(*edit))
    report = tree.reload("models")
    assert not report.ok
    assert "cold deploy required: SQLAlchemy model" in report.error
    assert "migrate the database if its table changed, then cold deploy (`fly deploy`)" in report.error
    assert __import__("re").search(refusal, report.error), report.error
    assert models.User is user and models.User(name="x").greeting() == "hello x"


def test_model_statements_run_again_keep_the_mapped_class(tree):
    pytest.importorskip("sqlalchemy")
    tree.write("models.py", MODELS)
    models = tree.load("models")
    user, table = models.User, models.User.__table__
    # A new import line binds every name it imports again: each column statement reading one runs again.
    tree.write("models.py", MODELS.replace("import ForeignKey, Integer, String", "import ForeignKey, Integer, String, func")
               .replace("mapped_column, relationship", "mapped_column, relationship, Session")
               .replace('"hello "', '"hi "').replace("NAME_LENGTH = 80", "NAME_LENGTH = 40 * 2"))
    report = tree.reload("models")
    assert report.ok, report.error
    assert models.User is user and user.__table__ is table and list(table.c.keys()) == ["id", "name"]
    assert models.User(name="x").greeting() == "hi x"
    assert models.Post.author.property.mapper.class_ is user


# --- Django -------------------------------------------------------------------

DJANGO_MANIFEST = """\
    import json, pathlib, sys
    import django
    from django.conf import settings
    root = pathlib.Path(sys.argv[1])
    settings.configure(STATIC_ROOT=str(root), STATIC_URL="/static/", STORAGES={
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"}})
    django.setup()
    import flydeploy
    from django.contrib.staticfiles.storage import staticfiles_storage
    manifest = root / "staticfiles.json"
    def write(hashed):
        manifest.write_text(json.dumps({"paths": {"app.css": hashed}, "version": "1.1"}))
    write("app.1111.css")
    before = staticfiles_storage.url("app.css")
    write("app.2222.css")
    unrelated = flydeploy.reload_modules([], files=[str(root / "other.txt")])
    kept = staticfiles_storage.url("app.css")
    report = flydeploy.reload_modules([], files=[str(manifest)])
    print(json.dumps([before, kept, staticfiles_storage.url("app.css"), unrelated.ok, report.ok]))
    """


def test_django_hashed_static_manifest_is_read_again(tmp_path):
    pytest.importorskip("django")
    script = tmp_path / "manifest.py"
    script.write_text(textwrap.dedent(DJANGO_MANIFEST))
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(flydeploy.__file__).rpartition("/")[0], "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["/static/app.1111.css", "/static/app.1111.css", "/static/app.2222.css",
                                      True, True]


# --- config classes and edited imports -----------------------------------------

FLASK_APP = """\
    from flask import Flask

    app = Flask(__name__)
    app.config["GREETING"] = "hello"


    @app.route("/")
    def index():
        return app.config["GREETING"]
    """


def test_an_edited_import_line_keeps_the_flask_app(tree):
    pytest.importorskip("flask")
    tree.write("site.py", FLASK_APP)
    site = tree.load("site")
    app = site.app
    tree.write("site.py", FLASK_APP.replace("from flask import Flask", "from flask import Flask, request")
               .replace('app.config["GREETING"] = "hello"', 'app.config["GREETING"] = "hello"\n    app.config["NEW"] = 1'))
    assert tree.reload("site").ok
    assert site.app is app and app.config.get("NEW") == 1


def test_config_read_from_a_changed_class_is_read_again(tree):
    tree.write("config.py", "class Config:\n    NAME = 'a'\n")
    tree.write("site.py", "from .config import Config\nSETTINGS = {}\nSETTINGS.update(vars(Config))\n")
    site = tree.load("site")
    tree.write("config.py", "class Config:\n    NAME = 'a'\n    MAIL = 'b'\n")
    assert tree.reload("config", "site").ok
    assert site.SETTINGS.get("MAIL") == "b"


FLASK_CONFIG_APP = """\
    from flask import Flask
    from .config import Config

    app = Flask(__name__)
    app.config.from_object(Config)
    {edit}

    @app.route("/")
    def index():
        return {body}
    """


def test_flask_config_read_from_a_changed_class_serves_what_a_cold_start_serves(tree):
    """Microblog v0.12 -> v0.13: the config class gains a setting that new view code reads on every request;
    ``app.config.from_object(Config)`` runs again with what reads the config after it, and the app and what
    was registered on it stay."""
    pytest.importorskip("flask")
    tree.write("config.py", "class Config:\n    GREETING = 'hello'\n")
    tree.write("site.py", FLASK_CONFIG_APP.format(edit="LOUD = app.config['GREETING'].upper()", body="LOUD"))
    site = tree.load("site")
    app, client = site.app, site.app.test_client()
    assert client.get("/").text == "HELLO"
    tree.write("config.py", "class Config:\n    GREETING = 'hello'\n    LANGUAGES = ['en', 'es']\n")
    tree.write("site.py", FLASK_CONFIG_APP.format(edit="LOUD = app.config['GREETING'].upper()",
                                                  body="LOUD + ' ' + ','.join(app.config['LANGUAGES'])"))
    assert tree.reload("config", "site").ok
    assert site.app is app
    assert (client.get("/").status_code, client.get("/").text) == (200, "HELLO en,es")
    tree.write("config.py", "class Config:\n    GREETING = 'hi'\n    LANGUAGES = ['en', 'es']\n")
    assert tree.reload("config").ok
    assert client.get("/").text == "HI en,es"  # what read the config ran again after it


# --- requests of a WSGI app while the module bodies run -------------------------------

class Framework(NamedTuple):
    run: Callable[[str], Any]  # a scenario of tests/gated_requests.py -> what it saw
    busy: str  # what an upgrade that timed out waiting for the requests under way says was busy


@pytest.fixture(params=["flask", "django"])
def framework(request, tree, tmp_path) -> Framework:
    """A Flask app in this process, or a Django app (served by its ``WSGIHandler``) in a process of its own."""
    pytest.importorskip(request.param)
    if request.param == "flask":
        return Framework(lambda scenario: getattr(gated_requests, scenario)(gated_requests.flask_app(tree)),
                         "requests under way in Flask app")

    def in_django(scenario: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "tests.gated_requests", str(tmp_path / "django"), scenario],
                             capture_output=True, text=True, timeout=60, env={
                                 "PYTHONPATH": str(flydeploy.__file__).rpartition("/")[0], "PATH": "/usr/bin:/bin"})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return Framework(in_django, "requests under way in Django's WSGI handler")


def test_a_request_arriving_while_the_module_bodies_run_waits_for_the_whole_new_code(framework):
    """Microblog v0.12 -> v0.13 under load: a request served between two statements of a new module body saw
    part of the new code (a login manager made anew, its user loader not registered again yet) and failed."""
    seen = framework.run("arriving_while_the_bodies_run")
    assert seen["ok"], seen["error"]
    assert seen["first"] == "old" and seen["answers"] == ["new"]


def test_an_upgrade_swaps_once_the_requests_under_way_are_finished(framework):
    seen = framework.run("under_way_when_the_upgrade_starts")
    assert seen["ok"], seen["error"]
    assert not seen["swapped_first"]
    assert seen["answers"] == ["old"] and seen["after"] == "new"


def test_a_flask_request_under_way_that_calls_a_server_is_finished_before_the_servers_are_held(tree):
    """A view that talks to a server is the usual case: the requests under way are waited for before the
    pause holds the servers, or such a request would wait for a held server and the upgrade for it."""
    pytest.importorskip("flask")
    site = gated_requests.flask_app(tree)
    hooks = site.hooks

    class Echo(flydeploy.Server):
        def handle_call(self, request, state):
            return request, state

    echo = Echo.start()
    try:
        site.wsgi.add_url_rule("/echo", "echo", lambda: hooks.in_view.set() or hooks.leave_view.wait(10)
                               and echo.call("echoed", timeout=10))
        client = site.wsgi.test_client()
        answers, reports = [], []
        request = threading.Thread(target=lambda: answers.append(client.get("/echo").text))
        request.start()
        assert hooks.in_view.wait(10)
        site.write("WORD = 'new'")
        upgrade = threading.Thread(target=lambda: reports.append(site.reload(suspend_timeout=3)))
        upgrade.start()
        wait_until(lambda: gated_requests.stack_runs(upgrade, flydeploy._requests_held.__wrapped__.__code__),
                   "the upgrade to wait for the request under way")
        hooks.leave_view.set()
        request.join(10)
        upgrade.join(10)
        assert answers == ["echoed"]
        assert reports[0].ok, reports[0].error
        assert client.get("/").text == "new"
    finally:
        echo.stop()


def test_the_requests_under_way_and_the_pause_share_one_deadline(tree):
    """``suspend_timeout`` bounds the whole stall: waiting for the requests under way spends it, and the
    pause that follows has only what is left, not a deadline of its own."""
    pytest.importorskip("flask")
    site = gated_requests.flask_app(tree)
    hooks = site.hooks

    class Busy(flydeploy.Server):
        def handle_cast(self, message, state):
            message.wait(30)  # no safe point until the test lets it go
            return state

    busy, free = Busy.start(name="busy"), threading.Event()
    try:
        busy.cast(free)
        site.wsgi.add_url_rule("/slow", "slow", lambda: hooks.in_view.set() or hooks.leave_view.wait(10) and "slow")
        client = site.wsgi.test_client()
        request = threading.Thread(target=lambda: client.get("/slow"))
        request.start()
        assert hooks.in_view.wait(10)
        site.write("WORD = 'new'")
        reports: list = []
        began = time.monotonic()
        upgrade = threading.Thread(target=lambda: reports.append(site.reload(suspend_timeout=2.0)))
        upgrade.start()
        wait_until(lambda: gated_requests.stack_runs(upgrade, flydeploy._requests_held.__wrapped__.__code__),
                   "the upgrade to wait for the request under way")
        # The request under way takes 1.2 s of the 2 s; the server is busy until 2.8 s: past the
        # deadline, though within 2 s of the pause's start.
        wait_until(lambda: time.monotonic() - began >= 1.2, "1.2 s into the upgrade")
        hooks.leave_view.set()
        request.join(10)
        wait_until(lambda: time.monotonic() - began >= 2.8 or not upgrade.is_alive(), "2.8 s into the upgrade")
        free.set()
        upgrade.join(10)
        assert not reports[0].ok and "busy" in reports[0].servers_failed, reports[0]
        assert client.get("/").text == "old"
    finally:
        free.set()
        busy.stop()


def test_requests_still_under_way_at_the_deadline_leave_everything_as_it_was(framework):
    seen = framework.run("under_way_at_the_deadline")
    assert not seen["ok"] and not seen["body_ran"]
    assert framework.busy in seen["error"] and "nothing changed" in seen["error"]
    assert seen["answers"] == ["old"] and seen["after"] == "old"


def test_an_upgrade_started_by_a_request_does_not_wait_for_that_request(framework):
    steps = framework.run("started_by_a_request")
    assert [step["word"] for step in steps] == ["new", "newer"]
    for step in steps:
        assert step["ok"], step["error"]
        assert step["after"] == step["word"] and step["gated"]
