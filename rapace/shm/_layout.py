"""The layout of one link segment, and the header that lets the attaching side check it.

One segment per host<->worker link (ARCHITECTURE.md section 5). Side A creates it, side B
attaches. Every region starts on a 64-byte cache line::

    0      header (256 bytes): magic, version, sizes, creator, link token, size classes
    256    control line of side A (64 bytes, written by A only)
    320    control line of side B (64 bytes, written by B only)
    384    descriptor ring A->B (64-byte descriptors)
           descriptor ring B->A
           return ring for A's slots (u64 entries, produced by B)
           return ring for B's slots (produced by A)
           data area of A (slots A sends in)
           data area of B

The attaching side never trusts stored offsets: it reads the few numbers that define the
layout (ring capacity, size classes), validates them, recomputes every offset, and checks the
recomputed total against the header and against the segment's real size.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from rapace.shm._ring import ring_size
from rapace.shm._slots import MAX_CLASSES, SizeClass, area_size, validate_classes
from rapace.wire import DESCRIPTOR_SIZE

__all__ = (
    "DEFAULT_CLASSES",
    "DEFAULT_RING_CAPACITY",
    "HEADER_SIZE",
    "MAX_BLOCKS_IN_FLIGHT",
    "ControlWord",
    "LinkLayout",
    "read_header",
    "write_header",
)

MAGIC: Final = b"RAPACESM"
VERSION: Final = 1
HEADER_SIZE: Final = 256
CONTROL_LINE: Final = 64
MAX_RING_CAPACITY: Final = 1 << 16
TOKEN_SIZE: Final = 8

#: Default descriptor ring capacity per direction (16 KiB of descriptors).
DEFAULT_RING_CAPACITY: Final = 256
#: Default size classes per side: 128 KiB + 512 KiB + 2 MiB, about 2.6 MiB per side and
#: 5.3 MiB per link. 512 KiB slots carry 256 KiB stream items with room for their framing.
DEFAULT_CLASSES: Final = (SizeClass(2048, 64), SizeClass(32768, 16), SizeClass(524288, 4))
#: One-off blocks (payloads larger than the largest slot) a side may have in flight.
MAX_BLOCKS_IN_FLIGHT: Final = 16

# magic, version, header size, total size, creator pid, ring capacity, creator start time,
# class count, reserved, link token; then MAX_CLASSES (slot_size, count) pairs.
_HEAD: Final = struct.Struct("<8sIIQIIQII8s")
_CLASS: Final = struct.Struct("<II")
_CLASSES_AT: Final = 64
assert _HEAD.size <= _CLASSES_AT
assert _CLASSES_AT + MAX_CLASSES * _CLASS.size <= HEADER_SIZE


class ControlWord:
    """Indices (in u64 words) of the fields of a side's control line."""

    PARKED = 0  # 1 while the side waits on its doorbell for frames
    SPACE_WANTED = 1  # 1 while the side waits for ring space or free slots
    CLOSED = 2  # 1 once the side has closed: nothing more will be published
    PID = 3
    ATTACHED = 4  # 1 once the side has mapped the segment
    AFFINITY = 5  # the side's allowed CPUs as a bit mask, to decide whether spinning pays


@dataclass(frozen=True, slots=True)
class LinkLayout:
    """Offsets of every region, computed from the ring capacity and the size classes."""

    ring_capacity: int
    classes: tuple[SizeClass, ...]
    control_a: int
    control_b: int
    ring_ab: int
    ring_ba: int
    returns_a: int
    returns_b: int
    return_capacity: int
    area_a: int
    area_b: int
    total_size: int

    @classmethod
    def compute(cls, ring_capacity: int, classes: Sequence[SizeClass]) -> LinkLayout:
        if not 0 < ring_capacity <= MAX_RING_CAPACITY:
            raise ValueError(f"ring capacity must be 1..{MAX_RING_CAPACITY}, not {ring_capacity}")
        validate_classes(classes)
        classes = tuple(SizeClass(*c) for c in classes)
        descriptor_ring = ring_size(ring_capacity, DESCRIPTOR_SIZE)
        # A return ring can hold every slot and block of its owner at once, so returning a
        # slot never waits.
        returnable = sum(c.slot_count for c in classes) + MAX_BLOCKS_IN_FLIGHT
        return_capacity = 1 << (returnable - 1).bit_length()
        return_ring = ring_size(return_capacity, 8)
        area = area_size(classes)
        control_a = HEADER_SIZE
        control_b = control_a + CONTROL_LINE
        ring_ab = control_b + CONTROL_LINE
        ring_ba = ring_ab + descriptor_ring
        returns_a = ring_ba + descriptor_ring
        returns_b = returns_a + return_ring
        area_a = returns_b + return_ring
        area_b = area_a + area
        return cls(
            ring_capacity=ring_capacity,
            classes=classes,
            control_a=control_a,
            control_b=control_b,
            ring_ab=ring_ab,
            ring_ba=ring_ba,
            returns_a=returns_a,
            returns_b=returns_b,
            return_capacity=return_capacity,
            area_a=area_a,
            area_b=area_b,
            total_size=area_b + area,
        )


@dataclass(frozen=True, slots=True)
class Header:
    layout: LinkLayout
    creator_pid: int
    creator_start: int
    token: str


def write_header(
    buffer: memoryview, layout: LinkLayout, *, creator_pid: int, creator_start: int, token: str
) -> None:
    """Write the header of a freshly created (still private) segment."""
    raw = token.encode("ascii")
    if len(raw) != TOKEN_SIZE:
        raise ValueError(f"link token must be {TOKEN_SIZE} ASCII characters")
    _HEAD.pack_into(
        buffer,
        0,
        MAGIC,
        VERSION,
        HEADER_SIZE,
        layout.total_size,
        creator_pid,
        layout.ring_capacity,
        creator_start,
        len(layout.classes),
        0,
        raw,
    )
    for i, (slot_size, count) in enumerate(layout.classes):
        _CLASS.pack_into(buffer, _CLASSES_AT + i * _CLASS.size, slot_size, count)


def read_header(buffer: memoryview) -> Header:
    """Read and validate a segment's header; recompute and check its layout.

    Raises:
        ValueError: not a rapace link segment, another version, or inconsistent sizes.
    """
    if buffer.nbytes < HEADER_SIZE:
        raise ValueError(f"segment of {buffer.nbytes} bytes is too small for a link header")
    (magic, version, header_size, total, pid, capacity, start, n_classes, _, token) = (
        _HEAD.unpack_from(buffer, 0)
    )
    if magic != MAGIC:
        raise ValueError(f"not a rapace link segment (magic {magic!r})")
    if version != VERSION:
        raise ValueError(f"link segment version {version}, this rapace speaks {VERSION}")
    if header_size != HEADER_SIZE:
        raise ValueError(f"link header size {header_size}, expected {HEADER_SIZE}")
    if not 0 < n_classes <= MAX_CLASSES:
        raise ValueError(f"link header names {n_classes} size classes")
    classes = [
        SizeClass(*_CLASS.unpack_from(buffer, _CLASSES_AT + i * _CLASS.size))
        for i in range(n_classes)
    ]
    layout = LinkLayout.compute(capacity, classes)  # raises ValueError on nonsense
    if layout.total_size != total:
        raise ValueError(f"link header says {total} bytes, its layout needs {layout.total_size}")
    if total > buffer.nbytes:
        raise ValueError(f"link segment holds {buffer.nbytes} bytes, its header says {total}")
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("link token is not ASCII") from None
    if not text.isalnum():
        raise ValueError(f"link token {text!r} is not alphanumeric")
    return Header(layout=layout, creator_pid=pid, creator_start=start, token=text)
