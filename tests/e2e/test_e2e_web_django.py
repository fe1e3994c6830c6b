"""Django (gunicorn, 2 sync workers) under load: after each hot upgrade every worker serves what a
cold start of the same code serves: templates through Django's cached loader, ``urls.py`` routes,
a ``handler404``, static files."""

from __future__ import annotations

from tests.e2e import examples
from tests.e2e.web_steps import (HOME_HTML, NOT_FOUND_HTML, Replay, Step, check, edited,
                                    run_steps, template_step)

HOW = Replay("python3 -m gunicorn --bind 127.0.0.1:{port} --workers 2 pages_project.wsgi",
             ready="Booting worker", workers=2)
PATHS = ["/", "/old", "/new", "/missing", "/static/style.css"]


def steps() -> list[Step]:
    files = examples.app_files("pages")
    views, urls = files["pages/views.py"], files["pages_project/urls.py"]
    result = [template_step(files, "<h1>Pages</h1>", "<h1>All pages</h1>")]
    views = edited(views, ('render(request, "index.html", {"pages"', 'render(request, "home.html", {"items"'))
    result.append(Step("template added, used by new view code", {"templates/home.html": HOME_HTML,
                                                                  "pages/views.py": views}))
    views = edited(views, ('\n\ndef old(request):\n    return HttpResponse("an old page")\n', ""))
    urls = edited(urls, ('    path("old", views.old),\n', ""))
    result.append(Step("route removed", {"pages/views.py": views, "pages_project/urls.py": urls}))
    views += '\n\ndef new(request):\n    return render(request, "home.html", {"items": []})\n'
    urls = edited(urls, ('    path("", views.index),\n', '    path("", views.index),\n    path("new", views.new),\n'))
    result.append(Step("route added", {"pages/views.py": views, "pages_project/urls.py": urls}))
    views += ('\n\ndef not_found(request, exception):\n'
              '    return render(request, "not_found.html", status=404)\n')
    urls += '\nhandler404 = "pages.views.not_found"\n'
    result.append(Step("error handler added", {"pages/views.py": views, "pages_project/urls.py": urls,
                                               "templates/not_found.html": NOT_FOUND_HTML}))
    result.append(Step("static file changed", {"static/style.css": "body { margin: 1em; }\n"}))
    return result


def test_django_app_serves_what_a_cold_start_serves_after_each_hot_upgrade():
    outcomes, failed = run_steps("pages", HOW, steps(), PATHS)
    check(outcomes, failed, steps())
