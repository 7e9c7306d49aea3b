"""Owner-frees slot areas: where payloads too large for a descriptor travel.

Each side of a link owns one data area and allocates only from it; the free lists, private
generations and in-flight marks live in the owner's process memory, so nothing another process
writes can corrupt them. The shared part of an area is a meta word per slot, written only by
the owner, that lets the receiver check a reference before reading a byte:

    meta word (u64) = generation << 32 | state        state: 0 free, 1 in flight

A reference in a descriptor is ``payload_slot = class << 24 | index`` plus
``payload_generation``. The receiver validates class, index, length, generation and state
(:class:`SlotReader`), copies or maps the bytes, and hands the reference back to the owner
(a return ring, see ``_link``); the owner checks it again (:meth:`SlotAllocator.release`)
before reusing the slot, so a peer returning a slot twice, or one it never got, is a protocol
error rather than two senders writing one slot.

Sizes come in classes (slot size x count). The smallest class that fits is tried first, then
larger ones, so a burst of small payloads borrows big slots rather than waiting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, NamedTuple

from rapace._errors import RemoteProtocolError, Status

__all__ = (
    "CLASS_SHIFT",
    "MAX_CLASSES",
    "SizeClass",
    "SlotAllocator",
    "SlotReader",
    "area_size",
    "validate_classes",
)

CLASS_SHIFT: Final = 24
INDEX_MASK: Final = (1 << CLASS_SHIFT) - 1
MAX_CLASSES: Final = 16
STATE_FREE: Final = 0
STATE_IN_FLIGHT: Final = 1
_ALIGN: Final = 64


class SizeClass(NamedTuple):
    slot_size: int
    slot_count: int


def validate_classes(classes: Sequence[SizeClass]) -> None:
    """Raise ValueError unless ``classes`` is a usable, ascending list of size classes."""
    if not 0 < len(classes) <= MAX_CLASSES:
        raise ValueError(f"an area needs 1 to {MAX_CLASSES} size classes, not {len(classes)}")
    previous = 0
    for slot_size, count in classes:
        if slot_size <= previous or slot_size % _ALIGN:
            raise ValueError(
                f"slot sizes must ascend in multiples of {_ALIGN} bytes: {list(classes)}"
            )
        if not 0 < count <= INDEX_MASK + 1:
            raise ValueError(f"slot count {count} out of range 1..{INDEX_MASK + 1}")
        previous = slot_size


def _meta_bytes(classes: Sequence[SizeClass]) -> int:
    return _round_up(8 * sum(c.slot_count for c in classes))


def area_size(classes: Sequence[SizeClass]) -> int:
    """Bytes one area occupies: the meta words, then each class's slots."""
    return _meta_bytes(classes) + sum(c.slot_size * c.slot_count for c in classes)


def _round_up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class _Area:
    __slots__ = ("_classes", "_data_offsets", "_first_meta", "_meta_base", "_words")

    def __init__(self, words: memoryview, offset: int, classes: Sequence[SizeClass]) -> None:
        validate_classes(classes)
        if offset % _ALIGN or offset + area_size(classes) > words.nbytes:
            raise ValueError(f"slot area at {offset} does not fit the segment")
        self._words = words
        self._classes = tuple(SizeClass(*c) for c in classes)
        self._meta_base = offset // 8
        first_meta = []
        data_offsets = []
        meta_index = 0
        data = offset + _meta_bytes(classes)
        for slot_size, count in self._classes:
            first_meta.append(meta_index)
            data_offsets.append(data)
            meta_index += count
            data += slot_size * count
        self._first_meta = tuple(first_meta)
        self._data_offsets = tuple(data_offsets)

    @property
    def classes(self) -> tuple[SizeClass, ...]:
        return self._classes

    @property
    def max_payload(self) -> int:
        return self._classes[-1].slot_size


class SlotAllocator(_Area):
    """The owner's view of its area: allocate, publish, and take back slots."""

    __slots__ = ("_free", "_generation", "_in_flight")

    def __init__(self, words: memoryview, offset: int, classes: Sequence[SizeClass]) -> None:
        super().__init__(words, offset, classes)
        # LIFO free lists: the most recently returned slot is the one still in cache.
        self._free = [list(range(count - 1, -1, -1)) for _, count in self._classes]
        self._generation = [[0] * count for _, count in self._classes]
        self._in_flight = [bytearray(count) for _, count in self._classes]
        for index in range(sum(c.slot_count for c in self._classes)):
            words[self._meta_base + index] = STATE_FREE

    def allocate(self, nbytes: int) -> tuple[int, int, int] | None:
        """Take a slot for ``nbytes``: ``(reference, generation, data offset)``, or None when
        every class that could hold it is empty. The slot is not yet visible to the peer."""
        for cls, (slot_size, _) in enumerate(self._classes):
            if slot_size >= nbytes and self._free[cls]:
                index = self._free[cls].pop()
                generation = (self._generation[cls][index] + 1) & 0xFFFF_FFFF
                self._generation[cls][index] = generation
                return (
                    cls << CLASS_SHIFT | index,
                    generation,
                    self._data_offsets[cls] + index * slot_size,
                )
        return None

    def can_allocate(self, nbytes: int) -> bool:
        """Whether :meth:`allocate` would find a slot for ``nbytes`` now."""
        return any(
            slot_size >= nbytes and free
            for (slot_size, _), free in zip(self._classes, self._free, strict=True)
        )

    def publish(self, reference: int, generation: int) -> None:
        """Mark an allocated slot in flight; call before the descriptor naming it is published."""
        cls, index = reference >> CLASS_SHIFT, reference & INDEX_MASK
        self._in_flight[cls][index] = 1
        self._words[self._meta_base + self._first_meta[cls] + index] = (
            generation << 32 | STATE_IN_FLIGHT
        )

    def abandon(self, reference: int) -> None:
        """Return a slot that was allocated but never published."""
        cls, index = reference >> CLASS_SHIFT, reference & INDEX_MASK
        self._free[cls].append(index)

    def release(self, reference: int, generation: int) -> None:
        """Take back a slot the peer has finished with, after checking the peer's claim.

        Raises:
            RemoteProtocolError: the reference is out of range, not in flight, or stale.
        """
        cls, index = reference >> CLASS_SHIFT, reference & INDEX_MASK
        if cls >= len(self._classes) or index >= self._classes[cls].slot_count:
            raise RemoteProtocolError(
                f"returned slot reference 0x{reference:08x} is out of range",
                status=Status.PROTOCOL_ERROR,
            )
        if not self._in_flight[cls][index] or self._generation[cls][index] != generation:
            raise RemoteProtocolError(
                f"slot 0x{reference:08x} generation {generation} returned but not in flight "
                "(a double or stale return)",
                status=Status.PROTOCOL_ERROR,
            )
        self._in_flight[cls][index] = 0
        self._words[self._meta_base + self._first_meta[cls] + index] = generation << 32 | STATE_FREE
        self._free[cls].append(index)

    def reclaim_all(self) -> int:
        """Take back every slot in flight (the peer is gone); returns how many."""
        reclaimed = 0
        for cls, flags in enumerate(self._in_flight):
            for index, in_flight in enumerate(flags):
                if in_flight:
                    self.release(cls << CLASS_SHIFT | index, self._generation[cls][index])
                    reclaimed += 1
        return reclaimed

    @property
    def free_slots(self) -> int:
        return sum(len(free) for free in self._free)

    @property
    def slots_in_flight(self) -> int:
        return sum(sum(flags) for flags in self._in_flight)


class SlotReader(_Area):
    """The receiver's view of the peer's area: check a reference before touching its bytes."""

    __slots__ = ()

    def locate(self, reference: int, generation: int, nbytes: int) -> int:
        """The byte offset of a valid in-flight slot holding ``nbytes``.

        Raises:
            RemoteProtocolError: out of range, too long, stale or not in flight.
        """
        cls, index = reference >> CLASS_SHIFT, reference & INDEX_MASK
        if cls >= len(self._classes) or index >= self._classes[cls].slot_count:
            raise RemoteProtocolError(
                f"slot reference 0x{reference:08x} is out of range", status=Status.INVALID_FRAME
            )
        slot_size = self._classes[cls].slot_size
        if nbytes > slot_size:
            raise RemoteProtocolError(
                f"payload of {nbytes} bytes overruns slot 0x{reference:08x} ({slot_size} bytes)",
                status=Status.INVALID_FRAME,
            )
        meta = self._words[self._meta_base + self._first_meta[cls] + index]
        if meta != (generation << 32 | STATE_IN_FLIGHT):
            raise RemoteProtocolError(
                f"slot 0x{reference:08x} generation {generation} is stale or not in flight "
                f"(meta 0x{meta:016x})",
                status=Status.INVALID_FRAME,
            )
        return self._data_offsets[cls] + index * slot_size
