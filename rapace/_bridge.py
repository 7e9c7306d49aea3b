"""An async iterable argument, read in the caller's event loop, consumed on the pool's.

An async generator belongs to the loop that iterates it (its awaits use that loop's
primitives), so a client-stream argument passed from Jupyter's loop or a trio run to a pool
with its own loop thread cannot be iterated there. The bridge runs a pump task in the
caller's loop that reads the source and hands items over, a bounded number at a time; the
pool's side reads them as an ordinary async iterator. Either side stopping stops the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

import anyio

from rapace._future import wait_on_any_loop
from rapace._loop import LoopHandle, current_trio_token

__all__ = ("CrossLoopSource", "needs_bridge")

# Items read ahead of the pool's side before the pump waits.
BRIDGE_BUFFER = 64


def needs_bridge(source: object, pool_loop: LoopHandle) -> bool:
    """True for an async iterable passed from a thread other than the pool loop's."""
    return isinstance(source, AsyncIterable) and not pool_loop.in_loop_thread()


class CrossLoopSource:
    """Start with :meth:`start` in the caller's loop; iterate on the pool's loop."""

    def __init__(self, source: AsyncIterable[Any], pool_loop: LoopHandle) -> None:
        self._source = source
        self._pool_loop = pool_loop
        self._lock = threading.Lock()
        self._items: deque[Any] = deque()
        self._finished = False
        self._error: BaseException | None = None
        self._stopped = False  # the pool's side stopped reading
        self._pool_wake: Callable[[], None] | None = None
        self._caller_wake: Callable[[], None] | None = None
        self._task: Any = None  # keeps an asyncio task referenced while it runs

    def start(self) -> None:
        """Spawn the pump in the running loop of this thread (asyncio or trio).

        Raises:
            TypeError: no event loop runs in this thread to iterate the source.
        """
        if current_trio_token() is not None:
            sys.modules["trio"].lowlevel.spawn_system_task(self._pump)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise TypeError(
                "an async iterable argument is read in the caller's event loop, and none runs "
                "in this thread: pass a plain iterable, or call from async code"
            ) from None
        self._task = loop.create_task(self._pump())

    async def _pump(self) -> None:
        iterator = aiter(self._source)
        error: BaseException | None = None
        try:
            async for item in iterator:
                while True:
                    with self._lock:
                        if self._stopped:
                            return
                        if len(self._items) < BRIDGE_BUFFER:
                            self._items.append(item)
                            wake, self._pool_wake = self._pool_wake, None
                            break
                    await wait_on_any_loop(self._subscribe_space)
                if wake is not None:
                    self._pool_loop.call_soon(wake)
        except BaseException as exc:  # the source failed (or this loop is shutting down)
            error = exc
        finally:
            with self._lock:
                self._finished = True
                self._error = error
                wake, self._pool_wake = self._pool_wake, None
            if wake is not None:
                with contextlib.suppress(RuntimeError):  # the pool's loop is gone
                    self._pool_loop.call_soon(wake)
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await aclose()
            self._task = None

    def _subscribe_space(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if len(self._items) >= BRIDGE_BUFFER and not self._stopped:
                self._caller_wake = wake
                return
        wake()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._consume()

    async def _consume(self) -> AsyncIterator[Any]:
        try:
            while True:
                event: anyio.Event | None = None
                with self._lock:
                    if self._items:
                        item = self._items.popleft()
                        wake, self._caller_wake = self._caller_wake, None
                    elif self._finished:
                        if self._error is not None:
                            raise self._error
                        return
                    else:
                        event = anyio.Event()
                        self._pool_wake = event.set
                        wake = None
                if event is not None:
                    await event.wait()
                    continue
                if wake is not None:
                    wake()
                yield item
        finally:
            with self._lock:
                self._stopped = True
                wake, self._caller_wake = self._caller_wake, None
            if wake is not None:
                wake()
