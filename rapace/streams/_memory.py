"""An in-memory connected pair of transports: the semantics every other transport matches.

Payloads are copied to ``bytes`` on send, so a sender that reuses its buffer after sending
cannot change what the receiver sees, exactly as with a socket.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from rapace.streams._abc import DeadlineMode
from rapace.wire import Frame

__all__ = ("MemoryTransport", "memory_pair")

# Batches in flight per direction; a full queue makes the sender wait, like a full socket.
_QUEUE_BATCHES: Final = 64


class MemoryTransport:
    """One end of :func:`memory_pair`."""

    def __init__(
        self,
        outgoing: MemoryObjectSendStream[list[Frame]],
        incoming: MemoryObjectReceiveStream[list[Frame]],
        deadline_mode: DeadlineMode,
    ) -> None:
        self._outgoing = outgoing
        self._incoming = incoming
        self._deadline_mode = deadline_mode
        self._pending: list[list[Frame]] = []  # batches send_nowait could not queue

    @property
    def deadline_mode(self) -> DeadlineMode:
        return self._deadline_mode

    async def send(self, frames: Sequence[Frame]) -> None:
        await self.flush()
        await self._outgoing.send([Frame(f.descriptor, bytes(f.payload)) for f in frames])

    def send_nowait(self, frames: Sequence[Frame]) -> bool:
        """Queue ``frames`` now if there is room; False leaves them for :meth:`flush`."""
        batch = [Frame(f.descriptor, bytes(f.payload)) for f in frames]
        if self._pending:
            self._pending.append(batch)
            return False
        try:
            self._outgoing.send_nowait(batch)
        except anyio.WouldBlock:
            self._pending.append(batch)
            return False
        return True

    async def flush(self) -> None:
        while self._pending:
            await self._outgoing.send(self._pending[0])
            self._pending.pop(0)

    async def receive(self) -> list[Frame]:
        frames = await self._incoming.receive()
        # Drain what else is queued without waiting: one wake-up, many frames.
        while True:
            try:
                frames += self._incoming.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return frames

    async def aclose(self) -> None:
        await self._outgoing.aclose()
        await self._incoming.aclose()


def memory_pair(
    deadline_mode: DeadlineMode = "relative",
) -> tuple[MemoryTransport, MemoryTransport]:
    """Two connected transports: what one sends, the other receives."""
    a_to_b_send, a_to_b_receive = anyio.create_memory_object_stream[list[Frame]](_QUEUE_BATCHES)
    b_to_a_send, b_to_a_receive = anyio.create_memory_object_stream[list[Frame]](_QUEUE_BATCHES)
    return (
        MemoryTransport(a_to_b_send, b_to_a_receive, deadline_mode),
        MemoryTransport(b_to_a_send, a_to_b_receive, deadline_mode),
    )
