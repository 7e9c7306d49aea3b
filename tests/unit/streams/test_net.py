"""Sockets: addresses, the greeting, token authentication and frame exchange."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

import rapace
from rapace import RemoteProtocolError, Unauthenticated
from rapace._connect import serve_async
from rapace.streams._auth import accept_greeting
from rapace.streams._net import Address, connect_transport, parse_address, serve_transports
from rapace.streams._stream_transport import StreamTransport
from rapace.wire import Descriptor, Frame
from rapace.wire._descriptor import DATA
from tests.conformance.services import Conformance

pytestmark = pytest.mark.anyio

TOKEN = "s3cret-token"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _frame(payload: bytes, msg_id: int = 1) -> Frame:
    return Frame(Descriptor(msg_id=msg_id, channel_id=1, flags=DATA), payload)


async def _echo(transport: StreamTransport) -> None:
    while True:
        try:
            frames = await transport.receive()
        except anyio.EndOfStream:
            return
        await transport.send(frames)


@asynccontextmanager
async def _server(
    url: str,
    token: str | None,
    handler: Callable[[StreamTransport], Awaitable[None]] = _echo,
    max_frame_bytes: int = 16 * 1024 * 1024,
) -> AsyncIterator[Address]:
    async with anyio.create_task_group() as tg:
        bound = await tg.start(
            lambda task_status: serve_transports(
                url, handler, token=token, max_frame_bytes=max_frame_bytes, task_status=task_status
            )
        )
        try:
            yield bound
        finally:
            tg.cancel_scope.cancel()


async def _expect_closed_by_peer(stream: anyio.abc.ByteStream) -> None:
    """Read until the peer closes; fail if it keeps the connection open."""
    try:
        while await stream.receive():
            pass
    except (anyio.EndOfStream, anyio.BrokenResourceError):
        return


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tcp://127.0.0.1:7700", Address("tcp", host="127.0.0.1", port=7700)),
        ("tcp://[::1]:80", Address("tcp", host="::1", port=80)),
        ("unix:///tmp/x.sock", Address("unix", path="/tmp/x.sock")),
        ("ws://127.0.0.1:7700/rapace", Address("ws", host="127.0.0.1", port=7700, path="/rapace")),
        ("ws://[::1]:80/a/b", Address("ws", host="::1", port=80, path="/a/b")),
    ],
)
def test_parse_address(url: str, expected: Address) -> None:
    """Supported URLs parse into their parts and print back."""
    assert parse_address(url) == expected
    assert str(expected) == url


@pytest.mark.parametrize(
    "url", ["http://x:1", "tcp://host", "unix://", "wss://h:1/p", "ws://:1/p", "ws://h:1/p?q=1"]
)
def test_parse_address_rejects_bad_urls(url: str) -> None:
    """Unsupported or incomplete URLs are a ValueError naming the URL."""
    with pytest.raises(ValueError, match=r"tcp://|unix://|ws://|scheme"):
        parse_address(url)


def test_parse_address_ws_defaults() -> None:
    """A ws:// URL without a port or a path means port 80 and path /."""
    assert parse_address("ws://example.org") == Address("ws", "example.org", 80, "/")


async def test_unix_socket_round_trip_and_permissions(tmp_path: Path) -> None:
    """Frames cross a Unix socket intact; the socket file is 0600 and removed afterwards."""
    path = tmp_path / "p.sock"
    with anyio.fail_after(10):
        async with _server(f"unix://{path}", None):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            transport = await connect_transport(f"unix://{path}")
            big = os.urandom(300_000)
            await transport.send([_frame(b"hi"), _frame(big, 2)])
            got: list[Frame] = []
            while len(got) < 2:
                got += await transport.receive()
            assert [bytes(f.payload) for f in got] == [b"hi", big]
            await transport.aclose()
    assert not path.exists()


async def test_a_second_unix_listener_cannot_take_a_live_address(tmp_path: Path) -> None:
    """anyio would unlink the first server's socket file and bind over it."""
    path = tmp_path / "p.sock"
    with anyio.fail_after(10):
        async with _server(f"unix://{path}", None):
            refused: list[OSError] = []
            try:
                async with _server(f"unix://{path}", None):
                    pass
            except* OSError as group:
                refused += _leaves(group)
            assert [e.errno for e in refused] == [errno.EADDRINUSE]
            assert "another server is listening" in str(refused[0])
            transport = await connect_transport(f"unix://{path}")  # the first still serves
            await transport.send([_frame(b"still here")])
            assert [bytes(f.payload) for f in await transport.receive()] == [b"still here"]
            await transport.aclose()


def _leaves(group: BaseExceptionGroup[OSError]) -> list[OSError]:
    leaves: list[OSError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves += _leaves(exc)
        else:
            leaves.append(exc)
    return leaves


async def test_a_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "p.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    with anyio.fail_after(10):
        async with _server(f"unix://{path}", None):
            transport = await connect_transport(f"unix://{path}")
            await transport.aclose()


async def test_tcp_with_the_right_token() -> None:
    """A client with the token is let in and frames flow."""
    with anyio.fail_after(10):
        async with _server("tcp://127.0.0.1:0", TOKEN) as bound:
            transport = await connect_transport(bound, token=TOKEN)
            await transport.send([_frame(b"ping")])
            assert [bytes(f.payload) for f in await transport.receive()] == [b"ping"]
            await transport.aclose()


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_tcp_refuses_a_missing_or_wrong_token(token: str | None) -> None:
    """No token, or the wrong one, raises Unauthenticated in the client."""
    with anyio.fail_after(10):
        async with _server("tcp://127.0.0.1:0", TOKEN) as bound:
            with pytest.raises(Unauthenticated):
                await connect_transport(bound, token=token)
            # The listener keeps serving after refusing someone.
            transport = await connect_transport(bound, token=TOKEN)
            await transport.aclose()


async def test_tcp_listener_requires_a_token() -> None:
    """Listening on TCP without a token is refused up front."""
    with pytest.raises(ValueError, match="requires a token"):
        await serve_transports("tcp://127.0.0.1:0", _echo)


async def test_garbage_on_a_listener_is_refused_and_the_server_stays_up(tmp_path: Path) -> None:
    """Random bytes, an HTTP request, or a truncated frame end that connection only."""
    path = tmp_path / "g.sock"
    with anyio.fail_after(10):
        async with _server(f"unix://{path}", None):
            garbage_inputs = [
                os.urandom(512),
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"\x4d" + bytes(10),  # a frame header promising 77 bytes, then EOF
            ]
            for garbage in garbage_inputs:
                raw = await anyio.connect_unix(path)
                await raw.receive(64)  # the greeting
                await raw.send(garbage)
                await raw.send_eof()
                await _expect_closed_by_peer(raw)
                await raw.aclose()
            transport = await connect_transport(f"unix://{path}")
            await transport.send([_frame(b"still here")])
            assert [bytes(f.payload) for f in await transport.receive()] == [b"still here"]
            await transport.aclose()


async def test_client_refuses_a_non_rapace_server(tmp_path: Path) -> None:
    """Connecting to something that is not a rapace listener is a protocol error."""
    path = tmp_path / "http.sock"

    async def handle(stream: anyio.abc.SocketStream) -> None:
        await stream.send(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
        await stream.aclose()

    with anyio.fail_after(10):
        listener = await anyio.create_unix_listener(path)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            with pytest.raises(RemoteProtocolError, match="rapace listener"):
                await connect_transport(f"unix://{path}")
            tg.cancel_scope.cancel()


async def test_oversized_frame_closes_the_connection(tmp_path: Path) -> None:
    """A frame over the receiver's limit is a protocol error and closes that connection."""
    path = tmp_path / "o.sock"
    results: list[BaseException] = []

    async def strict(transport: StreamTransport) -> None:
        try:
            await transport.receive()
        except RemoteProtocolError as exc:
            results.append(exc)
            raise

    with anyio.fail_after(10):
        async with _server(f"unix://{path}", None, strict, max_frame_bytes=1024 * 1024):
            client = await connect_transport(f"unix://{path}")
            try:
                # The server may close before all of it is written: a broken pipe is fine.
                with contextlib.suppress(anyio.BrokenResourceError):
                    await client.send([_frame(bytes(2 * 1024 * 1024))])
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await client.receive()
            finally:
                await client.aclose()
    assert len(results) == 1
    assert "exceeds the limit" in str(results[0])


async def test_a_bad_first_frame_ends_only_that_session() -> None:
    """A peer whose first frame after the greeting is invalid fails its own session while
    it opens (reported inside an exception group); the listener keeps serving others."""
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            bound = await tg.start(
                lambda task_status: serve_async(
                    Conformance(), listen="tcp://127.0.0.1:0", token=TOKEN, task_status=task_status
                )
            )
            raw = await anyio.connect_tcp(bound.host, bound.port)
            async with raw:
                await accept_greeting(raw, TOKEN.encode())
                await raw.send(bytes([64]) + b"\xff" * 64)  # length 64, an invalid descriptor
                await _expect_closed_by_peer(raw)
            async with rapace.connect(str(bound), Conformance, token=TOKEN) as calc:
                assert await calc.add(2, 3) == 5
            tg.cancel_scope.cancel()
