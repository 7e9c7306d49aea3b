"""The events a :class:`~rapace.wire._session.Session` reports for received frames.

Each event is a small frozen value. ``channel_id`` always names the channel the event is about;
on the handler side that is the id the caller chose, on the caller side the id
:meth:`Session.open_call` returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from typing_extensions import Buffer

from rapace.wire._control import CallKind, CancelReason, GoAway, Hello, HelloLimits

__all__ = (
    "CallReceived",
    "ChannelCancelled",
    "CreditAvailable",
    "DeadlineExpired",
    "EndOfStream",
    "ErrorReceived",
    "Event",
    "GoAwayReceived",
    "HandshakeComplete",
    "ItemReceived",
    "PongReceived",
    "ResponseReceived",
    "SessionStatistics",
)


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """The peer's Hello arrived and was accepted; calls may be opened from now on.

    ``limits`` are the effective limits of the session (the smaller of both peers' values).
    """

    peer: Hello
    limits: HelloLimits


@dataclass(frozen=True, slots=True)
class CallReceived:
    """Handler side: the peer opened a call.

    ``deadline_ns`` is on this side's clock (already re-based in relative mode), None when the
    call has none. For unary and server-streaming calls the request is the caller's whole
    direction; for client-streaming and bidi calls items and an :class:`EndOfStream` follow.
    """

    channel_id: int
    method_id: int
    kind: CallKind
    payload: Buffer
    deadline_ns: int | None
    metadata: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class ItemReceived:
    """A stream item from the peer. Report its size with :meth:`Session.consumed` once the
    application has taken it, or the peer runs out of credit."""

    channel_id: int
    payload: Buffer


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """The peer finished its streaming direction of the channel.

    On the caller side this ends the call (the handler's lone EOS is its terminal frame).
    """

    channel_id: int


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Caller side: the result of a unary or client-streaming call. Ends the call."""

    channel_id: int
    payload: Buffer


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """Caller side: the handler failed the call; ``payload`` is the encoded error. Ends the
    call."""

    channel_id: int
    payload: Buffer


@dataclass(frozen=True, slots=True)
class ChannelCancelled:
    """The peer cancelled the channel.

    Handler side: the caller gave up; finish with a terminal frame (:meth:`Session.send_error`
    is usual), items sent meanwhile are dropped. Caller side: the handler refused or aborted the
    call (``reason.status`` says why); the call is over.
    """

    channel_id: int
    reason: CancelReason


@dataclass(frozen=True, slots=True)
class CreditAvailable:
    """Send credit on the channel became positive again after it had run out."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class DeadlineExpired:
    """Handler side, from :meth:`Session.expire`: the call's deadline passed before the handler
    sent its terminal frame. Reported once per call."""

    channel_id: int


@dataclass(frozen=True, slots=True)
class PongReceived:
    """The peer answered a Ping; ``data`` are the 8 bytes of that Ping."""

    data: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer is shutting down: new calls are refused, calls in flight continue."""

    go_away: GoAway


@dataclass(frozen=True, slots=True)
class PayloadDropped:
    """A payload arrived for a call that no longer wants it (cancelled, or draining) and was
    dropped. Only a transport whose payloads reference other memory (shared-memory blocks)
    needs to look at it, to give that memory back."""

    channel_id: int
    payload: Buffer


Event: TypeAlias = (
    HandshakeComplete
    | CallReceived
    | ItemReceived
    | EndOfStream
    | ResponseReceived
    | ErrorReceived
    | ChannelCancelled
    | CreditAvailable
    | DeadlineExpired
    | PongReceived
    | GoAwayReceived
    | PayloadDropped
)


class SessionStatistics(NamedTuple):
    """Counters of one session. ``open_channels`` counts every channel whose state is still
    kept, including calls that are being drained after a cancel or refusal."""

    open_channels: int
    frames_sent: int
    frames_received: int
