"""The service every transport is checked with.

The conformance suite may run the server in the test process or in another one, so tests
observe the handler side through RPC, never through shared objects: ``wait_started()``,
``wait_cancelled()``, ``produced()``, ``wait_thread_started()`` and ``release()`` are methods of
the service itself. Each impl keeps its own state (a fresh impl per connection or per server
process), in an :class:`Observed`.

Events are created lazily, on the loop of whoever first waits on or sets them, so an impl can
be built before its server's event loop runs (``rapace.serve(Conformance(), ...)``).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import anyio

import rapace
from rapace import Streaming

# Bounds on the blocking handler's thread: how long it waits for release(), and how long
# wait_thread_started() waits for it. Tests bound their own waits with fail_after as well.
RELEASE_TIMEOUT_S = 10.0
THREAD_START_TIMEOUT_S = 5.0


class Observed:
    """What the handlers record: started, cancelled, how far a producer got, a gate.

    An in-process test may hold one (``Conformance(observed)``) and look at it directly;
    the conformance suite reads it only through the service's observation methods.
    """

    def __init__(self) -> None:
        self._started: anyio.Event | None = None
        self._cancelled: anyio.Event | None = None
        self.produced = 0
        self.release = threading.Event()
        self.thread_started = threading.Event()

    @property
    def started(self) -> anyio.Event:
        """Set when ``wait_forever`` or ``produce`` starts."""
        if self._started is None:
            self._started = anyio.Event()
        return self._started

    @property
    def cancelled(self) -> anyio.Event:
        """Set when ``wait_forever`` or ``produce`` is cancelled (or otherwise ends)."""
        if self._cancelled is None:
            self._cancelled = anyio.Event()
        return self._cancelled


@rapace.service
class Conformance:
    def __init__(self, observed: Observed | None = None) -> None:
        self.observed = observed or Observed()

    # ------------------------------------------------------------ call shapes

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def echo(self, data: bytes) -> bytes:
        return data

    async def range(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i

    async def total(self, xs: Streaming[int]) -> int:
        return sum([x async for x in xs])

    async def scale(self, xs: Streaming[float], k: float) -> Streaming[float]:
        async for x in xs:
            yield x * k

    async def fail(self, message: str) -> int:
        try:
            raise KeyError(message)
        except KeyError as exc:
            error = ValueError(message)
            error.add_note("raised by Conformance.fail")
            raise error from exc

    async def wait_forever(self) -> int:
        self.observed.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.observed.cancelled.set()
        return 0  # never reached

    async def produce(self, item_bytes: int) -> Streaming[bytes]:
        """An endless fast producer, to show that flow control bounds it."""
        self.observed.started.set()
        try:
            while True:
                self.observed.produced += 1
                yield bytes(item_bytes)
        finally:
            self.observed.cancelled.set()

    def blocking(self, x: int) -> int:
        """A plain def: runs in a thread until the test calls ``release()``."""
        self.observed.thread_started.set()
        self.observed.release.wait(timeout=RELEASE_TIMEOUT_S)
        return x * 2

    # ------------------------------------------------- observing the handler side

    async def wait_started(self) -> None:
        """Return once ``wait_forever`` or ``produce`` has started (at once if it has)."""
        await self.observed.started.wait()

    async def wait_cancelled(self) -> None:
        """Return once ``wait_forever`` or ``produce`` has been cancelled (or has ended)."""
        await self.observed.cancelled.wait()

    async def produced(self) -> int:
        """How many items ``produce`` has made, read once every other task of this server
        is blocked: a producer that may run has run as far as its credit lets it, so it is
        parked on credit (holding one item it could not send yet) when the count is read."""
        await anyio.wait_all_tasks_blocked()
        return self.observed.produced

    async def wait_thread_started(self) -> None:
        """Return once ``blocking`` is running in its thread.

        Raises:
            TimeoutError: it did not start within ``THREAD_START_TIMEOUT_S``.
        """
        started = await anyio.to_thread.run_sync(
            self.observed.thread_started.wait, THREAD_START_TIMEOUT_S, abandon_on_cancel=True
        )
        if not started:
            raise TimeoutError("the blocking handler's thread did not start")

    async def release(self) -> None:
        """Let ``blocking`` return."""
        self.observed.release.set()


async def collect(stream: AsyncIterator[int]) -> list[int]:
    return [x async for x in stream]
