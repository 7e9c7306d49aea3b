"""Services the pool tests run in real worker processes (importable by name)."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

import anyio
import anyio.lowlevel

import rapace
from rapace import Streaming

_barrier_lock = threading.Lock()
_barrier: threading.Barrier | None = None


@rapace.service
class Calculator:
    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.cancelled = 0
        self._cancelled_event: anyio.Event | None = None
        self._counted: anyio.Event | None = None  # set (and replaced) at each cancellation

    def _cancelled(self) -> anyio.Event:
        if self._cancelled_event is None:  # created on the worker's loop, on first use
            self._cancelled_event = anyio.Event()
        if self._counted is not None:
            self._counted.set()
            self._counted = None
        return self._cancelled_event

    async def wait_cancellations(self, n: int) -> int:
        """Return once at least ``n`` cancellations happened in this worker."""
        while self.cancelled < n:
            if self._counted is None:
                self._counted = anyio.Event()
            await self._counted.wait()
        return self.cancelled

    async def add(self, a: int, b: int) -> int:
        return a + b + self.offset

    async def shift(self, x: int, by: int = 10) -> int:
        return x + by

    async def size(self, data: bytes | str) -> int:
        return len(data)

    async def hold(self, seconds: float) -> float:
        """Blocks the worker's event loop: it takes nothing from its links meanwhile."""
        time.sleep(seconds)  # noqa: ASYNC251 (the point: its loop stops meanwhile)
        return seconds

    async def range(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i

    async def total(self, xs: Streaming[int]) -> int:
        return sum([x async for x in xs])

    async def forever(self) -> Streaming[int]:
        """An endless stream that records its cancellation."""
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            self.cancelled += 1
            self._cancelled().set()

    async def stall(self) -> Streaming[int]:
        """One item, then nothing for an hour."""
        yield 0
        await anyio.sleep(3600)

    async def scale(self, xs: Streaming[float], k: float) -> Streaming[float]:
        async for x in xs:
            yield x * k

    def pid(self) -> int:
        return os.getpid()

    async def sleep(self, seconds: float) -> float:
        try:
            await anyio.sleep(seconds)
        except BaseException:
            self.cancelled += 1
            self._cancelled().set()
            raise
        return seconds

    async def cancellations(self) -> int:
        return self.cancelled

    async def wait_cancelled(self) -> int:
        """Return once a ``sleep`` was cancelled (at once if one already was)."""
        await self._cancelled().wait()
        return self.cancelled

    def meet(self, parties: int, patience: float) -> bool:
        """True if ``parties`` calls of this method ran at the same time in this worker."""
        with _barrier_lock:
            global _barrier
            if _barrier is None or _barrier.parties != parties or _barrier.broken:
                _barrier = threading.Barrier(parties)
            barrier = _barrier
        try:
            barrier.wait(patience)
        except threading.BrokenBarrierError:
            return False
        return True

    def block(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    async def die(self, how: str) -> int:
        if how == "exit":
            os._exit(7)
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    async def fail_at(self, x: int, bad: int) -> int:
        if x == bad:
            raise ValueError(f"{x}")
        return x

    async def fail(self, message: str) -> int:
        raise ValueError(message)

    def environment(self, name: str) -> str | None:
        return os.environ.get(name)

    def prefix(self) -> str:
        """The worker's environment (sys.prefix)."""
        return sys.prefix

    def threads(self) -> int:
        return threading.active_count()


@rapace.service
class BrokenAtStart:
    def __init__(self) -> None:
        raise RuntimeError("cannot open the model file")

    async def ping(self) -> int:
        return 1


@dataclasses.dataclass
class Fatal:
    """Kills the process that builds it (decoding) or reads it (encoding) when armed."""

    armed: bool

    def __post_init__(self) -> None:
        if self.armed and os.environ.get("RAPACE_TEST_WORKER"):
            os._exit(11)  # dies while decoding the arguments


@dataclasses.dataclass
class FatalResult:
    value: int

    def __getattribute__(self, name: str) -> object:
        if name == "value" and os.environ.get("RAPACE_TEST_WORKER"):
            os._exit(12)  # dies while encoding the reply
        return object.__getattribute__(self, name)


@rapace.service
class Fragile:
    async def take(self, item: Fatal) -> int:
        return 1

    async def give(self) -> FatalResult:
        return FatalResult(1)

    async def stream(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i
            await anyio.lowlevel.checkpoint()

    async def pid(self) -> int:
        return os.getpid()
