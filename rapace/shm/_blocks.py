"""One-off blocks: payloads larger than the largest slot travel in a segment of their own.

The sender (owner) creates a named segment sized to the payload, named from its own pid, the
link's token, its side and a block number, so the descriptor needs to carry only the block
number; the receiver derives the name, opens, validates, copies, and returns the reference
like a slot's. Only the owner unlinks. If the owner dies first, the survivor removes every
segment named with the owner's pid (``sweep_owner``), so a block never outlives both.

Block segment: a 64-byte header (magic, payload length, generation, the owner's start time)
and then the payload.
"""

from __future__ import annotations

import os
import secrets
import struct
from typing import Final

from rapace._errors import RemoteProtocolError, Status
from rapace.shm._cleanup import process_start_time
from rapace.shm._segment import Segment, segment_name
from rapace.shm._slots import CLASS_SHIFT, INDEX_MASK

__all__ = ("BLOCK_CLASS", "BlockOwner", "read_block")

#: The class number of a slot reference that names a block rather than a slot.
BLOCK_CLASS: Final = 0x7F
_MAGIC: Final = b"RAPACEBK"
# magic, payload length, generation, the owner's start time (for sweeping after pid reuse)
_HEADER: Final = struct.Struct("<8sQIQ")
_DATA_AT: Final = 64


def _block_name(owner_pid: int, token: str, side: str, number: int) -> str:
    return segment_name(owner_pid, f"{token}{side}{number:x}")


class BlockOwner:
    """The sending side's blocks: create one per oversized payload, drop it on return."""

    __slots__ = ("_live", "_next", "_pid", "_side", "_start_time", "_token")

    def __init__(self, token: str, side: str) -> None:
        self._token = token
        self._side = side
        self._pid = os.getpid()
        self._start_time = process_start_time(self._pid) or 0
        self._next = 0
        self._live: dict[int, tuple[int, Segment]] = {}  # number -> (generation, segment)

    def __len__(self) -> int:
        return len(self._live)

    def create(self, payload: memoryview) -> tuple[int, int]:
        """Copy ``payload`` into a new block: ``(reference, generation)``."""
        number = self._next
        self._next = (self._next + 1) & INDEX_MASK
        generation = secrets.randbits(32)
        nbytes = payload.nbytes
        segment = Segment.create(
            _DATA_AT + nbytes, name=_block_name(self._pid, self._token, self._side, number)
        )
        try:
            _HEADER.pack_into(segment.buffer, 0, _MAGIC, nbytes, generation, self._start_time)
            segment.buffer[_DATA_AT : _DATA_AT + nbytes] = payload
        except BaseException:
            segment.unlink()
            segment.close()
            raise
        self._live[number] = (generation, segment)
        return BLOCK_CLASS << CLASS_SHIFT | number, generation

    def release(self, reference: int, generation: int) -> None:
        """The receiver is done with a block: unlink and unmap it.

        Raises:
            RemoteProtocolError: no such block in flight, or a stale generation.
        """
        number = reference & INDEX_MASK
        live = self._live.get(number)
        if live is None or live[0] != generation:
            raise RemoteProtocolError(
                f"block {number} generation {generation} returned but not in flight",
                status=Status.PROTOCOL_ERROR,
            )
        del self._live[number]
        live[1].unlink()
        live[1].close()

    def close(self) -> None:
        """Drop every block still in flight (the link is closing)."""
        for _, segment in self._live.values():
            segment.unlink()
            segment.close()
        self._live.clear()


def read_block(
    owner_pid: int, token: str, side: str, reference: int, generation: int, nbytes: int
) -> bytes:
    """Open the peer's block, check it, and copy its payload out.

    Raises:
        RemoteProtocolError: the block is missing, malformed, stale or of another length.
    """
    number = reference & INDEX_MASK
    name = _block_name(owner_pid, token, side, number)
    try:
        segment = Segment.open(name, min_size=_DATA_AT)
    except (OSError, ValueError) as exc:
        raise RemoteProtocolError(
            f"block {name!r} named by the peer cannot be opened: {exc}",
            status=Status.INVALID_FRAME,
        ) from None
    try:
        magic, length, stored_generation, _ = _HEADER.unpack_from(segment.buffer, 0)
        if magic != _MAGIC or length != nbytes or stored_generation != generation:
            raise RemoteProtocolError(
                f"block {name!r} does not match its descriptor "
                f"(length {length} vs {nbytes}, generation {stored_generation} vs {generation})",
                status=Status.INVALID_FRAME,
            )
        if segment.size < _DATA_AT + nbytes:
            raise RemoteProtocolError(
                f"block {name!r} holds {segment.size} bytes, fewer than its payload",
                status=Status.INVALID_FRAME,
            )
        return bytes(segment.buffer[_DATA_AT : _DATA_AT + nbytes])
    finally:
        segment.close()
