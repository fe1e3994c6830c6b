"""pytest fixtures for the fake Fly (see the package docstring); load with ``pytest_plugins``."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from .server import FakeFly


@pytest.fixture
def fakefly(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeFly]:
    """A fake Fly with the fake ``fly`` first on PATH; everything stopped at the end."""
    fly = FakeFly(tmp_path / "fakefly")
    try:
        env = fly.env()
        for name in ("PATH", "FLY_FLAPS_BASE_URL", "FAKEFLY_STATE_DIR"):
            monkeypatch.setenv(name, env[name])
        monkeypatch.delenv("FLY_API_TOKEN", raising=False)
        monkeypatch.delenv("FLY_ACCESS_TOKEN", raising=False)
        yield fly
    finally:
        fly.close()
