"""Fixes found by the review of fleet orchestration and the command line:
re-runs, settings plumbing, the lock's renewal, process groups, suspended
machines, the launch and rollback."""

import io

import pytest

import flydeploy
from tests.test_cli import StubMachines, app_root, lock_key_exists, machine, store, succeed, write  # noqa: F401


def orchestrate(store, api, root, image="registry.fly.io/shop:l1", **options):
    out = io.StringIO()
    options.setdefault("version", "v1")
    report = flydeploy.orchestrate("shop", image, store=store, api=api, root=root, self_id="orch",
                                   out=out, **options)
    return report, out.getvalue()


def test_rerunning_a_version_from_another_image_reuses_the_stored_release(store, app_root):
    api = StubMachines([machine("a")], succeed)
    first, _ = orchestrate(store, api, app_root, image="registry.fly.io/shop:l1")
    again, out = orchestrate(store, api, app_root, image="registry.fly.io/shop:l2")
    assert not again.uploaded and "already stored" in out
    assert again.sha256 == first.sha256 and again.exit_code == 0
    hot = flydeploy.read_current(store, "shop")[0]["hot_upgrade"]
    assert hot["sha256"] == first.sha256 and hot["source_image_ref"] == "registry.fly.io/shop:l1"
    write(app_root / "shop" / "__init__.py", "VERSION = 2\n")
    with pytest.raises(flydeploy.FlyDeployError, match="already exists with other content"):
        orchestrate(store, api, app_root, image="registry.fly.io/shop:l3")
    assert not lock_key_exists(store)
