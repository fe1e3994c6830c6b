"""A real web app's git history replayed as hot upgrades, each step compared with a cold start
(``tests/e2e/replay_history.py``).  Runs when ``FLYDEPLOY_REPLAY_REPO`` names a local clone of a
Flask app laid out like microblog and ``FLYDEPLOY_REPLAY_REFS`` its refs, oldest first; skipped
otherwise, as nothing is downloaded.  A step may be refused (with a reason), never fail."""

from __future__ import annotations

import os

import pytest

from tests.e2e import replay_history

REPO = os.environ.get("FLYDEPLOY_REPLAY_REPO")
REFS = os.environ.get("FLYDEPLOY_REPLAY_REFS", "").split()


@pytest.mark.skipif(not REPO or len(REFS) < 2,
                    reason="set FLYDEPLOY_REPLAY_REPO (a local clone) and FLYDEPLOY_REPLAY_REFS (2+ refs)")
@pytest.mark.timeout(3600)
def test_replayed_history_never_serves_what_a_cold_start_would_not():
    outcomes, failed = replay_history.replay(REPO, REFS)
    report = "\n".join(f"{name}: {outcome}" for name, outcome in outcomes)
    assert all(outcome == "pass" or outcome.startswith("refused: ") for _, outcome in outcomes), report
    assert not failed, f"{len(failed)} requests failed under load\n{report}"
