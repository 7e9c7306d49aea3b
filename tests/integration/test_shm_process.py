"""The shared-memory transport between real processes: calls, crashes, hostile peers.

Each test starts worker processes on fresh links (``shm_host.shm_child``); the autouse leak
check then proves that no process, fd or ``/dev/shm`` segment outlived the test.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import rapace
from rapace._connect import Proxy
from rapace.service import service_spec
from rapace.session import open_session
from rapace.shm import SUPPORTED
from rapace.shm._liveness import pidfd_open
from rapace.shm._segment import SHM_DIR, SHM_PREFIX
from rapace.wire import Role
from tests.conformance.services import Conformance

from .plugins.shm_scribbler import Scribbler
from .shm_host import ROOT, shm_child

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64"),
]
WORKER = "tests.integration.plugins.serve_shm"
# A dead peer must be noticed well within this (pidfd, or the 10 ms park re-check).
DETECT_S = 2.0


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def _client(module: str = WORKER, service: type = Conformance) -> AsyncIterator[Any]:
    async with (
        shm_child(module) as (transport, process),
        open_session(transport, role=Role.INITIATOR) as session,
    ):
        proxy: Any = Proxy(session, service_spec(service))
        proxy.process = process
        yield proxy


async def test_every_call_shape_across_processes() -> None:
    """Unary, both stream directions, large payloads and errors cross the link."""
    with anyio.fail_after(30):
        async with _client() as calc:
            assert await calc.add(40, 2) == 42
            assert [x async for x in calc.range(1000)] == list(range(1000))
            assert await calc.total(range(10_000)) == sum(range(10_000))
            for size in (17, 2048, 2049, 300_000, 3 * 2**20):
                data = os.urandom(size)
                assert await calc.echo(data) == data
            with pytest.raises(ValueError, match="remote"):
                await calc.fail("remote")
            assert await calc.add(1, 1) == 2


async def test_slot_exhaustion_waits_and_keeps_flowing() -> None:
    """8 concurrent streams of 256 KiB items through 4 large slots per side all complete."""
    item = bytes(256 * 1024)
    results: list[int] = []

    async def stream(calc: Any) -> None:
        got = 0
        async with calc.produce(len(item)) as items:
            async for chunk in items:
                assert len(chunk) == len(item)
                got += 1
                if got == 40:
                    break
        results.append(got)

    with anyio.fail_after(60):
        async with _client() as calc:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(stream, calc)
            assert results == [40] * 8
            assert await calc.add(2, 2) == 4


async def _call_while_killing(calc: Any, call: Any) -> float:
    """Start ``call``, SIGKILL the worker once it is running; seconds until the call failed."""
    failed_after = 0.0

    async def run() -> None:
        nonlocal failed_after
        with pytest.raises(rapace.Unavailable):
            await call()
        failed_after = time.monotonic() - killed_at

    killed_at = 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await calc.wait_started()
        killed_at = time.monotonic()
        calc.process.send_signal(signal.SIGKILL)
    return failed_after


async def test_worker_killed_mid_call_fails_the_call_at_once() -> None:
    """SIGKILL of the worker during a call: the call fails with Unavailable, quickly."""
    with anyio.fail_after(20):
        async with _client() as calc:
            elapsed = await _call_while_killing(calc, calc.wait_forever)
            assert elapsed < DETECT_S


async def test_worker_killed_mid_stream_fails_the_stream_at_once() -> None:
    """SIGKILL of the worker while it streams: the consumer's next item fails quickly."""

    async def consume() -> None:
        async for _ in calc.produce(4096):
            pass

    with anyio.fail_after(20):
        async with _client() as calc:
            elapsed = await _call_while_killing(calc, consume)
            assert elapsed < DETECT_S


async def test_a_scribbling_peer_breaks_only_its_own_session() -> None:
    """Random bytes over the whole segment from the worker's side end that session with a
    protocol error; another link of the same host keeps working."""
    plugin = "tests.integration.plugins.shm_scribbler"
    with anyio.fail_after(30):
        async with _client() as healthy, _client(plugin, Scribbler) as hostile:

            async def scribble_twice() -> None:
                await hostile.scribble()
                # The reply may slip through before the host reads the wreckage: the next
                # call must fail then.
                with anyio.fail_after(DETECT_S):
                    await hostile.scribble()

            with pytest.raises((rapace.ProtocolError, rapace.Unavailable)):
                await scribble_twice()
            assert await healthy.add(20, 22) == 42
            assert [x async for x in healthy.range(3)] == [0, 1, 2]


def _segments_of(pid: int) -> list[str]:
    prefix = f"{SHM_PREFIX}{pid:x}_"
    return [name for name in os.listdir(SHM_DIR) if name.startswith(prefix)]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_host_killed_worker_exits_and_nothing_remains() -> None:
    """SIGKILL of the host mid-call: its worker exits within seconds, no segment remains."""
    command = [sys.executable, "-m", "tests.integration.plugins.shm_host"]
    async with await anyio.open_process(command, cwd=ROOT, stderr=None) as host:
        try:
            assert host.stdout is not None
            line = b""
            with anyio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await host.stdout.receive(1)
            assert line.startswith(b"READY "), line
            worker_pid = int(line.split()[1])
            worker = pidfd_open(worker_pid)
            assert worker is not None
            try:
                host.send_signal(signal.SIGKILL)
                with anyio.fail_after(5):
                    await anyio.wait_readable(worker)  # the worker exited
            finally:
                os.close(worker)
        finally:
            if host.returncode is None:
                host.kill()
            with anyio.fail_after(10, shield=True):
                await host.wait()
    assert _segments_of(host.pid) == []
    assert _segments_of(worker_pid) == []
