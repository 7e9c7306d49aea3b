"""The one protocol every transport implements: move whole frames, in order, between two
peers.

A transport knows nothing about channels or methods. Sending takes a batch so that a writer
can coalesce every frame queued since its last write into one system call (or one doorbell
on shared memory); receiving returns every frame that arrived, for the same reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from rapace.wire import Frame

__all__ = ("DeadlineMode", "Transport")

#: How descriptors carry deadlines on this transport: ``"absolute"`` monotonic nanoseconds
#: (shared memory: one clock per host) or ``"relative"`` remaining nanoseconds (sockets).
DeadlineMode = Literal["absolute", "relative"]


class Transport(Protocol):
    """A connected, ordered, reliable frame pipe to exactly one peer."""

    @property
    def deadline_mode(self) -> DeadlineMode: ...

    async def send(self, frames: Sequence[Frame]) -> None:
        """Send ``frames`` in order. Not safe to call from two tasks at once.

        Raises:
            anyio.BrokenResourceError: the peer is gone.
            anyio.ClosedResourceError: this side was closed.
        """
        ...

    def send_nowait(self, frames: Sequence[Frame]) -> bool:
        """Take ``frames`` and write whatever can go without waiting.

        True: all of it went out. False: the rest is buffered, in order, for :meth:`flush`
        (or the next :meth:`send`). Not to be called while a send or flush is in progress.
        """
        ...

    async def flush(self) -> None:
        """Write everything :meth:`send_nowait` buffered."""
        ...

    async def receive(self) -> list[Frame]:
        """Wait for at least one frame and return every frame available, in order.

        Raises:
            anyio.EndOfStream: the peer closed the connection cleanly.
            anyio.BrokenResourceError: the peer vanished mid-frame or the link failed.
            rapace.RemoteProtocolError: the peer sent something that is not a frame.
        """
        ...

    async def aclose(self) -> None:
        """Close this side; idempotent. The peer's receive then ends with EndOfStream."""
        ...
