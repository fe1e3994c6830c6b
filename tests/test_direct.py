"""`hot --direct`: the release packed from the developer's tree and the orchestration run
from here, against the local Fly and SeaweedFS; and the pure parts it rests on
(.dockerignore rules, the dependency fingerprint, dotenv files)."""

import json
import tarfile

import pytest

import flydeploy
import flydeploy_cli
from tests.test_fleet_e2e import V1, V2, Project, get

pytest_plugins = ["tests.fakefly.fixtures"]

REQUIREMENTS = "requests==2.32.3\n"


# --- .dockerignore, as Docker reads it ---------------------------------------

@pytest.mark.parametrize("lines, path, ignored", [
    (["*.md"], "README.md", True),
    (["*.md"], "docs/guide.md", False),  # unlike .gitignore: `*` does not cross folders, anchored at the root
    (["**/*.md"], "docs/deep/guide.md", True),
    (["**/*.md"], "guide.md", True),  # `**` is zero folders too
    (["tests"], "tests/unit/test_a.py", True),  # a folder's pattern takes what is below it
    (["/secret/"], "secret/key.pem", True),  # leading and trailing slashes are dropped
    (["./build/../dist"], "dist/app.py", True),  # patterns are cleaned like paths
    (["*.py", "!keep.py"], "keep.py", False),  # an exception
    (["*.py", "!keep.py", "keep*"], "keep.py", True),  # the last match decides
    (["data", "!data/seed.json"], "data/seed.json", False),
    (["# *.py", ""], "app.py", False),  # a comment, a blank line
    ([" app.py "], "app.py", True),  # trimmed
    (["a?c.py"], "abc.py", True),
    (["a?c.py"], "a/c.py", False),
    (["[a-c]*.py"], "b.py", True),
    (["[^a-c]*.py"], "b.py", False),
    (["[!a-c]*.py"], "b.py", True),  # Go's classes negate with ^ only: here ! is one more member
    (["app.(py)"], "app.(py)", True),  # ( ) . are literal
    (["**"], "any/thing.py", True),
])
def test_dockerignore_rules(lines, path, ignored):
    assert flydeploy.DockerIgnore.parse("\n".join(lines)).ignores(path) is ignored


def test_a_bad_dockerignore_pattern_is_named():
    with pytest.raises(flydeploy.ConfigError, match=r"'\[a-' is not a valid pattern"):
        flydeploy.DockerIgnore.parse("ok.py\n[a-\n")


def test_dockerignore_applies_from_the_context_root(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / ".dockerignore").write_text("src/local_settings.py\nsettings.py\n")
    rules = flydeploy.DockerIgnore.for_context(tmp_path, tmp_path / "src")
    assert rules.ignores("local_settings.py") and not rules.ignores("settings.py")
    none = flydeploy.DockerIgnore.for_context(tmp_path / "src", tmp_path / "src")
    assert none.source is None and none.ignores("fly.toml") and not none.ignores("settings.py")


def _ignore_project(tmp_path, build: str = "") -> flydeploy.FleetConfig:
    """A project whose every file may be packed (``include``), with a .dockerignore that leaves out app.py."""
    for name in ("app.py", "scratch.py", "keep.py"):
        (tmp_path / name).write_text(f"NAME = {name!r}\n")
    (tmp_path / "deploy").mkdir(exist_ok=True)
    (tmp_path / "deploy" / "build.ignore").write_text("scratch.py\n")
    (tmp_path / ".dockerignore").write_text("app.py\n")
    (tmp_path / "fly.toml").write_text(f'app = "shop"\n{build}')
    (tmp_path / "pyproject.toml").write_text('[tool.flydeploy]\ninclude = ["*.py", "fly.toml"]\n')
    return flydeploy.load_config(tmp_path)


def _packed(config: flydeploy.FleetConfig) -> list[str]:
    return [path for path, _ in flydeploy.list_release_files(config.root, include=config.include,
                                                             dockerignore=config.dockerignore())]


@pytest.mark.parametrize("ignorefile", ["deploy/build.ignore", "/deploy/build.ignore",
                                        "./deploy/../deploy/build.ignore"])
def test_fly_toml_ignorefile_replaces_dockerignore(tmp_path, ignorefile):
    # flyctl (internal/command/deploy/deploy_build.go, resolveIgnorefilePath): the path is joined to
    # fly.toml's folder with Go's filepath.Join, so a leading / stays under that folder too; the
    # context's .dockerignore is then not read at all.
    config = _ignore_project(tmp_path, f'[build]\n  ignorefile = "{ignorefile}"\n')
    assert config.ignore_file() == (tmp_path / "deploy" / "build.ignore", "fly.toml [build] ignorefile")
    assert _packed(config) == ["app.py", "fly.toml", "keep.py"]
    assert config.dockerignore().source == str(tmp_path / "deploy" / "build.ignore")
    # A BuildKit build reads .dockerignore instead (flyctl gives it no excludes): the difference is named.
    files = flydeploy.list_release_files(config.root, include=config.include, dockerignore=config.dockerignore())
    assert "BuildKit" in flydeploy_cli.buildkit_note(config, files)
    assert "reads .dockerignore instead, and would differ for 2 files: app.py, scratch.py" in \
        flydeploy_cli.buildkit_note(config, files)
    (tmp_path / ".dockerignore").write_text("scratch.py\n")  # alike: nothing to say
    assert flydeploy_cli.buildkit_note(config, files) is None
    (tmp_path / ".dockerignore").unlink()  # BuildKit copies everything, fly.toml too
    assert "reads no ignore file instead, and would differ for 1 file: scratch.py" in \
        flydeploy_cli.buildkit_note(config, files)


def test_a_missing_ignore_file_leaves_out_fly_toml_alone(tmp_path):
    # flyctl (internal/build/imgsrc/archive.go, readDockerignore): no such file is no error; the
    # context is then everything but fly.toml.  The same when there is no .dockerignore.
    config = _ignore_project(tmp_path, '[build]\n  ignorefile = "deploy/missing.ignore"\n')
    assert _packed(config) == ["app.py", "keep.py", "scratch.py"]  # .dockerignore not read either
    assert config.dockerignore().source is None
    assert flydeploy_cli.ignore_note(config, config.dockerignore()) == (
        " (fly.toml [build] ignorefile deploy/missing.ignore does not exist: as flyctl does, only fly.toml "
        "is left out)")
    plain = _ignore_project(tmp_path)
    assert plain.ignore_file() == (tmp_path / ".dockerignore", ".dockerignore")
    assert _packed(plain) == ["fly.toml", "keep.py", "scratch.py"]  # its rules alone: fly.toml in
    (tmp_path / ".dockerignore").unlink()
    assert _packed(plain) == ["app.py", "keep.py", "scratch.py"]


def test_a_bad_ignorefile_setting_is_named(tmp_path):
    with pytest.raises(flydeploy.ConfigError, match=r"\[build\] ignorefile must be a path"):
        _ignore_project(tmp_path, "[build]\n  ignorefile = 3\n").ignore_file()
    (tmp_path / "deploy" / "folder.ignore").mkdir()
    with pytest.raises(flydeploy.ConfigError, match=r"cannot read .*folder.ignore"):
        _ignore_project(tmp_path, '[build]\n  ignorefile = "deploy/folder.ignore"\n').dockerignore()


def test_pack_leaves_out_what_dockerignore_keeps_out_and_records_the_tree(tmp_path):
    for name in ("app.py", "scratch.py", "keep.py"):
        (tmp_path / name).write_text(f"NAME = {name!r}\n")
    rules = flydeploy.DockerIgnore.parse("scratch.py\n")
    listed = flydeploy.list_release_files(tmp_path, dockerignore=rules)
    assert [path for path, _ in listed] == ["app.py", "keep.py"]
    release = flydeploy.pack_release(tmp_path, tmp_path.parent / "r.tar.gz", app="shop", version="v1",
                                     dockerignore=rules, local_tree={"git_commit": "abc", "git_dirty": True})
    assert sorted(release.manifest["files"]) == ["app.py", "keep.py"]
    assert release.manifest["local_tree"] == {"git_commit": "abc", "git_dirty": True}
    assert release.hot_upgrade_record("s3://x")["local_tree"] == {"git_commit": "abc", "git_dirty": True}
    plain = flydeploy.pack_release(tmp_path, tmp_path.parent / "p.tar.gz", app="shop", version="v1")
    assert "local_tree" not in plain.manifest and "local_tree" not in plain.hot_upgrade_record("s3://x")


# --- dependency files ----------------------------------------------------------

def test_dependency_fingerprint_counts_dependency_files_and_tables_only(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "a"\ndependencies = ["x"]\n')
    (tmp_path / "requirements-dev.txt").write_text("pytest\n")
    (tmp_path / "app.py").write_text("")
    first = flydeploy.dependency_fingerprint(tmp_path)
    assert sorted(first["files"]) == ["pyproject.toml", "requirements-dev.txt"]
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "b"\ndependencies = ["x"]\n'
                                             '[tool.flydeploy]\ntimeout = 5\n')
    (tmp_path / "app.py").write_text("changed = 1\n")
    assert flydeploy.dependency_fingerprint(tmp_path) == first  # not dependencies
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "b"\ndependencies = ["x", "y"]\n')
    (tmp_path / "uv.lock").write_text("version = 1\n")
    changed = flydeploy.dependency_fingerprint(tmp_path)
    assert changed["sha256"] != first["sha256"]
    assert flydeploy.dependency_changes(first, changed) == ["pyproject.toml (changed)", "uv.lock (added)"]


def test_env_file(tmp_path):
    path = tmp_path / ".env"
    path.write_text('# bucket\nexport BUCKET_NAME=shop-bucket\nAWS_REGION = auto # inline\n'
                    "AWS_SECRET_ACCESS_KEY='a#b c'\nQUOTED=\"x\\ny\"\nEMPTY=\n")
    assert flydeploy_cli.read_env_file(str(path)) == {
        "BUCKET_NAME": "shop-bucket", "AWS_REGION": "auto", "AWS_SECRET_ACCESS_KEY": "a#b c",
        "QUOTED": "x\ny", "EMPTY": ""}
    path.write_text("AWS_SECRET_ACCESS_KEY='unterminated\n")
    with pytest.raises(flydeploy.ConfigError, match=r"line 1: not NAME=VALUE") as caught:
        flydeploy_cli.read_env_file(str(path))
    assert "unterminated" not in str(caught.value)  # a value is never shown


# --- end to end on the local Fly -------------------------------------------------

def env_file_for(project, tmp_path):
    path = tmp_path / "bucket.env"
    path.write_text("".join(f"{name}={value}\n" for name, value in project.seaweed.env().items()))
    return path


def test_direct_dry_run_lock_and_missing_credentials(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    (machine,) = project.machines
    project.edit(V2)
    keys_before = project.release_keys()
    doc_before = flydeploy.read_current(seaweed.client(), project.name)[0]

    dry = project.cli("hot", "--direct", "--dry-run", "--env-file", str(env_file_for(project, tmp_path)))
    assert dry.returncode == 0, dry.output
    assert "release from" in dry.stdout and "4 files" in dry.stdout and "largest: " in dry.stdout, dry.stdout
    assert "run the upgrade from here" in dry.stdout and "Nothing was built" in dry.stdout
    assert project.release_keys() == keys_before  # no release, no lock, current.json as it was
    assert flydeploy.read_current(seaweed.client(), project.name)[0] == doc_before
    assert get(machine) == ("hello v1", "count-v1:0")

    missing = project.cli("hot", "--direct")  # no bucket credentials on this side
    assert missing.returncode == 2, missing.output
    assert "Traceback" not in missing.output
    for words in ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, BUCKET_NAME are not set", "--env-file",
                  "fly storage dashboard", f"fly secrets list -a {project.name}"):
        assert words in missing.stderr, missing.stderr
    fakefly.logout()
    no_token = project.cli("hot", "--direct", local_s3=True)
    assert no_token.returncode == 2 and "Traceback" not in no_token.output
    assert "fly auth login" in no_token.stderr and "FLY_API_TOKEN" in no_token.stderr
    fakefly.login()
    assert project.release_keys() == keys_before and get(machine) == ("hello v1", "count-v1:0")

    flydeploy.acquire_lock(seaweed.client(), project.name, owner="bob@example.com",
                           deployment_id="other", timeout_s=600)
    held = project.cli("hot", "--direct", local_s3=True)
    assert held.returncode == 2, held.output
    assert "bob@example.com" in held.output and get(machine) == ("hello v1", "count-v1:0")
    forced = project.cli("hot", "--direct", "--force", local_s3=True)
    assert forced.returncode == 0, forced.output
    assert get(machine) == ("hello v2", "count-v2:0")
    assert f"releases/{project.name}-deploy.lock" not in project.release_keys()

    status = project.cli("status", "--direct", "--json", local_s3=True)
    assert status.returncode == 0, status.output
    (row,) = json.loads(status.stdout)
    assert row["verdict"] == "✓ up to date"
    doctor = project.cli("doctor", "--direct", local_s3=True)
    assert "✓ bucket from here (--direct)" in doctor.stdout and "✓ local tree (--direct)" in doctor.stdout, \
        doctor.output
    doctor = project.cli("doctor", "--direct")
    assert doctor.returncode == 1 and "✗ bucket from here (--direct)" in doctor.stdout, doctor.output


@pytest.mark.parametrize("ignorefile", [None, "deploy/hot.ignore"], ids=["dockerignore", "fly_toml_ignorefile"])
def test_direct_honours_dockerignore(fakefly, seaweed, tmp_path, ignorefile):
    project = Project(fakefly, seaweed, tmp_path, machines=1)
    (machine,) = project.machines
    for _ in range(2):
        get(machine, "/bump")
    rules = {".dockerignore": "# local only\ngreet.py\n"}
    if ignorefile:  # fly.toml names the ignore file: .dockerignore is not read (here it would keep counter.py out)
        (project.tree / "deploy").mkdir()
        rules = {ignorefile: "# local only\ngreet.py\n", ".dockerignore": "counter.py\n"}
        fly_toml = project.tree / "fly.toml"
        fly_toml.write_text(fly_toml.read_text() + f'\n[build]\n  ignorefile = "{ignorefile}"\n')
    project.edit({**V2, **rules})
    hot = project.cli("hot", "--direct", "--version", "d2", local_s3=True)
    assert hot.returncode == 0, hot.output
    assert (f"({ignorefile} honoured: fly.toml [build] ignorefile)" if ignorefile
            else "(.dockerignore honoured)") in hot.output, hot.output
    assert ("would differ for 2 files: counter.py, greet.py" in hot.output) is bool(ignorefile), hot.output
    # counter.py is the new one, state migrated; greet.py never reached the image build, nor the release
    assert get(machine) == ("hello v1", "count-v2:2")
    archive = tmp_path / "d2.tar.gz"
    seaweed.client().download(f"releases/{project.name}-d2.tar.gz", str(archive))
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile(flydeploy.MANIFEST_NAME))
    assert "greet.py" not in manifest["files"] and "counter.py" in manifest["files"]
    assert manifest["source_image_ref"] == project.image


def test_direct_refuses_a_tree_that_cannot_be_what_the_machines_run(fakefly, seaweed, tmp_path):
    project = Project(fakefly, seaweed, tmp_path, machines=1, files={"requirements.txt": REQUIREMENTS})
    (machine,) = project.machines
    project.edit(V2)
    keys_before = project.release_keys()

    pyproject = project.tree / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + 'generated = ["static/app.css"]\n')
    generated = project.cli("hot", "--direct", local_s3=True)
    assert generated.returncode == 1, generated.output
    assert "static/app.css is made by the image build" in generated.stderr

    (project.tree / "static").mkdir()
    (project.tree / "static" / "app.css").write_text("body {}\n")
    (project.tree / "requirements.txt").write_text(REQUIREMENTS + "rich==13.9.4\n")
    changed = project.cli("hot", "--direct", local_s3=True)
    assert changed.returncode == 1, changed.output
    assert "requirements.txt (changed)" in changed.stderr
    assert "A dependency change needs `fly deploy`" in changed.stderr
    assert project.release_keys() == keys_before and get(machine) == ("hello v1", "count-v1:0")

    (project.tree / "requirements.txt").write_text(REQUIREMENTS)  # a settings change is no dependency change
    ok = project.cli("hot", "--direct", local_s3=True)
    assert ok.returncode == 0, ok.output
    assert get(machine) == ("hello v2", "count-v2:0")
