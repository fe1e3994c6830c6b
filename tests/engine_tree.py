"""Temporary application trees for the engine tests: real files, real imports."""

from __future__ import annotations

import importlib
import itertools
import os
import pathlib
import sys
import textwrap

import pytest

import flydeploy

_counter = itertools.count()


class Tree:
    """A source root on sys.path holding one uniquely named package ``pkg``.

    ``write("mod.py", text)`` writes ``<pkg>/mod.py``; ``load("mod")`` imports
    ``<pkg>.mod``; ``start(cls, ...)`` starts a server; ``close()`` stops
    those servers and forgets every module of the tree.
    """

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.pkg = f"hotpkg_{os.getpid()}_{next(_counter)}"
        self.started: list[flydeploy.Server] = []
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

    def start(self, cls, *args, **kwargs):
        """Start a server that ``close`` stops."""
        server = cls.start(*args, **kwargs)
        self.started.append(server)
        return server

    def close(self) -> None:
        """Stop the servers started here and forget every module of the tree,
        its tracking records and its root."""
        for server in self.started:
            if server.alive:
                server.stop(timeout=10)
        for name in [n for n in sys.modules if n == self.pkg or n.startswith(self.pkg + ".")]:
            del sys.modules[name]
        tracker = flydeploy._tracker
        with tracker.lock:
            for name in [n for n in tracker.loaded if n.split(".")[0] == self.pkg]:
                del tracker.loaded[name]
            tracker.roots = tuple(r for r in tracker.roots if r != os.path.realpath(self.root))
        sys.path.remove(str(self.root))


@pytest.fixture
def tree(tmp_path):
    """A fresh application tree, closed after the test."""
    t = Tree(tmp_path / "app")
    yield t
    t.close()
