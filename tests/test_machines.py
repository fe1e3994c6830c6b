"""The Machines API client against the fake Fly, and the fake Fly itself (API, sandboxes, `fly`)."""

from __future__ import annotations

import datetime
import email.utils
import http.server
import json
import os
import pathlib
import shlex
import socket
import ssl
import sys
import threading
import time

import pytest

import flydeploy
from tests.certificates import self_signed_certificate
from tests.fakefly import AUTH_ERROR, FakeFly, write_app_tree
from tests.waiting import wait_until

pytest_plugins = ["tests.fakefly.fixtures"]

APP_SOURCE = """\
import os, signal, sys, time
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda n, f: (print("got", signal.Signals(n).name, flush=True), sys.exit(0)))
print("serving", os.environ["FLY_MACHINE_ID"], os.environ.get("GREETING", "-"), flush=True)
while True:
    time.sleep(1)
"""


@pytest.fixture
def demo(fakefly, tmp_path):
    """App "demo": three started machines of the "app" group (ams, iad, syd)."""
    tree = write_app_tree(tmp_path / "src", {"app.py": APP_SOURCE}, app="demo",
                          processes={"app": "python3 app.py", "worker": "python3 app.py"},
                          env={"GREETING": "hello"})
    app = fakefly.create_app("demo", tree, machines=3, secrets={"BUCKET_NAME": "releases"})
    for machine in app.machines:
        machine.wait_for_log("serving")
    return app


def client(fly: FakeFly, token: str, **options) -> flydeploy.Machines:
    return flydeploy.Machines("demo", token, base_url=fly.base_url, backoff=0.01, **options)


def requests_for(fly: FakeFly, op: str) -> list:
    return [r for r in fly.requests if r.op == op]


# --- Authorization --------------------------------------------------------------------


@pytest.mark.parametrize("pasted, expected", [
    ("fm2_abc", "FlyV1 fm2_abc"),
    ("FlyV1 fm2_abc,fm2_def", "FlyV1 fm2_abc,fm2_def"),
    ("Bearer fm1r_xyz", "FlyV1 fm1r_xyz"),
    ("  fm1a_q  ", "FlyV1 fm1a_q"),
    ("fo1_personal", "Bearer fo1_personal"),
    ("FlyV1 fo1_personal", "Bearer fo1_personal"),
    ("bearer plain-token", "Bearer plain-token"),
])
def test_authorization_scheme_follows_the_token_not_what_was_pasted(pasted, expected):
    assert flydeploy.authorization_header(pasted) == expected


def test_an_empty_token_is_a_config_error_naming_the_variable():
    with pytest.raises(flydeploy.ConfigError, match="FLY_API_TOKEN"):
        flydeploy.Machines("demo", "Bearer   ", base_url="http://127.0.0.1:1")


def test_macaroon_and_bearer_tokens_are_accepted_whatever_was_pasted(fakefly, demo):
    bare = demo.token.split(" ")[1]
    for pasted in (demo.token, bare, f"Bearer {bare}"):
        assert len(client(fakefly, pasted).list()) == 3
    assert len(client(fakefly, f"FlyV1 {fakefly.user_token}").list()) == 3
    schemes = [r.scheme for r in requests_for(fakefly, "list")]
    assert schemes == ["FlyV1", "FlyV1", "FlyV1", "Bearer"]


def test_base_url_comes_from_FLY_FLAPS_BASE_URL(fakefly, demo, monkeypatch):
    monkeypatch.setenv("FLY_FLAPS_BASE_URL", fakefly.base_url + "/")
    machines = flydeploy.Machines("demo", demo.token)
    assert machines.base_url == fakefly.base_url
    assert len(machines.list()) == 3
    monkeypatch.delenv("FLY_FLAPS_BASE_URL")
    assert flydeploy.Machines("demo", demo.token).base_url == "https://api.machines.dev"


# --- list and get ---------------------------------------------------------------------------


def test_list_filters_by_state_metadata_region_and_deleted(fakefly, demo):
    worker = demo.add_machine(demo.machines[0].image_ref, process_group="worker", region="syd")
    stopped = demo.add_machine(demo.machines[0].image_ref, start=False)
    gone = demo.add_machine(demo.machines[0].image_ref)
    gone.destroy()
    api = client(fakefly, demo.token)

    ids = lambda machines: {m["id"] for m in machines}  # noqa: E731
    app_ids = {m.id for m in demo.machines[:3]}
    assert ids(api.list()) == app_ids | {worker.id, stopped.id}
    assert ids(api.list(include_deleted=True)) == app_ids | {worker.id, stopped.id, gone.id}
    assert ids(api.list(state="started")) == app_ids | {worker.id}
    assert ids(api.list(state=["stopped", "destroyed"])) == {stopped.id, gone.id}
    assert ids(api.list(metadata={"fly_process_group": "worker"})) == {worker.id}
    assert ids(api.list(state="started", metadata={"fly_process_group": "app"})) == app_ids
    assert ids(api.list(region="syd")) == {demo.machines[2].id, worker.id}
    sent = requests_for(fakefly, "list")[-2].query
    assert sent == {"state": ["started"], "metadata.fly_process_group": ["app"]}


def test_get_returns_the_spec_shape(fakefly, demo):
    machine = demo.machines[1]
    got = client(fakefly, demo.token).get(machine.id)
    assert got["id"] == machine.id and len(got["id"]) == 14 and int(got["id"], 16) >= 0
    assert got["state"] == "started" and got["region"] == "iad"
    assert got["name"] and got["instance_id"] and got["created_at"].endswith("Z")
    ref = got["image_ref"]
    assert f"{ref['registry']}/{ref['repository']}:{ref['tag']}" == got["config"]["image"]
    assert ref["digest"].startswith("sha256:")
    assert got["config"]["metadata"]["fly_platform_version"] == "v2"
    assert got["config"]["metadata"]["fly_process_group"] == "app"
    assert got["config"]["services"][0]["internal_port"] == 8080
    assert got["config"]["env"] == {"GREETING": "hello"}
    assert {e["type"] for e in got["events"]} >= {"launch", "start"}


def test_unknown_machine_is_a_404_with_the_server_text(fakefly, demo):
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, demo.token).get("0123456789abcd")
    assert caught.value.status == 404
    assert caught.value.message == "machine not found"
    assert "fly machines list" in str(caught.value)


# --- exec ------------------------------------------------------------------------------------


def test_exec_runs_in_the_sandbox_and_a_failing_command_is_a_result(fakefly, demo):
    machine = demo.machines[0]
    script = ("import json, os, sys; print(json.dumps({'cwd': os.getcwd(), 'prefix': sys.prefix, "
              "'env': dict(os.environ)})); print('oops', file=sys.stderr); sys.exit(3)")
    result = client(fakefly, demo.token).exec(machine.id, ["python3", "-c", script], timeout=20)
    assert (result.exit_code, result.exit_signal, result.ok) == (3, 0, False)
    assert result.stderr == "oops\n"
    seen = json.loads(result.stdout)
    assert seen["cwd"] == "/"  # init runs an exec'd command in `/`, not the image's WORKDIR
    assert seen["prefix"] == sys.prefix
    env = seen["env"]
    assert env["FLY_MACHINE_ID"] == machine.id
    assert env["FLY_APP_NAME"] == "demo" and env["FLY_REGION"] == "ams"
    assert env["FLY_IMAGE_REF"] == machine.image_ref and env["FLY_PROCESS_GROUP"] == "app"
    assert env["BUCKET_NAME"] == "releases" and env["GREETING"] == "hello"
    assert env["FLYDEPLOY_RUNTIME_DIR"] == str(machine.runtime_dir)
    assert env["FLY_API_TOKEN"] == demo.token
    assert requests_for(fakefly, "exec")[0].body == {"command": ["python3", "-c", script],
                                                      "cmd": shlex.join(["python3", "-c", script]), "timeout": 20}


def test_exec_past_its_deadline_is_a_408_and_the_command_goes_on(fakefly, demo, tmp_path):
    marker = tmp_path / "finished"
    script = f"import time, pathlib; time.sleep(2); pathlib.Path({str(marker)!r}).touch()"
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, demo.token, retries=0).exec(demo.machines[0].id, ["python3", "-c", script],
                                                    timeout=1)
    assert caught.value.status == 408 and "deadline_exceeded" in caught.value.message
    assert not marker.exists()
    wait_until(marker.exists, "the command the 408 left running to finish", timeout=15)


def test_exec_on_a_stopped_machine_says_so(fakefly, demo):
    machine = demo.machines[2]
    machine.stop()
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, demo.token).exec(machine.id, ["true"])
    assert caught.value.status == 412 and "stopped" in caught.value.message


def test_exec_refuses_a_string_command(fakefly, demo):
    with pytest.raises(flydeploy.FlyDeployError, match="list of argument strings"):
        client(fakefly, demo.token).exec(demo.machines[0].id, "python3 -V")
    assert requests_for(fakefly, "exec") == []


class _StubAPI:
    """A one-route server answering every request with a fixed status and body."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.authorizations: list[str] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stub.authorizations.append(self.headers.get("Authorization", ""))
                payload = body.replace(b"$AUTH", self.headers.get("Authorization", "").encode())
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("body, expected", [
    (b'{"exit_code": 2}', flydeploy.ExecResult(2, 0, "", "")),
    (b'{"stdout": "hi", "exit_code": null, "stderr": null}', flydeploy.ExecResult(0, 0, "hi", "")),
    (b"{}", flydeploy.ExecResult()),
])
def test_exec_missing_fields_mean_zero_or_empty(body, expected):
    stub = _StubAPI(200, body)
    try:
        result = flydeploy.Machines("demo", "fm2_x", base_url=stub.url).exec("m1", ["true"])
    finally:
        stub.close()
    assert result == expected


def test_exec_raw_output_from_an_older_api_is_stdout():
    stub = _StubAPI(200, b"raw output\n", "application/octet-stream")
    try:
        result = flydeploy.Machines("demo", "fm2_x", base_url=stub.url).exec("m1", ["true"])
    finally:
        stub.close()
    assert result == flydeploy.ExecResult(0, 0, "raw output\n", "")


# --- errors, retries ---------------------------------------------------------------------


def test_a_bad_token_surfaces_flys_401_text_and_never_the_token(fakefly, demo):
    secret = "fm2_" + "S3cr3t" * 8
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, secret).list()
    error = caught.value
    assert (error.status, error.message) == (401, AUTH_ERROR)
    assert AUTH_ERROR in str(error) and "FLY_API_TOKEN" in str(error)
    for text in (str(error), repr(error), repr(error.args), error.message):
        assert "S3cr3t" not in text
    assert len(requests_for(fakefly, "list")) == 1  # a 401 is not retried


def test_each_macaroon_of_a_token_is_redacted():
    stub = _StubAPI(500, b'{"error": "discharge fm2_Th1rdParty not accepted"}')
    try:
        with pytest.raises(flydeploy.MachinesAPIError) as caught:
            flydeploy.Machines("demo", "FlyV1 fm2_F1rst,fm2_Th1rdParty", base_url=stub.url,
                               retries=0).list()
    finally:
        stub.close()
    assert caught.value.message == "discharge [redacted] not accepted"


def test_a_server_echoing_the_token_gets_it_redacted():
    stub = _StubAPI(400, b'{"message": "bad token in header $AUTH"}')
    try:
        with pytest.raises(flydeploy.MachinesAPIError) as caught:
            flydeploy.Machines("demo", "Bearer fo1_T0pS3cret", base_url=stub.url).get("m1")
    finally:
        stub.close()
    assert stub.authorizations == ["Bearer fo1_T0pS3cret"]
    assert caught.value.message == "bad token in header Bearer [redacted]"
    assert "T0pS3cret" not in str(caught.value)


def test_429_is_retried_after_the_servers_retry_after(fakefly, demo):
    fakefly.faults.add("429", op="list", retry_after="1")
    assert len(client(fakefly, demo.token).list()) == 3
    first, second = requests_for(fakefly, "list")
    assert second.at - first.at >= 1.0


def test_a_retry_after_beyond_a_minute_is_not_waited_out(fakefly, demo):
    fakefly.faults.add("429", op="list", retry_after="3600")
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, demo.token).list()
    assert caught.value.status == 429 and "rate limit" in caught.value.message
    assert len(requests_for(fakefly, "list")) == 1


@pytest.mark.parametrize("header, low, high", [
    ("3", 3, 3), ("0.5", 0.5, 0.5), ("-4", 0, 0), (None, None, None), ("soon", None, None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0, 0),
])
def test_retry_after_header_forms(header, low, high):
    seconds = flydeploy._retry_after_seconds(header)
    assert (seconds is None) == (low is None)
    if seconds is not None:
        assert low <= seconds <= high


def test_retry_after_as_an_http_date_in_the_future():
    future = email.utils.format_datetime(
        datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30), usegmt=True)
    assert 25 <= flydeploy._retry_after_seconds(future) <= 30


def test_500_and_408_are_retried_with_backoff(fakefly, demo):
    fakefly.faults.add("500", op="get", times=2)
    fakefly.faults.add("408", op="get", delay=0.2)
    assert client(fakefly, demo.token).get(demo.machines[0].id)["id"] == demo.machines[0].id
    assert len(requests_for(fakefly, "get")) == 4


def test_retries_give_up_with_the_servers_text(fakefly, demo):
    fakefly.faults.add("500", op="list", times=None)
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, demo.token, retries=2).list()
    assert caught.value.status == 500
    assert caught.value.message == "internal error: fault injected by the test"
    assert len(requests_for(fakefly, "list")) == 3


def test_a_dropped_connection_is_retried(fakefly, demo, tmp_path):
    runs = tmp_path / "runs"
    fakefly.faults.add("drop", op="exec")
    result = client(fakefly, demo.token).exec(
        demo.machines[0].id, ["python3", "-c", f"open({str(runs)!r}, 'a').write('x'); print('done')"])
    assert result.stdout == "done\n"
    assert runs.read_text() == "x"
    assert len(requests_for(fakefly, "exec")) == 2


def test_no_server_at_all_is_an_actionable_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    machines = flydeploy.Machines("demo", "fm2_SECRETVALUE", base_url=f"http://127.0.0.1:{port}",
                                  retries=1, backoff=0.01)
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        machines.list()
    assert caught.value.status == 0
    assert f"127.0.0.1:{port}" in str(caught.value) and "FLY_FLAPS_BASE_URL" in str(caught.value)
    assert "SECRETVALUE" not in str(caught.value)


def test_tls_is_verified_and_an_untrusted_certificate_is_a_clear_error(tmp_path):
    stub = _StubAPI(200, b"[]")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed_certificate(tmp_path))
    stub.server.socket = context.wrap_socket(stub.server.socket, server_side=True)
    try:
        api = flydeploy.Machines("demo", "fm2_x", base_url=stub.url.replace("http:", "https:"),
                                 backoff=0.01)
        with pytest.raises(flydeploy.MachinesAPIError) as caught:
            api.list()
    finally:
        stub.close()
    assert caught.value.status == 0 and "could not be verified" in str(caught.value)
    assert stub.authorizations == []  # nothing was sent over the unverified connection


def test_exec_requests_are_paced_per_machine_not_globally(fakefly, demo):
    api = client(fakefly, demo.token)
    sent: list[tuple[str, float]] = []
    send = api._send

    def recording_send(method, target, *args):
        # When each request leaves the client: the server's arrival times add network jitter.
        sent.append((target.split("/machines/")[1].split("/")[0], time.monotonic()))
        return send(method, target, *args)

    api._send = recording_send
    machines = [m.id for m in demo.machines]
    first = machines[0]
    api.exec(first, ["true"])
    threads = [threading.Thread(target=api.exec, args=(mid, ["true"])) for mid in [first] * 4 + machines[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The API allows a burst of three, then one a second (docs: working-with-machines-api).
    on_first = sorted(at for machine, at in sent if machine == first)
    assert len(on_first) == 5 and on_first[2] - on_first[0] < 1.0
    assert on_first[3] - on_first[0] >= 1.0 and on_first[4] - on_first[3] >= 1.0
    # The other machines were not held behind the first one's pacing.
    others = [at for machine, at in sent if machine != first]
    assert len(others) == 2 and max(others) < on_first[3]
    assert len(requests_for(fakefly, "exec")) == 7


def test_the_exec_pacer_allows_a_burst_of_three_then_one_per_interval():
    pacer = flydeploy._Pacer(1.1, 3)
    assert [pacer.reserve("m", 100.0) for _ in range(5)] == pytest.approx([100.0, 100.0, 100.0, 101.1, 102.2])
    assert pacer.reserve("other", 100.0) == 100.0  # keys do not wait for one another
    assert pacer.reserve("m", 110.0) == 110.0  # the bucket refilled meanwhile
    assert [pacer.reserve("m", 110.0) for _ in range(3)] == pytest.approx([110.0, 110.0, 111.1])


# --- wait, start, stop, lease ----------------------------------------------------------------


def test_stop_wait_start_round_trip_restarts_the_app_process(fakefly, demo):
    machine = demo.machines[0]
    api = client(fakefly, demo.token)
    old_pid = machine.pid
    api.stop(machine.id)
    assert api.wait(machine.id, "stopped", timeout=10) == {"ok": True}
    assert api.get(machine.id)["state"] == "stopped"
    assert "got SIGINT" in machine.logs()  # Fly's default kill signal
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    demo.set_secrets(GREETING="changed")  # secrets win over [env], at the next start
    assert api.start(machine.id)["previous_state"] == "stopped"
    api.wait(machine.id, "started", timeout=10)
    assert machine.wait_for_log(f"serving {machine.id} changed")


def test_kill_signal_and_timeout_come_from_fly_toml_or_the_request(fakefly, tmp_path):
    tree = write_app_tree(tmp_path / "src", {"app.py": APP_SOURCE, "fly.toml": (
        'app = "sig"\nkill_signal = "SIGTERM"\nkill_timeout = 7\n[processes]\napp = "python3 app.py"\n')},
        app="sig")
    app = fakefly.create_app("sig", tree, machines=1)
    machine = app.machines[0]
    assert machine.config["stop_config"] == {"signal": "SIGTERM", "timeout": "7s"}
    machine.wait_for_log("serving")
    api = flydeploy.Machines("sig", app.token, base_url=fakefly.base_url)
    api.stop(machine.id)
    assert "got SIGTERM" in machine.logs()
    api.start(machine.id)
    machine.wait_for_log("serving", count=2)
    api.stop(machine.id, signal="SIGINT", timeout=3)
    assert machine.wait_for_log("got SIGINT")
    assert requests_for(fakefly, "stop")[-1].body == {"signal": "SIGINT", "timeout": "3s"}


def test_wait_timeout_is_a_408_not_retried(fakefly, demo):
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, demo.token).wait(demo.machines[0].id, "stopped", timeout=1)
    assert caught.value.status == 408
    assert len(requests_for(fakefly, "wait")) == 1


def test_leases_guard_start_and_stop(fakefly, demo):
    machine = demo.machines[0].id
    api = client(fakefly, demo.token)
    lease = api.acquire_lease(machine, ttl=60, description="hot upgrade")
    assert lease["nonce"] and lease["description"] == "hot upgrade"
    assert api.get_lease(machine)["nonce"] == lease["nonce"]
    with pytest.raises(flydeploy.MachinesAPIError) as held:
        api.acquire_lease(machine)
    assert held.value.status == 409
    with pytest.raises(flydeploy.MachinesAPIError) as guarded:
        api.stop(machine)
    assert guarded.value.status == 409 and "fly-machine-lease-nonce" in guarded.value.message
    api.stop(machine, lease_nonce=lease["nonce"])
    api.release_lease(machine, lease["nonce"])
    with pytest.raises(flydeploy.MachinesAPIError) as none:
        api.get_lease(machine)
    assert none.value.status == 404
    api.start(machine)


def test_suspended_machines_freeze_and_resume(fakefly, demo):
    machine = demo.machines[1]
    machine.suspend()
    assert client(fakefly, demo.token).list(state="suspended")[0]["id"] == machine.id
    assert _process_state(machine.pid) == "T"
    client(fakefly, demo.token).start(machine.id)
    assert _process_state(machine.pid) != "T"


def _process_state(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_restart_boots_from_the_image_and_a_resume_does_not(fakefly, demo):
    machine = demo.machines[0]
    (machine.root / "app.py").write_text("changed in place")
    machine.suspend()
    machine.start()
    assert (machine.root / "app.py").read_text() == "changed in place"
    (machine.runtime_dir / "agent.sock").touch()
    machine.stop()
    machine.start()
    assert (machine.root / "app.py").read_text() == APP_SOURCE
    assert list(machine.runtime_dir.iterdir()) == []
    machine.wait_for_log("serving")


def test_restart_stops_the_app_process_and_boots_it_from_the_image(fakefly, demo):
    machine = demo.machines[0]
    api = client(fakefly, demo.token)
    old_pid = machine.pid
    (machine.root / "app.py").write_text(APP_SOURCE.replace('"serving"', '"changed"'))
    assert api.restart(machine.id, timeout=3) == {"ok": True}
    assert requests_for(fakefly, "restart")[-1].query == {"timeout": ["3"]}
    assert api.wait(machine.id, "started", timeout=10) == {"ok": True}
    assert "got SIGINT" in machine.logs()
    with pytest.raises(ProcessLookupError):
        os.kill(old_pid, 0)
    assert (machine.root / "app.py").read_text() == APP_SOURCE  # the image's tree again
    assert machine.wait_for_log(f"serving {machine.id}", count=2) and machine.pid != old_pid


def test_restart_is_retried_like_the_other_calls_and_guarded_by_leases(fakefly, demo):
    machine = demo.machines[1].id
    api = client(fakefly, demo.token)
    fakefly.faults.add("500", op="restart")
    api.restart(machine)
    assert len(requests_for(fakefly, "restart")) == 2
    lease = api.acquire_lease(machine, ttl=60)
    with pytest.raises(flydeploy.MachinesAPIError) as guarded:
        api.restart(machine)
    assert guarded.value.status == 409
    api.restart(machine, lease_nonce=lease["nonce"])
    api.release_lease(machine, lease["nonce"])


def test_the_app_command_comes_from_init_processes_or_the_dockerfile(fakefly, tmp_path):
    tree = write_app_tree(tmp_path / "cmd", {
        "Dockerfile": 'FROM python:3.12-slim\nENV MODE=docker\nCMD ["python3", "app.py", "from-cmd"]\n',
        "app.py": "import os, sys, time; print('args', sys.argv[1:], os.environ['MODE'], flush=True); "
                  "time.sleep(600)\n"}, app="cmds", processes={"worker": "python3 app.py from-group"})
    app = fakefly.create_app("cmds", tree)
    ref = fakefly.images("cmds")[0]
    assert app.add_machine(ref).wait_for_log("args ['from-cmd'] docker")
    assert app.add_machine(ref, process_group="worker").wait_for_log("args ['from-group'] docker")
    assert app.add_machine(ref, command=["python3", "app.py", "x"]).wait_for_log("args ['x'] docker")
    overridden = app.add_machine(ref, entrypoint=["sleep", "600"])
    assert overridden.logs() == "[fakefly] starting sleep 600\n"


SOCKET_APP = """\
import os, pathlib, socket
directory = pathlib.Path(os.environ["FLYDEPLOY_RUNTIME_DIR"]) / os.environ["FLY_APP_NAME"]
directory.mkdir(parents=True, exist_ok=True)
server = socket.socket(socket.AF_UNIX)
server.bind(str(directory / f"{os.getpid()}.sock"))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.sendall(f"pong from {os.getpid()}".encode())
    conn.close()
"""

SOCKET_CLIENT = """\
import os, pathlib, socket
for path in (pathlib.Path(os.environ["FLYDEPLOY_RUNTIME_DIR"]) / os.environ["FLY_APP_NAME"]).glob("*.sock"):
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    print(client.recv(100).decode())
"""


def test_exec_reaches_the_app_process_through_the_runtime_dir(fakefly, tmp_path):
    tree = write_app_tree(tmp_path / "sock", {"app.py": SOCKET_APP}, app="sock",
                          processes={"app": "python3 app.py"})
    app = fakefly.create_app("sock", tree, machines=2)
    for machine in app.machines:
        machine.wait_for_log("listening")
    api = flydeploy.Machines("sock", app.token, base_url=fakefly.base_url)
    for machine in app.machines:
        result = api.exec(machine.id, ["python3", "-c", SOCKET_CLIENT])
        assert result.stdout == f"pong from {machine.pid}\n", result.stderr


def test_slow_requests_are_served_late_not_dropped(fakefly, demo):
    fakefly.faults.add("slow", op="exec", delay=0.3)
    result = client(fakefly, demo.token).exec(demo.machines[0].id, ["echo", "late"])
    assert result.stdout == "late\n"
    assert len(requests_for(fakefly, "exec")) == 1


def test_expired_and_revoked_tokens_are_refused(fakefly, demo):
    expired = demo.exec_token(ttl=0)
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        client(fakefly, expired).list()
    assert (caught.value.status, caught.value.message) == (401, AUTH_ERROR)
    fakefly.revoke_token(demo.token)
    with pytest.raises(flydeploy.MachinesAPIError):
        client(fakefly, demo.token).list()


def test_an_app_process_that_exits_stops_its_machine(fakefly, tmp_path):
    tree = write_app_tree(tmp_path / "crash", {"app.py": "print('bye'); raise SystemExit(4)"},
                          app="crashy", processes={"app": "python3 app.py"})
    machine = fakefly.create_app("crashy", tree, machines=1).machines[0]
    machine.wait_for_state("stopped")
    assert "bye" in machine.logs() and "exited with code 4" in machine.logs()
    assert machine.events[-1]["request"] == {"exit_event": {"exit_code": 4, "requested_stop": False}}


def test_closing_the_fake_fly_leaves_no_process(tmp_path):
    tree = write_app_tree(tmp_path / "src", {"app.py": APP_SOURCE}, app="demo",
                          processes={"app": "python3 app.py"})
    with FakeFly(tmp_path / "ff") as fly:
        app = fly.create_app("demo", tree, machines=2)
        pids = [m.pid for m in app.machines]
        app.machines[1].suspend()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_machine_exec_tokens_are_limited_to_their_commands(fakefly, demo):
    token = demo.exec_token(prefixes=[["python3", "-c"]])
    api = client(fakefly, token)
    assert len(api.list()) == 3
    assert api.exec(demo.machines[0].id, ["python3", "-c", "print(1)"]).stdout == "1\n"
    with pytest.raises(flydeploy.MachinesAPIError) as caught:
        api.exec(demo.machines[0].id, ["sh", "-c", "id"])
    assert caught.value.status == 403
    with pytest.raises(flydeploy.MachinesAPIError):
        api.stop(demo.machines[0].id)


# --- the fake `fly` ------------------------------------------------------------------------------


def test_fly_deploy_build_only_snapshots_the_tree_as_an_image(fakefly, demo, tmp_path):
    tree = write_app_tree(tmp_path / "v2", {"app.py": APP_SOURCE + "# v2\n"}, app="demo",
                          processes={"app": "python3 app.py"})
    result = fakefly.run_fly("deploy", "--build-only", "--push", "--image-label", "hot-1",
                             "-c", str(tree / "fly.toml"), "--build-arg", "A=1")
    assert result.returncode == 0, result.stderr
    assert "image: registry.fly.io/demo:hot-1\n" in result.stderr
    assert "registry.fly.io/demo:hot-1" in fakefly.images("demo")
    machine = demo.add_machine("registry.fly.io/demo:hot-1")
    assert (machine.root / "app.py").read_text().endswith("# v2\n")
    assert fakefly.fly_calls()[-1][:2] == ["deploy", "--build-only"]


def test_fly_deploy_errors(fakefly, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "fly.toml").write_text('app = "demo"\n[env\n')
    result = fakefly.run_fly("deploy", "--build-only", "--push", "-c", str(broken / "fly.toml"))
    assert result.returncode == 1 and str(broken / "fly.toml") in result.stderr
    fakefly.set_build_fault("fail")
    tree = write_app_tree(tmp_path / "ok", {}, app="demo")
    result = fakefly.run_fly("deploy", "--build-only", "--push", "-c", str(tree / "fly.toml"))
    assert result.returncode == 1 and "error building" in result.stderr
    assert fakefly.images("demo") == []


def test_fly_machine_run_shell_runs_the_command_without_a_shell_in_slash(fakefly, demo, tmp_path):
    script = ("import os, sys; print(os.environ['FLY_MACHINE_ID'], os.environ['K'], "
              "os.environ['BUCKET_NAME'], os.getcwd(), os.path.exists('app.py')); sys.exit(int(os.environ['CODE']))")
    args = ["machine", "run", demo.machines[0].image_ref, "-a", "demo", "--entrypoint", "sleep inf",
            "--vm-memory", "1024", "-e", "K=V", "--rm", "--shell"]
    # hallpass splits the string quote-aware and runs it directly, in `/` (flyctl#1442, #1220).
    ok = fakefly.run_fly(*args, "-e", "CODE=0", "--command", f'python3 -c "{script}"')
    assert ok.returncode == 0, ok.stderr
    machine_id, value, bucket, cwd, has_app = ok.stdout.split()
    assert (value, bucket, cwd, has_app) == ("V", "releases", "/", "False")
    assert machine_id not in {m.id for m in demo.machines[:3]}
    orchestrator = fakefly.machine(machine_id)
    assert orchestrator.state == "destroyed"
    assert orchestrator.config["init"]["entrypoint"] == ["sleep", "inf"]
    assert orchestrator.config["guest"]["memory_mb"] == 1024
    # No shell: `cd` is not a program, `&&` is just a word.
    shell = fakefly.run_fly(*args, "-e", "CODE=0", "--command", f'cd /app && python3 -c "{script}"')
    assert shell.returncode == 1 and 'exec: "cd": executable file not found' in shell.stderr
    assert "V releases" not in shell.stdout
    failed = fakefly.run_fly(*args, "-e", "CODE=5", "--command", f'python3 -c "{script}"')
    assert failed.returncode == 1
    assert "exited with status 5" in failed.stderr


def test_fly_machine_run_that_cannot_launch_never_runs_the_command(fakefly, demo, tmp_path):
    marker = tmp_path / "ran"
    fakefly.faults.add("500", op="create")
    args = ["machine", "run", demo.machines[0].image_ref, "-a", "demo", "--rm", "--shell",
            "--command", f"touch {marker}"]
    failed = fakefly.run_fly(*args)
    assert failed.returncode == 1 and "fault injected" in failed.stderr
    assert not marker.exists()
    assert fakefly.run_fly(*args).returncode == 0 and marker.exists()


def test_fly_machine_run_of_an_unknown_image_fails_before_running(fakefly, demo):
    result = fakefly.run_fly("machine", "run", "registry.fly.io/demo:nope", "-a", "demo", "--rm",
                             "--shell", "--command", "true")
    assert result.returncode == 1 and "manifest unknown" in result.stderr


def test_fly_tokens_whoami_and_list(fakefly, demo):
    minted = fakefly.run_fly("tokens", "create", "machine-exec", "-a", "demo", "--expiry", "1h",
                             "-p", "python3 -m flydeploy rpc")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.startswith("FlyV1 fm2_")
    api = client(fakefly, token)
    allowed = api.exec(demo.machines[0].id, ["python3", "-m", "flydeploy", "rpc", "nope"])
    assert allowed.exit_code != 0  # it ran (flydeploy has no such command); the token allowed it
    with pytest.raises(flydeploy.MachinesAPIError):
        api.exec(demo.machines[0].id, ["python3", "-c", "1"])

    assert fakefly.run_fly("auth", "whoami").stdout == "dev@example.com\n"
    listed = fakefly.run_fly("machines", "list", "--json", "-a", "demo")
    assert [m["id"] for m in json.loads(listed.stdout)] == [m.id for m in demo.machines]
    fakefly.logout()
    whoami = fakefly.run_fly("auth", "whoami")
    assert whoami.returncode == 1 and "fly auth login" in whoami.stderr.replace("flyctl", "fly")
    for argv in (["-t", demo.token, "machines", "list", "-j", "-a", "demo"],
                 ["machines", "list", "-a", "demo", "--json", "--access-token", demo.token]):
        assert len(json.loads(fakefly.run_fly(*argv).stdout)) == 3
    env = {**fakefly.env(), "FLY_API_TOKEN": demo.token}
    assert fakefly.run_fly("machines", "list", "-q", "-a", "demo", env=env).stdout.split() == [
        m.id for m in demo.machines]


def test_fly_tokens_create_rejects_a_bad_expiry(fakefly, demo):
    result = fakefly.run_fly("tokens", "create", "machine-exec", "-a", "demo", "-x", "1 hour")
    assert result.returncode == 1 and "invalid duration" in result.stderr


@pytest.mark.parametrize("argv", [
    ["deploy", "--build-only", "--pushh"],
    ["machine", "run", "img", "--detach-ish"],
    ["secrets", "set", "A=B"],
    ["machines", "destroy", "x"],
])
def test_fly_fails_loudly_on_what_it_does_not_know(fakefly, argv):
    result = fakefly.run_fly(*argv)
    assert result.returncode == 2
    assert "Error:" in result.stderr
