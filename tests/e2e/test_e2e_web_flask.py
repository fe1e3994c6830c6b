"""Flask (gunicorn, 2 preloaded sync workers) under load: after each hot upgrade, every worker serves
what a cold start of the same code serves: templates, routes, error handlers, static files, and a
module of SQLAlchemy models upgraded in place."""

from __future__ import annotations

from tests.e2e import examples
from tests.e2e.web_steps import (HOME_HTML, NOT_FOUND_HTML, Replay, Step, check, edited,
                                    models_step, run_steps, template_step)

HOW = Replay("python3 -m gunicorn --bind 127.0.0.1:{port} --workers 2 --preload wsgi:app",
             ready="Booting worker", workers=2)
PATHS = ["/", "/old", "/new", "/missing", "/static/style.css"]


def steps() -> list[Step]:
    files = examples.app_files("blog")
    blog = files["blog.py"]
    result = [template_step(files, "<h1>Posts</h1>", "<h1>All posts</h1>")]
    blog = edited(blog, ('render_template("index.html", posts=', 'render_template("home.html", items='))
    result.append(Step("template added, used by new view code", {"templates/home.html": HOME_HTML, "blog.py": blog}))
    blog = edited(blog, ('\n\n@app.route("/old")\ndef old():\n    return "an old page"\n', "\n"))
    result.append(Step("route removed", {"blog.py": blog}))
    blog += '\n\n@app.route("/new")\ndef new():\n    return render_template("home.html", items=[])\n'
    result.append(Step("route added", {"blog.py": blog}))
    blog += ('\n\n@app.errorhandler(404)\ndef not_found(error):\n'
             '    return render_template("404.html"), 404\n')
    result.append(Step("error handler added", {"blog.py": blog, "templates/404.html": NOT_FOUND_HTML}))
    result.append(Step("static file changed", {"static/style.css": "body { font-family: serif; }\n"}))
    result.append(models_step(files, "from sqlalchemy import Integer, String, create_engine, select", "Post"))
    return result


def test_flask_app_serves_what_a_cold_start_serves_after_each_hot_upgrade():
    outcomes, failed = run_steps("blog", HOW, steps(), PATHS)
    check(outcomes, failed, steps())
