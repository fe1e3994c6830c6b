"""Real libraries upgraded in place between published releases: after
``reload_modules()`` reports ok, the new release's own suite gives the same
outcome for every test as in a fresh interpreter, and objects held across the
upgrade are still the modules' objects (see ``realcode_harness``)."""

from __future__ import annotations

import os

import pytest

import realcode_harness
from conftest import ROWS

# Cases that fail for reasons the engine does not handle yet, each with why
# (the items of the issue "The engine on real code" that name them).
RAISES = ("reload_modules raises TypeError from the instance-attribute walk meeting a "
          "plain object() sentinel (item 1)")
KNOWN = {
    "cachetools": RAISES,
    "markupsafe": RAISES,
    "marshmallow": RAISES,
    "jinja2": RAISES + "; then a template's runtime-error traceback keeps an internal frame: "
                       "@internalcode records each function's __code__ in a set, and the "
                       "in-place swap gives the function a code object the set does not hold "
                       "(decorator side effects keyed by code objects, items 5 and 6)",
    "six": RAISES + "; then six.moves is gone: the unchanged meta_path registration line is "
                    "not run again after the changed removal loop (item 3)",
    "python-dateutil": RAISES + "; then rrule's unchanged `del` of a kept tuple runs again and "
                                "the upgrade is refused (item 4)",
    "more-itertools": "the unchanged `from .more import *` of the package is not run again, "
                      "so names more gained are missing from more_itertools (item 2)",
}


def _params() -> list:
    params = []
    for lib in realcode_harness.LIBRARIES:
        marks = []
        if lib.dist in KNOWN:
            marks.append(pytest.mark.xfail(reason=KNOWN[lib.dist], strict=True))
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
