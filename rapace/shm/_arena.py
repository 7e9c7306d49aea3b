"""The pool-wide arena: shared memory the host allocates for users and every worker maps.

``pool.empty()``, ``pool.zeros()`` and ``pool.buffer()`` allocate here. The host owns the
arena: it creates the blocks (named segments, ``rp_<host pid>_...``), keeps the free lists
in its own memory, and frees an allocation when the last view of it dies (its lease's
finaliser). A reference to arena memory names the block and an offset; a worker maps a block
the first time it sees one, so workers started later need no announcement, and checks the
block's header and every bound before making a view.

Blocks grow on demand: the first is :data:`DEFAULT_BLOCK` bytes, an allocation that fits no
block gets a block of its own, and any block but a first of the usual size is removed as
soon as nothing in it is allocated (its header is marked dead first, so workers drop their
mapping the next time they look).

Arena memory is shared by design: a worker may write into a buffer it received and the host
sees the writes when the call returns. It is lent, not owned: a worker must not keep views
of it after the call (the host may free and reuse it once the user's own array is gone).
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Final

from rapace.shm._cleanup import process_start_time
from rapace.shm._lease import Lease, Region, make_lease, view_of
from rapace.shm._segment import Segment, owner_of, remove_mapped

__all__ = ("DEFAULT_BLOCK", "Arena", "ArenaMap", "ArenaStatistics")

DEFAULT_BLOCK: Final = 64 << 20
_MAGIC: Final = b"RAPACEAR"
# magic, data length, state (0 live, DEAD removed), the owner's start time (for sweeps)
_HEADER: Final = struct.Struct("<8sQIQ")
_STATE_AT: Final = 16
_DEAD: Final = 0xFFFF_FFFF
_DATA_AT: Final = 4096  # data starts page-aligned
_ALIGN: Final = 64  # allocations start on a cache line
_BIG_ROUND: Final = 2 << 20


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True, slots=True)
class ArenaStatistics:
    bytes_in_use: int
    bytes_reserved: int
    blocks: int
    allocations: int


class _Block:
    __slots__ = ("free", "live", "mapping", "name", "size")

    def __init__(self, name: str, mapping: mmap.mmap, size: int) -> None:
        self.name = name
        self.size = size  # data bytes
        self.mapping = mapping  # the fd is closed: workers open the block by name
        self.free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset
        self.live: dict[int, tuple[int, weakref.ref[Lease]]] = {}

    def allocate(self, nbytes: int) -> int | None:
        for i, (offset, size) in enumerate(self.free):
            if size >= nbytes:
                if size == nbytes:
                    del self.free[i]
                else:
                    self.free[i] = (offset + nbytes, size - nbytes)
                return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        free = self.free
        i = 0
        while i < len(free) and free[i][0] < offset:
            i += 1
        free.insert(i, (offset, nbytes))
        # Coalesce with the neighbours.
        if i + 1 < len(free) and free[i][0] + free[i][1] == free[i + 1][0]:
            free[i] = (free[i][0], free[i][1] + free[i + 1][1])
            del free[i + 1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == free[i][0]:
            free[i - 1] = (free[i - 1][0], free[i - 1][1] + free[i][1])
            del free[i]

    @property
    def empty(self) -> bool:
        return not self.live


class Arena:
    """The host's arena: allocations (thread-safe) and resolution of references back to it."""

    def __init__(self, block_size: int = DEFAULT_BLOCK) -> None:
        if block_size < _BIG_ROUND:
            raise ValueError(f"arena block size must be at least {_BIG_ROUND} bytes")
        self._block_size = _round_up(block_size, _BIG_ROUND)
        self._blocks: dict[str, _Block] = {}
        self._lock = threading.Lock()
        # Frees from leases' finalisers, applied under the lock by whoever holds it next: a
        # finaliser may run in a garbage collection inside our own critical section.
        self._pending_frees: deque[tuple[_Block, int, int]] = deque()
        self._start_time = process_start_time(os.getpid()) or 0
        self._in_use = 0
        self._closed = False

    # -- allocation ------------------------------------------------------------------------

    def allocate(self, nbytes: int) -> Lease:
        """A writable lease of ``nbytes`` (at least 1) of fresh arena memory.

        Raises:
            SegmentSpaceError: ``/dev/shm`` cannot hold another block.
        """
        if type(nbytes) is not int or nbytes < 0:
            raise ValueError(f"size must be a non-negative int, not {nbytes!r}")
        size = _round_up(max(nbytes, 1), _ALIGN)
        with self._lock:
            self._apply_frees()
            if self._closed:
                raise RuntimeError("the pool is closed: its shared memory takes no new arrays")
            for block in self._blocks.values():
                offset = block.allocate(size)
                if offset is not None:
                    break
            else:
                block = self._new_block(size)
                offset = block.allocate(size)
                assert offset is not None
            try:
                lease = make_lease(
                    block.mapping,
                    _DATA_AT + offset,
                    max(nbytes, 1),
                    Region(block.name, offset, shared=True),
                    on_release=lambda: self._free(block, offset, size),
                )
            except BaseException:
                block.release(offset, size)
                raise
            block.live[offset] = (size, weakref.ref(lease))
            self._in_use += size
        return lease

    def _new_block(self, size: int) -> _Block:
        data = self._block_size if size <= self._block_size else _round_up(size, _BIG_ROUND)
        segment = Segment.create(_DATA_AT + data)
        _HEADER.pack_into(segment.buffer, 0, _MAGIC, data, 0, self._start_time)
        block = _Block(segment.name or "", segment.detach(), data)
        self._blocks[block.name] = block
        return block

    def _free(self, block: _Block, offset: int, size: int) -> None:
        # Runs when the last view of an allocation dies, in whatever thread that happens,
        # maybe in a collection that interrupted this very thread inside the lock: never
        # wait for the lock here.
        self._pending_frees.append((block, offset, size))
        if self._lock.acquire(blocking=False):
            try:
                self._apply_frees()
            finally:
                self._lock.release()

    def _apply_frees(self) -> None:
        pending = self._pending_frees
        while pending:
            block, offset, size = pending.popleft()
            if block.live.pop(offset, None) is None:
                continue
            self._in_use -= size
            if self._closed:
                continue
            block.release(offset, size)
            first = next(iter(self._blocks.values()), None)
            # The first block stays for reuse, unless it was made for one big allocation.
            keep = block is first and block.size <= self._block_size
            if block.empty and not keep and block.name in self._blocks:
                self._destroy(block)

    def _destroy(self, block: _Block) -> None:
        del self._blocks[block.name]
        struct.pack_into("<I", block.mapping, _STATE_AT, _DEAD)
        remove_mapped(block.name, block.mapping)

    # -- references back from a worker ------------------------------------------------------

    def resolve(self, where: object, start: int, nbytes: int, writable: bool) -> memoryview:
        """A view of arena memory a worker referenced, kept alive by its allocation's lease."""
        if type(where) is not str:
            raise ValueError("malformed arena reference")
        if start < 0 or nbytes < 0:
            raise ValueError("negative offset or length in an arena reference")
        with self._lock:
            self._apply_frees()
            block = self._blocks.get(where)
            if block is None:
                raise ValueError(f"arena block {where!r} is not this pool's")
            lease, at = None, 0
            for offset, (size, ref) in block.live.items():
                if offset <= start <= offset + size:
                    candidate = ref()
                    # Within what was asked for, not the rounded-up size: an empty view at
                    # the end of one allocation may be the start of the next.
                    if candidate is not None and start + nbytes <= offset + len(candidate):
                        lease, at = candidate, start - offset
                        break
        if lease is None or at + nbytes > len(lease):
            raise ValueError(f"no arena allocation holds {nbytes} bytes at {start} of {where!r}")
        return view_of(lease, writable)[at : at + nbytes]

    # -- insight and teardown ---------------------------------------------------------------

    def statistics(self) -> ArenaStatistics:
        with self._lock:
            self._apply_frees()
            return ArenaStatistics(
                bytes_in_use=self._in_use,
                bytes_reserved=sum(b.size for b in self._blocks.values()),
                blocks=len(self._blocks),
                allocations=sum(len(b.live) for b in self._blocks.values()),
            )

    def close(self) -> None:
        """Remove every block's name; memory still viewed stays mapped until its views die."""
        with self._lock:
            self._closed = True
            blocks = list(self._blocks.values())
            self._blocks.clear()
        for block in blocks:
            # Marked dead too: workers still running forget their map of it.
            struct.pack_into("<I", block.mapping, _STATE_AT, _DEAD)
            remove_mapped(block.name, block.mapping)


class ArenaMap:
    """A worker's view of its host's arena: blocks mapped on first reference, bounds checked."""

    def __init__(self, owner_pid: int) -> None:
        self._owner_pid = owner_pid
        self._maps: dict[str, mmap.mmap] = {}

    def resolve(self, where: object, start: int, nbytes: int, writable: bool) -> memoryview:
        if type(where) is not str or owner_of(where) != self._owner_pid:
            raise ValueError(f"arena reference {where!r} does not name the host's memory")
        if start < 0 or nbytes < 0:
            raise ValueError("negative offset or length in an arena reference")
        self._forget_dead()
        mapping = self._maps.get(where)
        if mapping is None:
            mapping = self._map(where)
        length = _HEADER.unpack_from(mapping, 0)[1]
        if start + nbytes > min(length, len(mapping) - _DATA_AT):
            raise ValueError(f"arena reference of {nbytes} bytes at {start} is out of bounds")
        if nbytes == 0:
            return memoryview(b"")
        lease = make_lease(mapping, _DATA_AT + start, nbytes, Region(where, start, shared=True))
        return view_of(lease, writable)

    def _map(self, name: str) -> mmap.mmap:
        try:
            segment = Segment.open(name, min_size=_DATA_AT)
        except (OSError, ValueError) as exc:
            raise ValueError(f"arena block {name!r} cannot be mapped: {exc}") from None
        magic, length, state, _ = _HEADER.unpack_from(segment.mapping, 0)
        if magic != _MAGIC or state == _DEAD or length > segment.size - _DATA_AT:
            segment.close()
            raise ValueError(f"{name!r} is not a live arena block")
        mapping = segment.detach()  # the fd is not needed once mapped
        self._maps[name] = mapping
        return mapping

    def _forget_dead(self) -> None:
        dead = [
            name
            for name, mapping in self._maps.items()
            if struct.unpack_from("<I", mapping, _STATE_AT)[0] == _DEAD
        ]
        for name in dead:
            del self._maps[name]  # unmapped once no view of it is left

    def close(self) -> None:
        self._maps.clear()
