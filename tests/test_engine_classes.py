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


# --- several defs of one name ---------------------------------------------------


OVERLOADED = """
    import functools
    import typing

    def variant(function):
        @functools.wraps(function)
        def wrapper(*args):
            return function(*args)
        return wrapper

    @typing.overload
    def convert(value: int) -> int: ...
    @variant
    def convert(value):
        return ({tag!r}, value)

    @typing.overload
    def parse(value: int) -> int: ...
    @typing.overload
    def parse(value: str) -> str: ...{more_stubs}
    def parse(value):
        return ({tag!r}, value)

    class Reader:
        @typing.overload
        def read(self, n: int) -> bytes: ...
        @typing.overload
        def read(self, n: None) -> bytes: ...
        def read(self, n):
            return {tag!r}
"""


def test_overloaded_function_and_method_keep_identity_and_take_new_code(tree):
    tree.write("m.py", OVERLOADED.format(tag="old", more_stubs=""))
    m = tree.load("m")
    parse, reader, convert = m.parse, m.Reader(), m.convert
    registry, read = [m.parse], reader.read
    stub = "\n    @typing.overload\n    def parse(value: bytes) -> bytes: ..."
    tree.write("m.py", OVERLOADED.format(tag="new", more_stubs=stub))
    upgraded(tree)
    assert m.parse is parse and registry[0](1) == ("new", 1)
    assert m.convert is convert and convert(2) == ("new", 2)
    assert read(1) == "new" and m.Reader.read is type(reader).read is read.__func__


def test_function_defined_in_both_branches_of_an_if_keeps_the_live_one(tree):
    source = """
        import sys
        if sys.version_info >= (3,):
            def b(s):
                return ({tag!r}, s)
        else:
            def b(s):
                return s
    """
    tree.write("m.py", source.format(tag="old"))
    m = tree.load("m")
    b = m.b
    tree.write("m.py", source.format(tag="new"))
    upgraded(tree)
    assert m.b is b and b("x") == ("new", "x")


def test_singledispatch_registrations_named_alike_keep_the_last_one(tree):
    source = """
        import functools

        @functools.singledispatch
        def show(value):
            return "any"

        @show.register
        def _(value: int):
            return {tag!r} + " int"

        @show.register
        def _(value: str):
            return {tag!r} + " str"
    """
    tree.write("m.py", source.format(tag="old"))
    m = tree.load("m")
    show, last = m.show, m._
    tree.write("m.py", source.format(tag="new"))
    upgraded(tree)
    assert m.show is show and m._ is last
    assert show(1) == "new int" and show("a") == "new str" and last("a") == "new str"


def test_property_accessors_over_several_defs_keep_the_property(tree):
    source = """
        class C:
            def __init__(self):
                self._v = 1
            @property
            def v(self):
                return self._v * {scale}
            @v.setter
            def v(self, value):
                self._v = value + {offset}
            @v.deleter
            def v(self):
                self._v = {offset}
    """
    tree.write("m.py", source.format(scale=1, offset=0))
    m = tree.load("m")
    prop, obj = m.C.__dict__["v"], m.C()
    setter = prop.fset
    tree.write("m.py", source.format(scale=10, offset=1))
    upgraded(tree)
    assert m.C.__dict__["v"] is prop and prop.fset is setter
    obj.v = 2
    assert obj.v == 30
    del obj.v
    assert obj.v == 10
