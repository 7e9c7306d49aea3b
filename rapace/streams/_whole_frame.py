"""One frame as one unit of bytes: the 64-byte descriptor, then the payload.

Shared by every carrier that delimits frames itself: a byte stream (the varint length in
front, :mod:`rapace.streams._framing`) and a WebSocket (one binary message per frame,
:mod:`rapace.streams._websocket`). Both check a received frame with the same rules, here.

Inline payloads (<= 16 bytes) travel in the descriptor and again after it, so a frame is
always ``64 + payload_len`` bytes and the two copies must agree.
"""

from __future__ import annotations

from typing_extensions import Buffer

from rapace._errors import RemoteProtocolError, Status
from rapace.wire import DESCRIPTOR_SIZE, DescriptorLimits, Frame, decode_descriptor
from rapace.wire._descriptor import encode_descriptor

__all__ = ("decode_whole_frame", "encode_whole_frame")


def encode_whole_frame(frame: Frame) -> bytes:
    """The descriptor and the payload of ``frame`` as one buffer (the payload is copied)."""
    payload = memoryview(frame.payload).cast("B")
    head = encode_descriptor(frame.descriptor, payload)
    return head + payload if payload.nbytes else head


def decode_whole_frame(raw: bytes | bytearray, limits: DescriptorLimits) -> Frame:
    """Validate and decode a frame received whole; the payload is a view of ``raw``.

    Raises:
        RemoteProtocolError: shorter than a descriptor, a descriptor breaking a rule or a
            limit, a ``payload_len`` that disagrees with the bytes, or inline bytes that
            differ from the ones after the descriptor.
    """
    descriptor = decode_descriptor(raw, 0, limits)
    payload_len = len(raw) - DESCRIPTOR_SIZE
    if descriptor.payload_len != payload_len:
        raise RemoteProtocolError(
            f"descriptor says {descriptor.payload_len} payload bytes, frame carries {payload_len}",
            status=Status.INVALID_FRAME,
        )
    payload: Buffer = memoryview(raw)[DESCRIPTOR_SIZE:] if payload_len else b""
    if (
        payload_len
        and descriptor.is_inline
        and bytes(payload) != bytes(descriptor.inline_payload[:payload_len])
    ):
        raise RemoteProtocolError(
            "inline payload differs from the bytes after the descriptor",
            status=Status.INVALID_FRAME,
        )
    return Frame(descriptor, payload)
