"""Control messages (channel 0) and method ids."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapace._errors import RemoteProtocolError, Status
from rapace.wire._control import (
    PROTOCOL_VERSION,
    CallKind,
    CancelChannel,
    CancelReason,
    CloseChannel,
    ControlMessage,
    GoAway,
    GoAwayReason,
    GrantCredits,
    Hello,
    HelloLimits,
    MethodEntry,
    OpenChannel,
    Ping,
    Pong,
    Role,
    Verb,
    decode_control,
    encode_control,
)
from rapace.wire._method_id import fnv1a_64, method_id

U32 = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------------------ method ids


@pytest.mark.parametrize(
    ("service", "method", "expected"),
    [
        ("Calculator", "add", 0x193FA158),
        ("Vfs", "read", 0xC8C061C2),
        ("EchoService", "echo", 0x57C4BF02),
        ("Test", "method", 0xF4BFDAB6),
    ],
)
def test_method_id_vectors(service: str, method: str, expected: int) -> None:
    assert method_id(service, method) == expected


def test_fnv1a_64_reference_values() -> None:
    assert fnv1a_64(b"") == 0xCBF29CE484222325  # the offset basis
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_method_id_is_a_fold_of_the_joined_name(service: str, method: str) -> None:
    h = fnv1a_64(f"{service}.{method}".encode())
    assert method_id(service, method) == (h >> 32) ^ (h & 0xFFFF_FFFF)
    assert 0 <= method_id(service, method) < 2**32


# ------------------------------------------------------------------------------ enums


def test_protocol_version_is_1_1() -> None:
    # 1.1: a unary request may open its own channel (Flags.OPENS).
    assert PROTOCOL_VERSION == 0x0001_0001


def test_verbs_are_numbered_as_on_the_wire() -> None:
    assert [v.value for v in Verb] == list(range(8))
    messages: list[tuple[ControlMessage, int]] = [
        (Hello(Role.INITIATOR), 0),
        (OpenChannel(1, CallKind.UNARY), 1),
        (CloseChannel(1), 2),
        (CancelChannel(1), 3),
        (GrantCredits(1, 1), 4),
        (Ping(), 5),
        (Pong(), 6),
        (GoAway(), 7),
    ]
    for msg, verb in messages:
        assert verb == msg.VERB


def test_call_kind_directions() -> None:
    streams = {kind: (kind.caller_streams, kind.handler_streams) for kind in CallKind}
    assert streams == {
        CallKind.UNARY: (False, False),
        CallKind.SERVER_STREAMING: (False, True),
        CallKind.CLIENT_STREAMING: (True, False),
        CallKind.BIDI_STREAMING: (True, True),
    }


def test_cancel_reason_statuses() -> None:
    assert {reason: reason.status for reason in CancelReason} == {
        CancelReason.CLIENT_CANCEL: Status.CANCELLED,
        CancelReason.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
        CancelReason.RESOURCE_EXHAUSTED: Status.RESOURCE_EXHAUSTED,
        CancelReason.PROTOCOL_VIOLATION: Status.INTERNAL,
        CancelReason.UNAUTHENTICATED: Status.UNAUTHENTICATED,
        CancelReason.PERMISSION_DENIED: Status.PERMISSION_DENIED,
    }


def test_hello_limits_merge_takes_the_smaller_of_each() -> None:
    a = HelloLimits(max_payload_bytes=10, max_channels=100, initial_window=7)
    b = HelloLimits(max_payload_bytes=20, max_channels=50, initial_window=9)
    assert a.merge(b) == b.merge(a) == HelloLimits(10, 50, 7)


# ------------------------------------------------------------------------------ encoding


def test_known_encodings() -> None:
    assert encode_control(OpenChannel(1, CallKind.UNARY, 0)) == bytes.fromhex("83010000")
    assert encode_control(GrantCredits(1, 1000)) == bytes.fromhex("82011903e8")
    assert encode_control(CancelChannel(3, CancelReason.DEADLINE_EXCEEDED)) == bytes.fromhex(
        "820301"
    )
    assert encode_control(Ping(bytes.fromhex("DEADBEEFCAFEBABE"))) == bytes.fromhex(
        "8148deadbeefcafebabe"
    )
    assert cbor2.loads(encode_control(OpenChannel(5, CallKind.BIDI_STREAMING, 9, {"k": b"v"}))) == [
        5,
        3,
        9,
        {"k": b"v"},
    ]


NAMES = st.text(max_size=30)
METADATA = st.dictionaries(st.text(max_size=20), st.binary(max_size=20), max_size=5)
MESSAGES: st.SearchStrategy[ControlMessage] = st.one_of(
    st.builds(
        Hello,
        role=st.sampled_from(Role),
        limits=st.builds(HelloLimits, st.integers(0, 2**64 - 1), U32, U32),
        methods=st.lists(
            st.builds(MethodEntry, U32, NAMES, st.binary(min_size=32, max_size=32)), max_size=4
        ).map(tuple),
        params=METADATA,
        protocol_version=U32,
    ),
    st.builds(OpenChannel, U32, st.sampled_from(CallKind), U32, METADATA),
    st.builds(CloseChannel, U32, U32, NAMES),
    st.builds(CancelChannel, U32, st.sampled_from(CancelReason)),
    st.builds(GrantCredits, U32, U32),
    st.builds(Ping, st.binary(min_size=8, max_size=8)),
    st.builds(Pong, st.binary(min_size=8, max_size=8)),
    st.builds(GoAway, st.sampled_from(GoAwayReason), U32, NAMES),
)


@given(MESSAGES)
def test_round_trip(msg: ControlMessage) -> None:
    payload = encode_control(msg)
    assert decode_control(int(msg.VERB), payload) == msg
    assert decode_control(int(msg.VERB), memoryview(payload)) == msg


@pytest.mark.parametrize("verb", [8, 9, 50, 99])
def test_reserved_verbs_are_protocol_errors(verb: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_control(verb, b"\x80")
    assert info.value.status is Status.PROTOCOL_ERROR


@pytest.mark.parametrize("verb", [100, 150, 2**32 - 1])
def test_extension_verbs_are_ignored(verb: int) -> None:
    assert decode_control(verb, b"not even cbor \xff") is None


def _hello_fields(**changes: object) -> list[object]:
    fields: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "role": 0,
        "limits": [1, 2, 3],
        "methods": [],
        "params": {},
    }
    fields.update(changes)
    return list(fields.values())


MALFORMED = [
    (Verb.GRANT_CREDITS, b"\xff"),  # not CBOR
    (Verb.GRANT_CREDITS, b""),
    (Verb.GRANT_CREDITS, cbor2.dumps({"a": 1})),  # not an array
    (Verb.GRANT_CREDITS, cbor2.dumps([1])),  # wrong arity
    (Verb.GRANT_CREDITS, cbor2.dumps([1, 2, 3])),
    (Verb.GRANT_CREDITS, cbor2.dumps([-1, 2])),
    (Verb.GRANT_CREDITS, cbor2.dumps([2**32, 2])),
    (Verb.GRANT_CREDITS, cbor2.dumps([True, 2])),  # bool is not an integer here
    (Verb.GRANT_CREDITS, cbor2.dumps([1.0, 2])),
    (Verb.GRANT_CREDITS, b"\x9f\x01\x02\xff"),  # indefinite length
    (Verb.GRANT_CREDITS, b"\x81" * 20 + b"\x00"),  # nesting deeper than allowed
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 4, 0])),  # unknown call kind
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 0, 0, {"k": "text"}])),
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 0, 0, {1: b""}])),
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 0, 0, {"k" * 300: b""}])),
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 0, 0, {"k": bytes(65 * 1024)}])),
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 0, 0, {str(i): b"" for i in range(129)}])),
    (Verb.OPEN_CHANNEL, cbor2.dumps([1, 0, 0, []])),
    (Verb.CANCEL_CHANNEL, cbor2.dumps([1, 6])),  # unknown reason
    (Verb.PING, cbor2.dumps([bytes(7)])),
    (Verb.PONG, cbor2.dumps([bytes(9)])),
    (Verb.PING, cbor2.dumps(["8 chars!"])),
    (Verb.GO_AWAY, cbor2.dumps([4, 0, ""])),  # unknown reason
    (Verb.GO_AWAY, cbor2.dumps([0, 0, "x" * 1025])),
    (Verb.CLOSE_CHANNEL, cbor2.dumps([1, 0])),
    (Verb.HELLO, cbor2.dumps(_hello_fields(role=2))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(limits=[1, 2]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(limits=[2**64, 2, 3]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(limits=[1, 2**32, 3]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(methods=[[1, "m"]]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(methods=[[1, "m", bytes(31)]]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(methods=[[1, 5, bytes(32)]]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(methods={}))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(params=[]))),
    (Verb.HELLO, cbor2.dumps(_hello_fields(version=-1))),
]


@pytest.mark.parametrize(("verb", "payload"), MALFORMED)
def test_malformed_payloads_are_decode_errors(verb: Verb, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_control(int(verb), payload)
    assert info.value.status is Status.DECODE_ERROR


@given(st.sampled_from(list(range(8))), st.binary(max_size=64))
def test_random_payloads_decode_or_raise_remote_protocol_error(verb: int, payload: bytes) -> None:
    try:
        msg = decode_control(verb, payload)
    except RemoteProtocolError as exc:
        error: RemoteProtocolError | None = exc
    else:
        error = None
        assert msg is not None
        assert verb == msg.VERB
    if error is not None:
        assert error.status is Status.DECODE_ERROR


def test_open_channel_without_metadata_has_three_fields() -> None:
    msg = decode_control(Verb.OPEN_CHANNEL, cbor2.dumps([7, 1, 100]))
    assert msg == OpenChannel(7, CallKind.SERVER_STREAMING, 100, {})
    assert len(cbor2.loads(encode_control(OpenChannel(7, CallKind.UNARY, 1)))) == 3
