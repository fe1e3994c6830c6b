"""pytest fixtures for the fake Fly (see the package docstring)."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator

import pytest

from .server import FakeFly

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def write_app_tree(root: pathlib.Path, files: dict[str, str], *, app: str,
                   processes: dict[str, str] | None = None, env: dict[str, str] | None = None,
                   primary_region: str = "ams", vendor_flydeploy: bool = True) -> pathlib.Path:
    """Write an app project: ``files`` (relative path -> text), a fly.toml, flydeploy.py.

    ``fly.toml`` is only written when ``files`` has none.  Returns ``root``.
    """
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if "fly.toml" not in files:
        lines = [f"app = {_toml_value(app)}", f"primary_region = {_toml_value(primary_region)}", ""]
        if env:
            lines += ["[env]"] + [f"  {k} = {_toml_value(v)}" for k, v in env.items()] + [""]
        if processes:
            lines += ["[processes]"] + [f"  {k} = {_toml_value(v)}" for k, v in processes.items()] + [""]
        (root / "fly.toml").write_text("\n".join(lines))
    if vendor_flydeploy:
        shutil.copy2(REPO_ROOT / "flydeploy.py", root / "flydeploy.py")
    return root


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
