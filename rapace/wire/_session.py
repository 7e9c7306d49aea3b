"""The sans-IO protocol session: frames in, events out, frames to send in an outbox.

A :class:`Session` is one side of one connection. It does no I/O and reads no clock: the I/O
layer feeds it every frame the peer sent (:meth:`Session.receive_frame`, with the current
``time.monotonic_ns()``), acts on the events it returns, calls its sending methods, and moves
whatever :meth:`Session.frames_to_send` returns to the transport, in that order.

The transport must deliver the frames of one direction in the order they were sent (every
rapace transport does); channel-id reuse relies on it.

Rules the session enforces (a peer that breaks one gets ``GoAway(PROTOCOL_ERROR)`` and
:class:`~rapace._errors.RemoteProtocolError`; a local caller that breaks one gets
:class:`~rapace._errors.LocalProtocolError` and nothing is sent):

- Both sides send Hello first; the first frame received must be the peer's Hello. Calls can be
  opened once it has arrived (the method table and the effective window come with it).
- Every call has its own channel: the initiator opens odd ids, the acceptor even ones, and an id
  is reused only after its previous call is closed on both sides. OpenChannel precedes the
  request; the request carries DATA, the method id and, unless the caller streams, EOS. A
  unary call without metadata to a peer of protocol 1.1 or later sends no OpenChannel: its
  request carries OPENS, which implies it.
- Caller to handler: request, then (client-streaming, bidi) items as DATA and a lone EOS or
  DATA|EOS on the last item. Handler to caller, every frame with RESPONSE: a unary or
  client-streaming result as DATA|EOS; stream items as DATA and a lone EOS at the end; an error
  as DATA|EOS|ERROR at any time. The handler's EOS frame is its terminal frame: it ends the
  call, and the caller's session closes a still-open caller stream by itself.
- Flow control counts stream-item payload bytes per channel and direction. Both directions start
  with the effective ``initial_window``; the receiver grants back what the application reports
  consumed, once at least half a window has been. An item may be sent while credit is above
  zero and its whole length is deducted, so an item larger than the window still moves. The
  request, a unary response, EOS-only frames, errors and channel 0 are exempt. Credit travels
  only in GrantCredits on channel 0 (a CREDITS bit on a channel frame is ignored).
- CancelChannel from the caller ends the caller's direction; the handler answers with any
  terminal frame and non-terminal sends are dropped meanwhile. CancelChannel from the handler
  is its terminal frame (a refusal or an abort). Frames that arrive for a call this side
  cancelled or already answered are dropped.
- After this side sends GoAway, OpenChannels that arrive are refused with
  CancelChannel(RESOURCE_EXHAUSTED); after either side sent one, :meth:`Session.open_call`
  raises :class:`~rapace._errors.Unavailable`. Calls already open continue.
- Deadlines travel in the request descriptor; :meth:`Session.expire` reports handler calls whose
  deadline passed. Caller-side deadlines are the I/O layer's (it cancels with
  DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Final, Literal, NoReturn

import cbor2
from typing_extensions import Buffer

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
    OPENS_MINOR,
    PROTOCOL_VERSION,
    SIG_HASH_BYTES,
    CallKind,
    CancelChannel,
    CancelReason,
    CloseChannel,
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
    DEFAULT_DESCRIPTOR_LIMITS,
    EOS,
    ERROR,
    OPENS,
    RESPONSE,
    SLOT_INLINE,
    Descriptor,
    DescriptorLimits,
    Frame,
)
from rapace.wire._session_events import (
    CallReceived,
    ChannelCancelled,
    CreditAvailable,
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
    SessionStatistics,
)

__all__ = ("DEFAULT_LIMITS", "DeadlineMode", "Session")

DeadlineMode = Literal["absolute", "relative"]
DEFAULT_LIMITS: Final = HelloLimits()

U32_MAX: Final = 0xFFFF_FFFF
_ZERO16: Final = bytes(16)
_ZERO_SIG: Final = bytes(SIG_HASH_BYTES)
_EMPTY_METADATA: Final[Mapping[str, bytes]] = MappingProxyType({})
_MAX_GO_AWAY_MESSAGE: Final = 1024  # what the peer's decoder accepts
_MAX_METADATA_ENTRIES: Final = 128
_MAX_METADATA_KEY: Final = 256
_MAX_METADATA_VALUE: Final = 64 * 1024
_MAX_CONTROL_DEPTH: Final = 8

# Receive states of a channel (plain ints: compared on every frame).
_AWAIT_REQUEST: Final = 0  # handler side: OpenChannel seen, request not yet
_OPEN: Final = 1  # the peer's direction delivers events
_DRAIN: Final = 2  # frames are dropped until the one that ends the peer's direction
_CLOSED: Final = 3  # the peer's direction ended: nothing more may arrive

_VERB_HELLO: Final = int(Verb.HELLO)
_VERB_OPEN: Final = int(Verb.OPEN_CHANNEL)
_VERB_GRANT: Final = int(Verb.GRANT_CREDITS)
_VERB_CANCEL: Final = int(Verb.CANCEL_CHANNEL)
_VERB_PING: Final = int(Verb.PING)
_VERB_PONG: Final = int(Verb.PONG)
_VERB_GO_AWAY: Final = int(Verb.GO_AWAY)

_KINDS: Final = tuple(CallKind)  # index -> member without an enum lookup per call
_RESPONSE_DATA: Final = RESPONSE | DATA
_RESPONSE_DATA_EOS: Final = RESPONSE | DATA | EOS
_RESPONSE_EOS: Final = RESPONSE | EOS
_ERROR_FRAME: Final = RESPONSE | DATA | EOS | ERROR

_new_tuple = tuple.__new__  # skips the NamedTuple __new__ wrapper on every frame built


class _Channel:
    """State of one call as this side sees it.

    ``ours`` says this side opened the channel, i.e. is the caller. ``cancelled`` is only used
    on the handler side: the caller cancelled, so non-terminal sends are dropped.
    """

    __slots__ = (
        "caller_streams",
        "cancelled",
        "cid",
        "consumed",
        "handler_streams",
        "kind",
        "metadata",
        "ours",
        "recv",
        "recv_credit",
        "send_credit",
        "send_open",
        "unconsumed",
    )

    def __init__(
        self,
        cid: int,
        ours: bool,
        kind: CallKind,
        send_open: bool,
        recv: int,
        send_credit: int,
        recv_credit: int,
        metadata: Mapping[str, bytes],
    ) -> None:
        self.cid = cid
        self.ours = ours
        self.kind = kind
        # The enum properties build a tuple per call; these are read on every frame.
        self.caller_streams = kind >= 2  # CLIENT_STREAMING, BIDI_STREAMING
        self.handler_streams = kind & 1 == 1  # SERVER_STREAMING, BIDI_STREAMING
        self.send_open = send_open
        self.recv = recv
        self.send_credit = send_credit
        self.recv_credit = recv_credit  # the peer's send credit, as this side accounts it
        self.unconsumed = 0  # item bytes delivered, not yet reported consumed
        self.consumed = 0  # bytes reported consumed since the last grant
        self.cancelled = False
        self.metadata = metadata


def _nbytes(payload: Buffer) -> int:
    if type(payload) is bytes:
        return len(payload)
    return memoryview(payload).nbytes


def _cbor_uint(value: int) -> bytes:
    # Minimal-length CBOR encoding of a u32, the same bytes cbor2.dumps writes.
    if value < 24:
        return bytes((value,))
    if value < 0x100:
        return bytes((0x18, value))
    if value < 0x1_0000:
        return b"\x19" + value.to_bytes(2, "big")
    return b"\x1a" + value.to_bytes(4, "big")


def _u32_fields(payload: Buffer, count: int) -> list[int] | None:
    """The fields of a control payload that is exactly ``count`` unsigned 32-bit integers,
    or None to fall back to the full decoder (which also reports malformed payloads)."""
    try:
        value = cbor2.loads(payload, max_depth=_MAX_CONTROL_DEPTH, allow_indefinite=False)
    except Exception:  # cbor2 raises several types; the full decoder reports them properly
        return None
    if type(value) is not list or len(value) != count:
        return None
    for item in value:
        if type(item) is not int or not 0 <= item <= U32_MAX:
            return None
    return value


def _check_metadata(metadata: Mapping[str, bytes], what: str) -> dict[str, bytes]:
    """Copy ``metadata``, refusing what the peer's decoder would reject."""
    if len(metadata) > _MAX_METADATA_ENTRIES:
        raise LocalProtocolError(f"{what} has more than {_MAX_METADATA_ENTRIES} entries")
    out: dict[str, bytes] = {}
    for key, value in metadata.items():
        if type(key) is not str or len(key) > _MAX_METADATA_KEY:
            raise LocalProtocolError(
                f"{what} keys must be strings of at most {_MAX_METADATA_KEY} characters"
            )
        if type(value) is not bytes or len(value) > _MAX_METADATA_VALUE:
            raise LocalProtocolError(
                f"{what}[{key!r}] must be bytes of at most {_MAX_METADATA_VALUE} bytes"
            )
        out[key] = value
    return out


def _check_method_table(methods: Sequence[MethodEntry]) -> str | None:
    seen: set[int] = set()
    for entry in methods:
        if entry.method_id == 0:
            return f"method table entry {entry.name!r} has the reserved id 0"
        if entry.method_id in seen:
            return f"method table has id 0x{entry.method_id:08x} twice"
        seen.add(entry.method_id)
    return None


def _remote(message: str, status: Status = Status.PROTOCOL_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(message, status=status)


class Session:
    """One side of a rapace connection, as a state machine without I/O.

    Args:
        role: INITIATOR for the side that connected (it opens odd channel ids), ACCEPTOR for
            the other.
        methods: the methods this side serves, announced in Hello.
        limits: what this side is prepared to receive; the session uses the smaller of both
            peers' values.
        params: opaque Hello parameters.
        deadline_mode: "absolute" when both peers read the same monotonic clock (shared
            memory), "relative" when deadlines travel as remaining nanoseconds (sockets).
        descriptor_limits: the transport's descriptor limits; ``max_channel_id`` bounds the
            channel ids this side allocates and accepts.

    Our Hello is queued on construction: flush :meth:`frames_to_send` first.

    Raises:
        LocalProtocolError: the method table, limits or params cannot be announced.
    """

    def __init__(
        self,
        role: Role,
        *,
        methods: Sequence[MethodEntry] = (),
        limits: HelloLimits = DEFAULT_LIMITS,
        params: Mapping[str, bytes] | None = None,
        deadline_mode: DeadlineMode = "absolute",
        descriptor_limits: DescriptorLimits = DEFAULT_DESCRIPTOR_LIMITS,
    ) -> None:
        if deadline_mode not in ("absolute", "relative"):
            raise LocalProtocolError(f"unknown deadline_mode {deadline_mode!r}")
        problem = _check_method_table(methods)
        if problem is not None:
            raise LocalProtocolError(problem)
        if not 1 <= limits.initial_window <= U32_MAX:
            raise LocalProtocolError("initial_window must be between 1 and 2**32 - 1")
        if not 0 <= limits.max_channels <= U32_MAX or limits.max_payload_bytes < 0:
            raise LocalProtocolError(f"limits out of range: {limits}")
        max_channel_id = min(descriptor_limits.max_channel_id, U32_MAX)
        if max_channel_id < 2:
            raise LocalProtocolError("max_channel_id leaves no channel id for one side")
        self._role = Role(role)
        self._our_parity = 1 if self._role is Role.INITIATOR else 0
        self._first_id = 1 if self._our_parity else 2
        self._max_channel_id = max_channel_id
        # How many ids of our parity exist; the allocator never loops longer than this.
        self._id_space = (max_channel_id + self._our_parity) // 2
        self._limits = limits
        self._max_receive = limits.max_payload_bytes
        self._relative = deadline_mode == "relative"
        hello = Hello(
            role=self._role,
            limits=limits,
            methods=tuple(methods),
            params=_check_metadata(params or {}, "params"),
        )
        self._hello = hello
        payload = encode_control(hello)
        try:  # what the peer could not decode must fail here, not there
            decode_control(_VERB_HELLO, payload)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"our Hello cannot be announced: {exc}") from None

        self._outbox: list[Frame] = []
        self._msg_id = 0
        self._frames_received = 0
        self._channels: dict[int, _Channel] = {}
        self._next_id = self._first_id
        self._ours_count = 0
        self._theirs_count = 0
        self._peer: Hello | None = None
        self._peer_methods: dict[int, MethodEntry] | None = None
        self._effective: HelloLimits | None = None
        self._window = 0
        self._grant_threshold = 1
        self._max_ours = 0
        self._max_theirs = 0
        self._max_payload = 0
        self._open_tails: tuple[bytes, ...] = ()
        self._peer_takes_opens = False  # a request may carry OPENS (the peer's Hello says)
        self._closed = False
        self._can_open = False  # handshake done, no GoAway either way, not closed
        self._go_away_sent = False
        self._go_away_received: GoAway | None = None
        self._last_peer_channel = 0
        self._deadlines: list[tuple[int, int, _Channel]] = []
        self._deadline_seq = 0
        self._queue_control(_VERB_HELLO, payload)

    # ------------------------------------------------------------------ state

    @property
    def role(self) -> Role:
        """This side's role."""
        return self._role

    @property
    def handshake_complete(self) -> bool:
        """True once the peer's Hello has been accepted."""
        return self._peer is not None

    @property
    def peer_hello(self) -> Hello | None:
        """The peer's Hello, once received."""
        return self._peer

    @property
    def limits(self) -> HelloLimits | None:
        """The effective limits, once the handshake is complete."""
        return self._effective

    @property
    def closed(self) -> bool:
        """True after the peer broke the protocol: the session accepts nothing more."""
        return self._closed

    @property
    def go_away_received(self) -> GoAway | None:
        """The peer's GoAway, if it sent one."""
        return self._go_away_received

    def statistics(self) -> SessionStatistics:
        """Counters for monitoring and tests."""
        return SessionStatistics(len(self._channels), self._msg_id, self._frames_received)

    def send_credit(self, channel_id: int) -> int:
        """Bytes of stream items this side may still send on ``channel_id`` (may be negative
        after an item larger than the remaining credit).

        Raises:
            LocalProtocolError: the channel is not open.
        """
        return self._channel(channel_id).send_credit

    def can_send(self, channel_id: int) -> bool:
        """Whether :meth:`send_item` on ``channel_id`` would be accepted now; when False
        because credit ran out, a :class:`CreditAvailable` event announces the change."""
        ch = self._channels.get(channel_id)
        if ch is None or not ch.send_open or self._closed:
            return False
        if not (ch.handler_streams if not ch.ours else ch.caller_streams):
            return False
        return ch.send_credit > 0 or (not ch.ours and ch.cancelled)

    def frames_to_send(self) -> list[Frame]:
        """Take every frame queued so far, in sending order."""
        frames = self._outbox
        self._outbox = []
        return frames

    # ---------------------------------------------------------------- receive

    def receive_frame(self, frame: Frame, now_ns: int) -> list[Event]:
        """Consume one frame from the peer.

        ``frame`` comes from the transport, its descriptor already validated and its payload
        joined. ``now_ns`` is this side's monotonic clock, used to re-base deadlines.

        Raises:
            RemoteProtocolError: the frame breaks the protocol. A GoAway(PROTOCOL_ERROR) is
                queued and the session is closed: every later call raises too.
        """
        if self._closed:
            raise RemoteProtocolError("the session was closed after a protocol error")
        self._frames_received += 1
        desc = frame[0]
        try:
            cid = desc.channel_id
            if cid == 0:  # control payloads are bounded by the transport and their decoder
                return self._control_frame(desc, frame[1])
            if desc.payload_len > self._max_receive:
                raise _remote(
                    f"payload of {desc.payload_len} bytes exceeds the announced limit "
                    f"{self._max_receive}",
                    Status.INVALID_FRAME,
                )
            ch = self._channels.get(cid)
            if desc.flags & OPENS:
                ch = self._implied_open(ch, desc)
            if ch is None:
                if self._peer is None:
                    raise _remote("the first frame must be the peer's Hello")
                raise _remote(f"frame on channel {cid}, which is not open", Status.INVALID_CHANNEL)
            if desc.flags & CONTROL:
                raise _remote("CONTROL flag outside channel 0", Status.INVALID_FRAME)
            if ch.ours:
                return self._caller_frame(ch, desc, frame[1])
            return self._handler_frame(ch, desc, frame[1], now_ns)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def _implied_open(self, ch: _Channel | None, desc: Descriptor) -> _Channel | None:
        """Open the channel of a request that carries OPENS, as its OpenChannel would have."""
        cid = desc.channel_id
        if self._peer is None:
            raise _remote("the first frame must be the peer's Hello")
        if ch is not None:
            raise _remote(f"OPENS on channel {cid}, which is still open", Status.INVALID_CHANNEL)
        flags = desc.flags
        if flags & (DATA | EOS | RESPONSE | ERROR) != DATA | EOS or desc.method_id == 0:
            raise _remote(f"OPENS on channel {cid} on a frame that is not a unary request")
        self._on_open(cid, CallKind.UNARY, self._window, _EMPTY_METADATA)
        return self._channels[cid]

    def _caller_frame(self, ch: _Channel, desc: Descriptor, payload: Buffer) -> list[Event]:
        """A frame from the handler of a call this side opened."""
        flags = desc.flags
        cid = ch.cid
        if ch.recv != _OPEN:  # we cancelled: only the terminal frame matters, to free the id
            if flags & EOS:
                self._end_call(ch)
            return [PayloadDropped(cid, payload)] if desc.payload_len else []
        if not flags & RESPONSE:
            raise _remote(f"handler frame on channel {cid} without RESPONSE")
        if flags & EOS:
            event: Event
            if flags & ERROR:
                if not flags & DATA:
                    raise _remote(f"error frame on channel {cid} without DATA")
                event = ErrorReceived(cid, payload)
            elif flags & DATA:
                if ch.handler_streams:
                    self._charge(ch, desc.payload_len)
                    self._end_call(ch)
                    return [ItemReceived(cid, payload), EndOfStream(cid)]
                event = ResponseReceived(cid, payload)
            else:
                if not ch.handler_streams:
                    raise _remote(f"lone EOS on channel {cid}, whose call expects a response")
                event = EndOfStream(cid)
            self._end_call(ch)
            return [event]
        if flags & ERROR:
            raise _remote(f"error frame on channel {cid} without EOS")
        if not flags & DATA:
            raise _remote(f"handler frame on channel {cid} with neither DATA nor EOS")
        if not ch.handler_streams:
            raise _remote(f"stream item on channel {cid}, whose handler does not stream")
        self._charge(ch, desc.payload_len)
        return [ItemReceived(cid, payload)]

    def _handler_frame(
        self, ch: _Channel, desc: Descriptor, payload: Buffer, now_ns: int
    ) -> list[Event]:
        """A frame from the caller of a call the peer opened."""
        flags = desc.flags
        cid = ch.cid
        if flags & (RESPONSE | ERROR):
            raise _remote(f"caller frame on channel {cid} with RESPONSE or ERROR")
        state = ch.recv
        if state == _OPEN:
            if desc.method_id:
                raise _remote(f"stream frame on channel {cid} with a method id")
            if flags & DATA:
                self._charge(ch, desc.payload_len)
                if flags & EOS:
                    ch.recv = _CLOSED
                    return [ItemReceived(cid, payload), EndOfStream(cid)]
                return [ItemReceived(cid, payload)]
            if flags & EOS:
                if desc.payload_len:
                    raise _remote(f"EOS-only frame on channel {cid} with a payload")
                ch.recv = _CLOSED
                return [EndOfStream(cid)]
            raise _remote(f"frame on channel {cid} with neither DATA nor EOS")
        if state == _AWAIT_REQUEST:
            method_id = desc.method_id
            if not flags & DATA or method_id == 0:
                raise _remote(
                    f"the first frame on channel {cid} must be the request (DATA and a method id)",
                    Status.INVALID_METHOD if flags & DATA else Status.PROTOCOL_ERROR,
                )
            if ch.caller_streams:
                if flags & EOS:
                    raise _remote(f"streaming request on channel {cid} with EOS")
                ch.recv = _OPEN
            else:
                if not flags & EOS:
                    raise _remote(f"request on channel {cid} without EOS")
                ch.recv = _CLOSED
            wire_deadline = desc.deadline_ns
            deadline: int | None = None
            if wire_deadline != DEADLINE_NONE:
                deadline = now_ns + wire_deadline if self._relative else wire_deadline
                self._push_deadline(ch, deadline)
            metadata = ch.metadata
            ch.metadata = _EMPTY_METADATA
            return [CallReceived(cid, method_id, ch.kind, payload, deadline, metadata)]
        if state == _DRAIN:
            if flags & EOS:
                ch.recv = _CLOSED
                self._free(ch)  # draining implies our side already ended
            return [PayloadDropped(cid, payload)] if desc.payload_len else []
        raise _remote(f"frame on channel {cid} after the caller ended its stream")

    def _charge(self, ch: _Channel, nbytes: int) -> None:
        credit = ch.recv_credit
        if credit <= 0:
            raise _remote(f"credit overrun on channel {ch.cid}")
        ch.recv_credit = credit - nbytes
        ch.unconsumed += nbytes

    def _control_frame(self, desc: Descriptor, payload: Buffer) -> list[Event]:
        if not desc.flags & CONTROL:
            raise _remote("frame on channel 0 without the CONTROL flag", Status.INVALID_FRAME)
        verb = desc.method_id
        if self._peer is None:
            if verb != _VERB_HELLO:
                raise _remote("the first frame must be the peer's Hello")
            return self._on_hello(payload)
        # Fast paths for the control messages of every call; anything unusual (metadata,
        # malformed payloads) goes through the full decoder.
        if verb == _VERB_OPEN:
            fields = _u32_fields(payload, 3)
            if fields is not None and fields[1] < 4:
                return self._on_open(fields[0], _KINDS[fields[1]], fields[2], _EMPTY_METADATA)
        elif verb == _VERB_GRANT:
            fields = _u32_fields(payload, 2)
            if fields is not None:
                return self._on_grant(fields[0], fields[1])
        msg = decode_control(verb, payload)
        if msg is None:  # extension verb: ignoring it is the rule
            return []
        if isinstance(msg, OpenChannel):
            metadata = msg.metadata or _EMPTY_METADATA
            return self._on_open(msg.channel_id, msg.kind, msg.initial_credits, metadata)
        if isinstance(msg, GrantCredits):
            return self._on_grant(msg.channel_id, msg.nbytes)
        if isinstance(msg, CancelChannel):
            return self._on_cancel(msg.channel_id, msg.reason)
        if isinstance(msg, Ping):
            self._queue_control(_VERB_PONG, encode_control(Pong(msg.data)))
            return []
        if isinstance(msg, Pong):
            return [PongReceived(msg.data)]
        if isinstance(msg, GoAway):
            self._go_away_received = msg
            self._can_open = False
            return [GoAwayReceived(msg)]
        if isinstance(msg, CloseChannel):  # an optional hint; the EOS rules already free ids
            return []
        raise _remote("a second Hello")

    def _on_hello(self, payload: Buffer) -> list[Event]:
        hello = decode_control(_VERB_HELLO, payload)
        if not isinstance(hello, Hello):  # pragma: no cover - verb 0 always decodes to Hello
            raise _remote("the first frame must be the peer's Hello")
        if hello.protocol_version >> 16 != PROTOCOL_VERSION >> 16:
            raise _remote(
                f"peer speaks protocol version 0x{hello.protocol_version:08x}, "
                f"this side 0x{PROTOCOL_VERSION:08x}",
                Status.INCOMPATIBLE_SCHEMA,
            )
        if hello.role == self._role:
            raise _remote(f"both sides claim the role {self._role.name}")
        problem = _check_method_table(hello.methods)
        if problem is not None:
            raise _remote(f"peer's {problem}", Status.INVALID_METHOD)
        if hello.limits.initial_window == 0:
            raise _remote("peer announced an initial window of 0: no stream could move")
        effective = self._limits.merge(hello.limits)
        self._peer = hello
        self._effective = effective
        self._can_open = self._go_away_received is None and not self._go_away_sent
        # An empty table means the peer did not announce one (not "serves nothing").
        self._peer_methods = {m.method_id: m for m in hello.methods} if hello.methods else None
        window = effective.initial_window
        self._window = window
        self._grant_threshold = max(1, window // 2)
        self._max_ours = min(effective.max_channels, self._id_space)
        self._max_theirs = effective.max_channels
        self._max_payload = effective.max_payload_bytes
        window_bytes = _cbor_uint(window)
        self._open_tails = tuple(bytes((k,)) + window_bytes for k in range(len(_KINDS)))
        self._peer_takes_opens = hello.protocol_version & 0xFFFF >= OPENS_MINOR
        return [HandshakeComplete(hello, effective)]

    def _on_open(
        self, cid: int, kind: CallKind, credits: int, metadata: Mapping[str, bytes]
    ) -> list[Event]:
        if cid == 0 or cid & 1 == self._our_parity or cid > self._max_channel_id:
            raise _remote(
                f"peer opened channel {cid}, which is not its to open", Status.INVALID_CHANNEL
            )
        channels = self._channels
        if cid in channels:
            raise _remote(f"peer opened channel {cid}, which is still open", Status.INVALID_CHANNEL)
        count = self._theirs_count
        limit = self._max_theirs
        if self._go_away_sent or count >= limit:
            # Refused channels are kept (draining) until the caller's direction ends, so a late
            # frame cannot alias the id; a peer that ignores refusals runs into this bound.
            if count >= 2 * limit + 1:
                raise _remote(
                    "peer keeps opening channels beyond max_channels", Status.RESOURCE_EXHAUSTED
                )
            channels[cid] = _Channel(cid, False, kind, False, _DRAIN, 0, 0, _EMPTY_METADATA)
            self._theirs_count = count + 1
            self._queue_control(
                _VERB_CANCEL,
                b"\x82" + _cbor_uint(cid) + _cbor_uint(int(CancelReason.RESOURCE_EXHAUSTED)),
            )
            return []
        channels[cid] = _Channel(
            cid, False, kind, True, _AWAIT_REQUEST, credits, self._window, metadata
        )
        self._theirs_count = count + 1
        self._last_peer_channel = cid
        return []

    def _on_grant(self, cid: int, nbytes: int) -> list[Event]:
        ch = self._channels.get(cid)
        # Grants for a channel already freed are legitimate races (sent before the grantor
        # saw the end of the call); the id cannot have been reused yet.
        if ch is None or not ch.send_open or nbytes == 0:
            return []
        before = ch.send_credit
        ch.send_credit = before + nbytes
        if before <= 0 < before + nbytes:
            return [CreditAvailable(cid)]
        return []

    def _on_cancel(self, cid: int, reason: CancelReason) -> list[Event]:
        ch = self._channels.get(cid)
        if ch is None:  # cancel after the end of the call: a no-op by the rules
            return []
        if ch.ours:  # the handler's terminal frame: it refused or aborted the call
            cancelled_by_us = ch.recv != _OPEN
            self._end_call(ch)
            return [] if cancelled_by_us else [ChannelCancelled(cid, reason)]
        state = ch.recv
        if state == _AWAIT_REQUEST:
            raise _remote(f"CancelChannel for channel {cid} before its request")
        ch.recv = _CLOSED
        if state == _DRAIN:  # we already ended our side: this just ends theirs
            self._free(ch)
            return []
        if ch.cancelled:
            return []
        ch.cancelled = True
        return [ChannelCancelled(cid, reason)]

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._closed = True
        self._can_open = False
        message = str(exc)[:_MAX_GO_AWAY_MESSAGE]
        go_away = GoAway(GoAwayReason.PROTOCOL_ERROR, self._last_peer_channel, message)
        self._queue_control(_VERB_GO_AWAY, encode_control(go_away))

    # ------------------------------------------------------------------ calls

    def open_call(
        self,
        method_id: int,
        payload: Buffer = b"",
        *,
        now_ns: int,
        kind: CallKind = CallKind.UNARY,
        deadline_ns: int | None = None,
        metadata: Mapping[str, bytes] | None = None,
        sig_hash: bytes | None = None,
    ) -> int:
        """Open a call: queue OpenChannel and the request, return the channel id.

        ``payload`` is the encoded arguments. ``deadline_ns`` is on this side's monotonic
        clock (``now_ns`` is its current value). ``sig_hash`` is the signature hash the caller
        expects the method to have; all zeros or None skip the comparison.

        Raises:
            LocalProtocolError: before the handshake, after a protocol error, for method id 0,
                a payload over the effective limit, bad metadata, or too many calls open
                (status RESOURCE_EXHAUSTED).
            Unavailable: either side sent GoAway.
            Unimplemented: the peer's method table lacks ``method_id``.
            IncompatibleSchema: the peer's method has another signature hash.
            DeadlineExceeded: ``deadline_ns`` is not after ``now_ns``.
        """
        if not self._can_open:
            self._refuse_open()
        if not 0 < method_id <= U32_MAX:
            raise LocalProtocolError(f"method id {method_id} is not a valid 32-bit id")
        if not 0 <= kind < 4:
            raise LocalProtocolError(f"unknown call kind {kind!r}")
        call_kind = _KINDS[kind]
        peer_methods = self._peer_methods
        if peer_methods is not None:
            entry = peer_methods.get(method_id)
            if entry is None:
                raise Unimplemented(f"the peer does not serve method 0x{method_id:08x}")
            if (
                sig_hash is not None
                and sig_hash != entry.sig_hash
                and sig_hash != _ZERO_SIG
                and entry.sig_hash != _ZERO_SIG
            ):
                raise IncompatibleSchema(
                    f"method {entry.name} (0x{method_id:08x}) has another signature on the peer"
                )
        if deadline_ns is None:
            wire_deadline = DEADLINE_NONE
        else:
            if deadline_ns <= now_ns:
                raise DeadlineExceeded("the call's deadline passed before it was sent")
            wire_deadline = deadline_ns - now_ns if self._relative else deadline_ns
            # Farther than the field can say is the same as no deadline at all.
            wire_deadline = min(wire_deadline, DEADLINE_NONE - 1)
        nbytes = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
        if nbytes > self._max_payload:
            raise LocalProtocolError(
                f"request of {nbytes} bytes exceeds the limit {self._max_payload}"
            )
        checked = _check_metadata(metadata, "metadata") if metadata else None
        if self._ours_count >= self._max_ours:
            raise LocalProtocolError(
                f"{self._ours_count} calls open, the limit is {self._max_ours}",
                status=Status.RESOURCE_EXHAUSTED,
            )
        channels = self._channels
        cid = self._next_id
        if cid in channels:
            cid = self._allocate_id()
        else:
            following = cid + 2
            self._next_id = following if following <= self._max_channel_id else self._first_id
        window = self._window
        ch = _Channel(cid, True, call_kind, True, _OPEN, window, window, _EMPTY_METADATA)
        channels[cid] = ch
        self._ours_count += 1
        if ch.caller_streams:
            flags = DATA
        else:  # the request is the caller's whole direction
            ch.send_open = False
            flags = DATA | EOS
        # The frames built inline: this is the per-call path.
        outbox = self._outbox
        msg_id = self._msg_id
        if checked is None and call_kind is CallKind.UNARY and self._peer_takes_opens:
            flags |= OPENS  # the request opens its channel: no OpenChannel frame
        else:
            if checked is None:
                open_payload = b"\x83" + _cbor_uint(cid) + self._open_tails[call_kind]
            else:
                open_payload = encode_control(OpenChannel(cid, call_kind, window, checked))
            msg_id += 1
            desc = _new_tuple(
                Descriptor,
                (
                    msg_id,
                    0,
                    _VERB_OPEN,
                    SLOT_INLINE,
                    0,
                    0,
                    len(open_payload),
                    CONTROL,
                    0,
                    DEADLINE_NONE,
                    _ZERO16,
                ),
            )
            outbox.append(_new_tuple(Frame, (desc, open_payload)))
        msg_id = self._msg_id = msg_id + 1
        desc = _new_tuple(
            Descriptor,
            (
                msg_id,
                cid,
                method_id,
                SLOT_INLINE,
                0,
                0,
                nbytes,
                flags,
                0,
                wire_deadline,
                _ZERO16,
            ),
        )
        outbox.append(_new_tuple(Frame, (desc, payload)))
        return cid

    def _refuse_open(self) -> NoReturn:
        self._check_usable()
        if self._peer is None:
            raise LocalProtocolError("open_call before the handshake completed")
        if self._go_away_received is not None:
            raise Unavailable("the peer sent GoAway and accepts no new calls")
        raise Unavailable("this side sent GoAway and opens no new calls")

    def _allocate_id(self) -> int:
        # Ids in use are skipped; open_call checked that one is free, so this ends.
        cid = self._next_id
        channels = self._channels
        max_id = self._max_channel_id
        while cid in channels:
            cid += 2
            if cid > max_id:
                cid = self._first_id
        following = cid + 2
        self._next_id = following if following <= max_id else self._first_id
        return cid

    def send_item(self, channel_id: int, payload: Buffer, *, end: bool = False) -> None:
        """Send a stream item; ``end=True`` also ends this side's direction (DATA|EOS).

        On the handler side of a call the caller cancelled, items are dropped silently (an
        ``end`` still sends the terminal EOS).

        Raises:
            LocalProtocolError: unknown channel, a kind that does not stream in this
                direction, a closed direction, or no send credit left.
        """
        ch = self._channel(channel_id)
        if ch.ours:
            if not ch.caller_streams:
                raise LocalProtocolError(f"channel {channel_id}: the caller does not stream")
            flags = DATA | EOS if end else DATA
        else:
            if not ch.handler_streams:
                raise LocalProtocolError(f"channel {channel_id}: the handler does not stream")
            if ch.cancelled and ch.send_open:
                if end:
                    self._handler_terminal(ch, _RESPONSE_EOS, b"", 0)
                return
            flags = _RESPONSE_DATA_EOS if end else _RESPONSE_DATA
        if not ch.send_open:
            raise LocalProtocolError(f"channel {channel_id}: this side's direction is closed")
        credit = ch.send_credit
        if credit <= 0:
            raise LocalProtocolError(
                f"channel {channel_id}: no send credit (wait for CreditAvailable)"
            )
        nbytes = _nbytes(payload)
        if nbytes > self._max_payload:
            raise LocalProtocolError(
                f"item of {nbytes} bytes exceeds the limit {self._max_payload}"
            )
        ch.send_credit = credit - nbytes
        if ch.ours:
            self._queue(channel_id, 0, flags, payload, nbytes)
            if end:
                ch.send_open = False
        elif end:
            self._handler_terminal(ch, flags, payload, nbytes)
        else:
            self._queue(channel_id, 0, flags, payload, nbytes)

    def send_eos(self, channel_id: int) -> None:
        """End this side's streaming direction with a lone EOS.

        Raises:
            LocalProtocolError: unknown channel, closed direction, or a kind that does not
                stream in this direction (a unary handler ends with send_response/send_error).
        """
        ch = self._channel(channel_id)
        if not ch.send_open:
            raise LocalProtocolError(f"channel {channel_id}: this side's direction is closed")
        if ch.ours:
            if not ch.caller_streams:
                raise LocalProtocolError(f"channel {channel_id}: the caller does not stream")
            ch.send_open = False
            self._queue(channel_id, 0, EOS, b"", 0)
            return
        if not ch.handler_streams:
            raise LocalProtocolError(
                f"channel {channel_id}: a non-streaming handler ends with a response or error"
            )
        self._handler_terminal(ch, _RESPONSE_EOS, b"", 0)

    def send_response(self, channel_id: int, payload: Buffer) -> None:
        """Answer a unary or client-streaming call with its result (ends the call).

        Raises:
            LocalProtocolError: not the handler of such a call, or already answered.
        """
        ch = self._handler_channel(channel_id)
        if ch.handler_streams:
            raise LocalProtocolError(
                f"channel {channel_id}: a streaming handler sends items and an EOS"
            )
        nbytes = _nbytes(payload)
        if nbytes > self._max_payload:
            raise LocalProtocolError(
                f"response of {nbytes} bytes exceeds the limit {self._max_payload}"
            )
        self._handler_terminal(ch, _RESPONSE_DATA_EOS, payload, nbytes)

    def send_error(self, channel_id: int, payload: Buffer) -> None:
        """Fail a call of any kind with an encoded error (ends the call).

        Raises:
            LocalProtocolError: not the handler of the call, or already answered.
        """
        ch = self._handler_channel(channel_id)
        nbytes = _nbytes(payload)
        if nbytes > self._max_payload:
            raise LocalProtocolError(
                f"error of {nbytes} bytes exceeds the limit {self._max_payload}"
            )
        self._handler_terminal(ch, _ERROR_FRAME, payload, nbytes)

    def cancel(self, channel_id: int, reason: CancelReason = CancelReason.CLIENT_CANCEL) -> None:
        """Cancel a call. A no-op when the call is already over or cancelled.

        Caller side: queues CancelChannel; replies that arrive later are dropped. Handler side:
        queues CancelChannel as the terminal frame (a refusal, e.g. of a client stream).
        """
        ch = self._channels.get(channel_id)
        if ch is None or self._closed:
            return
        if ch.ours:
            if ch.recv != _OPEN:
                return
            ch.recv = _DRAIN
            ch.send_open = False
            self._queue_cancel(channel_id, reason)
            return
        if not ch.send_open:
            return
        self._queue_cancel(channel_id, reason)
        self._close_handler_side(ch)

    def consumed(self, channel_id: int, nbytes: int) -> None:
        """Report that the application took ``nbytes`` of received stream items.

        Queues GrantCredits once at least half a window has been consumed since the last
        grant. Unknown channels are ignored (the call may have ended meanwhile).

        Raises:
            LocalProtocolError: negative, or more than was delivered and not yet reported.
        """
        if nbytes < 0:
            raise LocalProtocolError("consumed a negative number of bytes")
        ch = self._channels.get(channel_id)
        if ch is None:
            return
        if nbytes > ch.unconsumed:
            raise LocalProtocolError(
                f"channel {channel_id}: consumed {nbytes} bytes, only {ch.unconsumed} pending"
            )
        ch.unconsumed -= nbytes
        if ch.recv != _OPEN or self._closed:  # the peer sends no more items: no grant needed
            return
        total = ch.consumed + nbytes
        if total < self._grant_threshold:
            ch.consumed = total
            return
        ch.consumed = 0
        ch.recv_credit += total
        while total:
            grant = min(total, U32_MAX)
            total -= grant
            self._queue_control(_VERB_GRANT, b"\x82" + _cbor_uint(channel_id) + _cbor_uint(grant))

    # ---------------------------------------------------------------- control

    def ping(self, data: bytes) -> None:
        """Queue a Ping; the peer answers with a Pong carrying the same 8 bytes.

        Raises:
            LocalProtocolError: ``data`` is not 8 bytes.
        """
        self._check_usable()
        if type(data) is not bytes or len(data) != 8:
            raise LocalProtocolError("ping data must be 8 bytes")
        self._queue_control(_VERB_PING, encode_control(Ping(data)))

    def go_away(self, reason: GoAwayReason = GoAwayReason.SHUTDOWN, message: str = "") -> None:
        """Queue GoAway: calls already accepted continue, calls the peer opens from now on are
        refused with CancelChannel(RESOURCE_EXHAUSTED), and this side opens no new calls.

        Raises:
            LocalProtocolError: ``message`` longer than 1024 characters.
        """
        self._check_usable()
        if len(message) > _MAX_GO_AWAY_MESSAGE:
            raise LocalProtocolError(f"GoAway message over {_MAX_GO_AWAY_MESSAGE} characters")
        self._go_away_sent = True
        self._can_open = False
        go_away = GoAway(GoAwayReason(reason), self._last_peer_channel, message)
        self._queue_control(_VERB_GO_AWAY, encode_control(go_away))

    # -------------------------------------------------------------- deadlines

    def expire(self, now_ns: int) -> list[Event]:
        """Handler side: a :class:`DeadlineExpired` for each call whose deadline passed by
        ``now_ns`` and that is still unanswered, once per call."""
        heap = self._deadlines
        events: list[Event] = []
        channels = self._channels
        while heap and heap[0][0] <= now_ns:
            ch = heapq.heappop(heap)[2]
            if channels.get(ch.cid) is ch and ch.send_open:  # each call is pushed once
                events.append(DeadlineExpired(ch.cid))
        return events

    def next_deadline(self) -> int | None:
        """The earliest deadline :meth:`expire` will report, for arming a timer."""
        heap = self._deadlines
        channels = self._channels
        while heap:
            ch = heap[0][2]
            if channels.get(ch.cid) is ch and ch.send_open:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def _push_deadline(self, ch: _Channel, deadline: int) -> None:
        heap = self._deadlines
        # Entries of finished calls leave the heap only when they reach its top; rebuilding
        # when they dominate keeps the heap proportional to the calls in flight.
        if len(heap) > 2 * self._theirs_count + 64:
            channels = self._channels
            heap[:] = [e for e in heap if channels.get(e[2].cid) is e[2] and e[2].send_open]
            heapq.heapify(heap)
        self._deadline_seq += 1
        heapq.heappush(heap, (deadline, self._deadline_seq, ch))

    # ---------------------------------------------------------------- helpers

    def _check_usable(self) -> None:
        if self._closed:
            raise LocalProtocolError("the session was closed after a protocol error")

    def _channel(self, channel_id: int) -> _Channel:
        if self._closed:
            raise LocalProtocolError("the session was closed after a protocol error")
        ch = self._channels.get(channel_id)
        if ch is None:
            raise LocalProtocolError(f"channel {channel_id} is not open")
        return ch

    def _handler_channel(self, channel_id: int) -> _Channel:
        ch = self._channel(channel_id)
        if ch.ours:
            raise LocalProtocolError(
                f"channel {channel_id}: only the handler answers; the caller cancels"
            )
        if not ch.send_open:
            raise LocalProtocolError(f"channel {channel_id}: the call was already answered")
        return ch

    def _handler_terminal(self, ch: _Channel, flags: int, payload: Buffer, nbytes: int) -> None:
        self._queue(ch.cid, 0, flags, payload, nbytes)
        self._close_handler_side(ch)

    def _close_handler_side(self, ch: _Channel) -> None:
        ch.send_open = False
        if ch.recv == _CLOSED:
            self._free(ch)
        else:  # the caller may still be streaming: drop its frames until its direction ends
            ch.recv = _DRAIN

    def _end_call(self, ch: _Channel) -> None:
        """Caller side: the handler's terminal frame arrived."""
        if ch.send_open:  # the call is over: close our stream so the handler can free the id
            ch.send_open = False
            self._queue(ch.cid, 0, EOS, b"", 0)
        self._free(ch)

    def _free(self, ch: _Channel) -> None:
        del self._channels[ch.cid]
        if ch.ours:
            self._ours_count -= 1
        else:
            self._theirs_count -= 1

    def _queue_cancel(self, channel_id: int, reason: CancelReason) -> None:
        reason_number = int(CancelReason(reason))
        self._queue_control(
            _VERB_CANCEL, b"\x82" + _cbor_uint(channel_id) + _cbor_uint(reason_number)
        )

    def _queue(
        self,
        channel_id: int,
        method_id: int,
        flags: int,
        payload: Buffer,
        nbytes: int,
        deadline: int = DEADLINE_NONE,
    ) -> None:
        self._msg_id = msg_id = self._msg_id + 1
        desc = _new_tuple(
            Descriptor,
            (msg_id, channel_id, method_id, SLOT_INLINE, 0, 0, nbytes, flags, 0, deadline, _ZERO16),
        )
        self._outbox.append(_new_tuple(Frame, (desc, payload)))

    def _queue_control(self, verb: int, payload: bytes) -> None:
        self._queue(0, verb, CONTROL, payload, len(payload))
