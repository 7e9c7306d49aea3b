"""The 64-byte descriptor: layout, inline payloads, validation, and a round trip."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapace._errors import RemoteProtocolError, Status
from rapace.wire._descriptor import (
    CONTROL,
    CREDITS,
    DATA,
    DEADLINE_NONE,
    DESCRIPTOR_SIZE,
    EOS,
    ERROR,
    HIGH_PRIORITY,
    INLINE_MAX,
    NO_REPLY,
    RESPONSE,
    SLOT_INLINE,
    SLOT_RESERVED,
    Descriptor,
    DescriptorLimits,
    Flags,
    Frame,
    decode_descriptor,
    encode_descriptor,
    encode_descriptor_into,
    validate_descriptor,
)

U32 = 2**32 - 1
U64 = 2**64 - 1


def test_flag_values_match_the_wire_and_the_plain_ints() -> None:
    assert (Flags.DATA, Flags.CONTROL, Flags.EOS, Flags.ERROR) == (0x1, 0x2, 0x4, 0x10)
    assert (Flags.HIGH_PRIORITY, Flags.CREDITS, Flags.NO_REPLY, Flags.RESPONSE) == (
        0x20,
        0x40,
        0x100,
        0x200,
    )
    plain = {
        "DATA": DATA,
        "CONTROL": CONTROL,
        "EOS": EOS,
        "ERROR": ERROR,
        "HIGH_PRIORITY": HIGH_PRIORITY,
        "CREDITS": CREDITS,
        "NO_REPLY": NO_REPLY,
        "RESPONSE": RESPONSE,
    }
    for name, value in plain.items():
        assert type(value) is int
        assert value == Flags[name]


def test_defaults_of_a_fresh_descriptor() -> None:
    desc = Descriptor()
    assert desc.payload_slot == SLOT_INLINE
    assert desc.deadline_ns == DEADLINE_NONE
    assert desc.is_inline
    assert not desc.has_deadline
    assert desc.inline_payload == bytes(16)
    assert Descriptor(deadline_ns=5).has_deadline


def test_layout_offsets_are_little_endian() -> None:
    desc = Descriptor(
        msg_id=0x0102030405060708,
        channel_id=0x11121314,
        method_id=0x21222324,
        payload_slot=0x31323334,
        payload_generation=0x41424344,
        payload_offset=0x51525354,
        flags=DATA | EOS,
        credit_grant=0,
        deadline_ns=0x6162636465666768,
    )
    raw = encode_descriptor(desc, bytes(100))
    assert len(raw) == DESCRIPTOR_SIZE == 64
    assert raw[0:8] == bytes.fromhex("0807060504030201")
    assert raw[8:12] == bytes.fromhex("14131211")
    assert raw[12:16] == bytes.fromhex("24232221")
    assert raw[16:20] == bytes.fromhex("34333231")
    assert raw[20:24] == bytes.fromhex("44434241")
    assert raw[24:28] == bytes.fromhex("54535251")
    assert struct.unpack_from("<I", raw, 28) == (100,)
    assert struct.unpack_from("<I", raw, 32) == (DATA | EOS,)
    assert struct.unpack_from("<I", raw, 36) == (0,)
    assert raw[40:48] == bytes.fromhex("6867666564636261")
    assert raw[48:64] == bytes(16)


def test_small_payload_goes_inline_zero_padded() -> None:
    desc = Descriptor(msg_id=1, channel_id=1, payload_slot=7, payload_generation=3, flags=DATA)
    raw = encode_descriptor(desc, b"hello")
    decoded = decode_descriptor(raw)
    assert decoded.is_inline
    assert decoded.payload_len == 5
    assert decoded.payload_generation == decoded.payload_offset == 0
    assert decoded.inline_payload == b"hello" + bytes(11)
    sixteen = decode_descriptor(encode_descriptor(desc, bytes(range(16))))
    assert sixteen.inline_payload == bytes(range(16))
    assert INLINE_MAX == 16


def test_payload_length_comes_from_the_payload() -> None:
    desc = Descriptor(msg_id=1, channel_id=1, payload_len=999, flags=DATA)
    assert decode_descriptor(encode_descriptor(desc, b"abc")).payload_len == 3
    assert decode_descriptor(encode_descriptor(desc, memoryview(b"abcd"))).payload_len == 4


def test_encode_into_matches_encode() -> None:
    desc = decode_descriptor(encode_descriptor(Descriptor(msg_id=9, channel_id=0, flags=CONTROL)))
    buffer = bytearray(80)
    encode_descriptor_into(desc, buffer, 8)
    assert bytes(buffer[8:72]) == encode_descriptor(desc)
    assert decode_descriptor(buffer, 8) == desc


def test_decode_needs_64_bytes() -> None:
    raw = encode_descriptor(Descriptor(msg_id=1, flags=CONTROL))
    for data, offset in ((raw[:63], 0), (raw, 1), (raw, -1), (b"", 0)):
        with pytest.raises(RemoteProtocolError) as info:
            decode_descriptor(data, offset)
        assert info.value.status is Status.INVALID_FRAME


VALID = Descriptor(
    msg_id=1, channel_id=1, payload_len=3, flags=DATA, inline_payload=b"abc" + bytes(13)
)


@pytest.mark.parametrize(
    ("desc", "limits", "fragment"),
    [
        (VALID._replace(flags=DATA | 0x08), None, "reserved flag"),
        (VALID._replace(flags=DATA | 0x80), None, "reserved flag"),
        (VALID, DescriptorLimits(max_payload_len=2), "exceeds the limit"),
        (VALID._replace(channel_id=5), DescriptorLimits(max_channel_id=4), "channel_id 5"),
        (VALID._replace(msg_id=0), None, "msg_id 0"),
        (VALID._replace(flags=DATA | CONTROL), None, "CONTROL"),
        (VALID._replace(channel_id=0), None, "CONTROL"),
        (VALID._replace(credit_grant=5), None, "credit_grant"),
        (VALID._replace(payload_len=17), None, "inline payload of 17"),
        (VALID._replace(payload_generation=1), None, "generation or offset"),
        (VALID._replace(payload_offset=1), None, "generation or offset"),
        (VALID._replace(payload_len=2), None, "not zero past payload_len"),
        (VALID._replace(payload_slot=SLOT_RESERVED), None, "reserved slot"),
        (
            VALID._replace(payload_slot=4, inline_payload=bytes(16)),
            DescriptorLimits(slot_count=4, slot_size=64),
            "out of range",
        ),
        (
            VALID._replace(payload_slot=3, payload_offset=62, inline_payload=bytes(16)),
            DescriptorLimits(slot_count=4, slot_size=64),
            "overruns the slot size",
        ),
        (
            VALID._replace(flags=RESPONSE, payload_len=0, inline_payload=bytes(16)),
            None,
            "neither DATA, EOS nor CREDITS",
        ),
        (VALID._replace(flags=EOS), None, "payload without the DATA flag"),
    ],
)
def test_validation_rules(desc: Descriptor, limits: DescriptorLimits | None, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError, match=fragment) as info:
        validate_descriptor(desc, limits or DescriptorLimits())
    assert info.value.status is Status.INVALID_FRAME


@pytest.mark.parametrize(
    "desc",
    [
        VALID,
        VALID._replace(flags=EOS, payload_len=0, inline_payload=bytes(16)),
        VALID._replace(flags=CREDITS, credit_grant=100, payload_len=0, inline_payload=bytes(16)),
        VALID._replace(channel_id=0, flags=CONTROL),
        VALID._replace(channel_id=0, flags=CONTROL, payload_len=0, inline_payload=bytes(16)),
        VALID._replace(payload_slot=3, payload_offset=61, inline_payload=bytes(16)),
        VALID._replace(payload_slot=9, payload_len=10**6, inline_payload=bytes(16)),
    ],
)
def test_valid_descriptors_pass(desc: Descriptor) -> None:
    limits = DescriptorLimits(slot_count=4, slot_size=64) if desc.payload_slot == 3 else None
    validate_descriptor(desc, limits or DescriptorLimits())


@st.composite
def valid_frames(draw: st.DrawFn) -> tuple[Descriptor, bytes]:
    channel_id = draw(st.integers(0, U32))
    payload = draw(st.binary(max_size=40))
    flags = draw(st.sampled_from([0, EOS, ERROR | EOS, HIGH_PRIORITY, NO_REPLY, RESPONSE]))
    if channel_id == 0:
        flags |= CONTROL
    elif payload or not flags & EOS:
        flags |= DATA
    credit = 0
    if draw(st.booleans()):
        flags |= CREDITS
        credit = draw(st.integers(0, U32))
    external = len(payload) > INLINE_MAX
    desc = Descriptor(
        msg_id=draw(st.integers(1, U64)),
        channel_id=channel_id,
        method_id=draw(st.integers(0, U32)),
        payload_slot=draw(st.integers(0, SLOT_RESERVED - 1)) if external else SLOT_INLINE,
        payload_generation=draw(st.integers(0, U32)) if external else 0,
        payload_offset=draw(st.integers(0, 1024)) if external else 0,
        payload_len=len(payload),
        flags=flags,
        credit_grant=credit,
        deadline_ns=draw(st.integers(0, U64)),
        inline_payload=bytes(16) if external else payload.ljust(16, b"\0"),
    )
    return desc, payload


@given(valid_frames())
def test_round_trip(frame: tuple[Descriptor, bytes]) -> None:
    desc, payload = frame
    validate_descriptor(desc)
    raw = encode_descriptor(desc, payload)
    assert len(raw) == DESCRIPTOR_SIZE
    assert decode_descriptor(raw) == desc
    assert decode_descriptor(b"xx" + raw, 2) == desc


@given(st.binary(min_size=64, max_size=64))
def test_decoding_random_bytes_yields_a_valid_descriptor_or_remote_protocol_error(
    raw: bytes,
) -> None:
    try:
        desc = decode_descriptor(raw)
    except RemoteProtocolError as exc:
        error: RemoteProtocolError | None = exc
    else:
        error = None
        if desc.is_inline:  # re-encoding its own payload gives back the same bytes
            assert encode_descriptor(desc, desc.inline_payload[: desc.payload_len]) == raw
    if error is not None:
        assert error.status is Status.INVALID_FRAME


def test_frame_defaults_to_an_empty_payload() -> None:
    frame = Frame(Descriptor(msg_id=1, flags=CONTROL))
    assert frame.payload == b""
    assert frame.descriptor.msg_id == 1
