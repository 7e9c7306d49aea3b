"""A transport over any anyio byte stream: Unix and TCP sockets (and, later, TLS).

Frames are written as ``varint(64 + len) || descriptor || payload``; the reader parses them
out of large reads (see :mod:`rapace.streams._framing`). Writes coalesce every frame of a
batch into one ``send`` except large payloads, which are written from the caller's buffer
without being joined (a copy of a 64 MiB payload costs more than an extra system call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import anyio
import anyio.abc

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

    @property
    def deadline_mode(self) -> DeadlineMode:
        # Two machines share no clock: deadlines travel as remaining time.
        return "relative"

    @property
    def stream(self) -> anyio.abc.ByteStream:
        return self._stream

    async def send(self, frames: Sequence[Frame]) -> None:
        joined = bytearray()
        for frame in frames:
            for piece in encode_frame(frame):
                if memoryview(piece).nbytes <= _JOIN_LIMIT:
                    joined += piece
                    continue
                if joined:
                    await self._stream.send(bytes(joined))
                    joined.clear()
                await self._stream.send(piece)  # type: ignore[arg-type]  # a memoryview is bytes-like
        if joined:
            await self._stream.send(bytes(joined))

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

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.aclose()
