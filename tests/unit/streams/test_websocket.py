"""WebSocket: one binary message per frame, the token greeting inside messages, and what a
listener refuses (text, garbage, oversized messages, wrong paths, wrong tokens).

Misbehaving peers are played by :class:`BrowserClient`: websockets' sans-I/O client over a
plain TCP stream, doing what a browser's ``WebSocket`` would (or, for the tests that need it,
writing raw bytes no browser would send).
"""

from __future__ import annotations

import hmac
import os
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from hashlib import sha256
from typing import Any

import anyio
import anyio.abc
import cbor2
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

import rapace
from rapace import RemoteProtocolError, Status, Unauthenticated
from rapace._connect import serve_async
from rapace.service import service_spec
from rapace.streams._abc import Transport
from rapace.streams._net import Address, connect_transport, serve_transports
from rapace.wire import (
    CallKind,
    Descriptor,
    Frame,
    HandshakeComplete,
    ResponseReceived,
    Role,
    Session,
    decode_descriptor,
    encode_descriptor,
)
from rapace.wire._descriptor import DATA
from tests.conformance.services import Conformance

pytestmark = pytest.mark.anyio

TOKEN = "ws-s3cret"
PATH = "/rapace"
URL = f"ws://127.0.0.1:0{PATH}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _frame(payload: bytes, msg_id: int = 1) -> Frame:
    return Frame(Descriptor(msg_id=msg_id, channel_id=1, flags=DATA), payload)


def _message(frame: Frame) -> bytes:
    """What a browser sends for ``frame``: the descriptor, then the payload."""
    payload = bytes(frame.payload)
    return encode_descriptor(frame.descriptor, payload) + payload


# ------------------------------------------------------------------------ servers


class Ended:
    """How a server-side handler ended, observable once it did."""

    def __init__(self) -> None:
        self.exc: BaseException | None = None
        self.event = anyio.Event()

    async def wait(self) -> BaseException | None:
        await self.event.wait()
        return self.exc


def echo(ended: Ended | None = None) -> Callable[[Transport], Awaitable[None]]:
    """A handler sending back every frame it receives; records how it ended."""

    async def handle(transport: Transport) -> None:
        try:
            while True:
                await transport.send(await transport.receive())
        except BaseException as exc:
            if ended is not None:
                ended.exc = exc
            raise
        finally:
            if ended is not None:
                ended.event.set()

    return handle


@asynccontextmanager
async def frame_server(
    handler: Callable[[Transport], Awaitable[None]], max_frame_bytes: int = 16 * 1024 * 1024
) -> AsyncIterator[Address]:
    async with anyio.create_task_group() as tg:
        bound = await tg.start(
            lambda task_status: serve_transports(
                URL, handler, token=TOKEN, max_frame_bytes=max_frame_bytes, task_status=task_status
            )
        )
        yield bound
        tg.cancel_scope.cancel()


@asynccontextmanager
async def rpc_server(impl: object) -> AsyncIterator[Address]:
    async with anyio.create_task_group() as tg:
        bound = await tg.start(
            lambda task_status: serve_async(impl, listen=URL, token=TOKEN, task_status=task_status)
        )
        yield bound
        tg.cancel_scope.cancel()


# -------------------------------------------------------------- a browser-like client


class Closed(Exception):
    """The server closed the WebSocket (``code`` 1006: without a close frame)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed with {code} {reason!r}")
        self.code = code
        self.reason = reason


class BrowserClient:
    """websockets' sans-I/O client over an anyio TCP stream: one binary WebSocket frame per
    message, like a browser; plus raw writes for what a browser would never send."""

    def __init__(self, stream: anyio.abc.SocketStream, protocol: ClientProtocol) -> None:
        self.stream = stream
        self.protocol = protocol
        self.frames: deque[WsFrame] = deque()
        self.eof = False

    @classmethod
    @asynccontextmanager
    async def open(cls, bound: Address, path: str = PATH) -> AsyncIterator[BrowserClient]:
        stream = await anyio.connect_tcp(bound.host, bound.port)
        async with stream:
            protocol = ClientProtocol(parse_uri(f"ws://{bound.host}:{bound.port}{path}"))
            client = cls(stream, protocol)
            protocol.send_request(protocol.connect())
            await client._write()
            while protocol.state is State.CONNECTING and protocol.handshake_exc is None:
                await client._read()
            yield client

    async def _write(self) -> None:
        for data in self.protocol.data_to_send():
            try:
                await (self.stream.send(data) if data else self.stream.send_eof())
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                return  # the server is gone: what it said is in what we read

    async def _read(self) -> None:
        try:
            data = await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            self.eof = True
            self.protocol.receive_eof()
        else:
            self.protocol.receive_data(data)
        self.frames.extend(e for e in self.protocol.events_received() if isinstance(e, WsFrame))
        await self._write()

    async def next_frame(self) -> WsFrame:
        """The next data or pong frame; Closed once the server closed."""
        while not self.frames:
            close = self.protocol.close_rcvd
            if close is not None:
                raise Closed(close.code, close.reason)
            if self.eof:
                raise Closed(1006, "")
            await self._read()
        frame = self.frames.popleft()
        if frame.opcode is Opcode.CLOSE:
            self.frames.appendleft(frame)  # seen again (and raised) by every later call
            close = self.protocol.close_rcvd
            assert close is not None
            raise Closed(close.code, close.reason)
        return frame

    async def receive(self) -> bytes:
        """The next binary message (pongs are skipped)."""
        while True:
            frame = await self.next_frame()
            if frame.opcode is Opcode.BINARY:
                assert frame.fin
                return bytes(frame.data)

    async def closed_by_server(self) -> Closed:
        """Read (and drop messages) until the server closes; return how."""
        while True:
            try:
                await self.next_frame()
            except Closed as closed:
                return closed

    async def send(self, message: bytes) -> None:
        self.protocol.send_binary(message)
        await self._write()

    async def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        await self._write()

    async def send_fragmented(self, message: bytes, pieces: int) -> None:
        step = -(-len(message) // pieces)
        chunks = [message[i : i + step] for i in range(0, len(message), step)]
        self.protocol.send_binary(chunks[0], fin=False)
        for i, chunk in enumerate(chunks[1:], 2):
            self.protocol.send_continuation(chunk, fin=i == len(chunks))
        await self._write()

    async def ping(self, data: bytes) -> None:
        self.protocol.send_ping(data)
        await self._write()

    async def authenticate(self, token: str) -> bytes:
        """The greeting as a browser would do it with WebCrypto; the server's verdict."""
        greeting = await self.receive()
        assert greeting[:8] == b"RAPACE\x01\x01"  # magic, then "a token is required"
        nonce_s, nonce_c = greeting[8:], os.urandom(32)
        mac = hmac.new(token.encode(), b"client" + nonce_s + nonce_c, sha256).digest()
        await self.send(nonce_c + mac)
        verdict = await self.receive()
        if verdict[:1] == b"\x01":
            expected = hmac.new(token.encode(), b"server" + nonce_c + nonce_s, sha256).digest()
            assert verdict[1:] == expected  # the server knows the token too
        return verdict


# ---------------------------------------------------------------------------- frames


async def test_frames_round_trip_and_a_clean_close_ends_the_peer() -> None:
    """Frames of every size class cross intact, one message each; closing is EndOfStream
    on the other side."""
    ended = Ended()
    frames = [
        _frame(b"", 1),
        _frame(b"tiny", 2),
        _frame(b"x" * 16, 3),
        _frame(b"y" * 17, 4),
        _frame(os.urandom(300_000), 5),
    ]
    with anyio.fail_after(10):
        async with frame_server(echo(ended)) as bound:
            assert str(bound).startswith("ws://127.0.0.1:")
            assert str(bound).endswith(PATH)
            assert bound.port != 0
            transport = await connect_transport(bound, token=TOKEN)
            assert transport.deadline_mode == "relative"
            await transport.send(frames)
            got: list[Frame] = []
            while len(got) < len(frames):
                got += await transport.receive()
            assert [bytes(f.payload) for f in got] == [bytes(f.payload) for f in frames]
            assert [f.descriptor.msg_id for f in got] == [1, 2, 3, 4, 5]
            await transport.aclose()
            assert isinstance(await ended.wait(), anyio.EndOfStream)


async def test_send_nowait_then_flush() -> None:
    """send_nowait queues (a WebSocket write may wait), flush writes."""
    with anyio.fail_after(10):
        async with frame_server(echo()) as bound:
            transport = await connect_transport(bound, token=TOKEN)
            assert transport.send_nowait([]) is True
            assert transport.send_nowait([_frame(b"a", 1), _frame(b"b", 2)]) is False
            await transport.flush()
            got: list[Frame] = []
            while len(got) < 2:
                got += await transport.receive()
            assert [bytes(f.payload) for f in got] == [b"a", b"b"]
            await transport.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                transport.send_nowait([_frame(b"late")])


async def test_fragmented_messages_and_pings_are_handled() -> None:
    """A message split in WebSocket fragments is one frame; a ping gets its pong."""
    big = _frame(os.urandom(100_000), 7)
    with anyio.fail_after(10):
        async with frame_server(echo()) as bound, BrowserClient.open(bound) as client:
            assert (await client.authenticate(TOKEN))[:1] == b"\x01"
            await client.ping(b"are you there")
            pong = await client.next_frame()
            assert (pong.opcode, bytes(pong.data)) == (Opcode.PONG, b"are you there")
            await client.send_fragmented(_message(big), pieces=3)
            echoed = await client.receive()
            assert echoed == _message(big)
            assert decode_descriptor(echoed).msg_id == 7


# ------------------------------------------------------------------------ the token


@rapace.service
class Counter:
    def __init__(self) -> None:
        self.calls = 0

    async def bump(self) -> int:
        self.calls += 1
        return self.calls


@pytest.mark.parametrize("token", [None, "wrong-token"])
async def test_a_missing_or_wrong_token_is_unauthenticated_before_any_call(
    token: str | None,
) -> None:
    """rapace.connect raises Unauthenticated; no method ran; the listener stays up."""
    impl = Counter()
    with anyio.fail_after(10):
        async with rpc_server(impl) as bound:
            with pytest.raises(Unauthenticated):
                async with rapace.connect(str(bound), Counter, token=token) as counter:
                    await counter.bump()
            with pytest.raises(Unauthenticated):
                await connect_transport(bound, token=token)
            assert impl.calls == 0
            async with rapace.connect(str(bound), Counter, token=TOKEN) as counter:
                assert await counter.bump() == 1


async def test_a_wrong_proof_is_refused_and_closed_with_policy_violation() -> None:
    """The listener answers a wrong HMAC with its refusal, then closes with 1008."""
    with anyio.fail_after(10):
        async with frame_server(echo()) as bound, BrowserClient.open(bound) as client:
            assert await client.authenticate("not-the-token") == b"\x00"
            assert (await client.closed_by_server()).code == 1008


async def test_a_websocket_listener_requires_a_token() -> None:
    """Listening on ws:// without a token is refused up front, at every level."""
    with pytest.raises(ValueError, match="WebSocket listener requires a token"):
        await serve_transports(URL, echo())
    with pytest.raises(ValueError, match="requires a token"):
        await serve_async(Counter(), listen=URL)


def test_serve_without_a_token_is_a_value_error() -> None:
    """rapace.serve(listen="ws://...") without a token fails before listening."""
    with pytest.raises(ValueError, match="requires a token"):
        rapace.serve(Counter(), listen=URL)


# -------------------------------------------------------------- what is refused


async def test_a_text_message_closes_the_connection_with_a_protocol_error() -> None:
    """rapace frames are binary: a text message is 1003 and RemoteProtocolError."""
    ended = Ended()
    with anyio.fail_after(10):
        async with frame_server(echo(ended)) as bound:
            async with BrowserClient.open(bound) as client:
                await client.authenticate(TOKEN)
                await client.send_text("hello")
                assert (await client.closed_by_server()).code == 1003
            exc = await ended.wait()
            assert isinstance(exc, RemoteProtocolError)
            assert "text message" in str(exc)
            await _still_serving(bound)


async def test_a_text_message_during_the_greeting_is_refused() -> None:
    """Before the token proof, too: the connection closes and never reaches a handler."""
    with anyio.fail_after(10):
        async with frame_server(echo()) as bound:
            async with BrowserClient.open(bound) as client:
                await client.receive()  # the greeting
                await client.send_text("let me in")
                assert (await client.closed_by_server()).code == 1003
            await _still_serving(bound)


_VALID = _message(_frame(b"0123456789" * 3))


@pytest.mark.parametrize(
    ("garbage", "match"),
    [
        pytest.param(b"short", "descriptor needs 64 bytes", id="shorter-than-a-descriptor"),
        pytest.param(b"\xff" * 64, "invalid descriptor", id="bad-descriptor"),
        pytest.param(_VALID[:-5], "frame carries", id="payload-shorter-than-declared"),
        pytest.param(_VALID + b"extra", "frame carries", id="payload-longer-than-declared"),
    ],
)
async def test_a_malformed_frame_closes_the_connection(garbage: bytes, match: str) -> None:
    """A binary message that is not a valid frame: 1002 and RemoteProtocolError."""
    ended = Ended()
    with anyio.fail_after(10):
        async with frame_server(echo(ended)) as bound:
            async with BrowserClient.open(bound) as client:
                await client.authenticate(TOKEN)
                await client.send(garbage)
                assert (await client.closed_by_server()).code == 1002
            exc = await ended.wait()
            assert isinstance(exc, RemoteProtocolError)
            assert exc.status == Status.INVALID_FRAME
            assert match in str(exc)


async def test_websocket_level_violations_close_the_connection() -> None:
    """An unmasked client frame breaks RFC 6455: websockets fails it with 1002."""
    ended = Ended()
    with anyio.fail_after(10):
        async with frame_server(echo(ended)) as bound:
            async with BrowserClient.open(bound) as client:
                await client.authenticate(TOKEN)
                await client.stream.send(b"\x82\x05hello")  # FIN + binary, no mask bit
                assert (await client.closed_by_server()).code == 1002
            exc = await ended.wait()
            assert isinstance(exc, RemoteProtocolError)
            assert "WebSocket protocol error" in str(exc)


@pytest.mark.parametrize("declared", [1024 * 1024 + 1, 2**40], ids=["just-over", "a-terabyte"])
async def test_an_oversized_message_is_refused_before_buffering(declared: int) -> None:
    """Only a WebSocket frame header announcing too much is sent, never the payload: the
    listener refuses on the header alone (1009) and the handler sees RESOURCE_EXHAUSTED."""
    ended = Ended()
    header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", declared) + os.urandom(4)
    with anyio.fail_after(10):
        async with frame_server(echo(ended), max_frame_bytes=1024 * 1024) as bound:
            async with BrowserClient.open(bound) as client:
                await client.authenticate(TOKEN)
                await client.stream.send(header)
                assert (await client.closed_by_server()).code == 1009
            exc = await ended.wait()
            assert isinstance(exc, RemoteProtocolError)
            assert exc.status == Status.RESOURCE_EXHAUSTED
            await _still_serving(bound)


async def test_garbage_fails_the_session_not_the_server() -> None:
    """Over a real session: a malformed frame fails that session only (1002); the server
    keeps serving other clients."""
    with anyio.fail_after(10):
        async with rpc_server(Conformance()) as bound:
            async with BrowserClient.open(bound) as client:
                await client.authenticate(TOKEN)
                await client.send(b"\xff" * 64)
                assert (await client.closed_by_server()).code == 1002
            async with rapace.connect(str(bound), Conformance, token=TOKEN) as calc:
                assert await calc.add(2, 3) == 5


async def test_non_websocket_clients_and_wrong_paths_are_refused() -> None:
    """Raw bytes, plain HTTP and another path never reach the greeting."""
    with anyio.fail_after(10):
        async with frame_server(echo()) as bound:
            for garbage in [os.urandom(512), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]:
                async with await anyio.connect_tcp(bound.host, bound.port) as raw:
                    await raw.send(garbage)
                    reply = await _read_to_eof(raw)
                    assert b"RAPACE" not in reply
            async with BrowserClient.open(bound, path="/elsewhere") as client:
                assert client.protocol.handshake_exc is not None
                assert "404" in str(client.protocol.handshake_exc)
            wrong = Address("ws", bound.host, bound.port, "/elsewhere")
            with pytest.raises(RemoteProtocolError, match="handshake"):
                await connect_transport(wrong, token=TOKEN)
            await _still_serving(bound)


async def test_connecting_to_a_non_rapace_websocket_is_a_protocol_error() -> None:
    """A WebSocket server that does not greet like rapace is a RemoteProtocolError."""

    async def handle(stream: anyio.abc.SocketStream) -> None:
        from websockets.server import ServerProtocol

        async with stream:
            protocol = ServerProtocol()
            while protocol.state is State.CONNECTING:
                protocol.receive_data(await stream.receive())
                for event in protocol.events_received():
                    protocol.send_response(protocol.accept(event))  # type: ignore[arg-type]
            protocol.send_binary(b"hello, I am not rapace" + bytes(32))
            for data in protocol.data_to_send():
                await stream.send(data)
            await _read_to_eof(stream)

    with anyio.fail_after(10):
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            with pytest.raises(RemoteProtocolError, match="rapace listener"):
                await connect_transport(f"ws://127.0.0.1:{port}/", token=TOKEN)
            tg.cancel_scope.cancel()


# --------------------------------------------------------------- a browser client


async def test_a_browser_style_client_calls_a_method() -> None:
    """A client with another WebSocket stack, a sans-IO rapace core and CBOR makes a call:
    one binary message per frame each way, deadlines as remaining time."""
    add = next(m for m in service_spec(Conformance).methods if m.name == "add")
    wire = Session(Role.INITIATOR, deadline_mode="relative")
    with anyio.fail_after(10):
        async with rpc_server(Conformance()) as bound, BrowserClient.open(bound) as client:
            await client.authenticate(TOKEN)

            async def flush() -> None:
                for frame in wire.frames_to_send():
                    await client.send(_message(frame))

            async def events() -> list[Any]:
                raw = await client.receive()
                frame = Frame(decode_descriptor(raw), raw[64:])
                return wire.receive_frame(frame, time.monotonic_ns())

            await flush()  # our Hello
            while not any(isinstance(e, HandshakeComplete) for e in await events()):
                pass
            now = time.monotonic_ns()
            channel = wire.open_call(
                add.method_id,
                cbor2.dumps([2, 3]),
                now_ns=now,
                kind=CallKind.UNARY,
                deadline_ns=now + 5_000_000_000,
                sig_hash=add.sig_hash,
            )
            await flush()
            while True:
                done = [e for e in await events() if isinstance(e, ResponseReceived)]
                if done:
                    break
            assert done[0].channel_id == channel
            assert cbor2.loads(bytes(done[0].payload)) == 5
            client.protocol.send_close(1000)
            await client._write()
            assert (await client.closed_by_server()).code == 1000


# ----------------------------------------------------------------- packaging


def test_importing_rapace_does_not_import_websockets() -> None:
    """websockets is optional: nothing imports it until a ws:// address is used."""
    code = (
        "import sys, rapace, rapace._connect, rapace.streams._net; "
        "print('websockets' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_a_ws_address_without_websockets_says_what_to_install() -> None:
    """Without the package, a ws:// address is a ModuleNotFoundError naming the extra."""
    code = (
        "import sys; sys.modules['websockets'] = None\n"
        "import anyio\n"
        "from rapace.streams._net import connect_transport\n"
        "try:\n"
        "    anyio.run(connect_transport, 'ws://127.0.0.1:9/')\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "rapace[websocket]" in out.stdout


# --------------------------------------------------------------------- helpers


async def _still_serving(bound: Address) -> None:
    transport = await connect_transport(bound, token=TOKEN)
    await transport.send([_frame(b"still here")])
    assert [bytes(f.payload) for f in await transport.receive()] == [b"still here"]
    await transport.aclose()


async def _read_to_eof(stream: anyio.abc.ByteStream) -> bytes:
    got = bytearray()
    try:
        while True:
            got += await stream.receive()
    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        return bytes(got)
