"""``rapace serve`` as a real process: it says where it listens, serves calls, and stops
cleanly (status 0, no traceback) on SIGINT or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import rapace
from tests.cli_services import Greeter

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).parents[2]
TOKEN_VAR = "RAPACE_TEST_CLI_TOKEN"
TOKEN = "cli-token"
PREFIX = b"listening on "


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def _rapace_serve(
    *args: str,
) -> AsyncIterator[tuple[anyio.abc.Process, BufferedByteReceiveStream, str]]:
    """Start ``python -m rapace serve ARGS`` from the repository root and yield the process,
    its stderr and the address it reported, once it listens. The process is killed and
    reaped on the way out, whatever happened."""
    command = [sys.executable, "-m", "rapace", "serve", *args]
    env = {**os.environ, TOKEN_VAR: TOKEN}
    async with await anyio.open_process(command, cwd=ROOT, env=env) as process:
        try:
            assert process.stderr is not None
            stderr = BufferedByteReceiveStream(process.stderr)
            with anyio.fail_after(30):
                line = await stderr.receive_until(b"\n", 64 * 1024)
            assert line.startswith(PREFIX), line
            yield process, stderr, line.removeprefix(PREFIX).decode()
        finally:
            if process.returncode is None:
                process.kill()
            with anyio.move_on_after(10, shield=True):
                await process.wait()


async def _rest(stderr: BufferedByteReceiveStream) -> bytes:
    """Whatever the process wrote to stderr after its first line, up to its exit."""
    rest = stderr.buffer
    with anyio.fail_after(10):
        async for chunk in stderr.receive_stream:
            rest += chunk
    return bytes(rest)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_serve_over_unix_then_stop(tmp_path: Path, stop: signal.Signals) -> None:
    socket_path = tmp_path / "s.sock"
    url = f"unix://{socket_path}"
    async with _rapace_serve("tests.cli_services:Impl", "--listen", url) as (
        process,
        stderr,
        bound,
    ):
        assert bound == url
        with anyio.fail_after(20):
            async with rapace.connect(url, Greeter) as greeter:
                assert await greeter.greet("world") == "hello, world!"
                assert [x async for x in greeter.count(3)] == [0, 1, 2]
                assert await greeter.shout("quiet") == "QUIET"
        process.send_signal(stop)
        with anyio.fail_after(20):
            status = await process.wait()
        rest = await _rest(stderr)
    assert status == 0, rest
    assert b"Traceback" not in rest
    assert rest == b""
    assert not socket_path.exists()  # the listener removed its socket file


async def test_serve_over_tcp_with_a_token_and_constructor_arguments() -> None:
    """Port 0 binds any free port, and the reported address is the real one."""
    async with _rapace_serve(
        "tests.cli_services:Impl",
        "--listen",
        "tcp://127.0.0.1:0",
        "--token-env",
        TOKEN_VAR,
        "--args",
        '{"greeting": "hi"}',
    ) as (process, stderr, bound):
        assert bound.startswith("tcp://127.0.0.1:")
        assert not bound.endswith(":0")
        with anyio.fail_after(20):
            async with rapace.connect(bound, Greeter, token=TOKEN) as greeter:
                assert await greeter.greet("you", punctuation="?") == "hi, you?"
                assert await greeter.total(range(5)) == 10
            with pytest.raises(rapace.Unauthenticated):
                async with rapace.connect(bound, Greeter, token="wrong"):
                    pass
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(20):
            status = await process.wait()
        rest = await _rest(stderr)
    assert status == 0, rest
    assert b"Traceback" not in rest
