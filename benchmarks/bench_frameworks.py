"""What the web framework refreshes (section 4b) add to an upgrade's pause.

Prints one JSON line.  Two processes, each with a heap of a million objects,
a held ``Server`` and a module that every upgrade changes, plus a template
file that every upgrade changes (``files=``): one with a Flask app, a
Starlette app and a plain Jinja2 environment live (every template compiled
and cached), one with no framework imported, the baseline of the same run.

- ``suspend_ms`` / ``baseline_suspend_ms``: median of 7 upgrades, the
  longest the server was held;
- ``total_ms`` / ``baseline_total_ms``: the same upgrades, whole calls.

Goal on a 2-core machine: ``suspend_ms`` at most 1 ms above the baseline
(the live framework objects are found before the pause).
"""

import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
HEAP = 1_000_000
ROUNDS = 7

CHILD = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
import flydeploy
root = pathlib.Path(sys.argv[2])
flydeploy.track(root)
sys.path.insert(0, str(root))
page = root / "templates" / "page.html"
if sys.argv[3] == "frameworks":
    import flask, jinja2, starlette.applications
    flask_app = flask.Flask("bench", template_folder=str(page.parent))
    starlette_app = starlette.applications.Starlette()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(page.parent)))
    with flask_app.app_context():
        flask.render_template("page.html")
    env.get_template("page.html")
heap = [{"n": n} for n in range(int(sys.argv[4]))]

class Held(flydeploy.Server):
    def init(self):
        return 0

server = Held.start()
import changed
suspend, total = [], []
for version in range(int(sys.argv[5])):
    (root / "changed.py").write_text(f"def f():\\n    return {version}\\n")
    page.write_text(f"<p>{version}</p>")
    report = flydeploy.reload_modules(files=[page])
    assert report.ok, report.error
    suspend.append(report.suspend_ms)
    total.append(report.total_ms)
server.stop()
print(json.dumps({"suspend": suspend, "total": total}))
"""


def measure(mode: str) -> dict:
    with tempfile.TemporaryDirectory() as root:
        (pathlib.Path(root) / "templates").mkdir()
        (pathlib.Path(root) / "templates" / "page.html").write_text("<p>start</p>")
        (pathlib.Path(root) / "changed.py").write_text("def f():\n    return -1\n")
        out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), root, mode, str(HEAP), str(ROUNDS)],
                             capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    frameworks, baseline = measure("frameworks"), measure("baseline")
    print(json.dumps({
        "benchmark": "frameworks", "heap_objects": HEAP, "rounds": ROUNDS,
        "suspend_ms": round(statistics.median(frameworks["suspend"]), 3),
        "baseline_suspend_ms": round(statistics.median(baseline["suspend"]), 3),
        "total_ms": round(statistics.median(frameworks["total"]), 3),
        "baseline_total_ms": round(statistics.median(baseline["total"]), 3),
    }))


if __name__ == "__main__":
    main()
