"""PluginPool against ProcessPoolExecutor and multiprocessing.Pipe, in one run.

Workloads (``add(2, 3)``-sized calls), for ``workers=1`` and ``workers=2``:

- sync latency: ``pool.submit(f, 2, 3).result()`` p50/p99, sequential;
- async latency: ``await pool.proxy.add(2, 3)`` p50 from a pool entered with ``async with``;
- submit throughput: 64 futures kept in flight;
- map throughput: ``map(f, xs, chunksize=256)``;
- start-up: ``with PluginPool(S, workers=4)`` until ready, and an idle worker's CPU use.

Beside them, the shm session alone (bench_shm.py's ``await calc.add(2, 3)`` over
RpcSession): the async latency's yardstick.

Goals (pool issue): sync p50 10x under ProcessPoolExecutor's and under the pipe's; async p50
within 1.5x of the shm session's; submit throughput 20x ProcessPoolExecutor's; map at least
ProcessPoolExecutor.map's; ready in 0.5 s.
Run: ``python benchmarks/bench_pool.py [--calls N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))

from bench_sockets import _bench_pipe

import rapace
from rapace import PluginPool

IN_FLIGHT = 64
MAP_ITEMS = 100_000


@rapace.service
class Calculator:
    async def add(self, a: int, b: int) -> int:
        return a + b

    def pid(self) -> int:
        return os.getpid()


def add(a: int, b: int) -> int:
    return a + b


def _latency(call: Callable[[], Any], calls: int) -> dict[str, float]:
    for _ in range(300):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def _window(submit: Callable[[], concurrent.futures.Future[Any]], calls: int) -> float:
    window: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
    start = time.perf_counter()
    for _ in range(calls):
        window.append(submit())
        if len(window) >= IN_FLIGHT:
            window.popleft().result()
    for future in window:
        future.result()
    return calls / (time.perf_counter() - start)


def _map_rate(run: Callable[[list[int]], list[int]]) -> float:
    xs = list(range(MAP_ITEMS))
    run(xs[:2000])
    start = time.perf_counter()
    assert run(xs) == [2 * x for x in xs]
    return MAP_ITEMS / (time.perf_counter() - start)


def bench_rapace(workers: int, calls: int) -> dict[str, float]:
    with PluginPool(Calculator, workers=workers) as pool:
        row = _latency(lambda: pool.submit(Calculator.add, 2, 3).result(), calls)
        row["submit_per_s"] = _window(lambda: pool.submit(Calculator.add, 2, 3), calls * 2)
        row["map256_per_s"] = _map_rate(
            lambda xs: list(pool.map(Calculator.add, xs, xs, chunksize=256))
        )
    row["async_p50_us"] = anyio.run(_async_latency, workers, calls)
    return row


async def _async_latency(workers: int, calls: int) -> float:
    async with PluginPool(Calculator, workers=workers) as pool:
        for _ in range(300):
            await pool.proxy.add(2, 3)
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            await pool.proxy.add(2, 3)
            samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def bench_session(calls: int) -> dict[str, float]:
    """The shm session on its own (bench_shm.py): what ``await pool.proxy.add`` builds on."""
    import bench_shm

    from rapace._connect import Proxy
    from rapace.service import service_spec
    from rapace.session import open_session
    from rapace.wire import Role

    async def body(transport: Any) -> dict[str, float]:
        async with open_session(transport, role=Role.INITIATOR) as session:
            calc: Any = Proxy(session, service_spec(bench_shm.Calculator))
            return await bench_shm._latency(lambda: calc.add(2, 3), calls)

    result: dict[str, float] = anyio.run(bench_shm._with_peer, "session", body)
    return result


def bench_executor(workers: int, calls: int) -> dict[str, float]:
    with concurrent.futures.ProcessPoolExecutor(workers) as ex:
        row = _latency(lambda: ex.submit(add, 2, 3).result(), calls // 4)
        row["submit_per_s"] = _window(lambda: ex.submit(add, 2, 3), calls)
        row["map256_per_s"] = _map_rate(lambda xs: list(ex.map(add, xs, xs, chunksize=256)))
    return row


def bench_startup() -> dict[str, float]:
    start = time.perf_counter()
    with PluginPool(Calculator, workers=4) as pool:
        ready = time.perf_counter() - start
        pids = [f.result() for f in pool.broadcast(Calculator.pid)]
        before = [_cpu_seconds(pid) for pid in pids]
        time.sleep(2.0)  # measuring idle CPU: the pause is the measurement, not a sync
        after = [_cpu_seconds(pid) for pid in pids]
    idle = max(b - a for a, b in zip(before, after, strict=True)) / 2.0
    return {"ready_s_workers4": ready, "idle_worker_cpu_percent": 100 * idle}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    for workers in (1, 2):
        results[f"rapace_w{workers}"] = bench_rapace(workers, args.calls)
        results[f"executor_w{workers}"] = bench_executor(workers, args.calls)
    results["pipe"] = _bench_pipe(args.calls)
    results["shm_session"] = bench_session(args.calls)
    results["startup"] = bench_startup()
    ratios = {}
    for workers in (1, 2):
        mine, theirs = results[f"rapace_w{workers}"], results[f"executor_w{workers}"]
        ratios[f"w{workers}_sync_p50_executor_over_rapace"] = theirs["p50_us"] / mine["p50_us"]
        ratios[f"w{workers}_sync_p50_rapace_over_pipe"] = mine["p50_us"] / results["pipe"]["p50_us"]
        ratios[f"w{workers}_submit_rapace_over_executor"] = (
            mine["submit_per_s"] / theirs["submit_per_s"]
        )
        ratios[f"w{workers}_map256_rapace_over_executor"] = (
            mine["map256_per_s"] / theirs["map256_per_s"]
        )
        ratios[f"w{workers}_async_p50_over_shm_session"] = (
            mine["async_p50_us"] / results["shm_session"]["p50_us"]
        )
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.calls} calls")
    header = f"  {'system':<14} {'p50 us':>8} {'p99 us':>8} {'async p50':>10} "
    header += f"{'submit/s':>9} {'map256/s':>9}"
    print(header)
    for name, row in results.items():
        if name == "startup":
            continue
        print(
            f"  {name:<14} {row['p50_us']:8.1f} {row['p99_us']:8.1f} "
            f"{row.get('async_p50_us', float('nan')):10.1f} "
            f"{row.get('submit_per_s', row.get('calls_per_s', float('nan'))):9.0f} "
            f"{row.get('map256_per_s', float('nan')):9.0f}"
        )
    startup = results["startup"]
    print(
        f"  ready with 4 workers: {startup['ready_s_workers4']:.2f} s; idle worker: "
        f"{startup['idle_worker_cpu_percent']:.2f}% of a core"
    )
    for name, value in ratios.items():
        print(f"  {name:<38} {value:7.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
