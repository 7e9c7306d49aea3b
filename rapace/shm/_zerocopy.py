"""The codec hooks of one end of a shared-memory link: what goes by reference, what is copied
once, and how references from the peer become views.

Sending (:meth:`SharedBuffers.place_bytes`, :meth:`SharedBuffers.place_array`):

* memory in the pool's arena (any view or slice of ``pool.empty()``/``pool.buffer()``, even
  a strided one) goes as a reference to where it is, whatever its size: nothing is copied
  and the peer may write into it;
* other buffers and arrays of at least :attr:`threshold` bytes are copied once into a buffer
  block (:mod:`rapace.shm._bufblocks`); a non-contiguous array is made contiguous by that
  same copy (and counted);
* anything smaller stays in the CBOR payload.

Receiving (:meth:`SharedBuffers.resolve`): an arena reference becomes a writable view of the
arena, a block reference a read-only view leased from the peer's block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal

from rapace.shm._arena import Arena, ArenaMap
from rapace.shm._bufblocks import DATA_AT, BufferBlocks, OwnBlock, PeerBufferBlocks
from rapace.shm._lease import find_lease
from rapace.shm._segment import SegmentSpaceError
from rapace.wire import shared_bytes_tag

if TYPE_CHECKING:
    from rapace.shm._transport import ShmStatistics

__all__ = ("DEFAULT_COPY_THRESHOLD", "SharedBuffers")

#: Buffers at least this large are copied once into shared memory rather than into the
#: payload: below it the extra copies through the payload cost less than a block's upkeep.
DEFAULT_COPY_THRESHOLD: Final = 64 << 10


class SharedBuffers:
    """Implements the codec's ``BufferPlacer`` and ``BufferResolver`` for one link end."""

    __slots__ = ("_before_copy", "_blocks", "_peer_blocks", "_stats", "arena", "threshold")

    def __init__(
        self,
        blocks: BufferBlocks,
        peer_blocks: PeerBufferBlocks,
        stats: ShmStatistics,
        *,
        threshold: int = DEFAULT_COPY_THRESHOLD,
        before_copy: Callable[[], None] | None = None,
    ) -> None:
        self._blocks = blocks
        self._peer_blocks = peer_blocks
        self._stats = stats
        self._before_copy = before_copy
        self.threshold = threshold
        #: The pool's arena: the host's own (:class:`Arena`) or a worker's map of it.
        self.arena: Arena | ArenaMap | None = None

    # -- BufferPlacer ------------------------------------------------------------------------

    def place_bytes(self, view: memoryview) -> object | None:
        found = find_lease(view)
        if found is not None:
            lease, at = found
            region = lease.rapace_region
            if region.shared:
                self._stats.bytes_by_reference += view.nbytes
                return shared_bytes_tag(
                    region.where, region.offset + at, view.nbytes, not view.readonly
                )
        nbytes = view.nbytes
        if nbytes < self.threshold:
            return None
        block = self._acquire(nbytes)
        if block is None:
            return None
        try:
            block.mapping[DATA_AT : DATA_AT + nbytes] = view
        except BaseException:
            self._blocks.give_back(block)
            raise
        where = self._blocks.publish(block, nbytes)
        self._stats.bytes_copied += nbytes
        return shared_bytes_tag(list(where), 0, nbytes, False)

    def place_array(self, array: Any) -> object | None:
        from rapace.wire._codec_numpy import shared_array_tag

        found = find_lease(array)
        if found is not None:
            lease, at = found
            region = lease.rapace_region
            if region.shared:
                self._stats.bytes_by_reference += array.nbytes
                # A read-only view of shared memory stays read-only on the other side.
                writable = bool(array.flags.writeable)
                return shared_array_tag(region.where, region.offset + at, array, writable)
        nbytes = array.nbytes
        if nbytes < self.threshold:
            return None
        import numpy as np

        flags = array.flags
        order: Literal["C", "F"] = "F" if flags.f_contiguous and not flags.c_contiguous else "C"
        contiguous = flags.c_contiguous or flags.f_contiguous
        block = self._acquire(nbytes)
        if block is None:
            return None
        try:
            copy = np.ndarray(
                array.shape, array.dtype, buffer=block.mapping, offset=DATA_AT, order=order
            )
            np.copyto(copy, array, casting="no")
        except BaseException:
            self._blocks.give_back(block)
            raise
        where = self._blocks.publish(block, nbytes)
        self._stats.bytes_copied += nbytes
        if not contiguous:
            self._stats.arrays_made_contiguous += 1
        return shared_array_tag(list(where), 0, copy, False)

    def _acquire(self, nbytes: int) -> OwnBlock | None:
        """A block for ``nbytes``, or None: the value then goes in the payload (copied
        through the ring, never pinning anything) because too much is lent already or
        ``/dev/shm`` is full."""
        if self._before_copy is not None:
            self._before_copy()  # take back returned blocks first, to reuse them
        blocks = self._blocks
        if not blocks.may_lend(nbytes):
            self._stats.buffers_inlined += 1
            return None
        try:
            return blocks.acquire(nbytes)
        except SegmentSpaceError:
            self._stats.buffers_inlined += 1
            return None

    # -- BufferResolver ----------------------------------------------------------------------

    def resolve(self, where: object, start: int, nbytes: int, writable: bool) -> memoryview:
        if type(where) is str:
            if self.arena is None:
                raise ValueError("an arena reference arrived on a link without an arena")
            return self.arena.resolve(where, start, nbytes, writable)
        view = self._peer_blocks.resolve(where, start, nbytes)
        self._stats.bytes_received_in_blocks += nbytes
        return view
