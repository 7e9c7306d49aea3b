"""A transport over any anyio byte stream: Unix and TCP sockets (and, later, TLS).

Frames are written as ``varint(64 + len) || descriptor || payload``; the reader parses them
out of large reads (see :mod:`rapace.streams._framing`). Writes coalesce every frame of a
batch into one ``send`` except large payloads, which are written from the caller's buffer
without being joined (a copy of a 64 MiB payload costs more than an extra system call).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, NoReturn

import anyio
import anyio.abc
from typing_extensions import Buffer

from rapace.streams._abc import DeadlineMode
from rapace.streams._framing import DEFAULT_MAX_FRAME_BYTES, FrameReader, encode_frame
from rapace.wire import Frame

__all__ = ("StreamTransport",)

_READ_BYTES: Final = 256 * 1024
_JOIN_LIMIT: Final = 64 * 1024


class StreamTransport:
    """Frames over one connected byte stream.

    Args:
        stream: the connected stream; the transport owns it and closes it.
        max_frame_bytes: frames larger than this are refused before they are buffered.
        initial: bytes already read from ``stream`` (by the greeting) that belong to frames.
    """

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        initial: bytes = b"",
    ) -> None:
        self._stream = stream
        self._reader = FrameReader(max_frame_bytes=max_frame_bytes)
        self._closed = False
        # Bytes a handshake read past its end: the start of the peer's first frame.
        self._initial = initial
        # Encoded frames not yet written, in order: joined small pieces and views of large
        # payloads (written from the caller's buffer, not copied).
        self._pending: deque[bytearray | memoryview] = deque()
        # A stream that can write without waiting (UnixByteStream) lets send_nowait write.
        self._try_send: Callable[[Buffer], int] | None = getattr(stream, "try_send", None)

    @property
    def deadline_mode(self) -> DeadlineMode:
        # Two machines share no clock: deadlines travel as remaining time.
        return "relative"

    @property
    def stream(self) -> anyio.abc.ByteStream:
        return self._stream

    def _queue(self, frames: Sequence[Frame]) -> None:
        """Encode ``frames`` onto the pending pieces."""
        for frame in frames:
            self._queue_pieces(encode_frame(frame))

    def _queue_pieces(self, pieces: Iterable[Buffer]) -> None:
        """Add encoded pieces to the pending ones: small pieces joined, large ones kept as
        views of the caller's buffers."""
        pending = self._pending
        for piece in pieces:
            view = memoryview(piece)
            if view.nbytes <= _JOIN_LIMIT and pending and type(pending[-1]) is bytearray:
                pending[-1] += view
            elif view.nbytes <= _JOIN_LIMIT:
                pending.append(bytearray(view))
            else:
                pending.append(view)

    def send_nowait(self, frames: Sequence[Frame]) -> bool:
        """Take ``frames`` and write what the socket accepts without waiting.

        Returns True when everything went out; False when bytes remain, which
        :meth:`flush` (or the next :meth:`send`) writes first. Never call it while a
        ``send``/``flush`` is in progress.
        """
        pieces: list[Buffer] = []
        for frame in frames:
            pieces += encode_frame(frame)
        try_send = self._try_send
        pending = self._pending
        if try_send is not None and not pending and pieces and len(pieces) == len(frames):
            # The usual case: nothing left over and every frame small (one piece each): one
            # buffer and one write, no copy into the pending pieces.
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            try:
                sent = try_send(data)
            except OSError:
                sent = 0  # the writer's flush raises it properly
            size = memoryview(data).nbytes
            if sent == size:
                return True
            pending.append(bytearray(memoryview(data)[sent:]))
            return False
        self._queue_pieces(pieces)
        if try_send is None:
            return False
        while pending:
            head = pending[0]
            try:
                sent = try_send(head)
            except OSError:
                return False  # the writer's flush raises it properly
            if sent < memoryview(head).nbytes:
                pending[0] = memoryview(head)[sent:]
                return False
            pending.popleft()
        return True

    async def flush(self) -> None:
        """Write every pending byte, waiting as needed."""
        pending = self._pending
        while pending:
            await self._stream.send(pending[0])  # type: ignore[arg-type]  # bytes-like
            pending.popleft()

    async def send(self, frames: Sequence[Frame]) -> None:
        self._queue(frames)
        await self.flush()

    async def receive(self) -> list[Frame]:
        if self._initial:
            initial, self._initial = self._initial, b""
            frames = self._reader.feed(initial)
            if frames:
                return frames
        while True:
            try:
                data = await self._stream.receive(_READ_BYTES)
            except anyio.EndOfStream:
                if not self._reader.at_frame_boundary:
                    raise anyio.BrokenResourceError(
                        "the peer closed the connection in the middle of a frame"
                    ) from None
                raise
            except (OSError, anyio.BrokenResourceError) as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            # A RemoteProtocolError from the reader ends this connection; whoever owns the
            # transport closes it (it may still want to say goodbye first).
            frames = self._reader.feed(data)
            if frames:
                return frames

    async def receive_into(self, deliver: Callable[[list[Frame]], None]) -> NoReturn:
        """Hand every batch of frames to ``deliver`` as it arrives until the stream ends,
        then raise as :meth:`receive` would (or raise what ``deliver`` raised).

        Over a stream that can push its reads (a Unix socket on asyncio) ``deliver`` runs
        straight from the event loop's read callback, sparing a task switch per read; it
        must not block. Otherwise this is ``deliver(await self.receive())`` in a loop.
        """
        reader = self._reader

        def feed(data: Buffer) -> None:  # copied into the reader's buffer, not kept
            frames = reader.feed(data)
            if frames:
                deliver(frames)

        if self._initial:
            initial, self._initial = self._initial, b""
            feed(initial)
        stream_receive_into: Callable[[Callable[[Buffer], None]], Awaitable[NoReturn]] | None
        stream_receive_into = getattr(self._stream, "receive_into", None)
        if stream_receive_into is None:
            while True:
                deliver(await self.receive())
        try:
            await stream_receive_into(feed)
        except anyio.EndOfStream:
            if not reader.at_frame_boundary:
                raise anyio.BrokenResourceError(
                    "the peer closed the connection in the middle of a frame"
                ) from None
            raise
        raise AssertionError("a stream's receive_into only ends by raising")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.aclose()
