"""Starlette under uvicorn, under load: after each hot upgrade the app serves what a cold start of
the same code serves.  Routes come from a ``routes`` list, so removing or adding one runs
``app = Starlette(routes=routes, ...)`` again: the live app, which uvicorn holds, takes the new
routes and exception handlers."""

from __future__ import annotations

from tests.e2e import examples
from tests.e2e.web_steps import (HOME_HTML, NOT_FOUND_HTML, Replay, Step, check, edited,
                                    models_step, run_steps, template_step)

HOW = Replay("python3 main.py", ready="ready")
PATHS = ["/", "/old", "/new", "/missing", "/static/style.css"]


def steps() -> list[Step]:
    files = examples.app_files("notes")
    notes = files["notes.py"]
    result = [template_step(files, "<h1>Notes</h1>", "<h1>All notes</h1>")]
    notes = edited(notes, ('TemplateResponse(request, "index.html", {"notes"', 'TemplateResponse(request, "home.html", {"items"'))
    result.append(Step("template added, used by new view code", {"templates/home.html": HOME_HTML, "notes.py": notes}))
    notes = edited(notes, ('\n\nasync def old(request):\n    return PlainTextResponse("an old page")\n', ""),
                   ('    Route("/old", old),\n', ""))
    result.append(Step("route removed", {"notes.py": notes}))
    notes = edited(notes, ("\n\nroutes = [", '\n\nasync def new(request):\n'
                           '    return templates.TemplateResponse(request, "home.html", {"items": []})\n\n\nroutes = ['),
                   ('    Route("/", index),\n', '    Route("/", index),\n    Route("/new", new),\n'))
    result.append(Step("route added", {"notes.py": notes}))
    notes = edited(notes, ("\n\nroutes = [", '\n\nasync def not_found(request, exc):\n'
                           '    return templates.TemplateResponse(request, "404.html", status_code=404)\n\n\nroutes = ['),
                   ("app = Starlette(routes=routes, lifespan=lifespan)",
                    "app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found})"))
    result.append(Step("error handler added", {"notes.py": notes, "templates/404.html": NOT_FOUND_HTML}))
    result.append(Step("static file changed", {"static/style.css": "body { color: navy; }\n"}))
    result.append(models_step(files, "from sqlalchemy import Column, Integer, String, create_engine, select", "Note"))
    return result


def test_starlette_app_serves_what_a_cold_start_serves_after_each_hot_upgrade():
    outcomes, failed = run_steps("notes", HOW, steps(), PATHS)
    check(outcomes, failed, steps())
