"""Unary `add(2, 3)` over a Unix socket between two processes: rapace vs two baselines.

Measured in one run, so the ratios are comparable:

- rapace: ``rapace.connect("unix://...")`` to a served ``Calculator`` in a child process;
- asyncio: a minimal hand-written protocol (u32 length + cbor2 ``[id, a, b]`` frames, one
  future per call) over a Unix socket, the same shape as rapace's job without any of its
  features;
- pipe: ``multiprocessing.Pipe`` with pickled tuples (latency; pipelined for throughput).

Latency is p50/p99 of sequential calls; throughput keeps 64 calls in flight. Goals: rapace
within 1.5x of the asyncio protocol's latency and ahead of it in throughput. Beside them, the
CPU time per call of client and server (all threads, from schedstat, in nanoseconds) in each
phase: unlike wall time it hardly moves with the machine's other load, and with two vCPUs the
two processes mostly take turns, so throughput is about 1 / (client + server CPU per call).
Run: ``python benchmarks/bench_sockets.py [--calls N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import cbor2

import rapace
from rapace.service import service_spec
from rapace.session import _codecs
from rapace.streams._framing import FrameReader, encode_frame
from rapace.wire import CallReceived, ResponseReceived, Role, Session

IN_FLIGHT = 64


@rapace.service
class Calculator:
    async def add(self, a: int, b: int) -> int:
        return a + b


# --------------------------------------------------------------------------- servers


async def _serve_rapace(path: str) -> None:
    from rapace._connect import serve_async

    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: serve_async(
                Calculator(), listen=f"unix://{path}", task_status=task_status
            )
        )
        print("READY", flush=True)


async def _serve_asyncio(path: str) -> None:
    header = struct.Struct("<I")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (length,) = header.unpack(await reader.readexactly(4))
                call_id, a, b = cbor2.loads(await reader.readexactly(length))
                body = cbor2.dumps([call_id, a + b])
                writer.write(header.pack(len(body)) + body)
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


def _serve_pipe(conn: Connection) -> None:
    while True:
        try:
            a, b = conn.recv()
        except EOFError:
            return
        conn.send(a + b)


# --------------------------------------------------------------------------- clients


def _cpu_ns(pid: int) -> int:
    """CPU time every thread of process ``pid`` has used so far, in nanoseconds.

    From /proc/<pid>/task/*/schedstat: exact, where /proc/<pid>/stat counts clock ticks.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total


class _CpuMeter:
    """CPU time per call of this process and the server's, over one phase."""

    def __init__(self, server_pid: int) -> None:
        self._pids = (os.getpid(), server_pid)
        self._start = tuple(_cpu_ns(pid) for pid in self._pids)

    def per_call_us(self, calls: int) -> tuple[float, float]:
        client, server = (
            (_cpu_ns(pid) - start) / calls / 1e3
            for pid, start in zip(self._pids, self._start, strict=True)
        )
        return client, server


async def _measure(
    call: Callable[[], Awaitable[Any]], calls: int, server_pid: int
) -> dict[str, float]:
    for _ in range(200):  # warm up caches, codecs, the peer's pages
        await call()
    samples = []
    meter = _CpuMeter(server_pid)
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    client_seq, server_seq = meter.per_call_us(calls)
    samples.sort()
    per_worker = max(1, calls // IN_FLIGHT)

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    meter = _CpuMeter(server_pid)
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(IN_FLIGHT):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - start
    client_par, server_par = meter.per_call_us(per_worker * IN_FLIGHT)
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "calls_per_s": per_worker * IN_FLIGHT / elapsed,
        "client_cpu_us_seq": client_seq,
        "server_cpu_us_seq": server_seq,
        "client_cpu_us_in_flight": client_par,
        "server_cpu_us_in_flight": server_par,
    }


async def _client_rapace(path: str, calls: int, server_pid: int) -> dict[str, float]:
    async with rapace.connect(f"unix://{path}", Calculator) as calc:
        return await _measure(lambda: calc.add(2, 3), calls, server_pid)


async def _client_asyncio(path: str, calls: int, server_pid: int) -> dict[str, float]:
    header = struct.Struct("<I")
    reader, writer = await asyncio.open_unix_connection(path)
    pending: dict[int, asyncio.Future[int]] = {}
    next_id = 0

    async def read_loop() -> None:
        while True:
            (length,) = header.unpack(await reader.readexactly(4))
            call_id, result = cbor2.loads(await reader.readexactly(length))
            pending.pop(call_id).set_result(result)

    reader_task = asyncio.ensure_future(read_loop())

    async def add(a: int, b: int) -> int:
        nonlocal next_id
        next_id += 1
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending[next_id] = future
        body = cbor2.dumps([next_id, a, b])
        writer.write(header.pack(len(body)) + body)
        return await future

    try:
        return await _measure(lambda: add(2, 3), calls, server_pid)
    finally:
        reader_task.cancel()
        writer.close()


def _bench_pipe(calls: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve_pipe, args=(child,), daemon=True)
    process.start()
    try:
        for _ in range(200):
            parent.send((2, 3))
            parent.recv()
        samples = []
        meter = _CpuMeter(process.pid)
        for _ in range(calls):
            start = time.perf_counter()
            parent.send((2, 3))
            parent.recv()
            samples.append(time.perf_counter() - start)
        client_seq, server_seq = meter.per_call_us(calls)
        samples.sort()
        meter = _CpuMeter(process.pid)
        start = time.perf_counter()
        for _ in range(IN_FLIGHT):
            parent.send((2, 3))
        for _ in range(calls - IN_FLIGHT):
            parent.recv()
            parent.send((2, 3))
        for _ in range(IN_FLIGHT):
            parent.recv()
        elapsed = time.perf_counter() - start
        client_par, server_par = meter.per_call_us(calls)
        return {
            "p50_us": samples[len(samples) // 2] * 1e6,
            "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
            "calls_per_s": calls / elapsed,
            "client_cpu_us_seq": client_seq,
            "server_cpu_us_seq": server_seq,
            "client_cpu_us_in_flight": client_par,
            "server_cpu_us_in_flight": server_par,
        }
    finally:
        parent.close()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def _bench_protocol(calls: int) -> float:
    """Microseconds of rapace's protocol work for one ``add(2, 3)`` round trip, both sides,
    without I/O or tasks: the wire Sessions, framing and codecs, in a hot loop (best of 5).

    The part of a call that does not depend on how the session drives it; what the
    hand-written protocol spends on this is its two cbor2 calls and a struct header.
    """
    spec = service_spec(Calculator)
    method = spec.by_name["add"]
    codecs = _codecs(method)
    caller = Session(Role.INITIATOR, methods=())
    handler = Session(Role.ACCEPTOR, methods=spec.method_table())
    for frame in caller.frames_to_send():
        handler.receive_frame(frame, 0)
    for frame in handler.frames_to_send():
        caller.receive_frame(frame, 0)
    to_handler, to_caller = FrameReader(), FrameReader()

    def one() -> None:
        payload = codecs.args.encode((2, 3)).data
        caller.open_call(
            method.method_id,
            payload,
            now_ns=time.monotonic_ns(),
            kind=method.kind,
            deadline_ns=None,
            sig_hash=method.sig_hash,
        )
        data = b"".join(bytes(p) for f in caller.frames_to_send() for p in encode_frame(f))
        now = time.monotonic_ns()
        for frame in to_handler.feed(data):
            for event in handler.receive_frame(frame, now):
                if isinstance(event, CallReceived):
                    a, b = codecs.args.decode(event.payload)
                    handler.send_response(event.channel_id, codecs.result.encode(a + b).data)
        data = b"".join(bytes(p) for f in handler.frames_to_send() for p in encode_frame(f))
        for frame in to_caller.feed(data):
            for event in caller.receive_frame(frame, now):
                if isinstance(event, ResponseReceived):
                    codecs.result.decode(event.payload)

    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            one()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _run_with_server(kind: str, calls: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rapace-bench-") as tmp:
        path = str(Path(tmp) / "s.sock")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, path], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "READY":
                raise RuntimeError(f"the {kind} server did not start")
            client = _client_rapace if kind == "rapace" else _client_asyncio
            return anyio.run(client, path, calls, server.pid)
        finally:
            server.kill()
            server.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, path = args.serve
        if kind == "rapace":
            anyio.run(_serve_rapace, path)
        else:
            asyncio.run(_serve_asyncio(path))
        return 0

    results = {
        "rapace_unix": _run_with_server("rapace", args.calls),
        "asyncio_unix_cbor2": _run_with_server("asyncio", args.calls),
        "multiprocessing_pipe": _bench_pipe(args.calls),
    }
    protocol_us = _bench_protocol(args.calls)
    base = results["asyncio_unix_cbor2"]
    mine = results["rapace_unix"]
    ratios = {
        "latency_p50_vs_asyncio": mine["p50_us"] / base["p50_us"],
        "throughput_vs_asyncio": mine["calls_per_s"] / base["calls_per_s"],
        "latency_p50_vs_pipe": mine["p50_us"] / results["multiprocessing_pipe"]["p50_us"],
    }
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, anyio {version('anyio')}, "
        f"{args.calls} calls, {IN_FLIGHT} in flight for throughput"
    )
    print(
        f"  {'system':<24} {'p50 us':>9} {'p99 us':>9} {'calls/s':>10}"
        f"   CPU us/call client+server: {'sequential':>12} {'64 in flight':>14}"
    )
    for name, row in results.items():
        seq = f"{row['client_cpu_us_seq']:.1f}+{row['server_cpu_us_seq']:.1f}"
        par = f"{row['client_cpu_us_in_flight']:.1f}+{row['server_cpu_us_in_flight']:.1f}"
        print(
            f"  {name:<24} {row['p50_us']:9.1f} {row['p99_us']:9.1f} {row['calls_per_s']:10.0f}"
            f"   {'':27}{seq:>12} {par:>14}"
        )
    print(
        f"  rapace protocol work per call (wire Sessions + framing + codecs, both sides, "
        f"no I/O): {protocol_us:.1f} us"
    )
    for name, value in ratios.items():
        print(f"  {name:<28} {value:6.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"results": results, "rapace_protocol_us_per_call": protocol_us, "ratios": ratios},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
