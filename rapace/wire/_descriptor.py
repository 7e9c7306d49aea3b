"""The 64-byte frame descriptor, its flags, and the Frame value type.

Layout (little-endian, ``struct "<QIIIIIIIIQ16s"``, no padding)::

    off size field               meaning
      0    8 msg_id              per-sender counter from 1
      8    4 channel_id          0 control; odd opened by the initiator, even by the acceptor
     12    4 method_id           call request: method id; channel 0: control verb; else 0
     16    4 payload_slot        0xFFFFFFFF inline; otherwise a transport-defined slot reference
     20    4 payload_generation  slot generation (stale-reference check); 0 when inline
     24    4 payload_offset      offset in the slot; 0 when inline
     28    4 payload_len         payload bytes
     32    4 flags               see Flags
     36    4 credit_grant        bytes of credit, meaningful only with Flags.CREDITS
     40    8 deadline_ns         see below; all-ones = no deadline
     48   16 inline_payload      the payload when payload_len <= 16, zero padded

``deadline_ns`` is an absolute ``time.monotonic_ns()`` on shared memory (one clock per host) and
the remaining nanoseconds on sockets (re-based by the receiver). The descriptor does not care
which: it only carries the number.

A descriptor is a NamedTuple because unpacking one is on every frame's path: ``_make`` over
``struct.unpack_from`` is several times cheaper than building a frozen dataclass.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

from typing_extensions import Buffer

from rapace._errors import RemoteProtocolError, Status

__all__ = (
    "DEADLINE_NONE",
    "DESCRIPTOR_SIZE",
    "INLINE_MAX",
    "SLOT_INLINE",
    "Descriptor",
    "DescriptorLimits",
    "Flags",
    "Frame",
    "decode_descriptor",
    "encode_descriptor",
    "validate_descriptor",
)

DESCRIPTOR_SIZE: Final = 64
INLINE_MAX: Final = 16
SLOT_INLINE: Final = 0xFFFF_FFFF
# Never used as a slot reference, so a transport can use it as "no slot" without ambiguity.
SLOT_RESERVED: Final = 0xFFFF_FFFE
DEADLINE_NONE: Final = 0xFFFF_FFFF_FFFF_FFFF
U32_MAX: Final = 0xFFFF_FFFF

_STRUCT: Final = struct.Struct("<QIIIIIIIIQ16s")
assert _STRUCT.size == DESCRIPTOR_SIZE
_pack = _STRUCT.pack
_pack_into = _STRUCT.pack_into
_unpack_from = _STRUCT.unpack_from
_ZERO16: Final = bytes(16)


class Flags(enum.IntFlag):
    """Descriptor flag bits. 0x08 and 0x80 are reserved and must be sent clear."""

    NONE = 0
    DATA = 0x001
    CONTROL = 0x002
    EOS = 0x004
    ERROR = 0x010
    HIGH_PRIORITY = 0x020
    CREDITS = 0x040
    NO_REPLY = 0x100
    RESPONSE = 0x200
    OPENS = 0x400


# Plain ints for the hot path: IntFlag arithmetic builds enum members on every operation.
DATA: Final = 0x001
CONTROL: Final = 0x002
EOS: Final = 0x004
ERROR: Final = 0x010
HIGH_PRIORITY: Final = 0x020
CREDITS: Final = 0x040
NO_REPLY: Final = 0x100
RESPONSE: Final = 0x200
# A unary request that opens its own channel: OpenChannel(kind unary, the effective window,
# no metadata) is implied, which saves a frame per call (protocol 1.1, see docs/protocol.md).
OPENS: Final = 0x400
RESERVED_FLAGS: Final = 0x008 | 0x080
KNOWN_FLAGS: Final = (
    DATA | CONTROL | EOS | ERROR | HIGH_PRIORITY | CREDITS | NO_REPLY | RESPONSE | OPENS
)


class Descriptor(NamedTuple):
    """One decoded descriptor. Field meanings are in the module docstring."""

    msg_id: int = 0
    channel_id: int = 0
    method_id: int = 0
    payload_slot: int = SLOT_INLINE
    payload_generation: int = 0
    payload_offset: int = 0
    payload_len: int = 0
    flags: int = 0
    credit_grant: int = 0
    deadline_ns: int = DEADLINE_NONE
    inline_payload: bytes = _ZERO16

    @property
    def is_inline(self) -> bool:
        return self.payload_slot == SLOT_INLINE

    @property
    def has_deadline(self) -> bool:
        return self.deadline_ns != DEADLINE_NONE


@dataclass(frozen=True, slots=True)
class DescriptorLimits:
    """Bounds a received descriptor must satisfy. ``slot_count``/``slot_size`` of 0 mean the
    transport has no slots (stream transports), so every payload must be inline or follow
    the descriptor."""

    max_payload_len: int = U32_MAX
    max_channel_id: int = U32_MAX
    slot_count: int = 0
    slot_size: int = 0


DEFAULT_DESCRIPTOR_LIMITS: Final = DescriptorLimits()


class Frame(NamedTuple):
    """A descriptor and its payload, the unit every transport moves.

    ``payload`` is the whole payload whether it travelled inline or not; transports fill the
    descriptor's slot fields and inline area when they place it.
    """

    descriptor: Descriptor
    payload: Buffer = b""


def encode_descriptor(desc: Descriptor, payload: Buffer = b"") -> bytes:
    """Pack ``desc`` into 64 bytes, putting ``payload`` in the inline area when it fits.

    ``payload_len`` is taken from ``payload`` when the payload is given, so a caller cannot
    publish a length that disagrees with the bytes.
    """
    if type(payload) is bytes:  # the usual case: no memoryview needed
        n = len(payload)
        view: Buffer = payload
    else:
        view = memoryview(payload).cast("B")
        n = view.nbytes
    if n <= INLINE_MAX:
        inline = bytes(view) if n else _ZERO16
        return _pack(
            desc.msg_id,
            desc.channel_id,
            desc.method_id,
            SLOT_INLINE,
            0,
            0,
            n,
            desc.flags,
            desc.credit_grant,
            desc.deadline_ns,
            inline,
        )
    # A payload that does not fit inline must not keep the inline sentinel; stream
    # transports, which have no slots, send slot 0 ("the bytes follow the descriptor").
    slot = desc.payload_slot if desc.payload_slot != SLOT_INLINE else 0
    return _pack(
        desc.msg_id,
        desc.channel_id,
        desc.method_id,
        slot,
        desc.payload_generation,
        desc.payload_offset,
        n,
        desc.flags,
        desc.credit_grant,
        desc.deadline_ns,
        _ZERO16,
    )


def encode_descriptor_into(desc: Descriptor, buffer: Buffer, offset: int = 0) -> None:
    """Pack an already complete descriptor (inline area and length filled) into ``buffer``.

    Only for private memory: ``struct.pack_into`` writes byte by byte, which is fine for a
    descriptor slot that is published afterwards but never for a shared index word.
    """
    _pack_into(buffer, offset, *desc)


def decode_descriptor(
    data: Buffer, offset: int = 0, limits: DescriptorLimits = DEFAULT_DESCRIPTOR_LIMITS
) -> Descriptor:
    """Unpack and validate a descriptor read from a peer.

    Raises:
        RemoteProtocolError: ``data`` is too short or a field breaks a rule.
    """
    size = len(data) if type(data) is bytes else memoryview(data).nbytes
    if offset < 0 or size - offset < DESCRIPTOR_SIZE:
        raise RemoteProtocolError(
            f"descriptor needs {DESCRIPTOR_SIZE} bytes at offset {offset}, buffer has {size}",
            status=Status.INVALID_FRAME,
        )
    desc = _new_descriptor(Descriptor, _unpack_from(data, offset))
    if not _plainly_valid(desc, limits):
        validate_descriptor(desc, limits)
    return desc


# Zero tails of the inline area by payload length, to check padding without allocating.
_ZERO_TAILS: Final = tuple(bytes(INLINE_MAX - n) for n in range(INLINE_MAX + 1))
_new_descriptor = tuple.__new__  # NamedTuple._make without its per-call wrapper


def _plainly_valid(desc: Descriptor, limits: DescriptorLimits) -> bool:
    """True when ``desc`` is an ordinary inline frame that breaks no rule.

    Strictly narrower than the rules in _find_problem: anything it does not vouch for goes
    through the full check, which also names the problem.
    """
    (msg_id, channel_id, _, slot, generation, offset, length, flags, credit, _, inline) = desc
    return (
        slot == SLOT_INLINE
        and length <= INLINE_MAX
        and not (generation or offset or flags & RESERVED_FLAGS or msg_id == 0)
        and length <= limits.max_payload_len
        and channel_id <= limits.max_channel_id
        and (credit == 0 or flags & CREDITS != 0)
        and inline.endswith(_ZERO_TAILS[length])
        and (
            flags & CONTROL != 0
            if channel_id == 0
            else flags & CONTROL == 0
            and flags & (EOS | DATA | CREDITS) != 0
            and (length == 0 or flags & DATA != 0)
        )
    )


def validate_descriptor(
    desc: Descriptor, limits: DescriptorLimits = DEFAULT_DESCRIPTOR_LIMITS
) -> None:
    """Check every field of ``desc`` against the protocol rules and ``limits``.

    Raises:
        RemoteProtocolError: with ``status`` INVALID_FRAME naming the broken rule.
    """
    problem = _find_problem(desc, limits)
    if problem is not None:
        raise RemoteProtocolError(f"invalid descriptor: {problem}", status=Status.INVALID_FRAME)


def _find_problem(desc: Descriptor, limits: DescriptorLimits) -> str | None:
    flags = desc.flags
    if flags & RESERVED_FLAGS:
        return f"reserved flag bits set (flags=0x{flags:x})"
    if desc.payload_len > limits.max_payload_len:
        return f"payload_len {desc.payload_len} exceeds the limit {limits.max_payload_len}"
    if desc.channel_id > limits.max_channel_id:
        return f"channel_id {desc.channel_id} exceeds the limit {limits.max_channel_id}"
    if desc.msg_id == 0:
        return "msg_id 0 (msg ids start at 1)"
    is_control_channel = desc.channel_id == 0
    if bool(flags & CONTROL) != is_control_channel:
        return "CONTROL flag must be set on channel 0 and only there"
    if flags & CREDITS == 0 and desc.credit_grant != 0:
        return "credit_grant without the CREDITS flag"
    if desc.payload_slot == SLOT_INLINE:
        if desc.payload_len > INLINE_MAX:
            return f"inline payload of {desc.payload_len} bytes (at most {INLINE_MAX})"
        if desc.payload_generation or desc.payload_offset:
            return "inline payload with a slot generation or offset"
        if any(desc.inline_payload[desc.payload_len :]):
            return "inline area not zero past payload_len"
    else:
        if desc.payload_slot == SLOT_RESERVED:
            return "reserved slot reference 0xFFFFFFFE"
        if limits.slot_count:
            if desc.payload_slot >= limits.slot_count:
                return f"slot {desc.payload_slot} out of range (slot_count {limits.slot_count})"
            if desc.payload_offset + desc.payload_len > limits.slot_size:
                return (
                    f"payload offset {desc.payload_offset} + len {desc.payload_len} "
                    f"overruns the slot size {limits.slot_size}"
                )
    if flags & (EOS | DATA | CREDITS) == 0 and not is_control_channel:
        return "frame carries neither DATA, EOS nor CREDITS"
    if flags & DATA == 0 and desc.payload_len and not is_control_channel:
        return "payload without the DATA flag"
    return None
