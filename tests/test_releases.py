"""Release tarballs: deterministic packing, the default file choice, and safe unpacking."""

import gzip
import hashlib
import io
import json
import os
import pathlib
import shutil
import tarfile
import tempfile

import pytest

import flydeploy
from flydeploy import MANIFEST_NAME, ReleaseError, pack_release, unpack_release


def write(root: pathlib.Path, rel: str, content: str | bytes = "x = 1\n") -> pathlib.Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


@pytest.fixture
def app_tree(tmp_path):
    """A typical application tree with everything that must and must not be packed."""
    root = tmp_path / "app"
    for rel in ["main.py", "settings.py", "shop/__init__.py", "shop/views.py",
                "shop/templates/shop/index.html", "shop/static/shop.css", "shop/data/prices.json",
                "nspkg/tool.py", "templates/base.html", "static/logo.svg"]:
        write(root, rel, f"# {rel}\n")
    write(root, "bin/run.py", "#!/usr/bin/env python3\n").chmod(0o755)
    never = ["shop/__pycache__/views.cpython-311.pyc", "shop/old.pyc", ".git/HEAD", ".env",
             "shop/.secret", ".hidden/mod.py", "node_modules/x/index.py", "venv/bin/activate", "venv/lib/site.py",
             "myenv/pyvenv.cfg", "myenv/lib/python3.11/site-packages/dep.py",
             "shop.egg-info/PKG-INFO", "build/lib/shop/views.py", "dist/shop.py",
             "db.sqlite3", "notes.txt", "media/upload.png", "flydeploy-manifest.json",
             # Not the application, even with Python in them.
             "tests/test_shop.py", "tests/__init__.py", "test/conftest.py", "docs/conf.py",
             "doc/__init__.py", "benchmarks/bench_shop.py",
             # Python files only deeper down: not a package, not a namespace package.
             "tools/deploy/run.py"]
    for rel in never:
        write(root, rel)
    return root


PACKED = ["bin/run.py", "main.py", "nspkg/tool.py", "settings.py", "shop/__init__.py",
          "shop/data/prices.json", "shop/static/shop.css", "shop/templates/shop/index.html",
          "shop/views.py", "static/logo.svg", "templates/base.html"]


def members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tar:
        return tar.getmembers()


def test_default_choice_packs_modules_packages_and_their_data_only(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    assert sorted(release.manifest["files"]) == PACKED
    names = [m.name for m in members(release.path)]
    assert names == [MANIFEST_NAME] + PACKED


def test_manifest_leads_and_hashes_every_file(app_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1",
                           source_image_ref="registry.fly.io/shop:deployment-1")
    with tarfile.open(release.path, "r:gz") as tar:
        manifest = json.load(tar.extractfile(MANIFEST_NAME))
    assert manifest == release.manifest
    assert manifest["app"] == "shop" and manifest["version"] == "v1"
    assert manifest["source_image_ref"] == "registry.fly.io/shop:deployment-1"
    assert manifest["created_at"] is None
    for rel, digest in manifest["files"].items():
        assert digest == hashlib.sha256((app_tree / rel).read_bytes()).hexdigest()
    assert release.sha256 == hashlib.sha256(pathlib.Path(release.path).read_bytes()).hexdigest()


def test_same_tree_gives_the_same_bytes(app_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = pack_release(app_tree, tmp_path / "a.tar.gz", app="shop", version="v1")
    # A copy made in another order, with other mtimes and non-exec mode bits.
    copy = tmp_path / "copy"
    for rel in reversed(PACKED):
        write(copy, rel, (app_tree / rel).read_bytes())
    (copy / "bin/run.py").chmod(0o700)
    (copy / "main.py").chmod(0o600)
    os.utime(copy / "shop/views.py", (1, 1))
    second = pack_release(copy, tmp_path / "b.tar.gz", app="shop", version="v1")
    assert first.sha256 == second.sha256
    assert pathlib.Path(first.path).read_bytes() == pathlib.Path(second.path).read_bytes()
    # Content matters: one changed byte changes the digest.
    write(copy, "shop/views.py", "# changed\n")
    third = pack_release(copy, tmp_path / "c.tar.gz", app="shop", version="v1")
    assert third.sha256 != first.sha256


def test_members_are_normalised(app_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    raw = pathlib.Path(release.path).read_bytes()
    assert raw[4:8] == b"\0\0\0\0", "the gzip header carries no timestamp"
    for member in members(release.path):
        assert member.isreg()
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == 0
        assert member.mode == (0o755 if member.name == "bin/run.py" else 0o644)


def test_created_at_follows_source_date_epoch(app_tree, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    assert release.manifest["created_at"] == "2023-11-14T22:13:20.000Z"
    assert {m.mtime for m in members(release.path)} == {1700000000}
    again = pack_release(app_tree, tmp_path / "again.tar.gz", app="shop", version="v1")
    assert again.sha256 == release.sha256
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(flydeploy.ConfigError, match="SOURCE_DATE_EPOCH"):
        pack_release(app_tree, tmp_path / "bad.tar.gz", app="shop", version="v1")


def test_large_files_are_streamed_to_the_same_bytes(app_tree, tmp_path, monkeypatch):
    cached = pack_release(app_tree, tmp_path / "cached.tar.gz", app="shop", version="v1")
    monkeypatch.setattr(flydeploy, "_PACK_CACHE_BYTES", 0)  # every file read twice
    streamed = pack_release(app_tree, tmp_path / "streamed.tar.gz", app="shop", version="v1")
    assert streamed.sha256 == cached.sha256


@pytest.mark.parametrize("new_content", [b"", b"# shop/views.py, edited!\n", b"#" * 15])
def test_a_file_changed_between_hashing_and_packing_is_refused(app_tree, tmp_path, monkeypatch,
                                                                new_content):
    monkeypatch.setattr(flydeploy, "_PACK_CACHE_BYTES", 0)
    hash_first = flydeploy._digest

    def hash_then_edit(f, algorithm):
        digest = hash_first(f, algorithm)
        if f.name.endswith("views.py"):
            pathlib.Path(f.name).write_bytes(new_content)  # a writer gets in between the passes
        return digest

    monkeypatch.setattr(flydeploy, "_digest", hash_then_edit)
    with pytest.raises(ReleaseError, match="changed while it was being packed") as caught:
        pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    assert caught.value.member == "shop/views.py"
    assert os.listdir(tmp_path) == ["app"], "no tarball and no temporary file left"


def test_include_and_exclude_patterns(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1",
                           include=["*.py", "media/"], exclude=["bin", "shop/**/views.py"])
    # include replaces the default choice, so build outputs, tests and docs are no longer
    # left out.
    assert sorted(release.manifest["files"]) == [
        "benchmarks/bench_shop.py", "build/lib/shop/views.py", "dist/shop.py", "doc/__init__.py",
        "docs/conf.py", "main.py", "media/upload.png", "nspkg/tool.py", "settings.py",
        "shop/__init__.py", "test/conftest.py", "tests/__init__.py", "tests/test_shop.py",
        "tools/deploy/run.py"]
    with_tests = pack_release(app_tree, tmp_path / "t.tar.gz", app="shop", version="v1",
                              include=["/tests/", "*.py"], exclude=["/build/", "/dist/"])
    assert {"tests/__init__.py", "tests/test_shop.py", "main.py"} <= set(with_tests.manifest["files"])
    one = pack_release(app_tree, tmp_path / "one.tar.gz", app="shop", version="v1",
                       include="/shop/", exclude="*.css")
    assert sorted(one.manifest["files"]) == [
        "shop/__init__.py", "shop/data/prices.json", "shop/templates/shop/index.html",
        "shop/views.py"], "a lone string is one pattern; a leading '/' anchors it"
    anywhere = pack_release(app_tree, tmp_path / "anywhere.tar.gz", app="shop", version="v1",
                            include=["shop/"])
    assert "build/lib/shop/views.py" in anywhere.manifest["files"]
    # Never-packed folders stay out even when a pattern names them.
    release = pack_release(app_tree, tmp_path / "r2.tar.gz", app="shop", version="v1",
                           include=["**"], exclude=["*.css", "templates/"])
    files = set(release.manifest["files"])
    assert {"db.sqlite3", "notes.txt", "static/logo.svg", "shop/data/prices.json"} <= files
    assert not any(part.startswith(".") or part in ("__pycache__", "node_modules", "myenv", "venv")
                   for f in files for part in f.split("/"))
    assert not any(f.endswith((".pyc", ".css")) or f.startswith("templates/") for f in files)
    assert "shop/templates/shop/index.html" not in files  # 'templates/' names any such folder
    assert MANIFEST_NAME not in files


def test_out_path_inside_the_tree_is_not_packed(app_tree):
    out = app_tree / "shop" / "release.tar.gz"
    first = pack_release(app_tree, out, app="shop", version="v1")
    second = pack_release(app_tree, out, app="shop", version="v1")
    assert "shop/release.tar.gz" not in second.manifest["files"]
    assert first.sha256 == second.sha256


def test_bad_names_and_empty_trees_are_refused(app_tree, tmp_path):
    with pytest.raises(flydeploy.ConfigError, match="version '../x'"):
        pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="../x")
    empty = tmp_path / "empty"
    write(empty, "README.md", "# nothing to run\n")
    with pytest.raises(ReleaseError, match="nothing to pack"):
        pack_release(empty, tmp_path / "r.tar.gz", app="shop", version="v1")
    assert not (tmp_path / "r.tar.gz").exists()
    assert flydeploy.release_key("shop", "v1") == "releases/shop-v1.tar.gz"


@pytest.mark.parametrize("name,why", [("shop/a\\b.py", "backslash"),
                                      (os.fsdecode(b"shop/caf\xe9.txt"), "not valid UTF-8")])
def test_names_unpack_would_refuse_are_refused_when_packing(app_tree, tmp_path, name, why):
    write(app_tree, "shop/ok.txt")
    (app_tree / os.fsencode(name).decode("utf-8", "surrogateescape")).write_bytes(b"x")
    with pytest.raises(ReleaseError, match=why) as caught:
        pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    assert caught.value.member == name and repr(name) in str(caught.value)
    assert not (tmp_path / "r.tar.gz").exists()


def _pack_as_unprivileged_user(root: pathlib.Path, out: pathlib.Path) -> str:
    """Pack in a forked child that drops root (permissions bind only an unprivileged
    user); return what it raised, as "Type: message"."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                pack_release(root, out, app="shop", version="v1")
                report = "packed"
            except Exception as err:  # reported to the parent, which asserts on it
                report = f"{type(err).__name__}: {err}"
            os.write(write_end, report.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        report = reader.read().decode()
    assert os.waitpid(pid, 0)[1] == 0
    return report


@pytest.mark.parametrize("unreadable", ["shop/sub", "shop/sub/views.py"])
def test_unreadable_folders_and_files_are_reported_not_skipped(unreadable):
    work = pathlib.Path(tempfile.mkdtemp(prefix="flydeploy-perm-"))
    try:
        root, out = work / "app", work / "out"
        write(root, "shop/__init__.py")
        write(root, "shop/sub/views.py")
        out.mkdir()
        for folder, dirs, files in os.walk(work):
            os.chmod(folder, 0o777)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o644)
        (root / unreadable).chmod(0)
        report = _pack_as_unprivileged_user(root, out / "r.tar.gz")
        assert report.startswith("ReleaseError: cannot read") and unreadable in report, report
        assert list(out.iterdir()) == []
    finally:
        (work / "app" / unreadable).chmod(0o755)
        shutil.rmtree(work)


def test_round_trip(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    dest = tmp_path / "out"
    manifest = unpack_release(release.path, dest, expected_sha256=release.sha256)
    assert manifest == release.manifest
    unpacked = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert unpacked == PACKED
    for rel in PACKED:
        assert (dest / rel).read_bytes() == (app_tree / rel).read_bytes()
    assert os.access(dest / "bin/run.py", os.X_OK)
    assert not os.access(dest / "main.py", os.X_OK)
    # An existing empty folder is a fine destination too.
    (tmp_path / "empty").mkdir()
    unpack_release(release.path, tmp_path / "empty")
    assert (tmp_path / "empty" / "main.py").exists()


def test_hot_upgrade_record(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v7",
                           source_image_ref="img:1")
    record = release.hot_upgrade_record("https://s3/bucket/releases/shop-v7.tar.gz",
                                        deployed_at="2026-01-01T00:00:00.000Z")
    assert record == {"version": "v7", "source_image_ref": "img:1",
                      "tarball_url": "https://s3/bucket/releases/shop-v7.tar.gz",
                      "sha256": release.sha256, "deployed_at": "2026-01-01T00:00:00.000Z"}


# --- Refusals: hand-made archives -------------------------------------------------

def craft(path: pathlib.Path, entries, *, manifest_files=None, manifest_first=True) -> pathlib.Path:
    """Write a .tar.gz of ``entries`` (TarInfo, bytes | None) with a manifest listing them.

    ``manifest_files`` overrides the manifest's ``files``; by default it lists
    every entry with the sha256 of its data.
    """
    if manifest_files is None:
        manifest_files = {info.name: hashlib.sha256(data or b"").hexdigest() for info, data in entries}
    manifest = json.dumps({"app": "x", "version": "v1", "source_image_ref": None,
                           "created_at": None, "files": manifest_files}).encode()
    head = tarfile.TarInfo(MANIFEST_NAME)
    head.size = len(manifest)
    ordered = [(head, manifest)] + list(entries) if manifest_first else list(entries) + [(head, manifest)]
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in ordered:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def entry(name, data=b"ok\n", kind=tarfile.REGTYPE, **attrs):
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, (data if kind == tarfile.REGTYPE else None)


GOOD = entry("app/ok.py")
OK_SHA = hashlib.sha256(b"ok\n").hexdigest()


def assert_refused(archive, tmp_path, member, match, **kwargs):
    dest = tmp_path / "dest"
    before = set(os.listdir(tmp_path))
    with pytest.raises(ReleaseError, match=match) as caught:
        unpack_release(archive, dest, **kwargs)
    assert caught.value.member == member
    if member is not None:
        assert repr(member) in str(caught.value), "the message names the member"
    assert not dest.exists(), "nothing is left in dest"
    assert set(os.listdir(tmp_path)) == before, "no staging folder is left behind"


@pytest.mark.parametrize("name", ["/etc/cron.d/evil", "../evil.py", "app/../../evil.py",
                                  "app//double.py", "./app/x.py", "C:/windows.py"])
def test_unsafe_paths_are_refused(tmp_path, name):
    archive = craft(tmp_path / "a.tar.gz", [GOOD, entry(name)], manifest_files={"app/ok.py": OK_SHA})
    assert_refused(archive, tmp_path, name, "absolute|'\\.\\.'|normalised")


@pytest.mark.parametrize("kind, what", [(tarfile.SYMTYPE, "a link"), (tarfile.LNKTYPE, "a link"),
                                        (tarfile.CHRTYPE, "a device"), (tarfile.BLKTYPE, "a device"),
                                        (tarfile.FIFOTYPE, "not a regular file"),
                                        (tarfile.DIRTYPE, "a folder entry")])
def test_non_regular_members_are_refused(tmp_path, kind, what):
    special = entry("app/special", kind=kind, linkname="/etc/passwd")
    archive = craft(tmp_path / "a.tar.gz", [GOOD, special],
                    manifest_files={"app/ok.py": OK_SHA, "app/special": hashlib.sha256(b"").hexdigest()})
    assert_refused(archive, tmp_path, "app/special", what)


@pytest.mark.parametrize("entries, listed, member, match", [
    ([GOOD, entry("app/extra.py")], {"app/ok.py": OK_SHA}, "app/extra.py", "not listed"),
    ([GOOD, entry("app/b.py", b"evil\n")],
     {"app/ok.py": OK_SHA, "app/b.py": hashlib.sha256(b"good\n").hexdigest()}, "app/b.py", "sha256"),
    ([GOOD], {"app/ok.py": OK_SHA, "app/gone.py": "0" * 64}, "app/gone.py", "missing from the archive"),
    ([GOOD, GOOD], {"app/ok.py": OK_SHA}, "app/ok.py", "twice"),
    ([GOOD], {"app/ok.py": OK_SHA, "../../etc/passwd": "0" * 64}, "../../etc/passwd", "'\\.\\.'"),
], ids=["unlisted", "hash-differs", "missing", "duplicate", "unsafe-manifest-path"])
def test_members_disagreeing_with_the_manifest_are_refused(tmp_path, entries, listed, member, match):
    archive = craft(tmp_path / "a.tar.gz", entries, manifest_files=listed)
    assert_refused(archive, tmp_path, member, match)


def test_archive_not_led_by_a_manifest_is_refused(tmp_path):
    archive = craft(tmp_path / "a.tar.gz", [GOOD], manifest_first=False)
    assert_refused(archive, tmp_path, "app/ok.py", "not flydeploy-manifest.json")


def test_hash_mismatch_is_refused_before_extracting(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    assert_refused(release.path, tmp_path, None, "sha256 .* not the expected", expected_sha256="ab" * 32)


def test_missing_tarball_is_reported(tmp_path):
    with pytest.raises(ReleaseError, match="does not exist"):
        unpack_release(tmp_path / "nope.tar.gz", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_archives_are_refused(app_tree, tmp_path, damage):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    raw = pathlib.Path(release.path).read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not gzip at all" * 10)
    with pytest.raises(ReleaseError, match="damaged"):
        unpack_release(broken, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def test_non_empty_destination_is_refused_and_left_alone(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    dest = tmp_path / "busy"
    write(dest, "keep.txt", "mine")
    with pytest.raises(ReleaseError, match="not an empty folder"):
        unpack_release(release.path, dest)
    assert os.listdir(dest) == ["keep.txt"]


# --- Decompression bombs -------------------------------------------------------------

def test_too_many_members_is_refused(tmp_path):
    entries = [entry(f"app/m{i}.py", b"") for i in range(6)]
    archive = craft(tmp_path / "a.tar.gz", entries)
    assert_refused(archive, tmp_path, "app/m5.py", "more than 5 members", max_members=5)


def test_too_much_content_is_refused(tmp_path):
    zeros = b"\0" * (8 << 20)  # 8 MiB of zeros compress to a few KiB
    archive = craft(tmp_path / "a.tar.gz", [GOOD, entry("app/zeros.bin", zeros)])
    assert archive.stat().st_size < 100_000
    assert_refused(archive, tmp_path, "app/zeros.bin", "exceeds 4194304 bytes", max_bytes=4 << 20)


def test_declared_huge_member_is_refused_at_the_default_limit(tmp_path):
    """A header claiming terabytes is refused before any of it is read."""
    archive = tmp_path / "bomb.tar.gz"
    manifest = json.dumps({"files": {"app/huge.bin": "0" * 64}}).encode()
    head = tarfile.TarInfo(MANIFEST_NAME)
    head.size = len(manifest)
    huge = tarfile.TarInfo("app/huge.bin")
    huge.size = 1 << 40
    with gzip.open(archive, "wb") as gz:
        gz.write(head.tobuf(tarfile.PAX_FORMAT) + manifest.ljust(512, b"\0"))
        gz.write(huge.tobuf(tarfile.PAX_FORMAT) + b"\0" * 4096)
    assert_refused(archive, tmp_path, "app/huge.bin", "decompression bomb")


def test_limits_do_not_refuse_a_normal_release(app_tree, tmp_path):
    release = pack_release(app_tree, tmp_path / "r.tar.gz", app="shop", version="v1")
    total = sum((app_tree / rel).stat().st_size for rel in PACKED)
    unpack_release(release.path, tmp_path / "dest", max_bytes=total, max_members=len(PACKED))
    assert (tmp_path / "dest" / "main.py").exists()
    shutil.rmtree(tmp_path / "dest")
    with pytest.raises(ReleaseError, match="exceeds"):
        unpack_release(release.path, tmp_path / "dest", max_bytes=total - 1)
