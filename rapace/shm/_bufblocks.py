"""Buffer blocks: large buffers copied once into shared memory and read in place.

A bytes-like value or array of at least the link's copy threshold is not copied into the
CBOR payload: the sender copies it once into a block of its own (a segment named from its
pid, the link token, its side and the block number) and the payload references the block
by ``[number, generation]``. The receiver maps the block, checks it, and hands out a
read-only view under a lease (:mod:`rapace.shm._lease`); when the last view dies the block
goes back to its owner through the return ring, like a slot.

Nothing pins the sender: a receiver may keep thousands of views; the owner just makes more
blocks. Returned blocks are kept (mapped, pages already faulted in, on both sides) for the
next large buffer, up to :data:`CACHE_BYTES` per side; others are removed. A removed block's
header is marked dead first, so the receiver drops its mapping the next time it looks.

Every mapping costs a file descriptor (Python's mmap keeps a duplicate of the fd until 3.13's
``trackfd``), which is why lent, kept and mapped blocks are all counted and bounded: at most
about 50 per side of a link.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from collections import deque
from collections.abc import Callable
from typing import Final

from rapace._errors import RemoteProtocolError, Status
from rapace.shm._cleanup import process_start_time
from rapace.shm._lease import make_lease, view_of
from rapace.shm._segment import Segment, remove_mapped, segment_name
from rapace.shm._slots import CLASS_SHIFT, INDEX_MASK

__all__ = ("BUFFER_CLASS", "DATA_AT", "BufferBlocks", "OwnBlock", "PeerBufferBlocks")

#: The class number of a return-ring reference that names a buffer block.
BUFFER_CLASS: Final = 0x7E
#: Returned blocks each side keeps for reuse: at most this many bytes and blocks.
CACHE_BYTES: Final = 128 << 20
CACHE_ENTRIES: Final = 8
#: Blocks lent to the peer at once, at most (one larger than the byte limit is allowed when
#: it is the only one). Past this a large buffer goes in the payload instead: a receiver
#: that keeps thousands of views, or a stream the consumer is slow to read (flow control
#: counts payload bytes, not the blocks they reference), costs bounded shared memory.
MAX_IN_FLIGHT: Final = 16
MAX_IN_FLIGHT_BYTES: Final = 256 << 20
#: Mappings of the peer's blocks a receiver keeps while no view needs them.
PEER_CACHE_ENTRIES: Final = 8
MIN_CAPACITY: Final = 64 << 10

_MAGIC: Final = b"RAPACEBF"
# magic, payload length, generation (DEAD once removed), the owner's start time (for sweeps)
_HEADER: Final = struct.Struct("<8sQIQ")
_GENERATION_AT: Final = 16
_DEAD: Final = 0xFFFF_FFFF
DATA_AT: Final = 64


def _name(owner_pid: int, token: str, side: str, number: int) -> str:
    # "x" is not a hex digit: these names never collide with one-off payload blocks.
    return segment_name(owner_pid, f"{token}{side}x{number:x}")


def _capacity_for(nbytes: int) -> int:
    return max(MIN_CAPACITY, 1 << (nbytes - 1).bit_length())


class OwnBlock:
    """One of this side's blocks: its number and name (fixed for its life), its mapping and
    capacity. (The segment's fd is closed once mapped; Python's mmap keeps a duplicate.)"""

    __slots__ = ("capacity", "mapping", "name", "number")

    def __init__(self, number: int, name: str, mapping: mmap.mmap, capacity: int) -> None:
        self.number = number
        self.name = name
        self.mapping = mapping
        self.capacity = capacity


class BufferBlocks:
    """The sending side's buffer blocks: acquire, fill, publish; release on return."""

    def __init__(self, token: str, side: str, cache_bytes: int = CACHE_BYTES) -> None:
        self._token = token
        self._side = side
        self._pid = os.getpid()
        self._start_time = process_start_time(self._pid) or 0
        self._next = 0
        self._cache_bytes = cache_bytes
        self._in_flight: dict[int, tuple[int, OwnBlock]] = {}  # number -> (generation, block)
        self._free: list[OwnBlock] = []
        self._free_bytes = 0
        self._lent_bytes = 0

    @property
    def alive(self) -> int:
        """Blocks that exist now: lent to the peer or kept for reuse."""
        return len(self._in_flight) + len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def may_lend(self, nbytes: int) -> bool:
        """Whether another block of ``nbytes`` may be lent now (see :data:`MAX_IN_FLIGHT`)."""
        lent = self._in_flight
        # Counted as lent ones are, by capacity (a reused block may be larger still).
        return not lent or (
            len(lent) < MAX_IN_FLIGHT
            and self._lent_bytes + _capacity_for(nbytes) <= MAX_IN_FLIGHT_BYTES
        )

    def acquire(self, nbytes: int) -> OwnBlock:
        """A block with room for ``nbytes``: a kept one if one fits, else a new one.

        Raises:
            SegmentSpaceError: ``/dev/shm`` cannot hold a new block.
        """
        best = None
        for block in self._free:
            # Do not spend a huge block on a small buffer: it may be wanted soon.
            if nbytes <= block.capacity <= 4 * max(nbytes, MIN_CAPACITY) and (
                best is None or block.capacity < best.capacity
            ):
                best = block
        if best is not None:
            self._free.remove(best)
            self._free_bytes -= best.capacity
            return best
        capacity = _capacity_for(nbytes)
        for _ in range(INDEX_MASK + 1):
            number = self._next
            self._next = (self._next + 1) & INDEX_MASK
            if number not in self._in_flight and all(b.number != number for b in self._free):
                break
        else:
            raise RuntimeError("every buffer block number is in use")
        name = _name(self._pid, self._token, self._side, number)
        segment = Segment.create(DATA_AT + capacity, name=name, populate=True)
        return OwnBlock(number, name, segment.detach(), capacity)

    def publish(self, block: OwnBlock, nbytes: int) -> tuple[int, int]:
        """The block now holds ``nbytes`` for the peer: ``(number, generation)``."""
        generation = secrets.randbits(32)
        while generation == _DEAD:
            generation = secrets.randbits(32)
        _HEADER.pack_into(block.mapping, 0, _MAGIC, nbytes, generation, self._start_time)
        self._in_flight[block.number] = (generation, block)
        self._lent_bytes += block.capacity
        return block.number, generation

    def give_back(self, block: OwnBlock) -> None:
        """An acquired block that was not published after all."""
        self._keep_or_destroy(block)

    def release(self, reference: int, generation: int) -> None:
        """The peer is done with a block.

        Raises:
            RemoteProtocolError: no such block in flight, or a stale generation.
        """
        number = reference & INDEX_MASK
        entry = self._in_flight.get(number)
        if entry is None or entry[0] != generation:
            raise RemoteProtocolError(
                f"buffer block {number} generation {generation} returned but not in flight",
                status=Status.PROTOCOL_ERROR,
            )
        del self._in_flight[number]
        self._lent_bytes -= entry[1].capacity
        self._keep_or_destroy(entry[1])

    def _keep_or_destroy(self, block: OwnBlock) -> None:
        if (
            self._free_bytes + block.capacity <= self._cache_bytes
            and len(self._free) < CACHE_ENTRIES
        ):
            self._free.append(block)
            self._free_bytes += block.capacity
        else:
            _destroy(block)

    def close(self) -> None:
        """Remove every block (the link is closing); the peer's views keep their memory."""
        for _, block in self._in_flight.values():
            _destroy(block)
        for block in self._free:
            _destroy(block)
        self._in_flight.clear()
        self._free.clear()
        self._free_bytes = 0
        self._lent_bytes = 0


def _destroy(block: OwnBlock) -> None:
    struct.pack_into("<I", block.mapping, _GENERATION_AT, _DEAD)
    remove_mapped(block.name, block.mapping)


def return_entry(number: int, generation: int) -> int:
    """The return-ring word that gives block ``number`` back to its owner."""
    return (BUFFER_CLASS << CLASS_SHIFT | number) << 32 | generation


class PeerBufferBlocks:
    """The receiving side: map the peer's blocks, check references, lease views out."""

    def __init__(
        self, token: str, peer_side: str, returns: deque[int], peer_pid: Callable[[], int]
    ) -> None:
        self._token = token
        self._peer_side = peer_side
        self._returns = returns
        self._peer_pid = peer_pid
        self._maps: dict[int, mmap.mmap] = {}

    def resolve(self, where: object, start: int, nbytes: int) -> memoryview:
        """A read-only view of ``nbytes`` at ``start`` of the block ``where`` names.

        Raises:
            ValueError: a malformed reference, a missing or stale block, or out of bounds.
        """
        if (type(where) is not list and type(where) is not tuple) or len(where) != 2:
            raise ValueError("malformed buffer block reference")
        number, generation = where
        if type(number) is not int or type(generation) is not int:
            raise ValueError("malformed buffer block reference")
        if not 0 <= number <= INDEX_MASK or not 0 <= generation < _DEAD:
            raise ValueError("buffer block reference out of range")
        if start < 0 or nbytes < 0:
            raise ValueError("negative offset or length in a buffer block reference")
        mapping = self._current(number, generation)
        length = _HEADER.unpack_from(mapping, 0)[1]
        if start + nbytes > min(length, len(mapping) - DATA_AT):
            raise ValueError(f"reference to {nbytes} bytes at {start} beyond block {number}")
        entry = return_entry(number, generation)
        returns = self._returns
        # Every reference is returned exactly once, when its lease dies.
        # An empty view still holds a lease (of one byte inside the block), so the return
        # happens when it dies, like any other.
        at = min(start, len(mapping) - DATA_AT - 1)
        lease = make_lease(
            mapping, DATA_AT + at, max(nbytes, 1), None, lambda: returns.append(entry)
        )
        view = view_of(lease, writable=False)
        return view[:nbytes]

    def _current(self, number: int, generation: int) -> mmap.mmap:
        mapping = self._maps.get(number)
        if mapping is not None and _header_matches(mapping, generation):
            return mapping
        self._maps.pop(number, None)  # stale: the owner made a new block with that number
        name = _name(self._peer_pid(), self._token, self._peer_side, number)
        try:
            segment = Segment.open(name, min_size=DATA_AT, populate=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"buffer block {name!r} cannot be mapped: {exc}") from None
        mapping = segment.detach()
        if not _header_matches(mapping, generation):
            raise ValueError(f"buffer block {name!r} does not match its reference")
        self._forget_dead()
        self._maps[number] = mapping
        return mapping

    def _forget_dead(self) -> None:
        maps = self._maps
        for number in [n for n, m in maps.items() if _generation(m) == _DEAD]:
            del maps[number]  # unmapped once no view of it is left
        while len(maps) >= PEER_CACHE_ENTRIES:
            del maps[next(iter(maps))]

    def close(self) -> None:
        self._maps.clear()


def _generation(mapping: mmap.mmap) -> int:
    return int(struct.unpack_from("<I", mapping, _GENERATION_AT)[0])


def _header_matches(mapping: mmap.mmap, generation: int) -> bool:
    magic, _, stored, _ = _HEADER.unpack_from(mapping, 0)
    return bool(magic == _MAGIC and stored == generation)
