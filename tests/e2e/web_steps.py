"""Hot upgrades of a web app compared with cold starts of the same code, step by step.

One process (or gunicorn master and workers) runs under HTTP load while a
series of edits is applied to its tree, each as ``hot --local``.  After each
step every page of ``paths`` is fetched from every worker of the hot process
and from a fresh process cold-started on a copy of the same files; status,
content type and body must match.  A step's outcome is ``pass``, ``refused:
<reason>`` (the upgrade said no and the process kept its code) or ``fail:
<what differed>``.  Responses carry their worker's pid in an ``X-Pid`` header
(None for a single process), so pages are checked on each worker.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import urllib.error
import urllib.request

from tests.e2e import examples
from tests.e2e.load import HttpLoad
from tests.machine_apps import wait_for

# What a copy for a cold start leaves out: the local release store, bytecode.
_NOT_COPIED = (".flydeploy", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Step:
    """One edit: the files it writes (relative path -> text)."""

    name: str
    files: dict[str, str]


@dataclasses.dataclass(frozen=True)
class Page:
    status: int
    content_type: str
    body: bytes


def fetch(url: str) -> tuple[str | None, Page]:
    """``GET url`` on a fresh connection: the answering worker's pid and the page."""
    try:
        response = urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as error:
        response = error
    with response:
        body = response.read()
        return response.headers.get("X-Pid"), Page(response.status, response.headers.get("Content-Type", ""), body)


def worker_pids(url: str, workers: int) -> set[str | None]:
    """Ask ``url`` until ``workers`` different workers answered; their pids."""
    seen: set[str | None] = set()

    def enough() -> bool:
        seen.add(fetch(url)[0])
        return len(seen) >= workers
    wait_for(enough, timeout=30, what=f"{workers} workers to answer {url}")
    return seen


def pages_by_worker(base: str, paths: list[str], pids: set[str | None]) -> dict[str, dict[str | None, Page]]:
    """Every page of ``paths`` as each worker in ``pids`` serves it."""
    pages: dict[str, dict[str | None, Page]] = {}
    for path in paths:
        found: dict[str | None, Page] = {}

        def all_answered() -> bool:
            pid, page = fetch(base + path)
            found.setdefault(pid, page)
            return pids <= found.keys()
        wait_for(all_answered, timeout=30, what=f"every worker to answer {path}")
        pages[path] = found
    return pages


def tree_files(root: pathlib.Path) -> dict[str, str]:
    return {str(path.relative_to(root)): path.read_text() for path in sorted(root.rglob("*"))
            if path.is_file() and not set(path.relative_to(root).parts) & set(_NOT_COPIED)}


def differences(hot: dict[str, dict[str | None, Page]], cold: dict[str, Page]) -> list[str]:
    """What the hot workers serve that the cold start does not."""
    found = []
    for path, by_worker in hot.items():
        for pid, page in by_worker.items():
            if page != cold[path]:
                at = next((i for i, (a, b) in enumerate(zip(page.body, cold[path].body)) if a != b),
                          min(len(page.body), len(cold[path].body)))
                start = max(0, at - 20)
                found.append(f"{path} (worker {pid}): hot {page.status} ...{page.body[start:at + 40]!r}, "
                             f"cold {cold[path].status} ...{cold[path].body[start:at + 40]!r}")
    return found


def run_steps(name: str, command: str, steps: list[Step], paths: list[str], *, ready: str,
              workers: int = 1) -> tuple[list[tuple[str, str]], list]:
    """Run example app ``name`` under load and apply ``steps`` as hot upgrades; returns each step's
    ``(name, outcome)`` and the load's failed requests (on ``/version`` and ``/``)."""
    hot = examples.LocalApp(name, f"{name}-hot", command=command, ready=ready)
    outcomes: list[tuple[str, str]] = []
    loads: list[HttpLoad] = []
    try:
        hot.start()
        pids = worker_pids(hot.url + "/version", workers)
        pages_by_worker(hot.url, paths, pids)  # every worker has served (and cached) every page
        loads = [HttpLoad([hot.url], path=path, threads=2, interval=0.02).start() for path in ("/version", "/")]
        for number, step in enumerate(steps, 1):
            for relative, text in step.files.items():
                (hot.root / relative).parent.mkdir(parents=True, exist_ok=True)
                (hot.root / relative).write_text(text)
            result = hot.cli("hot", "--version", f"step{number}")
            if result.returncode != 0:
                reason = re.findall(r"^✗ .*$", result.stdout, re.M) or [result.stdout + result.stderr]
                outcomes.append((step.name, f"refused: {reason[-1].strip()}"))
                continue
            cold = examples.LocalApp(name, f"{name}-cold", command=command, ready=ready,
                                     files=tree_files(hot.root))
            try:
                cold.start()
                worker_pids(cold.url + "/version", workers)
                expected = {path: fetch(cold.url + path)[1] for path in paths}
            finally:
                cold.close()
            found = differences(pages_by_worker(hot.url, paths, pids), expected)
            outcomes.append((step.name, "pass" if not found else "fail: " + "; ".join(found)))
    finally:
        failed = [request for load in loads for request in load.stop() if not request.ok]
        hot.close()
    return outcomes, failed


def edited(text: str, *replacements: tuple[str, str]) -> str:
    """``text`` with each ``(old, new)`` replaced once; an ``old`` not found is a broken test."""
    for old, new in replacements:
        if old not in text:
            raise AssertionError(f"the edit expects {old[:60]!r} in the file")
        text = text.replace(old, new, 1)
    return text


# The template the new view code of the second step renders, and the page of the error handler.
HOME_HTML = '{% extends "base.html" %}\n{% block body %}<h1>Home</h1>\n<p>{{ items|length }} items</p>{% endblock %}\n'
NOT_FOUND_HTML = '{% extends "base.html" %}{% block body %}No such page{% endblock %}\n'


def template_step(files: dict[str, str], old: str, new: str) -> Step:
    """The first step of each app: its ``templates/index.html`` edited."""
    return Step("changed template", {"templates/index.html": edited(files["templates/index.html"], (old, new))})


def models_step(files: dict[str, str], imported: str, model: str) -> Step:
    """A change in the models module that leaves the models as they are: one more name imported
    (which every column statement reads again) and a function that uses it."""
    text = edited(files["models.py"], (imported, imported.replace(", select", ", func, select")))
    text += f"\n\ndef count_query():\n    return select(func.count()).select_from({model})\n"
    return Step("model-unrelated change in the models module", {"models.py": text})


def check(outcomes: list[tuple[str, str]], failed: list, steps: list[Step]) -> None:
    """Every step passed and no request under load failed."""
    assert outcomes == [(step.name, "pass") for step in steps], "\n".join(f"{n}: {o}" for n, o in outcomes)
    assert not failed, f"{len(failed)} requests under load failed: {failed[:3]}"
