"""The real-library differential harness: upgrade published releases of real
pure-Python libraries in place, then run the new release's own test suite in
the upgraded process and compare it, test by test, with a fresh interpreter.

One case is a library and a chain of consecutive releases.  The upgraded side
runs in one subprocess: release N is copied into an application directory,
``flydeploy.track()``ed, every module of it imported and used (instances,
bound methods, functions and classes are held), then each next release is
written over the directory as a deploy would (changed, added and deleted
files) and ``flydeploy.reload_modules()`` runs; after the last step the held
objects are checked (still the module's objects, ``isinstance`` holds) and the
last release's own test suite runs in that same process (``pytest.main``).
The fresh side runs the same suite on a clean copy of the last release in a
new interpreter.  Outcomes are compared by test id.

``$FLYDEPLOY_REALCODE_ENGINE`` names another ``flydeploy.py`` to upgrade with
(to compare engine builds); by default the one of this checkout.

Source distributions come from the package index once (``pip download``) into
a cache directory, ``$FLYDEPLOY_REALCODE_CACHE`` or
``~/.cache/flydeploy-realcode``; nothing else uses the network.

``python realcode_harness.py [LIBRARY ...]`` runs cases outside pytest and
prints the table (``--keep`` keeps the work directories); ``python realcode_harness.py child SPEC.json`` is the body
of one subprocess.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap

REPO = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve()


@dataclasses.dataclass(frozen=True)
class Library:
    """A library under test: its distribution name, a chain of consecutive
    releases, its top-level import names, where its test suite lives and a
    snippet that uses it (binds ``held``, a dict of objects to keep) and one
    that uses the held objects again after the upgrade."""

    dist: str
    versions: tuple[str, ...]
    packages: tuple[str, ...]
    use: str
    probe: str = ""
    # The suite: a folder of the source distribution copied next to the app
    # ("tests"), or one inside a package, found in the app ("toolz/tests").
    suite: str = "tests"
    in_package: bool = False
    ignore: tuple[str, ...] = ()  # suite paths that are no tests (type-checker inputs)
    # Refusals judged right (the step needs state a fresh import does not
    # have), by a phrase of their message; any other refusal is needless, as
    # each release's suite passes on a fresh import.
    justified: tuple[str, ...] = ()
    slow: bool = False

    @property
    def name(self) -> str:
        return f"{self.dist} {' > '.join(self.versions)}"


LIBRARIES = [
    Library("toolz", ("0.11.2", "0.12.0", "0.12.1"), ("toolz", "tlz"), suite="toolz/tests",
            in_package=True, use="""
        import toolz, toolz.curried
        add = toolz.curry(lambda a, b: a + b)
        held = {"curried": add, "add1": add(1), "pipe": toolz.pipe, "compose": toolz.compose(str, len),
                "juxt": toolz.juxt(min, max), "groupby": toolz.curried.groupby}
    """, probe="""
        assert held["add1"](2) == 3 and held["compose"]("abc") == "3"
        assert held["juxt"]([3, 1, 2]) == (1, 3)
        assert held["groupby"](len)(["a", "bb"]) == {1: ["a"], 2: ["bb"]}
    """),
    Library("more-itertools", ("10.1.0", "10.2.0", "10.3.0"), ("more_itertools",), use="""
        import more_itertools as mi
        peek = mi.peekable(iter(range(10)))
        held = {"peekable": peek, "peek": peek.peek, "chunked": mi.chunked,
                "seekable": mi.seekable(range(5)), "windowed": mi.windowed}
    """, probe="""
        assert held["peek"]() == 0 and next(held["peekable"]) == 0
        assert list(held["chunked"](range(4), 2)) == [[0, 1], [2, 3]]
    """),
    Library("six", ("1.15.0", "1.16.0"), ("six",), suite="test_six.py", use="""
        import six
        held = {"moves": six.moves, "ensure_str": six.ensure_str, "with_metaclass": six.with_metaclass,
                "importer": six._importer}
    """, probe="""
        assert held["ensure_str"](b"x") == "x"
        import six.moves.urllib.parse
    """),
    Library("cachetools", ("5.3.2", "5.3.3", "5.4.0", "5.5.0"), ("cachetools",), use="""
        import cachetools, cachetools.keys
        lru = cachetools.LRUCache(maxsize=4)
        lru["a"] = 1
        ttl = cachetools.TTLCache(maxsize=4, ttl=60)
        ttl["a"] = 1
        held = {"lru": lru, "ttl": ttl, "popitem": lru.popitem, "hashkey": cachetools.keys.hashkey,
                "cached": cachetools.cached(cachetools.LRUCache(8))(lambda x: x * 2)}
    """, probe="""
        assert held["lru"]["a"] == 1 and held["ttl"]["a"] == 1
        held["lru"]["b"] = 2
        assert held["cached"](3) == 6
    """),
    Library("idna", ("3.6", "3.7"), ("idna",), use="""
        import idna, idna.codec
        held = {"encode": idna.encode, "decode": idna.decode, "codec": idna.codec.Codec()}
    """, probe="""
        assert held["encode"]("ドメイン.テスト") == b"xn--eckwd4c7c.xn--zckzah"
        assert held["codec"].encode("xn--eckwd4c7c.xn--zckzah")[0] == b"xn--eckwd4c7c.xn--zckzah"
    """),
    Library("markupsafe", ("2.1.4", "2.1.5"), ("markupsafe",), use="""
        import markupsafe
        m = markupsafe.Markup("<b>{}</b>")
        held = {"markup": m, "format": m.format, "escape": markupsafe.escape}
    """, probe="""
        assert held["format"]("<i>") == "<b>&lt;i&gt;</b>"
        assert isinstance(held["escape"]("<"), __import__("markupsafe").Markup)
    """),
    Library("marshmallow", ("3.20.2", "3.21.0"), ("marshmallow",),
            ignore=("tests/mypy_test_cases",), use="""
        import marshmallow
        from marshmallow import fields

        class Person(marshmallow.Schema):
            name = fields.String(required=True)
            age = fields.Integer()

        schema = Person()
        held = {"schema": schema, "load": schema.load, "field": fields.String(),
                "Person": Person}
    """, probe="""
        assert held["load"]({"name": "a", "age": 3}) == {"name": "a", "age": 3}
        assert held["Person"]().dump({"name": "b"}) == {"name": "b"}
    """),
    Library("jinja2", ("3.1.3", "3.1.4"), ("jinja2",), use="""
        import jinja2
        env = jinja2.Environment(loader=jinja2.DictLoader({"t": "{{ x|upper }}!"}))
        template = env.get_template("t")
        held = {"env": env, "template": template, "render": template.render,
                "from_string": env.from_string}
    """, probe="""
        assert held["render"](x="a") == "A!"
        assert held["from_string"]("{{ 1 + 1 }}").render() == "2"
    """),
    Library("python-dateutil", ("2.8.2", "2.9.0"), ("dateutil",), use="""
        import datetime, dateutil.parser, dateutil.relativedelta, dateutil.tz, dateutil.rrule
        parser = dateutil.parser.parser()
        held = {"parser": parser, "parse": parser.parse, "delta": dateutil.relativedelta.relativedelta(months=1),
                "utc": dateutil.tz.tzutc(), "rule": dateutil.rrule.rrule(dateutil.rrule.DAILY, count=3,
                                                                           dtstart=datetime.datetime(2020, 1, 1))}
    """, probe="""
        import datetime
        assert held["parse"]("2020-01-02").day == 2
        assert datetime.date(2020, 1, 31) + held["delta"] == datetime.date(2020, 2, 29)
        assert len(list(held["rule"])) == 3
    """),
    Library("attrs", ("23.1.0", "23.2.0"), ("attr", "attrs"), slow=True, use="""
        import attr, attrs

        @attrs.define
        class Point:
            x: int = 0
            y: int = attrs.field(default=0, validator=attrs.validators.instance_of(int))

        p = Point(1, 2)
        held = {"point": p, "Point": Point, "evolve": attrs.evolve, "asdict": attrs.asdict,
                "factory": attr.Factory(list)}
    """, probe="""
        assert held["evolve"](held["point"], x=5).x == 5
        assert held["asdict"](held["point"]) == {"x": 1, "y": 2}
    """),
]


def cache_dir() -> pathlib.Path:
    configured = os.environ.get("FLYDEPLOY_REALCODE_CACHE")
    path = (pathlib.Path(configured) if configured
            else pathlib.Path.home() / ".cache" / "flydeploy-realcode")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sdist(dist: str, version: str) -> pathlib.Path:
    """The unpacked source distribution of one release, downloaded once."""
    cache = cache_dir()
    unpacked = cache / f"{dist}-{version}"
    if (unpacked / ".complete").exists():
        return unpacked
    downloads = cache / "downloads"
    downloads.mkdir(exist_ok=True)
    normalized = dist.replace("-", "_").lower()
    archives = [p for p in downloads.iterdir()
                if p.name.lower().replace("-", "_").startswith(f"{normalized}_{version}.tar")]
    if not archives:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "--no-binary", ":all:", "-d", str(downloads), f"{dist}=={version}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=600, check=False)
        archives = [p for p in downloads.iterdir()
                    if p.name.lower().replace("-", "_").startswith(f"{normalized}_{version}.tar")]
        if done.returncode or not archives:
            raise RuntimeError(f"pip download of {dist}=={version} failed:\n{done.stderr[-2000:]}")
    # Unpacked beside the cache and renamed into place whole: another run
    # sharing the cache sees a release complete or not at all.
    scratch = pathlib.Path(tempfile.mkdtemp(dir=cache))
    try:
        with tarfile.open(archives[0]) as tar:
            tar.extractall(scratch, filter="data")
        (top,) = scratch.iterdir()
        (top / ".complete").touch()
        if unpacked.exists():  # left half-written by an older run
            shutil.rmtree(unpacked, ignore_errors=True)
        try:
            top.rename(unpacked)
        except OSError:
            if not (unpacked / ".complete").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return unpacked


def prefetch(libraries: list[Library]) -> None:
    """Download and unpack every release the libraries need, a few at a time."""
    releases = [(lib.dist, version) for lib in libraries for version in lib.versions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(lambda release: sdist(*release), releases):
            pass


def release_files(lib: Library, version: str) -> dict[str, pathlib.Path]:
    """What a deploy of one release writes into the app directory: relative
    path -> file in the source distribution."""
    root = sdist(lib.dist, version)
    files = {}
    for name in lib.packages:
        for base in (root / "src", root):
            if (base / name).is_dir():
                for path in sorted((base / name).rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        files[str(path.relative_to(base))] = path
                break
            if (base / f"{name}.py").is_file():
                files[f"{name}.py"] = base / f"{name}.py"
                break
        else:
            raise FileNotFoundError(f"{lib.dist} {version}: no package {name} in {root}")
    return files


def lines_changed(lib: Library) -> int:
    """Python source lines added or removed over the chain (tests excluded)."""
    total = 0
    for old, new in zip(lib.versions, lib.versions[1:]):
        before, after = release_files(lib, old), release_files(lib, new)
        for rel in sorted(before.keys() | after.keys()):
            if not rel.endswith(".py") or "/test" in rel:
                continue
            a = before[rel].read_text().splitlines() if rel in before else []
            b = after[rel].read_text().splitlines() if rel in after else []
            total += sum(1 for line in difflib.unified_diff(a, b, lineterm="", n=0)
                         if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    return total


def deploy(files: dict[str, pathlib.Path], app: pathlib.Path) -> None:
    """Write a release over the app directory as a deploy would: changed and
    added files written, files the release no longer has deleted."""
    wanted = set(files)
    for path in sorted(app.rglob("*"), reverse=True):
        rel = str(path.relative_to(app))
        if path.is_file() and rel not in wanted and "__pycache__" not in path.parts:
            path.unlink()
    for rel, source in files.items():
        target = app / rel
        data = source.read_bytes()
        if target.exists() and target.read_bytes() == data:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _suite_setup(lib: Library, version: str, side: pathlib.Path) -> str:
    """Lay out the release's test suite next to the app; returns the path pytest runs."""
    if lib.in_package:
        return str(side / "app" / lib.suite)
    root = sdist(lib.dist, version)
    suite = side / "suite"
    suite.mkdir()
    source = root / lib.suite
    if source.is_dir():
        shutil.copytree(source, suite / lib.suite)
    else:
        shutil.copy2(source, suite / lib.suite)
    if (root / "conftest.py").is_file():
        shutil.copy2(root / "conftest.py", suite / "conftest.py")
    return str(suite / lib.suite)


@dataclasses.dataclass
class CaseResult:
    library: str
    releases: str
    lines: int
    steps: list[dict]
    refused: str | None
    raised: str | None  # what reload_modules raised: it must never raise
    needless_refusal: bool
    identity_failures: list[str]
    replaced: list[str]
    probe_error: str | None
    upgraded: dict[str, str]
    fresh: dict[str, str]
    reasons: dict[str, str]
    log: str

    @property
    def differing(self) -> list[str]:
        return sorted(k for k in self.upgraded.keys() | self.fresh.keys()
                      if self.upgraded.get(k) != self.fresh.get(k))

    @property
    def ok(self) -> bool:
        if self.raised:
            return False
        if self.refused:
            return not self.needless_refusal
        return not (self.differing or self.identity_failures or self.probe_error)

    def problems(self) -> str:
        if self.raised:
            return f"reload_modules raised: {self.raised}"
        if self.refused:
            return f"refused: {self.refused}"
        out = []
        if self.identity_failures:
            out.append(f"{len(self.identity_failures)} held object(s) not the module's: "
                       f"{self.identity_failures[:8]}")
        if self.probe_error:
            out.append(f"held objects failed after the upgrade: {self.probe_error}")
        for nodeid in self.differing[:12]:
            out.append(f"{nodeid}: upgraded {self.upgraded.get(nodeid)}, fresh "
                       f"{self.fresh.get(nodeid)} ({self.reasons.get(nodeid, '')})")
        if len(self.differing) > 12:
            out.append(f"... {len(self.differing) - 12} more differing outcomes")
        return "\n".join(out) + f"\n(work directory {self.log})"

    def row(self) -> dict:
        counts: dict[str, int] = {}
        for outcome in self.upgraded.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return {"library": self.library, "releases": self.releases, "lines": self.lines,
                "tests": len(self.fresh), "same": len(self.fresh) - len(self.differing)
                if not (self.refused or self.raised) else 0,
                "differ": len(self.differing) if not (self.refused or self.raised) else 0,
                "identity": len(self.identity_failures), "replaced": len(self.replaced),
                "refused": "raised" if self.raised else ("needless" if self.needless_refusal
                                                         else "needs state") if self.refused else "",
                "ok": self.ok}


def run_case(lib: Library, work: pathlib.Path, timeout: float = 600) -> CaseResult:
    """Run one library's chain on both sides and compare."""
    files = [release_files(lib, v) for v in lib.versions]
    results = {}
    for side_name in ("upgraded", "fresh"):
        side = work / side_name
        app = side / "app"
        app.mkdir(parents=True)
        deploy(files[0] if side_name == "upgraded" else files[-1], app)
        (side / "pytest.ini").write_text("[pytest]\n")
        suite = _suite_setup(lib, lib.versions[-1], side)
        spec = {"app": str(app), "suite": suite,
                "rootdir": str(side), "packages": list(lib.packages), "use": textwrap.dedent(lib.use),
                "probe": textwrap.dedent(lib.probe),
                "ignore": [str(pathlib.Path(suite).parent / i) for i in lib.ignore], "out": str(side / "result.json"),
                "engine": os.environ.get("FLYDEPLOY_REALCODE_ENGINE") or str(REPO / "flydeploy.py"),
                "releases": [{rel: str(path) for rel, path in f.items()} for f in files[1:]]
                if side_name == "upgraded" else []}
        (side / "spec.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        with open(side / "log.txt", "wb") as log:
            subprocess.run([sys.executable, str(HERE), "child", str(side / "spec.json")],
                           cwd=side, env=env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout, check=False)
        try:
            results[side_name] = json.loads((side / "result.json").read_text())
        except FileNotFoundError:
            raise AssertionError(f"{lib.name}: the {side_name} run ended without a result; see "
                                 f"{side / 'log.txt'}:\n{(side / 'log.txt').read_text()[-3000:]}")
    up, fresh = results["upgraded"], results["fresh"]
    refused = None if up.get("crash") else next(
        (s["report"]["error"] for s in up["steps"] if not s["report"]["ok"]), None)
    return CaseResult(
        library=lib.dist, releases=" > ".join(lib.versions), lines=lines_changed(lib),
        steps=up["steps"], refused=refused, raised=up.get("crash"),
        needless_refusal=bool(refused) and not any(s in refused for s in lib.justified),
        identity_failures=up.get("identity", []),
        replaced=[r for s in up["steps"] for r in s["report"].get("replaced", [])],
        probe_error=up.get("probe_error"), upgraded=up.get("outcomes", {}),
        fresh=fresh.get("outcomes", {}), reasons=up.get("reasons", {}), log=str(work))


def table(rows: list[dict]) -> str:
    """A markdown table of case rows, with the refusal rate."""
    head = ("library", "releases", "lines changed", "tests", "same outcome", "differ",
            "identity lost", "replaced", "refused", "result")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in (
            r["library"], r["releases"], r["lines"], r["tests"], r["same"], r["differ"],
            r["identity"], r["replaced"], r["refused"] or "-", "ok" if r["ok"] else "FAIL")) + " |")
    steps = sum(len(r["releases"].split(" > ")) - 1 for r in rows)
    refused = sum(1 for r in rows if r["refused"] in ("needless", "needs state"))
    needless = sum(1 for r in rows if r["refused"] == "needless")
    raised = sum(1 for r in rows if r["refused"] == "raised")
    lines.append(f"\nrefusal rate: {refused}/{len(rows)} cases ({steps} upgrade steps), "
                 f"{needless} of them needless; reload_modules raised in {raised}")
    return "\n".join(lines)


# --- the body of one subprocess -------------------------------------------------------

def _child(spec_path: str) -> None:
    import importlib
    import importlib.util
    import traceback
    import types

    spec = json.loads(pathlib.Path(spec_path).read_text())
    app = pathlib.Path(spec["app"])
    result: dict = {"steps": []}
    upgrading = bool(spec["releases"])
    if upgrading:  # this checkout's flydeploy, whatever is installed
        loaded = importlib.util.spec_from_file_location("flydeploy", spec["engine"])
        flydeploy = importlib.util.module_from_spec(loaded)
        sys.modules["flydeploy"] = flydeploy
        loaded.loader.exec_module(flydeploy)
        flydeploy.track(str(app))
    sys.path.insert(0, str(app))

    def import_all() -> None:
        for path in sorted(app.rglob("*.py")):
            rel = path.relative_to(app).with_suffix("")
            parts = [p for p in rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            if any(p.startswith("test") or p == "conftest" for p in parts) \
                    or parts[0] not in spec["packages"]:
                continue
            name = ".".join(parts)
            try:
                module = importlib.import_module(name)
            except Exception:
                continue  # an optional dependency missing: the suite sees the same
            file = getattr(module, "__file__", "") or ""
            if not file.startswith(str(app)):
                raise SystemExit(f"{name} was imported from {file}, not from the app")

    import_all()
    namespace: dict = {}
    exec(spec["use"], namespace)
    held = dict(namespace["held"])
    # Every public function and class of every module, as held by a caller.
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] not in spec["packages"] or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if (isinstance(value, (types.FunctionType, type)) and not attr.startswith("_")
                    and getattr(value, "__module__", None) == name):
                held[f"{name}.{attr}"] = value
    for files in spec["releases"]:
        deploy({rel: pathlib.Path(p) for rel, p in files.items()}, app)
        try:
            report = flydeploy.reload_modules()
        except Exception as exc:
            result["crash"] = "".join(traceback.format_exception_only(exc)).strip()
            result["steps"].append({"report": {"ok": False, "error": result["crash"],
                                               "replaced": []}})
            break
        result["steps"].append({"report": report.to_dict()})
        if not report.ok:
            break
    if upgrading and all(s["report"]["ok"] for s in result["steps"]):
        result["identity"] = _check_held(held)
        try:
            exec(spec["probe"], {"held": held})
        except Exception as exc:
            result["probe_error"] = "".join(traceback.format_exception_only(exc)).strip()
    if not result["steps"] or all(s["report"]["ok"] for s in result["steps"]):
        result["outcomes"], result["reasons"] = _run_suite(spec)
    pathlib.Path(spec["out"]).write_text(json.dumps(result))


def _current(module_name: str, qualname: str) -> object:
    obj = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj


def _check_held(held: dict) -> list[str]:
    """Held functions and classes must still be what their module binds;
    held instances instances of their class as the module binds it."""
    import types

    failures = []
    for label, obj in held.items():
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        if isinstance(obj, (types.FunctionType, type)):
            if "<locals>" in obj.__qualname__ or "<lambda>" in obj.__qualname__:
                continue
            current = _current(obj.__module__, obj.__qualname__)
            if current is None:
                continue  # removed by the new release
            if current is not obj and type(current) is type(obj):
                failures.append(f"{label} ({obj.__module__}.{obj.__qualname__})")
        elif isinstance(obj, types.ModuleType):
            continue
        else:
            cls = type(obj)
            current = _current(cls.__module__, cls.__qualname__)
            if isinstance(current, type) and not isinstance(obj, current):
                failures.append(f"{label}: not an instance of {cls.__module__}.{cls.__qualname__}")
    return failures


def _run_suite(spec: dict) -> tuple[dict[str, str], dict[str, str]]:
    import pytest

    class Recorder:
        def __init__(self) -> None:
            self.outcomes: dict[str, str] = {}
            self.reasons: dict[str, str] = {}
            self.keys: dict[str, str] = {}

        def key(self, nodeid: str) -> str:
            """A test id without the date and time of the run some
            parametrized ids contain (numbered when two ids then match)."""
            if nodeid not in self.keys:
                key = re.sub(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", "<time>",
                             re.sub(r"\d{1,4}[-/]\d{1,2}[-/]\d{1,4}", "<date>", nodeid))
                taken = set(self.keys.values())
                numbered, n = key, 1
                while numbered in taken:
                    n += 1
                    numbered = f"{key}#{n}"
                self.keys[nodeid] = numbered
            return self.keys[nodeid]

        def pytest_runtest_logreport(self, report) -> None:
            if hasattr(report, "wasxfail"):
                outcome = "xfailed" if report.skipped else "xpassed"
            elif report.failed:
                outcome = "failed" if report.when == "call" else "error"
            elif report.skipped:
                outcome = "skipped"
            elif report.when == "call":
                outcome = "passed"
            else:
                return
            nodeid = self.key(report.nodeid)
            if self.outcomes.get(nodeid) in ("failed", "error"):
                return
            self.outcomes[nodeid] = outcome
            if report.failed:
                text = str(report.longrepr).strip().splitlines()
                self.reasons[nodeid] = text[-1][:300] if text else ""

        def pytest_collectreport(self, report) -> None:
            if report.failed:
                self.outcomes[f"collect:{report.nodeid}"] = "error"
                text = str(report.longrepr).strip().splitlines()
                self.reasons[f"collect:{report.nodeid}"] = text[-1][:300] if text else ""

    recorder = Recorder()
    pytest.main([spec["suite"], "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                 "-c", str(pathlib.Path(spec["rootdir"]) / "pytest.ini"),
                 "--rootdir", spec["rootdir"], "--hypothesis-seed=0",
                 "--continue-on-collection-errors",
                 *(f"--ignore={path}" for path in spec["ignore"])], plugins=[recorder])
    return recorder.outcomes, recorder.reasons


def main(argv: list[str]) -> int:
    if argv[:1] == ["child"]:
        _child(argv[1])
        return 0
    keep = "--keep" in argv
    names = [arg for arg in argv if arg != "--keep"]
    chosen = [lib for lib in LIBRARIES if not names or lib.dist in names]
    rows = []
    scratch = tempfile.mkdtemp(prefix="realcode-")
    prefetch(chosen)
    try:
        for index, lib in enumerate(chosen):
            result = run_case(lib, pathlib.Path(scratch) / str(index))
            rows.append(result.row())
            if not result.ok or result.refused:
                print(f"{lib.name}: {result.problems()}", file=sys.stderr)
    finally:
        if not keep:
            shutil.rmtree(scratch)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
