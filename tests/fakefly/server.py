"""The fake Fly platform: apps, machines as sandboxes, tokens, and the Machines API over HTTP.

``FakeFly`` owns everything: a threaded HTTP server on 127.0.0.1 speaking the
Machines API (shapes from the official swagger spec), the apps and their
secrets, the machines (each a directory with its own copy of an image, its
own env and its own app process), the tokens, and the faults a test switches
on.  See the package docstring for how tests drive it.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import pathlib
import re
import secrets as secrets_module
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse

from . import images

AUTH_ERROR = "Authenticate: token validation error"
_ADJECTIVES = ("purple", "quiet", "bold", "misty", "rapid", "silent", "lively", "young", "ancient")
_NOUNS = ("sun", "river", "forest", "meadow", "cloud", "fire", "wave", "moon", "pine")
_REGIONS = ("ams", "iad", "syd", "cdg", "nrt")
_STOP_GRACE = 5.0


class ApiError(Exception):
    """An error reply: HTTP status and Fly's ``{"error": ...}`` body."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


# --- faults -----------------------------------------------------------------

FAULT_KINDS = ("500", "429", "408", "drop", "slow", "latency")


@dataclasses.dataclass
class Fault:
    """One switchable fault; see ``Faults.add``."""

    kind: str
    op: str | None
    machine: str | None
    times: int | None
    retry_after: str | None
    delay: float
    fired: int = 0


class Faults:
    """Faults the API injects, matched by operation and machine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Fault] = []

    def add(self, kind: str, *, op: str | None = None, machine: str | None = None,
            times: int | None = 1, retry_after: str | None = "1", delay: float = 0.0) -> Fault:
        """Inject ``kind`` into the next ``times`` matching requests (``None``: every one).

        Kinds: ``"500"`` (an internal error), ``"429"`` (rate limited, with
        ``Retry-After: retry_after``), ``"408"`` (a timeout reply after
        ``delay`` s), ``"drop"`` (the connection is closed with no reply),
        ``"slow"`` (the request waits ``delay`` s, then is served normally),
        ``"latency"`` (a network round trip of ``delay`` s: half before the
        request is served, half before its reply leaves).
        ``op`` is one of list, get, create, destroy, exec, wait, lease,
        start, stop, restart, suspend (``None``: any); ``machine`` a machine id.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; use one of {FAULT_KINDS}")
        fault = Fault(kind, op, machine, times, retry_after, delay)
        with self._lock:
            self._rules.append(fault)
        return fault

    def take(self, op: str, machine: str | None) -> Fault | None:
        with self._lock:
            for fault in self._rules:
                if (fault.op in (None, op) and fault.machine in (None, machine)
                        and (fault.times is None or fault.fired < fault.times)):
                    fault.fired += 1
                    return fault
        return None


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request the fake API received (after its faults, before auth)."""

    method: str
    path: str
    query: dict[str, list[str]]
    op: str
    app: str | None
    machine: str | None
    at: float  # time.monotonic() on arrival
    scheme: str  # the Authorization scheme, "" when absent
    body: object


# --- tokens -------------------------------------------------------------------


@dataclasses.dataclass
class Token:
    """A token the fake platform knows: ``user`` (every app), ``deploy`` or ``exec`` (one app)."""

    value: str
    kind: str
    app: str | None = None
    commands: tuple[tuple[str, ...], ...] = ()
    prefixes: tuple[tuple[str, ...], ...] = ()
    expires_at: float | None = None

    @property
    def macaroon(self) -> bool:
        return self.value.startswith(("fm1r_", "fm1a_", "fm2_"))

    def allows_command(self, argv: list[str]) -> bool:
        # The caveat is an argv prefix, compared word by word (macaroon flyio/caveats.go:357-388:
        # slices.Equal(allowedCommand.Args, commandArgs[:len(allowedCommand.Args)])).
        if self.kind != "exec" or not (self.commands or self.prefixes):
            return True
        return (tuple(argv) in self.commands
                or any(tuple(argv[:len(p)]) == p for p in self.prefixes))


def checked_argv(body: dict, field: str) -> list[str]:
    """The argv an exec token's command caveat is checked against.

    Which request field flaps builds it from is closed source (fly-platform-facts
    T3): fly-go and flyctl send only the deprecated ``cmd`` string, the spec
    names ``command`` the current field.  ``FakeFly.token_checks`` picks one;
    the product must work with either.
    """
    if field == "cmd":
        return shlex.split(body["cmd"]) if isinstance(body.get("cmd"), str) else []
    return list(body.get("command") or [])


def _new_token(macaroon: bool) -> str:
    return ("fm2_" if macaroon else "fo1_") + secrets_module.token_urlsafe(48)


# --- machines ---------------------------------------------------------------


class FakeMachine:
    """One machine: a sandbox directory, an env, an app process, a state."""

    def __init__(self, fly: FakeFly, app: FakeApp, config: dict, region: str,
                 name: str | None) -> None:
        self.fly = fly
        self.app = app
        self.id = secrets_module.token_hex(7)
        self.name = name or (f"{secrets_module.choice(_ADJECTIVES)}-"
                             f"{secrets_module.choice(_NOUNS)}-{secrets_module.randbelow(9000) + 1000}")
        self.region = region
        self.state = "created"
        self.config = config
        self.instance_id = images.ulid()
        self.created_at = self.updated_at = images.now_rfc3339()
        self.private_ip = f"fdaa:0:{secrets_module.randbelow(0xffff):x}:a7b:{secrets_module.randbelow(0xfff):x}::2"
        self.events: list[dict] = []
        self.lease: dict | None = None
        self.sandbox = fly.state_dir / "machines" / self.id
        self.root = self.sandbox / "app"
        self.log_path = self.sandbox / "app.log"
        # Unix socket paths are short (108 bytes): runtime dirs live under a short /tmp path.
        self.runtime_dir = fly.runtime_root / self.id
        self._process: subprocess.Popen | None = None
        self._execs: set[subprocess.Popen] = set()
        self._image = images.load(fly.state_dir, config["image"])
        self._install_image()

    # -- what the platform shows -------------------------------------------------

    @property
    def image_ref(self) -> str:
        """The ``FLY_IMAGE_REF`` of this machine."""
        return self.config["image"]

    @property
    def process_group(self) -> str:
        return (self.config.get("metadata") or {}).get("fly_process_group", "")

    def to_json(self) -> dict:
        """The Machine JSON object of the Machines API."""
        _, label = images.parse_ref(self.image_ref)
        return {
            "id": self.id, "name": self.name, "state": self.state, "region": self.region,
            "instance_id": self.instance_id, "private_ip": self.private_ip,
            "config": json.loads(json.dumps(self.config)),
            "image_ref": {"registry": images.REGISTRY, "repository": self.app.name, "tag": label,
                          "digest": self._image["digest"], "labels": {}},
            "created_at": self.created_at, "updated_at": self.updated_at,
            "events": list(reversed(self.events[-10:])),
            "checks": [],
        }

    @property
    def env(self) -> dict[str, str]:
        """The environment the app process and exec'd commands get."""
        metadata = self.config.get("metadata") or {}
        env = {
            "PATH": f"{self.fly.python_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.sandbox / "home"), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
        }
        env.update(self._image.get("env") or {})
        env.update(self.config.get("env") or {})
        env.update(self.app.secrets)
        env.update({
            "FLY_APP_NAME": self.app.name, "FLY_MACHINE_ID": self.id, "FLY_ALLOC_ID": self.id,
            "FLY_REGION": self.region, "FLY_IMAGE_REF": self.image_ref,
            "FLY_MACHINE_VERSION": self.instance_id, "FLY_PRIVATE_IP": self.private_ip,
            "FLY_PROCESS_GROUP": metadata.get("fly_process_group", ""),
            "FLY_VM_MEMORY_MB": str((self.config.get("guest") or {}).get("memory_mb", 256)),
            "PRIMARY_REGION": self.app.primary_region,
            "FLY_FLAPS_BASE_URL": self.fly.base_url,
            "FLYDEPLOY_RUNTIME_DIR": str(self.runtime_dir),
        })
        return env

    def command(self) -> list[str]:
        """The argv of the app process: init exec, else entrypoint/cmd, else the group's or the image's command."""
        init = self.config.get("init") or {}
        if init.get("exec"):
            return list(init["exec"])
        entrypoint = list(init.get("entrypoint") or [])
        cmd = list(init.get("cmd") or [])
        if not cmd and not entrypoint:
            # As in Docker, a new entrypoint drops the image's default command.
            group_command = self._image["processes"].get(self.process_group)
            cmd = shlex.split(group_command) if group_command else list(self._image["cmd"])
        argv = entrypoint + cmd
        if not argv:
            raise ApiError(422, f"image {self.image_ref} has no command: add CMD to its Dockerfile, "
                                f"a [processes] entry to fly.toml, or pass command=")
        return argv

    # -- lifecycle ---------------------------------------------------------------------

    def _install_image(self) -> None:
        """A fresh root filesystem: the image's tree, an empty home and runtime dir."""
        for path in (self.root, self.sandbox / "home", self.runtime_dir):
            shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(self._image["tree"], self.root, symlinks=True)
        (self.sandbox / "home").mkdir(parents=True)
        self.runtime_dir.mkdir(parents=True)

    def _event(self, kind: str, status: str, source: str = "user", request: dict | None = None) -> None:
        self.events.append({"id": images.ulid(), "type": kind, "status": status, "source": source,
                            "request": request or {}, "timestamp": int(time.time() * 1000)})
        self.updated_at = images.now_rfc3339()

    def _set_state(self, state: str) -> None:
        with self.fly.changed:
            self.state = state
            self.fly.changed.notify_all()

    def start(self) -> str:
        """Start the app process (or resume a suspended one); returns the previous state."""
        with self.fly.lock:
            previous = self.state
            if previous == "suspended":
                self._signal_group(signal.SIGCONT)
                self._wait_until_stopped(False)
                self._event("start", "started")
                self._set_state("started")
                return previous
            if previous not in ("created", "stopped"):
                raise ApiError(412, f"unable to start machine from current state: '{previous}'")
            argv = self.command()
            if previous == "stopped":
                # A restarted machine boots from its image again: in-place changes are gone.
                self._install_image()
            self._event("launch" if previous == "created" else "start", "created")
            self._set_state("starting")
            with open(self.log_path, "ab") as log:
                log.write(f"[fakefly] starting {shlex.join(argv)}\n".encode())
                log.flush()
                try:
                    # init starts the main process in the image's WORKDIR (init main.rs:717-721).
                    process = subprocess.Popen(self.guest_argv(argv), cwd=self.root, env=self.env,
                                               stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                except OSError as exc:
                    self._event("exit", "stopped", "flyd", {"error": str(exc)})
                    self._set_state("stopped")
                    raise ApiError(422, f"failed to launch {argv[0]}: {exc}") from None
            self._process = process
            self._event("start", "started", "flyd")
            self._set_state("started")
        threading.Thread(target=self._watch, args=(process,), daemon=True,
                         name=f"fakefly-watch-{self.id}").start()
        return previous

    def _watch(self, process: subprocess.Popen) -> None:
        code = process.wait()
        with self.fly.lock:
            if self._process is not process:
                return
            self._process = None
            # Exited on its own: the machine stops, as a real one does without a restart policy,
            # with the exit code in its exit event (fly-go MachineEvent.Request.ExitEvent).
            self._event("exit", "stopped", "flyd", {"exit_event": {"exit_code": _exit_code(code),
                                                                   "requested_stop": False}})
            self._set_state("stopped")
            self._append_log(f"[fakefly] main process exited with code {code}\n")
        self._kill_leftovers()
        if self.config.get("auto_destroy"):
            # `--rm` sets auto_destroy: the machine is destroyed once its main process has
            # exited (flyctl run.go:190-192, 870-872).
            self.destroy()

    def _append_log(self, line: str) -> None:
        with open(self.log_path, "a") as log:
            log.write(line)

    def _signal_group(self, signum: int) -> None:
        if self._process is not None:
            _killpg(self._process.pid, signum)

    def _wait_until_stopped(self, stopped: bool) -> None:
        """Signals arrive asynchronously: wait until the leader is (or is no longer) stopped."""
        if self._process is None:
            return
        stat = pathlib.Path(f"/proc/{self._process.pid}/stat")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                return
            if (state in ("T", "t")) == stopped:
                return
            time.sleep(0.002)
        raise ApiError(500, f"the app process of machine {self.id} did not "
                            f"{'stop' if stopped else 'continue'} within 5 s")

    def stop(self, signame: str | None = None, timeout: float | None = None) -> None:
        """Stop the app process: the kill signal, then SIGKILL after the kill timeout.

        Defaults come from ``config.stop_config`` (fly.toml ``kill_signal`` /
        ``kill_timeout``), else Fly's own: SIGINT and 5 s.
        """
        stop_config = self.config.get("stop_config") or {}
        signame = signame or stop_config.get("signal") or "SIGINT"
        if timeout is None:
            timeout = _duration(stop_config.get("timeout"), _STOP_GRACE)
        signum = getattr(signal, signame.upper(), None)
        if not isinstance(signum, signal.Signals):
            raise ApiError(400, f"invalid signal {signame!r}: use a name such as SIGINT or SIGTERM")
        with self.fly.lock:
            if self.state not in ("started", "suspended"):
                raise ApiError(412, f"unable to stop machine, current state is '{self.state}'")
            process = self._process
            self._process = None
            self._set_state("stopping")
        if process is not None:
            _terminate_group(process, signum, timeout)
            self._append_log(f"[fakefly] stopped (exit code {process.returncode})\n")
        self._kill_leftovers()
        with self.fly.lock:
            if process is not None:
                self._event("exit", "stopped", "flyd", {"exit_event": {
                    "exit_code": _exit_code(process.returncode), "requested_stop": True}})
            self._event("stop", "stopped")
            self._set_state("stopped")

    def restart(self, timeout: float | None = None) -> None:
        """Restart: the app process is stopped (the kill signal, then SIGKILL after ``timeout``)
        and the machine boots again.  ``POST /v1/apps/{app_name}/machines/{machine_id}/restart``
        (``Machines_restart`` in the 2024-03 Machines API spec: an optional ``timeout`` query
        parameter, a Go duration or seconds; 200, or 400 with an ErrorResponse).  A restart is a
        stop and a start of the same machine: the root filesystem comes from the image again
        (Fly's docs, reference/configuration ``persist_rootfs``, default ``never``), so what the
        app does at boot (flydeploy's catch-up from current.json) runs again."""
        with self.fly.lock:
            # Which states the API restarts from no source settles (the spec lists only 200 and
            # 400): the fake refuses the transitional ones; flydeploy restarts started machines.
            if self.state not in ("started", "stopped", "suspended"):
                raise ApiError(400, f"unable to restart machine, current state is '{self.state}'")
            running = self.state != "stopped"
        if running:
            self.stop(timeout=timeout)
        self.start()

    def suspend(self) -> None:
        """Suspend: the app process is frozen (SIGSTOP) until the next start."""
        with self.fly.lock:
            if self.state != "started":
                raise ApiError(412, f"unable to suspend machine, current state is '{self.state}'")
            self._signal_group(signal.SIGSTOP)
            self._wait_until_stopped(True)
            self._event("suspend", "suspended")
            self._set_state("suspended")

    def destroy(self) -> None:
        """Stop if needed, delete the sandbox; the machine stays listed as destroyed."""
        if self.state in ("started", "suspended"):
            self.stop(timeout=1.0)
        with self.fly.lock:
            if self.state == "destroyed":
                return
            self._event("destroy", "destroyed")
            self._set_state("destroyed")
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def update(self, *, image: str | None = None, env: dict[str, str] | None = None) -> None:
        """A cold update: new image and/or env, a fresh copy of the image, restart."""
        was_running = self.state in ("started", "suspended")
        if was_running:
            self.stop()
        with self.fly.lock:
            if image:
                self._image = images.load(self.fly.state_dir, image)
                self.config["image"] = image
            if env is not None:
                self.config["env"] = dict(env)
            self.instance_id = images.ulid()
            self._install_image()
            self._event("update", "created")
            self._set_state("stopped")
        if was_running:
            self.start()

    def close(self) -> None:
        """Kill the app process and any exec'd command still running."""
        with self.fly.lock:
            processes = [p for p in (self._process, *self._execs) if p is not None]
            self._process = None
        for process in processes:
            _terminate_group(process, signal.SIGTERM, 1.0)
        self._kill_leftovers()

    def _kill_leftovers(self) -> None:
        """Kill every process still running "on" this machine (a stopped VM runs nothing):
        exec'd commands left running and what they started in sessions of their own,
        found by the machine id in their environment."""
        needle = f"FLY_MACHINE_ID={self.id}\0".encode()
        for entry in pathlib.Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        with self.fly.lock:
            self._execs.clear()

    # -- commands and diagnostics ----------------------------------------------------

    def guest_argv(self, argv: list[str]) -> list[str]:
        """``argv`` as it resolves inside the machine.  The fake has no chroot: the
        image's WORKDIR is ``machine.root``, so a word naming a path under it is
        that path under the sandbox.  Other paths are the host's, where the
        image's files are not.  The value of ``--app-dir`` is not opened here
        but sent on to other machines, so it stays the path they know."""
        workdir = (self._image.get("workdir") or "/app").rstrip("/")
        return [str(self.root) + word[len(workdir):]
                if (word == workdir or word.startswith(workdir + "/")) and (i == 0 or argv[i - 1] != "--app-dir")
                else word for i, word in enumerate(argv)]

    def exec(self, argv: list[str], timeout: float = 30) -> dict:
        """Run ``argv`` on the machine as the exec endpoint does: the reply body.

        init runs it directly, without a shell, in ``/`` (init main.rs chroots
        and does chdir("/"); exec.rs sets no current_dir), with the image's and
        the machine's environment (main.rs:494-526, exec.rs:40).  A program
        that cannot be spawned is an API error, not exit status 127 (exec.rs:43-45
        `.output().await.map_err(...)`).  Past ``timeout`` or the platform's
        deadline (``FakeFly.exec_deadline``; about 30 s in reports, flyctl#4194)
        the API answers 408 and the command is not killed: init does not set
        kill_on_drop (exec.rs:43), so it goes on running.
        """
        if self.state != "started":
            raise ApiError(412, f"failed_precondition: machine {self.id} is {self.state}, "
                                f"exec needs a started machine")
        try:
            process = subprocess.Popen(self.guest_argv(argv), cwd="/", env=self.env, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       start_new_session=True)
        except OSError as exc:
            raise ApiError(500, f"failed to spawn command: {exc.strerror} (os error {exc.errno})") from None
        with self.fly.lock:
            self._execs.add(process)
        deadline = min(float(timeout), self.fly.exec_deadline)
        try:
            out, err = process.communicate(timeout=deadline)
        except subprocess.TimeoutExpired:
            # Left running; its output keeps draining so that it never blocks on a full pipe.
            threading.Thread(target=process.communicate, daemon=True).start()
            raise ApiError(408, f"deadline_exceeded: Post \"http://unix/v1/exec\": context deadline exceeded "
                                f"(Client.Timeout exceeded after {deadline:g}s)") from None
        with self.fly.lock:
            self._execs.discard(process)
        code = process.returncode
        reply = {"exit_code": code if code >= 0 else 128 - code, "exit_signal": -code if code < 0 else 0,
                 "stdout": out.decode("utf-8", "replace"), "stderr": err.decode("utf-8", "replace")}
        return reply

    def logs(self) -> str:
        """Everything the app process wrote (stdout and stderr), across restarts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 15.0, *, count: int = 1) -> str:
        """Wait until ``text`` appears ``count`` times in the logs; returns them or raises with them."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs()
            if logs.count(text) >= count:
                return logs
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the logs of machine {self.id} after {timeout}s:\n{logs}")
            time.sleep(0.05)

    def wait_for_state(self, state: str, timeout: float = 15.0) -> None:
        """Block until the machine is in ``state``."""
        if not self.fly.wait_for(lambda: self.state == state, timeout):
            raise AssertionError(f"machine {self.id} is {self.state}, not {state}, after {timeout}s")

    @property
    def pid(self) -> int | None:
        """The app process's pid while it runs."""
        process = self._process
        return process.pid if process is not None else None

    def __repr__(self) -> str:
        return f"<FakeMachine {self.id} {self.app.name} {self.region} {self.state}>"


def _terminate_group(process: subprocess.Popen, signum: int, timeout: float) -> None:
    """Signal the process group, SIGKILL it after ``timeout`` s, reap the leader."""
    _killpg(process.pid, signum)
    _killpg(process.pid, signal.SIGCONT)  # a suspended group must run to act on the signal
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    _killpg(process.pid, signal.SIGKILL)  # whatever the leader left behind
    process.wait()


def _exit_code(returncode: int) -> int:
    """A process's exit status as init reports it: 128 + N for a death by signal N."""
    return returncode if returncode >= 0 else 128 - returncode


def _killpg(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# --- apps ---------------------------------------------------------------------------


class FakeApp:
    """An app: its machines, secrets and deploy token."""

    def __init__(self, fly: FakeFly, name: str, primary_region: str) -> None:
        self.fly = fly
        self.name = name
        self.primary_region = primary_region
        self.secrets: dict[str, str] = {}
        self.machines: list[FakeMachine] = []
        self.token = fly.add_token("deploy", app=name)

    def set_secrets(self, **values: str) -> None:
        """Set secrets; like ``fly secrets set --stage``, they reach processes at their next start."""
        self.secrets.update({k: str(v) for k, v in values.items()})

    def unset_secrets(self, *names: str) -> None:
        """Remove secrets."""
        for name in names:
            self.secrets.pop(name, None)

    def add_machine(self, image: str, *, region: str | None = None, process_group: str = "app",
                    command: list[str] | None = None, entrypoint: list[str] | None = None,
                    env: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
                    services: list[dict] | None = None, start: bool = True,
                    platform_version: str | None = "v2", name: str | None = None,
                    auto_destroy: bool = False, internal_port: int | str | None = None) -> FakeMachine:
        """Create a machine running ``image`` (started unless ``start=False``).

        The default ``services`` of an ``app`` group machine expose
        ``internal_port`` (8080 unless given); ``"own"`` picks a free port of
        this host for it.  With a port given the machine's env has ``PORT`` set
        to it, as apps commonly set ``[env] PORT`` to their ``internal_port``,
        so that its app listens where its services say.  On Fly every machine of
        a group has the same internal port in its own network namespace; the
        fake's machines share this host's, so each needs its own.
        """
        meta = {"fly_flyctl_version": "0.2.25", "fly_release_id": "fake" + secrets_module.token_hex(4),
                "fly_release_version": str(len(self.machines) + 1)}
        if platform_version:
            meta["fly_platform_version"] = platform_version
        if process_group:
            meta["fly_process_group"] = process_group
        meta.update(metadata or {})
        if internal_port == "own":
            internal_port = _free_port()
        if services is None:
            services = _default_services(internal_port or 8080) if process_group == "app" else []
        if internal_port is not None:
            env = {**(env or {}), "PORT": str(internal_port)}
        info = images.load(self.fly.state_dir, image)
        init: dict = {}
        if command:
            init["cmd"] = list(command)
        if entrypoint:
            init["entrypoint"] = list(entrypoint)
        config = {
            "image": image, "init": init, "env": {**info["fly_env"], **(env or {})},
            "metadata": meta, "services": services, "auto_destroy": auto_destroy,
            "restart": {"policy": "on-failure", "max_retries": 10},
            "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
            "checks": {}, "dns": {}, "stop_config": dict(info.get("stop_config") or {}),
        }
        return self.fly._add_machine(self, config, region or self.primary_region, name, start)

    def exec_token(self, *, commands: list[list[str]] = (), prefixes: list[list[str]] = (),
                   ttl: float | None = None) -> str:
        """A machine-exec token limited to ``commands`` / ``prefixes`` (none: any command)."""
        return self.fly.add_token("exec", app=self.name, commands=commands, prefixes=prefixes, ttl=ttl)


def _free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _default_services(internal_port: int) -> list[dict]:
    """What flyctl puts in the machine config for fly.toml's ``[http_service]``: one
    ``fly.MachineService`` (Machines API spec, definitions ``fly.MachineService``:
    ``internal_port``, ``protocol``, ``ports``, ``concurrency``, ``autostart``...)."""
    return [{"protocol": "tcp", "internal_port": internal_port, "autostart": True, "autostop": False,
             "min_machines_running": 0,
             "ports": [{"port": 80, "handlers": ["http"], "force_https": True},
                       {"port": 443, "handlers": ["http", "tls"]}],
             "concurrency": {"type": "connections", "hard_limit": 25, "soft_limit": 20}}]


# --- the platform -----------------------------------------------------------------------


class FakeFly:
    """The fake platform with its Machines API server on 127.0.0.1 (a free port)."""

    def __init__(self, state_dir: pathlib.Path, *, email: str = "dev@example.com") -> None:
        self.state_dir = pathlib.Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.runtime_root = pathlib.Path(tempfile.mkdtemp(prefix="ff-"))
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.apps: dict[str, FakeApp] = {}
        self.tokens: dict[str, Token] = {}
        self.faults = Faults()
        self._requests: list[RequestRecord] = []
        # Seconds an exec may run before the API answers 408 (the command goes on running).
        self.exec_deadline = 30.0
        # The exec request field a token's command caveat is checked against: "command" or "cmd".
        self.token_checks = "command"
        # Whether GET still shows a destroyed machine (with its events) or answers 404: the
        # docs do not say how long a destroyed machine stays visible.
        self.destroyed_visible = True
        self.python_bin = self.state_dir / "python-bin"
        self.fly_bin = self.state_dir / "fly-bin"
        self._write_executables()
        self.user_token = self.add_token("user", macaroon=False)
        self.email = email
        self.login(email)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fly = self  # type: ignore[attr-defined]
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name="fakefly-api")
        self._thread.start()

    def __enter__(self) -> FakeFly:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_executables(self) -> None:
        # Wrappers, not symlinks: a venv's interpreter finds its venv through its own path.
        # On a machine flydeploy is only what the image holds: the wrapper's sitecustomize
        # hides this checkout (an editable install, the test runner's path) from it.
        self.python_bin.mkdir(exist_ok=True)
        site_dir = self.state_dir / "python-site"
        site_dir.mkdir(exist_ok=True)
        checkout = str(pathlib.Path(__file__).resolve().parent.parent.parent)
        (site_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(checkout=checkout, site=str(site_dir)))
        for name in ("python3", "python"):
            _write_script(self.python_bin / name,
                          f'PYTHONPATH={shlex.quote(str(site_dir))}${{PYTHONPATH:+:$PYTHONPATH}} '
                          f'exec {shlex.quote(sys.executable)} "$@"')
        self.fly_bin.mkdir(exist_ok=True)
        flyctl = pathlib.Path(__file__).with_name("flyctl.py")
        tests_parent = pathlib.Path(__file__).resolve().parent.parent.parent
        for name in ("fly", "flyctl"):
            _write_script(self.fly_bin / name,
                          f"PYTHONPATH={shlex.quote(str(tests_parent))} "
                          f'exec {shlex.quote(sys.executable)} {shlex.quote(str(flyctl))} "$@"')

    # -- tokens and the local flyctl session ----------------------------------------

    def add_token(self, kind: str, *, app: str | None = None, macaroon: bool = True,
                  commands: list[list[str]] = (), prefixes: list[list[str]] = (),
                  ttl: float | None = None) -> str:
        """Mint a token the API accepts; returns it the way flyctl prints it."""
        value = _new_token(macaroon)
        with self.lock:
            self.tokens[value] = Token(value, kind, app, tuple(tuple(c) for c in commands),
                                       tuple(tuple(p) for p in prefixes),
                                       None if ttl is None else time.time() + ttl)
        return f"FlyV1 {value}" if macaroon else value

    def revoke_token(self, token: str) -> None:
        """Make a token invalid."""
        with self.lock:
            self.tokens.pop(token.split(" ")[-1], None)

    def login(self, email: str | None = None) -> None:
        """Give the fake ``fly`` a logged-in session (as after ``fly auth login``)."""
        (self.state_dir / "auth.json").write_text(
            json.dumps({"email": email or self.email, "token": self.user_token}))

    def logout(self) -> None:
        """Remove the fake ``fly``'s session (as after ``fly auth logout``)."""
        (self.state_dir / "auth.json").unlink(missing_ok=True)

    # -- apps, images, machines ---------------------------------------------------------

    def create_app(self, name: str, tree: pathlib.Path | str | None = None, *, machines: int = 0,
                   regions: tuple[str, ...] = _REGIONS[:3], secrets: dict[str, str] | None = None,
                   api_token_secret: bool = True, **machine_options: object) -> FakeApp:
        """Create an app; with ``tree``, build an image of it and start ``machines`` machines.

        Machine ``i`` goes to ``regions[i % len(regions)]``; ``machine_options``
        go to ``FakeApp.add_machine``.  With ``api_token_secret`` the app's
        deploy token is its ``FLY_API_TOKEN`` secret, as the docs ask.
        """
        if name in self.apps:
            raise ValueError(f"app {name} exists")
        app = FakeApp(self, name, regions[0])
        with self.lock:
            self.apps[name] = app
        if api_token_secret:
            app.set_secrets(FLY_API_TOKEN=app.token)
        app.set_secrets(**(secrets or {}))
        if tree is not None:
            ref = self.build_image(name, tree)
            for index in range(machines):
                app.add_machine(ref, region=regions[index % len(regions)], **machine_options)
        return app

    def build_image(self, app: str, tree: pathlib.Path | str, label: str | None = None) -> str:
        """Snapshot ``tree`` as an image of ``app`` (what ``fly deploy --build-only --push`` does)."""
        return images.snapshot(self.state_dir, app, pathlib.Path(tree), label)["ref"]

    def images(self, app: str) -> list[str]:
        """Refs of every image pushed for ``app``."""
        root = self.state_dir / "images" / app
        return sorted(images.image_ref(app, p.name) for p in root.iterdir()
                      if (p / "image.json").is_file()) if root.is_dir() else []

    def _add_machine(self, app: FakeApp, config: dict, region: str, name: str | None,
                     start: bool) -> FakeMachine:
        machine = FakeMachine(self, app, config, region, name)
        with self.lock:
            app.machines.append(machine)
        if start:
            machine.start()
        else:
            machine._event("launch", "created")
            machine._set_state("stopped")
        return machine

    def machine(self, machine_id: str) -> FakeMachine:
        """Any app's machine with this id."""
        for app in self.apps.values():
            for machine in app.machines:
                if machine.id == machine_id:
                    return machine
        raise KeyError(machine_id)

    def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until ``predicate()`` holds after a state change; False on timeout."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    # -- for tests ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Every API request received so far, oldest first."""
        with self.lock:
            return list(self._requests)

    def _record(self, record: RequestRecord) -> None:
        with self.lock:
            self._requests.append(record)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for subprocesses: the fake ``fly`` first on PATH, pointed at this API."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.fly_bin}{os.pathsep}{env.get('PATH', '')}"
        env["FLY_FLAPS_BASE_URL"] = self.base_url
        env["FAKEFLY_STATE_DIR"] = str(self.state_dir)
        for name in ("FLY_API_TOKEN", "FLY_ACCESS_TOKEN"):
            env.pop(name, None)
        return env

    def run_fly(self, *args: str, cwd: pathlib.Path | str | None = None,
                env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the fake ``fly`` with ``args``; returns the completed process (text output)."""
        return subprocess.run([str(self.fly_bin / "fly"), *args], cwd=cwd, env=env or self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def fly_calls(self) -> list[list[str]]:
        """The argv of every fake ``fly`` invocation so far."""
        path = self.state_dir / "fly-calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line)["argv"] for line in path.read_text().splitlines() if line]

    def set_build_fault(self, mode: str | None) -> None:
        """Make ``fly deploy`` ``"fail"`` or ``"hang"`` (silently, until killed); ``None`` heals it."""
        path = self.state_dir / "build-fault"
        if mode is None:
            path.unlink(missing_ok=True)
        elif mode in ("fail", "hang"):
            path.write_text(mode)
        else:
            raise ValueError(f"unknown build fault {mode!r}; use 'fail', 'hang' or None")

    def close(self) -> None:
        """Stop the server and every process; remove the runtime dirs."""
        self._server.shutdown()
        self._server.server_close()
        for app in list(self.apps.values()):
            for machine in app.machines:
                machine.close()
        # Commands `fly machine run --shell` started and nobody waited for.
        for pid_file in (self.state_dir / "shell-sessions").glob("*.pid"):
            _killpg(int(pid_file.read_text()), signal.SIGKILL)
        shutil.rmtree(self.runtime_root, ignore_errors=True)


_SITECUSTOMIZE = """\
import os
import sys

_HIDDEN = ({checkout!r}, {site!r})
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") not in _HIDDEN or p == sys.path[0] != ""]
# setuptools' editable install puts its finder class itself (not an instance) on sys.meta_path.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
"""


def _write_script(path: pathlib.Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


class _Server(http.server.ThreadingHTTPServer):
    # The default backlog of 5 drops connections a fleet-wide fan-out opens at once,
    # and each dropped SYN costs the client a one-second retransmit.
    request_queue_size = 256
    daemon_threads = True


# --- the HTTP API -----------------------------------------------------------------------------

_ROUTES = [
    ("GET", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines"), "list"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines"), "create"),
    ("GET", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)"), "get"),
    ("DELETE", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)"), "destroy"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/exec"), "exec"),
    ("GET", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/wait"), "wait"),
    ("GET", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/lease"), "lease"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/lease"), "lease"),
    ("DELETE", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/lease"), "lease"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/start"), "start"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/stop"), "stop"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/restart"), "restart"),
    ("POST", re.compile(r"/v1/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/suspend"), "suspend"),
    # Not part of the Machines API: what the fake `fly` needs from the platform.
    ("GET", re.compile(r"/_fakefly/apps/(?P<app>[^/]+)/machines/(?P<machine>[^/]+)/sandbox"), "sandbox"),
    ("POST", re.compile(r"/_fakefly/apps/(?P<app>[^/]+)/tokens"), "tokens"),
    ("GET", re.compile(r"/_fakefly/whoami"), "whoami"),
]
_READ_OPS = {"list", "get", "wait", "whoami"}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "flaps"
    sys_version = ""
    # The way back of a "latency" fault, slept before the reply is sent.
    _return_trip_s = 0.0

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base-class name
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        fly: FakeFly = self.server.fly  # type: ignore[attr-defined]
        self._return_trip_s = 0.0  # a kept-alive connection serves many requests
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return self._reply(400, {"error": "invalid JSON request body"})
        query = urllib.parse.parse_qs(url.query)
        op, params = _route(method, url.path)
        if op is None:
            return self._reply(404, {"error": "not found"})
        machine_id = params.get("machine")
        app_name = urllib.parse.unquote(params["app"]) if "app" in params else None
        scheme = (self.headers.get("Authorization") or "").partition(" ")[0]
        fly._record(RequestRecord(method, url.path, query, op, app_name, machine_id, time.monotonic(), scheme, body))
        fault = fly.faults.take(op, machine_id)
        if fault is not None and self._inject(fault):
            return None
        try:
            token = _authenticate(fly, self.headers.get("Authorization"), app_name, op, body)
            status, reply = _dispatch(fly, op, method, app_name, machine_id, query, body, token,
                                      self.headers)
        except ApiError as exc:
            return self._reply(exc.status, {"error": exc.error}, exc.headers)
        except Exception as exc:  # a bug in the fake: say so instead of dropping the connection
            traceback.print_exc()
            return self._reply(500, {"error": f"fakefly failed: {exc!r}"})
        return self._reply(status, reply)

    def _inject(self, fault: Fault) -> bool:
        """Play a fault; True when it replaced the reply."""
        if fault.kind == "slow":
            time.sleep(fault.delay)
            return False
        if fault.kind == "latency":
            time.sleep(fault.delay / 2)
            self._return_trip_s = fault.delay / 2
            return False
        if fault.kind == "drop":
            self.close_connection = True
            return True
        if fault.kind == "408":
            time.sleep(fault.delay)
            self._reply(408, {"error": "deadline_exceeded: request timed out"})
        elif fault.kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._reply(429, {"error": "rate limit exceeded, retry later"}, headers)
        else:
            self._reply(500, {"error": "internal error: fault injected by the test"})
        return True

    def _reply(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        time.sleep(self._return_trip_s)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Fly-Request-Id", images.ulid().lower())
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def _route(method: str, path: str) -> tuple[str | None, dict[str, str]]:
    for route_method, pattern, op in _ROUTES:
        match = pattern.fullmatch(path)
        if match and route_method == method:
            return op, match.groupdict()
    return None, {}


def _authenticate(fly: FakeFly, header: str | None, app: str | None, op: str, body: dict) -> Token:
    scheme, _, value = (header or "").strip().partition(" ")
    with fly.lock:
        token = fly.tokens.get(value.strip())
    if token is None or scheme != ("FlyV1" if token.macaroon else "Bearer"):
        raise ApiError(401, AUTH_ERROR)
    if token.expires_at is not None and time.time() > token.expires_at:
        raise ApiError(401, AUTH_ERROR)
    if token.kind != "user" and app is not None and token.app != app:
        raise ApiError(401, "unauthorized")
    if token.kind == "exec":
        if op == "exec":
            if not token.allows_command(checked_argv(body, fly.token_checks)):
                raise ApiError(403, "unauthorized: the token does not allow this command")
        elif op not in _READ_OPS:
            raise ApiError(403, "unauthorized: a machine-exec token cannot do this")
    return token


def _dispatch(fly: FakeFly, op: str, method: str, app_name: str | None, machine_id: str | None,
              query: dict[str, list[str]], body: dict, token: Token, headers) -> tuple[int, object]:
    if op == "whoami":
        if token.kind != "user":
            raise ApiError(401, "unauthorized: not a user token")
        return 200, {"email": fly.email}
    app = fly.apps.get(app_name or "")
    if app is None:
        raise ApiError(404, f"app not found: {app_name}")
    if op == "list":
        return 200, [m.to_json() for m in app.machines if _listed(m, query)]
    if op == "create":
        return 200, _create(fly, app, body).to_json()
    if op == "tokens":
        return 200, {"token": app.exec_token(commands=body.get("commands") or [],
                                             prefixes=body.get("prefixes") or [],
                                             ttl=body.get("ttl"))}
    machine = next((m for m in app.machines if m.id == machine_id), None)
    if machine is None or (machine.state == "destroyed" and (op != "get" or not fly.destroyed_visible)):
        raise ApiError(404, "machine not found")
    if op in ("start", "stop", "restart", "destroy", "suspend"):
        _check_lease(machine, headers.get("fly-machine-lease-nonce"))
    if op == "get":
        return 200, machine.to_json()
    if op == "exec":
        return _exec(machine, body)
    if op == "wait":
        return _wait(fly, machine, query)
    if op == "lease":
        return _lease(machine, method, body, headers.get("fly-machine-lease-nonce"), token)
    if op == "start":
        return 200, {"previous_state": machine.start(), "migrated": False, "new_host": ""}
    if op == "stop":
        timeout = body.get("timeout")
        machine.stop(body.get("signal"), None if timeout in (None, "") else _duration(timeout, _STOP_GRACE))
        return 200, {"ok": True}
    if op == "restart":
        timeout = query.get("timeout", [""])[0]
        machine.restart(None if timeout == "" else _duration(timeout if not timeout.isdigit() else int(timeout),
                                                               _STOP_GRACE))
        return 200, {"ok": True}
    if op == "suspend":
        machine.suspend()
        return 200, {"ok": True}
    if op == "destroy":
        if machine.state in ("started", "suspended") and query.get("force", [""])[0] != "true":
            raise ApiError(412, "unable to destroy machine, not currently stopped (use force=true)")
        machine.destroy()
        return 200, {"ok": True}
    if op == "sandbox":
        return 200, {"root": str(machine.root), "env": machine.env, "log": str(machine.log_path),
                     "workdir": machine._image.get("workdir") or "/app"}
    raise ApiError(404, "not found")


def _listed(machine: FakeMachine, query: dict[str, list[str]]) -> bool:
    states = [s for value in query.get("state", []) for s in value.split(",") if s]
    if states:
        if machine.state not in states:
            return False
    elif machine.state == "destroyed" and query.get("include_deleted", [""])[0] != "true":
        return False
    if "region" in query and machine.region != query["region"][0]:
        return False
    metadata = machine.config.get("metadata") or {}
    return all(metadata.get(key[len("metadata."):]) == values[0]
               for key, values in query.items() if key.startswith("metadata."))


def _create(fly: FakeFly, app: FakeApp, body: dict) -> FakeMachine:
    config = dict(body.get("config") or {})
    if not config.get("image"):
        raise ApiError(400, "invalid config: image is required")
    try:
        images.load(fly.state_dir, config["image"])
    except images.ImageError as exc:
        raise ApiError(400, f"failed to launch VM: {exc}") from None
    config.setdefault("metadata", {})
    config.setdefault("env", {})
    config.setdefault("guest", {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256})
    return fly._add_machine(app, config, body.get("region") or app.primary_region, body.get("name"),
                            not body.get("skip_launch"))


def _exec(machine: FakeMachine, body: dict) -> tuple[int, dict]:
    command = body.get("command")
    if not command and body.get("cmd"):
        command = shlex.split(body["cmd"])
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
        raise ApiError(400, "invalid exec request: command must be a non-empty array of strings")
    timeout = body.get("timeout") or 30
    return 200, machine.exec(command, float(timeout))


def _wait(fly: FakeFly, machine: FakeMachine, query: dict[str, list[str]]) -> tuple[int, dict]:
    state = query.get("state", ["started"])[0]
    if state not in ("started", "stopped", "suspended", "destroyed"):
        raise ApiError(400, f"invalid state {state!r}: use started, stopped, suspended or destroyed")
    timeout = min(float(query.get("timeout", ["60"])[0]), 60.0)
    instance = query.get("instance_id", [None])[0]
    if instance and instance != machine.instance_id:
        raise ApiError(400, f"machine {machine.id} has no instance {instance}")
    if not fly.wait_for(lambda: machine.state == state, timeout):
        raise ApiError(408, f"deadline_exceeded: machine did not reach state {state!r} "
                            f"within {timeout:g}s (it is {machine.state!r})")
    return 200, {"ok": True}


def _lease(machine: FakeMachine, method: str, body: dict, nonce: str | None,
           token: Token) -> tuple[int, dict]:
    with machine.fly.lock:
        lease = machine.lease
        if lease and lease["expires_at"] <= time.time():
            lease = machine.lease = None
        if method == "GET":
            if lease is None:
                raise ApiError(404, "lease not found")
            return 200, lease
        if method == "POST":
            if lease is not None and lease["nonce"] != nonce:
                raise ApiError(409, f"lease currently held by {lease['owner']}, "
                                    f"expires at {lease['expires_at']}")
            machine.lease = {"nonce": secrets_module.token_hex(8),
                             "expires_at": int(time.time() + int(body.get("ttl") or 30)),
                             "owner": machine.fly.email if token.kind == "user" else f"{token.kind}-token",
                             "description": body.get("description") or "", "version": machine.instance_id}
            return 200, machine.lease
        if lease is None or lease["nonce"] != nonce:
            raise ApiError(409, "lease nonce does not match the current lease")
        machine.lease = None
        return 200, {"ok": True}


def _check_lease(machine: FakeMachine, nonce: str | None) -> None:
    lease = machine.lease
    if lease and lease["expires_at"] > time.time() and lease["nonce"] != nonce:
        raise ApiError(409, f"machine {machine.id} has a lease held by {lease['owner']}: "
                            f"pass its nonce in the fly-machine-lease-nonce header")


def _duration(value: object, default: float) -> float:
    """Seconds of a Go duration (``"5s"``, ``"1m30s"``) or a number of seconds (or nanoseconds)."""
    if value in (None, ""):
        return default
    if isinstance(value, (int, float)):
        return value / 1e9 if value > 1e6 else float(value)
    if isinstance(value, dict):
        return _duration(value.get("Duration") or value.get("duration"), default)
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|h|m|s)", str(value)):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total or default
