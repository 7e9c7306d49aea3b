"""The sans-IO protocol core: descriptors, control messages, the codec and the Session.

Frames in, events out; time is passed in. Nothing here does I/O or imports an event loop, so
two Sessions can be joined in a test with no loop at all (ARCHITECTURE.md sections 3-4).
"""

from __future__ import annotations

from rapace.wire._codec import CodecLimits as CodecLimits
from rapace.wire._codec import Encoded as Encoded
from rapace.wire._codec import TypeCodec as TypeCodec
from rapace.wire._codec import codec_for as codec_for
from rapace.wire._codec_core import BufferPlacer as BufferPlacer
from rapace.wire._codec_core import BufferResolver as BufferResolver
from rapace.wire._codec_core import shared_bytes_tag as shared_bytes_tag
from rapace.wire._control import PROTOCOL_VERSION as PROTOCOL_VERSION
from rapace.wire._control import CallKind as CallKind
from rapace.wire._control import CancelChannel as CancelChannel
from rapace.wire._control import CancelReason as CancelReason
from rapace.wire._control import CloseChannel as CloseChannel
from rapace.wire._control import ControlMessage as ControlMessage
from rapace.wire._control import GoAway as GoAway
from rapace.wire._control import GoAwayReason as GoAwayReason
from rapace.wire._control import GrantCredits as GrantCredits
from rapace.wire._control import Hello as Hello
from rapace.wire._control import HelloLimits as HelloLimits
from rapace.wire._control import MethodEntry as MethodEntry
from rapace.wire._control import OpenChannel as OpenChannel
from rapace.wire._control import Ping as Ping
from rapace.wire._control import Pong as Pong
from rapace.wire._control import Role as Role
from rapace.wire._control import Verb as Verb
from rapace.wire._control import decode_control as decode_control
from rapace.wire._control import encode_control as encode_control
from rapace.wire._descriptor import DEADLINE_NONE as DEADLINE_NONE
from rapace.wire._descriptor import DESCRIPTOR_SIZE as DESCRIPTOR_SIZE
from rapace.wire._descriptor import INLINE_MAX as INLINE_MAX
from rapace.wire._descriptor import SLOT_INLINE as SLOT_INLINE
from rapace.wire._descriptor import Descriptor as Descriptor
from rapace.wire._descriptor import DescriptorLimits as DescriptorLimits
from rapace.wire._descriptor import Flags as Flags
from rapace.wire._descriptor import Frame as Frame
from rapace.wire._descriptor import decode_descriptor as decode_descriptor
from rapace.wire._descriptor import encode_descriptor as encode_descriptor
from rapace.wire._descriptor import validate_descriptor as validate_descriptor
from rapace.wire._error_payload import ErrorPayload as ErrorPayload
from rapace.wire._method_id import method_id as method_id
from rapace.wire._session import DEFAULT_LIMITS as DEFAULT_LIMITS
from rapace.wire._session import DeadlineMode as DeadlineMode
from rapace.wire._session import Session as Session
from rapace.wire._session_events import CallReceived as CallReceived
from rapace.wire._session_events import ChannelCancelled as ChannelCancelled
from rapace.wire._session_events import CreditAvailable as CreditAvailable
from rapace.wire._session_events import DeadlineExpired as DeadlineExpired
from rapace.wire._session_events import EndOfStream as EndOfStream
from rapace.wire._session_events import ErrorReceived as ErrorReceived
from rapace.wire._session_events import Event as Event
from rapace.wire._session_events import GoAwayReceived as GoAwayReceived
from rapace.wire._session_events import HandshakeComplete as HandshakeComplete
from rapace.wire._session_events import ItemReceived as ItemReceived
from rapace.wire._session_events import PayloadDropped as PayloadDropped
from rapace.wire._session_events import PongReceived as PongReceived
from rapace.wire._session_events import ResponseReceived as ResponseReceived
from rapace.wire._session_events import SessionStatistics as SessionStatistics

__all__ = (
    "DEADLINE_NONE",
    "DEFAULT_LIMITS",
    "DESCRIPTOR_SIZE",
    "INLINE_MAX",
    "PROTOCOL_VERSION",
    "SLOT_INLINE",
    "BufferPlacer",
    "BufferResolver",
    "CallKind",
    "CallReceived",
    "CancelChannel",
    "CancelReason",
    "ChannelCancelled",
    "CloseChannel",
    "CodecLimits",
    "ControlMessage",
    "CreditAvailable",
    "DeadlineExpired",
    "DeadlineMode",
    "Descriptor",
    "DescriptorLimits",
    "Encoded",
    "EndOfStream",
    "ErrorPayload",
    "ErrorReceived",
    "Event",
    "Flags",
    "Frame",
    "GoAway",
    "GoAwayReason",
    "GoAwayReceived",
    "GrantCredits",
    "HandshakeComplete",
    "Hello",
    "HelloLimits",
    "ItemReceived",
    "MethodEntry",
    "OpenChannel",
    "PayloadDropped",
    "Ping",
    "Pong",
    "PongReceived",
    "ResponseReceived",
    "Role",
    "Session",
    "SessionStatistics",
    "TypeCodec",
    "Verb",
    "codec_for",
    "decode_control",
    "decode_descriptor",
    "encode_control",
    "encode_descriptor",
    "method_id",
    "shared_bytes_tag",
    "validate_descriptor",
)
