"""Frames on a byte stream: ``varint(64 + payload_len) || descriptor || payload``.

The length is an unsigned LEB128 varint of at most 10 bytes. Inline payloads (<= 16 bytes)
travel in the descriptor and again after it, as the Rust project does, so every frame's
length is ``64 + payload_len`` and a reader never needs the descriptor to find the next
frame.

:class:`FrameReader` is sans-IO: feed it whatever a socket returned, take whole frames out.
It parses frames out of large reads (anyio's ``receive_exactly`` per field costs a
checkpoint each and caps a stream at ~40k frames/s), and it checks the declared length
against the limit before buffering a byte of the payload, so a hostile length cannot make
it allocate.
"""

from __future__ import annotations

from typing import Final

from typing_extensions import Buffer

from rapace._errors import RemoteProtocolError, Status
from rapace.streams._whole_frame import decode_whole_frame
from rapace.wire import DESCRIPTOR_SIZE, DescriptorLimits, Frame
from rapace.wire._descriptor import encode_descriptor

__all__ = ("DEFAULT_MAX_FRAME_BYTES", "FrameReader", "encode_frame", "encode_varint")

# Large enough for a 256 MiB payload, as ARCHITECTURE.md section 3 promises for sockets.
DEFAULT_MAX_FRAME_BYTES: Final = 256 * 1024 * 1024 + DESCRIPTOR_SIZE
_MAX_VARINT_BYTES: Final = 10
# Below this, a frame's payload is copied out of the read buffer; above it the reader
# assembles it in a dedicated bytearray so a big payload is copied once, not per read.
_COMPACT_THRESHOLD: Final = 64 * 1024


# One byte says every length below 128, which covers a descriptor with an inline payload: the
# usual frame of a small call.
_ONE_BYTE_VARINTS: Final = tuple(bytes((n,)) for n in range(0x80))


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128."""
    if 0 <= value < 0x80:
        return _ONE_BYTE_VARINTS[value]
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(frame: Frame) -> list[Buffer]:
    """The pieces to write for ``frame``, without copying a large payload.

    A writer can hand the list to ``socket.sendmsg`` or join the small ones.
    """
    payload = memoryview(frame.payload).cast("B")
    head = encode_varint(DESCRIPTOR_SIZE + payload.nbytes) + encode_descriptor(
        frame.descriptor, payload
    )
    if not payload.nbytes:
        return [head]
    if payload.nbytes <= _COMPACT_THRESHOLD:
        return [head + payload.tobytes()]
    return [head, payload]


class FrameReader:
    """Incremental frame parser for one connection.

    Args:
        max_frame_bytes: the largest ``64 + payload_len`` accepted; a larger declared length
            raises before anything is buffered for it.
        limits: bounds every decoded descriptor must satisfy.
    """

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        limits: DescriptorLimits | None = None,
    ) -> None:
        self._max_frame_bytes = max_frame_bytes
        self._limits = limits or DescriptorLimits(max_payload_len=max_frame_bytes - DESCRIPTOR_SIZE)
        self._buffer = bytearray()
        # The largest length a one-byte varint can say that needs no further check.
        self._one_byte_max = min(0x7F, max_frame_bytes)
        # A large frame in progress: its declared size and the bytes gathered so far.
        self._big: bytearray | None = None
        self._big_needed = 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) + (len(self._big) if self._big is not None else 0)

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is pending (an EOF here is a clean close)."""
        return not self._buffer and self._big is None

    def feed(self, data: Buffer) -> list[Frame]:
        """Add bytes read from the stream; return every frame they complete.

        Raises:
            RemoteProtocolError: a malformed or oversized frame. The connection is finished:
                call nothing else on this reader.
        """
        frames: list[Frame] = []
        view = memoryview(data).cast("B")
        if self._big is not None:
            view = self._fill_big(view, frames)
        if not view.nbytes:
            return frames
        buffer = self._buffer
        if buffer:
            buffer += view
            del buffer[: self._parse(buffer, frames)]
        else:  # the usual case: parsed where it was read, only a partial frame is kept
            used = self._parse(view, frames)
            if used < view.nbytes:
                buffer += view[used:]
        return frames

    def _fill_big(self, view: memoryview, frames: list[Frame]) -> memoryview:
        assert self._big is not None
        take = min(self._big_needed - len(self._big), view.nbytes)
        self._big += view[:take]
        if len(self._big) == self._big_needed:
            frames.append(self._make_frame(self._big))
            self._big = None
        return view[take:]

    def _parse(self, buffer: bytearray | memoryview, frames: list[Frame]) -> int:
        """Append the frames ``buffer`` completes; the number of bytes they (and a large
        frame's start, moved to its own buffer) took."""
        position = 0
        end = len(buffer)
        small_max = self._one_byte_max
        while position < end:
            length = buffer[position]
            if DESCRIPTOR_SIZE <= length <= small_max:
                start = position + 1  # a one-byte length: the frame of a small call
            else:
                length, header = self._read_varint(buffer, position, end)
                if header == 0:
                    break  # the varint itself is incomplete
                start = position + header
            if end - start >= length:
                frames.append(self._make_frame(bytes(buffer[start : start + length])))
                position = start + length
                continue
            if length > _COMPACT_THRESHOLD:
                self._big = bytearray(buffer[start:end])
                self._big_needed = length
                position = end
            break
        return position

    def _read_varint(
        self, buffer: bytearray | memoryview, position: int, end: int
    ) -> tuple[int, int]:
        """(value, bytes used), or (0, 0) if the varint is not complete yet."""
        value = 0
        for i in range(_MAX_VARINT_BYTES):
            if position + i >= end:
                return 0, 0
            byte = buffer[position + i]
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value < DESCRIPTOR_SIZE:
                    raise RemoteProtocolError(
                        f"frame length {value} is shorter than a descriptor",
                        status=Status.INVALID_FRAME,
                    )
                if value > self._max_frame_bytes:
                    raise RemoteProtocolError(
                        f"frame of {value} bytes exceeds the limit of {self._max_frame_bytes}",
                        status=Status.RESOURCE_EXHAUSTED,
                    )
                return value, i + 1
        raise RemoteProtocolError(
            "frame length varint longer than 10 bytes", status=Status.INVALID_FRAME
        )

    def _make_frame(self, raw: bytes | bytearray) -> Frame:
        return decode_whole_frame(raw, self._limits)
