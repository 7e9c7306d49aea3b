"""Unary `add(2, 3)` over a Unix socket between two processes: rapace vs two baselines.

Measured in one run, so the ratios are comparable:

- rapace: ``rapace.connect("unix://...")`` to a served ``Calculator`` in a child process;
- asyncio: a minimal hand-written protocol (u32 length + cbor2 ``[id, a, b]`` frames, one
  future per call) over a Unix socket, the same shape as rapace's job without any of its
  features;
- pipe: ``multiprocessing.Pipe`` with pickled tuples (latency; pipelined for throughput).

Latency is p50/p99 of sequential calls; throughput keeps 64 calls in flight. Goals: rapace
within 1.5x of the asyncio protocol's latency and ahead of it in throughput.
Run: ``python benchmarks/bench_sockets.py [--calls N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def _measure(call: Callable[[], Awaitable[Any]], calls: int) -> dict[str, float]:
    for _ in range(200):  # warm up caches, codecs, the peer's pages
        await call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    samples.sort()
    per_worker = max(1, calls // IN_FLIGHT)

    async def worker() -> None:
        for _ in range(per_worker):
            await call()

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(IN_FLIGHT):
            tg.start_soon(worker)
    elapsed = time.perf_counter() - start
    return {
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "calls_per_s": per_worker * IN_FLIGHT / elapsed,
    }


async def _client_rapace(path: str, calls: int) -> dict[str, float]:
    async with rapace.connect(f"unix://{path}", Calculator) as calc:
        return await _measure(lambda: calc.add(2, 3), calls)


async def _client_asyncio(path: str, calls: int) -> dict[str, float]:
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
        return await _measure(lambda: add(2, 3), calls)
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
        for _ in range(calls):
            start = time.perf_counter()
            parent.send((2, 3))
            parent.recv()
            samples.append(time.perf_counter() - start)
        samples.sort()
        start = time.perf_counter()
        for _ in range(IN_FLIGHT):
            parent.send((2, 3))
        for _ in range(calls - IN_FLIGHT):
            parent.recv()
            parent.send((2, 3))
        for _ in range(IN_FLIGHT):
            parent.recv()
        elapsed = time.perf_counter() - start
        return {
            "p50_us": samples[len(samples) // 2] * 1e6,
            "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
            "calls_per_s": calls / elapsed,
        }
    finally:
        parent.close()
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


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
            return anyio.run(client, path, calls)
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
    print(f"  {'system':<24} {'p50 us':>9} {'p99 us':>9} {'calls/s':>10}")
    for name, row in results.items():
        print(f"  {name:<24} {row['p50_us']:9.1f} {row['p99_us']:9.1f} {row['calls_per_s']:10.0f}")
    for name, value in ratios.items():
        print(f"  {name:<28} {value:6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
