"""Classes on real code: base lists judged by what they resolve to, slots by
their names, overloaded and re-registered names, and live instances that new
code needs migrated (``__hot_migrate__``)."""

from __future__ import annotations

import pytest

from tests.engine_tree import tree  # noqa: F401  (the fixture)


def upgraded(tree, *modules):
    report = tree.reload(*modules)
    assert report.ok, report.error
    return report


def refused(tree, *modules):
    report = tree.reload(*modules)
    assert not report.ok and not report.rolled_back, report
    return report.error


# --- base lists, metaclasses and slots ------------------------------------------


def test_object_base_spelled_or_not_is_the_same_class(tree):
    tree.write("m.py", """
        class Loader(object):
            def find(self):
                return "old"
        class Sub(Loader):
            pass
        LIVE = [Loader(), Sub()]
    """)
    m = tree.load("m")
    loader, cls = m.LIVE[0], m.Loader
    tree.write("m.py", """
        class Loader:
            def find(self):
                return "new"
        class Sub(Loader):
            pass
        LIVE = [Loader(), Sub()]
    """)
    upgraded(tree)
    assert m.Loader is cls and isinstance(loader, m.Loader)
    assert loader.find() == "new" and m.Sub().find() == "new"


def test_generic_and_protocol_added_as_bases_keep_the_live_class(tree):
    tree.write("m.py", """
        import typing
        T = typing.TypeVar("T")
        class Box:
            def get(self):
                return "old"
        class Shape:
            def area(self):
                return 0
        LIVE = [Box(), Shape()]
    """)
    m = tree.load("m")
    box, shape, Box = m.LIVE[0], m.LIVE[1], m.Box
    tree.write("m.py", """
        import typing
        T = typing.TypeVar("T")
        class Box(typing.Generic[T]):
            def get(self):
                return "new"
        class Shape(typing.Protocol):
            def area(self):
                return 1
        LIVE = [Box(), Shape()]
    """)
    upgraded(tree)
    assert m.Box is Box and box.get() == "new" and shape.area() == 1
    assert m.Box[int]().get() == "new" and m.Box.__parameters__ == (m.T,)


def test_slots_reordered_is_no_layout_change(tree):
    tree.write("m.py", """
        class P:
            __slots__ = ("x", "y")
            def __init__(self):
                self.x, self.y = 1, 2
            def total(self):
                return self.x + self.y
        LIVE = P()
    """)
    m = tree.load("m")
    point = m.LIVE
    tree.write("m.py", """
        class P:
            __slots__ = ["y", "x"]
            def __init__(self):
                self.x, self.y = 1, 2
            def total(self):
                return 10 * (self.x + self.y)
        LIVE = P()
    """)
    upgraded(tree)
    assert point.total() == 30 and isinstance(point, m.P)


@pytest.mark.parametrize("old, new, what", [
    ("class A:\n    pass\nclass B:\n    pass\nclass C(A):", "class A:\n    pass\nclass B:\n"
     "    pass\nclass C(B):", "its base list (A -> B)"),
    ("class C:\n    __slots__ = ('x',)", "class C:\n    __slots__ = ('x', 'y')",
     "its __slots__ (['x'] -> ['x', 'y'])"),
    ("import abc\nclass C:", "import abc\nclass C(metaclass=abc.ABCMeta):",
     "its metaclass (type -> ABCMeta)"),
], ids=["bases", "slots", "metaclass"])
def test_real_layout_change_with_live_instances_is_refused_with_what_to_do(tree, old, new, what):
    tree.write("m.py", old + "\n    def f(self):\n        return 1\nLIVE = C()\n")
    tree.load("m")
    tree.write("m.py", new + "\n    def f(self):\n        return 2\nLIVE = C()\n")
    error = refused(tree)
    assert f"class {tree.name('m')}.C changed {what} and has 1 live instance(s)" in error
    assert "to upgrade it in place" in error and "__hot_upgrade__" in error
