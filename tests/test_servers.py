"""Servers, asyncio loops and the pause: real threads, real sockets, real forks."""

import asyncio
import gc
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import flydeploy
from flydeploy import _Pause
from tests.waiting import DEADLINE_S, wait_until

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Counter(flydeploy.Server):
    vsn = 1

    def init(self, start=0, log=None):
        self.log = log if log is not None else []
        return {"n": start, "seen": []}

    def handle_call(self, request, state):
        if request == "get":
            return state["n"], state
        if request == "seen":
            return list(state["seen"]), state
        if request == "boom":
            state = {"n": -1, "seen": []}  # a new state never returned
            raise ValueError("boom requested")
        if request == "bad-return":
            return "not a pair"
        if isinstance(request, tuple) and request[0] == "wait":
            request[1].set()
            request[2].wait(DEADLINE_S)
            return "waited", {"n": state["n"] + 100, "seen": state["seen"]}
        raise KeyError(request)

    def handle_cast(self, message, state):
        if message == "crash":
            raise RuntimeError("cast crash")
        if isinstance(message, tuple) and message[0] == "block":
            message[1].set()
            message[2].wait(DEADLINE_S)
            return state
        return {"n": state["n"] + 1, "seen": state["seen"] + [message]}

    def handle_info(self, message, state):
        if message == "crash":
            raise RuntimeError("info crash")
        return {"n": state["n"], "seen": state["seen"] + [("info", message)]}

    def code_change(self, old_vsn, state, extra):
        return {"n": state["n"] * extra, "seen": state["seen"] + [("code_change", old_vsn)]}

    def terminate(self, reason, state):
        self.log.append((reason, state["n"]))


@pytest.fixture(autouse=True)
def no_leftover_servers():
    yield
    for server in flydeploy.servers():
        server.stop(timeout=DEADLINE_S)
    for loop in list(flydeploy._attached_loops):
        flydeploy.detach_loop(loop)
    assert flydeploy.servers() == []


def busy(server):
    """Make ``server`` busy with one message until the returned event is set."""
    entered, release = threading.Event(), threading.Event()
    server.cast(("block", entered, release))
    assert entered.wait(DEADLINE_S)
    return release


# --- servers ----------------------------------------------------------------


def test_call_cast_send_stop_and_terminate():
    log = []
    counter = Counter.start(5, log=log, name="counter")
    assert counter.name == "counter" and counter.alive
    assert counter._thread.daemon
    assert counter.call("get") == 5
    assert counter.cast("a") is True
    assert counter.send("hello") is True
    assert counter.call("seen") == ["a", ("info", "hello")]
    assert flydeploy.servers() == [counter]
    counter.stop(reason="shutdown")
    assert log == [("shutdown", 6)]
    assert not counter.alive and not counter._thread.is_alive()
    assert flydeploy.servers() == []
    assert counter.cast("late") is False and counter.send("late") is False
    counter.stop()  # a second stop does nothing


def test_exception_in_init_is_raised_in_the_caller_and_frees_the_name():
    class Broken(flydeploy.Server):
        def init(self):
            raise OSError("no database")

    with pytest.raises(OSError, match="no database"):
        Broken.start(name="svc")
    assert flydeploy.servers() == []
    assert Counter.start(name="svc").call("get") == 0


def test_call_error_keeps_state_and_the_server_running():
    counter = Counter.start(3)
    counter.cast("x")
    with pytest.raises(flydeploy.CallError, match="ValueError: boom requested") as caught:
        counter.call("boom")
    assert isinstance(caught.value.__cause__, ValueError)
    assert counter.call("get") == 4
    with pytest.raises(flydeploy.CallError) as caught:
        counter.call("bad-return")
    assert isinstance(caught.value.__cause__, TypeError)
    assert "(reply, new_state)" in str(caught.value.__cause__)
    assert counter.call("get") == 4


def test_cast_and_info_exceptions_are_logged_and_state_kept(caplog):
    counter = Counter.start(1)
    counter.cast("crash")
    counter.send("crash")
    counter.cast("after")
    assert counter.call("get") == 2
    assert counter.call("seen") == ["after"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("handle_cast raised" in m for m in messages)
    assert any("handle_info raised" in m for m in messages)


def test_call_timeout_and_the_late_reply_is_dropped():
    counter = Counter.start(7)
    release = busy(counter)
    with pytest.raises(flydeploy.CallTimeout, match="did not reply within 0.1"):
        counter.call("get", timeout=0.1)
    release.set()
    counter.cast("after")
    # The timed-out call is still answered (7) but to nobody: this call gets its own reply.
    assert counter.call("get") == 8


def test_call_to_a_stopped_server_fails_at_once_even_when_queued_behind_the_stop():
    counter = Counter.start()
    release = busy(counter)
    outcomes = []

    def late_call():
        try:
            counter.call("get", timeout=DEADLINE_S)
        except flydeploy.CallError as error:
            outcomes.append(error)

    stopper = threading.Thread(target=counter.stop)
    stopper.start()
    wait_until(lambda: len(counter._mailbox._queue) == 1, "the stop to be queued")
    caller = threading.Thread(target=late_call)
    caller.start()
    wait_until(lambda: len(counter._mailbox._queue) == 2, "the call to be queued")
    release.set()
    caller.join(DEADLINE_S)
    stopper.join(DEADLINE_S)
    assert len(outcomes) == 1 and isinstance(outcomes[0], flydeploy.ServerStopped)
    # At once: a CallTimeout here would mean it waited for the timeout.
    with pytest.raises(flydeploy.ServerStopped, match="not running"):
        counter.call("get", timeout=DEADLINE_S)


def test_stop_of_a_busy_server_times_out_then_completes():
    log = []
    counter = Counter.start(log=log)
    release = busy(counter)
    with pytest.raises(flydeploy.CallTimeout, match="did not stop within"):
        counter.stop(timeout=0.05)
    release.set()
    wait_until(lambda: not counter.alive, "the server to stop")
    assert log == [("normal", 0)]


def test_a_server_stops_itself_or_dies_cleanly_from_a_handler():
    log = []

    class Quitter(flydeploy.Server):
        def init(self):
            return "state"

        def handle_cast(self, message, state):
            if message == "quit":
                self.stop(reason="asked")
                return "after quit"
            raise SystemExit(3)

        def terminate(self, reason, state):
            log.append((reason if isinstance(reason, str) else type(reason).__name__, state))

    quitter = Quitter.start()
    with _Pause([quitter], timeout=DEADLINE_S):  # both queued before the stop is
        quitter.cast("quit")
        quitter.cast("dies")  # ahead of the stop: handled, and it kills the server
    quitter._thread.join(DEADLINE_S)
    assert log == [("SystemExit", "after quit")]
    assert not quitter.alive
    with pytest.raises(flydeploy.ServerStopped):
        quitter.call("anything")
    polite = Quitter.start()
    polite.cast("quit")
    polite._thread.join(DEADLINE_S)
    assert log[-1] == ("asked", "after quit") and not polite.alive


def test_a_server_cannot_call_itself_or_read_its_own_state():
    class SelfCaller(flydeploy.Server):
        def handle_call(self, request, state):
            try:
                if request == "call":
                    self.call("again")
                else:
                    flydeploy.get_state(self)
            except flydeploy.CallError as error:
                return str(error), state
            return "no error", state

    server = SelfCaller.start()
    assert "called itself" in server.call("call")
    assert "get_state for itself" in server.call("state")


def test_get_state_reads_at_a_safe_point():
    counter = Counter.start(1)
    entered, release = threading.Event(), threading.Event()
    replies = []
    caller = threading.Thread(target=lambda: replies.append(
        counter.call(("wait", entered, release), timeout=DEADLINE_S)))
    caller.start()
    assert entered.wait(DEADLINE_S)
    with pytest.raises(flydeploy.CallTimeout, match="safe point"):
        flydeploy.get_state(counter, timeout=0.05)
    states = []
    reader = threading.Thread(target=lambda: states.append(flydeploy.get_state(counter)))
    reader.start()
    release.set()
    reader.join(DEADLINE_S)
    caller.join(DEADLINE_S)
    # The reader waited for the message to finish: it sees its new state.
    assert states == [{"n": 101, "seen": []}] and replies == ["waited"]
    counter.stop()
    with pytest.raises(flydeploy.ServerStopped):
        flydeploy.get_state(counter)


def test_names_are_unique_among_live_servers():
    first = Counter.start(name="unique")
    with pytest.raises(flydeploy.FlyDeployError, match="'unique' is already running"):
        Counter.start(name="unique")
    assert flydeploy.servers() == [first]
    first.stop()
    second = Counter.start(2, name="unique")
    assert second.call("get") == 2


# --- the pause --------------------------------------------------------------


def test_messages_queued_during_a_pause_are_handled_in_order_afterwards():
    counter = Counter.start()
    with _Pause([counter], timeout=DEADLINE_S) as pause:
        sender = threading.Thread(target=lambda: [counter.cast(i) for i in range(200)])
        sender.start()
        sender.join(DEADLINE_S)
        counter.send("info")
        wait_until(lambda: len(counter._mailbox._queue) >= 200, "the casts to be queued")
        assert counter._state == {"n": 0, "seen": []}  # nothing handled while held
    assert counter.call("seen") == list(range(200)) + [("info", "info")]
    assert pause.held_ms > 0


def test_code_change_by_the_holding_thread_while_held():
    counter = Counter.start(4)
    with _Pause([counter], timeout=DEADLINE_S):
        counter.cast("during")
        old_vsn = type(counter).vsn
        counter._state = counter.code_change(old_vsn, counter._state, 10)
        assert flydeploy.get_state(counter) == {"n": 40, "seen": [("code_change", 1)]}
    # The cast queued during the pause runs on the migrated state.
    assert counter.call("get") == 41
    assert counter.call("seen") == [("code_change", 1), "during"]


def test_a_thousand_idle_servers_are_held_and_all_come_back():
    many = [Counter.start(i) for i in range(1000)]
    with _Pause(flydeploy.servers(), timeout=DEADLINE_S) as pause:
        assert all(server._held_by is pause._hold for server in many)
        for server in many:
            server.cast("x")
        # Every thread now waits at its safe point: no handler ran.
        assert all(server._state["n"] == i for i, server in enumerate(many))
    assert [server.call("get") for server in many] == [i + 1 for i in range(1000)]
    assert all(server._held_by is None for server in many)


def test_a_busy_server_past_the_timeout_is_named_and_everything_released():
    idle = Counter.start(name="idle")
    stuck = Counter.start(name="stuck")
    also_stuck = Counter.start()
    releases = [busy(stuck), busy(also_stuck)]
    with pytest.raises(flydeploy.SuspendTimeout) as caught:
        with _Pause([idle, stuck, also_stuck], timeout=0.2):
            raise AssertionError("the pause must not be entered")
    assert caught.value.names == ["stuck", repr(also_stuck)]
    assert "stuck" in str(caught.value) and "nothing changed" in str(caught.value)
    # Everything is released: the idle server answers, the stuck ones do once free.
    assert idle.call("get", timeout=DEADLINE_S) == 0
    for release in releases:
        release.set()
    assert stuck.call("get") == 0 and also_stuck.call("get") == 0
    with _Pause([idle, stuck, also_stuck], timeout=DEADLINE_S):
        pass  # and a later pause gets all of them


def test_the_pause_waits_for_a_busy_server_to_finish_its_message():
    counter = Counter.start()
    release = busy(counter)
    counter.cast("queued")
    threading.Timer(0.05, release.set).start()
    with _Pause([counter], timeout=DEADLINE_S):
        assert release.is_set()  # held only once the message was done
        assert counter._state["seen"] == []  # ... and before the queued one
    assert counter.call("seen") == ["queued"]


def test_a_busy_server_calling_a_marked_server_is_answered_while_the_pause_waits():
    class Front(flydeploy.Server):
        def init(self, back):
            return back

        def handle_cast(self, message, back):
            entered, go, answers = message
            entered.set()
            go.wait(DEADLINE_S)
            answers.append(back.call("get", timeout=DEADLINE_S))
            return back

    back = Counter.start(9)
    front = Front.start(back)
    entered, go, answers = threading.Event(), threading.Event(), []
    front.cast((entered, go, answers))
    assert entered.wait(DEADLINE_S)
    back_release = busy(back)
    inside = []

    def pause():
        with _Pause([back, front], timeout=DEADLINE_S):
            inside.append(list(answers))

    pauser = threading.Thread(target=pause)
    pauser.start()
    wait_until(lambda: back._held_by is not None and front._held_by is not None,
               "both busy servers to be marked")
    back_release.set()
    wait_until(lambda: not back._running, "the back server to stop at its safe point")
    assert back._held_by is not None
    go.set()
    pauser.join(DEADLINE_S)
    # The front server got its answer from the marked back server, then both were held.
    assert inside == [[9]]


# --- asyncio ----------------------------------------------------------------


class LoopThread:
    """An asyncio loop in its own thread, like an app's server thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=DEADLINE_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def hog(self):
        """Occupy the loop with a coroutine that never awaits (it cannot park, nothing
        else runs) until the returned event is set."""
        hogging, stop = threading.Event(), threading.Event()

        async def hog():
            hogging.set()
            stop.wait(DEADLINE_S)

        asyncio.run_coroutine_threadsafe(hog(), self.loop)
        assert hogging.wait(DEADLINE_S)
        return stop

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE_S)
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


def test_attach_loop_needs_a_loop_and_closed_loops_drop_out():
    with pytest.raises(flydeploy.FlyDeployError, match="no running event loop"):
        flydeploy.attach_loop()
    with pytest.raises(TypeError):
        flydeploy.attach_loop(object())

    async def attach_running():
        return flydeploy.attach_loop()

    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(attach_running()) is loop
    assert loop in flydeploy._live_loops()
    loop.close()
    assert loop not in flydeploy._live_loops()
    other = flydeploy.attach_loop(asyncio.new_event_loop())
    flydeploy.detach_loop(other)
    assert other not in flydeploy._live_loops()
    forgotten = flydeploy.attach_loop(asyncio.new_event_loop())
    forgotten.close()
    del forgotten, other, loop
    gc.collect()
    assert len(flydeploy._attached_loops) == 0


def test_a_tcp_stream_served_by_asyncio_is_parked_and_keeps_flowing(loop_thread):
    ticks = []

    async def stream(reader, writer):
        for i in range(10**6):
            ticks.append(i)
            writer.write(f"{i}\n".encode())
            await writer.drain()
            await asyncio.sleep(0.001)

    async def start():
        flydeploy.attach_loop()
        server = await asyncio.start_server(stream, "127.0.0.1", 0)
        return server.sockets[0].getsockname()[1]

    port = loop_thread.run(start())
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as conn:
        lines = conn.makefile("r")
        assert int(lines.readline()) == 0
        wait_until(lambda: len(ticks) > 5, "the stream to flow")
        with _Pause([], timeout=DEADLINE_S) as pause:
            parked_at = len(ticks)
            time.sleep(0.05)  # give a running loop every chance to tick
            assert len(ticks) == parked_at  # every coroutine is parked at an await
        wait_until(lambda: len(ticks) > parked_at + 5, "the stream to resume")
        received = [int(lines.readline()) for _ in range(parked_at + 5)]
        assert received == list(range(1, parked_at + 6))  # same connection, nothing lost
    assert pause.held_ms >= 50


def test_a_coroutine_calling_a_server_finishes_its_call_before_the_pause(loop_thread):
    counter = Counter.start()
    flydeploy.attach_loop(loop_thread.loop)
    release = busy(counter)
    call_started = threading.Event()

    answers = []

    async def call_blocking():
        call_started.set()
        answers.append(counter.call("get", timeout=DEADLINE_S))  # blocks the loop meanwhile

    asyncio.run_coroutine_threadsafe(call_blocking(), loop_thread.loop)
    assert call_started.wait(DEADLINE_S)
    threading.Timer(0.05, release.set).start()
    # Loops park first, so the call is answered before the server is held.
    with _Pause([counter], timeout=DEADLINE_S):
        assert answers == [0]


def test_a_hogged_loop_is_named_and_everything_released(loop_thread):
    counter = Counter.start(name="bystander")
    flydeploy.attach_loop(loop_thread.loop)
    stop_hog = loop_thread.hog()
    with pytest.raises(flydeploy.SuspendTimeout) as caught:
        with _Pause([counter], timeout=0.2):
            raise AssertionError("the pause must not be entered")
    assert caught.value.names == [repr(loop_thread.loop)]
    assert counter.call("get") == 0  # the bystander was released
    stop_hog.set()

    async def alive():
        await asyncio.sleep(0)
        return "running"

    assert loop_thread.run(alive()) == "running"  # the late callback did not block it


def test_a_pause_entered_from_an_attached_loop_counts_it_as_parked(loop_thread):
    counter = Counter.start()

    async def pause_here():
        flydeploy.attach_loop()
        with _Pause([counter], timeout=1.0):
            return counter._state["n"]

    assert loop_thread.run(pause_here()) == 0


def test_a_second_pause_waits_for_the_first():
    counter = Counter.start()
    order = []
    entered = threading.Event()

    def first():
        with _Pause([counter], timeout=DEADLINE_S):
            entered.set()
            time.sleep(0.05)
            order.append("first")

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(DEADLINE_S)
    with _Pause([counter], timeout=DEADLINE_S):
        order.append("second")
    thread.join(DEADLINE_S)
    assert order == ["first", "second"]
    with pytest.raises(flydeploy.FlyDeployError, match="already holds one"):
        with _Pause([], timeout=1.0):
            with _Pause([], timeout=1.0):
                pass


# --- the pause: gathering without stalling, starting servers, misuse -------


def test_idle_servers_and_loops_keep_working_while_the_pause_waits_for_a_busy_one(loop_thread):
    flydeploy.attach_loop(loop_thread.loop)
    idle = Counter.start(1)
    stuck = Counter.start()
    release = busy(stuck)
    inside = []

    def pause():
        with _Pause([idle, stuck], timeout=DEADLINE_S) as held:
            inside.append(idle._held_by is held._hold and stuck._held_by is held._hold)

    async def tick():
        await asyncio.sleep(0)
        return "tick"

    pauser = threading.Thread(target=pause)
    pauser.start()
    try:
        wait_until(lambda: stuck._held_by is not None, "the busy server to be marked")
        # The pause waits for the busy server: the idle one answers, the loop runs.
        assert idle.call("get", timeout=DEADLINE_S / 2) == 1
        assert loop_thread.run(tick(), timeout=DEADLINE_S / 2) == "tick"
        assert pauser.is_alive() and inside == []
    finally:
        release.set()
        pauser.join(DEADLINE_S)
    assert inside == [True]  # once the busy one was done, everything was held


def test_held_ms_counts_what_a_pause_that_timed_out_held():
    stuck = Counter.start(name="stuck")
    slow = Counter.start(name="slow")
    stuck_release, slow_release = busy(stuck), busy(slow)
    pause = _Pause([stuck, slow], timeout=1.0)
    errors = []

    def run():
        try:
            with pause:
                raise AssertionError("the pause must not be entered")
        except flydeploy.SuspendTimeout as error:
            errors.append(error)

    entered_at = time.monotonic()
    pauser = threading.Thread(target=run)
    pauser.start()
    try:
        wait_until(lambda: stuck._held_by is not None and slow._held_by is not None,
                   "both busy servers to be marked")
        slow_release.set()
        wait_until(lambda: not slow._running, "the slow server to finish its message")
        held_seen_at = time.monotonic()
        assert slow._held_by is not None  # held at its safe point while the pause waits on
        pauser.join(DEADLINE_S)
    finally:
        stuck_release.set()
    assert [error.names for error in errors] == [["stuck"]]
    # The slow server was held from before held_seen_at until the pause gave up,
    # which is no earlier than its deadline.
    assert pause.held_ms >= (entered_at + 1.0 - held_seen_at) * 1000
    assert slow.call("get") == 0 and stuck.call("get") == 0


def test_an_idle_server_is_held_without_waking_its_thread():
    events = []

    def profile(frame, event, arg):
        name = getattr(arg, "__name__", None) if event.startswith("c_") else None
        events.append((event, frame.f_code.co_name, name))

    threading.setprofile(profile)
    try:
        idle = Counter.start(3)
    finally:
        threading.setprofile(None)
    # Asleep in its mailbox: the last thing its thread did is block on the lock.
    parked = [("return", "_release_save", None), ("c_call", "wait", "acquire")]
    wait_until(lambda: events[-2:] == parked, "the server thread to wait for messages")
    other = Counter.start(4)  # not paused: a call to it lets every other thread run
    before = len(events)
    with _Pause([idle], timeout=DEADLINE_S) as pause:
        assert idle._held_by is pause._hold
        assert other.call("get") == 4
    assert idle.call("get") == 3
    # The call woke it once: its wait returned and it went straight to the
    # handler.  Woken by the pause too, it would have waited again first.
    handled = events.index(("call", "handle_call", None), before)
    assert ("c_return", "wait", "acquire") in events[before:handled]
    assert ("call", "wait", None) not in events[before:handled]


def test_a_server_handler_waiting_on_an_attached_loop_finishes_before_the_loop_parks(
        loop_thread):
    flydeploy.attach_loop(loop_thread.loop)

    class Bridge(flydeploy.Server):
        def init(self):
            return []

        def handle_cast(self, message, state):
            entered, go = message
            entered.set()
            go.wait(DEADLINE_S)

            async def answer():
                await asyncio.sleep(0)
                return "from the loop"

            future = asyncio.run_coroutine_threadsafe(answer(), loop_thread.loop)
            return state + [future.result(DEADLINE_S)]

    bridge = Bridge.start()
    entered, go = threading.Event(), threading.Event()
    bridge.cast((entered, go))
    assert entered.wait(DEADLINE_S)
    inside = []

    def pause():
        with _Pause([bridge], timeout=DEADLINE_S / 2):
            inside.append(list(bridge._state))

    pauser = threading.Thread(target=pause)
    pauser.start()
    wait_until(lambda: bridge._held_by is not None, "the busy server to be marked")
    go.set()
    pauser.join(DEADLINE_S)
    assert inside == [["from the loop"]]


def test_servers_held_while_a_loop_is_hogged_are_let_go_until_it_is_free(loop_thread):
    counter = Counter.start(2)
    flydeploy.attach_loop(loop_thread.loop)
    stop_hog = loop_thread.hog()
    pause = _Pause([counter], timeout=DEADLINE_S)
    inside = []

    def run():
        with pause:
            inside.append(counter._held_by is pause._hold)

    pauser = threading.Thread(target=run)
    pauser.start()
    try:
        wait_until(lambda: pause.held_ms > 0, "a first try to be given up and released")
        assert counter.call("get", timeout=DEADLINE_S / 2) == 2
        assert pauser.is_alive() and inside == []
    finally:
        stop_hog.set()
        pauser.join(DEADLINE_S)
    assert inside == [True]  # the next try, once the loop was free, got both


class Slow(flydeploy.Server):
    def init(self, entered, go):
        entered.set()
        go.wait(DEADLINE_S)
        return []

    def handle_cast(self, message, state):
        return state + [message]

    def handle_call(self, request, state):
        return list(state), state


def test_a_server_in_init_when_the_pause_starts_is_waited_for_and_held():
    entered, go, started = threading.Event(), threading.Event(), []
    starter = threading.Thread(target=lambda: started.append(Slow.start(entered, go)))
    starter.start()
    try:
        assert entered.wait(DEADLINE_S)
        assert flydeploy.servers() == []  # not live yet
        [slow] = flydeploy._starting_servers.values()

        def finish_init_once_marked():
            wait_until(lambda: slow._held_by is not None, "the starting server to be marked")
            go.set()

        threading.Thread(target=finish_init_once_marked).start()
        with _Pause(flydeploy.servers(), timeout=DEADLINE_S) as pause:
            assert go.is_set()  # the pause waited for init ...
            assert pause.servers == [slow] and slow._held_by is pause._hold  # ... then held it
            starter.join(DEADLINE_S)
            assert started == [slow]
            slow.cast("during")
            assert slow._state == []
    finally:
        go.set()
        starter.join(DEADLINE_S)
    assert slow.call("get") == ["during"]


def test_a_server_started_while_the_pause_holds_runs_init_after_it():
    inits = []

    class Recorder(flydeploy.Server):
        def init(self):
            inits.append(threading.get_ident())
            return 0

        def handle_call(self, request, state):
            return state, state

    started = []
    starter = threading.Thread(target=lambda: started.append(Recorder.start()))
    with _Pause([], timeout=DEADLINE_S) as pause:
        starter.start()
        wait_until(lambda: flydeploy._starting_servers, "the start to register")
        [new] = flydeploy._starting_servers.values()

        def waits_at_the_gate():
            frame = sys._current_frames().get(new._thread.ident)
            while frame is not None and frame.f_code.co_name != "_enter_message":
                frame = frame.f_back
            return frame is not None

        wait_until(waits_at_the_gate, "the new server to wait before init")
        assert new._held_by is pause._hold and inits == [] and started == []
    starter.join(DEADLINE_S)
    assert started == [new] and inits == [new._thread.ident] and new.call("get") == 0


def test_a_server_started_by_the_holding_thread_runs_init_and_is_then_held():
    with _Pause([], timeout=DEADLINE_S) as pause:
        counter = Counter.start(7)  # init runs now: the holder waits for it
        assert counter.alive and counter._held_by is pause._hold
        assert counter.call("get") == 7  # the holder's own call is answered
        counter.cast("during")
        assert counter._state["n"] == 7
    assert counter.call("seen") == ["during"]


def test_an_infinite_timeout_waits_without_limit_and_bad_timeouts_are_refused(loop_thread):
    flydeploy.attach_loop(loop_thread.loop)
    counter = Counter.start()
    release = busy(counter)
    threading.Timer(0.05, release.set).start()
    with _Pause([counter], timeout=math.inf) as pause:
        assert release.is_set() and counter._held_by is pause._hold
    assert flydeploy.get_state(counter, timeout=math.inf)["n"] == 0
    release = busy(counter)
    threading.Timer(0.05, release.set).start()
    assert counter.call("get", timeout=math.inf) == 0  # waited for the busy message
    release = busy(counter)
    threading.Timer(0.05, release.set).start()
    counter.stop(timeout=math.inf)
    assert not counter.alive
    for bad in (0, -1.0, math.nan, "10", None, True):
        with pytest.raises(flydeploy.FlyDeployError, match="positive number of seconds"):
            _Pause([], timeout=bad)


def test_a_pause_from_a_servers_own_thread_is_refused_at_once():
    class Admin(flydeploy.Server):
        def handle_call(self, request, state):
            with _Pause(flydeploy.servers(), timeout=2.0):
                return "paused", state

    admin = Admin.start(name="admin")
    with pytest.raises(flydeploy.CallError) as caught:
        admin.call("pause", timeout=DEADLINE_S)
    cause = caught.value.__cause__
    assert type(cause) is flydeploy.FlyDeployError, cause
    assert "from the thread of <" in str(cause) and "'admin'" in str(cause)
    with _Pause(flydeploy.servers(), timeout=DEADLINE_S) as pause:  # nothing left locked
        assert pause.servers == [admin]


# --- fork -------------------------------------------------------------------

FORK_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading
    import flydeploy

    class Counter(flydeploy.Server):
        def init(self):
            return []
        def handle_call(self, request, state):
            return (list(state), os.getpid()), state
        def handle_cast(self, message, state):
            if isinstance(message, tuple):  # a slow message, still running at the fork
                message[0].set()
                message[1].wait(30)
                return state + ["slow"]
            return state + [message]

    counter = Counter.start(name="preloaded")
    for i in range(3):
        counter.cast(i)
    counter.call("sync")
    entered, release = threading.Event(), threading.Event()
    counter.cast((entered, release))
    entered.wait(30)
    threading.Timer(0.05, release.set).start()
    read_end, write_end = os.pipe()
    pid = os.fork()  # waits for the slow message: the child's copy is between two messages
    if pid == 0:
        os.close(read_end)
        counter.cast("child")
        state, server_pid = counter.call("get")
        names = [s.name for s in flydeploy.servers()]
        os.write(write_end, json.dumps([state, server_pid == os.getpid(), names]).encode())
        os._exit(0)
    os.close(write_end)
    counter.cast("parent")
    child = json.loads(os.read(read_end, 65536))
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": child, "parent": counter.call("get")[0], "status": status}))
""")


def test_a_forked_child_keeps_serving_its_own_copy(tmp_path):
    script = tmp_path / "fork_app.py"
    script.write_text(FORK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == 0
    assert result["child"] == [[0, 1, 2, "slow", "child"], True, ["preloaded"]]
    assert result["parent"] == [0, 1, 2, "slow", "parent"]
