"""An upgrade reported ok behaves like a fresh import of the new code.

Each test builds a real package, imports it, edits its files, upgrades it
with ``flydeploy.reload_modules`` and compares what the modules hold with
what a fresh import of the new code gives.
"""

from __future__ import annotations

import flydeploy
from tests.engine_tree import tree  # noqa: F401  (the fixture)


def upgraded(tree, *modules, **options):
    report = tree.reload(*modules, **options)
    assert report.ok, report.error
    return report


# --- 1. never a traceback, whatever the live objects are ----------------------


ODD_OBJECTS = """
import sys
_MISSING = object()
class Slotted:
    __slots__ = ("fn",)
    def __init__(self, fn):
        self.fn = fn
class Raising:
    def __getattr__(self, name):
        raise RuntimeError("no attributes here")
class BadDict:
    @property
    def __dict__(self):
        raise RuntimeError("no dict either")
    __wrapped__ = property(lambda self: 1 / 0)
if sys.version_info < (3,):
    def never():
        return {value!r}
def slotted(fn):
    return Slotted(fn)
def sentinel(fn):
    return _MISSING
def raising(fn):
    return Raising()
def bad_dict(fn):
    return BadDict()
@slotted
def a():
    return {value!r}
@sentinel
def b():
    return {value!r}
@raising
def c():
    return {value!r}
@bad_dict
def d():
    return {value!r}
class Holder:
    @sentinel
    def method(self):
        return {value!r}
del Holder.method
"""


def test_sentinels_slotted_raising_and_missing_bindings_get_a_report(tree):
    tree.write("m.py", ODD_OBJECTS.format(value=1))
    m = tree.load("m")
    sentinel = m._MISSING
    tree.write("m.py", ODD_OBJECTS.format(value=2))
    report = upgraded(tree)
    assert m._MISSING is sentinel and m.b is sentinel
    assert m.a.fn() == 2 and not hasattr(m, "never")


def test_an_unforeseen_error_while_preparing_is_a_refusal_not_a_traceback(tree, monkeypatch):
    tree.write("m.py", "def f():\n    return 1\n")
    m = tree.load("m")
    tree.write("m.py", "def f():\n    return 2\n")

    def broken(*args, **kwargs):
        raise TypeError("an object nobody foresaw")

    monkeypatch.setattr(flydeploy, "_find_function", broken)
    report = tree.reload()
    assert not report.ok and report.failed_module == tree.name("m") and m.f() == 1
    assert "an object nobody foresaw" in report.error and "nothing was changed" in report.error
