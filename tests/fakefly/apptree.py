"""App project trees for the fake Fly: a fly.toml, the app's files, a vendored flydeploy.py."""

from __future__ import annotations

import pathlib
import shutil

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
