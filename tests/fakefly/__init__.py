"""A faithful local Fly for the tests: a Machines API server, machines as sandboxes, a fake ``fly``.

Nothing here is part of flydeploy; it is what the tests run flydeploy against.

The world
    ``FakeFly(state_dir)`` starts a threaded HTTP server on 127.0.0.1 (a free
    port, ``fly.base_url``) speaking the Machines API: list (``state``,
    ``include_deleted``, ``region``, ``metadata.<key>`` filters), get, create,
    destroy, exec, wait, lease, start, stop, suspend, with the shapes of the
    official swagger spec and Fly's error bodies (401 ``{"error":
    "Authenticate: token validation error"}``).  Macaroon tokens must come as
    ``FlyV1 <token>``, others as ``Bearer <token>``.

    Every machine is a sandbox: ``machine.root`` is its own copy of the image
    (the app tree), ``machine.env`` its environment (``FLY_MACHINE_ID``,
    ``FLY_IMAGE_REF``, ``FLY_APP_NAME``, ``FLY_REGION``,
    ``FLY_PROCESS_GROUP``, fly.toml's ``[env]``, the app's secrets, its own
    ``FLYDEPLOY_RUNTIME_DIR``, ``FLY_FLAPS_BASE_URL`` pointing at the fake
    API, ``python3`` on ``PATH`` being the test interpreter).  A started
    machine runs the image's command (``init.cmd``, else fly.toml
    ``[processes]`` for its group, else the Dockerfile's ``CMD``) with its
    output in ``machine.logs()``; stop sends SIGTERM then SIGKILL to the
    process group, suspend freezes it (SIGSTOP) until the next start.  The
    main process starts in the image's WORKDIR (init main.rs); when it exits
    the machine stops with ``request.exit_event.exit_code`` in its events, and
    one with ``auto_destroy`` (``--rm``) is destroyed.  Exec runs the argv as
    Fly's init does: directly, no shell, in ``/`` (not the app tree), with the
    machine's environment, and answers ``{"exit_code", "exit_signal",
    "stdout", "stderr"}`` with HTTP 200 even when the command failed; a
    program that cannot be spawned is an API error (500, "No such file ...");
    past its timeout or ``fly.exec_deadline`` (default 30 s) it answers 408
    and the command goes on running; 412 when the machine is not started.
    There is no chroot: a word of an argv naming a path under the image's
    WORKDIR (``/app/flydeploy.py``) is that path in the machine's sandbox, and
    the machines' ``python3`` does not see this checkout (flydeploy there is
    only what the image holds).  A stopped or destroyed machine runs nothing:
    whatever it started is killed.  ``fly.token_checks`` ("command" or "cmd")
    picks the exec field an exec token's command restriction is checked
    against; ``fly.destroyed_visible`` whether GET still shows a destroyed
    machine.  Each behaviour cites its source where it is implemented.

    ``fly.faults.add(kind, op=..., machine=..., times=...)`` switches faults
    on: ``"500"``, ``"429"`` (with ``Retry-After``), ``"408"`` (after
    ``delay``), ``"drop"`` (connection closed with no reply), ``"slow"``
    (served after ``delay``), ``"latency"`` (a round trip of ``delay``: half
    before serving, half before replying).  ``fly.requests`` records every request.

The fake ``fly``
    ``fly.fly_bin`` holds ``fly``/``flyctl``; ``fly.env()`` puts it first on
    ``PATH`` with ``FLY_FLAPS_BASE_URL`` and ``FAKEFLY_STATE_DIR`` set.  It does
    ``deploy --build-only --push --image-label L -c CFG`` (snapshots the
    project as image ``registry.fly.io/<app>:<L>``, printing ``image: <ref>``
    on stderr), ``machine run <image> [-- CMD ...] [--rm] -e K=V
    --entrypoint E`` (a fresh machine of that image through the API, without
    fly.toml's ``[env]``; with CMD, CMD is its main process and flyctl returns
    once it runs), ``machine run ... --shell --command STR`` (STR split
    quote-aware and run without a shell, in ``/``, as hallpass does; on SIGINT
    it forwards nothing and destroys nothing), ``logs -a APP --machine ID
    [--no-tail]``, ``tokens create machine-exec [-p PREFIX] [-x 1h]``, ``auth
    whoami``, ``auth token``, ``machines list --json``.  Unknown commands and flags exit 2.  ``fly.fly_calls()`` lists
    the invocations; ``fly.set_build_fault("fail" | "hang")`` breaks builds;
    ``fly.login()`` / ``fly.logout()`` switch the local flyctl session.

Driving it from a test
    ``fly.create_app(name, tree, machines=N, secrets=..., regions=...)``
    builds an image of ``tree`` and starts N machines (``FakeApp``: ``token``,
    ``machines``, ``set_secrets``, ``unset_secrets``, ``add_machine(image,
    process_group=, region=, command=, entrypoint=, metadata=, services=,
    start=, platform_version=, internal_port=)``, ``exec_token(prefixes=...)``;
    ``internal_port="own"`` gives an app machine its own port in its services and
    ``PORT``, where its app can answer health checks).  A
    ``FakeMachine`` has ``id``, ``region``, ``state``, ``root``, ``env``,
    ``runtime_dir``, ``pid``, ``config``, ``events``; ``start()``, ``stop()``,
    ``suspend()``, ``destroy()``, ``update(image=...)`` (a cold deploy of one
    machine), ``logs()``, ``wait_for_log(text, count=1)``,
    ``wait_for_state(state)``.  A restart boots from the image again (files
    changed in place are gone); a resume from suspension keeps everything.
    ``fly.build_image(app, tree, label)`` pushes an image, ``fly.images(app)``
    lists them; ``fly.user_token`` is the logged-in developer's token.

Fixtures (load them in a test module with
``pytest_plugins = ["tests.fakefly.fixtures"]``; ``from tests.fakefly import write_app_tree``)
    ``fakefly``: a ``FakeFly`` in ``tmp_path`` with the fake ``fly`` first on
    ``PATH``, ``FLY_FLAPS_BASE_URL`` and ``FAKEFLY_STATE_DIR`` set and
    ``FLY_API_TOKEN`` / ``FLY_ACCESS_TOKEN`` unset (through ``monkeypatch``);
    every process is stopped at the end.  Typical use::

        def test_x(fakefly, tmp_path):
            tree = write_app_tree(tmp_path / "src", {"app.py": "..."}, app="demo",
                                  processes={"app": "python3 app.py"})
            app = fakefly.create_app("demo", tree, machines=3,
                                     secrets={"BUCKET_NAME": "b"})
            m = app.machines[0]
            m.wait_for_log("serving")
            m.stop(); m.start()
            client = flydeploy.Machines("demo", app.token)
            subprocess.run([sys.executable, "-m", "flydeploy_cli", "hot"], cwd=tree,
                           env=fakefly.env())

    ``write_app_tree(root, files, app=..., processes=..., env=...,
    vendor_flydeploy=True)`` writes an app tree with a fly.toml and a copy of
    this checkout's ``flydeploy.py``.

Outside pytest (benchmarks), ``with FakeFly(directory) as fly: ...`` does the same.
"""

from .apptree import write_app_tree
from .server import AUTH_ERROR, ApiError, FakeApp, FakeFly, FakeMachine, Faults, RequestRecord

__all__ = ["AUTH_ERROR", "ApiError", "FakeApp", "FakeFly", "FakeMachine", "Faults", "RequestRecord",
           "write_app_tree"]
