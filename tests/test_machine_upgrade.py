"""Per-machine upgrades on real processes: `rpc upgrade`, hot_upgrade's file work, gunicorn, fork."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
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
    assert result["processes_succeeded"] == 0 and result["processes_failed"] == 2
    assert f"process main.py[{bad.pid}] failed" in result["error"] and "extra cannot start" in result["error"]
    # The release is taken back off the disk, and the process that had applied it follows the disk.
    assert f"process main.py[{good.pid}] failed: applied v2, then went back to the image's code" in result["error"]
    assert "every file and the state file are as before" in result["error"]
    assert good.get()["greeting"] == "hello v1"
    assert bad.get()["greeting"] == "hello v1"  # rolled back whole, still serving
    assert (machine.app_root / "greet.py").read_text() == GREET_V1
    assert not (machine.socket_dir() / "state.json").exists()


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


def test_members_are_written_under_the_app_root_only(machine, tmp_path, local_store):
    """An app in /code whose release names a package also installed in site-packages: every file is
    written at its own path under the app root; the installed package is another one, left alone."""
    site = tmp_path / "venv" / "lib" / "site-packages"
    installed = {"shopkit/__init__.py": "from .core import render\n",
                 "shopkit/core.py": "def render():\n    return 'page-v1'\n",
                 "shopkit/templates/page.html": "<p>v1</p>\n"}
    write_tree(site, installed)
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
    assert result["files_written"] == 6
    # The package loaded from site-packages is not the app's: it is neither written nor reloaded.
    assert result["module_names"] == ["greet"]
    assert any(note.startswith("shopkit/core.py was written to") and str(site / "shopkit/core.py") in note
               and "left alone" in note for note in result["notes"]), result["notes"]

    assert {rel: (site / rel).read_text() for rel in installed} == installed
    assert not (site / "shopkit/extra.py").exists()
    for rel in ("shopkit/__init__.py", "shopkit/core.py", "shopkit/extra.py", "shopkit/templates/page.html"):
        assert (machine.app_root / rel).read_text() == files[rel]
    assert (machine.app_root / "newmod.py").read_text() == "X = 1\n"
    assert (machine.app_root / "greet.py").read_text() == greet_v2
    assert stat.S_IMODE((machine.app_root / "greet.py").stat().st_mode) == 0o640  # mode kept
    assert (machine.app_root / "main.py").stat().st_ino == main_inode  # unchanged: not rewritten
    assert process.get()["greeting"] == "hello page-v1"  # the new greet, with the shopkit it imported
    leftovers = [p for root in (machine.app_root, site) for p in root.rglob(".*") if p.is_file()]
    assert leftovers == []


def test_members_named_like_modules_loaded_from_elsewhere_are_written_in_the_app(machine, tmp_path, local_store):
    """A release adds random.py, json/decoder.py and flydeploy.py while the processes run modules of
    those names from another sys.path entry: the app's files are written, those modules are left alone.

    Copies of the standard library's random and json, and of flydeploy.py, stand in for the
    interpreter's own files on PYTHONPATH, so that a regression cannot damage the interpreter.
    """
    import json as stdlib_json
    import random

    elsewhere = tmp_path / "pythonpath"
    shutil.copytree(os.path.dirname(stdlib_json.__file__), elsewhere / "json")
    shutil.copy(random.__file__, elsewhere / "random.py")
    shutil.copy(flydeploy.__file__, elsewhere / "flydeploy.py")
    before = {path: path.read_bytes() for path in elsewhere.rglob("*.py")}
    machine.env["PYTHONPATH"] = str(elsewhere)
    machine.write_web_app()
    machine.write({"main.py": "import random, json.decoder\n" + MAIN_PY})
    process = machine.start().wait_ready()
    files = {"main.py": "import random, json.decoder\n" + MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2,
             "random.py": "HELPER = 2\n", "json/decoder.py": "X = 'app'\n", "flydeploy.py": "X = 'app'\n"}
    _release, url = make_release(tmp_path, local_store, files, version="v2")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    result = parse_result(upgrade.stdout)
    assert {path: path.read_bytes() for path in elsewhere.rglob("*.py")} == before
    for rel in ("random.py", "json/decoder.py", "flydeploy.py", "greet.py"):
        assert (machine.app_root / rel).read_text() == files[rel]
    assert result["module_names"] == ["greet"]
    for rel in ("random.py", "json/decoder.py", "flydeploy.py"):
        assert any(note.startswith(f"{rel} was written to") and str(elsewhere / rel) in note
                   for note in result["notes"]), (rel, result["notes"])
    assert process.get()["greeting"] == "hello v2"


def test_a_link_out_of_the_app_root_is_refused(machine, tmp_path, local_store):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.py").write_text("KEEP = 1\n")
    machine.write({"greet.py": GREET_V1})
    (machine.app_root / "lib").symlink_to(outside)
    _release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2, "lib/secret.py": "KEEP = 2\n"},
                                 version="v2")
    upgrade = machine.rpc("upgrade", "--app", "shop", "--url", url)
    result = parse_result(upgrade.stdout)
    assert upgrade.returncode == 1 and "outside the app root" in result["error"], upgrade.stdout
    assert (outside / "secret.py").read_text() == "KEEP = 1\n"
    assert (machine.app_root / "greet.py").read_text() == GREET_V1


def test_destinations_are_the_members_own_paths_under_the_app_root(monkeypatch, tmp_path):
    paths = ["app.py", "web/__init__.py", "web/views.py", "web/static/site.css", "web/new.py", "tools.py"]
    for root in ("/app", "/code", "/usr/local/lib/python3.12/site-packages"):
        # Where processes loaded modules of those names from is still found, for the result's notes.
        module_files = {"app": f"{root}/app.py", "web": f"{root}/web/__init__.py", "web.views": f"{root}/web/views.py"}
        located = flydeploy._locate_members(paths, module_files, {"web": f"{root}/web"})
        assert located == {"app.py": f"{root}/app.py", "web/__init__.py": f"{root}/web/__init__.py",
                           "web/views.py": f"{root}/web/views.py", "web/static/site.css": f"{root}/web/static/site.css",
                           "web/new.py": f"{root}/web/new.py"}
    assert flydeploy._locate_members(["app.py"], {"app": "/elsewhere/main.py"}, {}) == {}
    app = tmp_path / "app"
    (app / "web").mkdir(parents=True)
    root = str(app.resolve())
    assert flydeploy._destination(root, "web/views.py") == f"{root}/web/views.py"
    assert flydeploy._destination(root, "tools.py") == f"{root}/tools.py"
    (app / "out").symlink_to("/etc")
    with pytest.raises(flydeploy.AgentError, match="outside the app root"):
        flydeploy._destination(root, "out/passwd")
    # The app root is this machine's own setting, else the directory the command runs in.
    monkeypatch.setenv("FLYDEPLOY_APP_ROOT", str(app / "web" / ".."))
    assert flydeploy._machine_app_root(in_process=False) == root
    monkeypatch.delenv("FLYDEPLOY_APP_ROOT")
    monkeypatch.chdir(app / "web")
    assert flydeploy._machine_app_root(in_process=False) == f"{root}/web"


def test_an_upgrade_run_outside_the_app_is_refused(machine, tmp_path, local_store):
    machine.write_web_app()
    process = machine.start().wait_ready()
    _release, url = make_release(tmp_path, local_store, {"greet.py": GREET_V2}, version="v2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = machine.run([sys.executable, "-m", "flydeploy", "rpc", "upgrade", "--app", "shop", "--url", url],
                       cwd=elsewhere)
    result = parse_result(done.stdout)
    assert done.returncode == 1 and "Run the command in the app's directory" in result["error"], done.stdout
    assert str(machine.app_root) in result["error"] and list(elsewhere.iterdir()) == []
    assert process.get()["greeting"] == "hello v1"
