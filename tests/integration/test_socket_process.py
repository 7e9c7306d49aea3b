"""Sockets between real processes: a server in a child process, the client here."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest

import rapace
from tests.conformance.services import Conformance

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).parents[2]
TOKEN = "process-token"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def _server_process(
    url: str, token: str | None
) -> AsyncIterator[tuple[anyio.abc.Process, str]]:
    command = [sys.executable, "-m", "tests.integration.plugins.serve_conformance", url]
    if token is not None:
        command.append(token)
    async with await anyio.open_process(command, cwd=ROOT) as process:
        try:
            assert process.stdout is not None
            line = b""
            with anyio.fail_after(20):
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive(1)
            assert line.startswith(b"READY "), line
            yield process, line.split()[1].decode()
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(10, shield=True):
                await process.wait()


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
async def test_calls_to_a_server_process(tmp_path: Path, scheme: str) -> None:
    """Every call shape works against a server in another process."""
    url = f"unix://{tmp_path / 's.sock'}" if scheme == "unix" else "tcp://127.0.0.1:0"
    token = TOKEN if scheme == "tcp" else None
    async with _server_process(url, token) as (_, address):
        with anyio.fail_after(20):
            async with rapace.connect(address, Conformance, token=token) as calc:
                assert await calc.add(40, 2) == 42
                assert [x async for x in calc.range(3)] == [0, 1, 2]
                assert await calc.total(range(10)) == 45
                with pytest.raises(ValueError, match="remote"):
                    await calc.fail("remote")


async def test_killing_the_server_mid_call_fails_the_call_quickly(tmp_path: Path) -> None:
    """SIGKILL of the server while a call is in flight: the client gets an error, not a hang."""
    url = f"unix://{tmp_path / 'k.sock'}"
    async with (
        _server_process(url, None) as (process, address),
        rapace.connect(address, Conformance) as calc,
    ):
        assert await calc.add(1, 1) == 2
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def kill_soon() -> None:
                    await anyio.wait_all_tasks_blocked()
                    process.send_signal(signal.SIGKILL)

                tg.start_soon(kill_soon)
                with pytest.raises(rapace.Unavailable, match="connection"):
                    await calc.wait_forever()
