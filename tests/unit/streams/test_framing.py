"""Stream framing: varint length + descriptor + payload, parsed from arbitrary chunks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapace import RemoteProtocolError
from rapace.streams._framing import FrameReader, encode_frame, encode_varint
from rapace.wire import Descriptor, Frame, encode_descriptor
from rapace.wire._descriptor import DATA, EOS


def _frame(channel: int, payload: bytes, msg_id: int = 1) -> Frame:
    flags = DATA | EOS if payload else EOS
    return Frame(Descriptor(msg_id=msg_id, channel_id=channel, flags=flags), payload)


def _wire(frames: list[Frame]) -> bytes:
    return b"".join(bytes(piece) for f in frames for piece in encode_frame(f))


# Large payloads are built from a small seed: drawing 65 KB of random bytes per example
# would exhaust hypothesis's entropy budget without testing anything more.
payloads = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(65_000, 70_000)).map(
        lambda seed_size: (seed_size[0] * seed_size[1])[: seed_size[1]]
    ),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(payloads, min_size=1, max_size=6), st.data())
def test_frames_survive_any_chunking(items: list[bytes], data: st.DataObject) -> None:
    """Whatever the read sizes, the reader yields exactly the frames written, in order."""
    frames = [_frame(1, p, msg_id=i + 1) for i, p in enumerate(items)]
    wire = _wire(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    reader = FrameReader()
    got: list[Frame] = []
    previous = 0
    for cut in [*cuts, len(wire)]:
        got += reader.feed(wire[previous:cut])
        previous = cut
    assert [bytes(f.payload) for f in got] == items
    assert [f.descriptor.msg_id for f in got] == [f.descriptor.msg_id for f in frames]
    assert reader.at_frame_boundary


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=6), st.data())
def test_frames_do_not_alias_a_read_buffer_that_is_reused(
    items: list[bytes], data: st.DataObject
) -> None:
    """The Unix reader hands feed() a view of one buffer it reads every chunk into: frames,
    and the partial frame kept for the next read, must be copies."""
    frames = [_frame(1, p, msg_id=i + 1) for i, p in enumerate(items)]
    wire = _wire(frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    read_buffer = bytearray(len(wire))
    reader = FrameReader()
    got: list[Frame] = []
    previous = 0
    for cut in [*cuts, len(wire)]:
        size = cut - previous
        read_buffer[:size] = wire[previous:cut]
        got += reader.feed(memoryview(read_buffer)[:size])
        read_buffer[:] = b"\xee" * len(read_buffer)  # the next read overwrites it
        previous = cut
    assert [bytes(f.payload) for f in got] == items


def test_varint_encoding_matches_leb128() -> None:
    """Known LEB128 vectors."""
    assert encode_varint(0) == b"\x00"
    assert encode_varint(127) == b"\x7f"
    assert encode_varint(128) == b"\x80\x01"
    assert encode_varint(64 + 13) == b"\x4d"
    with pytest.raises(ValueError, match="non-negative"):
        encode_varint(-1)


def test_oversized_length_is_refused_before_buffering() -> None:
    """A header declaring a huge frame raises at once: nothing is allocated for it."""
    reader = FrameReader(max_frame_bytes=1024)
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        reader.feed(encode_varint(2**40))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x80" * 11, "longer than 10 bytes"),
        (encode_varint(10) + bytes(10), "shorter than a descriptor"),
    ],
)
def test_malformed_lengths_are_protocol_errors(wire: bytes, message: str) -> None:
    """Bad varints close the connection with a protocol error."""
    with pytest.raises(RemoteProtocolError, match=message):
        FrameReader().feed(wire)


def test_payload_length_must_match_the_frame() -> None:
    """A descriptor whose payload_len disagrees with the frame length is refused."""
    desc = encode_descriptor(Descriptor(msg_id=1, channel_id=1, flags=DATA), b"abc")
    wire = encode_varint(64 + 4) + desc + b"abcd"
    with pytest.raises(RemoteProtocolError, match="payload"):
        FrameReader().feed(wire)


def test_inline_copy_must_match() -> None:
    """The inline area and the bytes after the descriptor must agree."""
    desc = encode_descriptor(Descriptor(msg_id=1, channel_id=1, flags=DATA), b"abc")
    wire = encode_varint(64 + 3) + desc + b"xyz"
    with pytest.raises(RemoteProtocolError, match="inline payload differs"):
        FrameReader().feed(wire)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_random_bytes_only_raise_protocol_errors(chunks: list[bytes]) -> None:
    """Garbage yields frames or RemoteProtocolError, never another exception."""
    reader = FrameReader(max_frame_bytes=4096)
    try:
        for chunk in chunks:
            reader.feed(chunk)
    except RemoteProtocolError:
        pass
    assert reader.buffered_bytes <= 4096 + 10 + sum(map(len, chunks))
