"""Per-machine upgrades on real processes: `rpc upgrade`, hot_upgrade's file work, gunicorn, fork."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import sys

import pytest

import flydeploy
from tests.machine_apps import (COUNTER_PY, GREET_V1, GREET_V2, MAIN_PY, http_get_unix, make_release, parse_result,
                                wait_for, write_tree)

pytest_plugins = ["tests.machine_apps"]


COUNTER_V2 = COUNTER_PY.replace('LABEL = "count-v1"', 'LABEL = "count-v2"')


def test_two_processes_upgraded_with_state_kept(machine, tmp_path, seaweed, s3):
    machine.env.update(seaweed.env())
    machine.env["FLY_IMAGE_REF"] = f"registry.fly.io/shop:{tmp_path.name[-12:]}"
    machine.write_web_app()
    first, second = machine.start().wait_ready(), machine.start().wait_ready()
    for _ in range(3):
        first.get("/bump")
    second.get("/bump")
    assert first.get()["count"] == "count-v1:3" and second.get()["greeting"] == "hello v1"

    app_v2 = {"main.py": MAIN_PY, "counter.py": COUNTER_V2, "greet.py": GREET_V2}
    release, url = make_release(tmp_path, s3, app_v2, version=f"v2-{tmp_path.name[-8:]}")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url, "--sha256", release.sha256)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    result = parse_result(upgrade.stdout)
    assert result["success"] is True and result["status"] == "completed" and result["error"] is None
    assert result["processes_succeeded"] == 2 and result["processes_failed"] == 0
    assert sorted(result["module_names"]) == ["counter", "greet"] and result["modules_reloaded"] == 2
    assert result["files_written"] == 2 and result["files_unchanged"] == 1
    assert result["machine_id"] == machine.env["FLY_MACHINE_ID"] and result["region"] == "ams"
    assert result["version"] == release.manifest["version"]
    assert {p["pid"] for p in result["processes"]} == {first.pid, second.pid}

    # New code, old state, in both processes.
    assert first.get() | {"outcome": None, "info": None} == {
        "pid": first.pid, "greeting": "hello v2", "count": "count-v2:3", "outcome": None, "info": None}
    assert second.get()["count"] == "count-v2:1"
    assert first.get()["info"] == {"hot_upgrade_applied": True, "version": release.manifest["version"],
                                   "source_image_ref": None, "deployed_at": None,
                                   "current_image_ref": machine.env["FLY_IMAGE_REF"]}
    assert (machine.app_root / "greet.py").read_text() == GREET_V2

    assert result["upgrade_id"] == release.sha256  # without --upgrade-id, the sha256 names the upgrade
    stored, _ = s3.get_json(f"releases/shop-results/{result['upgrade_id']}/{result['machine_id']}.json")
    assert stored["success"] is True and stored["processes_succeeded"] == 2

    info = json.loads(machine.rpc("info", "--app", "shop").stdout)
    assert {entry["version"] for entry in info} == {release.manifest["version"]}
    assert all(entry["applied_at"] >= result["applied_at"][:10] for entry in info)
    assert {s["name"] for entry in info for s in entry["servers"]} == {"counter"}

    again = machine.rpc("upgrade", "--app", "shop", "--url", url, "--sha256", release.sha256)
    assert again.returncode == 0, again.stdout
    assert parse_result(again.stdout)["files_written"] == 0


def test_a_failing_process_fails_the_machine_and_is_named(machine, tmp_path, local_store):
    machine.write_web_app()
    machine.write({"extra.py": "VALUE = 1\n"})
    good = machine.start().wait_ready()
    bad = machine.start(env={"APP_EXTRA": "1"}).wait_ready()  # only this one loaded extra.py
    files = {"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2,
             "extra.py": "VALUE = 1\nraise RuntimeError('extra cannot start')\n"}
    _release, url = make_release(tmp_path, local_store, files, version="v2")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url)
    assert upgrade.returncode == 1, upgrade.stdout
    result = parse_result(upgrade.stdout)
    assert result["success"] is False and result["status"] == "failed"
    assert result["processes_succeeded"] == 1 and result["processes_failed"] == 1
    assert f"process main.py[{bad.pid}] failed" in result["error"] and "extra cannot start" in result["error"]
    assert f"[{good.pid}]" not in result["error"]
    assert good.get()["greeting"] == "hello v2"
    assert bad.get()["greeting"] == "hello v1"  # rolled back whole, still serving


WSGI_PY = '''\
import json, os
import flydeploy
flydeploy.startup_reapply_current()
import greet

def app(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "greeting": greet.greeting(),
                       "info": flydeploy.get_current_hot_upgrade_info()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_gunicorn_workers_upgraded_and_replacements_run_new_code(machine, tmp_path, local_store, preload):
    if not preload:
        del machine.env["FLY_IMAGE_REF"]  # local development: the app skips S3 and serves with its agent
    # With --preload the image ref is set, as on Fly: the boot check fails (no storage configured
    # here) and the app serves the image's code, and the state file must match its image.
    machine.write({"wsgi.py": WSGI_PY, "greet.py": GREET_V1})
    bind = machine.runtime / "http.sock"
    argv = [sys.executable, "-m", "gunicorn", "--workers", "2", "--bind", f"unix:{bind}",
            "--graceful-timeout", "5", *(["--preload"] if preload else []), "wsgi:app"]
    server = machine.start(argv)
    expected = 3 if preload else 2  # with --preload the master imported the app and runs an agent too

    def agents():
        result = machine.rpc("info", "--app", "shop")
        return result.returncode == 0 and {e["pid"] for e in json.loads(result.stdout)}

    def workers_seen(pids: set[int], greeting: str) -> bool:
        seen: dict[int, str] = {}
        def all_answered():
            reply = http_get_unix(str(bind))
            seen[reply["pid"]] = reply["greeting"]
            return pids <= set(seen)
        wait_for(all_answered, what=f"answers from workers {sorted(pids)}")
        return {seen[pid] for pid in pids} == {greeting}

    pids = wait_for(lambda: (found := agents()) and len(found) == expected and found,
                    what=f"{expected} gunicorn agents")
    workers = pids - {server.pid}
    assert workers_seen(workers, "hello v1")

    # wsgi.py changes too: its body, which calls startup_reapply_current, runs again in the reload.
    wsgi_v2 = WSGI_PY.replace('"greeting": greet.greeting()', '"greeting": greet.greeting(), "wsgi": 2')
    release, url = make_release(tmp_path, local_store, {"wsgi.py": wsgi_v2, "greet.py": GREET_V2}, version="v2")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    result = parse_result(upgrade.stdout)
    assert result["processes_succeeded"] == expected and result["module_names"] == ["greet", "wsgi"]
    assert workers_seen(workers, "hello v2")
    assert http_get_unix(str(bind))["wsgi"] == 2

    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    fresh = wait_for(lambda: (found := agents()) and victim not in found and len(found) == expected and found,
                     what="a replacement worker")
    [replacement] = fresh - pids
    assert workers_seen({replacement}, "hello v2")
    reply = wait_for(lambda: (r := http_get_unix(str(bind)))["pid"] == replacement and r,
                     what="an answer from the replacement")
    assert reply["info"]["hot_upgrade_applied"] is True and reply["info"]["version"] == "v2"


def test_forked_child_catches_up_from_the_state_file(machine, tmp_path, local_store):
    machine.env.pop("FLY_IMAGE_REF")
    machine.write_web_app()
    # The parent runs without an agent: nothing tells it to upgrade, only the state file does.
    parent = machine.start(env={"APP_STARTUP": json.dumps({"agent": False})})
    wait_for(lambda: parent.port_file.exists(), what="the app to listen")
    assert parent.get("/fork")["greeting"] == "hello v1"

    files = {"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2}
    _release, url = make_release(tmp_path, local_store, files, version="v2")
    # With no agent to say where the code lives, the app root comes from FLYDEPLOY_APP_ROOT.
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url, env={"FLYDEPLOY_APP_ROOT": str(machine.app_root)})
    assert upgrade.returncode == 1, upgrade.stdout  # no running process took the upgrade
    result = parse_result(upgrade.stdout)
    assert result["processes_succeeded"] == 0 and result["files_written"] == 1
    assert "no flydeploy agent of shop runs on this machine" in result["error"]

    assert parent.get()["greeting"] == "hello v1"
    child = parent.get("/fork")
    assert child["greeting"] == "hello v2"
    assert child["info"]["version"] == "v2"
    assert parent.get()["greeting"] == "hello v1"


def snapshot(root: pathlib.Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", ["hash mismatch", "corrupt tarball", "unreachable S3"])
def test_bad_release_writes_nothing(machine, tmp_path, local_store, fault):
    machine.write_web_app()
    process = machine.start().wait_ready() if fault == "hash mismatch" else None
    before = snapshot(machine.app_root)
    release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2}, version="v2")
    args = ["upgrade", "--app", "shop", "--url", url]
    env = {}
    if fault == "hash mismatch":
        args += ["--sha256", "0" * 64]
    elif fault == "corrupt tarball":
        data = bytearray(pathlib.Path(release.path).read_bytes())
        data[len(data) // 2] ^= 0xFF
        local_store.put(flydeploy.release_key("shop", "v2"), bytes(data))
    else:
        args[-1] = "http://127.0.0.1:9/bucket/releases/shop-v2.tar.gz"
        env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
               "BUCKET_NAME": "bucket"}
    upgrade = machine.rpc(*args, env=env)
    assert upgrade.returncode == 1, upgrade.stdout + upgrade.stderr
    result = parse_result(upgrade.stdout)
    assert result["success"] is False and result["status"] == "failed"
    expected = {"hash mismatch": "hash mismatch", "corrupt tarball": "damaged", "unreachable S3": "127.0.0.1:9"}[fault]
    assert expected in result["error"]
    assert snapshot(machine.app_root) == before  # nothing written, no temporary file left
    assert not (machine.socket_dir() / "state.json").exists()
    if process is not None:
        assert process.get()["greeting"] == "hello v1"


def test_members_go_where_the_code_was_loaded_from(machine, tmp_path, local_store):
    """An app in /code with its package installed in site-packages: each file lands where it is loaded from."""
    site = tmp_path / "venv" / "lib" / "site-packages"
    write_tree(site, {"shopkit/__init__.py": "from .core import render\n",
                      "shopkit/core.py": "def render():\n    return 'page-v1'\n",
                      "shopkit/templates/page.html": "<p>v1</p>\n"})
    machine.env["PYTHONPATH"] += os.pathsep + str(site)
    machine.write_web_app()
    machine.write({"main.py": "import shopkit\n" + MAIN_PY})
    (machine.app_root / "greet.py").chmod(0o640)
    main_inode = (machine.app_root / "main.py").stat().st_ino
    process = machine.start().wait_ready()

    greet_v2 = "import shopkit\n\ndef greeting():\n    return 'hello ' + shopkit.render()\n"
    files = {"main.py": "import shopkit\n" + MAIN_PY, "counter.py": COUNTER_PY, "greet.py": greet_v2,
             "newmod.py": "X = 1\n",
             "shopkit/__init__.py": "from .core import render\n",
             "shopkit/core.py": "def render():\n    return 'page-v2'\n",
             "shopkit/extra.py": "Y = 2\n",
             "shopkit/templates/page.html": "<p>v2</p>\n"}
    _release, url = make_release(tmp_path, local_store, files, version="v2")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    result = parse_result(upgrade.stdout)
    assert result["files_written"] == 5
    # The release names shopkit, so the installed package is the app's and is reloaded too.
    assert result["module_names"] == ["greet", "shopkit.core"]

    assert (site / "shopkit/core.py").read_text().endswith("'page-v2'\n")
    assert (site / "shopkit/templates/page.html").read_text() == "<p>v2</p>\n"
    assert (site / "shopkit/extra.py").read_text() == "Y = 2\n"
    assert (machine.app_root / "newmod.py").read_text() == "X = 1\n"
    assert not (machine.app_root / "shopkit").exists()
    assert (machine.app_root / "greet.py").read_text() == greet_v2
    assert stat.S_IMODE((machine.app_root / "greet.py").stat().st_mode) == 0o640  # mode kept
    assert (machine.app_root / "main.py").stat().st_ino == main_inode  # unchanged: not rewritten
    assert process.get()["greeting"] == "hello page-v2"  # the new site-packages code runs
    assert not list(machine.app_root.glob(".*.part")) and not list(site.rglob(".*.part"))


def test_destination_plan_for_the_three_layouts(monkeypatch):
    monkeypatch.delenv("FLYDEPLOY_APP_ROOT", raising=False)
    paths = ["app.py", "web/__init__.py", "web/views.py", "web/static/site.css", "web/new.py", "tools.py"]
    for root in ("/app", "/code", "/usr/local/lib/python3.12/site-packages"):
        module_files = {"app": f"{root}/app.py", "web": f"{root}/web/__init__.py", "web.views": f"{root}/web/views.py"}
        located = flydeploy._locate_members(paths, module_files, {"web": f"{root}/web"})
        assert located == {"app.py": f"{root}/app.py", "web/__init__.py": f"{root}/web/__init__.py",
                           "web/views.py": f"{root}/web/views.py", "web/static/site.css": f"{root}/web/static/site.css",
                           "web/new.py": f"{root}/web/new.py"}
        plan = flydeploy._plan_destinations(paths, located, flydeploy._choose_app_root(located, "/"))
        assert plan["tools.py"] == f"{root}/tools.py"
    # A loaded module that does not sit at its member's path is not trusted as a destination.
    assert flydeploy._locate_members(["app.py"], {"app": "/elsewhere/main.py"}, {}) == {}
    monkeypatch.setenv("FLYDEPLOY_APP_ROOT", "/srv/app")
    assert flydeploy._choose_app_root({"app.py": "/app/app.py"}, "/") == "/srv/app"
    monkeypatch.delenv("FLYDEPLOY_APP_ROOT")
    assert flydeploy._choose_app_root({}, "/workdir") == "/workdir"
    # Top-level modules decide over packages installed elsewhere, however many files those hold.
    assert flydeploy._choose_app_root({"main.py": "/code/main.py", "kit/a.py": "/site/kit/a.py",
                                       "kit/b.py": "/site/kit/b.py"}, "/") == "/code"
