"""rapace over shared memory between two processes, beside its limit and a pipe.

Measured in one run, so the ratios are comparable:

- rapace: RpcSession over the shm transport, ``add(2, 3)`` to a worker process;
- raw ring: the same transport without a session: one 64-byte descriptor each way
  (ShmTransport frames echoed by the peer): the ring + eventfd limit rapace builds on;
- pipe: ``multiprocessing.Pipe`` with pickled tuples (latency; pipelined for throughput).

Workloads: unary latency p50/p99 (sequential), throughput with 64 calls in flight,
server streaming of 100k small ints (items/s), and an idle link's CPU use over 5 seconds.
Goals (shm issue): p50 at most half the pipe's, throughput 2x the pipe's, 1M items/s.
Run: ``python benchmarks/bench_shm.py [--calls N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

from bench_sockets import IN_FLIGHT, _bench_pipe

import rapace
from rapace import Streaming
from rapace._connect import Proxy
from rapace.service import service_spec
from rapace.session import open_session
from rapace.shm import ShmTransport, attach_link
from rapace.wire import Descriptor, Flags, Frame, Role

STREAM_ITEMS = 100_000
IDLE_SECONDS = 5.0


@rapace.service
class Calculator:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def count(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i


# --------------------------------------------------------------------------- peers


async def _serve_session(offer: str, death_fd: int) -> None:
    transport = attach_link(offer, peer_liveness_fd=death_fd)
    async with open_session(transport, role=Role.ACCEPTOR, serve=Calculator()) as session:
        await session.wait_closed()


async def _serve_echo(offer: str, death_fd: int) -> None:
    """Echo every frame back: the transport's own round trip, no session."""
    transport = attach_link(offer, peer_liveness_fd=death_fd)
    try:
        while True:
            try:
                frames = await transport.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            await transport.send(frames)
    finally:
        await transport.aclose()


async def _serve_idle(offer: str, death_fd: int) -> None:
    """Wait on the link and report this process's CPU seconds when it closes."""
    transport = attach_link(offer, peer_liveness_fd=death_fd)
    start = resource.getrusage(resource.RUSAGE_SELF)
    try:
        while True:
            try:
                await transport.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                break
    finally:
        end = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
        # Includes start-up and teardown: an upper bound on the idle cost.
        sys.stderr.write(f"idle link, worker side: {cpu:.3f} CPU seconds in all\n")
        await transport.aclose()


# --------------------------------------------------------------------------- host


def _summary(samples: list[float]) -> dict[str, float]:
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


async def _latency(call: Callable[[], Awaitable[Any]], calls: int) -> dict[str, float]:
    for _ in range(500):
        await call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return _summary(samples)


async def _throughput(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    per_task = max(1, calls // IN_FLIGHT)

    async def worker() -> None:
        for _ in range(per_task):
            await call()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(IN_FLIGHT):
            tg.start_soon(worker)
    return per_task * IN_FLIGHT / (time.perf_counter() - start)


async def _with_peer(role: str, body: Callable[[ShmTransport], Awaitable[Any]]) -> Any:
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tests.integration.shm_host import shm_child

    async with shm_child("benchmarks.bench_shm", role) as (transport, process):
        result = await body(transport)
        await transport.aclose()
        with anyio.fail_after(10):
            await process.wait()
        return result


async def _bench_session(transport: ShmTransport, calls: int) -> dict[str, float]:
    async with open_session(transport, role=Role.INITIATOR) as session:
        calc: Any = Proxy(session, service_spec(Calculator))
        row = await _latency(lambda: calc.add(2, 3), calls)
        row["calls_per_s"] = await _throughput(lambda: calc.add(2, 3), calls)
        start = time.perf_counter()
        count = 0
        async for _ in calc.count(STREAM_ITEMS):
            count += 1
        row["stream_items_per_s"] = count / (time.perf_counter() - start)
        row["frames_sent"] = transport.stats.frames_sent
        row["parks"] = transport.stats.parks
        row["spin_hits"] = transport.stats.spin_hits
        return row


async def _bench_raw(transport: ShmTransport, calls: int) -> dict[str, float]:
    frame = Frame(Descriptor(msg_id=1, channel_id=1, flags=Flags.DATA), b"\x82\x02\x03")

    async def round_trip() -> None:
        await transport.send([frame])
        await transport.receive()

    return await _latency(round_trip, calls)


async def _bench_idle(transport: ShmTransport) -> dict[str, float]:
    """Both sides parked on an idle link: the host's CPU share (the worker's is on stderr)."""

    async def park() -> None:
        with anyio.move_on_after(IDLE_SECONDS + 1):
            await transport.receive()

    async with anyio.create_task_group() as tg:
        tg.start_soon(park)
        start = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        await anyio.sleep(IDLE_SECONDS)
        end = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.perf_counter() - began
        tg.cancel_scope.cancel()
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    return {"host_cpu_percent": 100 * cpu / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    results: dict[str, dict[str, float]] = {}
    results["raw_ring_echo"] = anyio.run(_with_peer, "echo", lambda t: _bench_raw(t, args.calls))
    results["rapace_shm"] = anyio.run(
        _with_peer, "session", lambda t: _bench_session(t, args.calls)
    )
    results["multiprocessing_pipe"] = _bench_pipe(args.calls)
    idle = anyio.run(_with_peer, "idle", _bench_idle)
    mine, pipe, raw = (
        results["rapace_shm"],
        results["multiprocessing_pipe"],
        results["raw_ring_echo"],
    )
    ratios = {
        "latency_p50_vs_pipe": mine["p50_us"] / pipe["p50_us"],
        "latency_p50_vs_raw_ring": mine["p50_us"] / raw["p50_us"],
        "throughput_vs_pipe": mine["calls_per_s"] / pipe["calls_per_s"],
    }
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, anyio "
        f"{version('anyio')}, {args.calls} calls, {IN_FLIGHT} in flight"
    )
    print(f"  {'system':<22} {'p50 us':>9} {'p99 us':>9} {'calls/s':>10} {'items/s':>10}")
    for name, row in results.items():
        print(
            f"  {name:<22} {row['p50_us']:9.1f} {row['p99_us']:9.1f} "
            f"{row.get('calls_per_s', float('nan')):10.0f} "
            f"{row.get('stream_items_per_s', float('nan')):10.0f}"
        )
    for name, value in ratios.items():
        print(f"  {name:<26} {value:6.2f}x")
    print(
        f"  idle link, host side: {idle['host_cpu_percent']:.2f}% of a core over {IDLE_SECONDS} s"
    )
    if args.json:
        out = {"results": results, "ratios": ratios, "idle": idle}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1].startswith("rapace-shm-"):
        # A peer: OFFER DEATH_FD HOST_PID BACKEND ROLE (see tests/integration/shm_host.py).
        serve = {"session": _serve_session, "echo": _serve_echo, "idle": _serve_idle}
        anyio.run(serve[sys.argv[5]], sys.argv[1], int(sys.argv[2]), backend=sys.argv[4])
        sys.exit(0)
    sys.exit(main())
