"""Session: handshake, calls, frame shapes, channel ids, cancel, GoAway, ping, deadlines, and
the protocol errors a peer can provoke."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import pytest

from rapace._errors import (
    DeadlineExceeded,
    IncompatibleSchema,
    LocalProtocolError,
    RemoteProtocolError,
    Status,
    Unavailable,
    Unimplemented,
)
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
from rapace.wire._descriptor import (
    CONTROL,
    DATA,
    DEADLINE_NONE,
    EOS,
    ERROR,
    OPENS,
    RESPONSE,
    Descriptor,
    DescriptorLimits,
    Frame,
)
from rapace.wire._method_id import method_id
from rapace.wire._session import Session
from rapace.wire._session_events import (
    CallReceived,
    ChannelCancelled,
    DeadlineExpired,
    EndOfStream,
    ErrorReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    ItemReceived,
    PayloadDropped,
    PongReceived,
    ResponseReceived,
)

ADD = method_id("Calculator", "add")
READ = method_id("Vfs", "read")
SIG_A = b"\xaa" * 32
SIG_B = b"\xbb" * 32


class Pair:
    """Two sessions joined in memory (h11's ConnectionPair): ``a`` is the initiator (host),
    ``b`` the acceptor (plugin). Every frame either side sends is kept in ``log``."""

    def __init__(
        self,
        *,
        a_kwargs: Mapping[str, object] | None = None,
        b_kwargs: Mapping[str, object] | None = None,
        handshake: bool = True,
        b_version: int | None = None,
    ) -> None:
        """``b_version``: the protocol version ``b``'s Hello announces, to play an older peer."""
        self.a = Session(Role.INITIATOR, **(a_kwargs or {}))  # type: ignore[arg-type]
        self.b = Session(Role.ACCEPTOR, **(b_kwargs or {}))  # type: ignore[arg-type]
        self.log: dict[Session, list[Frame]] = {self.a: [], self.b: []}
        self.now = 1_000_000_000
        if b_version is not None:
            (hello_frame,) = self.b._outbox
            hello = decode_control(Verb.HELLO, hello_frame.payload)
            assert isinstance(hello, Hello)
            payload = encode_control(dataclasses.replace(hello, protocol_version=b_version))
            desc = hello_frame.descriptor._replace(payload_len=len(payload))
            self.b._outbox[0] = Frame(desc, payload)
        if handshake:
            assert isinstance(self.send(self.a)[0], HandshakeComplete)
            assert isinstance(self.send(self.b)[0], HandshakeComplete)

    def other(self, side: Session) -> Session:
        return self.b if side is self.a else self.a

    def send(self, side: Session) -> list[Event]:
        """Deliver everything ``side`` queued to the other side; return the events."""
        frames = side.frames_to_send()
        self.log[side].extend(frames)
        events: list[Event] = []
        for frame in frames:
            events.extend(self.other(side).receive_frame(frame, self.now))
        return events

    def exchange(self) -> dict[Session, list[Event]]:
        """Pump both ways until both outboxes are empty; events per receiving side."""
        out: dict[Session, list[Event]] = {self.a: [], self.b: []}
        while True:
            to_b = self.send(self.a)
            to_a = self.send(self.b)
            out[self.b].extend(to_b)
            out[self.a].extend(to_a)
            if not to_a and not to_b and not self.log_pending():
                return out

    def log_pending(self) -> bool:
        return bool(self.a._outbox or self.b._outbox)


class RawPeer:
    """Hand-made frames fed to one session, for what a well-behaved Session never sends."""

    def __init__(self, session: Session, *, hello: bool = True) -> None:
        self.session = session
        self.msg_id = 0
        self.role = Role.ACCEPTOR if session.role is Role.INITIATOR else Role.INITIATOR
        self.now = 0
        if hello:
            self.control(Hello(role=self.role))

    def frame(
        self,
        channel_id: int,
        flags: int,
        payload: bytes = b"",
        *,
        method: int = 0,
        deadline: int = DEADLINE_NONE,
    ) -> list[Event]:
        self.msg_id += 1
        desc = Descriptor(
            msg_id=self.msg_id,
            channel_id=channel_id,
            method_id=method,
            payload_len=len(payload),
            flags=flags,
            deadline_ns=deadline,
        )
        return self.session.receive_frame(Frame(desc, payload), self.now)

    def control(self, msg: ControlMessage) -> list[Event]:
        return self.frame(0, CONTROL, encode_control(msg), method=int(msg.VERB))

    def open(self, channel_id: int, kind: CallKind = CallKind.UNARY) -> list[Event]:
        return self.control(OpenChannel(channel_id, kind, 64 * 1024))

    def call(self, channel_id: int, payload: bytes = b"args") -> list[Event]:
        events = self.open(channel_id)
        return events + self.frame(channel_id, DATA | EOS, payload, method=ADD)


PROTOCOL_1_0 = 0x0001_0000  # before requests could open their own channel


def control_messages(frames: list[Frame]) -> list[ControlMessage]:
    out = []
    for frame in frames:
        if frame.descriptor.channel_id == 0:
            msg = decode_control(frame.descriptor.method_id, frame.payload)
            assert msg is not None
            out.append(msg)
    return out


def assert_failed_with_go_away(session: Session) -> None:
    """The session is closed, its last queued frame is GoAway(PROTOCOL_ERROR), and it refuses
    every later frame."""
    assert session.closed
    frames = session.frames_to_send()
    last = frames[-1]
    assert last.descriptor.channel_id == 0
    assert last.descriptor.flags & CONTROL
    msg = decode_control(last.descriptor.method_id, last.payload)
    assert isinstance(msg, GoAway)
    assert msg.reason is GoAwayReason.PROTOCOL_ERROR
    with pytest.raises(RemoteProtocolError):
        session.receive_frame(Frame(Descriptor(msg_id=99, flags=CONTROL), b""), 0)
    with pytest.raises(LocalProtocolError):
        session.ping(bytes(8))


# ------------------------------------------------------------------------------ handshake


def test_first_frame_is_hello_with_control_flag() -> None:
    session = Session(Role.INITIATOR, methods=[MethodEntry(ADD, "Calculator.add", SIG_A)])
    frames = session.frames_to_send()
    assert len(frames) == 1
    desc = frames[0].descriptor
    assert (desc.msg_id, desc.channel_id, desc.method_id) == (1, 0, Verb.HELLO)
    assert desc.flags == CONTROL
    assert desc.payload_len == len(bytes(frames[0].payload))
    hello = decode_control(desc.method_id, frames[0].payload)
    assert isinstance(hello, Hello)
    assert hello.role is Role.INITIATOR
    assert hello.protocol_version >> 16 == 1
    assert hello.methods == (MethodEntry(ADD, "Calculator.add", SIG_A),)
    assert session.frames_to_send() == []


def test_handshake_reports_peer_and_effective_limits() -> None:
    pair = Pair(
        a_kwargs={"limits": HelloLimits(max_payload_bytes=1000, initial_window=4096)},
        b_kwargs={"limits": HelloLimits(max_channels=10, initial_window=8192)},
        handshake=False,
    )
    assert not pair.a.handshake_complete
    (event_b,) = pair.send(pair.a)
    (event_a,) = pair.send(pair.b)
    assert isinstance(event_a, HandshakeComplete)
    assert isinstance(event_b, HandshakeComplete)
    assert event_a.peer.role is Role.ACCEPTOR
    assert event_b.peer.role is Role.INITIATOR
    expected = HelloLimits(max_payload_bytes=1000, max_channels=10, initial_window=4096)
    assert event_a.limits == event_b.limits == expected
    assert pair.a.limits == pair.b.limits == expected
    assert pair.a.peer_hello == event_a.peer
    assert pair.a.handshake_complete


def test_hello_params_travel_and_bad_params_are_refused_locally() -> None:
    pair = Pair(a_kwargs={"params": {"x-codec": b"cbor"}})
    assert pair.b.peer_hello is not None
    assert pair.b.peer_hello.params == {"x-codec": b"cbor"}
    with pytest.raises(LocalProtocolError):
        Session(Role.INITIATOR, params={"k": "not bytes"})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "methods",
    [
        [MethodEntry(0, "Bad.zero")],
        [MethodEntry(ADD, "Calculator.add"), MethodEntry(ADD, "Other.add")],
    ],
)
def test_own_method_table_with_zero_or_duplicate_id_is_refused(methods: list[MethodEntry]) -> None:
    with pytest.raises(LocalProtocolError):
        Session(Role.ACCEPTOR, methods=methods)


@pytest.mark.parametrize(
    "methods",
    [
        (MethodEntry(0, "Bad.zero"),),
        (MethodEntry(ADD, "Calculator.add"), MethodEntry(ADD, "Other.add")),
    ],
)
def test_peer_method_table_with_zero_or_duplicate_id_is_rejected(
    methods: tuple[MethodEntry, ...],
) -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session, hello=False)
    with pytest.raises(RemoteProtocolError):
        raw.control(Hello(role=Role.ACCEPTOR, methods=methods))
    assert_failed_with_go_away(session)


def test_major_version_mismatch_is_incompatible_schema() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session, hello=False)
    with pytest.raises(RemoteProtocolError) as info:
        raw.control(Hello(role=Role.ACCEPTOR, protocol_version=PROTOCOL_VERSION + 0x1_0000))
    assert info.value.status is Status.INCOMPATIBLE_SCHEMA
    assert_failed_with_go_away(session)


def test_minor_version_difference_is_accepted() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session, hello=False)
    (event,) = raw.control(Hello(role=Role.ACCEPTOR, protocol_version=PROTOCOL_VERSION + 7))
    assert isinstance(event, HandshakeComplete)


def test_same_role_on_both_sides_is_rejected() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session, hello=False)
    with pytest.raises(RemoteProtocolError):
        raw.control(Hello(role=Role.INITIATOR))
    assert_failed_with_go_away(session)


def test_peer_window_of_zero_is_rejected() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session, hello=False)
    with pytest.raises(RemoteProtocolError):
        raw.control(Hello(role=Role.ACCEPTOR, limits=HelloLimits(initial_window=0)))


@pytest.mark.parametrize(
    "first",
    [
        lambda raw: raw.control(Ping(bytes(8))),
        lambda raw: raw.frame(1, DATA | EOS, b"x", method=ADD),
        lambda raw: raw.frame(0, 0, encode_control(Hello(role=Role.ACCEPTOR))),
    ],
    ids=["ping", "data", "hello-without-control-flag"],
)
def test_first_frame_must_be_hello(first: Callable[[RawPeer], object]) -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session, hello=False)
    with pytest.raises(RemoteProtocolError):
        first(raw)
    assert_failed_with_go_away(session)


def test_second_hello_is_a_protocol_error() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session)
    with pytest.raises(RemoteProtocolError):
        raw.control(Hello(role=Role.ACCEPTOR))


def test_open_call_before_handshake_is_a_local_error_and_sends_nothing() -> None:
    session = Session(Role.INITIATOR)
    session.frames_to_send()
    with pytest.raises(LocalProtocolError):
        session.open_call(ADD, b"", now_ns=0)
    assert session.frames_to_send() == []
    raw = RawPeer(session)  # still usable: the handshake completes afterwards
    assert session.handshake_complete
    assert raw.session.open_call(ADD, b"", now_ns=0) == 1


def test_ping_may_be_sent_before_the_peer_hello_arrives() -> None:
    pair = Pair(handshake=False)
    pair.a.ping(b"12345678")
    events = pair.exchange()
    assert [type(e) for e in events[pair.b]] == [HandshakeComplete]
    assert [type(e) for e in events[pair.a]] == [HandshakeComplete, PongReceived]
    assert events[pair.a][1] == PongReceived(b"12345678")


# ------------------------------------------------------------------------------ unary calls


def test_unary_round_trip() -> None:
    pair = Pair(b_kwargs={"methods": [MethodEntry(ADD, "Calculator.add")]})
    cid = pair.a.open_call(ADD, b"\x82\x02\x03", now_ns=pair.now)
    (call,) = pair.send(pair.a)
    assert call == CallReceived(cid, ADD, CallKind.UNARY, b"\x82\x02\x03", None, {})
    pair.b.send_response(cid, b"\x05")
    assert pair.send(pair.b) == [ResponseReceived(cid, b"\x05")]
    assert pair.a.statistics().open_channels == 0
    assert pair.b.statistics().open_channels == 0
    assert pair.a.statistics().frames_sent == 2  # Hello, the request that opens its channel
    assert pair.b.statistics().frames_received == 2
    assert pair.send(pair.a) == []  # nothing trails a finished unary call


def test_call_frame_shapes() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"args", now_ns=pair.now, metadata={"rapace.trace_id": b"t"})
    open_frame, request = pair.a.frames_to_send()
    assert open_frame.descriptor.channel_id == 0
    assert open_frame.descriptor.flags == CONTROL
    assert open_frame.descriptor.method_id == Verb.OPEN_CHANNEL
    msg = decode_control(Verb.OPEN_CHANNEL, open_frame.payload)
    assert msg == OpenChannel(cid, CallKind.UNARY, 64 * 1024, {"rapace.trace_id": b"t"})
    assert request.descriptor.channel_id == cid
    assert request.descriptor.flags == DATA | EOS
    assert request.descriptor.method_id == ADD != 0
    assert request.descriptor.payload_len == 4
    assert request.descriptor.deadline_ns == DEADLINE_NONE
    (call,) = pair.b.receive_frame(open_frame, 0) + pair.b.receive_frame(request, 0)
    assert isinstance(call, CallReceived)
    assert call.metadata == {"rapace.trace_id": b"t"}

    pair.b.send_response(cid, b"ok")
    (response,) = pair.b.frames_to_send()
    assert response.descriptor.flags == RESPONSE | DATA | EOS
    assert not response.descriptor.flags & ERROR

    cid2 = pair.a.open_call(ADD, b"", now_ns=pair.now)
    pair.send(pair.a)
    pair.b.send_error(cid2, b"boom")
    (error,) = pair.b.frames_to_send()
    assert error.descriptor.flags == RESPONSE | DATA | EOS | ERROR
    assert pair.a.receive_frame(error, 0) == [ErrorReceived(cid2, b"boom")]


def test_fast_open_channel_encoding_matches_encode_control() -> None:
    for window in (1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1):
        limits = {"limits": HelloLimits(initial_window=window)}
        pair = Pair(a_kwargs=limits, b_kwargs=limits, b_version=PROTOCOL_1_0)
        pair.a._next_id = 2**32 - 1
        for kind in CallKind:
            cid = pair.a.open_call(ADD, b"", now_ns=0, kind=kind)
            open_frame = pair.a.frames_to_send()[0]
            assert bytes(open_frame.payload) == encode_control(OpenChannel(cid, kind, window))


# ------------------------------------------------------- requests that open their channel


def test_a_unary_call_is_one_frame_that_opens_its_channel() -> None:
    pair = Pair(b_kwargs={"methods": [MethodEntry(ADD, "Calculator.add")]})
    cid = pair.a.open_call(ADD, b"args", now_ns=pair.now, deadline_ns=pair.now + 5)
    (request,) = pair.a.frames_to_send()
    desc = request.descriptor
    assert (desc.channel_id, desc.method_id, desc.flags) == (cid, ADD, DATA | EOS | OPENS)
    assert desc.deadline_ns != DEADLINE_NONE
    (call,) = pair.b.receive_frame(request, pair.now)
    assert call == CallReceived(cid, ADD, CallKind.UNARY, b"args", pair.now + 5, {})
    assert pair.b.statistics().open_channels == 1


def test_calls_with_metadata_or_streams_still_send_open_channel() -> None:
    pair = Pair()
    pair.a.open_call(ADD, b"", now_ns=0, metadata={"k": b"v"})
    pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.SERVER_STREAMING)
    frames = pair.a.frames_to_send()
    assert [f.descriptor.channel_id for f in frames] == [0, 1, 0, 3]
    assert not any(f.descriptor.flags & OPENS for f in frames)


def test_a_peer_of_protocol_1_0_gets_open_channel() -> None:
    pair = Pair(b_version=PROTOCOL_1_0)
    cid = pair.a.open_call(ADD, b"x", now_ns=0)
    open_frame, request = pair.a.frames_to_send()
    assert decode_control(Verb.OPEN_CHANNEL, open_frame.payload) == OpenChannel(
        cid, CallKind.UNARY, 64 * 1024
    )
    assert request.descriptor.flags == DATA | EOS
    # ...while this side, of 1.1, still takes both forms from it.
    assert pair.b.open_call(ADD, b"y", now_ns=0) == 2
    (one_frame,) = pair.b.frames_to_send()
    assert one_frame.descriptor.flags & OPENS
    pair.b.receive_frame(open_frame, 0)
    assert isinstance(pair.b.receive_frame(request, 0)[0], CallReceived)
    assert isinstance(pair.a.receive_frame(one_frame, 0)[0], CallReceived)


@pytest.mark.parametrize(
    ("channel_id", "flags", "method", "problem"),
    [
        (1, DATA | OPENS, ADD, "not a unary request"),  # no EOS: a caller stream
        (1, EOS | OPENS, ADD, "not a unary request"),  # no DATA
        (1, DATA | EOS | OPENS, 0, "not a unary request"),  # no method
        (1, DATA | EOS | RESPONSE | OPENS, ADD, "not a unary request"),
        (1, DATA | EOS | ERROR | OPENS, ADD, "not a unary request"),
        (2, DATA | EOS | OPENS, ADD, "not its to open"),  # the acceptor's parity
    ],
)
def test_opens_on_anything_but_a_peers_unary_request_is_a_protocol_error(
    channel_id: int, flags: int, method: int, problem: str
) -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    with pytest.raises(RemoteProtocolError, match=problem):
        raw.frame(channel_id, flags, b"args", method=method)
    assert_failed_with_go_away(session)


def test_opens_on_an_open_channel_is_a_protocol_error() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    raw.open(1, CallKind.CLIENT_STREAMING)
    with pytest.raises(RemoteProtocolError, match="still open") as info:
        raw.frame(1, DATA | EOS | OPENS, b"args", method=ADD)
    assert info.value.status is Status.INVALID_CHANNEL
    assert_failed_with_go_away(session)


def test_opens_before_the_peers_hello_is_a_protocol_error() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session, hello=False)
    with pytest.raises(RemoteProtocolError, match="Hello"):
        raw.frame(1, DATA | EOS | OPENS, b"args", method=ADD)


def test_a_request_that_opens_past_max_channels_is_refused_and_its_id_freed() -> None:
    session = Session(Role.ACCEPTOR, limits=HelloLimits(max_channels=1))
    raw = RawPeer(session)
    session.frames_to_send()
    assert isinstance(raw.frame(1, DATA | EOS | OPENS, b"a", method=ADD)[0], CallReceived)
    assert raw.frame(3, DATA | EOS | OPENS, b"b", method=ADD) == [PayloadDropped(3, b"b")]
    assert control_messages(session.frames_to_send()) == [
        CancelChannel(3, CancelReason.RESOURCE_EXHAUSTED)
    ]
    assert session.statistics().open_channels == 1  # 3 is free again: its request had EOS
    session.send_response(1, b"r")
    session.frames_to_send()
    assert isinstance(raw.frame(3, DATA | EOS | OPENS, b"c", method=ADD)[0], CallReceived)


def test_after_go_away_a_request_that_opens_is_refused() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    session.go_away()
    session.frames_to_send()
    assert raw.frame(1, DATA | EOS | OPENS, b"late", method=ADD) == [PayloadDropped(1, b"late")]
    assert control_messages(session.frames_to_send()) == [
        CancelChannel(1, CancelReason.RESOURCE_EXHAUSTED)
    ]


def test_msg_ids_start_at_one_and_strictly_increase() -> None:
    pair = Pair()
    for _ in range(3):
        cid = pair.a.open_call(ADD, b"x", now_ns=pair.now)
        pair.send(pair.a)
        pair.b.send_response(cid, b"y")
        pair.send(pair.b)
    pair.a.ping(bytes(8))
    pair.exchange()
    for side in (pair.a, pair.b):
        ids = [f.descriptor.msg_id for f in pair.log[side]]
        assert ids == list(range(1, len(ids) + 1))


def test_initiator_opens_odd_ids_and_acceptor_even_ids() -> None:
    pair = Pair()
    a_ids = [pair.a.open_call(ADD, b"", now_ns=0) for _ in range(3)]
    b_ids = [pair.b.open_call(READ, b"", now_ns=0) for _ in range(3)]
    assert a_ids == [1, 3, 5]
    assert b_ids == [2, 4, 6]
    events = pair.exchange()
    calls_at_b = [e for e in events[pair.b] if isinstance(e, CallReceived)]
    calls_at_a = [e for e in events[pair.a] if isinstance(e, CallReceived)]
    assert [c.channel_id for c in calls_at_b] == a_ids
    assert [c.channel_id for c in calls_at_a] == b_ids
    for c in calls_at_a:
        pair.a.send_response(c.channel_id, b"from a")
    for c in calls_at_b:
        pair.b.send_response(c.channel_id, b"from b")
    events = pair.exchange()
    assert sorted(e.channel_id for e in events[pair.a] if isinstance(e, ResponseReceived)) == a_ids
    assert sorted(e.channel_id for e in events[pair.b] if isinstance(e, ResponseReceived)) == b_ids


def test_open_channel_precedes_data_and_channel_zero_is_never_opened() -> None:
    pair = Pair()
    for kind in CallKind:
        pair.a.open_call(ADD, b"", now_ns=0, kind=kind)
        pair.a.open_call(ADD, b"", now_ns=0, kind=kind, metadata={"k": b"v"})
    pair.send(pair.a)
    opened: set[int] = set()
    for frame in pair.log[pair.a]:
        desc = frame.descriptor
        if desc.channel_id == 0:
            assert desc.flags & CONTROL
            msg = decode_control(desc.method_id, frame.payload)
            if isinstance(msg, OpenChannel):
                assert msg.channel_id != 0
                assert msg.channel_id % 2 == 1
                opened.add(msg.channel_id)
        elif desc.flags & OPENS:  # a unary request without metadata opens its own channel
            assert desc.flags == DATA | EOS | OPENS
            assert desc.channel_id % 2 == 1
            assert desc.channel_id not in opened
            opened.add(desc.channel_id)
        else:
            assert not desc.flags & CONTROL
            assert desc.channel_id in opened
    assert len(opened) == 8


def test_streaming_kinds_request_flags() -> None:
    pair = Pair()
    expected = {
        CallKind.UNARY: DATA | EOS | OPENS,
        CallKind.SERVER_STREAMING: DATA | EOS,
        CallKind.CLIENT_STREAMING: DATA,
        CallKind.BIDI_STREAMING: DATA,
    }
    for kind, flags in expected.items():
        pair.a.open_call(ADD, b"", now_ns=0, kind=kind)
        request = pair.a.frames_to_send()[-1]
        assert request.descriptor.flags == flags


def test_method_table_check_unimplemented_and_incompatible_schema() -> None:
    pair = Pair(
        b_kwargs={
            "methods": [
                MethodEntry(ADD, "Calculator.add", SIG_A),
                MethodEntry(READ, "Vfs.read"),  # zero signature hash: unknown
            ]
        }
    )
    with pytest.raises(Unimplemented):
        pair.a.open_call(method_id("Test", "method"), b"", now_ns=0)
    with pytest.raises(IncompatibleSchema):
        pair.a.open_call(ADD, b"", now_ns=0, sig_hash=SIG_B)
    assert pair.a.frames_to_send() == []
    assert pair.a.statistics().open_channels == 0
    pair.a.open_call(ADD, b"", now_ns=0, sig_hash=SIG_A)
    pair.a.open_call(ADD, b"", now_ns=0, sig_hash=bytes(32))
    pair.a.open_call(ADD, b"", now_ns=0)
    pair.a.open_call(READ, b"", now_ns=0, sig_hash=SIG_B)
    assert len(pair.send(pair.a)) == 4


def test_empty_peer_table_means_no_check() -> None:
    pair = Pair()
    cid = pair.a.open_call(method_id("Anything", "goes"), b"", now_ns=0)
    (call,) = pair.send(pair.a)
    assert isinstance(call, CallReceived)
    assert call.channel_id == cid


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"method_id": 0}, LocalProtocolError),
        ({"method_id": 2**32}, LocalProtocolError),
        ({"metadata": {"k": "str"}}, LocalProtocolError),
        ({"metadata": {"k" * 300: b""}}, LocalProtocolError),
        ({"payload": bytes(101)}, LocalProtocolError),
        ({"deadline_ns": 5}, DeadlineExceeded),
        ({"deadline_ns": 10}, DeadlineExceeded),
    ],
)
def test_open_call_refusals_send_nothing(kwargs: dict[str, object], error: type[Exception]) -> None:
    pair = Pair(b_kwargs={"limits": HelloLimits(max_payload_bytes=100)})
    args: dict[str, object] = {"method_id": ADD, "payload": b"", "now_ns": 10} | kwargs
    with pytest.raises(error):
        pair.a.open_call(**args)  # type: ignore[arg-type]
    assert pair.a.frames_to_send() == []
    assert pair.a.statistics().open_channels == 0
    pair.a.open_call(ADD, b"", now_ns=10)  # still usable
    assert len(pair.send(pair.a)) == 1


def test_received_payload_over_our_limit_is_rejected() -> None:
    session = Session(Role.INITIATOR, limits=HelloLimits(max_payload_bytes=8))
    raw = RawPeer(session)
    cid = session.open_call(ADD, b"", now_ns=0)
    with pytest.raises(RemoteProtocolError):
        raw.frame(cid, RESPONSE | DATA | EOS, b"123456789")
    assert_failed_with_go_away(session)


def test_memoryview_payloads_are_accepted() -> None:
    pair = Pair()
    payload = memoryview(bytearray(b"abcdef"))[1:4]
    cid = pair.a.open_call(ADD, payload, now_ns=0)
    (call,) = pair.send(pair.a)
    assert isinstance(call, CallReceived)
    assert bytes(call.payload) == b"bcd"
    pair.b.send_response(cid, memoryview(b"xyz"))
    (response,) = pair.send(pair.b)
    assert isinstance(response, ResponseReceived)
    assert pair.log[pair.b][-1].descriptor.payload_len == 3


# ------------------------------------------------------------------------ local misuse


def test_local_misuse_raises_and_sends_nothing() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0)
    pair.send(pair.a)
    misuse: list[Callable[[], object]] = [
        lambda: pair.a.send_response(cid, b""),  # the caller does not answer
        lambda: pair.a.send_error(cid, b""),
        lambda: pair.a.send_item(cid, b""),  # unary: the request was the whole direction
        lambda: pair.a.send_eos(cid),
        lambda: pair.b.send_item(cid, b""),  # unary handler does not stream
        lambda: pair.b.send_eos(cid),
        lambda: pair.b.send_response(99, b""),  # unknown channel
        lambda: pair.b.send_item(99, b""),
        lambda: pair.b.send_credit(99),
        lambda: pair.a.consumed(cid, 1),  # nothing delivered yet
        lambda: pair.a.consumed(cid, -1),
        lambda: pair.a.ping(b"short"),
        lambda: pair.a.go_away(message="m" * 2000),
    ]
    for action in misuse:
        with pytest.raises(LocalProtocolError):
            action()
    assert pair.a.frames_to_send() == []
    assert pair.b.frames_to_send() == []
    pair.b.send_response(cid, b"ok")
    with pytest.raises(LocalProtocolError):
        pair.b.send_response(cid, b"again")
    assert pair.send(pair.b) == [ResponseReceived(cid, b"ok")]


def test_constructor_rejects_unusable_configuration() -> None:
    with pytest.raises(LocalProtocolError):
        Session(Role.INITIATOR, limits=HelloLimits(initial_window=0))
    with pytest.raises(LocalProtocolError):
        Session(Role.INITIATOR, deadline_mode="wall")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Session(Role.INITIATOR, descriptor_limits=DescriptorLimits(max_channel_id=1))


def test_constructor_rejects_what_the_peer_could_not_decode() -> None:
    with pytest.raises(LocalProtocolError, match="cannot be announced"):
        Session(Role.ACCEPTOR, methods=[MethodEntry(ADD, "x" * 2000)])
    with pytest.raises(LocalProtocolError):
        Session(Role.ACCEPTOR, limits=HelloLimits(max_channels=2**32))
    with pytest.raises(LocalProtocolError):
        Session(Role.ACCEPTOR, params={str(i): b"" for i in range(200)})


def test_more_local_misuse() -> None:
    pair = Pair(b_kwargs={"limits": HelloLimits(max_payload_bytes=10)})
    with pytest.raises(LocalProtocolError):
        pair.a.open_call(ADD, b"", now_ns=0, kind=7)  # type: ignore[arg-type]
    stream = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.BIDI_STREAMING)
    unary = pair.a.open_call(ADD, b"", now_ns=0)
    pair.send(pair.a)
    misuse: list[Callable[[], object]] = [
        lambda: pair.a.send_item(stream, bytes(11)),
        lambda: pair.b.send_item(stream, bytes(11)),
        lambda: pair.b.send_response(stream, b""),  # a streaming handler ends with EOS
        lambda: pair.b.send_response(unary, bytes(11)),
        lambda: pair.b.send_error(unary, bytes(11)),
    ]
    for action in misuse:
        with pytest.raises(LocalProtocolError):
            action()
    assert pair.a.frames_to_send() == pair.b.frames_to_send() == []
    assert pair.a.send_credit(stream) == 64 * 1024


def test_handler_cancel_after_its_terminal_frame_is_a_no_op() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.CLIENT_STREAMING)
    pair.send(pair.a)
    pair.b.send_response(cid, b"early")  # the caller is still streaming: b keeps draining
    pair.b.frames_to_send()
    pair.b.cancel(cid)
    assert pair.b.frames_to_send() == []


def test_a_failed_session_refuses_local_sends_quietly_for_cancel_and_consumed() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session)
    cid = session.open_call(ADD, b"", now_ns=0, kind=CallKind.SERVER_STREAMING)
    raw.frame(cid, RESPONSE | DATA, b"item")
    with pytest.raises(RemoteProtocolError):
        raw.frame(cid, DATA, b"no RESPONSE flag")
    session.frames_to_send()
    with pytest.raises(LocalProtocolError):
        session.send_credit(cid)
    with pytest.raises(LocalProtocolError):
        session.open_call(ADD, b"", now_ns=0)
    with pytest.raises(LocalProtocolError):
        session.go_away()
    session.cancel(cid)  # teardown after a failure must not raise
    session.consumed(cid, 4)
    assert session.frames_to_send() == []


# ------------------------------------------------------------------------ protocol errors


def _unknown_channel(raw: RawPeer) -> object:
    return raw.frame(7, DATA | EOS, b"x", method=ADD)


def _wrong_parity(raw: RawPeer) -> object:
    return raw.open(2)  # the acceptor's parity; the raw peer is the initiator


def _channel_zero(raw: RawPeer) -> object:
    return raw.open(0)


def _open_twice(raw: RawPeer) -> object:
    raw.open(1)
    return raw.open(1)


def _request_without_method(raw: RawPeer) -> object:
    raw.open(1)
    return raw.frame(1, DATA | EOS, b"x")


def _unary_request_without_eos(raw: RawPeer) -> object:
    raw.open(1)
    return raw.frame(1, DATA, b"x", method=ADD)


def _streaming_request_with_eos(raw: RawPeer) -> object:
    raw.open(1, CallKind.CLIENT_STREAMING)
    return raw.frame(1, DATA | EOS, b"x", method=ADD)


def _eos_before_request(raw: RawPeer) -> object:
    raw.open(1, CallKind.CLIENT_STREAMING)
    return raw.frame(1, EOS)


def _response_flag_from_caller(raw: RawPeer) -> object:
    raw.open(1)
    return raw.frame(1, RESPONSE | DATA | EOS, b"x", method=ADD)


def _item_on_unary_call(raw: RawPeer) -> object:
    raw.call(1)
    return raw.frame(1, DATA, b"item")


def _item_after_caller_eos(raw: RawPeer) -> object:
    raw.open(1, CallKind.CLIENT_STREAMING)
    raw.frame(1, DATA, b"req", method=ADD)
    raw.frame(1, EOS)
    return raw.frame(1, DATA, b"late")


def _item_with_method_id(raw: RawPeer) -> object:
    raw.open(1, CallKind.CLIENT_STREAMING)
    raw.frame(1, DATA, b"req", method=ADD)
    return raw.frame(1, DATA, b"item", method=ADD)


def _eos_only_with_payload(raw: RawPeer) -> object:
    raw.open(1, CallKind.CLIENT_STREAMING)
    raw.frame(1, DATA, b"req", method=ADD)
    return raw.frame(1, EOS, b"payload")


def _no_data_no_eos(raw: RawPeer) -> object:
    raw.open(1, CallKind.CLIENT_STREAMING)
    raw.frame(1, DATA, b"req", method=ADD)
    return raw.frame(1, 0)


def _control_flag_on_channel(raw: RawPeer) -> object:
    raw.open(1)
    return raw.frame(1, CONTROL | DATA | EOS, b"x", method=ADD)


def _channel_zero_without_control(raw: RawPeer) -> object:
    return raw.frame(0, 0, encode_control(Ping(bytes(8))), method=Verb.PING)


def _unknown_verb_50(raw: RawPeer) -> object:
    return raw.frame(0, CONTROL, b"\x80", method=50)


def _malformed_control(raw: RawPeer) -> object:
    return raw.frame(0, CONTROL, b"\xff\xff", method=Verb.OPEN_CHANNEL)


def _cancel_before_request(raw: RawPeer) -> object:
    raw.open(1)
    return raw.control(CancelChannel(1))


def _open_beyond_max_channel_id(raw: RawPeer) -> object:
    return raw.open(2**32 - 1)  # the session under test allows ids up to 1001


PEER_ERRORS = [
    _unknown_channel,
    _wrong_parity,
    _channel_zero,
    _open_twice,
    _request_without_method,
    _unary_request_without_eos,
    _streaming_request_with_eos,
    _eos_before_request,
    _response_flag_from_caller,
    _item_on_unary_call,
    _item_after_caller_eos,
    _item_with_method_id,
    _eos_only_with_payload,
    _no_data_no_eos,
    _control_flag_on_channel,
    _channel_zero_without_control,
    _unknown_verb_50,
    _malformed_control,
    _cancel_before_request,
    _open_beyond_max_channel_id,
]


@pytest.mark.parametrize("provoke", PEER_ERRORS, ids=lambda f: f.__name__.strip("_"))
def test_handler_side_protocol_errors(provoke: Callable[[RawPeer], object]) -> None:
    session = Session(Role.ACCEPTOR, descriptor_limits=DescriptorLimits(max_channel_id=1001))
    session.frames_to_send()
    raw = RawPeer(session)
    with pytest.raises(RemoteProtocolError):
        provoke(raw)
    assert_failed_with_go_away(session)


def test_unknown_verb_50_answers_go_away_protocol_error() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    session.frames_to_send()
    with pytest.raises(RemoteProtocolError):
        raw.frame(0, CONTROL, b"\x80", method=50)
    (go_away_frame,) = session.frames_to_send()
    msg = decode_control(go_away_frame.descriptor.method_id, go_away_frame.payload)
    assert isinstance(msg, GoAway)
    assert msg.reason is GoAwayReason.PROTOCOL_ERROR
    assert "50" in msg.message


def test_extension_verbs_and_close_channel_are_ignored() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    session.frames_to_send()
    assert raw.frame(0, CONTROL, b"anything", method=150) == []
    assert raw.control(CloseChannel(1, 0, "bye")) == []
    assert session.frames_to_send() == []
    assert not session.closed


@pytest.mark.parametrize(
    ("flags", "payload"),
    [
        (DATA | EOS, b"no RESPONSE flag"),
        (RESPONSE | DATA, b"item on a unary call"),
        (RESPONSE | EOS, b""),  # lone EOS where a response is expected
        (RESPONSE | DATA | ERROR, b"error without EOS"),
        (RESPONSE | EOS | ERROR, b""),  # error without DATA
        (RESPONSE, b""),
    ],
)
def test_caller_side_protocol_errors(flags: int, payload: bytes) -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session)
    cid = session.open_call(ADD, b"", now_ns=0)
    with pytest.raises(RemoteProtocolError):
        raw.frame(cid, flags, payload)
    assert_failed_with_go_away(session)


def test_response_after_call_finished_is_a_protocol_error() -> None:
    session = Session(Role.INITIATOR)
    raw = RawPeer(session)
    cid = session.open_call(ADD, b"", now_ns=0)
    assert raw.frame(cid, RESPONSE | DATA | EOS, b"1") == [ResponseReceived(cid, b"1")]
    with pytest.raises(RemoteProtocolError):
        raw.frame(cid, RESPONSE | DATA | EOS, b"2")


def test_go_away_names_the_last_accepted_channel() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    raw.call(1)
    raw.call(5)
    session.frames_to_send()
    with pytest.raises(RemoteProtocolError):
        raw.frame(99, DATA, b"x")
    msg = control_messages(session.frames_to_send())[-1]
    assert isinstance(msg, GoAway)
    assert msg.last_channel_id == 5


# ------------------------------------------------------------------------------ channel ids


def _finish_unary(pair: Pair, cid: int) -> None:
    pair.send(pair.a)
    pair.b.send_response(cid, b"")
    assert pair.send(pair.b) == [ResponseReceived(cid, b"")]


def test_ids_are_not_reused_while_counting_up() -> None:
    pair = Pair()
    seen = []
    for _ in range(5):
        cid = pair.a.open_call(ADD, b"", now_ns=0)
        _finish_unary(pair, cid)
        seen.append(cid)
    assert seen == [1, 3, 5, 7, 9]


def test_ids_wrap_and_skip_ids_still_in_use() -> None:
    pair = Pair(a_kwargs={"descriptor_limits": DescriptorLimits(max_channel_id=7)})
    long_call = pair.a.open_call(ADD, b"", now_ns=0)  # 1 stays open
    pair.send(pair.a)
    assert [pair.a.open_call(ADD, b"", now_ns=0) for _ in range(3)] == [3, 5, 7]
    with pytest.raises(LocalProtocolError) as info:
        pair.a.open_call(ADD, b"", now_ns=0)
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    pair.send(pair.a)
    pair.b.send_response(5, b"")
    pair.send(pair.b)
    assert pair.a.open_call(ADD, b"", now_ns=0) == 5  # wrapped, skipped 1 and 3
    pair.b.send_response(long_call, b"")
    pair.send(pair.b)
    pair.b.send_response(3, b"")
    pair.b.send_response(7, b"")
    pair.send(pair.b)
    assert pair.a.open_call(ADD, b"", now_ns=0) == 7  # counter continues after 5
    assert pair.a.open_call(ADD, b"", now_ns=0) == 1


def test_ids_wrap_around_near_two_to_the_32() -> None:
    pair = Pair()
    long_call = pair.a.open_call(ADD, b"", now_ns=0)
    pair.send(pair.a)
    assert long_call == 1
    pair.a._next_id = 2**32 - 3
    top = [pair.a.open_call(ADD, b"", now_ns=0) for _ in range(2)]
    assert top == [2**32 - 3, 2**32 - 1]
    for cid in top:
        _finish_unary(pair, cid)
    assert pair.a.open_call(ADD, b"", now_ns=0) == 3  # wrapped past 0 and the open 1
    # The acceptor wraps to 2.
    pair.b._next_id = 2**32 - 2
    assert pair.b.open_call(ADD, b"", now_ns=0) == 2**32 - 2
    assert pair.b.open_call(ADD, b"", now_ns=0) == 2


def test_id_reused_only_after_both_sides_closed() -> None:
    pair = Pair(a_kwargs={"descriptor_limits": DescriptorLimits(max_channel_id=3)})
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.CLIENT_STREAMING)
    assert pair.a.open_call(ADD, b"", now_ns=0) == 3
    pair.send(pair.a)
    with pytest.raises(LocalProtocolError):
        pair.a.open_call(ADD, b"", now_ns=0)  # ids 1 and 3 both busy
    # The handler answers early while the caller's stream is still open: id 1 stays busy on
    # the caller until the response arrives, and on the handler until the caller's EOS.
    pair.b.send_response(cid, b"early")
    assert pair.b.statistics().open_channels == 2
    with pytest.raises(LocalProtocolError):
        pair.a.open_call(ADD, b"", now_ns=0)
    assert pair.send(pair.b) == [ResponseReceived(cid, b"early")]
    assert pair.a.statistics().open_channels == 1
    # The caller's session closed its stream by itself, before anything that reuses the id.
    assert pair.a.open_call(ADD, b"second", now_ns=0) == cid
    auto_eos, request = pair.a.frames_to_send()
    assert auto_eos.descriptor.channel_id == cid
    assert auto_eos.descriptor.flags == EOS
    assert auto_eos.descriptor.payload_len == 0
    assert pair.b.receive_frame(auto_eos, 0) == []
    assert pair.b.statistics().open_channels == 1  # only call 3 left
    assert request.descriptor.flags & OPENS
    (call,) = pair.b.receive_frame(request, 0)
    assert isinstance(call, CallReceived)
    assert (call.channel_id, bytes(call.payload)) == (cid, b"second")


def test_max_channels_limits_calls_in_flight() -> None:
    pair = Pair(b_kwargs={"limits": HelloLimits(max_channels=2)})
    pair.a.open_call(ADD, b"", now_ns=0)
    pair.a.open_call(ADD, b"", now_ns=0)
    with pytest.raises(LocalProtocolError) as info:
        pair.a.open_call(ADD, b"", now_ns=0)
    assert info.value.status is Status.RESOURCE_EXHAUSTED
    _finish_unary(pair, 1)
    assert pair.a.open_call(ADD, b"", now_ns=0) == 5


def test_peer_opening_beyond_max_channels_is_refused_then_rejected() -> None:
    session = Session(Role.ACCEPTOR, limits=HelloLimits(max_channels=2))
    raw = RawPeer(session)
    session.frames_to_send()
    raw.call(1)
    raw.call(3)
    raw.open(5)  # refused: answered with CancelChannel, state kept until its EOS
    assert control_messages(session.frames_to_send()) == [
        CancelChannel(5, CancelReason.RESOURCE_EXHAUSTED)
    ]
    assert raw.frame(5, DATA | EOS, b"dropped", method=ADD) == [PayloadDropped(5, b"dropped")]
    assert session.statistics().open_channels == 2
    raw.open(7)
    raw.open(9)
    raw.open(11)  # 2 served + 3 refused and never closed: bound reached
    with pytest.raises(RemoteProtocolError) as info:
        raw.open(13)
    assert info.value.status is Status.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------------------ cancel


def test_caller_cancel_reaches_handler_and_terminal_frame_frees_the_id() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.SERVER_STREAMING)
    pair.send(pair.a)
    pair.a.cancel(cid, CancelReason.DEADLINE_EXCEEDED)
    (cancel_frame,) = pair.a.frames_to_send()
    assert control_messages([cancel_frame]) == [CancelChannel(cid, CancelReason.DEADLINE_EXCEEDED)]
    assert pair.b.receive_frame(cancel_frame, 0) == [
        ChannelCancelled(cid, CancelReason.DEADLINE_EXCEEDED)
    ]
    pair.b.send_item(cid, b"dropped silently")
    assert pair.b.frames_to_send() == []
    assert pair.a.statistics().open_channels == 1  # kept until the handler's terminal frame
    pair.b.send_error(cid, b"cancelled")
    # A late reply after cancel is dropped (reported, in case it references memory).
    assert pair.send(pair.b) == [PayloadDropped(cid, b"cancelled")]
    assert pair.a.statistics().open_channels == 0
    assert pair.b.statistics().open_channels == 0


def test_late_reply_crossing_the_cancel_is_dropped() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0)
    pair.send(pair.a)
    pair.b.send_response(cid, b"result")  # in flight while the caller cancels
    pair.a.cancel(cid)
    assert pair.send(pair.b) == [PayloadDropped(cid, b"result")]
    assert pair.a.statistics().open_channels == 0
    assert pair.send(pair.a) == []  # the handler already finished: cancel is a no-op there
    assert pair.b.statistics().open_channels == 0


def test_items_after_cancel_are_ignored_by_the_caller() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.SERVER_STREAMING)
    pair.send(pair.a)
    pair.b.send_item(cid, b"1")
    pair.b.send_item(cid, b"2")
    pair.a.cancel(cid)
    assert pair.send(pair.b) == [PayloadDropped(cid, b"1"), PayloadDropped(cid, b"2")]
    pair.send(pair.a)
    pair.b.send_eos(cid)
    assert pair.send(pair.b) == []
    assert pair.a.statistics().open_channels == pair.b.statistics().open_channels == 0


def test_cancel_twice_after_completion_and_unknown_is_a_no_op() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0)
    pair.send(pair.a)
    pair.a.cancel(cid)
    pair.a.cancel(cid)
    assert len(pair.a.frames_to_send()) == 1
    pair.a.cancel(12345)
    cid2 = pair.a.open_call(ADD, b"", now_ns=0)
    _finish_unary(pair, cid2)
    pair.a.cancel(cid2)
    assert pair.a.frames_to_send() == []


def test_cancel_for_unknown_channel_from_peer_is_ignored() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    assert raw.control(CancelChannel(41)) == []
    assert not session.closed


def test_duplicate_cancel_from_peer_reports_once() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    raw.call(1)
    assert raw.control(CancelChannel(1)) == [ChannelCancelled(1, CancelReason.CLIENT_CANCEL)]
    assert raw.control(CancelChannel(1)) == []


def test_handler_refuses_a_client_stream() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.CLIENT_STREAMING)
    pair.a.send_item(cid, b"1")
    pair.send(pair.a)
    pair.a.send_item(cid, b"2")  # in flight when the handler refuses
    pair.b.cancel(cid, CancelReason.PERMISSION_DENIED)
    with pytest.raises(LocalProtocolError):
        pair.b.send_response(cid, b"too late: the cancel was the terminal frame")
    assert pair.send(pair.b) == [ChannelCancelled(cid, CancelReason.PERMISSION_DENIED)]
    assert pair.a.statistics().open_channels == 0
    with pytest.raises(LocalProtocolError):
        pair.a.send_item(cid, b"3")
    # item 2 and the automatic EOS, both drained
    assert pair.send(pair.a) == [PayloadDropped(cid, b"2")]
    assert pair.b.statistics().open_channels == 0
    assert pair.log[pair.a][-1].descriptor.flags == EOS


def test_both_sides_cancel_at_once() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.BIDI_STREAMING)
    pair.send(pair.a)
    pair.a.cancel(cid)
    pair.b.cancel(cid)
    events = pair.exchange()
    assert events[pair.a] == []
    assert events[pair.b] == []
    assert pair.a.statistics().open_channels == pair.b.statistics().open_channels == 0


# ------------------------------------------------------------------------------ GoAway


def test_go_away_refuses_new_calls_and_finishes_accepted_ones() -> None:
    pair = Pair()
    accepted = pair.a.open_call(ADD, b"", now_ns=0)
    pair.send(pair.a)
    refused = pair.a.open_call(ADD, b"", now_ns=0)  # in flight when b says GoAway
    pair.b.go_away(GoAwayReason.SHUTDOWN, "bye")
    assert pair.send(pair.a) == []  # refused automatically
    events = pair.send(pair.b)
    assert events == [
        GoAwayReceived(GoAway(GoAwayReason.SHUTDOWN, accepted, "bye")),
        ChannelCancelled(refused, CancelReason.RESOURCE_EXHAUSTED),
    ]
    assert pair.a.go_away_received == GoAway(GoAwayReason.SHUTDOWN, accepted, "bye")
    with pytest.raises(Unavailable):
        pair.a.open_call(ADD, b"", now_ns=0)
    with pytest.raises(Unavailable):
        pair.b.open_call(ADD, b"", now_ns=0)
    pair.b.send_response(accepted, b"still served")
    assert pair.send(pair.b) == [ResponseReceived(accepted, b"still served")]
    assert pair.a.statistics().open_channels == pair.b.statistics().open_channels == 0


def test_go_away_refusal_drains_a_client_stream() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    session.go_away()
    session.frames_to_send()
    raw.open(1, CallKind.CLIENT_STREAMING)
    assert control_messages(session.frames_to_send()) == [
        CancelChannel(1, CancelReason.RESOURCE_EXHAUSTED)
    ]
    assert raw.frame(1, DATA, b"req", method=ADD) == [PayloadDropped(1, b"req")]
    assert raw.frame(1, DATA, b"item") == [PayloadDropped(1, b"item")]
    assert session.statistics().open_channels == 1
    assert raw.frame(1, EOS) == []
    assert session.statistics().open_channels == 0
    assert raw.open(1, CallKind.CLIENT_STREAMING) == []  # reusable after the drain


# ------------------------------------------------------------------------------ ping


def test_ping_pong_echoes_the_same_bytes() -> None:
    pair = Pair()
    pair.a.ping(bytes.fromhex("DEADBEEFCAFEBABE"))
    assert pair.send(pair.a) == []
    (pong_frame,) = pair.b.frames_to_send()
    assert pong_frame.descriptor.channel_id == 0
    assert pong_frame.descriptor.flags == CONTROL
    assert control_messages([pong_frame]) == [Pong(bytes.fromhex("DEADBEEFCAFEBABE"))]
    assert pair.a.receive_frame(pong_frame, 0) == [PongReceived(bytes.fromhex("DEADBEEFCAFEBABE"))]


def test_grants_for_unknown_channels_are_ignored() -> None:
    session = Session(Role.ACCEPTOR)
    raw = RawPeer(session)
    assert raw.control(GrantCredits(77, 1000)) == []
    assert raw.control(GrantCredits(0, 1000)) == []
    assert not session.closed


# ------------------------------------------------------------------------------ deadlines


def test_absolute_deadline_travels_as_is_and_expires_once() -> None:
    pair = Pair()
    now = 5_000
    cid = pair.a.open_call(ADD, b"", now_ns=now, deadline_ns=now + 1_000)
    assert pair.a._outbox[-1].descriptor.deadline_ns == now + 1_000
    (call,) = pair.send(pair.a)
    assert isinstance(call, CallReceived)
    assert call.deadline_ns == now + 1_000
    assert pair.b.next_deadline() == now + 1_000
    assert pair.b.expire(now + 999) == []
    assert pair.b.expire(now + 1_000) == [DeadlineExpired(cid)]
    assert pair.b.expire(now + 5_000) == []
    assert pair.b.next_deadline() is None
    pair.b.send_error(cid, b"deadline exceeded")
    assert pair.send(pair.b) == [ErrorReceived(cid, b"deadline exceeded")]


def test_relative_deadline_is_rebased_on_the_receiver_clock() -> None:
    pair = Pair(a_kwargs={"deadline_mode": "relative"}, b_kwargs={"deadline_mode": "relative"})
    pair.a.open_call(ADD, b"", now_ns=10_000, deadline_ns=12_500)
    assert pair.a._outbox[-1].descriptor.deadline_ns == 2_500
    pair.now = 1_000_000  # the acceptor's clock is unrelated to the initiator's
    (call,) = pair.send(pair.a)
    assert isinstance(call, CallReceived)
    assert call.deadline_ns == 1_002_500


def test_answered_calls_do_not_expire() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=100)
    other = pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=200)
    pair.send(pair.a)
    pair.b.send_response(cid, b"")
    assert pair.b.next_deadline() == 200
    assert pair.b.expire(1_000) == [DeadlineExpired(other)]


def test_expire_skips_answered_and_cancelled_calls() -> None:
    pair = Pair()
    answered = pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=100)
    refused = pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=100)
    pending = pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=300)
    pair.send(pair.a)
    pair.b.send_response(answered, b"")
    pair.b.cancel(refused)
    assert pair.b.expire(1_000) == [DeadlineExpired(pending)]
    assert pair.b.expire(2_000) == []


def test_no_deadline_is_all_ones_on_the_wire() -> None:
    pair = Pair()
    pair.a.open_call(ADD, b"", now_ns=0)
    assert pair.a._outbox[-1].descriptor.deadline_ns == DEADLINE_NONE
    (call,) = pair.send(pair.a)
    assert isinstance(call, CallReceived)
    assert call.deadline_ns is None
    assert pair.b.next_deadline() is None


def test_deadline_heap_stays_bounded_when_calls_finish_early() -> None:
    pair = Pair()
    for _ in range(1_000):
        cid = pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=10**15)
        _finish_unary(pair, cid)
    # Rebuilt once it exceeds 2 * calls in flight + 64 entries.
    assert len(pair.b._deadlines) <= 2 * 1 + 64 + 1
    assert pair.b.next_deadline() is None


def test_far_deadline_is_clamped_below_the_none_marker() -> None:
    pair = Pair()
    pair.a.open_call(ADD, b"", now_ns=0, deadline_ns=2**70)
    assert pair.a._outbox[-1].descriptor.deadline_ns == DEADLINE_NONE - 1


# ------------------------------------------------------------------------------ statistics


def test_statistics_count_frames_and_channels() -> None:
    pair = Pair()
    pair.a.open_call(ADD, b"", now_ns=0)
    pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.BIDI_STREAMING)
    pair.send(pair.a)
    stats = pair.a.statistics()
    assert stats.open_channels == 2
    assert stats.frames_sent == 4  # Hello, a unary request, OpenChannel and a bidi request
    assert stats.frames_received == 1
    assert pair.b.statistics() == (2, 1, 4)


def test_last_server_stream_item_may_carry_eos() -> None:
    pair = Pair()
    cid = pair.a.open_call(ADD, b"", now_ns=0, kind=CallKind.SERVER_STREAMING)
    (call,) = pair.send(pair.a)
    assert isinstance(call, CallReceived)
    pair.b.send_item(cid, b"i", end=True)
    assert pair.send(pair.b) == [ItemReceived(cid, b"i"), EndOfStream(cid)]
