"""Upgrading 1,000 idle servers whose classes live in 50 changed modules.

Prints one JSON line.  Each of the 50 generated modules has about 300 lines
and one server class with 20 running instances.  Measured in the same run:

- ``suspend_ms`` / ``total_ms``: median of 5 ``flydeploy.reload_modules``
  upgrades that change all 50 modules (the longest any server was held, and
  the whole call including reading and compiling);
- ``phases_ms``: the median time of each phase of those upgrades
  (``flydeploy.UPGRADE_PHASES``: prepare, pause, swap, migrate, resume,
  commit; pause is the gathering of the servers, swap to resume are held);
- ``naive_suspend_ms``: median of 5 upgrades done the naive way: suspend every
  server with a message, ``importlib.reload`` the 50 modules, resume;
- ``rss_growth_mb``: resident memory growth over 100 upgrades in a row.

Goals on a 2-core machine: ``suspend_ms`` at most 5, at least 10x below
``naive_suspend_ms``, and ``rss_growth_mb`` under 10.
"""

import gc
import importlib
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import flydeploy  # noqa: E402

MODULES = 50
SERVERS_PER_MODULE = 20
METHODS = 25
HELPERS = 10
ROUNDS = 5
MEMORY_UPGRADES = int(os.environ.get("BENCH_UPGRADES", "100"))


def module_source(index: int, version: int) -> str:
    """About 300 lines: constants, helpers and one server class."""
    lines = [f'"""Generated worker module {index}, version {version}."""', "",
             "import flydeploy", "", f"VERSION = {version}", "RATE = 3", "TABLE = {}", ""]
    for h in range(HELPERS):
        lines += ["", f"def helper_{h}(value):", f'    """Helper {h}."""',
                  f"    if value > {h * 10 + version}:", f"        return value - {h}",
                  f"    return value + {h}", ""]
    lines += ["", f"class Worker{index}(flydeploy.Server):", "    vsn = VERSION", "",
              "    def init(self):", '        return {"n": 0}', "",
              "    def handle_call(self, request, state):",
              "        return self.op_0(request), state", "",
              "    def handle_cast(self, message, state):",
              "        parked, release = message", "        parked.release()",
              "        release.wait()", "        return state", "",
              "    def code_change(self, old_vsn, state, extra):",
              '        return {**state, "from": old_vsn}', ""]
    for m in range(METHODS):
        lines += [f"    def op_{m}(self, x):", f'        """Operation {m}."""',
                  f"        y = x + {m}", "        if y > VERSION:", "            y -= 1",
                  f"        y = helper_{m % HELPERS}(y)", f"        return y * RATE + {version}",
                  ""]
    return "\n".join(lines) + "\n"


def write_version(root: pathlib.Path, package: str, version: int) -> None:
    for index in range(MODULES):
        (root / package / f"w{index}.py").write_text(module_source(index, version))


def rss_mb() -> float:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def naive_upgrade(modules, servers) -> float:
    """Suspend each server with a message, importlib.reload, resume: the pause in ms."""
    parked, release = threading.Semaphore(0), threading.Event()
    started = time.perf_counter()
    for server in servers:
        server.cast((parked, release))
    for _ in servers:
        parked.acquire()
    for module in modules:
        importlib.reload(module)
    release.set()
    return (time.perf_counter() - started) * 1000


def main() -> None:
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench-pause-"))
    package = "benchpause_app"
    (root / package).mkdir()
    (root / package / "__init__.py").write_text("")
    write_version(root, package, 1)
    sys.path.insert(0, str(root))
    flydeploy.track(root)
    modules = [importlib.import_module(f"{package}.w{i}") for i in range(MODULES)]
    servers = [getattr(module, f"Worker{i}").start()
               for i, module in enumerate(modules) for _ in range(SERVERS_PER_MODULE)]
    version = 1
    reports = []
    for _ in range(ROUNDS):
        version += 1
        write_version(root, package, version)
        report = flydeploy.reload_modules()
        assert report.ok and len(report.modules) == MODULES, report.error
        assert len(report.servers_upgraded) == MODULES * SERVERS_PER_MODULE
        # code_change got the version each server ran before (``vsn = VERSION``)
        for server in servers[::SERVERS_PER_MODULE]:
            state = flydeploy.get_state(server)
            assert state["from"] == version - 1, (state, version)
        reports.append(report)
    assert servers[0].call(0) == version  # the servers run the newest code
    gc.collect()
    before = rss_mb()
    for _ in range(MEMORY_UPGRADES):
        version += 1
        write_version(root, package, version)
        report = flydeploy.reload_modules()
        assert report.ok, report.error
    gc.collect()
    growth = rss_mb() - before
    naive = []
    for _ in range(ROUNDS):
        version += 1
        write_version(root, package, version)
        naive.append(naive_upgrade(modules, servers))
    for server in servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)
    suspend = statistics.median(r.suspend_ms for r in reports)
    total = statistics.median(r.total_ms for r in reports)
    naive_suspend = statistics.median(naive)
    phases = {phase: round(statistics.median(r.phases_ms[phase] for r in reports), 2)
              for phase in flydeploy.UPGRADE_PHASES}
    lines = module_source(0, 1).count("\n")
    print(json.dumps({
        "benchmark": "pause", "servers": len(servers), "modules": MODULES,
        "lines_per_module": lines, "suspend_ms": round(suspend, 2), "total_ms": round(total, 2),
        "phases_ms": phases,
        "naive_suspend_ms": round(naive_suspend, 2),
        "naive_over_suspend": round(naive_suspend / suspend, 1),
        "rss_growth_mb": round(growth, 2), "upgrades_for_rss": MEMORY_UPGRADES,
        "goals_met": suspend <= 5 and naive_suspend >= 10 * suspend and growth < 10}))


if __name__ == "__main__":
    main()
