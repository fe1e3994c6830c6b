"""A fake ``fly`` (flyctl) for the tests: the few commands flydeploy runs, with flyctl's output shapes.

Implemented: ``deploy --build-only [--push]``, ``machine run``, ``machines
list``, ``tokens create machine-exec``, ``auth whoami``.  Anything else, or an
unknown flag, fails loudly with exit status 2.  It talks to the fake Machines
API at ``FLY_FLAPS_BASE_URL`` like flyctl and keeps its state (images, the
logged-in session, a log of its invocations) in ``FAKEFLY_STATE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from tests.fakefly import images


class FlyError(Exception):
    """A failure flyctl would report as ``Error: ...`` with exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"Error: {message} (fake fly: {self.prog})\n")
        sys.exit(2)


def _state_dir() -> pathlib.Path:
    value = os.environ.get("FAKEFLY_STATE_DIR")
    if not value:
        raise FlyError("FAKEFLY_STATE_DIR is not set: run the fake fly through the fakefly fixture")
    return pathlib.Path(value)


def _access_token(args: argparse.Namespace) -> str:
    for value in (getattr(args, "access_token", None), os.environ.get("FLY_ACCESS_TOKEN"),
                  os.environ.get("FLY_API_TOKEN")):
        if value:
            return value
    session = _state_dir() / "auth.json"
    if session.exists():
        return json.loads(session.read_text())["token"]
    raise FlyError("No access token available. Please login with 'flyctl auth login'")


def _authorization(token: str) -> str:
    value = token.strip().split(" ")[-1]
    return f"FlyV1 {value}" if value.startswith(("fm1r_", "fm1a_", "fm2_")) else f"Bearer {value}"


def _api(args: argparse.Namespace, method: str, path: str, body: object = None,
         query: dict[str, str] | None = None) -> object:
    base = os.environ.get("FLY_FLAPS_BASE_URL", "https://api.machines.dev").rstrip("/")
    url = base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(url, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": _authorization(_access_token(args)),
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise FlyError(f"{message} (HTTP {exc.code})") from None
    except urllib.error.URLError as exc:
        raise FlyError(f"failed to reach the Machines API at {base}: {exc.reason}") from None


def _config_path(args: argparse.Namespace) -> pathlib.Path:
    return pathlib.Path(args.config or "fly.toml").resolve()


def _app_name(args: argparse.Namespace) -> str:
    if args.app:
        return args.app
    path = _config_path(args)
    if path.is_file():
        name = images.read_fly_toml(path).get("app")
        if name:
            return name
    raise FlyError("the config for your app is missing an app name, add an app field to the "
                   "fly.toml file or specify with the -a flag")


# --- commands -------------------------------------------------------------------


def _deploy(args: argparse.Namespace) -> int:
    if not args.build_only:
        raise FlyError("the fake fly implements only `fly deploy --build-only`")
    path = _config_path(args)
    if not path.is_file():
        raise FlyError(f"app config file '{path}' not found")
    app = _app_name(args)
    build_args = dict(item.split("=", 1) for item in args.build_arg)
    print("==> Verifying app config")
    print(f"Validating {path}")
    print("✓ Configuration is valid")
    print("--> Verified app config")
    print("==> Building image")
    sys.stdout.flush()
    fault_file = _state_dir() / "build-fault"
    fault = fault_file.read_text().strip() if fault_file.exists() else ""
    if fault == "hang":
        while True:
            time.sleep(3600)
    if fault == "fail":
        print("#5 [2/4] RUN pip install -r requirements.txt")
        print("#5 ERROR: process \"/bin/sh -c pip install -r requirements.txt\" did not complete successfully")
        raise FlyError("failed to fetch an image or build from source: error building: "
                       "executor failed running [/bin/sh -c pip install -r requirements.txt]: exit code: 1")
    for key in build_args:
        print(f"--> build arg {key}")
    label = args.image_label or f"deployment-{images.ulid()}"
    if args.push:
        try:
            info = images.snapshot(_state_dir(), app, path.parent, label, build_args=build_args)
        except images.ImageError as exc:
            raise FlyError(str(exc)) from None
        print("--> Building image done")
        print("==> Pushing image to fly")
        print(f"The push refers to repository [{images.REGISTRY}/{app}]")
        print(f"{label}: digest: {info['digest']} size: 2417")
        print("--> Pushing image done")
    else:
        print("--> Building image done")
    sys.stdout.flush()
    print(f"image: {images.image_ref(app, label)}", file=sys.stderr)
    print(f"image size: {1 + sum(p.stat().st_size for p in path.parent.rglob('*') if p.is_file()) // 1024} kB",
          file=sys.stderr)
    return 0


def _machine_run(args: argparse.Namespace) -> int:
    app = _app_name(args)
    if args.shell and not args.command:
        raise FlyError("the fake fly runs `machine run --shell` only with --command")
    remove = args.rm or args.shell  # --shell implies --rm
    config: dict = {"image": args.image, "env": {}, "metadata": {}, "init": {},
                    "auto_destroy": remove,
                    "restart": {"policy": args.restart or ("no" if remove else "always")}}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise FlyError(f"invalid env value {item!r}: use -e KEY=VALUE")
        config["env"][key] = value
    for item in args.metadata:
        key, _, value = item.partition("=")
        config["metadata"][key] = value
    if args.entrypoint:
        config["init"]["entrypoint"] = shlex.split(args.entrypoint)
    elif args.shell:
        # The machine must stay up while the shell session runs, whatever the image's command.
        config["init"]["exec"] = ["/bin/sleep", "inf"]
    if args.cmd:
        config["init"]["cmd"] = list(args.cmd)
    if args.vm_memory:
        if not args.vm_memory.isdigit():
            raise FlyError(f"invalid memory size {args.vm_memory!r}: give megabytes, e.g. --vm-memory 1024")
        config["guest"] = {"cpu_kind": "shared", "cpus": args.vm_cpus or 1, "memory_mb": int(args.vm_memory)}
    print(f"Searching for image '{args.image}' remotely...", file=sys.stderr)
    body = {"config": config, "region": args.region or "", "name": args.name or ""}
    machine = _api(args, "POST", f"/v1/apps/{app}/machines", body)
    machine_id = machine["id"]
    print(f"image found: img_{machine['image_ref']['digest'][7:19]}", file=sys.stderr)
    print(f"Machine ID: {machine_id}\nInstance ID: {machine['instance_id']}\nState: {machine['state']}",
          file=sys.stderr)
    if not args.shell:
        # Without --shell, flyctl returns once the machine runs; with --rm it is destroyed
        # when its main process exits (run.go:190-192, 870-872).
        return 0
    cancelled = False
    try:
        _api(args, "GET", f"/v1/apps/{app}/machines/{machine_id}/wait", query={"state": "started"})
        sandbox = _api(args, "GET", f"/_fakefly/apps/{app}/machines/{machine_id}/sandbox")
        print(f"Connecting to {machine['private_ip']}... complete", file=sys.stderr)
        sys.stderr.flush()
        code = _run_in(sandbox, args.command)
    except _Cancelled:
        # flyctl turns SIGINT into a cancelled context (main.go:53-61) and sends no signal over
        # SSH (it never calls sess.Signal): the remote command goes on.  ssh/io.go:142-143 ends
        # the session with this error, and the Destroy after the console (run.go:507) runs on
        # the cancelled context and fails: the machine is left running.
        cancelled = True
        print("Error: session forcibly closed; the remote process may still be running", file=sys.stderr)
        code = 1
    finally:
        if remove and not cancelled:
            _api(args, "DELETE", f"/v1/apps/{app}/machines/{machine_id}", query={"force": "true"})
    if code != 0:
        if not cancelled:
            print(f"Error: ssh shell: Process exited with status {code}", file=sys.stderr)
        return 1
    return 0


class _Cancelled(Exception):
    """flyctl's context was cancelled by SIGINT or SIGTERM."""


def _cancel(signum: int, frame: object) -> None:
    raise _Cancelled(signal.Signals(signum).name)


# The PATH of an SSH session need not be the image's: `fly ssh console` "opens a login
# shell that resets PATH" (docs blueprints/hermes-agent-on-fly-io.html.md:93).
_SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _guest(sandbox: dict, words: list[str]) -> list[str]:
    """``words`` as paths resolve in the machine: the image's WORKDIR is the sandbox root."""
    workdir = sandbox["workdir"].rstrip("/")
    return [sandbox["root"] + w[len(workdir):] if w == workdir or w.startswith(workdir + "/") else w
            for w in words]


def _run_in(sandbox: dict, command: str) -> int:
    """Run ``command`` as hallpass, the machine's SSH server, does: split into an argv,
    quote-aware, and executed directly, with no shell, as root, in `/`
    (superfly/flyctl#1442 and #1220; flyctl sends the string as an SSH exec request,
    ssh/io.go:92).  Output is streamed; flyctl forwards no signal to it."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        print(f"Error: ssh shell: cannot parse the command: {exc}", file=sys.stderr)
        return 1
    env = dict(sandbox["env"], PATH=_SESSION_PATH)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _cancel)
    try:
        process = subprocess.Popen(_guest(sandbox, argv), cwd="/", env=env, start_new_session=True)
    except OSError:
        print(f'exec: "{argv[0] if argv else ""}": executable file not found in $PATH', file=sys.stderr)
        return 1
    # Registered so that the fake platform can end the session if this fly is killed.
    sessions = _state_dir() / "shell-sessions"
    sessions.mkdir(exist_ok=True)
    pid_file = sessions / f"{process.pid}.pid"
    pid_file.write_text(str(process.pid))
    return process.wait()


def _logs(args: argparse.Namespace) -> int:
    """``fly logs -a APP --machine ID [--no-tail]``: the machine's output, one line each as
    flyctl prints it ("<time> app[<id>] <region> [info] <message>"), following it until killed."""
    app = _app_name(args)
    machine_id = args.machine
    if not machine_id:
        raise FlyError("the fake fly shows logs only with --machine ID")
    machine = _api(args, "GET", f"/v1/apps/{app}/machines/{machine_id}")
    log = _state_dir() / "machines" / machine_id / "app.log"
    offset = 0
    buffer = b""
    while True:
        try:
            with open(log, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        offset += len(chunk)
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(f"{stamp} app[{machine_id}] {machine['region']} [info] {line.decode('utf-8', 'replace')}",
                  flush=True)
        if args.no_tail:
            return 0
        time.sleep(0.05)


def _auth_token(args: argparse.Namespace) -> int:
    """``fly auth token``: "Shows the authentication token that is currently in use" (docs
    flyctl/cmd/fly_auth_token.md)."""
    print(_access_token(args))
    return 0


def _machines_list(args: argparse.Namespace) -> int:
    machines = _api(args, "GET", f"/v1/apps/{_app_name(args)}/machines")
    if args.json:
        print(json.dumps(machines, indent=2))
    elif args.quiet:
        for machine in machines:
            print(machine["id"])
    else:
        print(f"{len(machines)} machines have been retrieved from app {_app_name(args)}.")
        print("ID\tNAME\tSTATE\tREGION\tIMAGE\tPROCESS GROUP")
        for m in machines:
            print("\t".join([m["id"], m["name"], m["state"], m["region"],
                             f"{m['image_ref']['repository']}:{m['image_ref']['tag']}",
                             m["config"].get("metadata", {}).get("fly_process_group", "")]))
    return 0


def _tokens_create_machine_exec(args: argparse.Namespace) -> int:
    app = _app_name(args)
    commands = [shlex.split(c) for c in args.command_exact]
    if args.positional:
        commands.append(list(args.positional))
    prefixes = [shlex.split(p) for p in args.command_prefix]
    body = {"commands": commands, "prefixes": prefixes, "ttl": _go_duration(args.expiry)}
    token = "FlyV1 " + _api(args, "POST", f"/_fakefly/apps/{app}/tokens", body)["token"].split(" ")[-1]
    print(json.dumps({"token": token}) if args.json else token)
    return 0


def _go_duration(text: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise FlyError(f'invalid argument "{text}" for "-x, --expiry" flag: time: invalid duration "{text}"')
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _auth_whoami(args: argparse.Namespace) -> int:
    email = _api(args, "GET", "/_fakefly/whoami")["email"]
    print(json.dumps({"email": email}) if args.json else email)
    return 0


# --- the command line -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    # Global flags go anywhere on the line; SUPPRESS keeps a subcommand from resetting them.
    common = _Parser(add_help=False)
    common.add_argument("-t", "--access-token", default=argparse.SUPPRESS)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    app_flags = _Parser(add_help=False)
    app_flags.add_argument("-a", "--app")
    app_flags.add_argument("-c", "--config")

    parser = _Parser(prog="fly", parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    deploy = commands.add_parser("deploy", parents=[common, app_flags])
    deploy.add_argument("--build-only", action="store_true")
    deploy.add_argument("--push", action="store_true")
    deploy.add_argument("--image-label")
    deploy.add_argument("--build-arg", action="append", default=[])
    deploy.add_argument("--no-cache", action="store_true")
    deploy.add_argument("--remote-only", action="store_true")
    deploy.add_argument("--local-only", action="store_true")
    deploy.set_defaults(handler=_deploy)

    machine = commands.add_parser("machine", aliases=["machines", "m"], parents=[common])
    machine_commands = machine.add_subparsers(dest="machine_command", required=True, parser_class=_Parser)
    run = machine_commands.add_parser("run", parents=[common, app_flags])
    run.add_argument("image")
    run.add_argument("cmd", nargs="*")
    run.add_argument("--entrypoint")
    run.add_argument("-e", "--env", action="append", default=[])
    run.add_argument("-m", "--metadata", action="append", default=[])
    run.add_argument("--rm", action="store_true")
    run.add_argument("--shell", action="store_true")
    run.add_argument("--command")
    run.add_argument("--vm-memory")
    run.add_argument("--user", default="root")
    run.add_argument("--restart", choices=["no", "always", "on-fail"])
    run.add_argument("--vm-cpus", type=int)
    run.add_argument("--vm-size")
    run.add_argument("-r", "--region")
    run.add_argument("-n", "--name")
    run.set_defaults(handler=_machine_run)
    listing = machine_commands.add_parser("list", aliases=["ls"], parents=[common, app_flags])
    listing.add_argument("-j", "--json", action="store_true")
    listing.add_argument("-q", "--quiet", action="store_true")
    listing.set_defaults(handler=_machines_list)

    tokens = commands.add_parser("tokens", aliases=["token"], parents=[common])
    token_commands = tokens.add_subparsers(dest="tokens_command", required=True, parser_class=_Parser)
    create = token_commands.add_parser("create", parents=[common])
    create_commands = create.add_subparsers(dest="create_command", required=True, parser_class=_Parser)
    machine_exec = create_commands.add_parser("machine-exec", parents=[common, app_flags])
    machine_exec.add_argument("positional", nargs="*")
    machine_exec.add_argument("-C", "--command", dest="command_exact", action="append", default=[])
    machine_exec.add_argument("-p", "--command-prefix", action="append", default=[])
    machine_exec.add_argument("-x", "--expiry", default="175200h0m0s")
    machine_exec.add_argument("-n", "--name", default="flyctl machine-exec token")
    machine_exec.add_argument("-j", "--json", action="store_true")
    machine_exec.set_defaults(handler=_tokens_create_machine_exec)

    auth = commands.add_parser("auth", parents=[common])
    auth_commands = auth.add_subparsers(dest="auth_command", required=True, parser_class=_Parser)
    whoami = auth_commands.add_parser("whoami", parents=[common])
    whoami.add_argument("-j", "--json", action="store_true")
    whoami.set_defaults(handler=_auth_whoami)
    token = auth_commands.add_parser("token", parents=[common])
    token.set_defaults(handler=_auth_token)

    # Flags as docs flyctl/cmd/fly_logs.md lists them: -m/--machine, -n/--no-tail, -r/--region.
    logs = commands.add_parser("logs", parents=[common, app_flags])
    logs.add_argument("-m", "--machine", dest="machine")
    logs.add_argument("-n", "--no-tail", action="store_true")
    logs.add_argument("-r", "--region")
    logs.set_defaults(handler=_logs)
    return parser


def main(argv: list[str]) -> int:
    """Run one fake fly command; returns its exit status."""
    state = os.environ.get("FAKEFLY_STATE_DIR")
    if state:
        with open(pathlib.Path(state) / "fly-calls.jsonl", "a") as calls:
            calls.write(json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n")
    # Words after `--` are positional, flags or not (pflag); argparse's subparsers lose them.
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:len(argv) - len(rest) - 1] if "--" in argv else argv)
    if rest:
        if not hasattr(args, "cmd"):
            _parser().error(f"unexpected arguments after --: {rest}")
        args.cmd = list(args.cmd or []) + rest
    try:
        return args.handler(args)
    except (FlyError, images.ImageError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
