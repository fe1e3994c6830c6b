"""The two phases of a fleet upgrade, decided by pure functions and driven by
``orchestrate`` against a local store and a stub Machines API: refusals that
change nothing, the fleet rollback, canaries, health-check ports, machines that
cannot be reached and ``--plan``."""

import json
import re

import pytest

import flydeploy
from tests.fleet_doubles import (PREFLIGHT_OK, StubMachines, lock_key_exists, machine, ready, result_line, run,
                                 succeed, write)

pytest_plugins = ["tests.fleet_doubles"]

WEB = [{"protocol": "tcp", "internal_port": 8080}, {"protocol": "tcp", "internal_port": 9090},
       {"protocol": "tcp", "internal_port": 8080}]


def rpc(argv):
    return argv[argv.index("rpc") + 1]


def flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def outcome(machine_id, ok=True, result=None, answered=True, error=None):
    return flydeploy.MachineOutcome(machine_id, "ams", ok, error, result, answered)


# --- the decisions ----------------------------------------------------------------


def test_judge_prepare_goes_only_when_every_machine_is_ready():
    refused = outcome("b", False, {"status": "refused", "success": False}, error="pid 3: cold deploy required")
    unreachable = outcome("c", False, None, answered=False, error="exec failed: 412")
    verdict = flydeploy.judge_prepare([outcome("a", result={"status": "ready"}), refused, unreachable])
    assert not verdict.go and [o.machine_id for o in verdict.refused] == ["b", "c"] and not verdict.missing
    lenient = flydeploy.judge_prepare([outcome("a"), unreachable], allow_missing=True)
    assert lenient.go and [o.machine_id for o in lenient.missing] == ["c"]
    assert lenient.notes() == ["· c (ams) not reached: --allow-missing, it catches up at its next boot"]
    # Refused is never "missing": only a machine that gave no answer may be left to its next boot.
    assert not flydeploy.judge_prepare([refused], allow_missing=True).go
    assert verdict.summary("v2", planned=False).startswith("v2 was not applied anywhere: b, c refuse it")
    assert flydeploy.judge_prepare([]).go


def test_only_an_exec_refused_for_the_token_runs_again_and_only_with_another_client():
    refused = flydeploy.MachineOutcome("b", "ams", False, "the Machines API refused the exec", None, False,
                                       api_status=403)
    gone = flydeploy.MachineOutcome("c", "ams", False, "exec failed: 412", None, False, api_status=412)
    ran = [outcome("a"), refused, gone, outcome("d", False, None, error="exec failed: 403 in its output")]
    assert flydeploy.judge_exec_refusals(ran, fallback=True) == ([refused], [ran[0], gone, ran[3]])
    assert flydeploy.judge_exec_refusals(ran, fallback=False) == ([], ran)
    # Refused for the token is not "not reached": --allow-missing does not leave it to its next boot.
    verdict = flydeploy.judge_prepare(ran, allow_missing=True)
    assert [o.machine_id for o in verdict.refused] == ["b", "d"] and verdict.missing == (gone,)


def test_the_preflight_explains_only_a_failure_before_the_machine_had_the_release():
    early = outcome("early", False, {"status": "failed", "release_bytes": 0, "processes": []},
                    error="missing environment variable(s) AWS_SECRET_ACCESS_KEY")
    no_agent = outcome("no-agent", False, {"status": "failed", "release_bytes": 321, "processes": []},
                       error="no flydeploy agent runs on this machine")
    worker = {"pid": 9, "name": "worker", "ok": False, "error": "no answer", "plan": None}
    silent = outcome("silent-agent", False, {"status": "failed", "release_bytes": 321, "processes": [worker]})
    refused = outcome("refused", False, {"status": "refused", "release_bytes": 321, "processes": [worker]})
    crashed = outcome("crashed", False, None, error="flydeploy is not importable the way the upgrade runs it")
    gone = outcome("gone", False, None, answered=False)
    ran = [outcome("a", result={"status": "ready"}), early, no_agent, silent, refused, crashed, gone]
    assert flydeploy.to_explain(ran) == ["early"]


def test_only_a_machine_whose_prepare_says_its_apply_takes_a_flag_is_given_it():
    takes = {"apply_accepts": ["--deployed-at"]}
    outcomes = [outcome("new", result=takes), outcome("old", result={"status": "ready"}),
                outcome("failed", ok=False, result=takes), outcome("silent", result=None)]
    assert flydeploy.accepting(outcomes, "--deployed-at") == ["new"]
    assert flydeploy.accepting(outcomes, "--not-a-flag") == []


def test_discard_and_revert_pick_the_machines_that_may_hold_something():
    outcomes = [outcome("ready"), outcome("refused", False, {"status": "refused"}),
                outcome("silent", False, None), outcome("gone", False, None, answered=False)]
    assert flydeploy.to_discard(outcomes) == ["ready", "silent"]
    applies = [outcome("a", result={"applied": True, "success": True}),
               outcome("unhealthy", False, {"applied": True, "success": False}),
               outcome("undone", False, {"applied": False, "success": False}),
               outcome("silent", False, None), outcome("gone", False, None, answered=False)]
    assert flydeploy.to_revert(applies) == ["a", "unhealthy", "silent"]


def test_only_a_revert_that_kept_nothing_restarts_the_machine():
    reverted = [outcome("ok", result={"status": "ready"}),
                outcome("caught-up", False, {"status": flydeploy.NOTHING_KEPT}, error="nothing to revert"),
                outcome("broken", False, {"status": "failed"}, error="disk full"),
                outcome("silent", False, None), outcome("gone", False, None, answered=False)]
    assert flydeploy.to_restart(reverted) == ["caught-up"]


def test_a_restarted_machine_is_judged_by_what_its_processes_run():
    m = machine("r", region="iad")
    back = flydeploy.judge_restart(m, [{"pid": 1, "version": None}], None, flydeploy._IMAGE_CODE)
    assert back.ok and back.machine_id == "r"
    assert flydeploy.applied_version(outcome("r", result={"applied": True}), back, "v2", "v1") == "v1"
    still = flydeploy.judge_restart(m, [{"pid": 1, "version": "v2"}, {"pid": 2, "version": None}], None, "v1")
    assert not still.ok and still.error == "restarted to go back to v1, but it runs the image's code, v2"
    assert flydeploy.applied_version(outcome("r", result={"applied": True}), still, "v2", "v1") == (
        "the image's code, v2")
    silent = flydeploy.judge_restart(m, None, "exec failed: 412", "v1")
    assert not silent.ok and "exec failed: 412" in silent.error
    assert flydeploy.applied_version(outcome("r", result={"applied": True}), silent, "v2", "v1") == (
        "v1 or v2 (not known after its restart)")


def test_canaries_are_spread_across_groups_then_regions():
    fleet = [machine("a1", region="ams"), machine("a2", region="ams"), machine("a3", region="iad"),
             machine("w1", group="worker", region="ams"), machine("w2", group="worker", region="syd")]
    assert [m["id"] for m in flydeploy.pick_canaries(fleet, 1)] == ["a1"]
    assert [m["id"] for m in flydeploy.pick_canaries(fleet, 2)] == ["a1", "w2"]
    assert [m["id"] for m in flydeploy.pick_canaries(fleet, 3)] == ["a1", "w2", "a3"]
    assert len(flydeploy.pick_canaries(fleet, 9)) == 5 and flydeploy.pick_canaries(fleet, 0) == []


def test_health_ports_come_from_the_flag_else_the_services():
    web = machine("a", services=WEB)
    assert flydeploy.health_ports_for(web) == [8080, 9090]
    assert flydeploy.health_ports_for(web, (7000, 7000)) == [7000]
    assert flydeploy.health_ports_for(machine("w", group="worker")) == []


def test_withdrawing_a_record_makes_the_previous_current_again():
    v1, v2 = {"version": "v1", "sha256": "1" * 64}, {"version": "v2", "sha256": "2" * 64}
    doc = {"image_ref": "img", "hot_upgrade": v2, "history": [v1]}
    back = flydeploy.withdraw_hot_upgrade(doc, v2)
    assert back["hot_upgrade"] == v1 and back["history"] == [] and back["image_ref"] == "img"
    assert flydeploy.withdraw_hot_upgrade({"hot_upgrade": v2, "history": []}, v2)["hot_upgrade"] is None
    assert flydeploy.withdraw_hot_upgrade(doc, v1) == doc  # someone else's record stays


def test_the_phases_are_named_with_their_point_of_no_return():
    phases = flydeploy.FLEET_PHASES
    assert phases.index("prepare") < phases.index("judge") < phases.index(flydeploy.FLEET_POINT_OF_NO_RETURN)
    assert phases.index(flydeploy.FLEET_POINT_OF_NO_RETURN) < phases.index("apply") < phases.index("revert")


# --- orchestrate, phase by phase -----------------------------------------------------


def refusing(refuser, reason="cold deploy required: shop/native.so changed"):
    def answer(machine_id, argv):
        if machine_id == refuser and rpc(argv) == "prepare":
            plan = {"modules_changed": [], "modules_added": [], "code_change": [], "refused": reason}
            return flydeploy.ExecResult(1, 0, result_line(
                machine_id=machine_id, status="refused", success=False, error=None,
                processes=[{"pid": 9, "name": "worker", "ok": False, "error": reason, "plan": plan}]), "")
        return succeed(machine_id, argv)
    return answer


def test_one_refusing_machine_stops_the_upgrade_everywhere(store, app_root):
    api = StubMachines([machine("a"), machine("b"), machine("w", group="worker")], refusing("w"))
    report, out = run(store, api, app_root)
    assert report.exit_code == 1 and report.refused and report.outcomes == []
    assert api.phase_calls("apply") == []
    # The ready ones discard what they staged; the refuser did so itself.
    assert sorted(call[0] for call in api.phase_calls("discard")) == ["a", "b"]
    assert flag(api.phase_calls("discard")[0][1], "--upgrade-id") == report.upgrade_id
    assert "✗ w (ams) refused: pid 9 (worker): cold deploy required: shop/native.so changed" in out
    assert "v1 was not applied anywhere: w refuses it" in out and "current.json is unchanged" in out
    assert flydeploy.read_current(store, "shop") == (None, None)
    assert not lock_key_exists(store)


def test_a_token_the_api_refuses_with_no_other_client_stops_phase_one_with_the_fix(store, app_root):
    def answer(machine_id, argv):
        if machine_id == "b":  # the API refused it: it never ran there
            raise flydeploy.MachinesAPIError(403, "unauthorized: the token does not allow this command")
        return succeed(machine_id, argv)

    api = StubMachines([machine("a"), machine("b")], answer)
    report, out = run(store, api, app_root)
    assert report.exit_code == 1 and report.refused and api.phase_calls("apply") == []
    assert api.phase_calls("preflight") == []  # phase 1 was the check, and it says why
    prefix = " ".join(flydeploy.MachineCommands.for_app_dir("python3", "/app").token_prefix()[:2])
    assert ("✗ b (ams) the Machines API refused the exec (unauthorized: the token does not allow this command): "
            f"the token does not allow `{prefix}") in out
    assert 'set the app\'s FLY_API_TOKEN secret (fly secrets set FLY_API_TOKEN="$(fly tokens create deploy)")' in out
    assert [call[0] for call in api.phase_calls("discard")] == ["a"]
    assert ("v1 was not applied anywhere: b refuses it or could not prepare it; nothing live changed: every "
            "machine runs what it ran, current.json is unchanged; the release was uploaded and stays stored, "
            "current.json does not name it; the deploy lock is released") in out
    assert flydeploy.read_current(store, "shop") == (None, None) and not lock_key_exists(store)


def test_a_machine_that_cannot_get_the_release_is_explained_by_the_preflight(store, app_root):
    def answer(machine_id, argv):
        if machine_id == "b" and rpc(argv) == "prepare":
            return flydeploy.ExecResult(1, 0, result_line(
                machine_id="b", status="failed", success=False, error="missing environment variable(s) "
                "AWS_SECRET_ACCESS_KEY: set them", release_bytes=0, processes=[]), "")
        return succeed(machine_id, argv)

    store_error = "missing environment variable(s) AWS_SECRET_ACCESS_KEY: set them"
    api = StubMachines([machine("a"), machine("b")], answer,
                       preflight={**PREFLIGHT_OK, "store": {"ok": False, "error": store_error}})
    report, out = run(store, api, app_root)
    assert report.exit_code == 1 and api.phase_calls("apply") == []
    assert [call[0] for call in api.phase_calls("preflight")] == ["b"]  # after phase 1, on b alone
    fix = ("the bucket is not reachable from the machine with its own credentials (" + store_error + "): give "
           "the app its bucket secrets (`fly storage create` sets BUCKET_NAME, AWS_ENDPOINT_URL_S3, "
           "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    assert f"✗ group app: b (ams): {fix}" in out
    (failed,) = report.verdict.refused
    assert failed.machine_id == "b" and failed.error.endswith(fix)
    assert "nothing live changed" in out and flydeploy.read_current(store, "shop") == (None, None)
    assert not lock_key_exists(store)


def test_an_unreachable_machine_stops_it_unless_missing_is_allowed(store, app_root):
    def answer(machine_id, argv):
        if machine_id == "gone":
            raise flydeploy.MachinesAPIError(412, "machine not started")
        return succeed(machine_id, argv)

    api = StubMachines([machine("a"), machine("gone")], answer)
    report, _ = run(store, api, app_root)
    assert report.exit_code == 1 and api.phase_calls("apply") == []
    assert [call[0] for call in api.phase_calls("discard")] == ["a"]
    api.calls.clear()
    report, out = run(store, api, app_root, allow_missing=True)
    assert report.exit_code == 0 and [call[0] for call in api.phase_calls("apply")] == ["a"]
    assert "gone (ams) not reached: --allow-missing" in out and "not reached, catch up at next boot: gone" in out
    assert flydeploy.read_current(store, "shop")[0]["hot_upgrade"]["version"] == "v1"


def failing_apply(failer):
    def answer(machine_id, argv):
        if machine_id == failer and rpc(argv) == "apply" and "--revert" not in argv:
            return flydeploy.ExecResult(1, 0, result_line(success=False, applied=False,
                                                          error="pid 4: code_change raised KeyError('n')"), "")
        return succeed(machine_id, argv)
    return answer


def test_a_failed_apply_rolls_the_fleet_back_two_phase(store, app_root):
    api = StubMachines([machine("a")], succeed)
    run(store, api, app_root, version="v1")
    write(app_root / "shop" / "__init__.py", "VERSION = 2\n")
    # One at a time, in the order they became ready: a, b, c.
    api = StubMachines([machine("a"), machine("b"), machine("c")], failing_apply("b"))
    report, out = run(store, api, app_root, version="v2", max_concurrency=1)
    assert report.exit_code == 1 and report.rolled_back
    applied = [call[0] for call in api.phase_calls("apply") if "--revert" not in call[1]]
    assert applied == ["a", "b"]  # c was not started after b failed
    reverts = [call for call in api.calls if "--revert" in call[1]]
    assert [(call[0], rpc(call[1])) for call in reverts] == [("a", "prepare"), ("a", "apply")]
    assert {flag(call[1], "--revert") for call in reverts} == {report.upgrade_id}
    assert {flag(call[1], "--upgrade-id") for call in reverts} == {report.upgrade_id + "-back"}
    doc = flydeploy.read_current(store, "shop")[0]
    assert doc["hot_upgrade"]["version"] == "v1" and [h["version"] for h in doc["history"]] == []
    assert report.machine_versions() == {"a": "v1", "b": "v1"}
    assert "v2 was rolled back" in out and "runs v1: a, b" in out and "↩ ✓ a (ams)" in out
    assert not lock_key_exists(store)


def test_keep_leaves_the_machines_that_applied(store, app_root):
    api = StubMachines([machine("a"), machine("b"), machine("c")], failing_apply("b"))
    report, out = run(store, api, app_root, on_failure="keep", max_concurrency=1)
    assert report.exit_code == 1 and not report.rolled_back
    assert sorted(call[0] for call in api.phase_calls("apply")) == ["a", "b", "c"]
    assert not [call for call in api.calls if "--revert" in call[1]]
    assert flydeploy.read_current(store, "shop")[0]["hot_upgrade"]["version"] == "v1"
    assert "runs v1: a, c; runs the image's code: b" in out


def test_a_failing_canary_leaves_the_others_unchanged(store, app_root):
    fleet = [machine("a1"), machine("a2", region="iad"), machine("w1", group="worker")]

    def answer(machine_id, argv):
        if rpc(argv) == "apply" and "--revert" not in argv and machine_id == "a1":
            return flydeploy.ExecResult(1, 0, result_line(
                success=False, applied=True, error="health check failed: GET :8080/healthz answered 503",
                health={"ok": False, "checks": [{"port": 8080, "status": 503, "error": None}]}), "")
        return succeed(machine_id, argv)

    api = StubMachines(fleet, answer)
    report, out = run(store, api, app_root, canary=1, health_check="/healthz")
    assert report.exit_code == 1
    assert [call[0] for call in api.phase_calls("apply") if "--revert" not in call[1]] == ["a1"]
    assert [call[0] for call in api.calls if "--revert" in call[1]] == ["a1", "a1"]  # kept the release: reverted
    assert "a canary failed: the other 2 machines did not change" in out
    assert flydeploy.read_current(store, "shop") [0]["hot_upgrade"] is None


def test_canaries_go_first_and_health_checks_reach_every_apply(store, app_root):
    fleet = [machine("a1", services=WEB), machine("a2", region="iad", services=WEB), machine("w1", group="worker")]
    api = StubMachines(fleet, succeed)
    report, out = run(store, api, app_root, canary=2, canary_wait=0.1, health_check="/healthz",
                      health_timeout=2)
    assert report.exit_code == 0
    applies = api.phase_calls("apply")
    assert [call[0] for call in applies] in (["a1", "w1", "a2"],)
    by_id = {call[0]: call[1] for call in applies}
    assert by_id["a1"][by_id["a1"].index("--health-check"):by_id["a1"].index("--upgrade-id")] == [
        "--health-check", "/healthz", "--health-timeout", "2", "--health-port", "8080", "--health-port", "9090"]
    assert "--health-port" not in by_id["w1"] and "--health-check" in by_id["w1"]  # processes alive only
    assert "canaries first: a1 (ams, app), w1 (ams, worker)" in out and "watching them 0.1 s" in out
    assert re.search(r"Phase 2 took \d+\.\d\d s fleet-wide; the slowest machine \d+\.\d\d s", out)
    # Each machine's line has its own wall time.
    assert re.search(r"✓ a1 \(ams\) 2 modules, 1 process, suspended 3 ms, \d+\.\d\d s in all", out)


def test_a_machine_with_an_older_flydeploy_is_not_given_an_apply_flag_it_would_refuse(store, app_root):
    # Until the apply publishes the release, a machine runs the flydeploy.py it has: one from
    # before --deployed-at says nothing of it in its prepare result, and exits 2 on it.
    def answer(machine_id, argv):
        if rpc(argv) == "prepare" and machine_id == "old":
            result = json.loads(ready(machine_id, argv).stdout.split("__FLYDEPLOY_RESULT__")[1])
            del result["apply_accepts"]
            return flydeploy.ExecResult(0, 0, "prepared\n" + result_line(**result), "")
        if rpc(argv) == "apply" and machine_id == "old" and "--deployed-at" in argv:
            return flydeploy.ExecResult(2, 0, "", "error: unrecognized arguments: --deployed-at")
        return succeed(machine_id, argv)

    api = StubMachines([machine("new"), machine("old")], answer)
    report, out = run(store, api, app_root)
    assert report.exit_code == 0, out
    applies = {call[0]: call[1] for call in api.phase_calls("apply")}
    recorded = flydeploy.read_current(store, "shop")[0]["hot_upgrade"]["deployed_at"]
    assert flag(applies["new"], "--deployed-at") == recorded
    assert "--deployed-at" not in applies["old"]


def test_plan_prepares_everywhere_changes_nothing_and_says_what_would_happen(store, app_root):
    api = StubMachines([machine("a"), machine("b"), machine("w", group="worker")], refusing("w"))
    report, out = run(store, api, app_root, plan=True)
    assert report.exit_code == 1 and report.planned and api.phase_calls("apply") == []
    assert sorted(call[0] for call in api.phase_calls("discard")) == ["a", "b"]
    assert flydeploy.read_current(store, "shop") == (None, None)
    doc = report.plan
    assert json.loads(json.dumps(doc)) == doc and not doc["would_apply"] and doc["uploaded"]
    groups = {g["group"]: g for g in doc["groups"]}
    assert groups["app"]["machines"] == ["a", "b"] and groups["app"]["plan"]["modules_changed"] == ["shop"]
    assert groups["worker"]["plan"]["refused"] == ["pid 9 (worker): cold deploy required: shop/native.so changed"]
    assert "group app (2 machines: a, b): ready" in out and "group worker (1 machine: w): REFUSED" in out
    assert "uploaded now: the only change this plan made" in out
    assert "v1 would be refused: w refuses it" in out

    good, out = run(store, StubMachines([machine("a")], succeed), app_root, plan=True)
    assert good.exit_code == 0 and good.plan["would_apply"] and "already stored" in out
    assert "would apply on 1 machine" in out and flydeploy.read_current(store, "shop") == (None, None)


def test_a_plan_that_differs_within_a_group_is_shown_per_machine(store, app_root):
    def answer(machine_id, argv):
        if rpc(argv) == "prepare" and machine_id == "b":
            plan = {"modules_changed": ["shop"], "modules_added": [], "refused": None,
                    "code_change": [{"server": "shop.Counter", "vsn_old": 1, "vsn_new": 2}]}
            return ready(machine_id, argv, processes=[{"pid": 8, "name": "web", "ok": True, "plan": plan}])
        return succeed(machine_id, argv)

    report, out = run(store, StubMachines([machine("a"), machine("b", region="iad")], answer), app_root, plan=True)
    assert report.exit_code == 0 and not report.plan["groups"][0]["same_plan"]
    assert "group app, machine a (ams): ready" in out and "group app, machine b (iad): ready" in out
    assert "code_change: shop.Counter vsn 1 -> 2" in out


@pytest.mark.parametrize("settings, message", [
    ('health_check = "healthz"', "health_check must be a URL path starting with /"),
    ("health_ports = [8080, 70000]", "health_ports must be a list of TCP ports"),
    ('on_failure = "retry"', "on_failure must be one of 'rollback', 'keep'"),
    ('allow_missing = "yes"', "allow_missing must be true or false"),
    ("canary = 0", "canary must be a whole number of at least 1"),
])
def test_bad_fleet_settings_are_named(project, settings, message):
    write(project / "pyproject.toml", f"[tool.flydeploy]\n{settings}\n")
    with pytest.raises(flydeploy.ConfigError, match=message):
        flydeploy.load_config(project)


def test_fleet_settings_reach_the_orchestrator(project):
    write(project / "pyproject.toml", '[tool.flydeploy]\nhealth_check = "/up"\nhealth_ports = 8000\n'
                                      'allow_missing = true\ncanary = 2\n')
    config = flydeploy.load_config(project)
    assert (config.health_check, config.health_ports, config.allow_missing, config.canary) == ("/up", (8000,), True, 2)
    args = flydeploy._entry_parser().parse_args(["orchestrate", "--image-ref", "i", *config.orchestrate_flags()])
    assert flydeploy.load_config(project, overrides=flydeploy.fleet_overrides(args)).orchestrate_options() == (
        config.orchestrate_options())


def test_a_canary_that_dies_during_its_wait_stops_the_rest(store, app_root):
    def answer(machine_id, argv):
        if rpc(argv) == "ping":
            return flydeploy.ExecResult(1, 0, "web: [Errno 111] Connection refused\n", "")
        return succeed(machine_id, argv)

    api = StubMachines([machine("a1"), machine("a2")], answer)
    report, out = run(store, api, app_root, canary=1, canary_wait=0.05)
    assert report.exit_code == 1 and report.rolled_back
    assert [call[0] for call in api.phase_calls("apply") if "--revert" not in call[1]] == ["a1"]
    assert "✗ a1 (ams) after the canary wait: web: [Errno 111] Connection refused" in out
    assert "a canary failed: the other 1 machine did not change" in out


def test_a_machine_stopped_between_the_phases_catches_up_instead_of_failing(store, app_root):
    fleet = [machine("a"), machine("s")]

    def answer(machine_id, argv):
        if machine_id == "s" and rpc(argv) == "apply":
            fleet[1]["state"] = "stopped"  # Fly's proxy stopped it after it prepared
            raise flydeploy.MachinesAPIError(412, "machine not started")
        return succeed(machine_id, argv)

    api = StubMachines(fleet, answer)
    report, out = run(store, api, app_root)
    assert report.exit_code == 0 and not report.rolled_back and [o.machine_id for o in report.outcomes] == ["a"]
    assert "· s (ams) stopped since phase 1: applies at next start" in out
    assert "1/1 machine upgraded to v1" in out and "1 stopped machine will apply it at next start" in out
    assert flydeploy.read_current(store, "shop")[0]["hot_upgrade"]["version"] == "v1"
