"""The in-place code swap: tracking, prepare, swap rules, refusals and rollback.

Every test builds a real package in a temporary directory, imports it, edits
its files and upgrades it with ``flydeploy.reload_modules``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import sysconfig
import threading

import pytest

import flydeploy
from tests.engine_tree import tree  # noqa: F401  (the fixture)

REPO = pathlib.Path(__file__).resolve().parent.parent


def upgraded(tree, *modules, **options):
    report = tree.reload(*modules, **options)
    assert report.ok, report.error
    return report


# --- 1. functions keep their identity -----------------------------------------


def test_aliases_callbacks_and_bound_methods_run_the_new_body(tree):
    tree.write("m.py", """
        def greet(name):
            return "hello " + name
        class Greeter:
            def greet(self):
                return "hi"
    """)
    tree.write("user.py", f"""
        from {tree.pkg}.m import greet
        callbacks = [greet]
    """)
    m, user = tree.load("m"), tree.load("user")
    original, bound = m.greet, m.Greeter().greet
    tree.write("m.py", """
        def greet(name, punctuation="!"):
            '''Greets loudly.'''
            return "HELLO " + name + punctuation
        greet.tagged = True
        class Greeter:
            def greet(self):
                return "HI"
    """)
    assert flydeploy.modified_modules() == [tree.name("m")]
    upgraded(tree)
    assert m.greet is original and user.greet is original
    assert user.greet("ann") == "HELLO ann!" and user.callbacks[0]("bo", "?") == "HELLO bo?"
    assert original.__doc__ == "Greets loudly." and original.__defaults__ == ("!",)
    assert original.tagged is True
    assert bound() == "HI"
    assert flydeploy.modified_modules() == []


def test_kwdefaults_and_annotations_are_updated(tree):
    tree.write("m.py", """
        def f(*, scale=1) -> int:
            return scale
    """)
    m = tree.load("m")
    tree.write("m.py", """
        def f(*, scale=10) -> str:
            return str(scale)
    """)
    upgraded(tree)
    assert m.f() == "10" and m.f.__kwdefaults__ == {"scale": 10}
    assert m.f.__annotations__ == {"return": str}


WRAPPED = """
import functools
calls = []
def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        calls.append(fn.__name__)
        return fn(*args)
    return wrapper
@logged
def double(x):
    return x * {factor}
"""


def test_wraps_decorated_function_keeps_wrapper_and_runs_new_inner(tree):
    tree.write("m.py", WRAPPED.format(factor=2))
    m = tree.load("m")
    wrapper, inner = m.double, m.double.__wrapped__
    tree.write("m.py", WRAPPED.format(factor=3))
    upgraded(tree)
    assert m.double is wrapper and m.double.__wrapped__ is inner
    assert wrapper(2) == 6 and m.calls[-1] == "double"


def test_closure_with_new_free_variables_is_replaced_and_reported(tree):
    tree.write("m.py", """
        def make():
            a = 1
            def inner():
                return a
            return inner
        handler = make()
    """)
    m = tree.load("m")
    old_handler = m.handler
    tree.write("m.py", """
        def make():
            a, b = 1, 2
            def inner():
                return a + b
            return inner
        handler = make()
    """)
    report = upgraded(tree)
    assert m.handler is not old_handler and m.handler() == 3
    assert f"{tree.name('m')}.handler" in report.replaced


def test_closure_factory_with_same_free_variables_keeps_identity(tree):
    tree.write("m.py", """
        def make(prefix):
            def inner(x):
                return prefix + x
            return inner
        handler = make("a")
    """)
    m = tree.load("m")
    old_handler = m.handler
    tree.write("m.py", """
        def make(prefix):
            def inner(x):
                return x + prefix
            return inner
        handler = make("b")
    """)
    report = upgraded(tree)
    assert m.handler is old_handler and old_handler("x") == "xb"
    assert report.replaced == []


def test_lru_cache_of_a_changed_function_is_cleared(tree):
    tree.write("m.py", """
        import functools
        @functools.lru_cache(maxsize=None)
        def square(x):
            return x * x
        @functools.cache
        def unchanged(x):
            return -x
    """)
    m = tree.load("m")
    cached, other = m.square, m.unchanged
    assert cached(3) == 9 and other(1) == -1
    tree.write("m.py", """
        import functools
        @functools.lru_cache(maxsize=None)
        def square(x):
            return x * x + 1
        @functools.cache
        def unchanged(x):
            return -x
    """)
    upgraded(tree)
    assert m.square is cached and cached(3) == 10
    assert m.unchanged is other and other.cache_info().currsize == 1


def dispatch_source(registered: list[str], upper: bool) -> str:
    """A singledispatch function with one implementation per named type."""
    case = str.upper if upper else str.lower
    lines = ["import functools", "@functools.singledispatch", "def show(x):",
             f"    return {case('object')!r}"]
    for name in registered:
        lines += ["@show.register", f"def _(x: {name}):", f"    return {case(name)!r}"]
    return "\n".join(lines) + "\n"


def test_singledispatch_registrations_keep_working_with_new_code(tree):
    tree.write("m.py", dispatch_source(["int", "str"], upper=False))
    tree.write("ext.py", f"""
        from {tree.pkg}.m import show
        @show.register
        def _(x: float):
            return "float from ext"
    """)
    m, _ = tree.load("m"), tree.load("ext")
    dispatcher = m.show
    tree.write("m.py", dispatch_source(["int", "str", "bytes"], upper=True))
    upgraded(tree, "m")
    assert m.show is dispatcher
    assert [dispatcher(v) for v in (1, "s", b"b", 1.5, None)] == [
        "INT", "STR", "BYTES", "float from ext", "OBJECT"]


def test_thread_inside_old_function_finishes_old_code_then_takes_new(tree):
    tree.write("m.py", """
        import threading
        entered = threading.Event()
        proceed = threading.Event()
        def work():
            entered.set()
            proceed.wait(30)
            return "old"
    """)
    m = tree.load("m")
    results = []
    worker = threading.Thread(target=lambda: results.append(m.work()))
    worker.start()
    assert m.entered.wait(30)
    tree.write("m.py", """
        import threading
        entered = threading.Event()
        proceed = threading.Event()
        def work():
            return "new"
    """)
    upgraded(tree)
    m.proceed.set()
    worker.join(30)
    assert results == ["old"] and m.work() == "new"


def test_coroutine_functions_and_a_suspended_generator(tree):
    source = "async def fetch():\n    return {0!r}\ndef numbers():\n    yield {1}\n    yield {2}\n"
    tree.write("m.py", source.format("old", 1, 2))
    m = tree.load("m")
    fetch, running = m.fetch, m.numbers()
    assert next(running) == 1
    tree.write("m.py", source.format("new", 10, 20))
    upgraded(tree)
    assert m.fetch is fetch and asyncio.run(fetch()) == "new"
    assert next(running) == 2  # a running generator finishes its old code
    assert list(m.numbers()) == [10, 20]


# --- 2. classes keep their identity ---------------------------------------------


def test_methods_on_live_instances_added_changed_removed(tree):
    tree.write("m.py", """
        class Account:
            fee = 1
            def __init__(self, balance):
                self.balance = balance
            def describe(self):
                return f"balance {self.balance}"
            def obsolete(self):
                return 1
    """)
    m = tree.load("m")
    cls = m.Account
    account = cls(10)
    tree.write("m.py", """
        class Account:
            fee = 2
            def __init__(self, balance):
                self.balance = balance
            def describe(self):
                return f"{self.balance} minus {self.fee}"
            def net(self):
                return self.balance - self.fee
    """)
    upgraded(tree)
    assert m.Account is cls and isinstance(account, m.Account)
    assert account.describe() == "10 minus 2" and account.net() == 8
    assert not hasattr(account, "obsolete")


BOX = """
class Box:
    def __init__(self):
        self._v = 1
    @classmethod
    def make(cls):
        return ({tag!r}, cls)
    @staticmethod
    def unit():
        return {tag!r}
    @property
    def value(self):
        return self._v * {scale}
{setter}"""
SETTER = """
    @value.setter
    def value(self, v):
        self._v = v
"""


def test_classmethod_staticmethod_property_and_new_setter(tree):
    tree.write("m.py", BOX.format(tag="old", scale=1, setter=""))
    m = tree.load("m")
    box, make = m.Box(), m.Box.make
    tree.write("m.py", BOX.format(tag="new", scale=100, setter=SETTER))
    upgraded(tree)
    assert make() == ("new", m.Box) and m.Box.unit() == "new"
    assert box.value == 100
    box.value = 3
    assert box.value == 300


def test_property_setter_removed_and_added_again(tree):
    with_setter = """
        class C:
            @property
            def x(self):
                return {value!r}
            @x.setter
            def x(self, value):
                self.stored = value
    """
    without_setter = "class C:\n    @property\n    def x(self):\n        return 'plain'\n"
    tree.write("m.py", with_setter.format(value="old"))
    m = tree.load("m")
    instance = m.C()
    tree.write("m.py", without_setter)
    upgraded(tree)
    assert instance.x == "plain"
    with pytest.raises(AttributeError):
        instance.x = 1
    tree.write("m.py", with_setter.format(value="again"))
    upgraded(tree)
    instance.x = 2
    assert instance.x == "again" and instance.stored == 2


def test_super_works_in_new_and_changed_methods(tree):
    tree.write("m.py", """
        class Base:
            def hello(self):
                return "base"
        class Child(Base):
            def hello(self):
                return "child"
    """)
    m = tree.load("m")
    child = m.Child()
    tree.write("m.py", """
        class Base:
            def hello(self):
                return "BASE"
        class Child(Base):
            def hello(self):
                return "child+" + super().hello()
            def extra(self):
                return super().hello().lower()
    """)
    report = upgraded(tree)
    assert child.hello() == "child+BASE" and child.extra() == "base"
    assert isinstance(child, m.Base)
    assert report.replaced == [f"{tree.name('m')}.Child.hello"]  # it gained a __class__ cell


def test_subclass_in_other_module_isinstance_and_pickle(tree):
    tree.write("base.py", """
        class Shape:
            def area(self):
                return 0
            def describe(self):
                return f"area {self.area()}"
    """)
    tree.write("other.py", f"""
        from {tree.pkg}.base import Shape
        class Square(Shape):
            def __init__(self, side):
                self.side = side
            def area(self):
                return self.side ** 2
    """)
    base, other = tree.load("base"), tree.load("other")
    square, held = other.Square(3), base.Shape
    tree.write("base.py", """
        class Shape:
            def area(self):
                return 0
            def describe(self):
                return f"AREA={self.area()}"
    """)
    upgraded(tree)
    assert isinstance(square, held) and base.Shape is held
    assert square.describe() == "AREA=9"
    clone = pickle.loads(pickle.dumps(square))
    assert type(clone) is other.Square and clone.describe() == "AREA=9"


def test_init_subclass_registry_keeps_one_entry_per_class(tree):
    tree.write("base.py", """
        class Plugin:
            registry = []
            def __init_subclass__(cls, **kwargs):
                super().__init_subclass__(**kwargs)
                Plugin.registry.append(cls)
    """)
    tree.write("plugins.py", f"""
        from {tree.pkg}.base import Plugin
        class Alpha(Plugin):
            def run(self):
                return "a"
    """)
    base, plugins = tree.load("base"), tree.load("plugins")
    alpha = plugins.Alpha
    tree.write("plugins.py", f"""
        from {tree.pkg}.base import Plugin
        class Alpha(Plugin):
            def run(self):
                return "A"
        class Beta(Plugin):
            def run(self):
                return "B"
    """)
    upgraded(tree)
    assert base.Plugin.registry == [alpha, plugins.Beta]
    assert [cls().run() for cls in base.Plugin.registry] == ["A", "B"]


def test_dataclass_gets_new_field_and_generated_methods(tree):
    tree.write("m.py", """
        import dataclasses
        @dataclasses.dataclass
        class Point:
            x: int
            y: int = 0
    """)
    m = tree.load("m")
    cls, old_point = m.Point, m.Point(1, 2)
    tree.write("m.py", """
        import dataclasses
        @dataclasses.dataclass(frozen=False, order=True)
        class Point:
            x: int
            y: int = 0
            z: int = 7
            def norm1(self):
                return self.x + self.y + self.z
    """)
    upgraded(tree)
    assert m.Point is cls
    fresh = m.Point(1, 2, 3)
    assert fresh.z == 3 and old_point.z == 7 and old_point.norm1() == 10
    assert repr(fresh) == "Point(x=1, y=2, z=3)"
    assert [f.name for f in dataclasses.fields(cls)] == ["x", "y", "z"]
    assert m.Point(0, 0, 0) < fresh


def test_enum_methods_change_in_place(tree):
    tree.write("m.py", """
        import enum
        class Color(enum.Enum):
            RED = 1
            BLUE = 2
            def label(self):
                return self.name.lower()
    """)
    m = tree.load("m")
    red = m.Color.RED
    tree.write("m.py", """
        import enum
        class Color(enum.Enum):
            RED = 1
            BLUE = 2
            def label(self):
                return self.name.title()
    """)
    upgraded(tree)
    assert m.Color.RED is red and red.label() == "Red" and m.Color(2) is m.Color.BLUE


def test_abstract_methods_are_recomputed(tree):
    tree.write("m.py", """
        import abc
        class Port(abc.ABC):
            @abc.abstractmethod
            def send(self): ...
    """)
    m = tree.load("m")
    tree.write("m.py", """
        import abc
        class Port(abc.ABC):
            def send(self):
                return "sent"
    """)
    with pytest.raises(TypeError):
        m.Port()
    upgraded(tree)
    assert m.Port().send() == "sent"


# --- 3. module state ----------------------------------------------------------


def test_counter_kept_on_unrelated_edit_and_changed_initialiser_taken(tree):
    tree.write("m.py", """
        counter = 0
        limit = 10
        cache = {}
        def bump():
            global counter
            counter += 1
            return counter
    """)
    m = tree.load("m")
    for _ in range(3):
        m.bump()
    m.cache["k"] = "v"
    tree.write("m.py", """
        # an unrelated edit moves every line
        counter = 0
        limit = 20
        cache = {}
        def bump():
            global counter
            counter += 10
            return counter
    """)
    upgraded(tree)
    assert m.counter == 3 and m.cache == {"k": "v"} and m.limit == 20
    assert m.bump() == 13


def test_unchanged_module_level_actions_are_not_repeated(tree):
    # Actions on other objects than the changed statement's stay done once;
    # calling a module's functions changes no shared object.
    tree.write("trace.py", "events = []\nlog = []\ndef note(event):\n    events.append(event)\n")
    body = """
        from {pkg} import trace
        trace.events.append("registered")
        trace.note("noted")
        trace.log.append({extra!r})
        trace.note({extra!r})
        LIMIT = 3
        def f():
            return {result!r}
    """
    tree.write("m.py", body.format(pkg=tree.pkg, extra="first", result="old"))
    m, trace = tree.load("m"), tree.load("trace")
    tree.write("m.py", body.format(pkg=tree.pkg, extra="second", result="new"))
    upgraded(tree, "m")
    assert trace.events == ["registered", "noted", "first", "second"]
    assert trace.log == ["first", "second"]
    assert m.f() == "new"


def test_hot_keep_and_hot_upgrade(tree):
    tree.write("m.py", """
        carts = {}
        totals = [1, 2]
    """)
    m = tree.load("m")
    m.carts["a"] = 1
    kept = m.carts
    tree.write("m.py", """
        __hot_keep__ = ("carts",)
        carts = {"fresh": True}
        totals = (0,)
        total = 0
        def __hot_upgrade__(old_globals):
            global total
            total = sum(old_globals["totals"])
    """)
    upgraded(tree)
    assert m.carts is kept and m.carts == {"a": 1}
    assert m.totals == (0,) and m.total == 3


def test_added_and_removed_names(tree):
    tree.write("m.py", """
        import json
        def old_helper():
            return 1
        OLD = 1
    """)
    m = tree.load("m")
    m.runtime_attribute = "set by the app"
    tree.write("m.py", """
        def new_helper():
            return 2
        NEW = 2
    """)
    report = upgraded(tree)
    assert not hasattr(m, "old_helper") and not hasattr(m, "OLD") and not hasattr(m, "json")
    assert m.new_helper() == 2 and m.NEW == 2
    assert m.runtime_attribute == "set by the app"
    assert sorted(report.added) == [f"{tree.name('m')}.NEW", f"{tree.name('m')}.new_helper"]


def test_data_statement_change_reuses_function_identity(tree):
    tree.write("m.py", """
        def a():
            return "a"
        HANDLERS = {"a": a}
    """)
    m = tree.load("m")
    a = m.a
    tree.write("m.py", """
        def a():
            return "A"
        def b():
            return "B"
        HANDLERS = {"a": a, "b": b}
    """)
    upgraded(tree)
    assert m.HANDLERS["a"] is a and m.HANDLERS["b"]() == "B" and a() == "A"


# --- 7. packages, 8. new modules and bytecode caches ----------------------------


def test_package_reexports_stay_the_implementation_objects(tree):
    tree.write("trace.py", "events = []\n")
    tree.write("svc/__init__.py", f"""
        from {tree.pkg} import trace
        trace.events.append("init")
        from .impl import Service, helper
    """)
    tree.write("svc/impl.py", """
        class Service:
            def run(self):
                return "old"
        def helper():
            return 1
    """)
    svc, trace = tree.load("svc"), tree.load("trace")
    service_cls, helper = svc.Service, svc.helper
    tree.write("svc/impl.py", """
        class Service:
            def run(self):
                return "new"
        def helper():
            return 2
    """)
    report = upgraded(tree)
    assert report.modules == [tree.name("svc.impl")]
    assert trace.events == ["init"]  # the unchanged __init__.py did not run again
    assert svc.Service is service_cls is tree.load("svc.impl").Service
    assert svc.helper is helper and helper() == 2 and svc.Service().run() == "new"


def test_reexport_of_a_rebuilt_class_follows_it(tree):
    tree.write("svc/__init__.py", "from .impl import Config\n")
    tree.write("svc/impl.py", "class Config:\n    __slots__ = ('a',)\n")
    svc = tree.load("svc")
    old = svc.Config
    tree.write("svc/impl.py", "class Config:\n    __slots__ = ('a', 'b')\n")
    report = upgraded(tree)  # the package imports a new class: it runs again
    assert report.modules == [tree.name("svc.impl"), tree.name("svc")]
    assert svc.Config is tree.load("svc.impl").Config is not old
    assert svc.Config.__slots__ == ("a", "b")


def test_changed_package_init_reexports_same_objects(tree):
    tree.write("svc/__init__.py", "from .impl import Service\nVERSION = 1\n")
    tree.write("svc/impl.py", "class Service:\n    def run(self):\n        return 1\n")
    svc = tree.load("svc")
    cls = svc.Service
    tree.write("svc/__init__.py", "from .impl import Service\nVERSION = 2\n")
    tree.write("svc/impl.py", "class Service:\n    def run(self):\n        return 2\n")
    report = upgraded(tree)
    assert report.modules == [tree.name("svc.impl"), tree.name("svc")]
    assert svc.Service is cls and svc.VERSION == 2 and cls().run() == 2


def test_new_module_next_to_changed_one_is_importable_without_io_in_the_swap(tree, monkeypatch):
    tree.write("m.py", "def f():\n    return 1\n")
    m = tree.load("m")
    helpers = tree.write("helpers.py", "def g():\n    return 40\n")
    tree.write("sub/__init__.py", "")
    tree.write("sub/deep.py", "def d():\n    return 1\n")
    stdlib = next(name for name in ("colorsys", "wave", "tabnanny", "xml.dom.minidom")
                  if name not in sys.modules)
    tree.write("m.py", f"import {stdlib}\nfrom {tree.pkg}.helpers import g\n"
                       f"from {tree.pkg}.sub.deep import d\ndef f():\n    return g() + d() + 1\n")
    reads, swapping = [], []
    real_read, real_run = flydeploy._read_bytes, flydeploy._Swap.run
    file_loader = importlib.machinery.SourceFileLoader.__mro__[1]  # FileLoader
    real_get_data = file_loader.get_data
    monkeypatch.setattr(flydeploy, "_read_bytes",
                        lambda path: reads.append((str(path), bool(swapping))) or real_read(path))
    monkeypatch.setattr(file_loader, "get_data", lambda self, path: reads.append(
        (str(path), bool(swapping))) or real_get_data(self, path))
    monkeypatch.setattr(flydeploy._Swap, "run",
                        lambda self: swapping.append(1) or real_run(self))
    upgraded(tree)
    assert m.f() == 42 and tree.name("sub.deep") in sys.modules and stdlib in sys.modules
    assert (str(helpers), False) in reads and not [r for r in reads if r[1]]


MUTUAL = """
from {pkg} import {other}
def {name}(n):
    return {answer!r} if n == 0 else {other}.{other_function}(n - 1)
"""


def write_mutual_pair(tree, a_answer, b_answer):
    tree.write("a.py", MUTUAL.format(pkg=tree.pkg, other="b", name="ping", answer=a_answer,
                                     other_function="pong"))
    tree.write("b.py", MUTUAL.format(pkg=tree.pkg, other="a", name="pong", answer=b_answer,
                                     other_function="ping"))


def test_two_modules_importing_each_other_both_changed(tree):
    write_mutual_pair(tree, "a", "b")
    a, b = tree.load("a"), tree.load("b")
    ping, pong = a.ping, b.pong
    write_mutual_pair(tree, "A", "B")
    report = upgraded(tree)
    assert sorted(report.modules) == sorted([tree.name("a"), tree.name("b")])
    assert a.ping is ping and b.pong is pong and ping(3) == "B" and ping(4) == "A"


def test_restarted_process_runs_new_code_after_same_size_edit(tree):
    path = tree.write("m.py", "VALUE = 'aaaa'\n")
    tree.load("m")
    stat = path.stat()
    path.write_text("VALUE = 'bbbb'\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    assert flydeploy.modified_modules() == [tree.name("m")]
    upgraded(tree)
    assert tree.load("m").VALUE == "bbbb"
    code = f"import {tree.name('m')} as m; print(m.VALUE)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree.root, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": str(tree.root)})
    assert out.stdout.strip() == "bbbb"


def test_stale_bytecode_of_every_optimisation_level_is_removed(tree):
    path = tree.write("m.py", "VALUE = 'aaaa'\n")
    tree.load("m")
    environment = {**os.environ, "PYTHONPATH": str(tree.root)}
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    code = f"import {tree.name('m')} as m; print(m.VALUE)"
    for flags in ([], ["-O"], ["-OO"]):  # timestamp caches of every level
        subprocess.run([sys.executable, *flags, "-c", code], cwd=tree.root, check=True,
                       env=environment, capture_output=True)
    caches = [importlib.util.cache_from_source(str(path), optimization=level)
              for level in ("", 1, 2)]
    assert all(os.path.exists(cache) for cache in caches)
    stat = path.stat()
    path.write_text("VALUE = 'bbbb'\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the caches look valid
    upgraded(tree)
    for flags in ([], ["-O"], ["-OO"]):
        out = subprocess.run([sys.executable, *flags, "-c", code], cwd=tree.root, check=True,
                             env={**environment, "PYTHONDONTWRITEBYTECODE": "1"},
                             capture_output=True, text=True)
        assert out.stdout.strip() == "bbbb", flags


def test_file_restored_with_older_mtime_is_a_change(tree):
    path = tree.write("m.py", "X = 1\n")
    stat = path.stat()
    tree.load("m")
    path.write_text("X = 2\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**10))
    assert flydeploy.modified_modules() == [tree.name("m")]
    path.write_text("X = 1\n")
    assert flydeploy.modified_modules() == []


def test_hash_recorded_at_import_time_not_at_first_check(tree):
    path = tree.write("m.py", "X = 1\n")
    tree.load("m")
    path.write_text("X = 2\n")  # before anyone asked: still a change
    assert flydeploy.modified_modules() == [tree.name("m")]


def test_track_default_root_and_installation_dirs_are_never_tracked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = sys.modules["__main__"]
    monkeypatch.delattr(main, "__file__", raising=False)
    assert str(tmp_path.resolve()) in flydeploy.track()
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    flydeploy.track(stdlib)
    assert "json" not in flydeploy.modified_modules()
    with pytest.raises(flydeploy.FlyDeployError, match="not a tracked"):
        flydeploy.reload_modules(["json"])
    with pytest.raises(flydeploy.ConfigError, match="not a directory"):
        flydeploy.track(tmp_path / "missing")


def test_track_defaults_to_the_directory_of_main(tmp_path, monkeypatch):
    script = tmp_path / "app" / "main.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setattr(sys.modules["__main__"], "__file__", str(script), raising=False)
    assert str(script.parent.resolve()) in flydeploy.track()


@pytest.mark.parametrize("process", ["app", "command line"])
def test_only_an_app_process_tracks_what_it_imports(tmp_path, process):
    """A process started for flydeploy's command line (``main()`` with its argv) runs no
    application code: the tracker is off ``sys.meta_path`` there, so its imports never consult
    it (``track`` still puts it back), and what it imported is frozen out of its collections; a
    process that imports flydeploy records its modules as they load and tracks them once it
    declares a root, and nothing of it is frozen (the engine finds objects with gc)."""
    (tmp_path / "app_mod.py").write_text("X = 1\n")
    probe = ("import sys, flydeploy\n"
             "if sys.argv[1] == 'command line':\n"
             "    sys.argv[1:] = ['--version']\n"
             "    assert flydeploy.main() == 0\n"
             "import app_mod\n"
             "started = 'app_mod' in flydeploy._tracker.started\n"
             "on_path = flydeploy._tracker.finder in sys.meta_path\n"
             "flydeploy.track('.')\n"
             "import gc\n"
             "print(on_path, started, 'app_mod' in flydeploy._tracker.loaded, gc.get_freeze_count() > 0)\n")
    done = subprocess.run([sys.executable, "-c", probe, process], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    expected = "True True True False" if process == "app" else "False False True True"
    assert done.stdout.splitlines()[-1] == expected


def test_modules_imported_before_tracking_are_hashed_when_tracking_starts(tmp_path):
    root = tmp_path / "late"
    package = f"late_{os.getpid()}"
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    module_path = root / package / "m.py"
    module_path.write_text("X = 1\n")
    sys.path.insert(0, str(root))
    try:
        m = importlib.import_module(f"{package}.m")
        assert f"{package}.m" not in flydeploy.modified_modules()  # not tracked yet
        flydeploy.track(root)
        assert f"{package}.m" not in flydeploy.modified_modules()
        module_path.write_text("X = 2\n")
        assert f"{package}.m" in flydeploy.modified_modules()
        report = flydeploy.reload_modules([f"{package}.m"])
        assert report.ok, report.error
        assert m.X == 2 and f"{package}.m" not in flydeploy.modified_modules()
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] == package]:
            del sys.modules[name]


# --- refusals and failures ------------------------------------------------------


def test_syntax_error_names_file_and_line_and_changes_nothing(tree):
    tree.write("m.py", "def f():\n    return 1\n")
    m = tree.load("m")
    path = tree.write("m.py", "def f():\n    return 2\n\ndef g(:\n    pass\n")
    report = tree.reload()
    assert not report.ok and not report.rolled_back
    assert str(path) in report.error and "line 4" in report.error
    assert m.f() == 1 and report.suspend_ms == 0


def test_module_body_raising_midway_rolls_everything_back(tree):
    tree.write("a.py", "def fa():\n    return 'a1'\n")
    tree.write("m.py", """
        import dataclasses
        state = []
        class K:
            x = 1
            def m(self):
                return "old"
        @dataclasses.dataclass
        class D:
            a: int
        def f():
            return "old"
    """)
    a, m = tree.load("a"), tree.load("m")
    m.state.append("live")
    f, k, cls, d_init = m.f, m.K(), m.K, m.D.__init__
    tree.write("a.py", "def fa():\n    return 'a2'\n")
    tree.write("m.py", f"""
        import dataclasses
        from {tree.pkg} import a
        state = ["changed"]
        class K:
            x = 2
            def m(self):
                return "new"
            def added(self):
                return 1
        @dataclasses.dataclass
        class D:
            a: int
            b: int = 0
        def f():
            return "new"
        raise RuntimeError("boom in the middle")
    """)
    report = tree.reload()
    assert not report.ok and report.rolled_back
    assert "boom in the middle" in report.error and "line 17" in report.error
    assert a.fa() == "a1" and m.f is f and f() == "old" and m.state == ["live"]
    assert k.m() == "old" and cls.x == 1 and not hasattr(cls, "added") and m.K is cls
    assert m.D.__init__ is d_init and [fl.name for fl in dataclasses.fields(m.D)] == ["a"]
    assert "a" not in vars(m)
    assert sorted(flydeploy.modified_modules()) == [tree.name("a"), tree.name("m")]


def test_rollback_restores_other_modules_and_forgets_new_ones(tree):
    tree.write("config.py", "FLAG = False\n")
    tree.write("m.py", f"from {tree.pkg} import config\ndef f():\n    return 1\n")
    config, m = tree.load("config"), tree.load("m")
    package = sys.modules[tree.pkg]
    tree.write("helper.py", "X = 1\n")
    tree.write("m.py", f"""
        from {tree.pkg} import config
        from {tree.pkg} import helper
        config.FLAG = True
        def f():
            return 2
        raise RuntimeError("boom")
    """)
    report = tree.reload("m")
    assert report.rolled_back and report.failed_module == tree.name("m")
    assert f"{tree.path('m.py')}, line 7" in report.error
    assert config.FLAG is False and m.f() == 1
    assert tree.name("helper") not in sys.modules and not hasattr(package, "helper")


def test_syntax_error_in_a_new_module_refuses_before_suspending(tree):
    tree.write("m.py", "def f():\n    return 1\n")
    m = tree.load("m")
    path = tree.write("helpers.py", "def g(:\n    pass\n")
    tree.write("m.py", f"from {tree.pkg} import helpers\ndef f():\n    return 2\n")
    report = tree.reload()
    assert not report.ok and not report.rolled_back and report.suspend_ms == 0
    assert f"{path}, line 1" in report.error and report.failed_module == tree.name("helpers")
    assert m.f() == 1 and tree.name("helpers") not in sys.modules


def test_failing_hot_upgrade_rolls_back(tree):
    tree.write("m.py", "X = 1\ndef f():\n    return 1\n")
    m = tree.load("m")
    tree.write("m.py", "X = 2\ndef f():\n    return 2\ndef __hot_upgrade__(old):\n    raise ValueError('no')\n")
    report = tree.reload()
    assert report.rolled_back and "__hot_upgrade__" in report.error
    assert m.X == 1 and m.f() == 1 and not hasattr(m, "__hot_upgrade__")


def test_enum_members_added_or_removed_refused(tree):
    tree.write("m.py", "import enum\nclass Color(enum.Enum):\n    RED = 1\n")
    m = tree.load("m")
    tree.write("m.py", "import enum\nclass Color(enum.Enum):\n    RED = 1\n    GREEN = 2\n")
    report = tree.reload()
    assert not report.ok and "cold deploy required" in report.error and "GREEN" in report.error
    tree.write("m.py", "import enum\nclass Color(enum.Enum):\n    RED = 5\n")
    report = tree.reload()
    assert not report.ok and "cold deploy required" in report.error
    assert list(m.Color) == [m.Color.RED] and m.Color.RED.value == 1


def test_enum_member_added_by_tuple_assignment_refused(tree):
    tree.write("m.py", "import enum\nclass Color(enum.Enum):\n    RED, GREEN = 1, 2\n")
    m = tree.load("m")
    tree.write("m.py", "import enum\nclass Color(enum.Enum):\n    RED, GREEN, BLUE = 1, 2, 3\n")
    report = tree.reload()
    assert not report.ok and "BLUE" in report.error and report.failed_module == tree.name("m")
    assert list(m.Color) == [m.Color.RED, m.Color.GREEN] and "BLUE" not in vars(m.Color)


def test_changed_metaclass_refused_with_live_instances(tree):
    source = "class Meta(type):\n    pass\nclass K{header}:\n    pass\n"
    tree.write("m.py", source.format(header=""))
    m = tree.load("m")
    instance = m.K()
    tree.write("m.py", source.format(header="(metaclass=Meta)"))
    report = tree.reload()
    assert not report.ok and "metaclass" in report.error and type(m.K) is type
    assert type(instance) is m.K


def test_rebuilt_base_class_with_a_subclass_elsewhere_is_refused(tree):
    tree.write("base.py", "class Mixin:\n    pass\nclass Base:\n    def hello(self):\n"
                          "        return 'old'\n")
    tree.write("other.py", f"from {tree.pkg}.base import Base\nclass Sub(Base):\n    pass\n")
    base, other = tree.load("base"), tree.load("other")
    cls = base.Base
    tree.write("base.py", "class Mixin:\n    pass\nclass Base(Mixin):\n    def hello(self):\n"
                          "        return 'new'\n")
    report = tree.reload("base")
    assert not report.ok and not report.rolled_back and "subclasses" in report.error
    assert f"{tree.name('other')}.Sub" in report.error
    assert base.Base is cls and issubclass(other.Sub, base.Base)


def test_slots_change_refused_with_live_instances_rebuilt_without(tree):
    tree.write("m.py", """
        class P:
            __slots__ = ("a",)
        class Q:
            __slots__ = ("a",)
    """)
    m = tree.load("m")
    live = m.P()
    old_q = m.Q
    tree.write("m.py", """
        class P:
            __slots__ = ("a", "b")
        class Q:
            __slots__ = ("a", "b")
    """)
    report = tree.reload()
    assert not report.ok and "cold deploy required" in report.error
    assert f"{tree.name('m')}.P" in report.error and "1 live instance" in report.error
    del live
    report = upgraded(tree)
    assert m.Q is not old_q and m.Q.__slots__ == ("a", "b")
    assert f"{tree.name('m')}.Q" in report.replaced


NAMED = """
from typing import NamedTuple
class Pair(NamedTuple):
    x: int
    y: int = 0{extra_field}
    def total(self):
        return {total}
"""


def test_named_tuple_methods_change_in_place_fields_are_a_shape_change(tree):
    tree.write("m.py", NAMED.format(extra_field="", total="self.x + self.y"))
    m = tree.load("m")
    cls, pair = m.Pair, m.Pair(1, 2)
    tree.write("m.py", NAMED.format(extra_field="", total="(self.x + self.y) * 10"))
    upgraded(tree)
    assert m.Pair is cls and pair.total() == 30
    tree.write("m.py", NAMED.format(extra_field="\n    z: int = 5", total="self.x + self.z"))
    report = tree.reload()
    assert not report.ok and "fields" in report.error
    del pair
    report = upgraded(tree)
    assert m.Pair(1, 2) == (1, 2, 5) and m.Pair(1).total() == 6
    assert f"{tree.name('m')}.Pair" in report.replaced


def test_registries_that_refuse_a_different_function_see_the_same_one(tree):
    tree.write("web.py", """
        class App:
            def __init__(self):
                self.routes = {}
            def route(self, path):
                def register(view):
                    if self.routes.get(path, view) is not view:
                        raise AssertionError(f"{path} is already mapped to another view")
                    self.routes[path] = view
                    return view
                return register
    """)
    site = """
        from {pkg}.web import App
        app = App()
        @app.route("/")
        def index():
            return {body!r}
    """
    tree.write("site.py", site.format(pkg=tree.pkg, body="old"))
    web_site = tree.load("site")
    view = web_site.index
    tree.write("site.py", site.format(pkg=tree.pkg, body="new"))
    upgraded(tree, "site")
    assert web_site.app.routes == {"/": view} and view() == "new"


def test_changed_base_list_refused_with_live_instances(tree):
    tree.write("m.py", "class A:\n    pass\nclass B:\n    pass\nclass C(A):\n    pass\n")
    m = tree.load("m")
    instance = m.C()
    tree.write("m.py", "class A:\n    pass\nclass B:\n    pass\nclass C(A, B):\n    pass\n")
    report = tree.reload()
    assert not report.ok and "base list" in report.error
    assert type(instance).__bases__ == (m.A,)


def test_changed_c_extension_is_refused(tree):
    for candidate in ("xxlimited", "_bz2", "termios", "resource", "_uuid"):
        try:
            origin = importlib.util.find_spec(candidate).origin
        except (ImportError, AttributeError):
            continue
        if origin and origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
            break
    else:
        pytest.skip("this Python has no shared-library extension module to copy")
    target = tree.path(pathlib.Path(origin).name)
    shutil.copyfile(origin, target)
    ext = tree.load(candidate)
    assert ext.__file__ == str(target)
    with open(target, "ab") as stream:
        stream.write(b"\0")
    assert ext.__name__ in flydeploy.modified_modules()
    report = tree.reload()
    assert not report.ok and "cold deploy required" in report.error and "C extension" in report.error
    assert report.error.count(ext.__name__) == 1


# --- the report and callbacks ----------------------------------------------------


def test_report_is_json_ready_and_callbacks_survive_exceptions(tree, caplog):
    tree.write("m.py", "X = 1\n")
    tree.load("m")
    seen = []

    def broken(report):
        raise RuntimeError("callback bug")

    flydeploy.on_upgrade(broken)
    flydeploy.on_upgrade(seen.append)
    try:
        tree.write("m.py", "X = 2\n")
        with caplog.at_level(logging.ERROR, logger="flydeploy"):
            report = upgraded(tree)
    finally:
        flydeploy.on_upgrade(broken, remove=True)
        flydeploy.on_upgrade(seen.append, remove=True)
    assert seen == [report] and "callback" in caplog.text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["modules"] == [tree.name("m")]
    assert set(data) == {"ok", "modules", "added", "replaced", "servers_upgraded",
                         "servers_failed", "suspend_ms", "total_ms", "error", "rolled_back",
                         "failed_module", "phases_ms"}
    assert tuple(data["phases_ms"]) == flydeploy.UPGRADE_PHASES


def test_nothing_modified_is_an_empty_successful_report(tree):
    tree.write("m.py", "X = 1\n")
    tree.load("m")
    report = flydeploy.reload_modules([])
    assert report.ok and report.modules == []


def test_misuse_raises(tree):
    with pytest.raises(flydeploy.FlyDeployError, match="list of module names"):
        flydeploy.reload_modules("a.b")
    for timeout in (0, -1, float("nan"), True, "1"):
        with pytest.raises(flydeploy.FlyDeployError, match="suspend_timeout"):
            flydeploy.reload_modules([], suspend_timeout=timeout)


def test_infinite_suspend_timeout_waits_without_limit(tree):
    tree.write("m.py", "def f():\n    return 1\n")
    m = tree.load("m")
    tree.write("m.py", "def f():\n    return 2\n")
    upgraded(tree, suspend_timeout=float("inf"))
    assert m.f() == 2


def test_reload_from_code_an_upgrade_runs_is_a_misuse_error(tree):
    source = "import flydeploy\ndef __hot_upgrade__(old):\n    flydeploy.reload_modules([])\n" \
             "X = {x}\n"
    tree.write("m.py", source.format(x=1))
    m = tree.load("m")
    tree.write("m.py", source.format(x=2))
    report = tree.reload()
    assert report.rolled_back and "called from code an upgrade runs" in report.error
    assert m.X == 1 and gc.isenabled()
    tree.write("m.py", "X = 3\n")
    assert upgraded(tree) and m.X == 3


# --- what runs again, and what does not -----------------------------------------


def test_future_import_after_a_docstring_upgrades(tree):
    source = '"""The module."""\nfrom __future__ import annotations\ndef f() -> Missing:\n' \
             '    return {value!r}\n'
    tree.write("m.py", source.format(value=1))
    m = tree.load("m")
    tree.write("m.py", source.format(value=2))
    upgraded(tree)
    assert m.f() == 2 and m.__doc__ == "The module."


def test_objects_whose_attributes_run_code_are_never_probed(tree):
    tree.write("context.py", """
        class Proxy:
            def __getattribute__(self, name):
                raise RuntimeError("working outside of a request")
        request = Proxy()
    """)
    tree.write("m.py", f"from {tree.pkg}.context import request\ndef f():\n    return 1\n")
    m = tree.load("m")
    proxy = m.request
    tree.write("m.py", f"from {tree.pkg}.context import request\ndef f():\n    return 2\n")
    upgraded(tree)
    assert m.f() == 2 and m.request is proxy


REGISTRIES = """
import atexit
from {pkg} import bus
handlers = []
plugins = {{}}
def register(fn):
    handlers.append(fn)
    return fn
def plugin(cls):
    plugins.setdefault(cls.__name__, []).append(cls)
    return cls
@register
def handle(event):
    return {value!r}
@plugin
class Plugin:
    def name(self):
        return {value!r}
@atexit.register
def goodbye():
    return {value!r}
subscription = bus.subscribe(lambda message: message + 1)
"""


def test_unchanged_decorators_and_calls_do_not_run_again(tree, monkeypatch):
    tree.write("bus.py", """
        subscribers = []
        def subscribe(callback):
            subscribers.append(callback)
            return len(subscribers)
    """)
    registered = []
    monkeypatch.setattr("atexit.register", lambda fn: registered.append(fn) or fn)
    tree.write("m.py", REGISTRIES.format(pkg=tree.pkg, value="old"))
    m, bus = tree.load("m"), tree.load("bus")
    handle, plugin_class, goodbye = m.handle, m.Plugin, m.goodbye
    for value in ("new", "newer"):
        tree.write("m.py", REGISTRIES.format(pkg=tree.pkg, value=value))
        upgraded(tree, "m")
        assert m.handlers == [handle] and handle("e") == value
        assert m.plugins == {"Plugin": [plugin_class]} and plugin_class().name() == value
        assert registered == [goodbye] and goodbye() == value
        assert len(bus.subscribers) == 1 and m.subscription == 1


COMMANDS = """
from {pkg}.cli import Command, registry
def task(fn):
    registry.append(fn)
    return Command(fn)
@task
def job():
    return {value!r}
"""


def test_function_kept_as_an_attribute_of_a_decorator_object_takes_new_code(tree):
    tree.write("cli.py", """
        registry = []
        class Command:
            def __init__(self, callback):
                self.callback = callback
            def __call__(self):
                return self.callback()
    """)
    tree.write("m.py", COMMANDS.format(pkg=tree.pkg, value="old"))
    m, cli = tree.load("m"), tree.load("cli")
    command, callback = m.job, m.job.callback
    tree.write("m.py", COMMANDS.format(pkg=tree.pkg, value="new"))
    upgraded(tree, "m")
    assert m.job is command and command.callback is callback and command() == "new"
    assert cli.registry == [callback]


FLASK_LIKE = """
from {pkg}.web import App
app = App()
@app.route("/")
def index():
    return {body!r}
"""


def test_route_registration_closed_after_first_request_sees_new_code(tree):
    tree.write("web.py", """
        class App:
            def __init__(self):
                self.views, self.serving = {}, False
            def route(self, path):
                if self.serving:
                    raise AssertionError("route can no longer be called: already serving")
                def register(view):
                    self.views[path] = view
                    return view
                return register
            def get(self, path):
                self.serving = True
                return self.views[path]()
    """)
    tree.write("site.py", FLASK_LIKE.format(pkg=tree.pkg, body="v1"))
    site = tree.load("site")
    assert site.app.get("/") == "v1"
    for body in ("v2", "v3"):
        tree.write("site.py", FLASK_LIKE.format(pkg=tree.pkg, body=body))
        upgraded(tree, "site")
        assert site.app.get("/") == body and list(site.app.views) == ["/"]


def test_changed_decorator_runs_again_on_the_live_function(tree):
    tree.write("m.py", "import functools\n@functools.lru_cache(maxsize=1)\n"
                       "def f(x):\n    return x\n")
    m = tree.load("m")
    inner = m.f.__wrapped__
    tree.write("m.py", "import functools\n@functools.lru_cache(maxsize=1000)\n"
                       "def f(x):\n    return -x\n")
    report = upgraded(tree)
    assert m.f.cache_info().maxsize == 1000 and m.f(2) == -2 and m.f.__wrapped__ is inner
    assert f"{tree.name('m')}.f" in report.replaced


def test_changed_default_of_a_cached_function_clears_its_cache(tree):
    source = "import functools\n@functools.lru_cache\ndef price(n, rate={rate}):\n" \
             "    return n * rate\n"
    tree.write("m.py", source.format(rate=2))
    m = tree.load("m")
    assert m.price(10) == 20
    tree.write("m.py", source.format(rate=3))
    upgraded(tree)
    assert m.price(10) == 30


def test_function_attributes_set_by_statements_and_at_run_time_survive(tree):
    source = "def view():\n    return {value!r}\nview.csrf_exempt = True\n"
    tree.write("m.py", source.format(value=1))
    m = tree.load("m")
    m.view.hits = 5
    tree.write("m.py", source.format(value=2))
    upgraded(tree)
    assert m.view() == 2 and vars(m.view) == {"csrf_exempt": True, "hits": 5}


def test_comment_and_formatting_edits_are_no_changes(tree):
    tree.write("m.py", "hits = 0\nclass P:\n    __slots__ = ('a',)\n")
    m = tree.load("m")
    instance = m.P()
    m.hits = 7
    tree.write("m.py", "hits   =   0  # a note\nclass P:\n    __slots__ = (\n"
                       "        'a',  # the one\n    )\n")
    upgraded(tree)
    assert m.hits == 7 and type(instance) is m.P


def test_unchanged_statement_reading_a_changed_name_takes_its_new_value(tree):
    source = "VERSION = {v}\nLABEL = f'v{{VERSION}}'\nclass S:\n    vsn = VERSION\n"
    tree.write("m.py", source.format(v=1))
    m = tree.load("m")
    cls = m.S
    tree.write("m.py", source.format(v=2))
    upgraded(tree)
    assert m.S is cls and m.S.vsn == 2 and m.LABEL == "v2"


FACTORY = """
made = []
def make(step):
    made.append(step)
    def bump(value):
        return value + step * {factor}
    return bump
bump_one = make(1)
"""


def test_closure_of_an_unchanged_factory_call_takes_the_new_inner_code(tree):
    tree.write("m.py", FACTORY.format(factor=1))
    m = tree.load("m")
    closure = m.bump_one
    tree.write("m.py", FACTORY.format(factor=10))
    upgraded(tree)
    assert m.bump_one is closure and closure(1) == 11 and m.made == [1]


def test_singledispatchmethod_implementations_take_new_code(tree):
    source = """
        import functools
        class Fmt:
            @functools.singledispatchmethod
            def show(self, x):
                return "object"
            @show.register
            def _(self, x: int):
                return {value!r}
            @show.register
            def _(self, x: str):
                return "str"
    """
    tree.write("m.py", source.format(value="int-old"))
    m = tree.load("m")
    tree.write("m.py", source.format(value="int-new"))
    upgraded(tree)
    assert m.Fmt().show(1) == "int-new" and m.Fmt().show("s") == "str"


def test_what_an_unchanged_class_decorator_generated_stays(tree):
    source = """
        import dataclasses
        import functools
        @dataclasses.dataclass
        class Plain:
            x: int = 0
            def describe(self):
                return {value!r}
        @dataclasses.dataclass(frozen=True)
        class Frozen:
            x: int = 0
        @functools.total_ordering
        class Version:
            def __init__(self, n):
                self.n = n
            def __eq__(self, other):
                return self.n == other.n
            def __lt__(self, other):
                return self.n < other.n
            def label(self):
                return {value!r}
    """
    tree.write("m.py", source.format(value="old"))
    m = tree.load("m")
    tree.write("m.py", source.format(value="new"))
    upgraded(tree)
    assert m.Plain().describe() == "new" and m.Plain.__hash__ is None
    assert hash(m.Frozen(1)) == hash(m.Frozen(1)) and m.Version(2).label() == "new"
    assert m.Version(2) >= m.Version(1) and m.Version.__hash__ is None


def test_slotted_dataclass_method_changes_in_place(tree):
    source = """
        import dataclasses
        @dataclasses.dataclass(slots=True)
        class P:
            x: int = 0
            def describe(self):
                return {value!r}
    """
    tree.write("m.py", source.format(value="old"))
    m = tree.load("m")
    point = m.P(3)
    tree.write("m.py", source.format(value="new"))
    upgraded(tree)
    assert type(point) is m.P and point.describe() == "new" and point == m.P(3)
