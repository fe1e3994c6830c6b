"""What the real Fly does, as Fly's own sources define it (shared/reference/fly-platform-facts.md),
played by the local Fly, and how flydeploy copes: one test per behaviour."""

import concurrent.futures
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time

import pytest

import flydeploy
import flydeploy_cli
from tests.fakefly import write_app_tree
from tests.fleet_doubles import machine, script
from tests.waiting import wait_until

pytest_plugins = ["tests.fakefly.fixtures"]

SLEEPER = "import time\nprint('serving', flush=True)\ntime.sleep(600)\n"


@pytest.fixture
def demo(fakefly, tmp_path):
    tree = write_app_tree(tmp_path / "src", {"app.py": SLEEPER}, app="demo", processes={"app": "python3 app.py"},
                          env={"FROM_FLY_TOML": "yes"})
    app = fakefly.create_app("demo", tree, machines=1)
    app.machines[0].wait_for_log("serving")
    return app


def exec_requests(fakefly):
    return [r for r in fakefly.requests if r.op == "exec"]


def test_a_missing_program_is_an_api_error_never_retried(fakefly, demo):
    # init spawns the argv directly: no shell answers 127 (init exec.rs:43-45).
    api = flydeploy.Machines("demo", demo.token, backoff=0.01)
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        api.exec(demo.machines[0].id, ["/usr/local/bin/python3.99", "-c", "1"])
    assert flydeploy.missing_program(caught.value) and "No such file" in caught.value.message
    assert len(exec_requests(fakefly)) == 1
    commands = flydeploy.MachineCommands.for_app_dir("/usr/local/bin/python3.99", "/app")
    (check,) = flydeploy.run_preflight(api, "demo", [demo.machines[0].to_json()], commands)
    assert not check.ok and "/usr/local/bin/python3.99 does not exist on the machine" in check.error
    assert "[tool.flydeploy] python" in check.error


def test_a_non_idempotent_exec_is_not_sent_again_after_a_408(fakefly, demo, tmp_path):
    fakefly.exec_deadline = 0.5
    runs = tmp_path / "runs"
    argv = ["python3", "-c", f"import time; open({str(runs)!r}, 'a').write('x'); time.sleep(1)"]
    api = flydeploy.Machines("demo", demo.token, backoff=0.01)
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        api.exec(demo.machines[0].id, argv, idempotent=False)
    assert caught.value.status == 408 and len(exec_requests(fakefly)) == 1
    wait_until(runs.exists, "the command the 408 left running")
    assert runs.read_text() == "x"


def test_a_detached_upgrade_that_ends_within_the_wait_comes_back_with_its_exec(fakefly, demo, tmp_path):
    # The result comes back with the exec that started it: no result object to poll for.  No
    # agent runs in the demo app, so the upgrade ends at once, failed, and says why.
    commands = flydeploy.MachineCommands.for_app_dir("python3", "/app")
    api = flydeploy.Machines("demo", demo.token)
    url = (tmp_path / "store" / "releases" / "demo-v2.tar.gz").as_uri()
    argv = commands.rpc("upgrade", "demo", "--url", url, "--upgrade-id", "u1", "--detach", "--wait", "20")
    first = api.exec(demo.machines[0].id, argv)
    assert first.ok and json.loads(first.stdout.splitlines()[0])["started"], first.stderr
    result = flydeploy.parse_result_marker(first.stdout)
    assert result is not None and not result["success"] and result["upgrade_id"] == "u1"
    again = api.exec(demo.machines[0].id, argv)  # a retried start starts nothing and waits for nothing
    assert again.ok and not json.loads(again.stdout)["started"] and flydeploy.parse_result_marker(again.stdout) is None


def test_fly_machine_run_with_a_command_runs_it_as_the_main_process(fakefly, demo):
    # `fly machine run IMAGE CMD --rm`: CMD is init's command, started in the image's WORKDIR
    # (init main.rs:717-721); --rm destroys the machine once it exits (run.go:190-192, 870-872);
    # the exit code is in the machine's exit event; `fly machine run` does not apply fly.toml [env]
    # (run.go:772-781).
    code = ("import os, sys; print('cwd', os.getcwd()); print('env', os.environ.get('FROM_FLY_TOML'), "
            "os.environ.get('K')); sys.exit(7)")
    run = fakefly.run_fly("machine", "run", demo.machines[0].image_ref, "-a", "demo", "--rm", "-e", "K=V",
                          "--", "python3", "-c", code)
    assert run.returncode == 0, run.stderr  # flyctl returns once the machine runs
    machine_id = next(line.split()[-1] for line in run.stderr.splitlines() if line.startswith("Machine ID:"))
    machine = fakefly.machine(machine_id)
    machine.wait_for_state("destroyed")
    assert flydeploy_cli.machine_exit_code(machine.to_json()) == 7
    logs = fakefly.run_fly("logs", "-a", "demo", "--machine", machine_id, "--no-tail")
    assert f"app[{machine_id}] " in logs.stdout
    assert f"cwd {machine.root}" in logs.stdout and "env None V" in logs.stdout


def test_flyctl_on_ctrl_c_forwards_nothing_and_destroys_nothing(fakefly, demo, tmp_path):
    # flyctl turns SIGINT into a cancelled context (main.go:53-61), never calls sess.Signal,
    # and the Destroy after the console runs on that cancelled context (run.go:507).
    marker = tmp_path / "still-running"
    command = f"python3 -c \"import time; time.sleep(2); open('{marker}', 'w').write('yes')\""
    fly = subprocess.Popen([str(fakefly.fly_bin / "fly"), "machine", "run", demo.machines[0].image_ref, "-a", "demo",
                            "--rm", "--shell", "--command", command], env=fakefly.env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: any(r.op == "get" or r.op == "wait" for r in fakefly.requests), "the session to open",
               timeout=30)
    wait_until(lambda: len(demo.machines) == 2 and demo.machines[1].state == "started", "the machine to start",
               timeout=30)
    time.sleep(0.5)  # the session's command has started (it writes the marker 2 s in)
    fly.send_signal(signal.SIGINT)
    _out, err = fly.communicate(timeout=30)
    assert fly.returncode == 1 and "session forcibly closed" in err
    assert demo.machines[1].state == "started"  # left behind, billed
    wait_until(marker.exists, "the remote command, which goes on", timeout=15)


def test_the_exec_token_restriction_is_checked_against_the_argv_the_api_receives(fakefly, demo):
    token = demo.exec_token(prefixes=[["python3", "/app/flydeploy.py", "rpc"]])
    argv = ["python3", "/app/flydeploy.py", "rpc", "ping", "--app", "demo"]
    for field in ("command", "cmd"):
        fakefly.token_checks = field
        result = flydeploy.Machines("demo", token).exec(demo.machines[0].id, argv)
        assert result.exit_code == 1 and "no flydeploy agent" in result.stderr  # allowed, and it ran
        with pytest.raises(flydeploy.MachinesAPIError) as caught:
            flydeploy.Machines("demo", token).exec(demo.machines[0].id, ["python3", "-c", "1"])
        assert caught.value.status == 403
    # A request carrying only `command` is refused where the API checks `cmd`.
    body = {"command": argv, "timeout": 5}
    import urllib.request
    request = urllib.request.Request(f"{fakefly.base_url}/v1/apps/demo/machines/{demo.machines[0].id}/exec",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": token, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403


def test_rpc_upgrade_detach_starts_once_per_upgrade_id(tmp_path):
    runtime = tmp_path / "run"
    env = dict(os.environ, FLYDEPLOY_RUNTIME_DIR=str(runtime), PYTHONPATH=str(tmp_path))
    argv = [sys.executable, flydeploy.__file__, "rpc", "upgrade", "--app", "shop", "--url",
            (tmp_path / "store" / "releases" / "shop-v1.tar.gz").as_uri(), "--upgrade-id", "u1", "--detach"]
    old_job = runtime / "shop" / "job-upgrade-u0.log"
    old_job.parent.mkdir(parents=True, mode=0o700)
    old_job.write_text("done long ago\n")
    os.utime(old_job, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd="/")
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout)["started"] is True and json.loads(second.stdout)["started"] is False
    assert not old_job.exists()  # markers and logs of jobs long finished are removed
    nameless = subprocess.run(argv[:-3] + ["--detach"], env=env, capture_output=True, text=True, timeout=60)
    assert nameless.returncode == 2 and "--upgrade-id" in nameless.stderr


def test_preflight_reports_how_the_machine_runs_flydeploy(tmp_path):
    env = dict(os.environ, FLYDEPLOY_RUNTIME_DIR=str(tmp_path / "run"), FLY_API_TOKEN="x")
    done = subprocess.run([sys.executable, flydeploy.__file__, "rpc", "preflight", "--app", "shop"], env=env,
                          capture_output=True, text=True, timeout=60, cwd="/")
    report = json.loads(done.stdout)
    assert done.returncode == 1  # no agent runs here
    assert report["python"] == sys.executable and report["script"] == os.path.abspath(flydeploy.__file__)
    assert report["flydeploy"] == flydeploy.__version__ and report["agents"] == 0 and report["fly_api_token_set"]
    commands = flydeploy.MachineCommands.for_app_dir("python3", "/app")
    check = flydeploy.judge_preflight(machine("m"), commands, flydeploy.ExecResult(1, 0, done.stdout, ""), None)
    assert not check.ok and "startup_reapply_current" in check.error


def test_machine_commands_import_flydeploy_from_the_app_dir_and_its_cached_bytecode(tmp_path):
    # Run as exec runs them: elsewhere than the app, here a directory whose modules must not be
    # imported (the working directory is not the app's, and not on sys.path).  flydeploy is
    # imported from the app directory, its bytecode cached there, not compiled as a script.
    app_dir, elsewhere = tmp_path / "app", tmp_path / "cwd"
    app_dir.mkdir()
    elsewhere.mkdir()
    (app_dir / "flydeploy.py").write_bytes(pathlib.Path(flydeploy.__file__).read_bytes())
    for name in ("flydeploy.py", "logging.py", "argparse.py"):
        (elsewhere / name).write_text("raise SystemExit('imported from the working directory')\n")
    commands = flydeploy.MachineCommands.for_app_dir(sys.executable, str(app_dir))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPATH")}
    env["FLYDEPLOY_RUNTIME_DIR"] = str(tmp_path / "run")
    runs = [subprocess.run(commands.rpc("preflight", "shop"), env=dict(env, PYTHONVERBOSE=str(verbose)),
                           cwd=elsewhere, capture_output=True, text=True, timeout=60) for verbose in (0, 1)]
    for run in runs:
        report = json.loads(run.stdout)
        assert report["script"] == str(app_dir / "flydeploy.py") and report["agents"] == 0, run.stderr[-2000:]
    cached = next((app_dir / "__pycache__").glob("flydeploy.*.pyc"))
    assert f"code object from '{cached}'" in runs[1].stderr
    assert "," not in shlex.join(commands.token_prefix())  # flyctl splits --command-prefix at commas


def test_a_bucket_the_machine_cannot_reach_fails_its_preflight():
    # A detached upgrade that cannot reach the bucket could not report back: checked up front.
    report = {"python": "/usr/bin/python3", "agents": 1, "agents_ok": 1,
              "store": {"ok": False, "error": "s3://b: 403 InvalidAccessKeyId"}}
    commands = flydeploy.MachineCommands.for_app_dir("python3", "/app")
    check = flydeploy.judge_preflight(machine("m"), commands, flydeploy.ExecResult(0, 0, json.dumps(report), ""),
                                      None)
    assert not check.ok and "not reachable from the machine" in check.error and "InvalidAccessKeyId" in check.error
    assert "fly storage create" in check.error
    report["store"] = {"ok": True}
    ok = flydeploy.judge_preflight(machine("m"), commands, flydeploy.ExecResult(0, 0, json.dumps(report), ""), None)
    assert ok.ok


def test_machines_fly_go_reserves_and_the_legacy_group_key():
    machines = [machine("a"), machine("t", group="fly_app_test_machine_command"), machine("old", group="")]
    machines[2]["config"]["metadata"]["process_group"] = "worker"
    orchestrator = machine("o")
    orchestrator["config"]["metadata"][flydeploy.ORCHESTRATOR_ROLE_KEY] = flydeploy.ORCHESTRATOR_ROLE
    chosen = flydeploy.select_machines(machines + [orchestrator])
    assert [m["id"] for m in chosen.targets] == ["a", "old"]
    assert flydeploy.machine_group(machines[2]) == "worker"


def test_result_polling_grows_with_the_wait_and_stays_bounded():
    assert flydeploy.result_poll_interval(0) == 0.05
    assert flydeploy.result_poll_interval(1.0) == pytest.approx(0.2)
    assert flydeploy.result_poll_interval(600) == 1.0
    waits = [flydeploy.result_poll_interval(t / 10) for t in range(100)]
    assert waits == sorted(waits)


def test_the_results_one_listing_shows_are_read_at_once(tmp_path):
    # Each object costs a bucket round trip: read one after another, a wave of ten machines
    # would wait ten round trips for its last result.  Here each read waits for the others.
    machines = ["m1", "m2", "m3"]
    together = threading.Barrier(len(machines), timeout=10)

    class Store(flydeploy.LocalStore):
        def get_json(self, key, **options):
            together.wait()
            return super().get_json(key, **options)

    store = Store(tmp_path / "store")
    prefix = flydeploy.results_prefix("shop", "u1")
    for machine_id in machines:
        store.put(f"{prefix}{machine_id}.json", json.dumps({"status": "completed", "success": True,
                                                            "machine_id": machine_id}).encode())
    board = flydeploy._ResultBoard(store, prefix)
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(machines)) as pool:
        results = list(pool.map(lambda m: board.wait(m, began, began + 20), machines))
    assert [r and r["machine_id"] for r in results] == machines and board.error is None


def test_flyctl_keeps_its_stdin_open_until_it_exits(tmp_path):
    # At EOF on its stdin flyctl closes the remote stdin (ssh/io.go:99-104).
    fly = script(tmp_path / "fly", """
        import select, sys
        readable, _, _ = select.select([sys.stdin], [], [], 0.3)
        print("closed" if readable else "open")
    """)
    assert flydeploy_cli._fly_output([str(fly)]) == "open\n"
