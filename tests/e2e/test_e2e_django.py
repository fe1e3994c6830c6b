"""Django under gunicorn, flydeploy started in ``AppConfig.ready``: ``hot --local`` changes a view in the
running worker, which keeps its pid and its module state."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.e2e import examples


@pytest.fixture
def site():
    app = examples.LocalApp("site", "site-local", command=examples.SITE_COMMAND, ready="Booting worker")
    try:
        yield app.start()
    finally:
        app.close()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url + "/", timeout=10) as response:
        return json.loads(response.read())


def test_django_view_upgraded_in_place(site):
    first = _get(site.url)
    assert first["version"] == "v1" and _get(site.url)["visits"] == first["visits"] + 1
    examples.to_v2("site", site.root)
    result = site.cli("hot", "--version", "v2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 process" in result.stdout, result.stdout
    after = _get(site.url)
    assert after == {"version": "v2", "pid": first["pid"], "visits": first["visits"] + 2, "path": "/"}
