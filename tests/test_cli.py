"""The pure parts of the command line and the fleet orchestration: settings,
flags, the exact flyctl command lines, redaction, machine selection, result
markers, status rows, and the build / launch steps against stub executables."""

import io
import json
import os
import shlex
import signal
import sys
import threading

import pytest

import flydeploy
import flydeploy_cli
from tests.fleet_doubles import (MARKER, StubMachines, interruptible_orchestrator, lock_key_exists, machine,
                                 result_line, run, script, succeed, write)
from tests.waiting import wait_until

# How every machine-side command starts: the interpreter, the bootstrap, the app directory.
RUN_IN_APP = ["python3", "-c", flydeploy.MachineCommands.BOOTSTRAP, "/app"]

pytest_plugins = ["tests.fleet_doubles"]


# --- settings ---------------------------------------------------------------


def test_defaults_and_fly_toml(project):
    config = flydeploy.load_config(project)
    assert config.app == "shop" and config.sources["app"] == "fly.toml"
    assert config.bucket == "shop-releases" and config.sources["bucket"] == "fly.toml"
    assert config.build_args == {"PYTHON_VERSION": "3.12"}
    assert config.max_concurrency == 10 and config.sources["max_concurrency"] == "default"
    assert config.python == "python3" and config.timeout == 120.0
    assert config.env["LOG_LEVEL"] == "info" and set(config.processes) == {"app", "worker"}
    assert config.fly_toml == project / "fly.toml" and config.root == project / "."


def test_pyproject_beats_fly_toml_and_flags_beat_both(project):
    write(project / "pyproject.toml", """
        [project]
        name = "shop"
        [tool.flydeploy]
        app = "shop-staging"
        max_concurrency = 4
        exclude = ["scratch/*"]
        root = "src"
    """)
    config = flydeploy.load_config(project)
    assert (config.app, config.max_concurrency) == ("shop-staging", 4)
    assert config.sources["app"] == "pyproject.toml [tool.flydeploy]"
    assert config.exclude == ("scratch/*",) and config.root == project / "src"
    config = flydeploy.load_config(project, overrides={"app": "shop-prod", "max_concurrency": None,
                                                       "timeout": 9})
    assert (config.app, config.sources["app"]) == ("shop-prod", "--app")
    assert config.max_concurrency == 4 and config.timeout == 9.0


def test_toml_error_names_file_and_line(project):
    write(project / "pyproject.toml", """
        [tool.flydeploy]
        app = "ok"
        max_concurrency = = 3
    """)
    with pytest.raises(flydeploy.ConfigError) as info:
        flydeploy.load_config(project)
    assert str(project / "pyproject.toml") in str(info.value) and "line 3" in str(info.value)


def test_broken_fly_toml_names_file_and_line(tmp_path):
    write(tmp_path / "fly.toml", 'app = "x"\n[env\nA = 1\n')
    with pytest.raises(flydeploy.ConfigError, match=r"fly\.toml, line 2: invalid TOML"):
        flydeploy.load_config(tmp_path)


def test_missing_app_names_every_provider(tmp_path):
    config = flydeploy.load_config(tmp_path)
    with pytest.raises(flydeploy.ConfigError) as info:
        config.require_app()
    for provider in ("--app", "fly.toml", "[tool.flydeploy]"):
        assert provider in str(info.value)


def test_bad_settings_are_named(project):
    write(project / "pyproject.toml", "[tool.flydeploy]\nmax_concurency = 3\n")
    with pytest.raises(flydeploy.ConfigError, match="unknown key.*max_concurency.*known keys"):
        flydeploy.load_config(project)
    write(project / "pyproject.toml", "[tool.flydeploy]\ninclude = 'app/*'\ntimeout = -1\n")
    with pytest.raises(flydeploy.ConfigError, match="timeout must be a number of seconds above 0"):
        flydeploy.load_config(project)
    (project / "pyproject.toml").unlink()
    with pytest.raises(flydeploy.ConfigError, match="--max-concurrency: max_concurrency must be"):
        flydeploy.load_config(project, overrides={"max_concurrency": 0})
    with pytest.raises(flydeploy.ConfigError, match="unknown process group.*web.*app, worker"):
        flydeploy.load_config(project, overrides={"process_groups": ["web"]})
    with pytest.raises(flydeploy.ConfigError, match="not found: pass --config"):
        flydeploy.load_config(project, config="staging.toml")


# --- flyctl command lines -----------------------------------------------------


def test_exact_command_lines(project):
    config = flydeploy.load_config(project, overrides={"process_groups": ["app"], "max_concurrency": 3})
    assert flydeploy_cli.build_command(config, "flydeploy-v7-abc", no_cache=True) == [
        "fly", "deploy", "--build-only", "--push", "--image-label", "flydeploy-v7-abc",
        "-c", str(project / "fly.toml"), "--no-cache"]
    # The token's restriction is the prefix of every machine-side command, from the one builder.
    assert flydeploy_cli.token_command(config) == [
        "fly", "tokens", "create", "machine-exec", "-a", "shop", "--expiry", "1h",
        "--command-prefix", shlex.join([*RUN_IN_APP, "rpc"])]
    assert config.machine_commands().rpc("info", "shop")[:5] == [*RUN_IN_APP, "rpc"]
    image = "registry.fly.io/shop:flydeploy-v7-abc"
    argv = flydeploy_cli.orchestrate_argv(config, image, version="v7", owner="ann@example.com", force=True)
    assert argv == [
        *RUN_IN_APP, "orchestrate", "--root", "/app", "--image-ref", image, "--app", "shop",
        "--python", "python3", "--app-dir", "/app", "--lock-timeout", "300", "--timeout", "120",
        "--max-concurrency", "3", "--suspend-timeout", "10", "--process-group", "app", "--on-failure",
        "rollback", "--health-timeout", "5", "--version", "v7", "--owner", "ann@example.com", "--force"]
    machine = flydeploy_cli.orchestrator_config(config, image, argv, {"FLYDEPLOY_API_TOKEN": "fm2_xyz"},
                                                run_id="r1", launcher="ann@box:12")
    # The main process is argv itself: no shell, no cd, no sleep; fly.toml [env] (without what looks
    # secret, STRIPE_SECRET_KEY here) and the token in its env, none of it on a command line.
    assert machine["init"] == {"entrypoint": ["python3"], "cmd": argv[1:]}
    assert machine["env"] == {"LOG_LEVEL": "info", "BUCKET_NAME": "shop-releases", "FLYDEPLOY_API_TOKEN": "fm2_xyz"}
    assert machine["auto_destroy"] is True and machine["restart"] == {"policy": "no"}
    assert machine["metadata"] == {"flydeploy_role": "orchestrator", "flydeploy_run": "r1",
                                   "flydeploy_launcher": "ann@box:12"}
    assert flydeploy_cli.logs_command(config, "m1") == ["fly", "logs", "-a", "shop", "--machine", "m1"]


def test_image_tags_stay_within_128_characters():
    short = flydeploy_cli.image_label("v7")
    assert short.startswith("flydeploy-v7-") and len(short) == len("flydeploy-v7-") + 6
    longest = flydeploy_cli.image_label("v" * 128)
    other = flydeploy_cli.image_label("v" * 127 + "w")
    assert len(longest) == 128 and len(other) == 128
    assert longest.split("-")[2] != other.split("-")[2]  # the version's hash keeps them apart


def test_the_orchestrator_gets_back_every_setting_its_flags_carry(project):
    config = flydeploy.load_config(project, overrides={"app": "shop-eu", "python": "/opt/py/bin/python3",
                                                       "lock_timeout": 61.5, "max_concurrency": 4,
                                                       "process_groups": ("app", "worker")})
    args = flydeploy._entry_parser().parse_args(["orchestrate", "--image-ref", "img", *config.orchestrate_flags()])
    carried = flydeploy.load_config(project, overrides=flydeploy.fleet_overrides(args))
    assert carried.app == "shop-eu"
    assert carried.orchestrate_options() == config.orchestrate_options()


def test_app_and_build_args_from_elsewhere_are_passed(project):
    config = flydeploy.load_config(project, overrides={"app": "shop-eu", "build_args": {"A": "1"}})
    command = flydeploy_cli.build_command(config, "l")
    assert command[-4:] == ["-a", "shop-eu", "--build-arg", "A=1"]
    assert "--app" in flydeploy_cli.orchestrate_argv(config, "img")


def test_redaction_hides_secret_values_only():
    shown = flydeploy_cli.redact(["fly", "machine", "run", "-e", "FLYDEPLOY_API_TOKEN=fm2_abc",
                                  "-e", "LOG_LEVEL=debug", "--build-arg", "NPM_AUTH=xyz",
                                  "--command", "a=b"])
    assert shown == ["fly", "machine", "run", "-e", "FLYDEPLOY_API_TOKEN=<redacted>",
                     "-e", "LOG_LEVEL=debug", "--build-arg", "NPM_AUTH=<redacted>", "--command", "a=b"]


# --- the command line ---------------------------------------------------------


def test_dry_run_prints_settings_and_commands_and_runs_nothing(project, stub_fly, capsys, monkeypatch):
    monkeypatch.chdir(project)
    code = flydeploy_cli.main(["hot", "--dry-run", "--build-arg", "GITHUB_TOKEN=ghp_secret",
                               "--build-arg", "MODE=fast", "--max-concurrency", "2", "--version", "v9",
                               "--process-group", "worker", "--no-cache", "--timeout", "30",
                               "--suspend-timeout", "5", "--lock-timeout", "60", "--force"])
    out = capsys.readouterr().out
    assert code == 0
    assert stub_fly() == [["auth", "whoami"]]  # nothing built, minted or launched
    for secret in ("ghp_secret", "sk_live_123"):
        assert secret not in out
    assert "GITHUB_TOKEN=<redacted>" in out and "MODE=fast" in out and "STRIPE_SECRET_KEY=<redacted>" in out
    assert "max_concurrency  2  (--max-concurrency)" in out
    assert "app              shop  (fly.toml)" in out
    commands = [line.split(". ", 1)[1] for line in out.splitlines()
                if line.startswith("  ") and ". fly " in line]
    assert [shlex.split(c)[:3] for c in commands] == [["fly", "deploy", "--build-only"], ["fly", "tokens", "create"]]
    create = next(line for line in out.splitlines() if "create the orchestrator machine" in line)
    machine = json.loads(create.split("destroyed when it exits: ", 1)[1])
    assert machine["env"]["FLYDEPLOY_API_TOKEN"] == "<redacted>" and "STRIPE_SECRET_KEY" not in machine["env"]
    orchestrate = machine["init"]["entrypoint"] + machine["init"]["cmd"]
    assert orchestrate[:7] == [*RUN_IN_APP, "orchestrate", "--root", "/app"]
    assert orchestrate[orchestrate.index("--owner") + 1] == "ann@example.com"
    assert orchestrate[orchestrate.index("--max-concurrency") + 1] == "2"
    assert "--force" in orchestrate and "--no-cache" in shlex.split(commands[0])
    label = shlex.split(commands[0])[5]
    assert label.startswith("flydeploy-v9-") and machine["image"] == f"registry.fly.io/shop:{label}"


def test_typo_flag_is_an_error_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as info:
        flydeploy_cli.main(["hot", "--dry-rn"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --dry-rn" in err and "did you mean --dry-run" in err
    with pytest.raises(SystemExit):
        flydeploy_cli.main(["hot", "--dry"])  # no abbreviations either
    with pytest.raises(SystemExit):
        flydeploy_cli.main(["status", "--force"])


def test_bad_settings_exit_2_with_the_reason(project, stub_fly, capsys, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as usage:  # a usage error, as argparse reports them
        flydeploy_cli.main(["hot", "--dry-run", "--max-concurrency", "0"])
    assert usage.value.code == 2 and "--max-concurrency" in capsys.readouterr().err
    assert flydeploy_cli.main(["hot", "--skip-build"]) == 2
    assert "--skip-build needs --image" in capsys.readouterr().err
    assert flydeploy_cli.main(["hot", "--dry-run", "--version", "../v1"]) == 2
    assert "version '../v1' cannot name a release" in capsys.readouterr().err
    assert flydeploy_cli.main(["hot", "--dry-run", "--config", "nope/fly.toml"]) == 2
    assert "nope/fly.toml not found" in capsys.readouterr().err
    assert stub_fly() == []


def test_local_mode_flags(project, stub_fly, capsys, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit):
        flydeploy_cli.main(["hot", "--root", "."])
    assert "--root and --store go with --local" in capsys.readouterr().err
    assert flydeploy_cli.main(["hot", "--local", "--skip-build"]) == 2
    assert "--local builds no image" in capsys.readouterr().err
    assert flydeploy_cli.main(["rollback", "--local", "--dry-run", "--store", "elsewhere"]) == 0
    out = capsys.readouterr().out
    assert "roll back to the previous release, record it in" in out and "elsewhere" in out
    # The plan shows the interpreter local mode really runs rpc with, not the configured one.
    assert f"python           {sys.executable}  (--local (this interpreter))" in out
    assert stub_fly() == []  # local mode never runs flyctl


def test_skip_build_uses_the_given_image(project, stub_fly, capsys, monkeypatch):
    monkeypatch.chdir(project)
    image = "registry.fly.io/shop:old"
    assert flydeploy_cli.main(["hot", "--dry-run", "--skip-build", "--image", image]) == 0
    out = capsys.readouterr().out
    assert "fly deploy" not in out and '"image": "registry.fly.io/shop:old"' in out


def test_a_prebuilt_image_in_fly_toml_is_used_as_is(project, stub_fly, capsys, monkeypatch):
    monkeypatch.chdir(project)
    (project / "fly.toml").write_text((project / "fly.toml").read_text() + '[build]\n  image = "ghcr.io/acme/shop:9"\n')
    assert flydeploy_cli.main(["hot", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "prebuilt image, nothing to build" in out and "fly deploy" not in out
    assert '"image": "ghcr.io/acme/shop:9"' in out


# --- build and launch, against stub executables --------------------------------


def test_build_streams_output_and_checks_the_image(tmp_path, capsys):
    fly = script(tmp_path / "fly", """
        import sys
        print("==> Building image", flush=True)
        print("image: " + sys.argv[1], file=sys.stderr, flush=True)
        print("image size: 45 MB", file=sys.stderr)
    """)
    ref = "registry.fly.io/shop:l1"
    assert flydeploy_cli.run_build([str(fly), ref], ref) == ref
    assert "==> Building image" in capsys.readouterr().out
    with pytest.raises(flydeploy.FlyDeployError, match="pushed registry.fly.io/shop:other, not the expected"):
        flydeploy_cli.run_build([str(fly), "registry.fly.io/shop:other"], ref)


def test_failed_build_and_silent_build(tmp_path):
    failing = script(tmp_path / "failing", "import sys\nprint('Error: no Dockerfile')\nsys.exit(1)\n")
    with pytest.raises(flydeploy.FlyDeployError, match="the build failed \\(fly deploy exited 1\\)"):
        flydeploy_cli.run_build([str(failing)], "x")
    silent = script(tmp_path / "silent", "import time\nprint('starting', flush=True)\ntime.sleep(600)\n")
    with pytest.raises(flydeploy.FlyDeployError, match="printed nothing for .* and was stopped"):
        flydeploy_cli.run_build([str(silent)], "x", silence_s=0.5)


def test_ctrl_c_reaches_flyctl_and_its_last_words_are_shown(tmp_path, capsys):
    ready, interrupted = tmp_path / "ready", tmp_path / "interrupted"
    orchestrator = interruptible_orchestrator(tmp_path / "orchestrator", ready, interrupted)
    main_thread = threading.main_thread().ident

    def interrupt_when_ready():
        wait_until(ready.exists, "the orchestrator to start", timeout=30)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        flydeploy_cli.run_build([str(orchestrator)], "x")
    assert interrupted.read_text() == "SIGINT" and "the deploy lock was released" in capsys.readouterr().out


def test_ctrl_c_while_flyctl_starts_still_stops_it(tmp_path, monkeypatch):
    # Not Python: a Ctrl-C during its start-up would end it with exit code 1, not by SIGINT.
    orchestrator = tmp_path / "orchestrator"
    orchestrator.write_text("#!/bin/sh\nexec sleep 60\n")
    orchestrator.chmod(0o755)
    popen, started = flydeploy_cli.subprocess.Popen, []

    def popen_then_ctrl_c(*args, **kwargs):
        process = popen(*args, **kwargs)
        started.append(process)
        signal.raise_signal(signal.SIGINT)  # lands before anyone could pass it on
        return process

    monkeypatch.setattr(flydeploy_cli.subprocess, "Popen", popen_then_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            flydeploy_cli.run_build([str(orchestrator)], "x")
        assert len(started) == 1
        assert started[0].poll() == -signal.SIGINT, "the orchestrator was left running, or killed outright"
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_ctrl_c_while_flyctl_fails_to_start_is_still_a_ctrl_c(monkeypatch):
    def ctrl_c_then_fail(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(flydeploy_cli.subprocess, "Popen", ctrl_c_then_fail)
    with pytest.raises(KeyboardInterrupt) as caught:
        flydeploy_cli.run_build(["fly", "deploy"], "x")
    assert "cannot run fly" in str(caught.value.__context__)


def test_exec_token_is_minted_from_the_session(project, tmp_path):
    config = flydeploy.load_config(project)
    bin_dir = tmp_path / "tokbin"
    script(bin_dir / "fly", """
        import sys
        assert sys.argv[1:5] == ["tokens", "create", "machine-exec", "-a"], sys.argv
        print("FlyV1 fm2_minted")
    """)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{old}"
    try:
        assert flydeploy_cli.mint_exec_token(config) == "FlyV1 fm2_minted"
        (bin_dir / "fly").write_text(f"#!{sys.executable}\nimport sys\nsys.exit('Error: not logged in')\n")
        assert flydeploy_cli.mint_exec_token(config) is None
    finally:
        os.environ["PATH"] = old


# --- machines, markers, outcomes, status rows -----------------------------------


def test_select_machines():
    machines = [machine("a"), machine("b", state="stopped"), machine("c", state="suspended"),
                machine("d", group="worker"), machine("self"),
                machine("rel", group="fly_app_release_command"),
                machine("con", group="fly_app_console"), machine("v1", v2=False),
                machine("v1svc", v2=False, services=[{"internal_port": 8080}]),
                machine("e", state="starting"), machine("gone", state="destroyed", group="worker")]
    chosen = flydeploy.select_machines(machines, self_id="self")
    assert [m["id"] for m in chosen.targets] == ["a", "d", "v1svc"]
    assert [m["id"] for m in chosen.pending] == ["b", "c"]
    assert [(m["id"], reason.split(":")[0]) for m, reason in chosen.skipped] == [
        ("e", "starting"), ("gone", "destroyed")]
    workers = flydeploy.select_machines(machines, self_id="self", process_groups=["worker"])
    assert [m["id"] for m in workers.targets] == ["d"] and not workers.pending


def test_machine_image_from_config_or_image_ref():
    assert flydeploy.machine_image(machine("a")) == "registry.fly.io/shop:deployment-1"
    bare = machine("a")
    del bare["config"]["image"]
    assert flydeploy.machine_image(bare) == "registry.fly.io/shop:deployment-1"


def test_parse_result_marker():
    out = "\n".join(["applying...", result_line(success=False, error="old"),
                     result_line(success=True, modules_reloaded=3), "bye"])
    assert flydeploy.parse_result_marker(out) == {"success": True, "modules_reloaded": 3}
    assert flydeploy.parse_result_marker("no marker here") is None
    assert flydeploy.parse_result_marker("__FLYDEPLOY_RESULT__{broken__FLYDEPLOY_RESULT__") is None


def test_judge_upgrade_lines():
    m = machine("e2865e", region="ord")
    ok = flydeploy.judge_upgrade(m, 0, result_line(success=True, modules_reloaded=3, processes_succeeded=4,
                                                   suspend_duration_ms=6.4), "")
    assert ok.ok and ok.line() == "✓ e2865e (ord) 3 modules, 4 processes, suspended 6 ms"
    single = flydeploy.judge_upgrade(m, 0, result_line(success=True, modules_reloaded=1,
                                                       processes_succeeded=1, suspend_duration_ms=0), "")
    assert single.line() == "✓ e2865e (ord) 1 module, 1 process, suspended 0 ms"
    brief = flydeploy.judge_upgrade(m, 0, result_line(success=True, modules_reloaded=2,
                                                      processes_succeeded=2, suspend_duration_ms=0.37), "")
    assert brief.line() == "✓ e2865e (ord) 2 modules, 2 processes, suspended 0.4 ms"
    failed = flydeploy.judge_upgrade(m, 1, result_line(success=False, error="pid 12: SyntaxError"), "")
    assert not failed.ok and failed.line() == "✗ e2865e (ord) pid 12: SyntaxError"
    lying = flydeploy.judge_upgrade(m, 1, result_line(success=True), "")
    assert not lying.ok
    assert "not importable" in flydeploy.judge_upgrade(
        m, 1, "", "/usr/bin/python3: No module named flydeploy").error
    assert "python3 not found" in flydeploy.judge_upgrade(m, 127, "", "sh: python3: not found").error
    assert flydeploy.judge_upgrade(m, 1, "", "Traceback...\nOSError: disk full").error == (
        "rpc upgrade exited 1 without a result: OSError: disk full")
    assert "signal 9" in flydeploy.judge_upgrade(m, 0, "", "", exit_signal=9).error


def test_report_summary_and_exit_code():
    good = flydeploy.MachineOutcome("a", "ams", True, result={})
    bad = flydeploy.MachineOutcome("b", "ord", False, "timed out")
    report = flydeploy.FleetReport("shop", "v2", "ab" * 32, "u", True, "id", [good],
                                   [machine("c", "stopped")], [])
    assert report.exit_code == 0
    assert "1/1 machine upgraded to v2" in report.summary() and "1 stopped machine" in report.summary()
    report.outcomes.append(bad)
    assert report.exit_code == 1 and "FAILED: b" in report.summary()


def test_status_rows():
    current = {"image_ref": "registry.fly.io/shop:deployment-1",
               "hot_upgrade": {"version": "v2", "sha256": "x"}, "history": []}
    applied = [{"pid": 1, "version": "v2", "applied_at": "2026-11-21T10:00:00Z"},
               {"pid": 2, "version": "v2", "applied_at": "2026-11-21T10:00:01Z"}]
    row = flydeploy.status_row(machine("a"), current, applied)
    assert row["verdict"] == "✓ up to date" and row["hot_upgrade_version"] == "v2"
    assert row["applied_at"] == "2026-11-21T10:00:01Z" and row["processes"] == 2
    half = [applied[0], {"pid": 3, "version": None}]
    assert flydeploy.status_row(machine("a"), current, half)["verdict"] == "✗ NOT APPLIED"
    assert flydeploy.status_row(machine("a"), current, None, "no agent")["verdict"] == "✗ NOT APPLIED"
    assert flydeploy.status_row(machine("a"), current, [])["verdict"] == "✗ NOT APPLIED"
    assert flydeploy.status_row(machine("a", image="registry.fly.io/shop:deployment-0"), current,
                                applied)["verdict"] == "STALE image"
    assert flydeploy.status_row(machine("b", state="stopped"), current)["verdict"] == "stopped"
    assert flydeploy.status_row(machine("a"), None, [{"pid": 1}])["verdict"] == "✓ up to date"


# --- orchestrate against a local store and a stub Machines API ------------------


def test_orchestrate_pushes_a_release_to_every_started_machine(store, app_root):
    api = StubMachines([machine("a"), machine("b", region="ord"), machine("c", state="stopped"),
                        machine("orch")], succeed)
    report, out = run(store, api, app_root, suspend_timeout=4, timeout=50)
    assert report.exit_code == 0 and report.uploaded
    doc, _ = flydeploy.read_current(store, "shop")
    hot = doc["hot_upgrade"]
    assert hot["version"] == "v1" and hot["sha256"] == report.sha256
    assert hot["source_image_ref"] == "registry.fly.io/shop:l1"
    assert doc["image_ref"] == "registry.fly.io/shop:deployment-1"  # seeded from the machines
    # No exec before phase 1 (it is the check): the two phases are every exec, from the one builder.
    prepares, applies = api.phase_calls("prepare"), api.phase_calls("apply")
    assert [_rpc_of(call) for call in api.calls] == ["prepare"] * 2 + ["apply"] * 2
    assert sorted(call[0] for call in prepares) == sorted(call[0] for call in applies) == ["a", "b"]
    assert prepares[0][1] == [*RUN_IN_APP, "rpc", "prepare", "--app", "shop",
                              "--url", hot["tarball_url"], "--sha256", hot["sha256"],
                              "--expires-in", "150", "--upgrade-id", report.upgrade_id]
    assert applies[0][1] == [*RUN_IN_APP, "rpc", "apply", "--app", "shop",
                             "--url", hot["tarball_url"], "--sha256", hot["sha256"],
                             "--deployed-at", hot["deployed_at"],  # as recorded: no current.json read there
                             "--suspend-timeout", "4", "--upgrade-id", report.upgrade_id]
    assert {call[2] for call in api.calls} == {50}
    assert "✓ a (ams) ready: 1 file to write, 1 process prepared" in out
    assert "✓ b (ord) 2 modules, 1 process, suspended 3 ms" in out
    assert "· c (ams) stopped: applies at next start" in out
    assert "2/2 machines upgraded to v1" in out and "1 stopped machine" in out
    assert not lock_key_exists(store)

    again, out = run(store, api, app_root)  # same version, same content
    assert not again.uploaded and "already stored" in out and again.sha256 == report.sha256
    write(app_root / "shop" / "__init__.py", "VERSION = 2\n")
    with pytest.raises(flydeploy.FlyDeployError, match="already exists with other content"):
        run(store, api, app_root)
    assert not lock_key_exists(store)


def test_failures_and_timeouts_fail_the_run_and_release_the_lock(store, app_root):
    def answer(machine_id, argv):
        if _rpc_of((machine_id, argv)) != "apply":
            return succeed(machine_id, argv)
        if machine_id == "b":
            return flydeploy.ExecResult(1, 0, result_line(success=False, applied=False, error="pid 7: SyntaxError"), "")
        if machine_id == "c":
            raise flydeploy.MachinesAPIError(408, "deadline_exceeded")
        return succeed(machine_id, argv)

    api = StubMachines([machine("a"), machine("b"), machine("c")], answer)
    report, out = run(store, api, app_root, timeout=7, on_failure="keep")
    assert report.exit_code == 1
    assert {o.machine_id for o in report.failed} == {"b", "c"}
    assert "✗ b (ams) pid 7: SyntaxError" in out and "✗ c (ams) timed out after 0 s in all (7 s per attempt" in out
    assert "1/3 machines upgraded" in out and "FAILED: " in out
    assert "runs v1: a; runs the image's code: b; runs the image's code or v1 (no result): c" in out
    assert not lock_key_exists(store)


def _rpc_of(call):
    argv = call[1]
    return argv[argv.index("rpc") + 1]


def test_max_concurrency_is_reached_and_never_exceeded(store, app_root):
    limit, running, peak = 3, [0], [0]
    barrier = threading.Barrier(limit, timeout=30)
    guard = threading.Lock()

    def answer(machine_id, argv):
        with guard:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        barrier.wait()  # passes only when `limit` execs run at once
        with guard:
            running[0] -= 1
        return succeed(machine_id, argv)

    api = StubMachines([machine(f"m{i}") for i in range(9)], answer)
    report, _ = run(store, api, app_root, max_concurrency=limit)
    assert report.exit_code == 0 and len(report.outcomes) == 9 and peak[0] == limit


def test_a_held_lock_stops_before_anything_is_stored(store, app_root):
    flydeploy.acquire_lock(store, "shop", owner="bob@example.com", deployment_id="d", timeout_s=600)
    api = StubMachines([machine("a")], succeed)
    with pytest.raises(flydeploy.LockHeld, match="bob@example.com"):
        run(store, api, app_root)
    assert api.calls == [] and flydeploy.read_current(store, "shop") == (None, None)
    report, _ = run(store, api, app_root, force=True)
    assert report.exit_code == 0 and not lock_key_exists(store)


def test_ctrl_c_releases_the_lock(store, app_root):
    main_thread = threading.main_thread().ident
    stop = threading.Event()

    def answer(machine_id, argv):
        signal.pthread_kill(main_thread, signal.SIGINT)
        stop.wait(30)
        return succeed(machine_id, argv)

    api = StubMachines([machine("a"), machine("b")], answer)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(store, api, app_root, max_concurrency=1)
    finally:
        stop.set()
    assert not lock_key_exists(store)
    assert len(api.calls) == 1  # the queued machine was never started, nothing was applied


def test_rollback_goes_back_to_the_previous_or_a_named_release(store, app_root):
    api = StubMachines([machine("a")], succeed)
    first, _ = run(store, api, app_root, version="v1")
    write(app_root / "shop" / "__init__.py", "VERSION = 2\n")
    run(store, api, app_root, version="v2")
    api.calls.clear()
    back, out = run(store, api, app_root, version=None, rollback=True)
    assert back.version == "v1" and back.sha256 == first.sha256 and "Rolling shop back to v1" in out
    calls = api.phase_calls("apply")
    assert calls[0][1][calls[0][1].index("--sha256") + 1] == first.sha256
    doc, _ = flydeploy.read_current(store, "shop")
    assert doc["hot_upgrade"]["version"] == "v1" and doc["history"][0]["version"] == "v2"
    again, _ = run(store, api, app_root, version=None, rollback_to="v2")
    assert again.version == "v2"
    with pytest.raises(flydeploy.FlyDeployError, match="not in the hot upgrade history; pass --to one of"):
        run(store, api, app_root, version=None, rollback_to="v9")
    assert not lock_key_exists(store)


def test_a_bug_in_the_per_machine_step_surfaces_instead_of_hanging():
    def explode(item):
        if item == 2:
            raise RuntimeError("bug")
        return item

    with pytest.raises(RuntimeError, match="bug"):
        list(flydeploy._map_concurrently(explode, [1, 2, 3], 2))


def test_orchestrate_without_a_token_names_the_secret(store, app_root, monkeypatch):
    monkeypatch.delenv("FLYDEPLOY_API_TOKEN", raising=False)
    monkeypatch.delenv("FLY_API_TOKEN", raising=False)
    with pytest.raises(flydeploy.ConfigError, match="set the FLY_API_TOKEN app secret"):
        flydeploy.orchestrate("shop", "img", store=store, root=app_root, out=io.StringIO())
    assert not lock_key_exists(store)
