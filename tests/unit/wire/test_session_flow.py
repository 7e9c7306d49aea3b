"""Session: streaming calls and per-channel flow control."""

from __future__ import annotations

import pytest

from rapace._errors import LocalProtocolError, RemoteProtocolError
from rapace.wire._control import (
    CallKind,
    CancelReason,
    GoAway,
    GoAwayReason,
    GrantCredits,
    Hello,
    HelloLimits,
    OpenChannel,
    Role,
    Verb,
    decode_control,
    encode_control,
)
from rapace.wire._descriptor import CONTROL, DATA, EOS, RESPONSE, Descriptor, Frame
from rapace.wire._session import Session
from rapace.wire._session_events import (
    CallReceived,
    ChannelCancelled,
    CreditAvailable,
    EndOfStream,
    ErrorReceived,
    Event,
    ItemReceived,
    PayloadDropped,
    ResponseReceived,
)

METHOD = 0x57C4BF02  # EchoService.echo


class Pair:
    """An initiator ``a`` (caller) and an acceptor ``b`` (handler) joined in memory."""

    def __init__(self, window: int = 64 * 1024) -> None:
        limits = HelloLimits(initial_window=window)
        self.a = Session(Role.INITIATOR, limits=limits)
        self.b = Session(Role.ACCEPTOR, limits=limits)
        self.frames: list[Frame] = []
        self.send(self.a)
        self.send(self.b)

    def send(self, side: Session) -> list[Event]:
        other = self.b if side is self.a else self.a
        frames = side.frames_to_send()
        self.frames = frames
        return [event for frame in frames for event in other.receive_frame(frame, 0)]

    def open(self, kind: CallKind, payload: bytes = b"req") -> int:
        cid = self.a.open_call(METHOD, payload, now_ns=0, kind=kind)
        (call,) = self.send(self.a)
        assert call == CallReceived(cid, METHOD, kind, payload, None, {})
        return cid

    def closed(self) -> bool:
        return self.a.statistics().open_channels == self.b.statistics().open_channels == 0


def grants(frames: list[Frame]) -> list[GrantCredits]:
    out = []
    for frame in frames:
        if frame.descriptor.channel_id == 0:
            msg = decode_control(frame.descriptor.method_id, frame.payload)
            if isinstance(msg, GrantCredits):
                out.append(msg)
    return out


class RawCaller:
    """A hand-driven initiator talking to an acceptor Session."""

    def __init__(self, session: Session, window: int = 64 * 1024) -> None:
        self.session = session
        self.msg_id = 0
        self.control(Hello(role=Role.INITIATOR, limits=HelloLimits(initial_window=window)))

    def frame(self, cid: int, flags: int, payload: bytes = b"", method: int = 0) -> list[Event]:
        self.msg_id += 1
        desc = Descriptor(
            msg_id=self.msg_id,
            channel_id=cid,
            method_id=method,
            payload_len=len(payload),
            flags=flags,
        )
        return self.session.receive_frame(Frame(desc, payload), 0)

    def control(self, msg: OpenChannel | GrantCredits | Hello) -> list[Event]:
        return self.frame(0, CONTROL, encode_control(msg), int(msg.VERB))


# ------------------------------------------------------------------------------ stream shapes


def test_server_streaming() -> None:
    pair = Pair()
    cid = pair.open(CallKind.SERVER_STREAMING)
    for item in (b"one", b"two", b"three"):
        pair.b.send_item(cid, item)
    pair.b.send_eos(cid)
    events = pair.send(pair.b)
    assert events == [
        ItemReceived(cid, b"one"),
        ItemReceived(cid, b"two"),
        ItemReceived(cid, b"three"),
        EndOfStream(cid),
    ]
    assert [f.descriptor.flags for f in pair.frames] == [RESPONSE | DATA] * 3 + [RESPONSE | EOS]
    assert all(f.descriptor.method_id == 0 for f in pair.frames)
    assert pair.frames[-1].descriptor.payload_len == 0
    assert pair.closed()


def test_client_streaming() -> None:
    pair = Pair()
    cid = pair.open(CallKind.CLIENT_STREAMING)
    pair.a.send_item(cid, b"1")
    pair.a.send_item(cid, b"22")
    pair.a.send_eos(cid)
    events = pair.send(pair.a)
    assert events == [ItemReceived(cid, b"1"), ItemReceived(cid, b"22"), EndOfStream(cid)]
    assert [f.descriptor.flags for f in pair.frames] == [DATA, DATA, EOS]
    assert pair.frames[-1].descriptor.payload_len == 0
    assert all(f.descriptor.method_id == 0 for f in pair.frames)
    pair.b.send_response(cid, b"sum")
    assert pair.send(pair.b) == [ResponseReceived(cid, b"sum")]
    assert pair.frames[0].descriptor.flags == RESPONSE | DATA | EOS
    assert pair.closed()


def test_client_stream_last_item_may_carry_eos() -> None:
    pair = Pair()
    cid = pair.open(CallKind.CLIENT_STREAMING)
    pair.a.send_item(cid, b"last", end=True)
    assert pair.send(pair.a) == [ItemReceived(cid, b"last"), EndOfStream(cid)]
    assert pair.frames[0].descriptor.flags == DATA | EOS
    with pytest.raises(LocalProtocolError):
        pair.a.send_item(cid, b"after the end")
    with pytest.raises(LocalProtocolError):
        pair.a.send_eos(cid)


def test_bidi_streaming_both_directions() -> None:
    pair = Pair()
    cid = pair.open(CallKind.BIDI_STREAMING)
    pair.a.send_item(cid, b"ping 1")
    assert pair.send(pair.a) == [ItemReceived(cid, b"ping 1")]
    pair.b.send_item(cid, b"pong 1")
    assert pair.send(pair.b) == [ItemReceived(cid, b"pong 1")]
    pair.a.send_eos(cid)
    assert pair.send(pair.a) == [EndOfStream(cid)]
    pair.b.send_item(cid, b"pong 2", end=True)
    assert pair.send(pair.b) == [ItemReceived(cid, b"pong 2"), EndOfStream(cid)]
    assert pair.closed()


def test_handler_error_ends_a_bidi_call_and_closes_the_caller_stream() -> None:
    pair = Pair()
    cid = pair.open(CallKind.BIDI_STREAMING)
    pair.a.send_item(cid, b"in flight")
    pair.b.send_error(cid, b"failed")
    assert pair.send(pair.b) == [ErrorReceived(cid, b"failed")]
    assert pair.a.statistics().open_channels == 0
    assert pair.b.statistics().open_channels == 1  # draining the caller's stream
    # the item and the automatic EOS are dropped
    assert pair.send(pair.a) == [PayloadDropped(cid, b"in flight")]
    assert [f.descriptor.flags for f in pair.frames] == [DATA, EOS]
    assert pair.closed()


def test_server_stream_error_mid_stream() -> None:
    pair = Pair()
    cid = pair.open(CallKind.SERVER_STREAMING)
    pair.b.send_item(cid, b"1")
    pair.b.send_error(cid, b"boom")
    assert pair.send(pair.b) == [ItemReceived(cid, b"1"), ErrorReceived(cid, b"boom")]
    assert pair.closed()


def test_handler_after_cancel_drops_items_and_still_ends() -> None:
    pair = Pair()
    cid = pair.open(CallKind.SERVER_STREAMING)
    pair.a.cancel(cid)
    assert pair.send(pair.a) == [ChannelCancelled(cid, CancelReason.CLIENT_CANCEL)]
    assert pair.b.can_send(cid)
    pair.b.send_item(cid, b"dropped")
    pair.b.send_item(cid, b"last dropped, EOS kept", end=True)
    (terminal,) = pair.b.frames_to_send()
    assert terminal.descriptor.flags == RESPONSE | EOS
    assert terminal.descriptor.payload_len == 0
    assert pair.a.receive_frame(terminal, 0) == []
    assert pair.closed()


# ------------------------------------------------------------------------------ credits


def test_items_deduct_credit_and_exhaustion_blocks_the_sender() -> None:
    pair = Pair(window=100)
    cid = pair.open(CallKind.SERVER_STREAMING)
    assert pair.b.send_credit(cid) == 100
    pair.b.send_item(cid, bytes(60))
    assert pair.b.send_credit(cid) == 40
    pair.b.send_item(cid, bytes(60))  # allowed while credit > 0: may go negative
    assert pair.b.send_credit(cid) == -20
    assert not pair.b.can_send(cid)
    with pytest.raises(LocalProtocolError):
        pair.b.send_item(cid, b"x")
    assert len(pair.send(pair.b)) == 2

    pair.a.consumed(cid, 40)
    assert pair.a.frames_to_send() == []  # under half a window: no grant yet
    pair.a.consumed(cid, 20)
    assert pair.send(pair.a) == [CreditAvailable(cid)]
    assert grants(pair.frames) == [GrantCredits(cid, 60)]
    assert pair.b.send_credit(cid) == 40
    assert pair.b.can_send(cid)


def test_item_larger_than_the_window_moves_alone() -> None:
    pair = Pair(window=10)
    cid = pair.open(CallKind.SERVER_STREAMING)
    pair.b.send_item(cid, bytes(1000))
    assert pair.b.send_credit(cid) == -990
    assert pair.send(pair.b) == [ItemReceived(cid, bytes(1000))]
    pair.a.consumed(cid, 1000)
    assert pair.send(pair.a) == [CreditAvailable(cid)]
    assert pair.b.send_credit(cid) == 10


def test_additive_grants() -> None:
    session = Session(Role.ACCEPTOR, limits=HelloLimits(initial_window=100))
    raw = RawCaller(session, window=100)
    raw.control(OpenChannel(1, CallKind.SERVER_STREAMING, 100))
    raw.frame(1, DATA | EOS, b"req", METHOD)
    session.send_item(1, bytes(100))
    assert session.send_credit(1) == 0
    assert raw.control(GrantCredits(1, 1000)) == [CreditAvailable(1)]
    assert raw.control(GrantCredits(1, 500)) == []  # already positive: no second event
    assert session.send_credit(1) == 1500
    assert raw.control(GrantCredits(1, 0)) == []
    assert not session.closed


def test_credit_overrun_by_the_caller_is_a_protocol_error() -> None:
    session = Session(Role.ACCEPTOR, limits=HelloLimits(initial_window=10))
    raw = RawCaller(session, window=10)
    raw.control(OpenChannel(1, CallKind.CLIENT_STREAMING, 10))
    raw.frame(1, DATA, bytes(100), METHOD)  # the request is not credit-limited
    raw.frame(1, DATA, bytes(7))
    raw.frame(1, DATA, bytes(7))  # credit was 3 > 0: allowed, now -4
    session.frames_to_send()
    with pytest.raises(RemoteProtocolError, match="credit overrun"):
        raw.frame(1, DATA, b"x")
    (go_away,) = session.frames_to_send()
    msg = decode_control(go_away.descriptor.method_id, go_away.payload)
    assert isinstance(msg, GoAway)
    assert msg.reason is GoAwayReason.PROTOCOL_ERROR


def test_credit_overrun_by_the_handler_is_a_protocol_error() -> None:
    session = Session(Role.INITIATOR, limits=HelloLimits(initial_window=4))
    session.frames_to_send()
    hello = encode_control(Hello(role=Role.ACCEPTOR))
    session.receive_frame(
        Frame(Descriptor(1, 0, 0, payload_len=len(hello), flags=CONTROL), hello), 0
    )
    cid = session.open_call(METHOD, b"", now_ns=0, kind=CallKind.SERVER_STREAMING)
    item = Frame(Descriptor(2, cid, 0, payload_len=4, flags=RESPONSE | DATA), bytes(4))
    assert session.receive_frame(item, 0) == [ItemReceived(cid, bytes(4))]
    with pytest.raises(RemoteProtocolError, match="credit overrun"):
        session.receive_frame(item._replace(descriptor=item.descriptor._replace(msg_id=3)), 0)


def test_eos_only_and_error_frames_need_no_credit() -> None:
    pair = Pair(window=5)
    cid = pair.open(CallKind.BIDI_STREAMING)
    pair.a.send_item(cid, bytes(5))
    pair.a.send_eos(cid)  # credit is 0: a lone EOS still goes
    assert pair.send(pair.a) == [ItemReceived(cid, bytes(5)), EndOfStream(cid)]
    assert pair.frames[-1].descriptor.payload_len == 0
    pair.b.send_item(cid, bytes(5))
    pair.b.send_error(cid, bytes(50))  # so does the error
    assert pair.send(pair.b)[-1] == ErrorReceived(cid, bytes(50))
    assert pair.closed()


def test_request_and_unary_response_are_not_credit_limited() -> None:
    pair = Pair(window=4)
    cid = pair.open(CallKind.CLIENT_STREAMING, payload=bytes(1000))
    pair.a.send_eos(cid)
    pair.send(pair.a)
    pair.b.send_response(cid, bytes(1000))
    assert pair.send(pair.b) == [ResponseReceived(cid, bytes(1000))]


def test_no_grant_once_the_peer_finished_sending() -> None:
    pair = Pair(window=10)
    cid = pair.open(CallKind.CLIENT_STREAMING)
    pair.a.send_item(cid, bytes(10))
    pair.a.send_eos(cid)
    pair.send(pair.a)
    pair.b.consumed(cid, 10)
    assert pair.b.frames_to_send() == []


def test_consumed_checks_its_argument_and_ignores_finished_channels() -> None:
    pair = Pair(window=10)
    cid = pair.open(CallKind.SERVER_STREAMING)
    pair.b.send_item(cid, bytes(4))
    pair.send(pair.b)
    with pytest.raises(LocalProtocolError):
        pair.a.consumed(cid, 5)
    pair.a.consumed(cid, 4)
    pair.b.send_eos(cid)
    pair.send(pair.b)
    pair.a.consumed(cid, 100)  # the call is over: nothing to account
    pair.a.consumed(12345, 1)
    assert pair.a.frames_to_send() == []


def test_can_send() -> None:
    pair = Pair(window=10)
    unary = pair.open(CallKind.UNARY)
    stream = pair.open(CallKind.CLIENT_STREAMING)
    assert not pair.a.can_send(unary)
    assert not pair.b.can_send(unary)
    assert pair.a.can_send(stream)
    assert not pair.b.can_send(stream)  # the handler of a client stream does not stream
    assert not pair.a.can_send(999)
    pair.a.send_eos(stream)
    assert not pair.a.can_send(stream)


def test_receiver_memory_stays_within_window_plus_one_item() -> None:
    window, item = 1000, 300
    pair = Pair(window=window)
    cid = pair.open(CallKind.SERVER_STREAMING)
    delivered = 0
    for round_ in range(20):
        while pair.b.can_send(cid):
            pair.b.send_item(cid, bytes(item))
        delivered += sum(
            len(bytes(e.payload)) for e in pair.send(pair.b) if isinstance(e, ItemReceived)
        )
        unconsumed = pair.a._channels[cid].unconsumed
        assert unconsumed <= window + item
        pair.a.consumed(cid, unconsumed if round_ % 2 else unconsumed // 2)
        pair.send(pair.a)
    assert delivered > 10 * window


def test_credit_grants_arrive_on_channel_zero() -> None:
    pair = Pair(window=2)
    cid = pair.open(CallKind.SERVER_STREAMING)
    pair.b.send_item(cid, b"ab")
    pair.send(pair.b)
    pair.a.consumed(cid, 2)
    (grant,) = pair.a.frames_to_send()
    assert grant.descriptor.channel_id == 0
    assert grant.descriptor.flags == CONTROL
    assert grant.descriptor.method_id == Verb.GRANT_CREDITS
    assert decode_control(Verb.GRANT_CREDITS, grant.payload) == GrantCredits(cid, 2)
