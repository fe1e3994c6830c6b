"""Temporary application trees for the engine tests: real files, real imports."""

from __future__ import annotations

import importlib
import itertools
import os
import pathlib
import sys
import textwrap

import flydeploy

_counter = itertools.count()


class Tree:
    """A source root on sys.path holding one uniquely named package ``pkg``.

    ``write("mod.py", text)`` writes ``<pkg>/mod.py``; ``load("mod")`` imports
    ``<pkg>.mod``; ``close()`` forgets every module of the tree.
    """

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.pkg = f"hotpkg_{os.getpid()}_{next(_counter)}"
        (root / self.pkg).mkdir(parents=True)
        (root / self.pkg / "__init__.py").write_text("")
        sys.path.insert(0, str(root))
        importlib.invalidate_caches()
        flydeploy.track(root)

    def path(self, relative: str) -> pathlib.Path:
        return self.root / self.pkg / relative

    def write(self, relative: str, text: str) -> pathlib.Path:
        path = self.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        return path

    def name(self, module: str) -> str:
        return f"{self.pkg}.{module}" if module else self.pkg

    def load(self, module: str):
        return importlib.import_module(self.name(module))

    def reload(self, *modules: str, **options) -> flydeploy.UpgradeReport:
        names = [self.name(m) for m in modules] if modules else None
        return flydeploy.reload_modules(names, **options)

    def close(self) -> None:
        for name in [n for n in sys.modules if n == self.pkg or n.startswith(self.pkg + ".")]:
            del sys.modules[name]
        sys.path.remove(str(self.root))
