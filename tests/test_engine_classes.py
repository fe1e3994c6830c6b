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


# --- live instances the new code needs migrated -----------------------------------


CACHE = """
class Cache:
    def __init__(self, size):
        self.size = size
        self.items = {{}}{more_init}
    def put(self, key, value):
        self.items[key] = value{more_put}
{hook}
LIVE = [Cache(2), Cache(3)]
"""
MORE_INIT = "\n        self.hits = 0"
MORE_PUT = "\n        self.hits += 1\n        return self.hits"


def test_instances_lacking_what_the_new_init_sets_are_refused_with_how_to_fix(tree):
    tree.write("m.py", CACHE.format(more_init="", more_put="", hook=""))
    m = tree.load("m")
    tree.write("m.py", CACHE.format(more_init=MORE_INIT, more_put=MORE_PUT, hook=""))
    error = refused(tree)
    assert (f"class {tree.name('m')}.Cache: its new code reads self.hits, which its old "
            "__init__ never set, and 2 live instance(s) lack it") in error
    assert "def __hot_migrate__(self, old): self.hits = ..." in error
    assert "hits" not in vars(m.LIVE[0])


def test_hot_migrate_runs_on_each_live_instance_with_the_old_class(tree):
    tree.write("m.py", CACHE.format(more_init="", more_put="", hook=""))
    m = tree.load("m")
    first, put = m.LIVE[0], m.LIVE[0].put
    hook = """
    def __hot_migrate__(self, old):
        self.hits = len(self.items)
        self.old_put = old["put"].__name__
"""
    tree.write("m.py", CACHE.format(more_init=MORE_INIT, more_put=MORE_PUT, hook=hook))
    upgraded(tree)
    assert put("k", 1) == 1 and put("j", 2) == 2 and first.old_put == "put"
    assert m.LIVE[1].put("k", 1) == 1


def test_class_defaults_and_dataclass_fields_with_defaults_need_no_hook(tree):
    tree.write("m.py", """
        import dataclasses
        class Cache:
            def __init__(self):
                self.items = {}
        @dataclasses.dataclass
        class Point:
            x: int
        LIVE = [Cache(), Point(1)]
    """)
    m = tree.load("m")
    cache, point = m.LIVE
    tree.write("m.py", """
        import dataclasses
        class Cache:
            hits = 0
            def __init__(self):
                self.items = {}
                self.hits = 0
            def hit(self):
                self.hits += 1
                return self.hits
        @dataclasses.dataclass
        class Point:
            x: int
            y: int = 5
            tags: list = dataclasses.field(default_factory=list)
            def total(self):
                self.tags.append("t")
                return self.x + self.y
        LIVE = [Cache(), Point(1)]
    """)
    upgraded(tree)
    assert cache.hit() == 1 and point.total() == 6 and point.tags == ["t"]
    assert point == m.Point(1, 5, ["t"])


def test_dataclass_field_without_default_is_refused_without_a_hook(tree):
    tree.write("m.py", "import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\n"
                       "LIVE = P(1)\n")
    tree.load("m")
    tree.write("m.py", "import dataclasses\n@dataclasses.dataclass\nclass P:\n    x: int\n"
                       "    y: int\nLIVE = P(1, 2)\n")
    assert "reads self.y, which its old __init__ never set, and 1 live instance(s)" in refused(tree)


def test_a_hook_that_leaves_an_instance_unusable_rolls_everything_back(tree):
    tree.write("m.py", CACHE.format(more_init="", more_put="", hook=""))
    m = tree.load("m")
    first = m.LIVE[0]
    hook = """
    def __hot_migrate__(self, old):
        self.touched = True
        if self.size == 3:
            return
        self.hits = 0
"""
    tree.write("m.py", CACHE.format(more_init=MORE_INIT, more_put=MORE_PUT, hook=hook))
    report = tree.reload()
    assert not report.ok and report.rolled_back
    assert "Cache.__hot_migrate__ left a live instance without self.hits" in report.error
    assert vars(first) == {"size": 2, "items": {}} and first.put("k", 1) is None


def test_class_becoming_a_protocol_with_nothing_holding_it_is_made_anew(tree):
    tree.write("m.py", "class Base:\n    def f(self):\n        return 1\n")
    tree.load("m")
    tree.write("m.py", """
        import typing
        class Base(typing.Protocol):
            def f(self):
                return 2
        class More(Base, typing.Protocol):
            def g(self):
                return 3
    """)
    report = upgraded(tree)
    m = tree.load("m")
    assert f"{tree.name('m')}.Base" in report.replaced and m.Base in m.More.__mro__


def test_attributes_set_lazily_outside_init_need_no_hook(tree):
    tree.write("m.py", "class C:\n    def __init__(self):\n        self.a = 1\nLIVE = C()\n")
    m = tree.load("m")
    tree.write("m.py", """
        class C:
            def __init__(self):
                self.a = 1
            def cached(self):
                if not hasattr(self, "_memo"):
                    self._memo = self.a * 2
                return self._memo
        LIVE = C()
    """)
    upgraded(tree)
    assert m.LIVE.cached() == 2
