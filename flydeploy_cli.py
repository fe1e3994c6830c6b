"""flydeploy_cli: the developer-side command line of flydeploy.

    python -m flydeploy_cli hot        build, push and hot-upgrade every machine
    python -m flydeploy_cli status     what every machine runs
    python -m flydeploy_cli rollback   back to an earlier hot upgrade
    python -m flydeploy_cli doctor     check the app, flyctl, the machines and the bucket
    python -m flydeploy_cli demo       a live hot upgrade on this machine, shown side by side

``hot``, ``status`` and ``rollback`` take ``--local [--root DIR] [--store DIR]``
to work on the app's processes on this host instead, with no Fly and no S3,
and ``--direct [--env-file FILE]`` to run the orchestration from here, with
no image build and no orchestrator machine: the release is packed from the
local tree (``.dockerignore`` or fly.toml ``[build] ignorefile`` honoured) for the image the machines run, with
the developer's Fly token and the bucket's credentials of this machine.
Installed as a package, the same commands are the ``flydeploy`` script; the
machine side (``rpc``, ``orchestrate``) is ``python -m flydeploy``.

Settings come, highest first, from the flags, ``[tool.flydeploy]`` in
``pyproject.toml``, ``fly.toml`` and the defaults.  ``hot`` builds the image
with ``fly deploy --build-only --push``, then creates a temporary orchestrator
machine from it through the Machines API whose main process is
``<python> -c <bootstrap> <app_dir> orchestrate`` (``MachineCommands``; destroyed when it exits; its
output comes from ``fly logs``, its exit code from the machine's exit event).
The orchestrator packs the app, stores the release and
upgrades every machine in two phases (``flydeploy.FLEET_PHASES``: prepare
everywhere, also the check that each machine can take part, then apply,
canaries first; a failure sends the fleet back) with
short execs, collecting each machine's result objects from S3; ``hot --plan``
stops after the first phase.  Ctrl-C or SIGTERM stops and destroys it.
Exit codes: 0 every machine took the upgrade (or, with ``--plan``, would), 1 a
machine refused, failed or could not take part, or the build failed, 2 bad usage
or settings, or the deploy lock is held, 130 interrupted.  ``doctor`` checks
everything ``hot`` needs.

Standard library only; the work itself is done by ``flydeploy``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import difflib
import getpass
import glob
import hashlib
import itertools
import json
import os
import queue
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import TextIO

import flydeploy

__all__ = [
    "main",
    "demo",
    "DEMO_APP",
    "build_command",
    "token_command",
    "orchestrate_argv",
    "orchestrator_config",
    "logs_command",
    "machine_exit_code",
    "redact",
    "run_build",
    "mint_exec_token",
    "launch_orchestrator",
    "doctor",
    "BUILD_SILENCE_S",
]

BUILD_SILENCE_S = 600.0
"""A build that prints nothing for this long (seconds) is stopped."""

_LAUNCH_ATTEMPTS = 3
_LAUNCH_RETRY_DELAY_S = 10.0
_INTERRUPT_GRACE_S = 60.0
_ORCHESTRATOR_MEMORY_MB = 1024
# How often the orchestrator machine is looked at while it runs, and how long its
# last log lines may trail its exit (logs travel apart from the machine's events).
_EXIT_POLL_S = 1.0
_LOG_TRAIL_S = 5.0
# On cancel, the orchestrator gets this long after SIGINT to release the lock and exit.
_CANCEL_GRACE_S = 30
# Docker caps an image tag at 128 characters.
_MAX_TAG = 128
_REDACTED = "<redacted>"
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH", "PRIVATE", "DSN")
# user:password@ in a URL, whatever the variable's name.
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)")
_IMAGE_LINE_RE = re.compile(r"^\s*image:\s*(\S+)")
# A `fly logs` line: "<time> app[<machine>] <region> [info] <message>".
_LOG_LINE_RE = re.compile(r"^\S+\s+\S+\[[^\]]*\]\s+\S+\s+\[\w+\]\s?(?P<message>.*)$")
# A new image not yet in the registry: the only create failure worth trying again.
_PROPAGATION_RE = re.compile(r"manifest unknown|not found|no such image|failed to get manifest", re.IGNORECASE)
_MARKER_RE = re.compile(re.escape(flydeploy.ORCHESTRATOR_MARKER) + r" (started|exit (\d+)|plan (\{.*\}))")
_PAIR_FLAGS = ("-e", "--env", "--build-arg")


# --- Commands ---------------------------------------------------------------


def _app_flag(config: flydeploy.FleetConfig) -> list[str]:
    # flyctl takes the app from fly.toml; name it only when it came from elsewhere.
    return [] if config.sources.get("app") == "fly.toml" else ["-a", config.require_app()]


def build_command(config: flydeploy.FleetConfig, label: str, *, no_cache: bool = False) -> list[str]:
    """``fly deploy --build-only --push --image-label <label> -c <cfg> [--build-arg K=V ...]``."""
    command = ["fly", "deploy", "--build-only", "--push", "--image-label", label, "-c", str(config.fly_toml)]
    command += _app_flag(config)
    if config.sources.get("build_args") != "fly.toml":  # flyctl reads [build.args] itself
        for name, value in config.build_args.items():
            command += ["--build-arg", f"{name}={value}"]
    if no_cache:
        command.append("--no-cache")
    return command


def token_command(config: flydeploy.FleetConfig) -> list[str]:
    """``fly tokens create machine-exec``: a 1-hour token limited to the machine-side
    ``rpc`` commands, its prefix taken from the one builder of those commands."""
    prefix = shlex.join(config.machine_commands().token_prefix())
    return ["fly", "tokens", "create", "machine-exec", "-a", config.require_app(), "--expiry", "1h",
            "--command-prefix", prefix]


def orchestrate_argv(config: flydeploy.FleetConfig, image_ref: str, *, version: str | None = None,
                     owner: str | None = None, force: bool = False, rollback: bool = False,
                     rollback_to: str | None = None, plan: bool = False, plan_json: bool = False) -> list[str]:
    """The ``<python> -c <bootstrap> <app_dir> orchestrate --root <app_dir> ...`` command the
    orchestrator machine runs as its main process, carrying every resolved setting so
    that it does exactly what ``--dry-run`` shows."""
    config.require_app()
    argv = config.machine_commands().orchestrate("--root", config.app_dir, "--image-ref", image_ref,
                                                 *config.orchestrate_flags())
    if version:
        argv += ["--version", version]
    if owner:
        argv += ["--owner", owner]
    if force:
        argv.append("--force")
    if rollback or rollback_to:
        argv.append("--rollback")
    if rollback_to:
        argv += ["--to", rollback_to]
    if plan:
        argv += ["--plan", *(["--json"] if plan_json else [])]
    return argv


def orchestrator_config(config: flydeploy.FleetConfig, image_ref: str, argv: list[str], env: Mapping[str, str],
                        *, run_id: str, launcher: str) -> dict:
    """The Machines API config of the orchestrator machine: ``argv`` is its main process.

    init starts it in the image's WORKDIR with the image's environment, the
    app's secrets and ``env`` (fly.toml ``[env]`` does not reach a machine
    made outside ``fly deploy``, so it is passed here, with the exec token;
    names that look secret are left out: secrets reach every machine as app
    secrets, not from fly.toml).
    It is destroyed when ``argv`` exits and never restarted; its metadata
    names the run and who launched it, so that an interrupted or abandoned
    run is found and cleaned up.
    """
    return {"image": image_ref, "init": {"entrypoint": argv[:1], "cmd": argv[1:]},
            "env": {**{k: v for k, v in config.env.items() if not _looks_secret(k)}, **env},
            "auto_destroy": True, "restart": {"policy": "no"},
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": _ORCHESTRATOR_MEMORY_MB},
            "metadata": {flydeploy.ORCHESTRATOR_ROLE_KEY: flydeploy.ORCHESTRATOR_ROLE,
                         flydeploy.ORCHESTRATOR_RUN_KEY: run_id, flydeploy.ORCHESTRATOR_LAUNCHER_KEY: launcher}}


def logs_command(config: flydeploy.FleetConfig, machine_id: str) -> list[str]:
    """``fly logs -a <app> --machine <id>``: the orchestrator's output as it runs (streamed
    until stopped; flyctl docs, fly_logs.md)."""
    return ["fly", "logs", "-a", config.require_app(), "--machine", machine_id]


def _looks_secret(name: str) -> bool:
    return any(word in name.upper() for word in _SECRET_WORDS)


def _without_passwords(text: str) -> str:
    return _URL_PASSWORD_RE.sub(lambda m: m.group("head") + _REDACTED, text)


def _shown(name: str, value: str) -> str:
    return f"{name}={_REDACTED if _looks_secret(name) else _without_passwords(value)}"


def redact(command: Iterable[str]) -> list[str]:
    """A copy of ``command`` whose ``-e`` / ``--build-arg`` values are hidden
    when their name looks secret (token, key, password, ...), and whose URLs
    carry no password (``postgres://user:<redacted>@host``)."""
    shown: list[str] = []
    for arg in command:
        if shown and shown[-1] in _PAIR_FLAGS and "=" in arg:
            arg = _shown(*arg.split("=", 1))
        shown.append(_without_passwords(arg))
    return shown


# --- Running flyctl -----------------------------------------------------------


def _split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (ending in newline or carriage return) and the rest."""
    lines = buffer.splitlines(keepends=True)
    rest = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
    return lines, rest


def _interrupt(signum: int, frame: object) -> None:
    """A signal handler: the signal stops the command as Ctrl-C does."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signal_handlers(handler: Callable[[int, Any], object], signums: Iterable[int]) -> Iterator[None]:
    """Let ``handler`` take ``signums`` while the block runs, then restore every previous handler.

    Only in the main thread, where Python runs signal handlers; elsewhere it changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        # signal.signal() first runs the handlers of signals that came: one
        # that raises must not leave the other handlers unrestored.
        error = None
        for signum, old in previous.items():
            try:
                signal.signal(signum, old)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error


@contextlib.contextmanager
def _signals_deferred(signums: Iterable[int]) -> Iterator[None]:
    """Hold ``signums`` while the block runs, then deliver those that came to their own handlers."""
    caught: list[int] = []
    try:
        with _signal_handlers(lambda signum, frame: caught.append(signum), signums):
            yield
    finally:
        for signum in caught:
            signal.raise_signal(signum)  # its handler runs here and now


def _start_streamed(command: list[str], started: list[subprocess.Popen]) -> None:
    """Start ``command`` into ``started``, holding Ctrl-C and SIGTERM (when Python
    handles them) until it is there: one that lands meanwhile is delivered
    after, so that whoever catches its KeyboardInterrupt finds the command to
    pass it on to."""
    interrupts = [signum for signum in (signal.SIGINT, signal.SIGTERM) if callable(signal.getsignal(signum))]
    with _signals_deferred(interrupts):
        try:
            # stdin stays an open pipe until flyctl has exited: at EOF flyctl closes
            # the remote side's stdin too (flyctl ssh/io.go), which can end a session early.
            started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.PIPE, start_new_session=True))
        except OSError as exc:
            raise flydeploy.FlyDeployError(
                f"cannot run {command[0]}: {exc.strerror}; install flyctl (https://fly.io/docs/flyctl/install/) "
                "and put it on PATH") from None


def _stream(command: list[str], on_line: Callable[[str], None], *,
            silence_s: float | None = None) -> int | None:
    """Run ``command``, passing each line of its stdout and stderr to ``on_line``
    as it comes.  Returns its exit code, or None when it printed nothing for
    ``silence_s`` seconds and was stopped.  Ctrl-C is passed on to it, also
    one that lands while it starts, and its last words are still streamed."""
    started: list[subprocess.Popen] = []
    buffer = b""
    interrupted = silent = False
    try:
        while True:
            try:
                if not started:
                    _start_streamed(command, started)
                fd = started[0].stdout.fileno()
                ready, _, _ = select.select([fd], [], [], _INTERRUPT_GRACE_S if interrupted else silence_s)
                if not ready:
                    silent = True
                    break
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                lines, buffer = _split_lines(buffer + chunk)
                for line in lines:
                    on_line(line.decode("utf-8", "replace"))
            except KeyboardInterrupt:
                if interrupted or not started:
                    raise
                interrupted = True
                os.killpg(started[0].pid, signal.SIGINT)
        if buffer:
            on_line(buffer.decode("utf-8", "replace"))
        if not silent:
            started[0].wait()
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            process.stdout.close()
            process.stdin.close()
    if interrupted:
        raise KeyboardInterrupt
    return None if silent else started[0].returncode


def run_build(command: list[str], expected_image: str, *, silence_s: float | None = None,
              out: TextIO | None = None) -> str:
    """Run the build, streaming its output to ``out``; return the pushed image ref.

    The ref is cross-checked with the ``image: <ref>`` line flyctl prints.  A
    failed build, a mismatched ref, or a build that prints nothing for
    ``silence_s`` seconds (default ``BUILD_SILENCE_S``, read at each call; it
    is stopped) raise ``FlyDeployError``.
    """
    silence_s = BUILD_SILENCE_S if silence_s is None else silence_s
    out = out or sys.stdout
    reported: list[str] = []

    def show(line: str) -> None:
        match = _IMAGE_LINE_RE.match(line)
        if match:
            reported.append(match.group(1))
        out.write(line)
        out.flush()

    code = _stream(command, show, silence_s=silence_s)
    if code is None:
        raise flydeploy.FlyDeployError(
            f"the build printed nothing for {silence_s / 60:g} minutes and was stopped; run "
            f"`{shlex.join(command)}` by hand to see where it hangs")
    if code != 0:
        raise flydeploy.FlyDeployError(f"the build failed (fly deploy exited {code}); see its output above. "
                                       "Nothing was upgraded")
    if reported and reported[-1] != expected_image:
        raise flydeploy.FlyDeployError(f"flyctl pushed {reported[-1]}, not the expected {expected_image}; "
                                       "nothing was upgraded")
    if not reported:
        out.write(f"note: flyctl printed no `image:` line; using {expected_image}\n")
    return expected_image


def _fly_output(command: list[str], timeout: float = 120) -> str | None:
    """What a quick flyctl command printed on stdout, or None when it failed.  Its stdin
    is a pipe that stays open until it has exited, as for every flyctl run here."""
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        return None
    read: list[bytes] = []
    try:
        reader = threading.Thread(target=lambda: read.append(process.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout)  # the output ends when flyctl exits (or closes it)
        output = read[0] if read else None
        if output is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                output = None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stdin.close()
    return output.decode("utf-8", "replace") if output is not None and process.returncode == 0 else None


def _capture(command: list[str]) -> str | None:
    """The last line a quick flyctl command printed, or None when it failed or printed nothing."""
    lines = [line.strip() for line in (_fly_output(command) or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def mint_exec_token(config: flydeploy.FleetConfig) -> str | None:
    """A short-lived exec token from the local flyctl session (``token_command``),
    or None when there is no session that can mint one.  Never printed."""
    return _capture(token_command(config))


def machine_exit_code(machine: Mapping[str, Any]) -> int | None:
    """The exit code of a machine's main process, from its newest ``exit`` event
    (``request.exit_event.exit_code``), or None while it has not exited."""
    for event in machine.get("events") or ():  # newest first, as the API lists them
        if event.get("type") == "exit":
            exit_event = (event.get("request") or {}).get("exit_event") or {}
            code = exit_event.get("exit_code")
            return code if isinstance(code, int) else 1
    return None


def _laptop_api(config: flydeploy.FleetConfig) -> flydeploy.Machines:
    """The Machines API as this developer: ``FLY_API_TOKEN``, else flyctl's session (``fly auth token``)."""
    token = os.environ.get("FLY_API_TOKEN") or _capture(["fly", "auth", "token"])
    if not token:
        raise flydeploy.ConfigError("no Fly API token: log in with `fly auth login`, or set FLY_API_TOKEN "
                                    "(e.g. from `fly tokens create deploy`)")
    return flydeploy.Machines(config.require_app(), token)


def _launcher() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def _our_orchestrators(api: flydeploy.Machines, **metadata: str) -> list[dict]:
    """Orchestrator machines of this app that are not destroyed, filtered by ``metadata``."""
    wanted = {flydeploy.ORCHESTRATOR_ROLE_KEY: flydeploy.ORCHESTRATOR_ROLE, **metadata}
    return [m for m in api.list(metadata=wanted) if m.get("state") not in ("destroyed", "destroying")]


def recover_stale_orchestrators(api: flydeploy.Machines, *, out: TextIO | None = None) -> list[str]:
    """Stop and destroy orchestrator machines that a ``hot`` or ``rollback`` of this user
    on this host left behind when it died (its process is gone); note the others.
    Returns the ids destroyed.  What such a machine says about the deploy lock is
    reported: a lock it could not release is taken over only with ``--force`` or
    after it expires."""
    out = out or sys.stdout
    here = _launcher().rpartition(":")[0]
    destroyed = []
    for machine in _our_orchestrators(api):
        metadata = (machine.get("config") or {}).get("metadata") or {}
        launcher = metadata.get(flydeploy.ORCHESTRATOR_LAUNCHER_KEY, "")
        who, _, pid = launcher.rpartition(":")
        run = metadata.get(flydeploy.ORCHESTRATOR_RUN_KEY, "?")
        if who == here and pid.isdigit() and not flydeploy.pid_alive(int(pid)):
            what = _retire(api, machine, out)
            if what is not None:
                destroyed.append(machine["id"])
                out.write(f"==> destroyed orchestrator machine {machine['id']} left by an earlier run (run {run}, "
                          f"the deploy lock's deployment id; its launcher pid {pid} is gone): {what}\n")
        else:
            out.write(f"==> note: orchestrator machine {machine['id']} of {launcher or 'someone'} is "
                      f"{machine.get('state')} (run {run}); the deploy lock decides whether this run goes ahead\n")
    out.flush()
    return destroyed


def _retire(api: flydeploy.Machines, machine: Mapping[str, Any], out: TextIO) -> str | None:
    """Stop an orchestrator machine with SIGINT (it releases the deploy lock and exits),
    destroy it, and say what became of the lock; None when it could not be destroyed."""
    machine_id = machine["id"]
    code = None
    try:
        if machine.get("state") == "started":
            api.stop(machine_id, signal="SIGINT", timeout=_CANCEL_GRACE_S)
        deadline = time.monotonic() + _CANCEL_GRACE_S + 5
        while code is None and time.monotonic() < deadline:
            current = api.get(machine_id)
            code = machine_exit_code(current)
            if code is None and current.get("state") in ("stopped", "destroyed"):
                break
            time.sleep(0.2)
    except flydeploy.FlyDeployError as exc:
        out.write(f"could not stop orchestrator machine {machine_id}: {exc}\n")
    try:
        api.destroy(machine_id, force=True)
    except flydeploy.FlyDeployError as exc:
        out.write(f"error: could not destroy orchestrator machine {machine_id} ({exc}); destroy it with "
                  f"`fly machine destroy --force {machine_id}`\n")
        return None
    if code == 130:
        return "it released the deploy lock"
    if code is not None:
        return f"it exited {code}, which releases the deploy lock"
    return ("it did not say it released the deploy lock: a lock it held stays until it expires, or take "
            "it over with --force")


def _cancel(api: flydeploy.Machines, run_id: str, out: TextIO) -> None:
    """Stop and destroy this run's orchestrator machine and say what was cleaned up."""
    try:
        machines = _our_orchestrators(api, **{flydeploy.ORCHESTRATOR_RUN_KEY: run_id})
    except flydeploy.FlyDeployError as exc:
        out.write(f"could not look for the orchestrator machine ({exc}); check `fly machines list`\n")
        return
    if not machines:
        out.write("no orchestrator machine was running; nothing to clean up\n")
    for machine in machines:
        what = _retire(api, machine, out)
        if what is not None:
            out.write(f"cleaned up: orchestrator machine {machine['id']} stopped and destroyed; {what}. "
                      "Machines that had already started their upgrade finish it (`status` shows what each "
                      "runs)\n")
    out.flush()


def _display(line: str) -> str:
    """A ``fly logs`` line without its time, machine and level prefix."""
    match = _LOG_LINE_RE.match(line.rstrip("\r\n"))
    return (match.group("message") if match else line.rstrip("\r\n")) + "\n"


def _follow(api: flydeploy.Machines, machine_id: str, logs: list[str], out: TextIO,
            plan_out: TextIO | None = None) -> int:
    """Show the orchestrator's output (``fly logs``) until its machine has exited; its exit code.

    The exit code comes from the machine's exit event; the marker line the
    orchestrator prints is a second witness for when the event says nothing.
    The plan's JSON (``hot --plan --json``) comes on a marker line too, and goes
    to ``plan_out`` alone.
    """
    lines: queue.SimpleQueue = queue.SimpleQueue()
    try:
        # stdin stays an open pipe until flyctl has exited, as for every flyctl run here.
        process = subprocess.Popen(logs, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    except OSError as exc:
        out.write(f"note: cannot run {logs[0]} ({exc.strerror}): the orchestrator's output is not shown\n")
        process = None

    def read() -> None:
        for raw in process.stdout:
            lines.put(raw.decode("utf-8", "replace"))

    if process is not None:
        threading.Thread(target=read, name="flydeploy-logs", daemon=True).start()
    marker = code = None
    began = False
    exited_at = None
    next_look = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and now >= next_look:
                try:
                    machine = api.get(machine_id)
                except flydeploy.MachinesAPIError as exc:
                    if exc.status != 404:
                        raise
                    machine = {"state": "destroyed"}  # gone already: the marker line tells the code
                code = machine_exit_code(machine)
                if code is not None or machine.get("state") == "destroyed":
                    exited_at = now
                next_look = now + _EXIT_POLL_S
            if exited_at is not None and (marker is not None or now - exited_at > _LOG_TRAIL_S):
                break
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            match = _MARKER_RE.search(line)
            if match is None:
                out.write(_display(line))
                out.flush()
            elif match.group(3) is not None:
                (plan_out or out).write(match.group(3) + "\n")
                (plan_out or out).flush()
            elif match.group(2) is None:
                began = True
            else:
                marker = int(match.group(2))
    finally:
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            process.stdin.close()
    if code is None and marker is None:
        out.write(f"error: orchestrator machine {machine_id} ended without an exit code; run "
                  "`python -m flydeploy_cli status` to see what each machine runs\n")
        return 1
    if not began and marker is None and code:
        # Not a word from flydeploy: its command could not run in the image.
        out.write(f"error: the orchestrator did not start (exit {code}; its output is above): the new image must "
                  f"hold flydeploy.py where the command above runs it; set [tool.flydeploy] app_dir and python "
                  "to the image's app directory and interpreter. Nothing was locked or uploaded\n")
        return 1
    return code if code is not None else marker


def launch_orchestrator(api: flydeploy.Machines, machine_config: dict, logs: Callable[[str], list[str]], *,
                        attempts: int = _LAUNCH_ATTEMPTS, retry_delay_s: float = _LAUNCH_RETRY_DELAY_S,
                        out: TextIO | None = None, plan_out: TextIO | None = None) -> int:
    """Create the orchestrator machine, show its output, return the upgrade's exit code.

    The create is tried again (a new image may take a moment to reach the
    registry) only when the API says the image is not there.  On Ctrl-C or
    SIGTERM the machine is stopped with SIGINT (the orchestrator releases the
    deploy lock) and destroyed, and KeyboardInterrupt is raised again.
    """
    out = out or sys.stdout
    run_id = machine_config["metadata"][flydeploy.ORCHESTRATOR_RUN_KEY]
    try:
        for attempt in range(1, attempts + 1):
            try:
                machine = api.create(machine_config)
                break
            except flydeploy.MachinesAPIError as exc:
                if attempt == attempts or not (400 <= exc.status < 500 and _PROPAGATION_RE.search(exc.message)):
                    raise flydeploy.FlyDeployError(f"the orchestrator machine could not be created: {exc}") from None
                out.write(f"the orchestrator machine could not be created ({exc.message}); the new image may "
                          f"still be propagating, trying again in {retry_delay_s:g} s\n")
                out.flush()
                time.sleep(retry_delay_s)
        out.write(f"==> orchestrator machine {machine['id']} runs the upgrade; its output follows\n")
        out.flush()
        return _follow(api, machine["id"], logs(machine["id"]), out, plan_out)
    except KeyboardInterrupt:
        with _signals_deferred([signal.SIGINT, signal.SIGTERM]):
            _cancel(api, run_id, out)
        raise


# --- Subcommands --------------------------------------------------------------


def _say(line: str) -> None:
    print(f"==> {line}", flush=True)


def _config(args: argparse.Namespace) -> flydeploy.FleetConfig:
    overrides = flydeploy.fleet_overrides(args)
    if args.local:
        # No Fly here: fly.toml is optional, and without an app in the files the
        # agents' FLY_APP_NAME names it (an environment default, below the files).
        config = flydeploy.load_config(args.root or ".", overrides=overrides,
                                       environment={"app": (os.environ.get("FLY_APP_NAME") or None,
                                                            "FLY_APP_NAME")})
        if not config.app:
            raise flydeploy.ConfigError("no app name: pass --app or set FLY_APP_NAME (the name the app's "
                                        "processes give their agents), or set `app` in fly.toml or "
                                        "under [tool.flydeploy] in pyproject.toml")
        # The agents are this host's processes: rpc runs with this interpreter and this flydeploy.
        here = os.path.dirname(os.path.abspath(flydeploy.__file__))
        return dataclasses.replace(config, python=sys.executable, app_dir=here,
                                   sources={**config.sources, "python": "--local (this interpreter)",
                                            "app_dir": "--local (this flydeploy)"})
    else:
        path = os.path.normpath(args.config)
        config = flydeploy.load_config(os.path.dirname(path) or ".", config=os.path.basename(path),
                                       overrides=overrides)
    config.require_app()
    return config


def _local_fleet(args: argparse.Namespace,
                 config: flydeploy.FleetConfig) -> tuple[flydeploy.LocalStore, flydeploy.LocalMachines]:
    """Local mode's store (``--store``, else .flydeploy in the project) and its one "machine", this host."""
    return (flydeploy.LocalStore(args.store or os.path.join(config.project_dir, ".flydeploy")),
            flydeploy.LocalMachines(config.app, cwd=config.root))


def _local_push(args: argparse.Namespace, config: flydeploy.FleetConfig, *, version: str | None = None,
                rollback: bool = False, rollback_to: str | None = None) -> int:
    """Local mode: the release goes from a local store to every agent of the app on this host."""
    store, api = _local_fleet(args, config)
    if args.dry_run:
        what = f"roll back to {rollback_to or 'the previous release'}" if rollback else f"pack {config.root}"
        _print_plan(config, [], [f"{what}, record it in {store.root} and apply it to every flydeploy "
                                 f"agent of {config.app} on this host (python -m flydeploy rpc upgrade)"])
        return 0
    return _orchestrate_here(args, config, "local", store=store, api=api, version=version, rollback=rollback,
                             rollback_to=rollback_to)


def _orchestrate_here(args: argparse.Namespace, config: flydeploy.FleetConfig, image: str, **options: Any) -> int:
    """Run ``orchestrate`` in this process (``--local``, ``--direct``) with the resolved
    settings; with ``hot --plan --json`` the plan's JSON goes to ``args.plan_out``.
    Returns the exit code."""
    plan_out = getattr(args, "plan_out", None)
    report = flydeploy.orchestrate(config.app, image, force=args.force, plan=getattr(args, "plan", False),
                                   **options, **config.orchestrate_options())
    if plan_out is not None:
        plan_out.write(json.dumps(report.plan, sort_keys=True) + "\n")
        plan_out.flush()
    return report.exit_code


def _owner() -> tuple[str, bool]:
    """Who deploys (the flyctl user, else user@host), and whether flyctl has a session."""
    who = _capture(["fly", "auth", "whoami"])
    return who or f"{getpass.getuser()}@{socket.gethostname()}", who is not None


def _print_plan(config: flydeploy.FleetConfig, commands: list[list[str]], steps: Iterable[str] = ()) -> None:
    print("Configuration (flags > pyproject.toml [tool.flydeploy] > fly.toml > defaults):")
    for key, source in config.sources.items():
        value = getattr(config, key)
        if isinstance(value, Mapping):
            value = ", ".join(_shown(k, v) for k, v in value.items()) or "-"
        elif isinstance(value, tuple):
            value = ", ".join(map(str, value)) or "-"
        shown = _without_passwords(str(value)) if value is not None else "-"
        print(f"  {key:<16} {shown}  ({source})")
    env = ", ".join(_shown(k, v) for k, v in config.env.items()) or "-"
    print(f"  {'fly.toml [env]':<16} {env}")
    print("Commands that would run:" if commands else "What would happen:")
    for number, step in enumerate([shlex.join(redact(c)) for c in commands] + list(steps), 1):
        print(f"  {number}. {step}")
    print("Nothing was built, pushed, locked or changed (--dry-run).")


def _orchestrator_env(config: flydeploy.FleetConfig, can_mint: bool, dry_run: bool) -> tuple[dict, list]:
    """The orchestrator's token environment and the token command that feeds it.  The
    token goes to the machine in the Machines API request, never on a command line."""
    if not can_mint:
        _say("no local flyctl session can mint an exec token: the orchestrator uses the app's "
             "FLY_API_TOKEN secret")
        return {}, []
    if dry_run:
        return {"FLYDEPLOY_API_TOKEN": _REDACTED}, [token_command(config)]
    token = mint_exec_token(config)
    if token is None:
        _say("could not mint an exec token: the orchestrator uses the app's FLY_API_TOKEN secret")
        return {}, []
    _say("minted a 1-hour exec token for the orchestrator (limited to "
         f"`{shlex.join(config.machine_commands().token_prefix())} ...`)")
    return {"FLYDEPLOY_API_TOKEN": token}, []


def _push(config: flydeploy.FleetConfig, image: str, argv: list[str], dry_run: bool,
          build: list[str] | None = None, plan_out: TextIO | None = None) -> int:
    """Start the orchestrator (after the build, if any); ``--dry-run`` prints the plan instead."""
    owner, can_mint = _owner()
    # The run's id is the orchestrator machine's and the deploy lock's: either names the other.
    run_id = secrets.token_hex(16)
    argv = argv + ["--owner", owner, "--upgrade-id", run_id]
    if dry_run:
        env, token_commands = _orchestrator_env(config, can_mint, True)
        machine = orchestrator_config(config, image, argv, env, run_id=run_id, launcher=_launcher())
        shown = {**machine, "env": {k: _shown(k, v).split("=", 1)[1] for k, v in machine["env"].items()}}
        _print_plan(config, ([build] if build else []) + token_commands,
                    [f"create the orchestrator machine through the Machines API (POST /v1/apps/{config.app}/"
                     f"machines), destroyed when it exits: {json.dumps(shown)}",
                     f"show its output with `{shlex.join(logs_command(config, '<machine id>'))}`; its exit code "
                     "comes from the machine's exit event"])
        return 0
    api = _laptop_api(config)
    recover_stale_orchestrators(api)
    if build:
        _say(f"building {image}")
        run_build(build, image)
    env, _ = _orchestrator_env(config, can_mint, False)
    _say(f"starting the orchestrator from {image}")
    machine = orchestrator_config(config, image, argv, env, run_id=run_id, launcher=_launcher())
    return launch_orchestrator(api, machine, lambda machine_id: logs_command(config, machine_id),
                               plan_out=plan_out)


def image_label(version: str) -> str:
    """The image tag of a release: ``flydeploy-<version>-<6 hex>``, at most 128 characters
    (Docker's limit): a long version is cut and a hash of it keeps the tag unique."""
    suffix = secrets.token_hex(3)
    label = f"flydeploy-{version}-{suffix}"
    if len(label) <= _MAX_TAG:
        return label
    digest = hashlib.sha256(version.encode()).hexdigest()[:8]
    keep = _MAX_TAG - len(f"flydeploy--{digest}-{suffix}")
    return f"flydeploy-{version[:keep]}-{digest}-{suffix}"


def _hot(args: argparse.Namespace) -> int:
    if args.json and not args.plan:
        raise flydeploy.ConfigError("--json goes with --plan (hot --plan --json prints the plan as JSON)")
    if args.json:
        # The plan's JSON alone on stdout, for CI: everything else goes to stderr.
        args.plan_out = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):
            return _hot_run(args)
    return _hot_run(args)


def _hot_run(args: argparse.Namespace) -> int:
    if args.direct and (args.skip_build or args.image or args.build_args or args.no_cache):
        raise flydeploy.ConfigError("--direct builds no image: --skip-build, --image, --build-arg and "
                                    "--no-cache do not apply")
    if args.local and (args.skip_build or args.image or args.build_args or args.no_cache):
        raise flydeploy.ConfigError("--local builds no image: --skip-build, --image, --build-arg and "
                                    "--no-cache do not apply")
    if args.image and not args.skip_build:
        raise flydeploy.ConfigError("--image REF goes with --skip-build (to upgrade from an image "
                                    "already pushed)")
    if args.skip_build and not args.image:
        raise flydeploy.ConfigError("--skip-build needs --image REF: the image to run the orchestrator from")
    config = _config(args)
    version = args.version or flydeploy.default_version()
    flydeploy.release_key(config.app, version)  # a version that cannot name a release stops here
    if args.local:
        return _local_push(args, config, version=version)
    if args.direct:
        return _direct_push(args, config, version=version)
    prebuilt = config.build.get("image") if isinstance(config.build.get("image"), str) else None
    image = args.image or prebuilt or f"registry.fly.io/{config.app}:{image_label(version)}"
    build = None
    if args.skip_build:
        pass
    elif prebuilt:
        _say(f"fly.toml [build] image = {prebuilt}: a prebuilt image, nothing to build; the release is "
             "packed from it")
    else:
        build = build_command(config, image.rsplit(":", 1)[1], no_cache=args.no_cache)
    argv = orchestrate_argv(config, image, version=version, force=args.force, plan=args.plan, plan_json=args.json)
    return _push(config, image, argv, args.dry_run, build, plan_out=getattr(args, "plan_out", None))


# --- hot --direct: the orchestration from here ----------------------------------

# A dotenv line: NAME=VALUE, optionally after `export `.
_DOTENV_RE = re.compile(r"^\s*(?:export\s+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>.*?)\s*$")
_DOTENV_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
_LARGEST_SHOWN = 5


def read_env_file(path: str) -> dict[str, str]:
    """The variables of a dotenv file: ``NAME=VALUE`` lines (``export`` allowed),
    ``#`` comments, values bare (a `` #`` starts a comment), in single quotes
    (literal) or in double quotes (``\\n``, ``\\"`` ... escapes).  A line that is
    none of these is a ``ConfigError`` naming it (never its value)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise flydeploy.ConfigError(f"cannot read --env-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    values = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DOTENV_RE.match(line)
        value = match.group("value") if match else ""
        if match is None or (value[:1] in "'\"" and value and (len(value) < 2 or value[-1] != value[0])):
            raise flydeploy.ConfigError(f"{path}, line {number}: not NAME=VALUE (dotenv format); fix the line")
        if value[:1] == "'":
            value = value[1:-1]
        elif value[:1] == '"':
            value = re.sub(r"\\(.)", lambda m: _DOTENV_ESCAPES.get(m.group(1), "\\" + m.group(1)), value[1:-1])
        else:
            value = re.split(r"\s+#", value, maxsplit=1)[0]
        values[match.group("name")] = value
    return values


def _direct_environment(args: argparse.Namespace) -> None:
    """Add ``--env-file``'s variables to this process's environment; those already set win,
    as with docker compose's ``.env``."""
    if getattr(args, "env_file", None):
        for name, value in read_env_file(args.env_file).items():
            os.environ.setdefault(name, value)


def direct_store(config: flydeploy.FleetConfig) -> flydeploy.S3:
    """The app's bucket with the credentials of this machine, or a ``ConfigError``
    naming exactly what to set and where to get it."""
    missing = [name for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(name, "").strip()]
    if not (config.bucket or os.environ.get("BUCKET_NAME", "").strip()):
        missing.append("BUCKET_NAME")
    if missing:
        raise flydeploy.ConfigError(
            f"--direct reaches the app's bucket from here, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set. Set them in the environment or in a dotenv file "
            "given with --env-file (AWS_ENDPOINT_URL_S3 too unless the bucket is on Tigris; BUCKET_NAME may "
            "also be [tool.flydeploy] bucket). They are the bucket credentials the app already has as secrets "
            f"(`fly secrets list -a {config.app}` names them; their values cannot be read back): make an access "
            "key for the bucket in `fly storage dashboard`")
    return config.s3()


def git_state(project: str | os.PathLike[str]) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout ``project`` is in; ``(None, None)`` when it is none."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(project), *args], capture_output=True, text=True, timeout=60,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if commit is None:
        return None, None
    changes = git("status", "--porcelain")
    return commit.strip(), None if changes is None else bool(changes.strip())


def _fleet_image(config: flydeploy.FleetConfig, machines: list[dict]) -> str:
    """The one image the app's machines run, or an error when they run several or none."""
    selection = flydeploy.select_machines(machines, process_groups=config.process_groups)
    images = collections.Counter(flydeploy.machine_image(m) for m in selection.targets + selection.pending)
    if not images:
        raise flydeploy.FlyDeployError(f"{config.app} has no app machines: deploy it with `fly deploy` first")
    if len(images) > 1:
        shown = ", ".join(f"{image} ({count})" for image, count in images.most_common())
        raise flydeploy.FlyDeployError(f"the machines run {len(images)} images ({shown}): a `fly deploy` is not "
                                       "finished; let it finish (or run it again), then run hot --direct")
    return next(iter(images))


def _missing_generated(config: flydeploy.FleetConfig) -> list[str]:
    """The ``generated`` patterns no file of the app root matches."""
    return [pattern for pattern in config.generated
            if not glob.glob(pattern, root_dir=config.root, recursive=True)]


def judge_local_tree(config: flydeploy.FleetConfig, current: Mapping[str, Any] | None, image: str,
                     here: Mapping[str, Any]) -> str:
    """Whether this tree can be what runs on the machines: a note, or a ``FlyDeployError``.

    ``here`` is this tree's ``dependency_fingerprint``; ``current`` the
    app's ``current.json``, which records the image's when a machine of it
    booted.
    """
    missing = _missing_generated(config)
    if missing:
        raise flydeploy.FlyDeployError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} made by the image build "
            f"([tool.flydeploy] generated) and missing under {config.root}: make "
            f"{'it' if len(missing) == 1 else 'them'} here as the Dockerfile does, or run `hot` without --direct")
    recorded = (current or {}).get("dependencies") if (current or {}).get("image_ref") == image else None
    if not isinstance(recorded, Mapping):
        return (f"the dependency files could not be compared: current.json records none for {image} (a machine "
                "records them when it boots a new image with this flydeploy); make sure requirements and lock "
                "files did not change since that image was built")
    changed = flydeploy.dependency_changes(recorded, here)
    if changed:
        raise flydeploy.FlyDeployError(
            f"the dependency files changed since the image the machines run ({image}) was built: "
            f"{', '.join(changed)}. A dependency change needs `fly deploy` (a cold deploy); hot upgrades ship "
            "application code only")
    return f"dependency files unchanged since {image}"


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB"):
        if count < 1024 or unit == "MB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"


def ignore_note(config: flydeploy.FleetConfig, rules: flydeploy.DockerIgnore) -> str:
    """What ``rules`` (``config.dockerignore()``) were read from, for the release line:
    `` (.dockerignore honoured)``; nothing when there is no ``.dockerignore``."""
    path, setting = config.ignore_file()
    shown = os.path.relpath(path, config.project_dir)
    if rules.source is not None:
        return f" ({shown} honoured{'' if shown == setting else ': ' + setting})"
    if setting == ".dockerignore":
        return ""
    return f" ({setting} {shown} does not exist: as flyctl does, only fly.toml is left out)"


def buildkit_note(config: flydeploy.FleetConfig, files: list[tuple[str, int]]) -> str | None:
    """When fly.toml ``[build] ignorefile`` chose ``files``: the files a BuildKit build
    would have copied otherwise (flyctl gives BuildKit no excludes, and it reads the
    context's ``.dockerignore``: ``FleetConfig.ignore_file``), named; None when both agree.
    Which builder ``fly deploy`` uses cannot be known from here."""
    path, setting = config.ignore_file()
    if setting == ".dockerignore":
        return None
    dockerignore = config.project_dir / ".dockerignore"
    rules = (flydeploy.DockerIgnore.for_context(config.project_dir, config.root, dockerignore)
             if dockerignore.is_file() else flydeploy.DockerIgnore(()))
    other = flydeploy.list_release_files(config.root, include=config.include, exclude=config.exclude,
                                         dockerignore=rules)
    differ = sorted({rel for rel, _ in files} ^ {rel for rel, _ in other})
    if not differ:
        return None
    return (f"note: {setting} counts when flyctl makes the build context itself; a BuildKit build (Depot, or a "
            f"Docker daemon with BuildKit) reads {'.dockerignore' if dockerignore.is_file() else 'no ignore file'} "
            f"instead, and would differ for {_plural_files(len(differ))}: {', '.join(differ[:_LARGEST_SHOWN])}"
            f"{', ...' if len(differ) > _LARGEST_SHOWN else ''}. Make the two alike, so that the release is what "
            "the image holds whichever builder built it")


def _plural_files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def files_summary(files: list[tuple[str, int]]) -> str:
    """``N files, SIZE; largest: a (SIZE), ...`` of a ``list_release_files`` result."""
    largest = sorted(files, key=lambda item: (-item[1], item[0]))[:_LARGEST_SHOWN]
    return (f"{_plural_files(len(files))}, {_size(sum(size for _, size in files))}; "
            f"largest: " + ", ".join(f"{path} ({_size(size)})" for path, size in largest))


def _direct_push(args: argparse.Namespace, config: flydeploy.FleetConfig, *, version: str | None = None,
                 rollback: bool = False, rollback_to: str | None = None) -> int:
    """``hot --direct`` / ``rollback --direct``: ``orchestrate`` runs here, as on the
    orchestrator machine, with the developer's token and this machine's bucket
    credentials.  The release is packed from the local tree as the image build
    would have copied it, after the checks that it can be what the machines run."""
    with concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="flydeploy-ask") as ask:
        return _direct_run(args, config, ask, version=version, rollback=rollback, rollback_to=rollback_to)


def _direct_run(args: argparse.Namespace, config: flydeploy.FleetConfig, ask: concurrent.futures.Executor, *,
                version: str | None, rollback: bool, rollback_to: str | None) -> int:
    # What other programs and servers answer is asked at once, each in a thread of ``ask``,
    # and waited for where it is needed: flyctl (the token, who deploys), git (the commit),
    # the bucket (current.json, once its credentials are known); the checks run meanwhile.
    asked_api = ask.submit(_laptop_api, config)
    asked_owner = ask.submit(_owner)
    local_tree = None
    if not rollback:
        asked_git = ask.submit(git_state, config.project_dir)
        dockerignore = config.dockerignore()
        files = flydeploy.list_release_files(config.root, include=config.include, exclude=config.exclude,
                                             dockerignore=dockerignore)
        _say(f"release from {config.root}{ignore_note(config, dockerignore)}: {files_summary(files)}")
        note = buildkit_note(config, files)
        if note:
            _say(note)
    store = direct_store(config)
    if not rollback:
        asked_current = ask.submit(flydeploy.read_current, store, config.app)
        here = flydeploy.dependency_fingerprint(config.project_dir)
        local_tree = flydeploy.LocalTree(dockerignore, *asked_git.result())
    api = asked_api.result()
    image = _fleet_image(config, api.list())
    if local_tree is not None:
        current, _ = asked_current.result()
        _say(judge_local_tree(config, current, image, here))
        tree = (f"git {local_tree.git_commit[:12]}{' with uncommitted changes' if local_tree.git_dirty else ''}"
                if local_tree.git_commit else "not a git checkout")
        _say(f"the machines run {image}; the release is packed from this tree ({tree}), no image is built")
    if args.dry_run:
        what = (f"roll back to {rollback_to or 'the previous release'}" if rollback else
                f"pack {config.root}, upload it to {store.bucket}")
        _print_plan(config, [], [
            f"run the upgrade from here with the Machines API ({api.base_url}) as you and the bucket "
            f"{store.bucket} with this machine's credentials: take the deploy "
            f"lock, {what}, prepare it on every started machine of {config.app} (the check that each can take "
            f"part), record it in current.json, apply it on every one "
            f"{config.max_concurrency} at a time, collect the results, release the lock"])
        return 0
    owner, _ = asked_owner.result()
    try:
        return _orchestrate_here(args, config, image, store=store, api=api, version=version, rollback=rollback,
                                 rollback_to=rollback_to, owner=owner, local_tree=local_tree)
    except KeyboardInterrupt:
        print("interrupted: the orchestration stopped here and released the deploy lock if it held it; machines "
              "that had already started their upgrade finish it (`status --direct` shows what each runs)",
              file=sys.stderr, flush=True)
        raise


def _running_image(config: flydeploy.FleetConfig) -> str:
    """The image most app machines run, from ``fly machines list --json``."""
    command = ["fly", "machines", "list", "--json", "-a", config.require_app()]
    try:
        machines = json.loads(_fly_output(command) or "null")
    except ValueError:
        machines = None
    if not isinstance(machines, list):
        raise flydeploy.FlyDeployError(f"`{shlex.join(command)}` failed; log in with `fly auth login`, "
                                       "or pass --image REF")
    selection = flydeploy.select_machines(machines, process_groups=config.process_groups)
    images = collections.Counter(flydeploy.machine_image(m) for m in selection.targets + selection.pending)
    if not images:
        raise flydeploy.FlyDeployError(f"{config.app} has no app machines to take the image from; "
                                       "pass --image REF")
    return images.most_common(1)[0][0]


def _rollback(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.to:
        flydeploy.release_key(config.app, args.to)
    if args.local:
        return _local_push(args, config, rollback=True, rollback_to=args.to)
    if args.direct:
        return _direct_push(args, config, rollback=True, rollback_to=args.to)
    image = args.image or _running_image(config)
    argv = orchestrate_argv(config, image, force=args.force, rollback=True, rollback_to=args.to)
    return _push(config, image, argv, args.dry_run)


def _image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else name


def _status(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.local:
        store, api = _local_fleet(args, config)
    elif args.direct:
        store, api = direct_store(config), _laptop_api(config)
    else:
        try:
            store = config.s3()
        except flydeploy.ConfigError as exc:
            store = None
            print(f"note: current.json could not be read ({exc}); each machine's version below comes "
                  "from the machine itself (rpc info), not compared with the recorded hot upgrade",
                  file=sys.stderr)
        token = os.environ.get("FLY_API_TOKEN") or mint_exec_token(config)
        if not token:
            raise flydeploy.ConfigError("status needs a Machines API token: set FLY_API_TOKEN, or log in "
                                        "with `fly auth login` so that one can be minted")
        api = flydeploy.Machines(config.app, token)
    rows = flydeploy.fleet_status(config.app, store=store, api=api, commands=config.machine_commands(),
                                  process_groups=config.process_groups,
                                  max_concurrency=config.max_concurrency)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    header = ("MACHINE", "REGION", "STATE", "IMAGE", "HOT UPGRADE", "APPLIED", "STATUS")
    table = [header] + [(r["machine_id"], r["region"] or "", r["state"], _image_tag(r["image"]),
                         r["hot_upgrade_version"] or "-", r["applied_at"] or "-",
                         r["verdict"] + (f" ({r['error']})" if r["error"] else "")) for r in rows]
    print("\n".join(_table_lines(table)))
    if not rows:
        print(f"{config.app} has no app machines")
    if args.local:
        processes = [p for row in rows for p in row["process_list"]]
        count = len(processes)
        print(f"\n{count} flydeploy process{'' if count == 1 else 'es'} of {config.app} on this host:")
        print("\n".join(_table_lines([("PID", "VERSION", "APPLIED AT")] + [
            (str(p["pid"]), p["version"] or "-", p["applied_at"] or "-") for p in processes])))
    return 0


def _table_lines(table: list[tuple]) -> list[str]:
    """Rows as left-aligned columns; the last one is not padded."""
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]) - 1)]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[-1])
            for row in table]


# --- doctor -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DoctorCheck:
    """One line of ``doctor``: what was checked, whether it holds, what was found, the fix."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None

    def lines(self) -> list[str]:
        """``✓ name: detail``, or ``✗ name: detail`` and the fix below it."""
        head = [f"{'✓' if self.ok else '✗'} {self.name}: {self.detail}"]
        return head + ([f"    fix: {self.fix}"] if self.fix and not self.ok else [])


def _doctor_checks(args: argparse.Namespace) -> Iterator[DoctorCheck]:
    """Every ``doctor`` check, in order; a check later ones depend on stops them when it fails."""
    try:
        config = _config(args)
    except flydeploy.FlyDeployError as exc:
        yield DoctorCheck("settings", False, str(exc), "fix fly.toml or [tool.flydeploy] in pyproject.toml")
        return
    commands = config.machine_commands()
    yield DoctorCheck("settings", True, f"app {config.app}; on the machines flydeploy runs as "
                      f"`{shlex.join(commands.argv())}` (python from {config.sources['python']}, app_dir from "
                      f"{config.sources['app_dir']}); bucket {config.bucket or 'from BUCKET_NAME'}")
    if config.build.get("image"):
        yield DoctorCheck("fly.toml [build]", True, f"prebuilt image {config.build['image']}: hot runs from it "
                          "and builds nothing")
    fly = shutil.which("fly") or shutil.which("flyctl")
    yield DoctorCheck("flyctl", fly is not None, fly or "not found on PATH",
                      "install flyctl (https://fly.io/docs/flyctl/install/) and put it on PATH")
    who = _capture(["fly", "auth", "whoami"]) if fly else None
    yield DoctorCheck("flyctl login", who is not None, f"logged in as {who}" if who else "not logged in",
                      "run `fly auth login`, or set FLY_API_TOKEN (e.g. from `fly tokens create deploy`)")
    try:
        api = _laptop_api(config)
        machines = api.list()
    except flydeploy.FlyDeployError as exc:
        yield DoctorCheck("Machines API", False, str(exc), "log in with `fly auth login` or set FLY_API_TOKEN, "
                          "and check the app name")
        return
    yield DoctorCheck("Machines API", True, f"{api.base_url} answers: {len(machines)} machines listed")
    selection = flydeploy.select_machines(machines, process_groups=config.process_groups)
    groups: dict[str, collections.Counter] = {}
    for machine in selection.targets + selection.pending + tuple(m for m, _ in selection.skipped):
        groups.setdefault(flydeploy.machine_group(machine) or "-", collections.Counter())[machine.get("state")] += 1
    for group, states in sorted(groups.items()):
        shown = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        yield DoctorCheck(f"group {group}", states["started"] > 0, shown,
                          "start a machine of this group (`fly machine start`) so that it can be checked")
    if not groups:
        yield DoctorCheck("machines", False, "no app machines", "deploy the app with `fly deploy` first")
        return
    checks = flydeploy.run_preflight(api, config.app, selection.targets, commands, extra=["--store"],
                                     max_concurrency=config.max_concurrency)
    for check in checks:
        yield DoctorCheck(f"machine {check.machine_id}", check.ok, check.line()[2:],
                          None if check.ok else "see the message; then run doctor again")
    reports = [c for c in checks if c.report]
    if reports:
        first = reports[0].report
        token = mint_exec_token(config) if who else None
        if token:
            refused = flydeploy.run_preflight(flydeploy.Machines(config.app, token), config.app,
                                              [m for m in selection.targets if m["id"] == reports[0].machine_id],
                                              commands)[0]
            fallback = "set" if first.get("fly_api_token_set") else "NOT set"
            yield DoctorCheck("exec token", refused.status not in (401, 403),
                              "a minted exec token runs flydeploy's commands" if refused.status not in (401, 403)
                              else f"the API refuses a minted exec token ({refused.error}); the app's FLY_API_TOKEN "
                                   f"secret, which hot then uses, is {fallback}",
                              'fly secrets set FLY_API_TOKEN="$(fly tokens create deploy)"')
        yield from _store_checks(reports[0].machine_id, first.get("store") or {}, selection)


def _store_checks(machine_id: str, store: Mapping[str, Any], selection: flydeploy.MachineSelection
                  ) -> Iterator[DoctorCheck]:
    """The bucket as a machine reaches it, and current.json against the images the machines run."""
    if not store.get("ok"):
        yield DoctorCheck("bucket", False, f"not reachable from machine {machine_id}: {store.get('error')}",
                          "give the app its bucket secrets (`fly storage create` sets BUCKET_NAME, "
                          "AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
        return
    yield DoctorCheck("bucket", True, f"{store.get('bucket')} at {store.get('endpoint')} reachable from machine "
                      f"{machine_id} ({store.get('addressing')}-style addressing)")
    if not store.get("current_found"):
        yield DoctorCheck("current.json", True, "none yet: the first hot upgrade records it")
        return
    images = collections.Counter(flydeploy.machine_image(m) for m in selection.targets + selection.pending)
    running = images.most_common(1)[0][0] if images else None
    consistent = running is None or store.get("image_ref") == running
    version = store.get("hot_upgrade") or "no hot upgrade"
    yield DoctorCheck("current.json", consistent,
                      f"for image {store.get('image_ref')}, {version}" + ("" if consistent else
                                                                            f"; the machines run {running}"),
                      "a cold deploy happened since: machines reset it as they boot, or run `hot` to record "
                      "the running image")


def _direct_checks(args: argparse.Namespace) -> Iterator[DoctorCheck]:
    """What ``hot --direct`` needs beyond the rest: the bucket from here, with this
    machine's credentials, and a tree that can be what the machines run."""
    try:
        config = _config(args)
        store = direct_store(config)
        current, _ = flydeploy.read_current(store, config.app)
    except flydeploy.ConfigError as exc:
        yield DoctorCheck("bucket from here (--direct)", False, str(exc),
                          "set what the message names, or pass --env-file FILE")
        return
    except flydeploy.FlyDeployError as exc:
        yield DoctorCheck("bucket from here (--direct)", False, str(exc),
                          "check AWS_ENDPOINT_URL_S3, BUCKET_NAME and the access key (`fly storage dashboard`)")
        return
    yield DoctorCheck("bucket from here (--direct)", True, f"{store.bucket} at {store.endpoint} answers with "
                      "this machine's credentials")
    try:
        image = _fleet_image(config, _laptop_api(config).list())
        files = flydeploy.list_release_files(config.root, include=config.include, exclude=config.exclude,
                                             dockerignore=config.dockerignore())
        note = judge_local_tree(config, current, image, flydeploy.dependency_fingerprint(config.project_dir))
    except flydeploy.FlyDeployError as exc:
        yield DoctorCheck("local tree (--direct)", False, str(exc), "see the message; then run doctor again")
        return
    yield DoctorCheck("local tree (--direct)", True, f"{files_summary(files)}; {note}")


def doctor(args: argparse.Namespace) -> int:
    """``python -m flydeploy_cli doctor``: check what ``hot`` needs, one ✓/✗ line each with the fix.

    Exit 0 when every check passes, 1 otherwise; ``--json`` prints the checks as JSON.
    """
    checks = []
    for check in itertools.chain(_doctor_checks(args), _direct_checks(args) if args.direct else ()):
        checks.append(check)
        if not args.json:
            print("\n".join(check.lines()), flush=True)
    failed = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2, ensure_ascii=False))
    else:
        print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed" + (": fix the ✗ lines above"
                                                                            if failed else ""))
    return 1 if failed else 0


# --- demo -------------------------------------------------------------------

DEMO_APP = "flydeploy-demo"
"""The app name the demo's processes and its local store use."""

_DEMO_MAIN = '''\
"""The demo app: an HTTP endpoint, a TCP stream of ticks and a Counter server."""

import http.server
import json
import os
import socketserver
import sys
import threading
import time

import flydeploy

flydeploy.startup_reapply_current()  # the one line at boot: tracking and this process's agent

import counter  # noqa: E402  (the code the demo upgrades)

COUNTER = counter.Counter.start(name="counter")


class Stream(socketserver.StreamRequestHandler):
    """A client that stays connected: a tick line every 50 ms."""

    def handle(self):
        while True:
            COUNTER.cast("tick")
            self.wfile.write((counter.tick_line(COUNTER.call("get")) + "\\n").encode())
            time.sleep(0.05)


class Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "version": counter.VERSION,
                           "counter": COUNTER.call("get")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


socketserver.ThreadingTCPServer.daemon_threads = True
http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Http)
stream_server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Stream)
threading.Thread(target=stream_server.serve_forever, daemon=True).start()
ready = sys.argv[1]  # the ports, in a file of their own: the app's output may hold warnings
with open(ready + ".tmp", "w", encoding="utf-8") as file:
    json.dump({"http": http_server.server_address[1], "stream": stream_server.server_address[1]}, file)
os.replace(ready + ".tmp", ready)
http_server.serve_forever()
'''

_DEMO_COUNTER_V1 = '''\
import flydeploy

VERSION = "v1"


class Counter(flydeploy.Server):
    vsn = 1

    def init(self):
        return {"n": 0}

    def handle_call(self, request, state):
        return dict(state), state

    def handle_cast(self, message, state):
        return {"n": state["n"] + 1}


def tick_line(state):
    return f"v1 tick {state['n']}"
'''

_DEMO_COUNTER_V2 = '''\
import flydeploy

VERSION = "v2"


class Counter(flydeploy.Server):
    vsn = 2

    def init(self):
        return {"ticks": 0, "since_upgrade": 0}

    def handle_call(self, request, state):
        return dict(state), state

    def handle_cast(self, message, state):
        return {"ticks": state["ticks"] + 1, "since_upgrade": state["since_upgrade"] + 1}

    def code_change(self, old_vsn, state, extra):
        # v1 kept {"n": ...}; v2 keeps the same count under a new shape.
        return {"ticks": state["n"], "since_upgrade": 0}


def tick_line(state):
    return f"v2 tick {state['ticks']} ({state['since_upgrade']} since the upgrade)"
'''

_DEMO_DEADLINE_S = 10.0
"""The whole demo, start to printed table, must finish within this many seconds."""

_DEMO_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, kill and a closed terminal: each stops the demo and cleans up."""


class _StreamReader(threading.Thread):
    """Reads the demo app's tick stream; remembers every line, when it came, and how the stream ended."""

    def __init__(self, port: int, timeout: float) -> None:
        super().__init__(daemon=True, name="demo-stream")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.lines: list[tuple[float, str]] = []
        self.ended: str | None = None

    def run(self) -> None:
        try:
            with self.sock.makefile("r", encoding="utf-8") as stream:
                for line in stream:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                self.ended = "closed by the app"
        except OSError as exc:
            self.ended = self.ended or f"broken: {exc}"

    def close(self) -> None:
        self.ended = self.ended or "closed by the demo"
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _demo_left(deadline: float, what: str) -> float:
    """Seconds left before the demo's deadline; past it, an error naming what it was waiting for."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise flydeploy.FlyDeployError(f"demo: ran out of its {_DEMO_DEADLINE_S:.0f} s waiting for {what}; "
                                       "the machine may be overloaded, try again when it is idle")
    return left


def _demo_wait(condition: Callable[[], object], what: str, deadline: float) -> None:
    while not condition():
        _demo_left(deadline, what)
        time.sleep(0.02)


def _demo_get(port: int, deadline: float) -> dict:
    timeout = _demo_left(deadline, "the app's HTTP answer")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as response:
        return json.loads(response.read())


def _demo_suspend_ms(store: str) -> float | None:
    """The suspension the machine reported, from the result file the upgrade's apply phase stored."""
    for path in glob.glob(os.path.join(store, "releases", f"{DEMO_APP}-results", "*", "apply", "*.json")):
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as file:
                return float(json.load(file)["suspend_duration_ms"])
    return None


def _demo_env(runtime: str) -> dict[str, str]:
    """The whole environment of the demo's processes: nothing of the user's flydeploy, AWS or Fly settings."""
    library = os.path.dirname(os.path.abspath(flydeploy.__file__))
    env = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
           if name in os.environ}
    env.update(FLY_APP_NAME=DEMO_APP, FLYDEPLOY_RUNTIME_DIR=runtime, PYTHONPATH=library,
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _demo_launch(root: str, env: dict[str, str]) -> subprocess.Popen:
    """Start ``app.py`` in ``root`` in its own session; its output goes to app.log, its ports to ready.json."""
    with open(os.path.join(root, "app.log"), "wb") as log:
        return subprocess.Popen([sys.executable, "app.py", os.path.join(root, "ready.json")], cwd=root, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _demo_ports(root: str, app: subprocess.Popen, deadline: float) -> dict:
    """The ports the started app wrote to ready.json (atomically, so a file seen is a whole one)."""
    ready = os.path.join(root, "ready.json")
    _demo_wait(lambda: os.path.exists(ready) or app.poll() is not None, "the app to start", deadline)
    try:
        with open(ready, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        raise flydeploy.FlyDeployError(f"demo: the app did not start:\n{_demo_log(root)}") from None


def _demo_log(root: str) -> str:
    with open(os.path.join(root, "app.log"), encoding="utf-8", errors="replace") as log:
        return log.read()


def _demo_stop(app: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(app.pid, signal.SIGTERM)
    try:
        app.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(app.pid, signal.SIGKILL)
        app.wait()


def _demo_migrated(before: dict, after: dict) -> bool:
    """v2's state holds every tick v1 counted: ``ticks - since_upgrade`` (the ticks carried over) >= v1's ``n``."""
    counter = after.get("counter", {})
    try:
        return counter["ticks"] - counter["since_upgrade"] >= before["counter"]["n"]
    except (KeyError, TypeError):
        return False


def _demo_table(before: dict, after: dict, stream: _StreamReader, upgraded_at: float,
                suspend_ms: float | None) -> list[str]:
    times = [at for at, _ in stream.lines]
    gap_ms = max((b - a for a, b in zip(times, times[1:])), default=0.0) * 1000
    first_v2 = next((line for _, line in stream.lines if line.startswith("v2")), "(none)")
    last_v1 = next((line for _, line in reversed(stream.lines) if line.startswith("v1")), "(none)")
    suspension = f"{suspend_ms:.1f} ms" if suspend_ms is not None else "(not reported)"
    rows = [
        ("", "before (v1)", "after (v2)", ""),
        ("pid", before["pid"], after["pid"],
         "same process" if before["pid"] == after["pid"] else "A DIFFERENT PROCESS"),
        ("stream", last_v1, first_v2,
         f"never closed, {len(stream.lines)} lines, longest gap {gap_ms:.0f} ms" if stream.ended is None
         else f"ENDED: {stream.ended}"),
        ("counter", json.dumps(before["counter"]), json.dumps(after["counter"]),
         "kept and migrated by code_change" if _demo_migrated(before, after) else "NOT KEPT OR NOT MIGRATED"),
        ("GET /", before["version"], after["version"], "v2 answers" if after["version"] == "v2" else "NOT v2"),
        ("suspended", "", suspension, f"upgrade took {upgraded_at * 1000:.0f} ms end to end"),
    ]
    return _table_lines(rows)


def _demo_run(root: str, deadline: float) -> tuple[int, list[str]]:
    """Write, start, stream, edit, upgrade: the demo proper.  Returns the exit code and the lines to print."""
    runtime = os.path.join(root, "run")
    store = os.path.join(root, ".flydeploy")
    env = _demo_env(runtime)
    app = stream = None
    try:
        for name, text in {"app.py": _DEMO_MAIN, "counter.py": _DEMO_COUNTER_V1}.items():
            with open(os.path.join(root, name), "w", encoding="utf-8") as file:
                file.write(text)
        print(f"1. wrote a small app to {root}: an HTTP endpoint, a TCP stream, a Counter server", flush=True)
        with _signals_deferred(_DEMO_SIGNALS):  # never an app started whose pid the demo does not know
            app = _demo_launch(root, env)
        ports = _demo_ports(root, app, deadline)
        before = _demo_get(ports["http"], deadline)
        print(f"2. started it (pid {before['pid']}); a client is streaming ticks from it", flush=True)
        stream = _StreamReader(ports["stream"], _demo_left(deadline, "the stream to connect"))
        stream.start()
        _demo_wait(lambda: len(stream.lines) >= 5, "the first ticks", deadline)
        before = _demo_get(ports["http"], deadline)
        with open(os.path.join(root, "counter.py"), "w", encoding="utf-8") as file:
            file.write(_DEMO_COUNTER_V2)
        print("3. edited counter.py to v2: a new tick line, the counter's state in a new shape", flush=True)
        command = ["hot", "--local", "--root", root, "--store", store, "--app", DEMO_APP]
        print(f"4. FLYDEPLOY_RUNTIME_DIR={shlex.quote(runtime)} "
              f"python -m flydeploy_cli {shlex.join(command)}", flush=True)
        upgrade_started = time.monotonic()
        try:
            hot = subprocess.run([sys.executable, "-m", "flydeploy_cli", *command], env=env, cwd=root,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=_demo_left(deadline, "the hot upgrade"))
        except subprocess.TimeoutExpired:
            raise flydeploy.FlyDeployError(f"demo: the hot upgrade did not finish within {_DEMO_DEADLINE_S:.0f} s "
                                           "of the demo's start") from None
        upgraded_at = time.monotonic() - upgrade_started
        print("\n".join("     " + line for line in (hot.stdout + hot.stderr).splitlines()), flush=True)
        if hot.returncode != 0:
            return hot.returncode, [f"the hot upgrade failed (exit {hot.returncode}); the app's output:",
                                    _demo_log(root)]
        count = len(stream.lines)
        _demo_wait(lambda: len(stream.lines) >= count + 3 and stream.lines[-1][1].startswith("v2"),
                   "v2 ticks on the stream", deadline)
        after = _demo_get(ports["http"], deadline)
        ok = (before["pid"] == after["pid"] and stream.ended is None and after["version"] == "v2"
              and _demo_migrated(before, after))
        return (0 if ok else 1), ["", *_demo_table(before, after, stream, upgraded_at, _demo_suspend_ms(store))]
    finally:
        with _signals_deferred(_DEMO_SIGNALS):  # a second Ctrl-C cannot cut the cleanup short
            if stream is not None:
                stream.close()
            if app is not None:
                _demo_stop(app)
            shutil.rmtree(root, ignore_errors=True)


def demo() -> int:
    """``python -m flydeploy_cli demo``: a live hot upgrade on this machine, shown side by side.

    Writes a small app to a temporary folder, starts it with an environment
    of its own, keeps a client streaming from it, edits the app to a v2 whose
    ``code_change`` migrates the counter's state, runs ``hot --local`` on it
    and prints what happened, all within 10 seconds.  Removes everything it
    made, also on Ctrl-C, SIGTERM and SIGHUP (which raise KeyboardInterrupt).
    Exit 0 when the upgrade kept the process, the stream and the state, and
    v2 answers.
    """
    started = time.monotonic()
    with _signal_handlers(_interrupt, _DEMO_SIGNALS):
        root = tempfile.mkdtemp(prefix="flydeploy-demo-")
        code, lines = _demo_run(root, started + _DEMO_DEADLINE_S)
    print("\n".join(lines))
    print(f"\n{'done' if code == 0 else 'FAILED'} in {time.monotonic() - started:.1f} s; cleaned up {root}")
    return code


# --- Argument parsing -------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m flydeploy_cli", allow_abbrev=False,
        description="Hot code upgrades for Python applications on Fly.io.",
    )
    parser.add_argument("--version", action="version", version=f"flydeploy {flydeploy.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    hot = commands.add_parser("hot", allow_abbrev=False, help="build, push and hot-upgrade every machine")
    rollback = commands.add_parser("rollback", allow_abbrev=False, help="go back to an earlier hot upgrade")
    status = commands.add_parser("status", allow_abbrev=False, help="what every machine runs")
    doctor_parser = commands.add_parser("doctor", allow_abbrev=False,
                                        help="check the app, flyctl, the machines and the bucket before `hot`")
    commands.add_parser("demo", allow_abbrev=False,
                        help="see a live hot upgrade on this machine (nothing to set up)")
    for sub in (hot, rollback, status):
        sub.add_argument("--config", default="fly.toml", help="the app's fly.toml (default: ./fly.toml)")
        sub.add_argument("--local", action="store_true",
                         help="no Fly, no S3: the app's processes on this host and a local store")
        sub.add_argument("--root", metavar="DIR",
                         help="with --local: the project (default: the current directory)")
        sub.add_argument("--store", metavar="DIR",
                         help="with --local: the release store (default: ROOT/.flydeploy)")
    for sub in (hot, rollback, status, doctor_parser):
        sub.add_argument("--direct", action="store_true",
                         help="run the upgrade from here: no image build, no orchestrator machine; needs your "
                              "Fly token and the bucket's credentials here")
        sub.add_argument("--env-file", metavar="FILE",
                         help="with --direct: a dotenv file with the bucket's credentials (AWS_*, BUCKET_NAME)")
    for sub in (hot, rollback):
        flydeploy.add_fleet_arguments(sub)
        sub.add_argument("--dry-run", action="store_true",
                         help="print the settings and the commands; build, push and lock nothing")
    hot.add_argument("--skip-build", action="store_true", help="do not build: upgrade from --image")
    hot.add_argument("--image", metavar="REF", help="with --skip-build: the image to upgrade from")
    hot.add_argument("--build-arg", action="append", type=_key_value, dest="build_args", metavar="K=V",
                     help="a Docker build argument (repeatable)")
    hot.add_argument("--no-cache", action="store_true", help="build without the Docker cache")
    hot.add_argument("--version", help="the release version (default: a UTC timestamp)")
    hot.add_argument("--plan", action="store_true",
                     help="phase 1 only: prepare the release on every machine, print what it would do per "
                          "process group and discard it; exit 0 when it would apply everywhere")
    hot.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    rollback.add_argument("--to", metavar="VERSION", help="the version to go back to (default: the previous)")
    rollback.add_argument("--image", metavar="REF", help="the image to run the orchestrator from "
                          "(default: the one the machines run)")
    status.add_argument("--app", help="the Fly app (default: fly.toml's app)")
    status.add_argument("--process-group", action="append", dest="process_groups", metavar="G",
                        help="only machines of this process group (repeatable)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    doctor_parser.add_argument("--config", default="fly.toml", help="the app's fly.toml (default: ./fly.toml)")
    doctor_parser.add_argument("--app", help="the Fly app (default: fly.toml's app)")
    doctor_parser.add_argument("--process-group", action="append", dest="process_groups", metavar="G",
                               help="only machines of this process group (repeatable)")
    doctor_parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor_parser.set_defaults(local=False, root=None, store=None)
    return parser, {"hot": hot, "rollback": rollback, "status": status, "doctor": doctor_parser}


def _unknown_flags(extras: list[str], sub: argparse.ArgumentParser) -> str:
    known = [flag for action in sub._actions for flag in action.option_strings]
    hints = []
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1) if extra.startswith("-") else []
        if close:
            hints.append(f"{extra}: did you mean {close[0]}?")
    return f"unrecognized arguments: {' '.join(extras)}" + ("; " + "; ".join(hints) if hints else "")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser, subs = _parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        (subs.get(args.command) or parser).error(_unknown_flags(extras, subs.get(args.command) or parser))
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "build_args", None):
        args.build_args = dict(args.build_args)
    if args.command != "demo" and not args.local and (args.root or args.store):
        (subs[args.command]).error("--root and --store go with --local")
    if args.command != "demo" and args.env_file and not args.direct:
        (subs[args.command]).error("--env-file goes with --direct")
    if args.command != "demo" and args.direct and args.local:
        (subs[args.command]).error("--direct and --local do not go together")
    handler = {"hot": _hot, "rollback": _rollback, "status": _status, "doctor": doctor,
               "demo": lambda _: demo()}[args.command]
    try:
        if args.command != "demo" and args.direct:
            _direct_environment(args)
        # SIGTERM stops the build and the orchestrator as Ctrl-C does, and the deploy lock is released.
        with _signal_handlers(_interrupt, [signal.SIGTERM]):
            return handler(args)
    except (flydeploy.ConfigError, flydeploy.LockHeld) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except flydeploy.FlyDeployError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
