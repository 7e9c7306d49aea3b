"""The workloads: each measures rapace over one transport, or its baselines.

Every rapace workload gets a transport and returns its rows' measurements; the suite runs
it under a guard, so that one that raises (or needs an API that is not there yet) marks its
own rows and the run goes on. Pools, executors and baseline peers are opened on first use
and kept for the workloads after (see :class:`Resources`): starting them is not what a
workload measures, except in ``startup``.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import math
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any, TypeVar

from rapace.benchsuite import _services
from rapace.benchsuite._measure import (
    IN_FLIGHT,
    Effort,
    batch_rate,
    cpu_seconds,
    latency,
    repeat,
)
from rapace.benchsuite._model import Measurement, Results
from rapace.benchsuite._services import Bench

__all__ = (
    "BASELINE_WORKLOADS",
    "RAPACE_WORKLOADS",
    "Context",
    "NotAvailable",
    "Resources",
    "optional_module",
)

T = TypeVar("T")

MIB = 1 << 20
BULK_BYTES = 64 * MIB
SMALL_ARENA_BYTES = 1024
#: Start-up baseline: each executor call sleeps this long, so the second call needs a
#: second worker; it is subtracted from the time until both answered.
STARTUP_SLEEP_S = 0.05


class NotAvailable(Exception):
    """A workload cannot run here (an API not implemented yet, a module not installed):
    its rows say "n/a (...)" with this message instead of an error."""


def optional_module(name: str) -> ModuleType | None:
    """``import name``, or None when it is not installed (or fails to import)."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


class Resources:
    """Pools, executors and peers opened on first use and closed together by :meth:`close`."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._cache: dict[tuple[object, ...], object] = {}

    def get(self, key: tuple[object, ...], open_: Callable[[ExitStack], T]) -> T:
        if key not in self._cache:
            # Opened in a stack of its own first: one that fails half-way is closed at once.
            with ExitStack() as stack:
                value = open_(stack)
                self._stack.push(stack.pop_all())
            self._cache[key] = value
        return self._cache[key]  # type: ignore[return-value]

    def close(self) -> None:
        self._cache.clear()
        self._stack.close()


@dataclass
class Context:
    """What every workload shares in one run."""

    effort: Effort
    arena_bytes: int
    results: Results = field(default_factory=Results)
    _payload: bytes | None = None
    _array: Any = None

    @property
    def numpy(self) -> ModuleType | None:
        return optional_module("numpy")

    def payload(self) -> bytes:
        """64 MiB of bytes (made once: its pages are faulted in before any timing)."""
        if self._payload is None:
            self._payload = bytes(BULK_BYTES)
        return self._payload

    def array(self) -> Any:
        """A 64 MiB float64 array of ones, or NotAvailable without numpy."""
        numpy = self.numpy
        if numpy is None:
            raise NotAvailable("numpy not installed")
        if self._array is None:
            self._array = numpy.ones(BULK_BYTES // 8, dtype=numpy.float64)
        return self._array


# --------------------------------------------------------------------------- rapace


def _pool(res: Resources, transport: str, service: type, workers: int) -> Any:
    def open_(stack: ExitStack) -> Any:
        from rapace import PluginPool

        pool: Any = PluginPool(service, workers=workers, transport=transport)  # type: ignore[arg-type]
        stack.enter_context(pool)
        return pool

    return res.get(("pool", transport, service.__qualname__, workers), open_)


def _array_service() -> type:
    try:
        module = importlib.import_module("rapace.benchsuite._array_services")
    except ImportError as exc:
        raise NotAvailable("numpy not installed") from exc
    service: type = module.BenchArrays
    return service


#: What an echo of the 64 MiB array must come back as: an array of that many bytes.
ECHOED = object()


def _expect(got: object, want: object) -> None:
    if want is ECHOED:
        if getattr(got, "nbytes", None) != BULK_BYTES:
            raise RuntimeError(f"wrong result: {type(got).__name__}, expected a 64 MiB array")
        return
    if got != want:
        raise RuntimeError(f"wrong result: {got!r}, expected {want!r}")


def _transfer_stats(pool: Any) -> dict[str, int]:
    """The pool's counters of bytes passed by reference vs copied, where it has them."""
    stats = pool.stats()
    keys = ("bytes_by_reference", "bytes_copied", "bytes_in_slots", "bytes_in_blocks")
    return {key: int(stats[key]) for key in keys if isinstance(stats.get(key), int)}


def _delta(before: dict[str, int], after: dict[str, int], reps: int) -> dict[str, float]:
    """Per-call change of each counter (the warm-up call included in ``reps``)."""
    return {f"{key}_per_call": (after[key] - before.get(key, 0)) / reps for key in after}


def rapace_latency(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    pool = _pool(res, transport, Bench, 1)
    _expect(pool.submit(Bench.add, 2, 3).result(), 5)
    effort = ctx.effort
    row = latency(
        lambda: pool.submit(Bench.add, 2, 3).result(),
        effort.latency_calls,
        effort.latency_warmup,
    )
    return {
        "latency.p50": Measurement(row["p50_us"], extra=row),
        "latency.p99": Measurement(row["p99_us"], extra=row),
    }


def _submit_batch(submit: Callable[[], concurrent.futures.Future[Any]]) -> Callable[[], int]:
    """Submit IN_FLIGHT calls, then wait for all of them (one batch)."""

    def batch() -> int:
        futures = [submit() for _ in range(IN_FLIGHT)]
        for future in futures:
            future.result()
        return IN_FLIGHT

    return batch


def rapace_throughput(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    pool = _pool(res, transport, Bench, 2)
    row = batch_rate(_submit_batch(lambda: pool.submit(Bench.add, 2, 3)), ctx.effort.rate_seconds)
    return {"throughput": Measurement(row["per_s"], extra=row)}


def _map_rate(run: Callable[[list[int]], list[int]], items: int) -> Measurement:
    xs = list(range(items))
    run(xs[:2000])  # warm-up
    start = time.perf_counter()
    out = run(xs)
    elapsed = time.perf_counter() - start
    if out != [2 * x for x in xs]:
        raise RuntimeError("map returned wrong results")
    return Measurement(items / elapsed, extra={"items": items, "seconds": elapsed})


def rapace_map(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    pool = _pool(res, transport, Bench, 2)
    measurement = _map_rate(
        lambda xs: list(pool.map(Bench.add, xs, xs, chunksize=256)), ctx.effort.map_items
    )
    return {"map": measurement}


def _timed_call(
    pool: Any, method: Callable[..., Any], arg: object, want: object, effort: Effort
) -> Measurement:
    before = _transfer_stats(pool)
    row = repeat(
        lambda: _expect(pool.submit(method, arg).result(), want),
        effort.bulk_reps,
        effort.bulk_seconds,
    )
    extra: dict[str, Any] = dict(row)
    extra.update(_delta(before, _transfer_stats(pool), int(row["reps"]) + 1))
    return Measurement(row["median_s"] * 1e3, extra=extra)


def rapace_bulk(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    out: dict[str, Measurement] = {}
    data = ctx.payload()
    pool = _pool(res, transport, Bench, 1)
    out["bulk.memoryview"] = _guard(
        lambda: _timed_call(pool, Bench.nbytes, memoryview(data), BULK_BYTES, ctx.effort)
    )
    out["bulk.bytes"] = _guard(
        lambda: _timed_call(pool, Bench.nbytes_copied, data, BULK_BYTES, ctx.effort)
    )

    def ndarray() -> Measurement:
        arr = ctx.array()
        service = _array_service()
        arrays = _pool(res, transport, service, 1)
        return _timed_call(arrays, service.total, arr, float(len(arr)), ctx.effort)  # type: ignore[attr-defined]

    out["bulk.ndarray"] = _guard(ndarray)

    def echo() -> Measurement:
        arr = ctx.array()
        service = _array_service()
        arrays = _pool(res, transport, service, 1)
        return _timed_call(arrays, service.echo, arr, ECHOED, ctx.effort)  # type: ignore[attr-defined]

    out["bulk.echo"] = _guard(echo)
    return out


def rapace_arena(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    """A big and a 1 KiB array allocated by the pool, passed to a method returning its
    length: zero-copy means the two take about the same time."""
    effort = ctx.effort
    if ctx.numpy is not None:
        service = _array_service()
        pool = _pool(res, transport, service, 1)
        allocate = getattr(pool, "empty", None)
        method: Callable[..., Any] = service.length  # type: ignore[attr-defined]

        def make(nbytes: int) -> Any:
            assert allocate is not None
            return allocate((nbytes,), dtype="uint8")

        api = "pool.empty"
    else:  # without numpy, the same with a plain shared buffer
        pool = _pool(res, transport, Bench, 1)
        allocate = getattr(pool, "buffer", None)
        method = Bench.nbytes

        def make(nbytes: int) -> Any:
            assert allocate is not None
            return allocate(nbytes)

        api = "pool.buffer"
    if allocate is None:
        raise NotAvailable(f"not available: no {api}")

    def small() -> Measurement:
        arr = make(SMALL_ARENA_BYTES)
        warmup = max(10, effort.small_calls // 10)
        before = _transfer_stats(pool)
        row: dict[str, Any] = dict(
            latency(
                lambda: _expect(pool.submit(method, arr).result(), SMALL_ARENA_BYTES),
                effort.small_calls,
                warmup,
            )
        )
        row.update(_delta(before, _transfer_stats(pool), effort.small_calls + warmup))
        row.update(api=api, nbytes=SMALL_ARENA_BYTES)
        return Measurement(row["p50_us"], extra=row)

    def big() -> Measurement:
        start = time.perf_counter()
        arr = make(ctx.arena_bytes)
        allocated = time.perf_counter() - start
        # Measured as the 1 KiB row is (p50 of sequential calls after a warm-up), so the two
        # compare: a few timed repeats of a call this short mostly measure the warm-up.
        calls = max(20, effort.small_calls // 5)
        row: dict[str, Any] = dict(
            latency(
                lambda: _expect(pool.submit(method, arr).result(), ctx.arena_bytes),
                calls,
                max(10, calls // 10),
            )
        )
        row.update(api=api, nbytes=ctx.arena_bytes, allocate_s=allocated)
        return Measurement(row["p50_us"] / 1e3, extra=row)

    return {"arena.small": _guard(small), "arena.big": _guard(big)}


def _stream_rate(run: Callable[[int], int], items: int, runs: int) -> Measurement:
    """Items per second of the best of ``runs`` streams of ``items`` (after a short one)."""
    _expect(run(1000), 1000)  # warm-up
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        count = run(items)
        best = min(best, time.perf_counter() - start)
        _expect(count, items)
    return Measurement(items / best, extra={"items": items, "runs": runs, "best_s": best})


def rapace_stream(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    pool = _pool(res, transport, Bench, 1)

    def run(n: int) -> int:
        count = 0
        for _ in pool.proxy.count(n):
            count += 1
        return count

    return {"stream": _stream_rate(run, ctx.effort.stream_items, ctx.effort.stream_runs)}


def rapace_startup(ctx: Context, res: Resources, transport: str) -> dict[str, Measurement]:
    """``PluginPool(Bench, workers=2).start()`` until ready (the median of a few, after one
    untimed start that pays this process's first imports), then the CPU the idle workers and
    the host's pool thread use over ``idle_seconds``."""
    from rapace import PluginPool

    effort = ctx.effort
    ready: list[float] = []
    stops: list[float] = []
    out: dict[str, Measurement] = {}
    for rep in range(effort.startup_reps + 1):
        start = time.perf_counter()
        pool = PluginPool(Bench, workers=2, transport=transport)  # type: ignore[arg-type]
        try:
            pool.start()
            ready.append(time.perf_counter() - start)
            if rep == effort.startup_reps:
                out.update(_idle(pool, effort.idle_seconds))
        finally:
            start = time.perf_counter()
            pool.shutdown()
            stops.append(time.perf_counter() - start)
    first, timed = ready[0], sorted(ready[1:])
    out["startup"] = Measurement(
        timed[len(timed) // 2] * 1e3,
        extra={"ready_s": ready[1:], "first_start_s": first, "shutdown_s": stops},
    )
    return out


def _idle(pool: Any, seconds: float) -> dict[str, Measurement]:
    pids = [future.result() for future in pool.broadcast(Bench.pid)]
    me = os.getpid()
    before = [cpu_seconds(pid) for pid in pids]
    host_before = cpu_seconds(me)
    start = time.perf_counter()
    time.sleep(seconds)  # the pause is the measurement
    elapsed = time.perf_counter() - start
    host = cpu_seconds(me) - host_before
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
    per_worker = [100 * u / elapsed for u in used]
    return {
        "idle.worker": Measurement(
            max(per_worker), extra={"per_worker_percent": per_worker, "seconds": elapsed}
        ),
        "idle.host": Measurement(100 * host / elapsed, extra={"seconds": elapsed}),
    }


RapaceWorkload = Callable[[Context, Resources, str], dict[str, Measurement]]

RAPACE_WORKLOADS: dict[str, RapaceWorkload] = {
    "latency": rapace_latency,
    "throughput": rapace_throughput,
    "map": rapace_map,
    "bulk": rapace_bulk,
    "arena": rapace_arena,
    "stream": rapace_stream,
    "startup": rapace_startup,
}


def _guard(measure: Callable[[], Measurement]) -> Measurement:
    """One cell's measurement, or the reason it has none."""
    try:
        return measure()
    except NotAvailable as exc:
        return Measurement.missing(f"n/a ({exc})")
    except Exception as exc:
        return Measurement.missing(f"error: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- baselines


PPE = "ProcessPoolExecutor"
PIPE = "multiprocessing.Pipe"
ZMQ = "pyzmq"
LOKY = "loky"


def _executor(res: Resources, workers: int) -> concurrent.futures.ProcessPoolExecutor:
    def open_(stack: ExitStack) -> concurrent.futures.ProcessPoolExecutor:
        # spawn: a fork of this process would copy the loop threads of the pools.
        ex = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")
        )
        stack.callback(ex.shutdown, wait=True, cancel_futures=True)
        _start_all(ex, workers)
        return ex

    return res.get(("executor", workers), open_)


def _start_all(ex: concurrent.futures.Executor, workers: int) -> None:
    """Make every worker of ``ex`` start before any timing: calls that overlap need them."""
    futures = [ex.submit(_services.sleep_then_pid, 0.02) for _ in range(workers)]
    for future in futures:
        future.result()


def _loky(res: Resources, workers: int) -> Any:
    loky = optional_module("loky")
    if loky is None:
        raise NotAvailable("loky not installed")

    def open_(stack: ExitStack) -> Any:
        ex = loky.ProcessPoolExecutor(max_workers=workers)
        stack.callback(ex.shutdown, wait=True)
        _start_all(ex, workers)
        return ex

    return res.get(("loky", workers), open_)


def _pipe(res: Resources) -> Connection:
    def open_(stack: ExitStack) -> Connection:
        from rapace.benchsuite._peers import serve_pipe

        mp = multiprocessing.get_context("spawn")
        parent, child = mp.Pipe()
        process = mp.Process(target=serve_pipe, args=(child,), daemon=True)
        process.start()
        child.close()

        def close() -> None:
            parent.close()
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()

        stack.callback(close)
        parent.send(("add", 2, 3))
        _expect(parent.recv(), 5)
        return parent

    return res.get(("pipe",), open_)


def _zmq(res: Resources) -> Any:
    zmq = optional_module("zmq")
    if zmq is None:
        raise NotAvailable("pyzmq not installed")

    def open_(stack: ExitStack) -> Any:
        folder = tempfile.mkdtemp(prefix="rapace-bench-")
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        address = f"ipc://{folder}/zmq.sock"
        server = subprocess.Popen(
            [sys.executable, "-m", "rapace.benchsuite._peers", "zmq", address],
            stdout=subprocess.PIPE,
            text=True,
        )
        stack.callback(_reap, server)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "READY":
            raise RuntimeError("the pyzmq peer did not start")
        context = zmq.Context()
        stack.callback(context.term)
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        stack.callback(sock.close)
        sock.connect(address)

        def stop() -> None:
            sock.send_multipart([b"stop", b""])
            if sock.poll(2000):
                sock.recv()

        stack.callback(stop)
        return sock

    return res.get(("zmq",), open_)


def _reap(process: subprocess.Popen[str]) -> None:
    try:
        process.wait(timeout=3)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _zmq_call(sock: Any, op: bytes, payload: object) -> Any:
    sock.send_multipart([op, payload], copy=False)
    return pickle.loads(sock.recv())


def _put(results: Results, column: str, measure: Callable[[], dict[str, Measurement]]) -> None:
    """Run one baseline's measurement into its rows; a failure marks the rows it names."""
    try:
        cells = measure()
    except NotAvailable as exc:
        results.note(f"{column}: skipped, {exc}")
        return
    except Exception as exc:
        results.note(f"{column}: failed, {type(exc).__name__}: {exc}")
        return
    for row, measurement in cells.items():
        results.put(row, column, measurement)


def _latency_cells(row: dict[str, float]) -> dict[str, Measurement]:
    return {
        "latency.p50": Measurement(row["p50_us"], extra=row),
        "latency.p99": Measurement(row["p99_us"], extra=row),
    }


def baseline_latency(ctx: Context, res: Resources) -> None:
    effort = ctx.effort
    calls, warmup = effort.latency_calls, effort.latency_warmup
    results = ctx.results

    def executor() -> dict[str, Measurement]:
        ex = _executor(res, 1)
        return _latency_cells(
            latency(lambda: ex.submit(_services.add, 2, 3).result(), calls, warmup)
        )

    def pipe() -> dict[str, Measurement]:
        conn = _pipe(res)

        def call() -> None:
            conn.send(("add", 2, 3))
            conn.recv()

        return _latency_cells(latency(call, calls, warmup))

    def zmq() -> dict[str, Measurement]:
        sock = _zmq(res)
        request = pickle.dumps((2, 3))
        return _latency_cells(latency(lambda: _zmq_call(sock, b"add", request), calls, warmup))

    def loky() -> dict[str, Measurement]:
        ex = _loky(res, 1)
        return _latency_cells(
            latency(lambda: ex.submit(_services.add, 2, 3).result(), calls, warmup)
        )

    _put(results, PPE, executor)
    _put(results, PIPE, pipe)
    _put(results, ZMQ, zmq)
    _put(results, LOKY, loky)
    _ring_limits(ctx)


def _ring_limits(ctx: Context) -> None:
    from rapace.shm import SUPPORTED

    if not SUPPORTED:
        ctx.results.note("limit: the raw ring + eventfd needs Linux x86-64; skipped")
        return
    from rapace.benchsuite._ring import SPIN_US, ring_latency

    effort = ctx.effort
    for name, spin in (("ring block", 0), ("ring spin", SPIN_US)):
        try:
            row = ring_latency(effort.latency_calls, effort.latency_warmup, spin)
        except Exception as exc:
            ctx.results.note(f"limit {name}: failed, {type(exc).__name__}: {exc}")
            continue
        ctx.results.put_limit("latency.p50", Measurement(row["p50_us"], name=name, extra=row))
        ctx.results.put_limit("latency.p99", Measurement(row["p99_us"], name=name, extra=row))


def baseline_throughput(ctx: Context, res: Resources) -> None:
    seconds = ctx.effort.rate_seconds
    results = ctx.results

    def rate(batch: Callable[[], int], note: str | None = None) -> dict[str, Measurement]:
        row = batch_rate(batch, seconds)
        return {"throughput": Measurement(row["per_s"], note=note, extra=row)}

    def executor() -> dict[str, Measurement]:
        ex = _executor(res, 2)
        return rate(_submit_batch(lambda: ex.submit(_services.add, 2, 3)))

    def pipe() -> dict[str, Measurement]:
        conn = _pipe(res)

        def batch() -> int:
            for _ in range(IN_FLIGHT):
                conn.send(("add", 2, 3))
            for _ in range(IN_FLIGHT):
                conn.recv()
            return IN_FLIGHT

        return rate(batch, "one server process")

    def zmq() -> dict[str, Measurement]:
        sock = _zmq(res)
        request = pickle.dumps((2, 3))

        def batch() -> int:
            for _ in range(IN_FLIGHT):
                sock.send_multipart([b"add", request])
            for _ in range(IN_FLIGHT):
                sock.recv()
            return IN_FLIGHT

        return rate(batch, "one server process")

    def loky() -> dict[str, Measurement]:
        ex = _loky(res, 2)
        return rate(_submit_batch(lambda: ex.submit(_services.add, 2, 3)))

    _put(results, PPE, executor)
    _put(results, PIPE, pipe)
    _put(results, ZMQ, zmq)
    _put(results, LOKY, loky)


def baseline_map(ctx: Context, res: Resources) -> None:
    items = ctx.effort.map_items

    def executor() -> dict[str, Measurement]:
        ex = _executor(res, 2)
        return {
            "map": _map_rate(lambda xs: list(ex.map(_services.add, xs, xs, chunksize=256)), items)
        }

    def loky() -> dict[str, Measurement]:
        ex = _loky(res, 2)
        return {
            "map": _map_rate(lambda xs: list(ex.map(_services.add, xs, xs, chunksize=256)), items)
        }

    _put(ctx.results, PPE, executor)
    _put(ctx.results, LOKY, loky)


def baseline_bulk(ctx: Context, res: Resources) -> None:
    effort = ctx.effort
    data = ctx.payload()
    results = ctx.results

    def timed(call: Callable[[], object], want: object) -> Measurement:
        row = repeat(lambda: _expect(call(), want), effort.bulk_reps, effort.bulk_seconds)
        return Measurement(row["median_s"] * 1e3, extra=row)

    def executor() -> dict[str, Measurement]:
        ex = _executor(res, 1)
        cells = {
            "bulk.bytes": timed(lambda: ex.submit(_services.nbytes, data).result(), BULK_BYTES)
        }
        if ctx.numpy is not None:
            from rapace.benchsuite._array_services import array_echo, array_sum

            arr = ctx.array()
            cells["bulk.ndarray"] = timed(lambda: ex.submit(array_sum, arr).result(), len(arr))
            cells["bulk.echo"] = timed(lambda: ex.submit(array_echo, arr).result(), ECHOED)
        return cells

    def pipe() -> dict[str, Measurement]:
        conn = _pipe(res)

        def call(*message: object) -> object:
            conn.send(message)
            return conn.recv()

        def raw() -> object:
            conn.send(("raw",))
            conn.send_bytes(memoryview(data))
            return conn.recv()

        cells = {
            "bulk.bytes": timed(lambda: call("len", data), BULK_BYTES),
            "bulk.memoryview": timed(raw, BULK_BYTES),
        }
        cells["bulk.memoryview"].note = "send_bytes"
        if ctx.numpy is not None:
            arr = ctx.array()
            cells["bulk.ndarray"] = timed(lambda: call("sum", arr), float(len(arr)))
            cells["bulk.echo"] = timed(lambda: call("echo", arr), ECHOED)
        return cells

    def zmq() -> dict[str, Measurement]:
        sock = _zmq(res)
        cells = {
            "bulk.bytes": timed(lambda: _zmq_call(sock, b"len", data), BULK_BYTES),
            "bulk.memoryview": timed(lambda: _zmq_call(sock, b"len", memoryview(data)), BULK_BYTES),
        }
        if ctx.numpy is not None:
            arr = ctx.array()
            cells["bulk.ndarray"] = timed(lambda: _zmq_call(sock, b"sum", arr), float(len(arr)))
        return cells

    _put(results, PPE, executor)
    _put(results, PIPE, pipe)
    _put(results, ZMQ, zmq)
    _copy_limits(ctx)


def _copy_limits(ctx: Context) -> None:
    """One copy of 64 MiB: into memory already faulted in (what a reused shared slot
    costs), and into a fresh ``bytes`` (what materialising a received payload costs)."""
    effort = ctx.effort
    data = ctx.payload()
    source = memoryview(data)
    numpy = ctx.numpy
    if numpy is not None:
        src = numpy.frombuffer(data, dtype=numpy.uint8)
        dst = numpy.empty_like(src)
        dst.fill(1)  # fault every page in before timing

        def into_faulted() -> None:
            numpy.copyto(dst, src)

        name = "copy faulted"  # numpy.copyto into pre-faulted memory
    else:
        target = bytearray(len(data))
        target_view = memoryview(target)

        def into_faulted() -> None:
            target_view[:] = source

        name = "copy faulted"  # memoryview copy into pre-faulted memory
    rows = repeat(into_faulted, effort.bulk_reps, effort.bulk_seconds)
    faulted = Measurement(rows["median_s"] * 1e3, name=name, extra=rows)
    fresh_row = repeat(lambda: bytes(source), effort.bulk_reps, effort.bulk_seconds)
    fresh = Measurement(fresh_row["median_s"] * 1e3, name="copy fresh", extra=fresh_row)
    ctx.results.put_limit("bulk.memoryview", faulted)
    if numpy is not None:
        ctx.results.put_limit("bulk.ndarray", faulted)
        ctx.results.put_limit("bulk.echo", faulted)
    ctx.results.put_limit("bulk.bytes", fresh)


def baseline_stream(ctx: Context, res: Resources) -> None:
    effort = ctx.effort

    def pipe() -> dict[str, Measurement]:
        conn = _pipe(res)

        def run(n: int) -> int:
            conn.send(("count", n))
            for _ in range(n):
                conn.recv()
            return n

        return {"stream": _stream_rate(run, effort.stream_items, effort.stream_runs)}

    _put(ctx.results, PIPE, pipe)


def baseline_startup(ctx: Context, res: Resources) -> None:
    def executor() -> dict[str, Measurement]:
        ready = []
        for _ in range(ctx.effort.startup_reps):
            start = time.perf_counter()
            ex = concurrent.futures.ProcessPoolExecutor(
                2, mp_context=multiprocessing.get_context("spawn")
            )
            try:
                futures = [ex.submit(_services.sleep_then_pid, STARTUP_SLEEP_S) for _ in range(2)]
                pids = {future.result() for future in futures}
                ready.append(time.perf_counter() - start - STARTUP_SLEEP_S)
            finally:
                ex.shutdown(wait=True)
            if len(pids) != 2:
                raise RuntimeError("the two calls ran in one worker")
        ready.sort()
        return {
            "startup": Measurement(
                ready[len(ready) // 2] * 1e3,
                note="spawn, until both workers answered",
                extra={"ready_s": ready},
            )
        }

    _put(ctx.results, PPE, executor)


BaselineWorkload = Callable[[Context, Resources], None]

BASELINE_WORKLOADS: dict[str, BaselineWorkload] = {
    "latency": baseline_latency,
    "throughput": baseline_throughput,
    "map": baseline_map,
    "bulk": baseline_bulk,
    "stream": baseline_stream,
    "startup": baseline_startup,
}
