"""``rapace.Future`` and ``rapace.Stream``: results that any thread or event loop can wait for.

A pool's calls run on the pool's loop; the caller may be a plain thread, the same loop, or
another loop (Jupyter's, or trio). Both types are filled in on the pool's loop and read
anywhere: blocking readers wait on a ``threading`` primitive, async readers have their own
loop woken through its thread-safe entry point, never by blocking the pool's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any, Generic, Protocol, TypeVar

from rapace._loop import LoopHandle, current_trio_token

__all__ = ("Future", "Stream", "wait_on_any_loop")

T = TypeVar("T")


class _Lane(Protocol):
    """What a blocked reader asks of the lane its call went through (rapace._lane)."""

    def wait(self, future: Future[Any], timeout: float | None) -> None: ...


async def wait_on_any_loop(subscribe: Callable[[Callable[[], None]], None]) -> None:
    """Wait in the current task (asyncio or trio) until ``subscribe``'s callback is called.

    ``subscribe(wake)`` must arrange for ``wake()`` to be called once, from any thread.
    """
    token = current_trio_token()
    if token is not None:
        trio = sys.modules["trio"]
        event = trio.Event()

        def wake_trio() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(event.set)

        subscribe(wake_trio)
        await event.wait()
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    loop_thread = threading.get_ident()

    def settle() -> None:
        if not waiter.done():
            waiter.set_result(None)

    def wake_asyncio() -> None:
        if threading.get_ident() == loop_thread:
            settle()
        else:
            # A closed loop raises RuntimeError: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

    subscribe(wake_asyncio)
    await waiter


class Future(concurrent.futures.Future[T]):
    """The outcome of one call: a ``concurrent.futures.Future`` you can also ``await`` from
    any event loop (asyncio, trio, Jupyter's).

    It stays pending until the call ends (``running()`` is never true). ``cancel()`` on a
    call in flight returns True and cancels the handler in the worker. When an awaiting task
    is cancelled, the call is cancelled too and the task's own cancellation propagates.
    """

    def __init__(self, pool_loop: LoopHandle | None = None) -> None:
        super().__init__()
        self._on_cancel: Callable[[], None] | None = None
        self._pool_loop = pool_loop
        self._lane: _Lane | None = None  # a worker's direct lane carries this call
        # Makes the call in the awaiting task instead, if it has not started (see _wait).
        self._claim: Callable[[], Coroutine[Any, Any, None] | None] | None = None

    def result(self, timeout: float | None = None) -> T:
        self._refuse_to_block_the_pool_loop()
        if self._lane is not None:
            self._lane.wait(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._refuse_to_block_the_pool_loop()
        if self._lane is not None:
            self._lane.wait(self, timeout)
        return super().exception(timeout)

    def _refuse_to_block_the_pool_loop(self) -> None:
        loop = self._pool_loop
        if loop is not None and not self.done() and loop.in_loop_thread():
            raise RuntimeError(
                "waiting for a rapace.Future with result() on the pool's own event loop would "
                "deadlock; use 'await future' there"
            )

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        # What an executor does when it finds a cancelled future: without it, the waiters of
        # concurrent.futures.wait and as_completed never hear of the cancellation.
        self.set_running_or_notify_cancel()
        on_cancel, self._on_cancel = self._on_cancel, None
        if on_cancel is not None:
            on_cancel()
        return True

    def __await__(self) -> Generator[Any, None, T]:
        return self._wait().__await__()

    async def _wait(self) -> T:
        claim = self._claim
        run = claim() if claim is not None else None
        if run is not None:
            try:
                await run  # the call, made here: it settles this future
            except BaseException:
                self.cancel()  # our task was cancelled: so is the call
                raise
        if not self.done():
            try:
                await wait_on_any_loop(lambda wake: self.add_done_callback(lambda _: wake()))
            except BaseException:
                self.cancel()  # our task was cancelled: so is the call
                raise
        # Done: neither the pool-loop guard nor the lane's wait of result() has work here.
        return concurrent.futures.Future.result(self)

    def _calls_back(self) -> bool:
        """Whether completing it now would run done-callbacks (user code) in that thread."""
        return bool(self._done_callbacks)  # type: ignore[attr-defined]

    def _resolve(self, result: T) -> None:
        """Set the result unless the future was cancelled meanwhile (from the pool loop)."""
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.set_result(result)

    def _fail(self, error: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.set_exception(error)


# Items a stream reads ahead of its consumer before it stops asking the worker for more.
STREAM_READ_AHEAD = 64


class Stream(Generic[T]):
    """The items of a streaming call, readable as an iterator (blocking, from any thread but
    the pool's loop) or an async iterator (from any event loop).

    Leaving the loop early, :meth:`close` or :meth:`aclose` cancels the producer in the
    worker. Items are read ahead up to a bound, so a slow consumer holds the producer back
    (through the session's flow control) instead of buffering without limit.
    """

    def __init__(self, pool_loop: LoopHandle, description: str) -> None:
        self._pool_loop = pool_loop
        self._description = description
        self._lock = threading.Lock()
        self._items: deque[T] = deque()
        self._finished = False
        self._error: BaseException | None = None
        self._consumer_wake: Callable[[], None] | None = None
        self._producer_wake: Callable[[], None] | None = None
        self._on_close: Callable[[], None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<rapace.Stream of {self._description}>"

    # -- producer side (the pool's loop) ---------------------------------------------------

    def _push(self, item: T) -> bool:
        """Queue an item; False when the read-ahead is full (wait for :meth:`_wait_space`)."""
        with self._lock:
            self._items.append(item)
            room = len(self._items) < STREAM_READ_AHEAD
            wake, self._consumer_wake = self._consumer_wake, None
        if wake is not None:
            wake()
        return room

    def _set_producer_wake(self, wake: Callable[[], None] | None) -> bool:
        """Register how to resume the producer; False if there is room already."""
        with self._lock:
            if len(self._items) < STREAM_READ_AHEAD or self._closed:
                return False
            self._producer_wake = wake
            return True

    def _finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            self._finished = True
            self._error = error
            wake, self._consumer_wake = self._consumer_wake, None
        if wake is not None:
            wake()

    # -- consumer side ---------------------------------------------------------------------

    def _take(self) -> tuple[bool, Any]:
        """``(True, item)``, or ``(False, None)`` when nothing is queued; raises at the end."""
        with self._lock:
            if self._items:
                item = self._items.popleft()
                resume = None
                if self._producer_wake is not None and len(self._items) < STREAM_READ_AHEAD // 2:
                    resume, self._producer_wake = self._producer_wake, None
            elif self._finished:
                if self._error is not None:
                    raise self._error
                raise _Exhausted
            else:
                return False, None
        if resume is not None:
            self._pool_loop.call_soon(resume)
        return True, item

    def _subscribe(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` once an item or the end is there (now, if it already is)."""
        with self._lock:
            if not (self._items or self._finished):
                self._consumer_wake = wake
                return
        wake()

    def __iter__(self) -> Iterator[T]:
        return _Loop(self)

    def __next__(self) -> T:
        if self._pool_loop.in_loop_thread():
            raise RuntimeError(
                "iterating a rapace.Stream synchronously on the pool's own event loop would "
                "deadlock; use 'async for' there"
            )
        while True:
            try:
                ready, item = self._take()
            except _Exhausted:
                raise StopIteration from None
            if ready:
                return item  # type: ignore[no-any-return]
            event = threading.Event()
            self._subscribe(event.set)
            event.wait()

    def __aiter__(self) -> AsyncIterator[T]:
        return _Loop(self)

    async def __anext__(self) -> T:
        while True:
            try:
                ready, item = self._take()
            except _Exhausted:
                raise StopAsyncIteration from None
            if ready:
                return item  # type: ignore[no-any-return]
            try:
                await wait_on_any_loop(self._subscribe)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Stop reading: the producer in the worker is cancelled. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            on_close, self._on_close = self._on_close, None
            finished = self._finished
        if on_close is not None and not finished:
            # A RuntimeError means the pool's loop is gone, and so is the call.
            with contextlib.suppress(RuntimeError):
                self._pool_loop.call_soon(on_close)

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Stream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed and not self._finished:
            self.close()


class _Exhausted(Exception):
    pass


class _Loop(Generic[T]):
    """What a ``for`` or ``async for`` over a :class:`Stream` iterates.

    The loop holds the only reference, so a ``break`` (or an exception) out of it drops this
    object at once, and that closes the stream: the producer is cancelled even though the
    stream itself may still be referenced (by the pool, or a variable). Closing a stream that
    has ended is a no-op.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream[T]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return self._stream.__next__()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._stream.__anext__()

    def __del__(self) -> None:
        self._stream.close()
