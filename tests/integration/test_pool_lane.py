"""The workers' direct lanes (rapace._lane): a blocking caller writes its call and reads the
reply itself, with the same outcomes as the usual path through the pool's loop."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import gc
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import rapace
import rapace._lane
from rapace import PluginPool

from .pool_services import Calculator

WAIT = 30


@pytest.fixture(scope="module")
def pool() -> Iterator[PluginPool[Calculator]]:
    with PluginPool(Calculator, workers=2) as pool:
        _until_lanes_open(pool)
        yield pool


def _until_lanes_open(pool: PluginPool[Calculator]) -> None:
    """A worker is ready once its lane is open too."""
    assert all(slot.lane is not None for slot in pool._core._slots)


def test_a_blocking_call_takes_a_lane(pool: PluginPool[Calculator]) -> None:
    before = pool.stats()
    assert [pool.submit(Calculator.add, i, 1).result(timeout=WAIT) for i in range(50)] == [
        i + 1 for i in range(50)
    ]
    after = pool.stats()
    assert after["direct_calls"] - before["direct_calls"] == 50
    assert after["calls"] - before["calls"] == 50
    assert after["in_flight"] == 0


def test_a_proxy_call_from_a_thread_takes_a_lane(pool: PluginPool[Calculator]) -> None:
    before = pool.stats()["direct_calls"]
    assert pool.proxy.add(2, 3).result(timeout=WAIT) == 5
    assert pool.stats()["direct_calls"] == before + 1


def test_an_error_comes_back_as_on_the_usual_path(pool: PluginPool[Calculator]) -> None:
    before = pool.stats()
    with pytest.raises(ValueError, match="no good") as caught:
        pool.submit(Calculator.fail, "no good").result(timeout=WAIT)
    assert "pool_services.py" in str(caught.value.__cause__)  # the worker's traceback
    after = pool.stats()
    assert after["errors"] == before["errors"] + 1
    assert after["direct_calls"] == before["direct_calls"] + 1


def test_bad_arguments_fail_the_future_not_submit(pool: PluginPool[Calculator]) -> None:
    future = pool.submit(Calculator.add, "two", 3)
    with pytest.raises(rapace.EncodeError):
        future.result(timeout=WAIT)


def test_futures_nobody_blocks_on_still_complete(pool: PluginPool[Calculator]) -> None:
    # The lanes take the first calls, the pool's loop the rest; the replies on the lanes are
    # collected by the loop when the worker rings, as nobody spins for them.
    futures = [pool.submit(Calculator.add, i, 0) for i in range(8)]
    called = threading.Event()
    futures[0].add_done_callback(lambda _: called.set())
    _, pending = concurrent.futures.wait(futures, timeout=WAIT)
    assert not pending
    assert [f.result() for f in futures] == list(range(8))
    assert called.wait(WAIT)


def test_a_lane_future_can_be_awaited_elsewhere(pool: PluginPool[Calculator]) -> None:
    future = pool.submit(Calculator.sleep, 0.05)

    async def main() -> float:
        with anyio.fail_after(WAIT):
            return await future

    assert anyio.run(main) == 0.05


def test_cancel_reaches_the_handler_in_the_worker() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        _until_lanes_open(pool)
        before = pool.stats()["direct_calls"]
        future = pool.submit(Calculator.sleep, 3600)
        assert pool.stats()["in_flight"] == 1
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result(timeout=WAIT)
        # The lane is free again, and the worker saw the cancellation.
        assert pool.submit(Calculator.wait_cancelled).result(timeout=WAIT) == 1
        assert pool.stats()["direct_calls"] == before + 2


def test_a_worker_killed_mid_call_fails_that_call_with_worker_crashed() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        _until_lanes_open(pool)
        pid = pool.workers[0].pid
        with pytest.raises(rapace.WorkerCrashed) as caught:
            pool.submit(Calculator.die, "kill").result(timeout=WAIT)
        assert caught.value.pid == pid
        assert caught.value.exitcode == -signal.SIGKILL
        assert caught.value.method == "Calculator.die"
        assert pool.submit(Calculator.add, 2, 3).result(timeout=WAIT) == 5  # a new worker
        _until_lanes_open(pool)
        assert pool.submit(Calculator.add, 2, 3).result(timeout=WAIT) == 5
        stats = pool.stats()
        assert stats["restarts"] == 1
        assert stats["direct_calls"] >= 2  # the replaced worker's lane still counts


def test_shutdown_waits_for_a_call_on_a_lane() -> None:
    pool = PluginPool(Calculator, workers=1).start()
    _until_lanes_open(pool)
    future = pool.submit(Calculator.sleep, 0.2)
    assert pool.stats()["in_flight"] == 1
    pool.shutdown(wait=True)
    assert future.done()
    assert future.result() == 0.2


def test_shutdown_without_waiting_cancels_a_call_on_a_lane() -> None:
    pool = PluginPool(Calculator, workers=1).start()
    _until_lanes_open(pool)
    future = pool.submit(Calculator.sleep, 3600)
    pool.shutdown(wait=False)
    _, pending = concurrent.futures.wait([future], timeout=WAIT)
    assert not pending
    assert future.cancelled()
    pool.shutdown()  # joins the pool's thread once the worker is stopped


def test_a_window_of_calls_from_one_thread_rides_the_lanes(
    pool: PluginPool[Calculator],
) -> None:
    before = pool.stats()
    window: collections.deque[rapace.Future[int]] = collections.deque()
    results = []
    for i in range(500):
        window.append(pool.submit(Calculator.add, i, 0))
        if len(window) >= 64:
            results.append(window.popleft().result(timeout=WAIT))
    results += [future.result(timeout=WAIT) for future in window]
    assert results == list(range(500))
    after = pool.stats()
    assert after["direct_calls"] - before["direct_calls"] == 500
    assert after["in_flight"] == 0
    assert all(slot.lane is not None and slot.lane.in_flight == 0 for slot in pool._core._slots)


def test_more_calls_than_a_lane_carries_overflow_to_the_loop() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        _until_lanes_open(pool)
        room = rapace._lane.MAX_IN_FLIGHT
        futures = [pool.submit(Calculator.sleep, 0.2) for _ in range(room + 8)]
        # (The loop counts the other 8 once it takes them, which may not be yet.)
        assert _lane_of(pool).in_flight == room
        assert [f.result(timeout=WAIT) for f in futures] == [0.2] * len(futures)
        assert pool.stats()["direct_calls"] == room


def test_threads_share_the_lanes(pool: PluginPool[Calculator]) -> None:
    before = pool.stats()
    results: dict[int, list[int]] = {}

    def work(thread: int) -> None:
        results[thread] = [
            pool.submit(Calculator.add, thread * 1000 + i, 0).result(timeout=WAIT)
            for i in range(100)
        ]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert results == {n: [n * 1000 + i for i in range(100)] for n in range(4)}
    after = pool.stats()
    assert after["calls"] - before["calls"] == 400
    assert after["direct_calls"] > before["direct_calls"]
    assert after["in_flight"] == 0


@pytest.mark.parametrize(("threads", "met"), [(1, False), (2, True)])
def test_the_lane_and_the_main_link_share_the_worker_s_handler_threads(
    threads: int, met: bool
) -> None:
    # The first call takes the lane; the second, made from an event loop, the pool's loop:
    # with handler_threads=1 the worker runs them one after the other all the same.
    with PluginPool(Calculator, workers=1, handler_threads=threads) as pool:
        _until_lanes_open(pool)
        first = pool.submit(Calculator.meet, 2, 1.0)

        async def second() -> bool:
            with anyio.fail_after(WAIT):
                return await pool.submit(Calculator.meet, 2, 1.0)

        assert anyio.run(second) == met
        assert first.result(timeout=WAIT) == met
        assert pool.stats()["direct_calls"] == 1


def test_a_lane_without_spinning_is_answered_through_its_doorbell() -> None:
    with PluginPool(Calculator, workers=1, spin=0) as pool:
        _until_lanes_open(pool)
        assert [pool.submit(Calculator.add, i, 1).result(timeout=WAIT) for i in range(20)] == [
            i + 1 for i in range(20)
        ]
        assert pool.stats()["direct_calls"] == 20


def test_no_lane_with_a_call_timeout_or_a_socket_transport() -> None:
    with PluginPool(Calculator, workers=1, call_timeout=10) as pool:
        assert pool.submit(Calculator.add, 2, 3).result(timeout=WAIT) == 5
        assert pool.stats()["direct_calls"] == 0
    with PluginPool(Calculator, workers=1, transport="unix") as pool:
        assert pool.submit(Calculator.add, 2, 3).result(timeout=WAIT) == 5
        assert pool.stats()["direct_calls"] == 0


def test_calls_from_an_event_loop_take_the_usual_path(pool: PluginPool[Calculator]) -> None:
    async def main() -> int:
        with anyio.fail_after(WAIT):
            return await pool.submit(Calculator.add, 2, 3)

    before = pool.stats()["direct_calls"]
    assert anyio.run(main) == 5
    assert pool.stats()["direct_calls"] == before


def test_a_done_callback_may_wait_for_the_pool_s_loop() -> None:
    # The thread that collects a lane's reply runs the future's done-callbacks: the caller's
    # own, here (it spins for longer than the call takes, so the worker never rings). Such a
    # callback may wait for the pool's loop, which must not then wait for the lane: it used
    # to run with the lane's lock held, and the loop takes that lock to reap the worker.
    with PluginPool(Calculator, workers=1, spin=1.0) as pool:
        _until_lanes_open(pool)
        old_pid = pool.workers[0].pid
        assert old_pid is not None
        outcome: dict[str, object] = {}

        def follow_up(_: object) -> None:
            outcome["thread"] = threading.get_ident()
            loop = pool._core._loop
            if loop is not None and loop.in_loop_thread():
                return  # the pool's loop collected the reply: nothing may block there
            os.kill(old_pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while "pid" not in outcome:  # calls may still reach the dead worker, and fail
                with contextlib.suppress(rapace.WorkerCrashed, rapace.Unavailable):
                    outcome["pid"] = pool.submit(Calculator.pid).result(timeout=10)
                assert time.monotonic() < deadline

        future = pool.submit(Calculator.sleep, 0.1)
        future.add_done_callback(follow_up)
        assert future.result(timeout=WAIT) == 0.1
        if outcome["thread"] != threading.get_ident():
            pytest.skip("the pool's loop collected the reply, not the caller")
        assert outcome.get("pid") not in (None, old_pid), outcome  # the replacement answered


def test_a_done_callback_that_submits_does_not_take_its_own_lane() -> None:
    # Re-entrant: the lane is still busy with the call being delivered.
    with PluginPool(Calculator, workers=1) as pool:
        _until_lanes_open(pool)
        chained: list[concurrent.futures.Future[int]] = []
        first = pool.submit(Calculator.sleep, 0.05)
        first.add_done_callback(lambda _: chained.append(pool.submit(Calculator.add, 2, 3)))
        assert first.result(timeout=WAIT) == 0.05
        assert chained[0].result(timeout=WAIT) == 5
        assert pool.stats()["in_flight"] == 0


def test_a_lane_closed_under_a_spinning_caller_fails_its_call() -> None:
    # The pool closes a lane on its loop (the worker was reaped) while a caller may be
    # spinning on it; the caller looks at the ring without the lane's lock. Forced here:
    # the lane closes between the caller's check of its future and its look at the ring.
    with PluginPool(Calculator, workers=1, spin=2.0) as pool:
        _until_lanes_open(pool)
        lane = pool._core._slots[0].lane
        assert lane is not None
        transport = lane._transport
        look = transport.input_ready
        closed = threading.Event()
        loop = pool._core._aio_loop
        assert loop is not None

        def close_first() -> bool:
            if not closed.is_set():
                loop.call_soon_threadsafe(lambda: (lane.close(), closed.set()))
                assert closed.wait(WAIT)
            return look()

        transport.input_ready = close_first  # type: ignore[method-assign]
        future = pool.submit(Calculator.sleep, 0.3)
        assert future._lane is lane
        with pytest.raises(rapace.Unavailable, match="lane was closed"):
            future.result(timeout=WAIT)
        # The worker lives on: calls take the loop, the pool shuts down cleanly.
        assert pool.submit(Calculator.add, 2, 3).result(timeout=WAIT) == 5


def test_a_done_callback_may_shut_the_pool_down() -> None:
    # shutdown() waits for the lanes' calls: a call whose future is complete, with only its
    # done-callbacks still running, has finished; waiting for it would wait for this one.
    pool = PluginPool(Calculator, workers=1, spin=1.0).start()
    _until_lanes_open(pool)
    shut = threading.Event()
    where: list[bool] = []

    def stop(_: object) -> None:
        loop = pool._core._loop
        where.append(loop is not None and loop.in_loop_thread())
        if not where[0]:
            pool.shutdown()
            shut.set()

    future = pool.submit(Calculator.sleep, 0.1)
    future.add_done_callback(stop)
    # The caller, in a thread of its own: should shutdown() hang in the callback, this
    # test fails instead of hanging too.
    caller = threading.Thread(target=future.result, args=(WAIT,), daemon=True)
    caller.start()
    caller.join(WAIT)
    if where == [True]:
        pool.shutdown()
        pytest.skip("the pool's loop collected the reply, not the caller")
    assert shut.is_set(), "shutdown() from a done-callback did not return"
    assert future.result() == 0.1


LANELESS_PLUGIN = """
import rapace
from rapace._bootstrap import Bootstrap
from tests.integration.pool_services import Calculator

# A worker that never answers on its lane, as one on an older rapace would not.
Bootstrap.open_lane = lambda self: None

if __name__ == "__main__":
    rapace.serve(Calculator())
"""


def test_a_worker_that_does_not_answer_on_its_lane_is_served_the_usual_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rapace._lane, "HANDSHAKE_TIMEOUT_S", 0.3)
    program = tmp_path / "laneless.py"
    program.write_text(LANELESS_PLUGIN)
    with PluginPool(Calculator, command=[sys.executable, str(program)], workers=1) as pool:
        slot = pool._core._slots[0]
        assert slot.lane is None
        assert slot.lane_driver is not None
        assert slot.lane_driver._closed  # no doorbell reader, no timer left running
        assert pool.submit(Calculator.add, 2, 3).result(timeout=WAIT) == 5
        assert pool.stats()["direct_calls"] == 0


@pytest.mark.parametrize("path", ["lane", "loop"])
def test_a_finished_future_is_freed_with_its_last_reference(path: str) -> None:
    """No reference cycle keeps a result alive until a garbage collection: a result may be a
    lease on shared memory that the worker needs back to reuse its buffer blocks."""
    options = {"call_timeout": 60.0} if path == "loop" else {}
    with PluginPool(Calculator, workers=1, **options) as pool:  # type: ignore[arg-type]
        future = pool.submit(Calculator.add, 2, 3)
        assert future.result(timeout=WAIT) == 5
        assert pool.stats()["direct_calls"] == (1 if path == "lane" else 0)
        gc.disable()
        try:
            freed = weakref.ref(future)
            del future
            assert freed() is None
        finally:
            gc.enable()


def _lane_of(pool: PluginPool[Calculator]) -> rapace._lane.DirectLane:
    lane = pool._core._slots[0].lane
    assert lane is not None
    return lane


def _quiet(pool: PluginPool[Calculator]) -> None:
    """As after a second without calls: the pool's loop no longer looks at the lanes on a
    timer, only when a worker rings."""
    loop = pool._core._aio_loop
    assert loop is not None
    stopped = threading.Event()

    def stop_looking() -> None:
        for slot in pool._core._slots:
            lane = slot.lane
            if lane is not None and lane._recheck is not None:
                lane._recheck.cancel()
                lane._recheck = None
        stopped.set()

    loop.call_soon_threadsafe(stop_looking)
    assert stopped.wait(WAIT)


def test_a_done_callback_may_wait_for_another_call_on_the_lane() -> None:
    # The caller spins for longer than its call takes, so the worker does not ring; the
    # reply's done-callback runs in the caller's thread and waits, without spinning, for
    # another call on the lane. That reply must reach its future meanwhile: the worker has
    # to ring again while the spinner runs user code.
    with PluginPool(Calculator, workers=1, spin=1.0) as pool:
        _until_lanes_open(pool)
        _quiet(pool)
        first = pool.submit(Calculator.sleep, 0.05)
        second = pool.submit(Calculator.sleep, 0.2)
        assert first._lane is second._lane is not None
        waited: dict[str, object] = {}

        def wait_for_second(_: object) -> None:
            waited["thread"] = threading.get_ident()
            done, _ = concurrent.futures.wait([second], timeout=5)
            waited["second"] = bool(done)

        first.add_done_callback(wait_for_second)
        assert first.result(timeout=WAIT) == 0.05
        if waited["thread"] != threading.get_ident():
            pytest.skip("the pool's loop collected the reply, not the caller")
        assert waited["second"], "the other call's reply was not collected"
        assert second.result(timeout=WAIT) == 0.2


def test_a_done_callback_may_shut_the_pool_down_with_more_replies_in_hand() -> None:
    # Two replies collected at once by the spinning caller: the first one's done-callback
    # shuts the pool down while the second, answered, is not completed yet. The one to
    # complete it is the thread waiting in shutdown().
    pool = PluginPool(Calculator, workers=1, spin=2.0).start()
    _until_lanes_open(pool)
    _quiet(pool)
    transport = _lane_of(pool)._transport
    transport.input_ready = lambda: transport._in.available() >= 2  # type: ignore[method-assign]
    shut = threading.Event()
    where: list[bool] = []

    def stop(_: object) -> None:
        loop = pool._core._loop
        where.append(loop is not None and loop.in_loop_thread())
        if len(where) == 1 and not where[0]:
            pool.shutdown()
            shut.set()

    futures = [pool.submit(Calculator.sleep, 0.1) for _ in range(2)]
    for future in futures:
        future.add_done_callback(stop)
    caller = threading.Thread(target=futures[0].result, args=(WAIT,), daemon=True)
    caller.start()
    caller.join(WAIT)
    if where[:1] == [True]:
        pool.shutdown()
        pytest.skip("the pool's loop collected the replies, not the caller")
    assert shut.is_set(), "shutdown() from a done-callback did not return"
    assert [future.result() for future in futures] == [0.1, 0.1]


class _Stop(BaseException):
    pass


def test_a_done_callback_that_raises_leaves_the_other_replies_delivered() -> None:
    # concurrent.futures lets a callback's BaseException (SystemExit, KeyboardInterrupt)
    # through: it reaches the waiting caller, but the other replies collected with it must
    # still reach their futures.
    with PluginPool(Calculator, workers=1, spin=2.0) as pool:
        _until_lanes_open(pool)
        _quiet(pool)
        transport = _lane_of(pool)._transport
        look = transport.input_ready
        transport.input_ready = (  # type: ignore[method-assign]
            lambda: transport._in.available() >= 3
        )
        futures = [pool.submit(Calculator.sleep, 0.1) for _ in range(3)]
        raised: list[int] = []

        def stop(_: object) -> None:
            if not raised:
                raised.append(threading.get_ident())
                raise _Stop

        for future in futures:
            future.add_done_callback(stop)
        with contextlib.suppress(_Stop):
            futures[0].result(timeout=WAIT)
        transport.input_ready = look  # type: ignore[method-assign]
        if raised != [threading.get_ident()]:
            pytest.skip("the pool's loop collected the replies, not the caller")
        done, _ = concurrent.futures.wait(futures, timeout=5)
        assert len(done) == 3, "replies collected with the failing callback's were lost"
        assert pool.stats()["in_flight"] == 0


@pytest.mark.parametrize("spinning", [True, False])
def test_calls_that_fill_a_lane_s_slots_wait_for_room(spinning: bool) -> None:
    # The worker's loop is held up, so it takes no frames: a few calls with 2-32 KiB
    # arguments fill the lane's slots, later frames wait in the transport (the lane is
    # stalled, new calls take the loop), and all of them go once the worker takes frames
    # again, whether the caller spins or nobody does.
    with PluginPool(Calculator, workers=1, spin=1.0 if spinning else 0) as pool:
        _until_lanes_open(pool)
        lane = _lane_of(pool)
        transport = lane._transport
        asked = transport.want_space
        stalls: list[bool] = []

        def want_space(wanted: bool) -> None:
            stalls.append(wanted)
            asked(wanted)

        transport.want_space = want_space  # type: ignore[method-assign]
        before = pool.stats()
        held = pool.submit(Calculator.hold, 1.0)
        sizes = [2048 + (i * 997) % 30720 for i in range(rapace._lane.MAX_IN_FLIGHT)]
        futures = [
            pool.submit(Calculator.size, bytes(n) if i % 2 else "x" * n)
            for i, n in enumerate(sizes)
        ]
        assert True in stalls, "the lane never ran out of room"
        if spinning:
            assert [future.result(timeout=WAIT) for future in futures] == sizes
        else:
            done, _ = concurrent.futures.wait(futures, timeout=WAIT)
            assert len(done) == len(futures)
            assert [future.result() for future in futures] == sizes
        assert held.result(timeout=WAIT) == 1.0
        assert stalls[-1] is False
        assert not lane._stalled
        after = pool.stats()
        assert after["calls"] - before["calls"] == len(futures) + 1
        assert after["errors"] == before["errors"]
        assert after["in_flight"] == 0
        assert lane.in_flight == 0
        # The lane carries calls again.
        direct = after["direct_calls"]
        assert pool.submit(Calculator.size, bytes(20000)).result(timeout=WAIT) == 20000
        assert pool.stats()["direct_calls"] == direct + 1


def test_a_forked_child_cannot_use_or_stop_its_parent_s_pool() -> None:
    """os.fork() copies the pool object, its fds and its shared memory into the child: the
    child may neither call through it (writing into the parent's rings) nor, on its way
    out, stop the parent's pool, kill its workers or remove its arena."""
    from .zero_copy_services import Imaging

    with PluginPool(Imaging, workers=1) as pool:
        kept = pool.buffer(64)  # arena memory the child must leave alone
        assert pool.submit(Imaging.pid).result(timeout=WAIT) == pool.workers[0].pid
        worker = pool.workers[0].pid
        child = os.fork()
        if child == 0:  # pragma: no cover - the child reports through its exit code
            code = 0
            try:
                for attempt in (lambda: pool.submit(Imaging.pid), lambda: pool.buffer(8)):
                    try:
                        attempt()
                        code |= 1
                    except RuntimeError:
                        pass
                pool.shutdown()  # a `with` block left in the child: nothing to do there
                del pool
                gc.collect()
                import atexit

                atexit._run_exitfuncs()  # what a normal exit runs: the pool's finalizers
            except BaseException:
                code |= 2
            os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pool.workers[0].pid == worker  # not killed
        assert pool.stats()["restarts"] == 0
        before = pool.stats()["bytes_by_reference"]
        assert pool.submit(Imaging.fill_view, kept, 7).result(timeout=WAIT) == 64  # not stopped
        assert bytes(kept) == b"\x07" * 64  # the arena still shared with the worker
        assert pool.stats()["bytes_by_reference"] == before + 64
