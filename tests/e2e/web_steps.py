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
from collections.abc import Callable

from tests.e2e import examples
from tests.e2e.load import HttpLoad
from tests.machine_apps import wait_for

# What a copy for a cold start leaves out: the local release store, bytecode.
_NOT_COPIED = (".flydeploy", "__pycache__")


@dataclasses.dataclass(frozen=True)
class Step:
    """One edit: the files it writes (relative path -> text)."""

    name: str
    files: dict[str, str | bytes | None]  # None: the file is deleted


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
            return pids <= found.keys() or not found.keys() <= pids  # or an answer from no known worker
        wait_for(all_answered, timeout=30, what=f"every worker to answer {path}")
        pages[path] = found
    return pages


def tree_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*"))
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


@dataclasses.dataclass(frozen=True)
class Replay:
    """How to run an app for ``run_steps``.

    ``files`` are its first version (default: the example app's own);
    ``prepare(app)`` runs before an app starts and before each hot upgrade
    (environment, database migrations, as a release command would);
    ``normalize`` blanks what differs between any two processes (a CSRF
    token); ``load_paths`` are requested under load, answering one of
    ``ok_statuses``; ``probe`` answers every request with the worker's pid.
    """

    command: str
    ready: str
    workers: int = 1
    files: dict[str, str | bytes] | None = None
    prepare: Callable[[examples.LocalApp], None] | None = None
    normalize: Callable[[bytes], bytes] | None = None
    load_paths: tuple[str, ...] = ("/version", "/")
    ok_statuses: tuple[int, ...] = (200,)
    probe: str = "/version"


def run_steps(name: str, how: Replay, steps: list[Step], paths: list[str]) -> tuple[list[tuple[str, str]], list]:
    """Run app ``name`` under load and apply ``steps`` as hot upgrades; returns each step's
    ``(name, outcome)`` and the requests that failed under load.  After a refused step the app is
    restarted on that step's files (a cold deploy), without load while it restarts."""
    hot = examples.LocalApp(name, f"{name}-hot", command=how.command, ready=how.ready, files=how.files)
    outcomes: list[tuple[str, str]] = []
    loads: list[HttpLoad] = []
    failed: list = []

    def pages(app: examples.LocalApp, pids: set[str | None]) -> dict[str, dict[str | None, Page]]:
        found = pages_by_worker(app.url, paths, pids)
        if how.normalize is not None:
            found = {path: {pid: dataclasses.replace(page, body=how.normalize(page.body))
                            for pid, page in by_worker.items()} for path, by_worker in found.items()}
        return found

    def boot() -> set[str | None]:
        """Start (again) the hot app and its load; returns its workers' pids."""
        hot.start()
        pids = worker_pids(hot.url + how.probe, how.workers)
        pages(hot, pids)  # every worker has served (and cached) every page
        loads.extend(HttpLoad([hot.url], path=path, threads=2, interval=0.02, ok_statuses=how.ok_statuses).start()
                     for path in how.load_paths)
        return pids

    def failures() -> int:
        return len(failed) + sum(not request.ok for load in loads for request in load.snapshot())

    def compare(hot: examples.LocalApp, pids: set[str | None]) -> str:
        """``pass``, or ``fail: <what the hot workers serve that a cold start does not>``."""
        cold = examples.LocalApp(name, f"{name}-cold", command=how.command, ready=how.ready,
                                 files=tree_files(hot.root))
        try:
            if how.prepare is not None:
                how.prepare(cold)
            cold.start()
            expected = pages(cold, worker_pids(cold.url + how.probe, how.workers))
        finally:
            cold.close()
        try:
            found = differences(pages(hot, pids), {path: next(iter(by_worker.values()))
                                                   for path, by_worker in expected.items()})
        except AssertionError as exc:  # a worker that no longer answers
            found = [str(exc)]
        return "pass" if not found else "fail: " + "; ".join(found)

    try:
        if how.prepare is not None:
            how.prepare(hot)
        pids = boot()
        for number, step in enumerate(steps, 1):
            for relative, content in step.files.items():
                path = hot.root / relative
                path.parent.mkdir(parents=True, exist_ok=True)
                if content is None:
                    path.unlink(missing_ok=True)
                elif isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)
            if how.prepare is not None:
                how.prepare(hot)
            failed_before = failures()
            result = hot.cli("hot", "--version", f"step{number}")
            if result.returncode != 0:
                reason = re.findall(r"^✗ .*$", result.stdout, re.M) or [result.stdout + result.stderr]
                # The first process's reason: the others' say the same.
                outcome = "refused: " + re.sub(r"; process \S+ failed: .*", "", reason[-1].strip())
            else:
                outcome = compare(hot, pids)
            if failures() > failed_before:
                outcome = (f"{'fail' if outcome == 'pass' else outcome}: "
                           f"{failures() - failed_before} requests failed under load")
            outcomes.append((step.name, outcome))
            if outcome != "pass":
                # A refusal asks for a cold deploy, and so does a failure: the next step starts
                # from this one's code, cold.
                failed.extend(request for load in loads for request in load.stop() if not request.ok)
                loads.clear()
                hot.stop()
                pids = boot()
    finally:
        failed.extend(request for load in loads for request in load.stop() if not request.ok)
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
