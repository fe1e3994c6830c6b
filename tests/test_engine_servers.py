"""Upgrades of running servers and event loops: pause, code_change, rollback,
queued messages, an open TCP stream, a hammer of calls, a parked asyncio loop."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import types

import pytest

import flydeploy
from tests.engine_tree import tree  # noqa: F401  (the fixture)
from tests.waiting import wait_until

COUNTER = """
import flydeploy
class Counter(flydeploy.Server):
    vsn = {vsn}
    def init(self, start=0):
        return {{"n": start, "log": []}}
    def handle_call(self, request, state):
        if request == "block":
            state["entered"].set()
            state["release"].wait(30)
            return "unblocked", state
        if isinstance(request, tuple) and request[0] == "arm":
            state["entered"], state["release"] = request[1], request[2]
            return "armed", state
        return {reply}, state
    def handle_cast(self, message, state):
        state["log"].append(({tag!r}, message))
        return state
    def handle_info(self, message, state):
        if isinstance(message, flydeploy.Upgraded):
            state["log"].append(("upgraded", message.modules))
        return state
    def code_change(self, old_vsn, state, extra):
{code_change}
"""
KEEP = "        return state"


def counter_source(vsn=1, reply='state["n"]', tag="old", code_change=KEEP):
    return COUNTER.format(vsn=vsn, reply=reply, tag=tag, code_change=code_change)


def test_code_change_gets_old_vsn_and_upgraded_message_comes_after_queued_ones(tree):
    tree.write("srv.py", counter_source())
    srv = tree.load("srv")
    counter = tree.start(srv.Counter, 5, name=f"{tree.pkg}-counter")
    counter.cast("before")
    assert counter.call("get") == 5  # the cast was handled by the old code
    # the new code_change queues messages while everything is held: they are
    # handled afterwards, in order, by the new handle_cast
    tree.write("srv.py", counter_source(vsn=2, reply='state["n"] * 100', tag="new", code_change="""
        for i in range(5):
            self.cast(i)
        return {**state, "n": state["n"] + 1, "from": old_vsn, "extra": extra}"""))
    report = tree.reload(extra={"why": "test"})
    assert report.ok, report.error
    assert report.servers_upgraded == [f"{tree.pkg}-counter"]
    assert counter.call("get") == 600
    state = flydeploy.get_state(counter)
    assert state["from"] == 1 and state["extra"] == {"why": "test"}
    assert state["log"] == [("old", "before")] + [("new", i) for i in range(5)] + [
        ("upgraded", (tree.name("srv"),))]
    assert report.suspend_ms > 0


def test_server_started_at_module_level_is_not_started_again(tree):
    tree.write("srv.py", counter_source())
    tree.write("app.py", f"""
        from {tree.pkg} import srv
        counter = srv.Counter.start(7, name="{tree.pkg}-module-level")
        def describe():
            return "old"
    """)
    app = tree.load("app")
    tree.started.append(app.counter)
    before = flydeploy.servers()
    tree.write("app.py", f"""
        from {tree.pkg} import srv
        counter = srv.Counter.start(7, name="{tree.pkg}-module-level")
        def describe():
            return "new"
    """)
    report = tree.reload()
    assert report.ok, report.error
    assert app.describe() == "new" and flydeploy.servers() == before
    assert app.counter.call("get") == 7


def test_unaffected_server_gets_no_code_change_or_message(tree):
    tree.write("srv.py", counter_source())
    tree.write("other.py", counter_source(code_change='        raise AssertionError("not me")'))
    srv, other = tree.load("srv"), tree.load("other")
    tree.start(srv.Counter)
    bystander = tree.start(other.Counter)
    tree.write("srv.py", counter_source(reply='"new"'))
    report = tree.reload()
    assert report.ok, report.error
    assert flydeploy.get_state(bystander)["log"] == []
    assert repr(bystander) not in report.servers_upgraded


def test_busy_server_past_suspend_timeout_aborts_before_anything_changed(tree):
    tree.write("srv.py", counter_source())
    srv = tree.load("srv")
    busy = tree.start(srv.Counter, name=f"{tree.pkg}-busy")
    entered, release = threading.Event(), threading.Event()
    busy.call(("arm", entered, release))
    blocked = threading.Thread(target=busy.call, args=("block", 30))
    blocked.start()
    try:
        assert entered.wait(10)
        tree.write("srv.py", counter_source(reply='"new"'))
        report = tree.reload(suspend_timeout=0.2)
        assert not report.ok and not report.rolled_back
        assert report.servers_failed == [f"{tree.pkg}-busy"] and f"{tree.pkg}-busy" in report.error
        assert srv.Counter.handle_call.__code__.co_consts.count("new") == 0
        assert tree.name("srv") in flydeploy.modified_modules()
    finally:
        release.set()
        blocked.join(10)
    assert busy.call("get") == 0
    assert tree.reload().ok and busy.call("get") == "new"


def test_failing_code_change_rolls_back_code_and_every_state_and_loses_no_message(tree):
    tree.write("srv.py", counter_source())
    srv = tree.load("srv")
    first = tree.start(srv.Counter, 1, name=f"{tree.pkg}-first")
    second = tree.start(srv.Counter, 2, name=f"{tree.pkg}-second")
    tree.write("srv.py", counter_source(reply='"new"', tag="new", code_change="""
        self.cast("queued during the pause")
        if state["n"] == 2:
            raise ValueError("cannot migrate")
        return {"n": -1, "log": state["log"]}"""))
    report = tree.reload()
    assert not report.ok and report.rolled_back and "cannot migrate" in report.error
    assert report.servers_failed == [f"{tree.pkg}-second"]
    assert first.call("get") == 1 and second.call("get") == 2
    assert flydeploy.get_state(first)["log"] == [("old", "queued during the pause")]
    assert flydeploy.get_state(second)["log"] == [("old", "queued during the pause")]
    assert tree.name("srv") in flydeploy.modified_modules()


def test_tcp_connection_keeps_streaming_across_the_upgrade(tree):
    tree.write("render.py", "def render(n):\n    return f'v1:{n}'\n")
    tree.write("stream.py", f"""
        import flydeploy
        from {tree.pkg} import render
        class Streamer(flydeploy.Server):
            def init(self, conn):
                return {{"conn": conn, "sent": 0}}
            def handle_cast(self, n, state):
                state["conn"].sendall((render.render(n) + "\\n").encode())
                state["sent"] += 1
                return state
    """)
    stream = tree.load("stream")
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    streamer = tree.start(stream.Streamer, conn)
    replies = client.makefile("r")
    seen, warmed_up, stop = [], threading.Event(), threading.Event()

    def produce():
        n = 0
        while not stop.is_set() or n < 200:
            streamer.cast(n)
            seen.append(replies.readline().strip())
            n += 1
            if n == 100:
                warmed_up.set()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        assert warmed_up.wait(30)
        tree.write("render.py", "def render(n):\n    return f'v2:{n}'\n")
        report = tree.reload()
        assert report.ok, report.error
        stop.set()
        producer.join(60)
    finally:
        stop.set()
        client.close(), conn.close(), listener.close()
    assert not producer.is_alive()
    versions = [s.split(":")[0] for s in seen]
    numbers = [int(s.split(":")[1]) for s in seen]
    assert numbers == list(range(len(seen)))  # nothing lost, nothing reordered
    first_new = versions.index("v2")
    assert first_new >= 100
    assert set(versions[:first_new]) == {"v1"} and set(versions[first_new:]) == {"v2"}


def test_hammer_10000_calls_while_signature_and_callers_change(tree):
    tree.write("lib.py", "def price(amount):\n    return amount * 2\n")
    caller = """
        import flydeploy
        from {pkg} import lib
        class Shop(flydeploy.Server):
            def handle_call(self, amount, state):
                return {call}, state
    """
    tree.write("shop.py", caller.format(pkg=tree.pkg, call="lib.price(amount)"))
    shop = tree.load("shop")
    shops = [tree.start(shop.Shop) for _ in range(4)]
    errors, results, progress = [], [], threading.Semaphore(0)

    def hammer(index):
        for i in range(2500):
            try:
                results.append((index, i, shops[index].call(7, timeout=30)))
            except Exception as exc:  # every failure is recorded, none expected
                errors.append(exc)
            if i == 500:
                progress.release()

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert progress.acquire(timeout=60)
    # a module body that takes a while after the signature changed: a server
    # that was not held would call the new price() from its old caller
    tree.write("lib.py", """
        import time
        def price(amount, rate):
            return amount * rate
        time.sleep(0.05)
    """)
    tree.write("shop.py", caller.format(pkg=tree.pkg, call="lib.price(amount, 3)"))
    report = tree.reload()
    for thread in threads:
        thread.join(120)
    assert report.ok, report.error
    assert errors == [] and len(results) == 10000
    for index in range(4):
        mine = [value for k, _, value in sorted(results) if k == index]
        switch = mine.index(21) if 21 in mine else len(mine)
        assert set(mine[:switch]) <= {14} and set(mine[switch:]) == {21}
    assert shops[0].call(1) == 3


def test_attached_loop_parks_coroutines_mid_await_and_resumes_with_new_code(tree):
    tree.write("work.py", """
        ticks = 0
        def step():
            return "old"
    """)
    work = tree.load("work")
    loop = asyncio.new_event_loop()
    results, waited, ticking = [], [], threading.Event()
    resume = None

    async def ticker():
        while results.count("new") < 20:
            work.ticks += 1
            results.append(work.step())
            if work.ticks == 10:
                ticking.set()
            await asyncio.sleep(0)

    async def waiter():
        before = work.step()
        await resume.wait()  # parked at this await across the whole upgrade
        waited.append((before, work.step()))

    async def main():
        nonlocal resume
        resume = asyncio.Event()
        flydeploy.attach_loop()
        await asyncio.wait_for(asyncio.gather(ticker(), waiter()), 60)

    runner = threading.Thread(target=loop.run_until_complete, args=(main(),))
    runner.start()
    try:
        assert ticking.wait(30)
        tree.write("work.py", """
            import time
            ticks = 0
            ticks_seen = []
            def step():
                return "new"
            def __hot_upgrade__(old_globals):
                # runs inside the pause: the loop must not tick meanwhile
                ticks_seen.append(ticks)
                deadline = time.monotonic() + 0.05
                while time.monotonic() < deadline:
                    pass
                ticks_seen.append(ticks)
        """)
        report = tree.reload()
        assert report.ok, report.error
        loop.call_soon_threadsafe(resume.set)
        runner.join(60)
    finally:
        flydeploy.detach_loop(loop)
        if runner.is_alive():
            loop.call_soon_threadsafe(resume.set)
            runner.join(60)
        loop.close()
    assert work.ticks_seen[0] == work.ticks_seen[1] >= 10
    assert waited == [("old", "new")]
    first_new = results.index("new")
    assert first_new >= 10 and set(results[:first_new]) == {"old"}
    assert set(results[first_new:]) == {"new"}
    assert report.suspend_ms > 0


@pytest.mark.parametrize("plain", [True, False], ids=["plain-data", "with-a-lock"])
def test_rollback_restores_the_contents_of_states_changed_in_place(tree, plain):
    source = """
        import flydeploy
        import threading
        class S(flydeploy.Server):
            vsn = {vsn}
            def init(self, n, plain):
                state = {{"n": n, "tags": ["start"]}}
                return state if plain else {{**state, "lock": threading.Lock()}}
            def handle_call(self, request, state):
                return {{k: v for k, v in state.items() if k != "lock"}}, state
            def code_change(self, old_vsn, state, extra):
        {code_change}
    """
    tree.write("m.py", source.format(vsn=1, code_change="        return state"))
    m = tree.load("m")
    a, b = tree.start(m.S, 1, plain), tree.start(m.S, 2, plain)
    tree.write("m.py", source.format(vsn=2, code_change="""
                state["n"] *= 100
                state["tags"].append("migrated")
                if state["n"] == 200:
                    raise ValueError("cannot migrate b")
                return state"""))
    report = tree.reload()
    assert report.rolled_back and report.servers_failed == [repr(b)]
    if plain:  # copied deeply: everything as it was
        assert a.call("get") == {"n": 1, "tags": ["start"]}
        assert b.call("get") == {"n": 2, "tags": ["start"]}
    else:  # a lock cannot be copied: the state's own entries are restored
        assert a.call("get")["n"] == 1 and b.call("get")["n"] == 2


def test_only_states_an_apps_own_code_change_can_change_are_copied_in_the_pause(tree, monkeypatch):
    source = """
        import flydeploy
        class Plain(flydeploy.Server):
            vsn = {vsn}
            def init(self):
                return "plain state"
        class Migrating(flydeploy.Server):
            vsn = {vsn}
            def init(self):
                return "migrating state"
            def code_change(self, old_vsn, state, extra):
                return state + " migrated"
    """
    tree.write("m.py", source.format(vsn=1))
    m = tree.load("m")
    plain, migrating = tree.start(m.Plain), tree.start(m.Migrating)
    copied = []
    snapshot = flydeploy._snapshot
    monkeypatch.setattr(flydeploy, "_snapshot", lambda states: copied.append(list(states)) or snapshot(states))
    tree.write("m.py", source.format(vsn=2))
    report = tree.reload()
    assert report.ok, report.error
    assert copied == [["migrating state"]]
    assert flydeploy.get_state(plain) == "plain state"
    assert flydeploy.get_state(migrating) == "migrating state migrated"


def test_code_change_gets_the_version_the_class_attribute_had(tree):
    source = """
        import flydeploy
        VERSION = {vsn}
        class S(flydeploy.Server):
            vsn = VERSION
            def init(self):
                return []
            def handle_call(self, request, state):
                return state, state
            def code_change(self, old_vsn, state, extra):
                return state + [(old_vsn, VERSION)]
    """
    tree.write("m.py", source.format(vsn=1))
    m = tree.load("m")
    server = tree.start(m.S)
    for vsn in (2, 3):
        tree.write("m.py", source.format(vsn=vsn))
        assert tree.reload().ok
    assert server.call("get") == [(1, 2), (2, 3)]


def test_edited_module_level_start_of_a_named_server_keeps_the_live_one(tree):
    tree.write("srv.py", counter_source())
    app_source = """
        from {pkg} import srv
        counter = srv.Counter.start({start}, name="{pkg}-edited")
    """
    tree.write("app.py", app_source.format(pkg=tree.pkg, start=7))
    app = tree.load("app")
    tree.started.append(app.counter)
    live, before = app.counter, flydeploy.servers()
    tree.write("app.py", app_source.format(pkg=tree.pkg, start=8))
    report = tree.reload()
    assert report.ok, report.error
    assert app.counter is live and flydeploy.servers() == before and live.call("get") == 7


def test_server_started_by_a_failed_upgrade_is_stopped_again(tree):
    tree.write("srv.py", counter_source())
    tree.write("app.py", "X = 1\n")
    app = tree.load("app")
    before = flydeploy.servers()
    tree.write("app.py", f"""
        from {tree.pkg} import srv
        extra = srv.Counter.start(name="{tree.pkg}-new")
        X = 2
        raise RuntimeError("boom")
    """)
    report = tree.reload("app")
    assert report.rolled_back and app.X == 1
    assert flydeploy.servers() == before


def test_refusal_suspends_nothing_while_servers_and_loops_run(tree):
    tree.write("srv.py", counter_source())
    srv = tree.load("srv")
    counter = tree.start(srv.Counter)
    loop = asyncio.new_event_loop()
    ticks = []
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    flydeploy.attach_loop(loop)
    entered = []
    real_enter = flydeploy._Pause.__enter__
    try:
        flydeploy._Pause.__enter__ = lambda self: entered.append(1) or real_enter(self)
        tree.write("helpers.py", "def g(:\n    pass\n")
        tree.write("srv.py", f"from {tree.pkg} import helpers\n" + counter_source(reply='"new"'))
        report = tree.reload()
        loop.call_soon_threadsafe(ticks.append, 1)
        assert not report.ok and not report.rolled_back and "line 1" in report.error
        assert not entered and report.suspend_ms == 0 and counter.call("get") == 0
    finally:
        flydeploy._Pause.__enter__ = real_enter
        flydeploy.detach_loop(loop)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert ticks == [1]


def test_reload_from_a_servers_own_handler_is_a_clear_misuse_error(tree):
    tree.write("mod.py", "def f():\n    return 1\n")
    mod = tree.load("mod")

    class Admin(flydeploy.Server):
        def handle_call(self, request, state):
            return flydeploy.reload_modules(suspend_timeout=2.0), state

    admin = tree.start(Admin, name=f"{tree.pkg}-admin")
    tree.write("mod.py", "def f():\n    return 2\n")
    with pytest.raises(flydeploy.CallError) as caught:
        admin.call("upgrade", timeout=30)
    cause = caught.value.__cause__
    assert type(cause) is flydeploy.FlyDeployError, cause
    assert "from the thread of" in str(cause) and f"{tree.pkg}-admin" in str(cause)
    assert mod.f() == 1 and tree.name("mod") in flydeploy.modified_modules()
    assert tree.reload().ok and mod.f() == 2


STARTING = """
import flydeploy
import {hooks}
def part_a():
    return {tag!r}
{body}
def part_b():
    return {tag!r}
class Starting(flydeploy.Server):
    def init(self):
        {hooks}.init_entered.set()
        {hooks}.init_go.wait(30)
        return []
    def handle_call(self, request, state):
        return (part_a(), part_b()), state
"""


def test_a_server_starting_when_an_upgrade_begins_is_held_through_the_swap(tree):
    hooks_name = f"{tree.pkg}_hooks"
    hooks = types.SimpleNamespace(**{name: threading.Event() for name in (
        "init_entered", "init_go", "body_started", "body_go")})
    sys.modules[hooks_name] = hooks
    tree.write("starting.py", STARTING.format(hooks=hooks_name, tag="old", body=""))
    starting = tree.load("starting")
    started, reports = [], []
    starter = threading.Thread(target=lambda: started.append(starting.Starting.start()))
    reloader = threading.Thread(target=lambda: reports.append(tree.reload(suspend_timeout=30)))
    starter.start()
    try:
        assert hooks.init_entered.wait(30)
        [server] = flydeploy._starting_servers.values()
        # The new module body stops halfway: part_a is new, part_b still old.
        tree.write("starting.py", STARTING.format(
            hooks=hooks_name, tag="new", body=f"{hooks_name}.body_started.set()\n"
                                              f"{hooks_name}.body_go.wait(30)"))
        reloader.start()
        # The upgrade waits for the init that is running, then holds the server.
        wait_until(lambda: server._held_by is not None, "the starting server to be marked")
        hooks.init_go.set()
        assert hooks.body_started.wait(30)
        starter.join(30)
        assert started == [server]
        with pytest.raises(flydeploy.CallTimeout):
            server.call("parts", timeout=0.3)  # no answer from a half-executed module body
    finally:
        hooks.init_go.set()
        hooks.body_go.set()
        starter.join(30)
        if reloader.ident is not None:
            reloader.join(30)
        del sys.modules[hooks_name]
    try:
        assert [report.ok for report in reports] == [True], reports
        assert server.call("parts") == ("new", "new")
    finally:
        server.stop(timeout=10)


MIGRATING = """
import flydeploy
import {hooks}
class S(flydeploy.Server):
    vsn = {vsn}
    def init(self, n):
        return n
    def handle_call(self, request, state):
        return ({tag!r}, state), state
    def code_change(self, old_vsn, state, extra):
{code_change}
"""


def test_a_code_change_that_hangs_halfway_through_a_batch_is_rolled_back_at_the_deadline(tree):
    hooks_name = f"{tree.pkg}_hooks"
    hooks = types.SimpleNamespace(entered=threading.Event(), release=threading.Event(), ran=[])
    sys.modules[hooks_name] = hooks
    try:
        tree.write("m.py", MIGRATING.format(hooks=hooks_name, vsn=1, tag="old", code_change="        return state"))
        m = tree.load("m")
        servers = [tree.start(m.S, n) for n in range(1000)]
        # The 500th code_change of the batch never returns until the test says so.
        tree.write("m.py", MIGRATING.format(hooks=hooks_name, vsn=2, tag="new", code_change=f"""
        {hooks_name}.ran.append(state)
        if state == 499:
            {hooks_name}.entered.set()
            {hooks_name}.release.wait()
        return state + 1000"""))
        report = tree.reload(suspend_timeout=2.0)
        assert hooks.entered.is_set() and not hooks.release.is_set()
        assert not report.ok and report.rolled_back, report
        assert "did not return within the 2 s the pause may last" in report.error
        assert report.servers_failed == [repr(servers[499])]
        assert 1000 < report.suspend_ms < 2000 + 3000  # held until the deadline, not until the hang ends
        # Rolled back and resumed: old code, and the 499 states already migrated are restored.
        assert [server.call("get") for server in servers] == [("old", n) for n in range(1000)]
        assert tree.name("m") in flydeploy.modified_modules()
        # The late return changes nothing, and the rest of the batch never runs.
        hooks.release.set()
        wait_until(lambda: "flydeploy-code-change" not in [t.name for t in threading.enumerate()],
                   "the late code_change to return")
        assert hooks.ran == list(range(500))
        assert [server.call("get") for server in servers] == [("old", n) for n in range(1000)]
        # Nothing stays stuck: the next upgrade migrates every server.
        tree.write("m.py", MIGRATING.format(hooks=hooks_name, vsn=3, tag="newer",
                                            code_change="        return state + 1000"))
        report = tree.reload(suspend_timeout=10.0)
        assert report.ok, report.error
        assert [server.call("get") for server in servers] == [("newer", n + 1000) for n in range(1000)]
    finally:
        hooks.release.set()
        del sys.modules[hooks_name]


def test_code_change_may_call_a_server_while_everything_is_held(tree):
    source = """
        import flydeploy
        class Registry(flydeploy.Server):
            def init(self):
                return []
            def handle_call(self, request, state):
                return len(state) + 1, state + [request]
        class S(flydeploy.Server):
            vsn = {vsn}
            def init(self, registry):
                return {{"registry": registry}}
            def handle_call(self, request, state):
                return {{k: v for k, v in state.items() if k != "registry"}}, state
            def code_change(self, old_vsn, state, extra):
        {code_change}
    """
    tree.write("m.py", source.format(vsn=1, code_change="        return state"))
    m = tree.load("m")
    registry = tree.start(m.Registry)
    servers = [tree.start(m.S, registry) for _ in range(3)]
    tree.write("m.py", source.format(vsn=2, code_change="""
                return {**state, "seat": state["registry"].call(old_vsn, timeout=5)}"""))
    report = tree.reload(suspend_timeout=10.0)
    assert report.ok, report.error
    assert [server.call("get") for server in servers] == [{"seat": 1}, {"seat": 2}, {"seat": 3}]
    assert registry.call("count") == 4  # three code_change calls were answered


def test_no_thread_for_code_change_refuses_before_holding_anything(tree, monkeypatch):
    tree.write("srv.py", counter_source())
    srv = tree.load("srv")
    counter = tree.start(srv.Counter, 3)
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == "flydeploy-code-change":
            raise RuntimeError("can't start new thread")
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    tree.write("srv.py", counter_source(reply='"new"'))
    report = tree.reload()
    assert not report.ok and not report.rolled_back and report.suspend_ms == 0
    assert "could not start the thread that runs code_change (can't start new thread)" in report.error
    assert counter.call("get") == 3 and tree.name("srv") in flydeploy.modified_modules()
    monkeypatch.undo()
    assert tree.reload().ok and counter.call("get") == "new"
