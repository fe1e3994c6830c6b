"""Real libraries upgraded in place between published releases: after
``reload_modules()`` reports ok, the new release's own suite gives the same
outcome for every test as in a fresh interpreter, and objects held across the
upgrade are still the modules' objects (see ``realcode_harness``)."""

from __future__ import annotations

import os

import pytest

import realcode_harness
from conftest import ROWS


def _params() -> list:
    params = []
    for lib in realcode_harness.LIBRARIES:
        marks = []
        if lib.slow:
            marks.append(pytest.mark.realcode_slow)
            if os.environ.get("FLYDEPLOY_REALCODE_ALL") != "1":
                marks.append(pytest.mark.skip(reason="slow suite: FLYDEPLOY_REALCODE_ALL=1 runs it"))
        params.append(pytest.param(lib, id=lib.dist, marks=marks))
    return params


@pytest.fixture(scope="module")
def downloaded():
    """Every release of the libraries this run tests, fetched once, in parallel."""
    everything = os.environ.get("FLYDEPLOY_REALCODE_ALL") == "1"
    realcode_harness.prefetch([lib for lib in realcode_harness.LIBRARIES
                               if everything or not lib.slow])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("lib", _params())
def test_upgrade_behaves_like_a_fresh_import(lib, tmp_path, downloaded):
    result = realcode_harness.run_case(lib, tmp_path)
    ROWS.append(result.row())
    assert result.ok, f"{lib.name}:\n{result.problems()}"
