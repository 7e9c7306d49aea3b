"""Doorbells: one eventfd per direction, rung only for a parked peer.

An eventfd is a counter: any number of rings before the sleeper wakes collapse into one
readable event, so the sleeper must treat a wake-up as "something changed" and drain
everything. The producer rings only when the consumer has published that it is parked.
Python cannot order a store before a later load across processes (x86 may let the load pass
the store), so publishing "parked" and re-checking the ring can race with the producer's
"publish, then check parked": both may see the old value. The bound on that lost wake-up is
the park timeout: a parked side re-checks its ring at least every :data:`PARK_TIMEOUT`
seconds, which at 100 checks a second still costs an idle process well under 1% of a core.
"""

from __future__ import annotations

import contextlib
import os
from typing import Final

import anyio

__all__ = ("PARK_TIMEOUT", "Doorbell", "FdWaiter")

#: The longest a parked side sleeps without re-checking its rings.
PARK_TIMEOUT: Final = 0.010


class Doorbell:
    """One eventfd. The side that sleeps on it owns the waiting; the other side rings it."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> Doorbell:
        return cls(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))

    def ring(self) -> None:
        # A saturated counter means a wake-up is pending anyway.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FdWaiter:
    """Lets several tasks wait for one doorbell without registering its fd twice.

    anyio (like asyncio's ``add_reader``) allows one waiter per fd and loop. The first task
    to wait becomes the one on the fd; tasks arriving while it waits park on an event it sets
    when it wakes. Every waiter re-checks its own condition afterwards, so a wake-up meant for
    another task costs a look, never a lost signal.
    """

    __slots__ = ("_doorbell", "_followers", "_leading")

    def __init__(self, doorbell: Doorbell) -> None:
        self._doorbell = doorbell
        self._leading = False
        self._followers: anyio.Event | None = None

    async def wait(self, max_wait: float = PARK_TIMEOUT) -> None:
        """Return after a ring, a wake-up of the task on the fd, or ``max_wait`` seconds."""
        if self._leading:
            if self._followers is None:
                self._followers = anyio.Event()
            with anyio.move_on_after(max_wait):
                await self._followers.wait()
            return
        self._leading = True
        try:
            with anyio.move_on_after(max_wait):
                await anyio.wait_readable(self._doorbell.fd)
            self._doorbell.clear()
        finally:
            self._leading = False
            followers, self._followers = self._followers, None
            if followers is not None:
                followers.set()

    async def close(self) -> None:
        """Wake every waiter before the fd is closed (trio and asyncio both need this)."""
        if self._doorbell.fd >= 0:
            anyio.notify_closing(self._doorbell.fd)
        if self._followers is not None:
            self._followers.set()
