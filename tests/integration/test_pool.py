"""PluginPool with real worker processes: API.md section 2 as written, threads and loops,
crashes and restarts, deadlines, shutdown."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import types
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

import rapace
from rapace import PluginPool

from .pool_services import BrokenAtStart, Calculator

ROOT = Path(__file__).parents[2]
TRANSPORTS = ["shm", "unix", "tcp"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_sync_example_of_the_api(transport: str) -> None:
    with PluginPool(Calculator, workers=2, transport=transport) as pool:  # type: ignore[arg-type]
        fut = pool.submit(Calculator.add, 2, 3)
        assert isinstance(fut, rapace.Future)
        assert fut.result(timeout=10) == 5
        assert list(pool.map(Calculator.add, [1, 2], [10, 20])) == [11, 22]

        calc = pool.proxy
        assert calc.add(2, 3).result(timeout=10) == 5
        assert list(calc.range(3)) == [0, 1, 2]
        assert calc.total([1, 2, 3]).result(timeout=10) == 6
        assert list(calc.scale([1.0, 2.0], k=3.0)) == [3.0, 6.0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_async_example_of_the_api(backend: str) -> None:
    async def main() -> None:
        with anyio.fail_after(30):
            async with PluginPool(Calculator, workers=2) as pool:
                assert await pool.proxy.add(2, 3) == 5
                assert [x async for x in pool.proxy.range(3)] == [0, 1, 2]
                assert await pool.submit(Calculator.add, 1, 1) == 2

    anyio.run(main, backend=backend)


@pytest.fixture(scope="module")
def pool() -> PluginPool[Calculator]:
    with PluginPool(Calculator, workers=2, args=(100,)) as pool:
        yield pool  # type: ignore[misc]


def test_constructor_arguments_reach_every_worker(pool: PluginPool[Calculator]) -> None:
    results = [f.result(timeout=10) for f in pool.broadcast(Calculator.add, 1, 2)]
    assert results == [103, 103]
    pids = {f.result(timeout=10) for f in pool.broadcast(Calculator.pid)}
    assert len(pids) == 2
    assert os.getpid() not in pids


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_futures_are_awaitable_from_another_loop(
    pool: PluginPool[Calculator], backend: str
) -> None:
    """A pool with its own loop thread, awaited from a loop in this thread (as Jupyter)."""

    async def main() -> None:
        with anyio.fail_after(10):
            assert await pool.proxy.add(1, 2) == 103
            assert [x async for x in pool.proxy.range(4)] == [0, 1, 2, 3]

    anyio.run(main, backend=backend)


def test_blocking_calls_work_from_many_threads(pool: PluginPool[Calculator]) -> None:
    with concurrent.futures.ThreadPoolExecutor(8) as threads:
        results = list(
            threads.map(lambda i: pool.submit(Calculator.add, i, 0).result(10), range(200))
        )
    assert results == [i + 100 for i in range(200)]


def test_an_error_keeps_its_type_and_the_pool_keeps_working(pool: PluginPool[Calculator]) -> None:
    with pytest.raises(ValueError, match="bad input"):
        pool.submit(Calculator.fail, "bad input").result(timeout=10)
    assert pool.submit(Calculator.add, 1, 1).result(timeout=10) == 102


def test_breaking_out_of_a_stream_loop_cancels_the_producer() -> None:
    """API.md: leaving the loop cancels the producer, even with no ``with`` around it."""
    with PluginPool(Calculator, workers=1) as pool:
        for first in pool.proxy.forever():
            assert first == 0
            break
        assert pool.submit(Calculator.wait_cancellations, 1).result(timeout=10) == 1
        closed = pool.proxy.forever()
        assert next(closed) == 0
        closed.close()
        assert all(isinstance(x, int) for x in closed)  # what was read ahead, then the end
        assert pool.submit(Calculator.wait_cancellations, 2).result(timeout=10) == 2

        async def leave_early() -> None:
            stream = pool.proxy.forever()  # still referenced after the loop
            async for _ in stream:
                break
            assert await pool.proxy.wait_cancellations(3) == 3

        anyio.run(leave_early)
    # and the pool shut down: no call was left in flight


def test_a_half_imported_trio_does_not_break_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread importing trio leaves a module without ``lowlevel`` in sys.modules for
    a moment; the pool's checks for a trio run must not trip over it."""
    with PluginPool(Calculator, workers=1) as pool:
        monkeypatch.setitem(sys.modules, "trio", types.ModuleType("trio"))
        assert pool.submit(Calculator.add, 1, 2).result() == 3
        assert list(pool.proxy.range(3)) == [0, 1, 2]
        assert anyio.run(lambda: pool.proxy.add(2, 2)) == 4


def test_cancel_cancels_the_call_in_the_worker() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        fut = pool.submit(Calculator.sleep, 30.0)
        assert not fut.running()
        with pytest.raises(concurrent.futures.TimeoutError):
            fut.result(timeout=0.2)  # it is running in the worker by now
        assert fut.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            fut.result(timeout=1)
        # The cancellation reaches the handler in the worker (bounded wait, not a poll).
        assert pool.submit(Calculator.wait_cancelled).result(timeout=10) == 1


@pytest.mark.parametrize("how", ["wait", "as_completed"])
def test_a_cancelled_call_wakes_concurrent_futures_waiters(how: str) -> None:
    with PluginPool(Calculator, workers=1) as pool:
        # One call on the worker's lane, one through the pool's loop.
        futures = [pool.submit(Calculator.sleep, 3600.0) for _ in range(2)]
        for future in futures:
            assert future.cancel()
        if how == "wait":
            _, pending = concurrent.futures.wait(futures, timeout=10)
            assert not pending
        else:
            assert set(concurrent.futures.as_completed(futures, timeout=10)) == set(futures)
        assert all(future.cancelled() for future in futures)


def test_a_deadline_around_await_cancels_the_handler() -> None:
    async def main() -> None:
        async with PluginPool(Calculator, workers=1) as pool:
            with pytest.raises(TimeoutError), anyio.fail_after(0.3):
                await pool.proxy.sleep(30.0)
            with anyio.fail_after(10):
                assert await pool.proxy.wait_cancelled() == 1

    anyio.run(main)


def test_call_timeout_raises_deadline_exceeded() -> None:
    with PluginPool(Calculator, workers=1, call_timeout=0.3) as pool:
        with pytest.raises(rapace.DeadlineExceeded):
            pool.submit(Calculator.sleep, 30.0).result(timeout=10)
        assert pool.submit(Calculator.add, 2, 2).result(timeout=10) == 4
        # A stream is one call: the timeout bounds all of it, fast producer or stalled.
        for method in (pool.proxy.forever, pool.proxy.stall):
            with pytest.raises(rapace.DeadlineExceeded):
                for _ in method():
                    pass
        assert pool.submit(Calculator.add, 2, 2).result(timeout=10) == 4


def test_a_plain_def_handler_releases_its_caller_at_once() -> None:
    """A blocking handler cannot be interrupted, but its caller is released at the deadline
    (waiting here for less than the handler's 30 s proves it)."""
    with (
        PluginPool(Calculator, workers=1, call_timeout=0.3) as pool,
        pytest.raises(rapace.DeadlineExceeded),
    ):
        pool.submit(Calculator.block, 30.0).result(timeout=10)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_dying_worker_fails_only_its_calls_and_is_replaced(how: str) -> None:
    with PluginPool(Calculator, workers=2) as pool:
        survivor = pool.submit(Calculator.sleep, 1.0)
        with pytest.raises(rapace.WorkerCrashed) as info:
            pool.submit(Calculator.die, how).result(timeout=20)
        crash = info.value
        assert crash.pid is not None
        assert crash.pid != os.getpid()
        assert crash.exitcode == (7 if how == "exit" else -9)
        assert crash.method == "Calculator.die"
        assert survivor.result(timeout=20) == 1.0
        # Later calls succeed, on the replacement as well.
        assert [f.result(timeout=30) for f in pool.broadcast(Calculator.add, 1, 1)] == [2, 2]
        assert sum(w.restarts for w in pool.workers) == 1


def test_workers_failing_to_start_break_the_pool_with_their_traceback() -> None:
    with (
        pytest.raises(rapace.BrokenPluginPool, match="cannot open the model file") as info,
        PluginPool(BrokenAtStart, workers=1, max_restarts=1),
    ):
        pass
    assert isinstance(info.value, concurrent.futures.BrokenExecutor)
    assert "RuntimeError" in str(info.value)


@pytest.mark.timeout(60)
def test_shutdown_without_waiting_returns_while_a_call_cannot_finish() -> None:
    """Like Executor.shutdown(wait=False): the caller is not held up (a blocking handler
    could keep it for 30 s); the call is cancelled and the worker stopped in the background."""
    pool = PluginPool(Calculator, workers=1).start()
    worker = pool.workers[0].pid
    assert worker is not None
    blocked = pool.submit(Calculator.block, 30.0)
    pool.shutdown(wait=False)
    with pytest.raises(concurrent.futures.CancelledError):
        blocked.result(timeout=20)
    with pytest.raises(RuntimeError):
        pool.submit(Calculator.add, 1, 1)
    pidfd = os.pidfd_open(worker)
    try:
        assert select.select([pidfd], [], [], 20)[0], "the worker was not stopped"
    finally:
        os.close(pidfd)
    pool.shutdown()  # joins the pool's thread; idempotent


def test_submit_after_shutdown_raises() -> None:
    pool = PluginPool(Calculator, workers=1).start()
    fut = pool.submit(Calculator.sleep, 0.3)
    pool.shutdown(wait=True)
    assert fut.result(timeout=0) == 0.3  # shutdown(wait=True) waited for it
    with pytest.raises(RuntimeError, match=r"shut|closed|stopping"):
        pool.submit(Calculator.add, 1, 2)


def test_a_blocking_wait_on_the_pools_own_loop_is_an_error() -> None:
    async def main() -> None:
        async with PluginPool(Calculator, workers=1) as pool:
            with pytest.raises(RuntimeError, match="event loop"):
                list(pool.proxy.range(3))
            with pytest.raises(RuntimeError, match="event loop"):
                pool.submit(Calculator.add, 1, 2).result()

    anyio.run(main)


def test_environment_reaches_the_workers() -> None:
    with PluginPool(Calculator, workers=1, env={"RAPACE_TEST_VALUE": "42"}) as pool:
        assert pool.submit(Calculator.environment, "RAPACE_TEST_VALUE").result(10) == "42"
        assert pool.submit(Calculator.environment, "OMP_NUM_THREADS").result(10) is not None


def test_a_main_module_service_without_a_guard_works(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import rapace

            @rapace.service
            class Doubler:
                async def double(self, x: int) -> int:
                    return 2 * x

            with rapace.PluginPool(Doubler, workers=2) as pool:
                print(list(pool.map(Doubler.double, range(5))))
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[0, 2, 4, 6, 8]\n"
    assert result.stderr == ""


def test_a_main_module_service_with_string_annotations_works(tmp_path: Path) -> None:
    """The schema is resolved on the host and shipped: a worker never re-resolves names that
    only the annotations of the host's ``__main__`` mention."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            from __future__ import annotations

            import decimal

            import rapace

            @rapace.service
            class Money:
                def half(self, x: decimal.Decimal) -> decimal.Decimal:
                    return x / 2

            with rapace.PluginPool(Money, workers=1) as pool:
                print(pool.submit(Money.half, decimal.Decimal("3")).result())
                print(list(pool.map(Money.half, [decimal.Decimal(1)], chunksize=2)))
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1.5\n[Decimal('0.5')]\n"
    assert result.stderr == ""


@pytest.mark.parametrize("chunksize", [1, 7, 256])
def test_map_in_chunks_keeps_order_and_types(chunksize: int) -> None:
    with PluginPool(Calculator, workers=2) as pool:
        xs = list(range(1000))
        assert list(pool.map(Calculator.add, xs, xs, chunksize=chunksize)) == [2 * x for x in xs]
        unordered = pool.map(Calculator.add, xs, xs, chunksize=chunksize, ordered=False)
        assert sorted(unordered) == [2 * x for x in xs]
        assert list(pool.map(Calculator.block, [0.0, 0.0], chunksize=chunksize)) == [0.0, 0.0]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_takes_any_iterables_and_stops_at_the_shortest(chunksize: int) -> None:
    with PluginPool(Calculator, workers=2) as pool:
        gen = (x for x in range(10))
        assert list(pool.map(Calculator.add, gen, range(100, 107), chunksize=chunksize)) == [
            100 + 2 * x for x in range(7)
        ]
        assert list(pool.map(Calculator.add, (1, 2), [10, 20, 30], chunksize=chunksize)) == [
            11,
            22,
        ]
        assert list(pool.map(Calculator.shift, [1, 2, 3], chunksize=chunksize)) == [11, 12, 13]
        endless = itertools.repeat(5)
        assert list(pool.map(Calculator.add, [1, 2], endless, chunksize=chunksize)) == [6, 7]
        assert list(pool.map(Calculator.add, [], [], chunksize=chunksize)) == []


def test_a_map_read_by_next_and_by_for_gives_each_result_once() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        results = pool.map(Calculator.add, range(10), range(10), chunksize=4)
        assert [next(results), next(results)] == [0, 2]
        assert list(results) == [2 * x for x in range(2, 10)]


def test_map_raises_the_first_error_when_reached() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        results = pool.map(Calculator.fail, ["a", "b"], chunksize=2)
        with pytest.raises(ValueError, match="a"):
            next(results)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_async_iterable_arguments_are_read_in_the_callers_loop(
    pool: PluginPool[Calculator], backend: str
) -> None:
    """A pool with its own loop thread, fed an async generator from a loop in this thread:
    the generator runs here (where its awaits belong), its items reach the worker."""
    seen_threads: set[int] = set()

    async def numbers() -> AsyncIterator[int]:
        for i in range(200):
            seen_threads.add(threading.get_ident())
            await anyio.lowlevel.checkpoint()
            yield i

    async def main() -> None:
        with anyio.fail_after(20):
            assert await pool.proxy.total(numbers()) == sum(range(200))
            got = [x async for x in pool.proxy.scale(numbers(), k=2.0)]
            assert got == [2.0 * i for i in range(200)]

    anyio.run(main, backend=backend)
    assert seen_threads == {threading.get_ident()}


def test_an_async_iterable_from_a_thread_without_a_loop_is_refused(
    pool: PluginPool[Calculator],
) -> None:
    async def numbers() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="event loop"):
        pool.proxy.total(numbers())


PLUGIN_PROGRAM = """
import os, sys
import rapace
from tests.integration.pool_services import Calculator


class CalculatorImpl(Calculator):
    async def add(self, a: int, b: int) -> int:
        return a + b + 1000


if __name__ == "__main__":
    if os.environ.get("PLUGIN_FAILS"):
        raise RuntimeError("the plugin cannot find its model")
    rapace.serve(CalculatorImpl())
"""


def _plugin(tmp_path: Path) -> list[str]:
    program = tmp_path / "calc_plugin.py"
    program.write_text(PLUGIN_PROGRAM)
    return [sys.executable, str(program)]


def test_a_plugin_program_attaches_with_serve(tmp_path: Path) -> None:
    with PluginPool(Calculator, command=_plugin(tmp_path), workers=2) as pool:
        assert pool.submit(Calculator.add, 2, 3).result(timeout=20) == 1005
        assert list(pool.proxy.range(3)) == [0, 1, 2]
        assert list(pool.map(Calculator.add, [1, 2], [1, 1], chunksize=8)) == [1002, 1003]
        pids = {f.result(timeout=20) for f in pool.broadcast(Calculator.pid)}
        assert len(pids) == 2


def test_a_plugin_program_failing_at_start_breaks_the_pool(tmp_path: Path) -> None:
    with (
        pytest.raises(rapace.BrokenPluginPool, match="cannot find its model") as info,
        PluginPool(
            Calculator,
            command=_plugin(tmp_path),
            workers=1,
            max_restarts=0,
            env={"PLUGIN_FAILS": "1"},
        ),
    ):
        pass
    assert "exit code 1" in str(info.value)


def test_serve_without_listen_outside_a_pool_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        _plugin(tmp_path), capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
    )
    assert result.returncode != 0
    assert "listen=" in result.stderr


def test_worker_output_reaches_the_host_prefixed(tmp_path: Path) -> None:
    """print() and logging in a worker reach the host's stdout/stderr, a line at a time,
    prefixed with the worker's index (seen from a host in a subprocess)."""
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            """
            import rapace

            @rapace.service
            class Talker:
                def talk(self, text: str) -> int:
                    import logging, sys
                    print(text)
                    print("partial", end="", flush=True)
                    print(" line")
                    logging.getLogger("plugin").warning("careful: %s", text)
                    return 1

            with rapace.PluginPool(Talker, workers=1) as pool:
                pool.submit(Talker.talk, "hello").result(30)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[worker 0] hello", "[worker 0] partial line"]
    assert result.stderr.splitlines() == ["[worker 0] careful: hello"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("chunksize", [1, 5])
@pytest.mark.parametrize("ordered", [True, False])
def test_map_results_are_an_async_iterator_too(
    pool: PluginPool[Calculator], backend: str, chunksize: int, ordered: bool
) -> None:
    xs = list(range(30))

    async def main() -> list[int]:
        results = pool.map(Calculator.add, xs, xs, chunksize=chunksize, ordered=ordered)
        return [r async for r in results]

    got = anyio.run(main, backend=backend)
    expected = [2 * x + 100 for x in xs]
    assert (got if ordered else sorted(got)) == expected


def test_map_raises_the_first_error_in_a_loop_too(pool: PluginPool[Calculator]) -> None:
    got: list[int] = []

    async def main() -> None:
        async for r in pool.map(Calculator.fail_at, [1, 2, 3, 4], [3, 3, 3, 3], chunksize=2):
            got.append(r)  # noqa: PERF401 (what came before the error is the point)

    errors = pool.stats()["errors"]
    with pytest.raises(ValueError, match="3"):
        anyio.run(main)
    assert got == [1, 2]
    assert pool.stats()["errors"] == errors + 1  # a failed call in a chunk is an error


def test_leaving_a_map_early_cancels_the_calls_left() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        for seconds in pool.map(Calculator.sleep, [0.0, 30.0, 30.0]):
            assert seconds == 0.0
            break
        assert pool.submit(Calculator.wait_cancelled).result(timeout=10) >= 1

        async def main() -> None:
            with pytest.raises(TimeoutError):
                async for _ in pool.map(Calculator.sleep, [30.0], timeout=0.2):
                    pass

        anyio.run(main)
        assert pool.submit(Calculator.add, 1, 1).result(timeout=10) == 2


@pytest.mark.parametrize(("threads", "together"), [(1, False), (None, True)])
@pytest.mark.parametrize("chunked", [False, True])
def test_plain_def_methods_run_one_at_a_time_per_worker_by_default(
    threads: int | None, together: bool, chunked: bool
) -> None:
    """Like a ProcessPoolExecutor worker (CPU-bound threads only fight over the GIL), unless
    handler_threads says otherwise; map's chunks of def calls count too."""
    with PluginPool(Calculator, workers=1, handler_threads=threads) as pool:
        patience = 10.0 if together else 0.5
        if chunked:
            met = list(pool.map(Calculator.meet, [2] * 4, [patience] * 4, chunksize=2))
            assert met == [together] * 4
        else:
            futures = [pool.submit(Calculator.meet, 2, patience) for _ in range(2)]
            assert [f.result(timeout=30) for f in futures] == [together, together]


def test_statistics_count_every_call_and_survive_a_restart() -> None:
    with PluginPool(Calculator, workers=1) as pool:
        assert sum(pool.map(Calculator.add, range(100), range(100), chunksize=10)) == 9900
        before = pool.stats()
        assert before["calls"] == 100  # ten messages, a hundred calls
        with pytest.raises(rapace.WorkerCrashed):
            pool.submit(Calculator.die, "kill").result(timeout=20)
        assert pool.submit(Calculator.add, 1, 1).result(timeout=20) == 2
        after = pool.stats()
    assert after["calls"] == 102
    assert after["restarts"] == 1
    for key in ("frames_sent", "frames_received", "bytes_in_slots", "ring_high_water"):
        assert after[key] >= before[key], key  # the dead worker's link still counts


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_chunks_of_handlers_that_suspend_run_and_cancel(backend: str) -> None:
    """A chunk steps its async calls by hand until one suspends; that one must still be
    awaited (and cancelled) like any other."""
    with PluginPool(Calculator, workers=1) as pool:
        assert list(pool.map(Calculator.sleep, [0.0, 0.001, 0.0], chunksize=3)) == [
            0.0,
            0.001,
            0.0,
        ]

        async def main() -> None:
            with pytest.raises(TimeoutError):
                async for _ in pool.map(Calculator.sleep, [0.0, 30.0], chunksize=2, timeout=0.3):
                    pass

        anyio.run(main, backend=backend)
        assert pool.submit(Calculator.wait_cancellations, 1).result(timeout=10) >= 1


def test_map_with_a_progress_bar_without_tqdm(
    pool: PluginPool[Calculator],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    xs = list(range(50))
    assert list(pool.map(Calculator.add, xs, xs, progress=True)) == [2 * x + 100 for x in xs]
    assert "Calculator.add: 50/50" in capsys.readouterr().err


def test_ctrl_c_cancels_calls_and_stops_the_pool(tmp_path: Path) -> None:
    """SIGINT to a host blocked on a long call: it exits promptly, its workers are gone,
    no segment remains."""
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            """
            import rapace
            from tests.integration.pool_services import Calculator

            with rapace.PluginPool(Calculator, workers=2) as pool:
                pids = [f.result(30) for f in pool.broadcast(Calculator.pid)]
                print(*pids, flush=True)
                pool.submit(Calculator.sleep, 60.0).result()
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as host:
        try:
            assert host.stdout is not None
            pids = [int(p) for p in host.stdout.readline().split()]
            host.send_signal(signal.SIGINT)
            host.wait(timeout=20)  # bounded: the call was cancelled, not waited for
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"rp_{host.pid:x}_")]


def test_a_pool_dropped_without_shutdown_stops_its_workers() -> None:
    """Re-running a notebook cell rebinds the name: the old pool is collected and must not
    leave its workers running."""
    import gc

    from rapace.shm._liveness import pidfd_open

    threads_before = set(threading.enumerate())
    pool = PluginPool(Calculator, workers=2).start()
    pids = [f.result(timeout=20) for f in pool.broadcast(Calculator.pid)]
    watchers = [pidfd_open(pid) for pid in pids]
    pool_threads = set(threading.enumerate()) - threads_before
    del pool
    gc.collect()
    try:

        async def all_exited() -> None:
            with anyio.fail_after(20):
                for fd in watchers:
                    if fd is not None:
                        await anyio.wait_readable(fd)

        anyio.run(all_exited)
        for thread in pool_threads:  # the pool finishes its clean-up in its own thread
            thread.join(timeout=20)
            assert not thread.is_alive()
    finally:
        for fd in watchers:
            if fd is not None:
                os.close(fd)


def test_workers_can_run_another_interpreter(tmp_path: Path) -> None:
    """python= starts the workers with that interpreter: here another virtual environment,
    with rapace "installed" (a .pth file pointing at the host's packages). Its own paths
    come first; the host's interpreter paths are only a fallback after them."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = venv / "lib" / version / "site-packages"
    host_site = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "host_packages.pth").write_text("\n".join(host_site) + "\n")
    python = str(venv / "bin" / "python")
    with PluginPool(Calculator, workers=1, python=python) as pool:
        assert pool.submit(Calculator.add, 1, 2).result(timeout=30) == 3
        prefix = pool.submit(Calculator.prefix).result(timeout=30)
    assert Path(prefix).resolve() == venv.resolve()


def test_a_by_value_class_for_another_python_version_is_refused(tmp_path: Path) -> None:
    fake_python = tmp_path / "python3.99"
    fake_python.write_text("#!/bin/sh\necho 3 99\n")
    fake_python.chmod(0o755)

    @rapace.service
    class Notebooky:
        async def ping(self) -> int:
            return 1

    Notebooky.__module__ = "__main__"  # as if defined in a notebook cell
    with pytest.raises(rapace.BrokenPluginPool, match=r"Python 3\.99 and cannot load it"):
        PluginPool(Notebooky, workers=1, python=str(fake_python)).start()


def test_map_with_hundreds_of_chunks_in_flight() -> None:
    """391 chunks at once: more than either side's slots, so both wait for returned slots
    (this once deadlocked on returns stranded behind a stale view of the return ring)."""
    xs = list(range(100_000))
    with PluginPool(Calculator, workers=1) as pool:
        assert list(pool.map(Calculator.add, xs, xs, chunksize=256)) == [2 * x for x in xs]
