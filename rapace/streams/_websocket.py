"""WebSocket (RFC 6455): one binary message is one frame, for browser clients.

A message is exactly one frame: the 64-byte descriptor, then the payload (an inline payload
of <= 16 bytes travels in the descriptor and again after it, as on every stream transport:
see :mod:`rapace.streams._whole_frame`, which checks received frames for both).

The WebSocket protocol itself (handshake, masking, fragmentation, ping/pong, close codes) is
websockets' sans-I/O ``ClientProtocol``/``ServerProtocol``, driven here over an anyio TCP
stream, so the transport runs on asyncio and trio alike. No extension is negotiated (no
permessage-deflate: nothing to inflate, so no decompression bomb).

Setting up a connection, after TCP:

1. The WebSocket opening handshake (HTTP Upgrade). The listener answers 101 only on its own
   path; anything else gets an HTTP error and is closed.
2. The greeting and token proof of :mod:`rapace.streams._auth`, unchanged, each of its steps
   one binary message (see :class:`_MessageStream`): the token never crosses the wire, and a
   client with a wrong or missing token gets ``Unauthenticated`` before any frame is sent.
3. Frames, one per binary message, in both directions.

A text message (close code 1003), a message over the size limit (1009: websockets checks the
length in the WebSocket frame header, before it buffers a byte of the payload), a message that
is not a valid frame (1002), and anything websockets refuses (bad masking, reserved bits, ...:
1002) close the connection; the receiver raises :class:`rapace.RemoteProtocolError`.

A browser speaks it with ``ws = new WebSocket(url); ws.binaryType = "arraybuffer"``, the
greeting's HMAC-SHA256 from WebCrypto, and ``ws.send(descriptorAndPayload)`` per frame.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias

import anyio
import anyio.abc
from websockets.client import ClientProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import OK_CLOSE_CODES, CloseCode, Opcode
from websockets.frames import Frame as WsFrame
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from rapace._errors import RemoteProtocolError, Status, Unauthenticated
from rapace.streams._abc import DeadlineMode
from rapace.streams._auth import HANDSHAKE_TIMEOUT_S, accept_greeting, send_greeting
from rapace.streams._framing import DEFAULT_MAX_FRAME_BYTES
from rapace.streams._whole_frame import decode_whole_frame, encode_whole_frame
from rapace.wire import DESCRIPTOR_SIZE, DescriptorLimits, Frame

__all__ = ("WebSocketTransport", "accept_websocket", "connect_websocket")

_READ_BYTES: Final = 256 * 1024
# Consecutive small writes are joined into one send up to this size.
_JOIN_LIMIT: Final = 64 * 1024
#: How long closing may spend writing the close frame to a peer that does not read.
CLOSE_TIMEOUT_S: Final = 2.0
# A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455 section 5.5).
_MAX_REASON_BYTES: Final = 123

_Failure: TypeAlias = anyio.EndOfStream | anyio.BrokenResourceError | RemoteProtocolError


class WebSocketTransport:
    """Frames over one WebSocket connection (made by :func:`connect_websocket` or
    :func:`accept_websocket`). Owns the stream and closes it.

    Writing: whole WebSocket frames are written under one lock, so none is split by
    another. Two queues feed it: the messages of :meth:`send` / :meth:`send_nowait`, which
    only :meth:`send` and :meth:`flush` write, and the replies the protocol makes by itself
    (a pong, a close frame) while receiving, which go first. Receiving writes its replies
    when no writer holds the lock (the holder writes them otherwise) and never writes
    messages: a receiver blocked behind a peer that is not reading would stop reading too,
    and two such peers would wait for each other forever. Once a close frame is queued,
    messages not yet written are dropped (RFC 6455: no data after a close).
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        protocol: Protocol,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self._stream = stream
        self._protocol = protocol
        self._max_frame_bytes = max_frame_bytes
        self._limits = DescriptorLimits(max_payload_len=max_frame_bytes - DESCRIPTOR_SIZE)
        # Whole serialized WebSocket frames not yet written, in order: messages, and the
        # protocol's own replies (or SEND_EOF, for a half-close).
        self._outgoing: deque[bytes] = deque()
        self._replies: deque[bytes] = deque()
        self._write_lock = anyio.Lock()
        # Binary messages received and not yet taken; a fragmented one in progress.
        self._messages: deque[bytes | bytearray] = deque()
        self._fragments: bytearray | None = None
        # The opening handshake's request (server) or response (client), once parsed.
        self._handshake: Request | Response | None = None
        # What ends receiving, raised once the messages before it are taken.
        self._ending: _Failure | None = None
        self._eof = False
        self._closed = False

    @property
    def deadline_mode(self) -> DeadlineMode:
        # WebSocket peers share no clock: deadlines travel as remaining time.
        return "relative"

    # ------------------------------------------------------------------ sending

    def _queue_messages(self, messages: Iterable[bytes]) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        protocol = self._protocol
        if protocol.state is not State.OPEN:
            raise anyio.BrokenResourceError("the WebSocket connection is closing")
        for message in messages:
            protocol.send_binary(message)
        self._outgoing.extend(protocol.data_to_send())

    def _take_replies(self) -> None:
        """Queue what the protocol wrote by itself (handshake, pong, close, half-close)."""
        writes = self._protocol.data_to_send()
        if writes:
            self._replies.extend(writes)
            if self._protocol.state is State.CLOSING or self._protocol.state is State.CLOSED:
                self._outgoing.clear()  # a close frame is queued: no data may follow it

    def send_nowait(self, frames: Sequence[Frame]) -> bool:
        """Queue ``frames``; True only if there was nothing to write (a WebSocket cannot
        be written without waiting here: :meth:`flush` writes)."""
        if frames:
            self._queue_messages(map(encode_whole_frame, frames))
        return not (self._outgoing or self._replies)

    async def flush(self) -> None:
        await self._drain()

    async def send(self, frames: Sequence[Frame]) -> None:
        if frames:
            self._queue_messages(map(encode_whole_frame, frames))
        await self._drain()

    async def _drain(self) -> None:
        """Write every reply and message queued, including what is queued meanwhile."""
        async with self._write_lock:
            outgoing = self._outgoing
            while self._replies or outgoing:
                if self._replies:
                    await self._write_replies_locked()
                    continue
                count, size = 1, len(outgoing[0])
                while count < len(outgoing) and size + len(outgoing[count]) <= _JOIN_LIMIT:
                    size += len(outgoing[count])
                    count += 1
                # Taken before writing: after a cancelled write nothing can be known to be
                # unwritten, and writing it again would corrupt the stream.
                batch = [outgoing.popleft() for _ in range(count)]
                await self._write(batch[0] if count == 1 else b"".join(batch))

    async def _write_replies_locked(self) -> None:
        # A reply is small and matters most when things end (a close frame saying why), just
        # when the writer is likely to be cancelled: each is written shielded (bounded, the
        # peer may not read), so it is either written whole or the connection is dead.
        replies = self._replies
        while replies:
            data = replies[0]
            try:
                with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                    if data == SEND_EOF:  # the protocol is done: half-close
                        with contextlib.suppress(anyio.BrokenResourceError, OSError):
                            await self._stream.send_eof()
                    else:
                        await self._write(data)
            finally:
                replies.popleft()

    async def _write(self, data: bytes) -> None:
        try:
            await self._stream.send(data)
        except OSError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def _write_replies(self) -> None:
        """Write the replies receiving queued (a pong, a close frame), never messages,
        unless a writer holds the lock: it writes them. A failure is left to whatever ends
        receiving, when something does."""
        if not self._replies or self._write_lock.locked():
            return
        if self._ending is None:
            async with self._write_lock:
                await self._write_replies_locked()
            return
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async with self._write_lock:
                await self._write_replies_locked()

    # ---------------------------------------------------------------- receiving

    async def receive(self) -> list[Frame]:
        if self._closed:
            raise anyio.ClosedResourceError
        while not self._messages:
            await self._receive_more()
        frames: list[Frame] = []
        messages = self._messages
        try:
            while messages:
                frames.append(decode_whole_frame(messages.popleft(), self._limits))
        except RemoteProtocolError as exc:
            messages.clear()
            self._fail(CloseCode.PROTOCOL_ERROR, exc)
            await self._write_replies()
            raise
        return frames

    async def _receive_message(self) -> bytes | bytearray:
        """The next binary message, whatever it holds (for the greeting)."""
        while not self._messages:
            await self._receive_more()
        return self._messages.popleft()

    async def _receive_more(self) -> None:
        """Read once from the stream and act on it; raise what ends receiving, if that is
        all there is left."""
        if self._ending is not None:
            raise self._ending
        if self._eof:
            raise anyio.BrokenResourceError("the connection ended")
        try:
            data = await self._stream.receive(_READ_BYTES)
        except anyio.EndOfStream:
            self._eof = True
            self._protocol.receive_eof()
        except (OSError, anyio.BrokenResourceError) as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc
        else:
            self._protocol.receive_data(data)
        self._take_events()
        await self._write_replies()

    def _take_events(self) -> None:
        protocol = self._protocol
        for event in protocol.events_received():
            if isinstance(event, Request | Response):
                self._handshake = event
            elif self._ending is None:
                self._on_frame(event)
        if self._ending is None and protocol.parser_exc is not None:
            self._ending = self._parser_failure(protocol.parser_exc)
        self._take_replies()

    def _on_frame(self, frame: WsFrame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.BINARY:
            if frame.fin:
                self._messages.append(_as_buffer(frame.data))
            else:
                self._fragments = bytearray(frame.data)
        elif opcode is Opcode.CONT:
            # websockets refuses a continuation of nothing, and bounds the whole message
            # by max_size; a continuation of a text message never gets here (failed first).
            assert self._fragments is not None
            self._fragments += frame.data
            if frame.fin:
                self._messages.append(self._fragments)
                self._fragments = None
        elif opcode is Opcode.TEXT:
            self._fail(
                CloseCode.UNSUPPORTED_DATA,
                RemoteProtocolError(
                    "the peer sent a WebSocket text message; rapace frames travel as binary "
                    "messages",
                    status=Status.PROTOCOL_ERROR,
                ),
            )
        elif opcode is Opcode.CLOSE:
            close = self._protocol.close_rcvd
            if close is None or close.code in OK_CLOSE_CODES:
                self._ending = anyio.EndOfStream()
            else:
                self._ending = anyio.BrokenResourceError(
                    f"the peer closed the WebSocket connection: {close}"
                )
        # PING: websockets queued the pong. PONG: nothing to do.

    def _parser_failure(self, exc: Exception) -> _Failure:
        if isinstance(exc, PayloadTooBig):
            return RemoteProtocolError(
                f"WebSocket message exceeds the limit of {self._max_frame_bytes} bytes",
                status=Status.RESOURCE_EXHAUSTED,
            )
        if isinstance(exc, EOFError):
            if self._fragments is not None:
                return anyio.BrokenResourceError("the peer closed the connection mid-message")
            return anyio.BrokenResourceError(
                "the peer closed the connection without a WebSocket close"
            )
        return RemoteProtocolError(f"WebSocket protocol error: {exc}", status=Status.PROTOCOL_ERROR)

    def _fail(self, code: CloseCode, exc: RemoteProtocolError) -> None:
        """Fail the connection (the close frame is queued) and end receiving with ``exc``."""
        self._ending = exc
        self._protocol.fail(code, _reason(str(exc)))
        self._take_replies()

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        await self._close(CloseCode.NORMAL_CLOSURE)

    async def _close(self, code: CloseCode, reason: str = "") -> None:
        """Write what is queued, then a close frame (bounded: the peer may not read), then
        close the stream."""
        if self._closed:
            return
        self._closed = True
        with (
            anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True),
            contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError),
        ):
            await self._drain()
            if self._protocol.state is State.OPEN:
                self._protocol.send_close(code, _reason(reason))
                self._take_replies()
                await self._drain()
        await self._stream.aclose()

    # ------------------------------------------------------------ opening handshake

    async def _open_client(self) -> None:
        protocol = self._protocol
        assert isinstance(protocol, ClientProtocol)
        protocol.send_request(protocol.connect())
        self._take_replies()
        await self._drain()
        while self._handshake is None and protocol.handshake_exc is None:
            await self._receive_more()
        if protocol.handshake_exc is not None:
            raise RemoteProtocolError(
                f"the WebSocket handshake failed: {protocol.handshake_exc}",
                status=Status.PROTOCOL_ERROR,
            ) from protocol.handshake_exc

    async def _open_server(self, path: str) -> None:
        protocol = self._protocol
        assert isinstance(protocol, ServerProtocol)
        while self._handshake is None and protocol.handshake_exc is None:
            await self._receive_more()
        if self._ending is not None:  # a frame before our answer, and an invalid one
            raise self._ending
        request = self._handshake
        if isinstance(request, Request) and urllib.parse.urlsplit(request.path).path != path:
            response = protocol.reject(404, f"no rapace listener at {request.path}\n")
            protocol.send_response(response)
        elif isinstance(request, Request):
            response = protocol.accept(request)
            protocol.send_response(response)
        self._take_replies()  # the response, or an error reply
        await self._write_replies()
        if protocol.state is not State.OPEN:
            raise RemoteProtocolError(
                f"refused a WebSocket handshake: {protocol.handshake_exc or 'wrong path'}",
                status=Status.PROTOCOL_ERROR,
            )


class _MessageStream(anyio.abc.ByteStream):
    """The greeting's view of a WebSocket: each send is one binary message, each receive
    returns one message (a greeting step is a few dozen bytes)."""

    def __init__(self, transport: WebSocketTransport) -> None:
        self._transport = transport

    async def receive(self, max_bytes: int = 65536) -> bytes:
        message = await self._transport._receive_message()
        if len(message) > max_bytes:
            raise RemoteProtocolError(
                f"a greeting message of {len(message)} bytes", status=Status.PROTOCOL_ERROR
            )
        return bytes(message)

    async def send(self, item: bytes) -> None:
        self._transport._queue_messages([bytes(item)])
        await self._transport._drain()

    async def send_eof(self) -> None:
        raise NotImplementedError("the greeting never half-closes")

    async def aclose(self) -> None:
        await self._transport.aclose()


def _check_greeting_ended(leftover: bytes) -> None:
    # Each greeting step is exactly one message, so nothing may be left over.
    if leftover:
        raise RemoteProtocolError(
            "a greeting message carried extra bytes", status=Status.PROTOCOL_ERROR
        )


def _reason(text: str) -> str:
    return text.encode()[:_MAX_REASON_BYTES].decode(errors="ignore")


def _as_buffer(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    return bytes(data) if isinstance(data, memoryview) else data


async def connect_websocket(
    host: str,
    port: int,
    path: str,
    *,
    token: bytes | None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> WebSocketTransport:
    """Connect to ``ws://host:port/path``, open the WebSocket, complete the greeting.

    Raises:
        Unauthenticated: the listener refused the token, or wanted one and none was given.
        RemoteProtocolError: the other end is not a rapace WebSocket listener (or not at
            that path).
        OSError: nothing listens there.
    """
    stream = await anyio.connect_tcp(host, port)
    netloc = f"[{host}]" if ":" in host else host
    protocol = ClientProtocol(parse_uri(f"ws://{netloc}:{port}{path}"), max_size=max_frame_bytes)
    transport = WebSocketTransport(stream, protocol, max_frame_bytes=max_frame_bytes)
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
            await transport._open_client()
        _check_greeting_ended(await accept_greeting(_MessageStream(transport), token))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await transport.aclose()
        raise
    return transport


async def accept_websocket(
    stream: anyio.abc.ByteStream,
    path: str,
    *,
    token: bytes | None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> WebSocketTransport:
    """Listener side: answer the opening handshake on ``path``, greet, check the token.

    On failure the connection is closed (with a close frame saying why when the WebSocket
    was open) and the reason raised.

    Raises:
        Unauthenticated: the client's proof is missing or wrong.
        RemoteProtocolError: not a WebSocket client, another path, or not a rapace peer.
        TimeoutError: the client took longer than the handshake allows.
    """
    protocol = ServerProtocol(max_size=max_frame_bytes)
    transport = WebSocketTransport(stream, protocol, max_frame_bytes=max_frame_bytes)
    try:
        with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
            await transport._open_server(path)
        try:
            leftover = await send_greeting(_MessageStream(transport), token)
        except Unauthenticated:
            with anyio.CancelScope(shield=True):
                await transport._close(CloseCode.POLICY_VIOLATION, "token refused")
            raise
        _check_greeting_ended(leftover)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await transport.aclose()
        raise
    return transport
