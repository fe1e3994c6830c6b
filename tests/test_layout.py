"""The public API is documented and the product stays standard-library only."""

import ast
import inspect
import os
import pathlib
import subprocess
import sys

import flydeploy
import flydeploy_cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_public_name_exists_and_is_documented():
    for module in (flydeploy, flydeploy_cli):
        for name in module.__all__:
            obj = getattr(module, name)  # AttributeError names a stale __all__ entry
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert inspect.getdoc(obj), f"{module.__name__}.{name} has no docstring"


def test_product_imports_only_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"flydeploy", "flydeploy_cli", "__future__"}
    for filename in ("flydeploy.py", "flydeploy_cli.py"):
        tree = ast.parse((ROOT / filename).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{filename}:{node.lineno} imports {name}"


def test_importing_flydeploy_leaves_what_only_some_paths_need_unloaded():
    # Every machine runs `python -m flydeploy rpc` at every upgrade, and every
    # app imports flydeploy at boot: neither pays for asyncio, TOML, ...
    lazy = ["asyncio", "subprocess", "tomllib", "urllib.request", "uuid"]
    code = f"import sys, flydeploy; print([name for name in {lazy!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported by flydeploy at import time: {result.stdout}"


def test_module_docstring_maps_every_section():
    source = (ROOT / "flydeploy.py").read_text()
    banners = [line.split(". ", 1)[1].split(":")[0] for line in source.splitlines()
               if line.startswith("# ") and line[2:3].isdigit() and ". " in line]
    assert banners, "no section banners found"
    for banner in banners:
        assert banner.split()[0] in flydeploy.__doc__, f"section {banner!r} missing from the docstring map"


def test_no_module_level_name_is_defined_twice():
    tree = ast.parse((ROOT / "flydeploy.py").read_text())
    seen: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        for name in names:
            assert name not in seen, f"flydeploy.{name} defined at lines {seen[name]} and {node.lineno}"
            seen[name] = node.lineno


def test_ci_script_removes_its_virtual_environment_and_keeps_the_exit_code(tmp_path):
    # A stand-in python3 makes the "environment" and a python that fails with code 3,
    # so the script's own steps run in a second, offline.
    shims, scratch = tmp_path / "bin", tmp_path / "tmp"
    shims.mkdir()
    scratch.mkdir()
    fake_python3 = shims / "python3"
    fake_python3.write_text('#!/bin/sh\n'
                            '# python3 -m venv DIR\n'
                            'mkdir -p "$3/bin"\n'
                            'printf \'python() { return 3; }\\n\' > "$3/bin/activate"\n')
    fake_python3.chmod(0o755)
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}",
             "TMPDIR": str(scratch)})
    assert result.returncode == 3, result.stdout + result.stderr
    assert list(scratch.iterdir()) == [], "the virtual environment was left behind"
