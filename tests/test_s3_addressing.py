"""S3 addressing: virtual-hosted on Tigris, path style elsewhere, either one by setting;
requests in both styles against a real SeaweedFS that routes on the Host header, and every
URL flydeploy records or signs parsed back in both forms."""

from __future__ import annotations

import http.client
import io
import pathlib
import secrets
import sys
import urllib.parse

import pytest

import flydeploy
from tests.machine_apps import COUNTER_PY, GREET_V2, MAIN_PY, make_release, parse_result

pytest_plugins = ["tests.machine_apps"]


@pytest.mark.parametrize("host, bucket, setting, expected", [
    # auto: Tigris, whose new buckets answer only virtual-hosted requests
    ("fly.storage.tigris.dev", "shop-releases", "auto", "virtual"),
    ("t3.storage.dev", "shop-releases", "auto", "virtual"),
    ("FLY.Storage.Tigris.dev.", "abc", "auto", "virtual"),
    # auto: a bucket name that cannot be a host name label stays path style
    ("fly.storage.tigris.dev", "shop.releases", "auto", "path"),
    ("fly.storage.tigris.dev", "Shop", "auto", "path"),
    ("fly.storage.tigris.dev", "ab", "auto", "path"),
    ("fly.storage.tigris.dev", "-shop", "auto", "path"),
    # auto: everything that is not Tigris
    ("127.0.0.1", "shop", "auto", "path"),
    ("::1", "shop", "auto", "path"),
    ("localhost", "shop", "auto", "path"),
    ("s3.localhost", "shop", "auto", "path"),
    ("minio.internal", "shop", "auto", "path"),
    ("tigris.dev.example.com", "shop", "auto", "path"),
    ("nottigris.dev", "shop", "auto", "path"),
    # settings
    ("fly.storage.tigris.dev", "shop", "path", "path"),
    ("127.0.0.1", "shop.releases", "path", "path"),
    ("s3.localhost", "shop", "virtual", "virtual"),
    ("minio.internal", "shop", "virtual", "virtual"),
])
def test_addressing_style_rule(host, bucket, setting, expected):
    assert flydeploy.s3_addressing_style(host, bucket, setting) == expected


@pytest.mark.parametrize("host, bucket, setting, message", [
    ("127.0.0.1", "shop", "virtual", "IP address 127.0.0.1"),
    ("::1", "shop", "virtual", "IP address ::1"),
    ("s3.localhost", "shop.releases", "virtual", "cannot be part of a host name"),
    ("s3.localhost", "shop", "virtual-hosted", "not one of auto, virtual, path"),
])
def test_addressing_style_that_cannot_work_is_refused(host, bucket, setting, message):
    with pytest.raises(flydeploy.ConfigError, match=message):
        flydeploy.s3_addressing_style(host, bucket, setting)


def test_client_urls_in_each_style():
    def client(endpoint, bucket="shop-releases", **kwargs):
        return flydeploy.S3(endpoint, bucket, "AK", "SK", **kwargs)

    tigris = client("https://fly.storage.tigris.dev")
    assert tigris.addressing_style == "virtual"
    assert tigris.url("releases/a b+c.tar.gz") == \
        "https://shop-releases.fly.storage.tigris.dev/releases/a%20b%2Bc.tar.gz"
    assert client("https://t3.storage.dev:443/").url("k") == "https://shop-releases.t3.storage.dev:443/k"
    assert client("https://fly.storage.tigris.dev", addressing_style="path").url("k") == \
        "https://fly.storage.tigris.dev/shop-releases/k"
    assert client("http://127.0.0.1:9000/prefix/").url("k") == "http://127.0.0.1:9000/prefix/shop-releases/k"
    assert client("http://minio.internal:9000/prefix", addressing_style="virtual").url("k") == \
        "http://shop-releases.minio.internal:9000/prefix/k"
    presigned = tigris.presigned_url("releases/x.tar.gz", expires=60)
    parts = urllib.parse.urlsplit(presigned)
    assert parts.netloc == "shop-releases.fly.storage.tigris.dev" and parts.path == "/releases/x.tar.gz"


def test_addressing_style_from_the_environment(monkeypatch, seaweed):
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed.named_endpoint)
    assert flydeploy.S3.from_env().addressing_style == "path"
    monkeypatch.setenv("AWS_S3_ADDRESSING_STYLE", "Virtual")
    assert flydeploy.S3.from_env().addressing_style == "virtual"
    assert flydeploy.S3.from_env(addressing_style="path").addressing_style == "path"
    monkeypatch.setenv("AWS_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(flydeploy.ConfigError, match="AWS_S3_ADDRESSING_STYLE"):
        flydeploy.S3.from_env()


def _raw_get(url: str) -> tuple[int, bytes]:
    """GET ``url`` on loopback with its own Host header (as a resolver of ``*.localhost`` would)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30)
    try:
        conn.request("GET", f"{parts.path}?{parts.query}", headers={"Host": parts.netloc})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_virtual_hosted_requests_against_seaweedfs(seaweed, key_prefix):
    virtual = seaweed.client(endpoint=seaweed.named_endpoint, addressing_style="virtual")
    path = seaweed.client()
    key = key_prefix + "ünï code/doc.json"
    assert virtual.url(key).startswith(f"http://{seaweed.bucket}.s3.localhost:")

    etag = virtual.put(key, b'{"v": 1}', if_none_match="*")
    assert path.get_json(key) == ({"v": 1}, etag)  # the same object, however it is named
    assert virtual.get_json(key) == ({"v": 1}, etag)
    assert virtual.head(key)["size"] == 8
    with pytest.raises(flydeploy.PreconditionFailed):
        virtual.put(key, b"again", if_none_match="*")
    assert list(virtual.list(key_prefix)) == [key]

    status, body = _raw_get(virtual.presigned_url(key, expires=60))
    assert (status, body) == (200, b'{"v": 1}')
    # The signature covers the virtual host: the same query under another Host is refused.
    presigned = urllib.parse.urlsplit(virtual.presigned_url(key, expires=60))
    status, _ = _raw_get(f"http://other-bucket.s3.localhost:{presigned.port}{presigned.path}?{presigned.query}")
    assert status == 403

    virtual.delete(key, if_match=etag)
    assert path.head(key) is None


def test_store_for_url_reads_both_forms(monkeypatch, seaweed, key_prefix, tmp_path):
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed.named_endpoint)
    virtual = seaweed.client(endpoint=seaweed.named_endpoint, addressing_style="virtual")
    path = seaweed.client(endpoint=seaweed.named_endpoint)
    key = key_prefix + "releases/shop-v1.tar.gz"
    virtual.put(key, b"tarball")

    for url, style in ((virtual.url(key), "virtual"), (path.url(key), "path"),
                       (virtual.presigned_url(key), "virtual"), (path.presigned_url(key), "path")):
        store, found = flydeploy._store_for_url(url)
        assert (found, store.bucket, store.addressing_style) == (key, seaweed.bucket, style)
        assert store.get(found) == b"tarball"
        # The store whose own URL it is is used as it is; another gets a client in the URL's style.
        own, other = (virtual, path) if style == "virtual" else (path, virtual)
        assert flydeploy._store_for_url(url, own) == (own, key)
        store, found = flydeploy._store_for_url(url, other)
        assert store is not other and (found, store.addressing_style) == (key, style)

    with pytest.raises(flydeploy.ConfigError, match="AWS_ENDPOINT_URL_S3 points elsewhere"):
        flydeploy._store_for_url(f"http://{seaweed.bucket}.elsewhere.localhost:1/{key}")
    with pytest.raises(flydeploy.ConfigError, match="not a release URL"):
        flydeploy._store_for_url(f"{seaweed.named_endpoint}/{seaweed.bucket}")

    local = flydeploy.LocalStore(tmp_path / "store")
    local.put("releases/shop-v1.tar.gz", b"local")
    store, found = flydeploy._store_for_url(local.url("releases/shop-v1.tar.gz"))
    assert found == "releases/shop-v1.tar.gz" and store.get(found) == b"local"


def test_object_address_of_urls():
    endpoint = "https://fly.storage.tigris.dev"
    assert flydeploy.s3_object_address("https://shop.fly.storage.tigris.dev/releases/a%20b", endpoint) == \
        ("shop", "releases/a b", "virtual")
    assert flydeploy.s3_object_address("https://fly.storage.tigris.dev:443/shop/releases/x?X-Amz-Signature=1",
                                       endpoint) == ("shop", "releases/x", "path")
    assert flydeploy.s3_object_address("https://a.b.fly.storage.tigris.dev/k", endpoint) is None
    assert flydeploy.s3_object_address("http://shop.fly.storage.tigris.dev/k", endpoint) is None
    assert flydeploy.s3_object_address("https://t3.storage.dev/shop/k", endpoint) is None
    assert flydeploy.s3_object_address("http://s.minio:9000/base/k", "http://minio:9000/base/") == \
        ("s", "k", "virtual")
    assert flydeploy.s3_object_address("http://minio:9000/other/s/k", "http://minio:9000/base") is None


def test_setting_in_pyproject_and_fly_toml(tmp_path, monkeypatch, seaweed):
    for name, value in seaweed.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", seaweed.named_endpoint)
    (tmp_path / "fly.toml").write_text('app = "shop"\n[env]\nAWS_S3_ADDRESSING_STYLE = "virtual"\n')
    config = flydeploy.load_config(tmp_path)
    assert config.s3_addressing_style == "virtual" and config.sources["s3_addressing_style"] == "fly.toml"
    assert config.s3().addressing_style == "virtual"
    (tmp_path / "pyproject.toml").write_text('[tool.flydeploy]\ns3_addressing_style = "path"\n')
    config = flydeploy.load_config(tmp_path)
    assert config.s3().addressing_style == "path"
    (tmp_path / "pyproject.toml").write_text('[tool.flydeploy]\ns3_addressing_style = "vhost"\n')
    with pytest.raises(flydeploy.ConfigError, match="s3_addressing_style must be one of 'auto', 'virtual', 'path'"):
        flydeploy.load_config(tmp_path)


def test_machine_boot_and_rpc_upgrade_through_virtual_hosted_urls(machine, tmp_path, seaweed):
    """The machine side in a virtual-hosted setup: the boot catch-up reads current.json and the
    recorded tarball, and `rpc upgrade` fetches a release, all by <bucket>.<host> URLs."""
    machine.env.update(seaweed.env(), AWS_ENDPOINT_URL_S3=seaweed.named_endpoint,
                       AWS_S3_ADDRESSING_STYLE="virtual")
    virtual = seaweed.client(endpoint=seaweed.named_endpoint, addressing_style="virtual")
    app = f"shop-{secrets.token_hex(4)}"  # its own current.json in the shared bucket
    machine.app = app
    machine.env["FLY_APP_NAME"] = app
    machine.write_web_app()
    release, url = make_release(tmp_path, virtual, {"main.py": MAIN_PY, "counter.py": COUNTER_PY,
                                                    "greet.py": GREET_V2}, version="v2", app=app)
    assert urllib.parse.urlsplit(url).hostname == f"{seaweed.bucket}.s3.localhost"
    flydeploy.reset_current(virtual, app, machine.env["FLY_IMAGE_REF"])
    flydeploy.record_hot_upgrade(virtual, app, release.hot_upgrade_record(url))

    process = machine.start().wait_ready()
    assert process.get()["greeting"] == "hello v2", process.log()

    files = {"main.py": MAIN_PY, "counter.py": COUNTER_PY, "greet.py": GREET_V2.replace("v2", "v3")}
    release3, url3 = make_release(tmp_path, virtual, files, version="v3", app=app)
    upgrade = machine.rpc("upgrade", "--app", app, "--url", url3, "--sha256", release3.sha256)
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    result = parse_result(upgrade.stdout)
    assert result["success"] is True and result["processes_succeeded"] == 1
    assert process.get()["greeting"] == "hello v3"
    stored, _ = virtual.get_json(f"releases/{app}-results/{result['upgrade_id']}/{result['machine_id']}.json")
    assert stored["success"] is True and stored["machine_id"] == machine.env["FLY_MACHINE_ID"]


def test_a_fleet_upgrade_with_virtual_hosted_addressing_from_pyproject(machine, tmp_path, seaweed, monkeypatch):
    """`orchestrate` with the style set only in [tool.flydeploy]: the lock, the upload, current.json
    and the result object go virtual-hosted, and the machine side follows the recorded URL."""
    app = f"shop-{secrets.token_hex(4)}"
    env = {**seaweed.env(), "AWS_ENDPOINT_URL_S3": seaweed.named_endpoint}
    machine.app = app
    machine.env.update(env, FLY_APP_NAME=app)
    machine.write_web_app()
    process = machine.start().wait_ready()
    for name, value in {**env, "FLYDEPLOY_RUNTIME_DIR": str(machine.runtime)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_S3_ADDRESSING_STYLE", raising=False)

    project = tmp_path / "project"
    for name in ("main.py", "counter.py"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text((machine.app_root / name).read_text())
    (project / "greet.py").write_text(GREET_V2)
    (project / "pyproject.toml").write_text(f'[tool.flydeploy]\napp = "{app}"\ns3_addressing_style = "virtual"\n')
    config = flydeploy.load_config(project)
    store = config.s3()
    assert store.addressing_style == "virtual"

    out = io.StringIO()
    here = flydeploy.MachineCommands.for_app_dir(sys.executable, str(pathlib.Path(flydeploy.__file__).parent))
    report = flydeploy.orchestrate(app, "local", store=store, api=flydeploy.LocalMachines(app, cwd=machine.app_root),
                                   version="v2", out=out, **config.orchestrate_options() | {"commands": here})
    assert report.exit_code == 0, out.getvalue()
    assert process.get()["greeting"] == "hello v2"
    doc, _ = flydeploy.read_current(store, app)
    tarball_url = doc["hot_upgrade"]["tarball_url"]
    assert urllib.parse.urlsplit(tarball_url).hostname == f"{seaweed.bucket}.s3.localhost"
    assert flydeploy.s3_object_address(tarball_url, seaweed.named_endpoint) == (
        seaweed.bucket, f"releases/{app}-v2.tar.gz", "virtual")
    assert store.head(f"releases/{app}-deploy.lock") is None  # released
    results = list(store.list(f"releases/{app}-results/"))  # one per phase: prepare, then apply
    assert sorted(key.rsplit("/", 2)[1] for key in results) == ["apply", "prepare"]
    assert all(store.get_json(key)[0]["success"] is True for key in results)
