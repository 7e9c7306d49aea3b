"""Single-producer single-consumer rings of fixed-size entries in shared memory.

Python has no atomics and no fences, so the ring relies on two things only (ARCHITECTURE.md
section 5): every shared word has exactly one writing process, and x86-64 makes stores visible
to other cores in program order. The producer writes an entry, then publishes ``head``; the
consumer reads entries up to ``head``, then publishes ``tail``. Each index is a free-running
u64 on its own 64-byte cache line, stored and loaded as one aligned 8-byte word through
``memoryview.cast("Q")`` (``struct.pack_into`` writes byte by byte and could tear).

Neither side ever reads its own index back from shared memory: each keeps a private copy, so
a peer that scribbles on the segment cannot make this side reuse an entry it has not finished
with. Every index read from the peer is checked against what is possible (``tail <= head <=
tail + capacity``, and never moving backwards); anything else is the peer's protocol error.

Layout of one ring at ``offset`` (64-byte aligned)::

    +0    u64 head     written by the producer only
    +64   u64 tail     written by the consumer only
    +128  capacity * entry_size bytes of entries
"""

from __future__ import annotations

from typing import Final

from rapace._errors import RemoteProtocolError, Status

__all__ = ("RING_HEADER_SIZE", "RingReader", "RingWriter", "ring_size")

CACHE_LINE: Final = 64
RING_HEADER_SIZE: Final = 2 * CACHE_LINE
_HEAD: Final = 0
_TAIL: Final = CACHE_LINE


def ring_size(capacity: int, entry_size: int) -> int:
    """Bytes one ring occupies, rounded up to a cache line."""
    if capacity <= 0 or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two, not {capacity}")
    if entry_size <= 0 or entry_size % 8:
        raise ValueError(f"ring entry size must be a positive multiple of 8, not {entry_size}")
    body = capacity * entry_size
    return RING_HEADER_SIZE + (body + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE


class _Ring:
    __slots__ = (
        "_entries",
        "_head_word",
        "_mask",
        "_tail_word",
        "_words",
        "capacity",
        "entry_size",
    )

    def __init__(self, words: memoryview, offset: int, capacity: int, entry_size: int) -> None:
        """``words`` is the whole segment cast to ``"Q"``; ``offset`` is in bytes."""
        ring_size(capacity, entry_size)  # validates the shape
        if offset % CACHE_LINE:
            raise ValueError(f"ring offset {offset} is not cache-line aligned")
        end = offset + RING_HEADER_SIZE + capacity * entry_size
        if end > words.nbytes:
            raise ValueError(f"ring at {offset} of {end - offset} bytes overruns the segment")
        self._words = words
        self._head_word = (offset + _HEAD) // 8
        self._tail_word = (offset + _TAIL) // 8
        self._entries = offset + RING_HEADER_SIZE
        self._mask = capacity - 1
        self.capacity = capacity
        self.entry_size = entry_size

    def entry_offset(self, index: int) -> int:
        """Byte offset in the segment of the entry at free-running ``index``."""
        return self._entries + (index & self._mask) * self.entry_size


class RingWriter(_Ring):
    """The producer's end: write entries at :meth:`entry_offset` of ``head + k``, then
    :meth:`publish` them."""

    __slots__ = ("_tail", "head")

    def __init__(self, words: memoryview, offset: int, capacity: int, entry_size: int) -> None:
        super().__init__(words, offset, capacity, entry_size)
        self.head = 0  # private: the published head is never read back
        self._tail = 0  # last tail seen from the consumer

    def space(self) -> int:
        """Entries that can be written now; re-reads the consumer's tail only when needed."""
        free = self.capacity - (self.head - self._tail)
        if free:
            return free
        return self.refresh()

    def refresh(self) -> int:
        """Re-read the consumer's tail and return the free entries."""
        tail = self._words[self._tail_word]
        if not self._tail <= tail <= self.head:
            raise RemoteProtocolError(
                f"ring tail moved to {tail}, outside [{self._tail}, {self.head}]",
                status=Status.PROTOCOL_ERROR,
            )
        self._tail = tail
        return self.capacity - (self.head - tail)

    def publish(self, count: int) -> None:
        """Make ``count`` written entries visible: one aligned 8-byte store."""
        self.head += count
        self._words[self._head_word] = self.head

    @property
    def in_flight(self) -> int:
        """Entries published and not yet known to be consumed."""
        return self.head - self._tail


class RingReader(_Ring):
    """The consumer's end: :meth:`available` entries at :meth:`entry_offset` of
    ``tail + k``, then :meth:`consume` them."""

    __slots__ = ("_head", "tail")

    def __init__(self, words: memoryview, offset: int, capacity: int, entry_size: int) -> None:
        super().__init__(words, offset, capacity, entry_size)
        self.tail = 0  # private: the published tail is never read back
        self._head = 0  # last head seen from the producer

    def available(self) -> int:
        """Entries published and not yet consumed; validates the producer's head."""
        head = self._words[self._head_word]
        if head == self._head:
            return head - self.tail
        if not self._head <= head <= self.tail + self.capacity:
            raise RemoteProtocolError(
                f"ring head moved to {head}, outside [{self._head}, {self.tail + self.capacity}]",
                status=Status.PROTOCOL_ERROR,
            )
        self._head = head
        return head - self.tail

    def consume(self, count: int) -> None:
        """Hand ``count`` read entries back to the producer: one aligned 8-byte store."""
        if count > self._head - self.tail:
            raise ValueError(f"cannot consume {count} entries, {self._head - self.tail} seen")
        self.tail += count
        self._words[self._tail_word] = self.tail
