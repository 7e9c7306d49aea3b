"""Doorbells: one eventfd per direction, rung only for a parked peer.

An eventfd is a counter: any number of rings before the sleeper wakes collapse into one
readable event, so the sleeper must treat a wake-up as "something changed" and drain
everything. The producer rings only when the consumer has published that it is parked.
Python cannot order a store before a later load across processes (x86 may let the load pass
the store), so publishing "parked" and re-checking the ring can race with the producer's
"publish, then check parked": both may see the old value. The bound on that lost wake-up is
the first park timeout: a parked side re-checks its ring :data:`PARK_TIMEOUT` after parking,
then less and less often while it stays idle (:func:`park_timeouts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import sys
from collections.abc import Iterator
from typing import Final

import anyio

from rapace.shm._liveness import fd_readable

__all__ = ("PARK_TIMEOUT", "Doorbell", "FdWaiter", "park_timeouts")

#: The longest a parked side sleeps before re-checking its rings: the bound on a lost
#: wake-up. A timed-out wait does no work but the look, so 100 looks a second cost an idle
#: process a fraction of a percent of a core (measured in benchmarks/bench_shm.py).
PARK_TIMEOUT: Final = 0.010
#: The longest sleep of a side that has stayed parked a while.
IDLE_PARK_TIMEOUT: Final = 1.0


def park_timeouts() -> Iterator[float]:
    """The looks of a side that stays parked: the first bounds a lost wake-up; later ones
    grow, because on a VM a wake-up costs ~100 us of CPU even for a bare asyncio.sleep, so
    100 looks a second would cost ~1% of a core; these cost ~0.05% once idle a second."""
    yield PARK_TIMEOUT
    yield 0.05
    yield 0.25
    while True:
        yield IDLE_PARK_TIMEOUT


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

    def clear(self) -> bool:
        """Reset the counter; True if the doorbell had been rung."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

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

    With a liveness fd (a pidfd, a death pipe), the waiter sleeps on an epoll set holding both
    fds, so the peer's death wakes it at once like a ring would, with no polling.

    On asyncio the fd stays registered with the loop for the waiter's life and a wait is a
    bare future with a timer: anyio's ``wait_readable`` registers and unregisters the fd on
    every wait and its ``move_on_after`` adds a cancel scope, which measured (bench_shm_limits)
    about doubled a parked round trip (55 -> 25 us with a loop on both sides). Other loops use
    anyio.
    """

    __slots__ = (
        "_doorbell",
        "_epoll",
        "_followers",
        "_leading",
        "_liveness_fd",
        "_loop",
        "_waiting",
        "rang",
    )

    def __init__(self, doorbell: Doorbell) -> None:
        self._doorbell = doorbell
        self._leading = False
        self._followers: anyio.Event | None = None
        self._epoll: select.epoll | None = None
        self._liveness_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the fd is registered on
        self._waiting: asyncio.Future[bool] | None = None
        self.rang = False  # whether the last wake-up came from the doorbell itself

    def watch(self, liveness_fd: int) -> None:
        """Also wake when ``liveness_fd`` turns readable (the caller owns that fd)."""
        self._unregister()
        if self._epoll is not None:
            self._epoll.close()
        epoll = select.epoll()
        epoll.register(self._doorbell.fd, select.EPOLLIN)
        epoll.register(liveness_fd, select.EPOLLIN)
        self._epoll = epoll
        self._liveness_fd = liveness_fd

    @property
    def _fd(self) -> int:
        return self._epoll.fileno() if self._epoll is not None else self._doorbell.fd

    async def wait(self, max_wait: float = PARK_TIMEOUT) -> bool:
        """Return after a ring, a wake-up of the task on the fd (True), or ``max_wait``
        seconds (False)."""
        if self._leading:
            if self._followers is None:
                self._followers = anyio.Event()
            with anyio.move_on_after(max_wait) as scope:
                await self._followers.wait()
            return not scope.cancelled_caught
        self._leading = True
        try:
            loop = _running_asyncio_loop()
            if loop is not None:
                return await self._wait_asyncio(loop, max_wait)
            with anyio.move_on_after(max_wait) as scope:
                await anyio.wait_readable(self._fd)
            if scope.cancelled_caught:
                return False
            self.rang = self._doorbell.clear()
            return True
        finally:
            self._leading = False
            followers, self._followers = self._followers, None
            if followers is not None:
                followers.set()

    async def _wait_asyncio(self, loop: asyncio.AbstractEventLoop, max_wait: float) -> bool:
        if self._loop is not loop:
            self._unregister()
            loop.add_reader(self._fd, self._on_readable)
            self._loop = loop
        waiting = self._waiting = loop.create_future()
        timer = loop.call_later(max_wait, _settle, waiting, False)
        try:
            result: bool = await waiting
            return result
        finally:
            timer.cancel()
            self._waiting = None

    def _on_readable(self) -> None:
        # The loop polls level-triggered: drain the eventfd so the callback stops firing. A
        # readable liveness fd stays readable, so stop watching then (the peer is gone).
        self.rang = self._doorbell.clear()
        liveness = self._liveness_fd
        if not self.rang and liveness is not None and fd_readable(liveness):
            self._unregister()
        waiting = self._waiting
        if waiting is not None:
            _settle(waiting, True)

    def _unregister(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                loop.remove_reader(self._fd)

    async def close(self) -> None:
        """Wake every waiter before the fds are closed (trio and asyncio both need this)."""
        self._unregister()
        waiting = self._waiting
        if waiting is not None and not waiting.done():
            waiting.set_exception(anyio.ClosedResourceError())
        elif self._doorbell.fd >= 0:
            anyio.notify_closing(self._fd)
        if self._followers is not None:
            self._followers.set()

    def release(self) -> None:
        self._unregister()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None


def _settle(waiting: asyncio.Future[bool], value: bool) -> None:
    if not waiting.done():
        waiting.set_result(value)


def _running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running this task, or None under trio (or without asyncio)."""
    if "trio" in sys.modules:
        trio = sys.modules["trio"]
        try:
            trio.lowlevel.current_trio_token()
        except (RuntimeError, AttributeError):  # no trio run; or another thread importing it
            pass
        else:
            return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
