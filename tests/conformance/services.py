"""The service every transport is checked with, and an in-process handle on its state.

The server side of every conformance test runs in the test process (the socket transports
through a real listener), so tests can observe the handler side directly: did the handler
see its cancellation, how far did a producer get.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import anyio

import rapace
from rapace import Streaming


class Observed:
    """What handlers report to the test: cancellations, produced counts, a gate."""

    def __init__(self) -> None:
        self.cancelled = anyio.Event()
        self.started = anyio.Event()
        self.produced = 0
        self.release = threading.Event()
        self.thread_started = threading.Event()


@rapace.service
class Conformance:
    def __init__(self, observed: Observed | None = None) -> None:
        self.observed = observed or Observed()

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
        """A plain def: runs in a thread until the test releases it."""
        self.observed.thread_started.set()
        self.observed.release.wait(timeout=10)
        return x * 2


async def collect(stream: AsyncIterator[int]) -> list[int]:
    return [x async for x in stream]
