"""LocalStore: the S3 interface on a directory, with S3's semantics."""

import email.utils
import hashlib
import os
import pathlib
import subprocess
import sys
import threading
import urllib.request

import pytest

import flydeploy
from flydeploy import LocalStore, NotFound, PreconditionFailed, S3Error

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


def test_put_get_head_delete(store):
    etag = store.put("releases/app-current.json", b'{"a": 1}', content_type="application/json")
    assert etag == md5_etag(b'{"a": 1}')
    assert store.get("releases/app-current.json") == b'{"a": 1}'
    assert store.get_json("releases/app-current.json") == ({"a": 1}, etag)
    head = store.head("releases/app-current.json")
    assert head["etag"] == etag and head["size"] == 8
    assert head["content_type"] == "application/json"
    assert email.utils.parsedate_to_datetime(head["last_modified"]).tzinfo is not None
    assert head["headers"]["content-length"] == "8" and head["headers"]["etag"] == etag
    assert (pathlib.Path(store.root) / "releases" / "app-current.json").read_bytes() == b'{"a": 1}'
    store.delete("releases/app-current.json")
    assert store.head("releases/app-current.json") is None
    assert not (pathlib.Path(store.root) / "releases").exists(), "empty folders go with their keys"
    store.delete("releases/app-current.json")  # deleting a missing key succeeds, as on S3


def test_missing_keys_raise_not_found(store):
    with pytest.raises(NotFound) as caught:
        store.get("nope/missing.json")
    assert caught.value.status == 404 and caught.value.key == "nope/missing.json"
    with pytest.raises(NotFound):
        store.get_json("nope")
    with pytest.raises(NotFound):
        store.download("nope", store.root + "/../out")
    store.put("dir/child", b"x")
    with pytest.raises(NotFound):
        store.get("dir")  # a folder is not an object


def test_conditional_writes(store):
    etag = store.put("k", b"one", if_none_match="*")
    with pytest.raises(PreconditionFailed) as caught:
        store.put("k", b"two", if_none_match="*")
    assert caught.value.status == 412
    with pytest.raises(PreconditionFailed):
        store.put("k", b"two", if_match=md5_etag(b"other"))
    with pytest.raises(PreconditionFailed):
        store.put("absent", b"two", if_match="*")
    assert store.get("k") == b"one", "a refused write changes nothing"
    second = store.put("k", b"two", if_match=etag)
    assert store.put("k", b"three", if_match=second.strip('"')) == md5_etag(b"three")
    with pytest.raises(PreconditionFailed):
        store.delete("k", if_match=etag)
    assert store.get("k") == b"three"
    store.delete("k", if_match=md5_etag(b"three"))
    assert store.head("k") is None
    assert os.listdir(os.path.join(store.root, ".flydeploy-store")) == ["lock"], "no temporary file left"


@pytest.mark.parametrize("key", ["", "/etc/passwd", "../outside", "a/../../outside", "a//b",
                                 "a/./b", "trailing/", ".flydeploy-store/lock", "a/.flydeploy-store/x", "nul\x00byte",
                                 "x" * 1025])
def test_keys_that_would_escape_are_refused(store, tmp_path, key):
    with pytest.raises(S3Error) as caught:
        store.put(key, b"evil")
    assert caught.value.code == "InvalidKey"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert list(store.list("")) == []


def test_a_link_pointing_out_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(store.root, "escape"))
    with pytest.raises(S3Error, match="outside the store") as caught:
        store.put("escape/file", b"evil")
    assert caught.value.code == "InvalidKey"
    assert list(outside.iterdir()) == []


def test_keys_with_unusual_characters_round_trip(store):
    keys = ["releases/a b+c%d$e.json", "releases/ünï cødé.txt", "releases/=&~.bin", "z", "A"]
    for key in keys:
        store.put(key, key.encode())
    for key in keys:
        assert store.get(key) == key.encode()
    assert list(store.list("")) == sorted(keys, key=lambda k: k.encode())
    assert list(store.list("releases/")) == sorted(keys[:3], key=lambda k: k.encode())
    assert list(store.list("releases/a")) == ["releases/a b+c%d$e.json"]
    assert list(store.list("nothing/here/")) == []
    assert list(store.list("../")) == []


def test_a_key_cannot_also_be_a_folder(store):
    store.put("a/b", b"1")
    with pytest.raises(S3Error) as caught:
        store.put("a", b"2")
    assert caught.value.code == "KeyConflict"
    store.put("c", b"1")
    with pytest.raises(S3Error) as caught:
        store.put("c/d", b"2")
    assert caught.value.code == "KeyConflict"
    assert store.get("a/b") == b"1" and store.get("c") == b"1"


def test_upload_download_and_file_urls(store, tmp_path):
    source = tmp_path / "big.bin"
    payload = os.urandom(3 << 20)
    source.write_bytes(payload)
    etag = store.upload("releases/app-v1.tar.gz", source)
    assert etag == md5_etag(payload)
    dest = tmp_path / "fetched.bin"
    dest.write_bytes(b"old")
    assert store.download("releases/app-v1.tar.gz", dest) == hashlib.sha256(payload).hexdigest()
    assert dest.read_bytes() == payload
    url = store.url("releases/app-v1.tar.gz")
    assert url.startswith("file:///")
    with urllib.request.urlopen(url) as response:  # plain urllib can fetch it
        assert response.read() == payload
    found, key = LocalStore.from_url(url)
    assert (found.root, key) == (store.root, "releases/app-v1.tar.gz")
    spaced = store.url("releases/a b%.json")
    assert LocalStore.from_url(spaced)[1] == "releases/a b%.json"
    with pytest.raises(flydeploy.ConfigError, match="file://"):
        LocalStore.from_url("https://example.invalid/releases/x")
    with pytest.raises(NotFound, match="no local store"):
        LocalStore.from_url(source.as_uri())


@pytest.mark.parametrize("folder", ["café", os.fsdecode(b"store-\xff")], ids=["utf-8", "undecodable"])
def test_a_store_url_leads_back_to_its_store_whatever_the_folder_name(tmp_path, folder):
    store = LocalStore(tmp_path / folder)
    store.put("releases/app-v1.tar.gz", b"data")
    found, key = LocalStore.from_url(store.url("releases/app-v1.tar.gz"))
    assert (found.root, key) == (store.root, "releases/app-v1.tar.gz")
    assert found.get("releases/app-v1.tar.gz") == b"data"


def test_threads_serialise_conditional_writes(store):
    store.put("counter", b"0")

    def bump(times):
        for _ in range(times):
            while True:
                value, etag = store.get_json("counter")
                try:
                    store.put("counter", str(value + 1).encode(), if_match=etag)
                    break
                except PreconditionFailed:
                    continue

    threads = [threading.Thread(target=bump, args=(50,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get_json("counter")[0] == 200


BUMPER = """
import sys
import flydeploy
store = flydeploy.LocalStore(sys.argv[1])
for _ in range(int(sys.argv[2])):
    while True:
        value, etag = store.get_json("counter")
        try:
            store.put("counter", str(value + 1).encode(), if_match=etag)
            break
        except flydeploy.PreconditionFailed:
            continue
"""


def test_processes_serialise_conditional_writes(store):
    store.put("counter", b"0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", BUMPER, store.root, "40"], env=env)
             for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert store.get_json("counter")[0] == 120


def test_invalid_json_is_reported(store):
    store.put("bad.json", b"{nope")
    with pytest.raises(S3Error, match="not valid JSON") as caught:
        store.get_json("bad.json")
    assert caught.value.code == "InvalidJSON"


def test_local_mode_flow_from_pack_to_unpack_through_the_recorded_url(tmp_path):
    """What `hot --local` and the machine side do: the URL in current.json is enough."""
    app_root = tmp_path / "app"
    (app_root / "bot").mkdir(parents=True)
    (app_root / "bot" / "__init__.py").write_text("VERSION = 2\n")
    store = LocalStore(app_root / ".flydeploy")
    release = flydeploy.pack_release(app_root, tmp_path / "r.tar.gz", app="bot", version="v2")
    assert ".flydeploy" not in "".join(release.manifest["files"])
    key = flydeploy.release_key("bot", "v2")
    store.upload(key, release.path)
    flydeploy.record_hot_upgrade(store, "bot", release.hot_upgrade_record(store.url(key)),
                                 image_ref="local")
    current, _ = flydeploy.read_current(store, "bot")
    found, found_key = LocalStore.from_url(current["hot_upgrade"]["tarball_url"])
    fetched = tmp_path / "fetched.tar.gz"
    assert found.download(found_key, fetched) == current["hot_upgrade"]["sha256"]
    manifest = flydeploy.unpack_release(fetched, tmp_path / "out",
                                        expected_sha256=current["hot_upgrade"]["sha256"])
    assert manifest["version"] == "v2"
    assert (tmp_path / "out" / "bot" / "__init__.py").read_text() == "VERSION = 2\n"


def test_local_file_errors_are_clear_and_leave_nothing(store, tmp_path):
    with pytest.raises(flydeploy.FlyDeployError, match="check the path"):
        store.upload("k", tmp_path / "no-such-file")
    assert store.head("k") is None
    store.put("k", b"data")
    with pytest.raises(flydeploy.FlyDeployError, match="check the path"):
        store.download("k", tmp_path / "no-such-folder" / "out")
    assert os.listdir(os.path.join(store.root, ".flydeploy-store")) == ["lock"]


def test_temporary_files_of_dead_writers_are_swept(store):
    internal = pathlib.Path(store.root, ".flydeploy-store")
    stale, fresh = internal / ".k.dead.part", internal / ".k.busy.part"
    stale.write_bytes(b"half a write")
    fresh.write_bytes(b"a write in progress")
    os.utime(stale, (1, 1))
    LocalStore(store.root)
    assert not stale.exists() and fresh.exists()
