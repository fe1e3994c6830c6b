"""flydeploy_cli: the developer-side command line of flydeploy.

    python -m flydeploy_cli hot        build, push and hot-upgrade every machine
    python -m flydeploy_cli status     what every machine runs
    python -m flydeploy_cli rollback   back to an earlier hot upgrade
    python -m flydeploy_cli demo       a live hot upgrade on this machine, shown side by side

``hot``, ``status`` and ``rollback`` take ``--local [--root DIR] [--store DIR]``
to work on the app's processes on this host instead, with no Fly and no S3.
Installed as a package, the same commands are the ``flydeploy`` script; the
machine side (``rpc``, ``orchestrate``) is ``python -m flydeploy``.

Settings come, highest first, from the flags, ``[tool.flydeploy]`` in
``pyproject.toml``, ``fly.toml`` and the defaults.  ``hot`` builds the image
with ``fly deploy --build-only --push``, then starts a temporary orchestrator
machine from it (``fly machine run --rm``) that runs
``python -m flydeploy orchestrate``: it packs the app, stores the release and
execs ``rpc upgrade`` on every machine.  Exit codes: 0 every machine took the
upgrade, 1 a machine (or the build) failed, 2 bad usage or settings, or the
deploy lock is held, 130 interrupted.

Standard library only; the work itself is done by ``flydeploy``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import difflib
import getpass
import glob
import json
import os
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
    "orchestrator_command",
    "redact",
    "run_build",
    "mint_exec_token",
    "launch_orchestrator",
    "BUILD_SILENCE_S",
]

BUILD_SILENCE_S = 600.0
"""A build that prints nothing for this long (seconds) is stopped."""

_LAUNCH_ATTEMPTS = 3
_LAUNCH_RETRY_DELAY_S = 10.0
_INTERRUPT_GRACE_S = 60.0
_REDACTED = "<redacted>"
_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "AUTH", "PRIVATE", "DSN")
# user:password@ in a URL, whatever the variable's name.
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+(?=@)")
_IMAGE_LINE_RE = re.compile(r"^\s*image:\s*(\S+)")
_MARKER_RE = re.compile(re.escape(flydeploy.ORCHESTRATOR_MARKER) + r" (started|exit (\d+))")
_PAIR_FLAGS = ("-e", "--env", "--build-arg")
# flyctl failures a retry cannot fix: a new image that has not reached the
# registry yet fails otherwise, and only that is worth launching again for.
_NOT_PROPAGATION_RE = re.compile(
    r"no access token|not logged in|unauthori[sz]ed|not authori[sz]ed|authenticat|token validation|"
    r"permission denied|forbidden|could not find app|app not found|unknown flag|invalid argument",
    re.IGNORECASE)


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


def _rpc_prefix(config: flydeploy.FleetConfig) -> str:
    return shlex.join([config.python, "-m", "flydeploy", "rpc"])


def token_command(config: flydeploy.FleetConfig) -> list[str]:
    """``fly tokens create machine-exec``: a 1-hour token limited to ``<python> -m flydeploy rpc``."""
    return ["fly", "tokens", "create", "machine-exec", "-a", config.require_app(), "--expiry", "1h",
            "--command-prefix", _rpc_prefix(config)]


def orchestrate_argv(config: flydeploy.FleetConfig, image_ref: str, *, version: str | None = None,
                     owner: str | None = None, force: bool = False, rollback: bool = False,
                     rollback_to: str | None = None) -> list[str]:
    """The ``python -m flydeploy orchestrate ...`` command the orchestrator machine runs,
    carrying every resolved setting so that it does exactly what ``--dry-run`` shows."""
    config.require_app()
    argv = [config.python, "-m", "flydeploy", "orchestrate", "--image-ref", image_ref, *config.orchestrate_flags()]
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
    return argv


def orchestrator_command(config: flydeploy.FleetConfig, image_ref: str, argv: list[str],
                         env: Mapping[str, str]) -> list[str]:
    """``fly machine run <image> --entrypoint "sleep inf" ... --rm --shell --command "cd <app dir> && <argv>"``.

    The shell starts in ``/``, not the image's WORKDIR: the command goes to the
    app directory (``FleetConfig.app_dir``) first, where the app is packed from.
    """
    command = ["fly", "machine", "run", image_ref, "--entrypoint", "sleep inf", "-c", str(config.fly_toml)]
    command += _app_flag(config)
    command += ["--vm-memory", "1024"]
    for name, value in env.items():
        command += ["-e", f"{name}={value}"]
    shell = f"cd {shlex.quote(config.app_dir)} && {shlex.join(argv)}"
    return command + ["--rm", "--shell", "--command", shell]


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
            started.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True))
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


def _fly_output(command: list[str]) -> str | None:
    """What a quick flyctl command printed on stdout, or None when it failed."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _capture(command: list[str]) -> str | None:
    """The last line a quick flyctl command printed, or None when it failed or printed nothing."""
    lines = [line.strip() for line in (_fly_output(command) or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def mint_exec_token(config: flydeploy.FleetConfig) -> str | None:
    """A short-lived exec token from the local flyctl session (``token_command``),
    or None when there is no session that can mint one.  Never printed."""
    return _capture(token_command(config))


def launch_orchestrator(command: list[str], *, attempts: int = _LAUNCH_ATTEMPTS,
                        retry_delay_s: float = _LAUNCH_RETRY_DELAY_S, out: TextIO | None = None) -> int:
    """Run the orchestrator machine, streaming its output; return the upgrade's exit code.

    The launch is tried again (a new image may take a moment to reach the
    registry) only when the orchestrator never started and flyctl's error can
    be that (not an authentication or usage error), never after it began the
    upgrade.
    """
    out = out or sys.stdout
    for attempt in range(1, attempts + 1):
        started, ended, final = False, None, False

        def show(line: str) -> None:
            nonlocal started, ended, final
            match = _MARKER_RE.search(line)
            if match is None:
                final = final or (not started and _NOT_PROPAGATION_RE.search(line) is not None)
                out.write(line)
                out.flush()
            elif match.group(2) is None:
                started = True
            else:
                ended = int(match.group(2))

        code = _stream(command, show)
        if ended is not None:
            return ended
        if started:
            out.write(f"error: the orchestrator stopped without a result (fly exited {code}); "
                      "run `python -m flydeploy_cli status` to see what each machine runs\n")
            return 1
        if final:
            out.write(f"error: the orchestrator could not be started (fly machine run exited {code}); "
                      "see flyctl's output above: not an image still propagating, so not retried\n")
            return 1
        if attempt < attempts:
            out.write(f"the orchestrator did not start (fly machine run exited {code}); the new image may "
                      f"still be propagating, trying again in {retry_delay_s:g} s\n")
            out.flush()
            time.sleep(retry_delay_s)
    out.write(f"error: the orchestrator did not start after {attempts} attempts; see flyctl's output above\n")
    return 1


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
        # The agents are this host's processes: rpc runs with this interpreter.
        return dataclasses.replace(config, python=sys.executable,
                                   sources={**config.sources, "python": "--local (this interpreter)"})
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
    report = flydeploy.orchestrate(config.app, "local", store=store, api=api, version=version, rollback=rollback,
                                   rollback_to=rollback_to, force=args.force, **config.orchestrate_options())
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
            value = ", ".join(value) or "-"
        shown = _without_passwords(str(value)) if value is not None else "-"
        print(f"  {key:<16} {shown}  ({source})")
    env = ", ".join(_shown(k, v) for k, v in config.env.items()) or "-"
    print(f"  {'fly.toml [env]':<16} {env}")
    print("Commands that would run:" if commands else "What would happen:")
    for number, step in enumerate([shlex.join(redact(c)) for c in commands] + list(steps), 1):
        print(f"  {number}. {step}")
    print("Nothing was built, pushed, locked or changed (--dry-run).")


def _orchestrator_env(config: flydeploy.FleetConfig, can_mint: bool, dry_run: bool) -> tuple[dict, list]:
    """The orchestrator's environment and the token command that feeds it."""
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
    _say("minted a 1-hour exec token for the orchestrator")
    return {"FLYDEPLOY_API_TOKEN": token}, []


def _push(config: flydeploy.FleetConfig, image: str, argv: list[str], dry_run: bool,
          build: list[str] | None = None) -> int:
    """Start the orchestrator (after the build, if any); ``--dry-run`` prints the plan instead."""
    owner, can_mint = _owner()
    argv = argv + ["--owner", owner]
    if dry_run:
        env, token_commands = _orchestrator_env(config, can_mint, True)
        _print_plan(config, ([build] if build else []) + token_commands
                    + [orchestrator_command(config, image, argv, env)])
        return 0
    if build:
        _say(f"building {image}")
        run_build(build, image)
    env, _ = _orchestrator_env(config, can_mint, False)
    _say(f"starting the orchestrator from {image}")
    return launch_orchestrator(orchestrator_command(config, image, argv, env))


def _hot(args: argparse.Namespace) -> int:
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
    label = f"flydeploy-{version}-{secrets.token_hex(3)}"
    image = args.image or f"registry.fly.io/{config.app}:{label}"
    build = None if args.skip_build else build_command(config, label, no_cache=args.no_cache)
    argv = orchestrate_argv(config, image, version=version, force=args.force)
    return _push(config, image, argv, args.dry_run, build)


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
    rows = flydeploy.fleet_status(config.app, store=store, api=api, python=config.python,
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
    """The suspension the machine reported, from the result file the upgrade stored."""
    for path in glob.glob(os.path.join(store, "releases", f"{DEMO_APP}-results", "*", "*.json")):
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
    rollback.add_argument("--to", metavar="VERSION", help="the version to go back to (default: the previous)")
    rollback.add_argument("--image", metavar="REF", help="the image to run the orchestrator from "
                          "(default: the one the machines run)")
    status.add_argument("--app", help="the Fly app (default: fly.toml's app)")
    status.add_argument("--process-group", action="append", dest="process_groups", metavar="G",
                        help="only machines of this process group (repeatable)")
    status.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser, {"hot": hot, "rollback": rollback, "status": status}


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
    handler = {"hot": _hot, "rollback": _rollback, "status": _status, "demo": lambda _: demo()}[args.command]
    try:
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
