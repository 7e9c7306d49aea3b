"""Control messages: the payloads of channel 0.

Each message travels in a frame on channel 0 with the CONTROL flag; the descriptor's
``method_id`` is the verb, the payload a CBOR array of the message's fields in declaration
order (the Rust project used postcard; byte compatibility with it is not a goal, the verbs
and their fields are kept).

    verb  message        fields
       0  Hello          protocol_version, role, limits[3], methods[[id, name, sig]], params{}
       1  OpenChannel    channel_id, kind, initial_credits, metadata{}
       2  CloseChannel   channel_id, reason, message
       3  CancelChannel  channel_id, reason
       4  GrantCredits   channel_id, nbytes
       5  Ping           8 opaque bytes
       6  Pong           the 8 bytes of the Ping it answers
       7  GoAway         reason, last_channel_id, message

Verbs 8-99 are reserved (receiving one is a protocol error); verbs from 100 up are
extensions a peer may ignore.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeAlias

import cbor2
from typing_extensions import Buffer

from rapace._errors import RemoteProtocolError, Status

__all__ = (
    "OPENS_MINOR",
    "PROTOCOL_VERSION",
    "CallKind",
    "CancelChannel",
    "CancelReason",
    "CloseChannel",
    "ControlMessage",
    "GoAway",
    "GoAwayReason",
    "GrantCredits",
    "Hello",
    "HelloLimits",
    "MethodEntry",
    "OpenChannel",
    "Ping",
    "Pong",
    "Role",
    "Verb",
    "decode_control",
    "encode_control",
)

PROTOCOL_VERSION: Final = 0x0001_0001  # (major << 16) | minor
# The first minor version whose peers take a request that opens its own channel (OPENS).
OPENS_MINOR: Final = 1
FIRST_EXTENSION_VERB: Final = 100
_MAX_CONTROL_DEPTH: Final = 8
_MAX_NAME_BYTES: Final = 1024
_MAX_METHODS: Final = 65536
_MAX_PARAMS: Final = 128
_MAX_PARAM_VALUE_BYTES: Final = 64 * 1024
SIG_HASH_BYTES: Final = 32
PING_BYTES: Final = 8
U32_MAX: Final = 0xFFFF_FFFF


class Verb(enum.IntEnum):
    HELLO = 0
    OPEN_CHANNEL = 1
    CLOSE_CHANNEL = 2
    CANCEL_CHANNEL = 3
    GRANT_CREDITS = 4
    PING = 5
    PONG = 6
    GO_AWAY = 7


class Role(enum.IntEnum):
    """Who connected: the initiator opens odd channels, the acceptor even ones."""

    INITIATOR = 0
    ACCEPTOR = 1


class CallKind(enum.IntEnum):
    """The shape of the call a channel carries."""

    UNARY = 0
    SERVER_STREAMING = 1
    CLIENT_STREAMING = 2
    BIDI_STREAMING = 3

    @property
    def caller_streams(self) -> bool:
        return self in (CallKind.CLIENT_STREAMING, CallKind.BIDI_STREAMING)

    @property
    def handler_streams(self) -> bool:
        return self in (CallKind.SERVER_STREAMING, CallKind.BIDI_STREAMING)


class CancelReason(enum.IntEnum):
    CLIENT_CANCEL = 0
    DEADLINE_EXCEEDED = 1
    RESOURCE_EXHAUSTED = 2
    PROTOCOL_VIOLATION = 3
    UNAUTHENTICATED = 4
    PERMISSION_DENIED = 5

    @property
    def status(self) -> Status:
        return _CANCEL_STATUS[self]


_CANCEL_STATUS: Final = {
    CancelReason.CLIENT_CANCEL: Status.CANCELLED,
    CancelReason.DEADLINE_EXCEEDED: Status.DEADLINE_EXCEEDED,
    CancelReason.RESOURCE_EXHAUSTED: Status.RESOURCE_EXHAUSTED,
    CancelReason.PROTOCOL_VIOLATION: Status.INTERNAL,
    CancelReason.UNAUTHENTICATED: Status.UNAUTHENTICATED,
    CancelReason.PERMISSION_DENIED: Status.PERMISSION_DENIED,
}


class GoAwayReason(enum.IntEnum):
    SHUTDOWN = 0
    MAINTENANCE = 1
    OVERLOAD = 2
    PROTOCOL_ERROR = 3


@dataclass(frozen=True, slots=True)
class MethodEntry:
    """One row of the method table a peer announces in Hello.

    ``sig_hash`` identifies the method's signature; 32 zero bytes mean "unknown" and never
    count as a mismatch.
    """

    method_id: int
    name: str
    sig_hash: bytes = bytes(SIG_HASH_BYTES)


@dataclass(frozen=True, slots=True)
class HelloLimits:
    """What a peer is prepared to receive. The effective limit of a session is the smaller
    of the two peers' values."""

    max_payload_bytes: int = 256 * 1024 * 1024
    max_channels: int = 65536
    initial_window: int = 64 * 1024

    def merge(self, other: HelloLimits) -> HelloLimits:
        return HelloLimits(
            max_payload_bytes=min(self.max_payload_bytes, other.max_payload_bytes),
            max_channels=min(self.max_channels, other.max_channels),
            initial_window=min(self.initial_window, other.initial_window),
        )


@dataclass(frozen=True, slots=True)
class Hello:
    VERB: ClassVar[Verb] = Verb.HELLO
    role: Role
    limits: HelloLimits = HelloLimits()
    methods: tuple[MethodEntry, ...] = ()
    params: Mapping[str, bytes] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class OpenChannel:
    VERB: ClassVar[Verb] = Verb.OPEN_CHANNEL
    channel_id: int
    kind: CallKind
    initial_credits: int = 0
    metadata: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CloseChannel:
    VERB: ClassVar[Verb] = Verb.CLOSE_CHANNEL
    channel_id: int
    reason: int = 0  # 0 normal, 1 error (the message says which)
    message: str = ""


@dataclass(frozen=True, slots=True)
class CancelChannel:
    VERB: ClassVar[Verb] = Verb.CANCEL_CHANNEL
    channel_id: int
    reason: CancelReason = CancelReason.CLIENT_CANCEL


@dataclass(frozen=True, slots=True)
class GrantCredits:
    VERB: ClassVar[Verb] = Verb.GRANT_CREDITS
    channel_id: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Ping:
    VERB: ClassVar[Verb] = Verb.PING
    data: bytes = bytes(PING_BYTES)


@dataclass(frozen=True, slots=True)
class Pong:
    VERB: ClassVar[Verb] = Verb.PONG
    data: bytes = bytes(PING_BYTES)


@dataclass(frozen=True, slots=True)
class GoAway:
    VERB: ClassVar[Verb] = Verb.GO_AWAY
    reason: GoAwayReason = GoAwayReason.SHUTDOWN
    last_channel_id: int = 0
    message: str = ""


ControlMessage: TypeAlias = (
    Hello | OpenChannel | CloseChannel | CancelChannel | GrantCredits | Ping | Pong | GoAway
)


def encode_control(msg: ControlMessage) -> bytes:
    """The CBOR payload of ``msg``; its verb is ``msg.VERB``."""
    match msg:
        case OpenChannel(channel_id, kind, credits, metadata):
            fields: list[object] = [channel_id, int(kind), credits]
            if metadata:
                fields.append(dict(metadata))
        case GrantCredits(channel_id, nbytes):
            fields = [channel_id, nbytes]
        case CancelChannel(channel_id, reason):
            fields = [channel_id, int(reason)]
        case CloseChannel(channel_id, reason, message):
            fields = [channel_id, reason, message]
        case Ping(data) | Pong(data):
            fields = [data]
        case GoAway(reason, last_channel_id, message):
            fields = [int(reason), last_channel_id, message]
        case Hello(role, limits, methods, params, version):
            fields = [
                version,
                int(role),
                [limits.max_payload_bytes, limits.max_channels, limits.initial_window],
                [[m.method_id, m.name, m.sig_hash] for m in methods],
                dict(params),
            ]
    return cbor2.dumps(fields)


def decode_control(verb: int, payload: Buffer) -> ControlMessage | None:
    """Decode the payload of a channel-0 frame with verb ``verb``.

    Returns None for an extension verb (>= 100), which a peer may ignore.

    Raises:
        RemoteProtocolError: malformed payload, or a reserved verb (8-99).
    """
    if verb >= FIRST_EXTENSION_VERB:
        return None
    try:
        kind = Verb(verb)
    except ValueError:
        raise RemoteProtocolError(
            f"unknown control verb {verb}", status=Status.PROTOCOL_ERROR
        ) from None
    fields = _load_fields(kind, payload)
    try:
        return _DECODERS[kind](fields)
    except _Malformed as exc:
        raise RemoteProtocolError(
            f"malformed {kind.name} message: {exc}", status=Status.DECODE_ERROR
        ) from None


class _Malformed(Exception):
    pass


def _load_fields(verb: Verb, payload: Buffer) -> list[object]:
    try:
        value = cbor2.loads(
            payload,
            max_depth=_MAX_CONTROL_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,  # the spec makes duplicate metadata keys an error
        )
    except Exception as exc:  # cbor2 raises several types; all mean "malformed"
        raise RemoteProtocolError(
            f"undecodable {verb.name} payload: {exc}", status=Status.DECODE_ERROR
        ) from exc
    if not isinstance(value, list):
        raise RemoteProtocolError(
            f"{verb.name} payload is not an array", status=Status.DECODE_ERROR
        )
    return value


def _u32(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= U32_MAX:
        raise _Malformed(f"{what} must be an unsigned 32-bit integer, got {value!r:.40}")
    return value


def _uint(value: object, what: str) -> int:
    if type(value) is not int or value < 0 or value > 0xFFFF_FFFF_FFFF_FFFF:
        raise _Malformed(f"{what} must be an unsigned 64-bit integer, got {value!r:.40}")
    return value


def _text(value: object, what: str) -> str:
    if type(value) is not str or len(value) > _MAX_NAME_BYTES:
        raise _Malformed(f"{what} must be a string of at most {_MAX_NAME_BYTES} characters")
    return value


def _enum(cls: type[enum.IntEnum], value: object, what: str) -> int:
    number = _u32(value, what)
    try:
        return cls(number)
    except ValueError:
        raise _Malformed(f"unknown {what} {number}") from None


def _arity(fields: list[object], low: int, high: int) -> None:
    if not low <= len(fields) <= high:
        expected = str(low) if low == high else f"{low} to {high}"
        raise _Malformed(f"expected {expected} fields, got {len(fields)}")


def _metadata(value: object, what: str) -> dict[str, bytes]:
    if not isinstance(value, dict) or len(value) > _MAX_PARAMS:
        raise _Malformed(f"{what} must be a map of at most {_MAX_PARAMS} entries")
    out: dict[str, bytes] = {}
    for key, item in value.items():
        if type(key) is not str or len(key) > 256:
            raise _Malformed(f"{what} keys must be strings of at most 256 characters")
        if type(item) is not bytes or len(item) > _MAX_PARAM_VALUE_BYTES:
            raise _Malformed(f"{what}[{key!r}] must be bytes of at most {_MAX_PARAM_VALUE_BYTES}")
        out[key] = item
    return out


def _decode_hello(fields: list[object]) -> Hello:
    _arity(fields, 5, 5)
    version, role, limits, methods, params = fields
    if not isinstance(limits, list) or len(limits) != 3:
        raise _Malformed("limits must be an array of 3 integers")
    if not isinstance(methods, list) or len(methods) > _MAX_METHODS:
        raise _Malformed(f"methods must be an array of at most {_MAX_METHODS} entries")
    entries = []
    for row in methods:
        if not isinstance(row, list) or len(row) != 3:
            raise _Malformed("a method entry must be [id, name, sig_hash]")
        method_id, name, sig_hash = row
        if type(sig_hash) is not bytes or len(sig_hash) != SIG_HASH_BYTES:
            raise _Malformed(f"sig_hash must be {SIG_HASH_BYTES} bytes")
        entries.append(MethodEntry(_u32(method_id, "method id"), _text(name, "name"), sig_hash))
    return Hello(
        protocol_version=_u32(version, "protocol_version"),
        role=Role(_enum(Role, role, "role")),
        limits=HelloLimits(
            max_payload_bytes=_uint(limits[0], "max_payload_bytes"),
            max_channels=_u32(limits[1], "max_channels"),
            initial_window=_u32(limits[2], "initial_window"),
        ),
        methods=tuple(entries),
        params=_metadata(params, "params"),
    )


def _decode_open(fields: list[object]) -> OpenChannel:
    _arity(fields, 3, 4)
    metadata = _metadata(fields[3], "metadata") if len(fields) == 4 else {}
    return OpenChannel(
        channel_id=_u32(fields[0], "channel_id"),
        kind=CallKind(_enum(CallKind, fields[1], "call kind")),
        initial_credits=_u32(fields[2], "initial_credits"),
        metadata=metadata,
    )


def _decode_close(fields: list[object]) -> CloseChannel:
    _arity(fields, 3, 3)
    return CloseChannel(
        channel_id=_u32(fields[0], "channel_id"),
        reason=_u32(fields[1], "reason"),
        message=_text(fields[2], "message"),
    )


def _decode_cancel(fields: list[object]) -> CancelChannel:
    _arity(fields, 2, 2)
    return CancelChannel(
        channel_id=_u32(fields[0], "channel_id"),
        reason=CancelReason(_enum(CancelReason, fields[1], "cancel reason")),
    )


def _decode_grant(fields: list[object]) -> GrantCredits:
    _arity(fields, 2, 2)
    return GrantCredits(channel_id=_u32(fields[0], "channel_id"), nbytes=_u32(fields[1], "nbytes"))


def _ping_data(fields: list[object]) -> bytes:
    _arity(fields, 1, 1)
    data = fields[0]
    if type(data) is not bytes or len(data) != PING_BYTES:
        raise _Malformed(f"ping data must be {PING_BYTES} bytes")
    return data


def _decode_go_away(fields: list[object]) -> GoAway:
    _arity(fields, 3, 3)
    return GoAway(
        reason=GoAwayReason(_enum(GoAwayReason, fields[0], "go-away reason")),
        last_channel_id=_u32(fields[1], "last_channel_id"),
        message=_text(fields[2], "message"),
    )


_DECODERS: Final[dict[Verb, Callable[[list[object]], ControlMessage]]] = {
    Verb.HELLO: _decode_hello,
    Verb.OPEN_CHANNEL: _decode_open,
    Verb.CLOSE_CHANNEL: _decode_close,
    Verb.CANCEL_CHANNEL: _decode_cancel,
    Verb.GRANT_CREDITS: _decode_grant,
    Verb.PING: lambda fields: Ping(_ping_data(fields)),
    Verb.PONG: lambda fields: Pong(_ping_data(fields)),
    Verb.GO_AWAY: _decode_go_away,
}
