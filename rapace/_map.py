"""What ``pool.map`` returns: its results, for a ``for`` or an ``async for``.

Like ``Executor.map``, every call is submitted at once and the results come back in order
(or as they finish with ``ordered=False``), the first failure raised when its turn comes,
and ``timeout`` bounding the whole iteration. Unlike it, the same object can be iterated
from an event loop (``async for``, asyncio or trio, Jupyter's loop included), and leaving
the loop early, or dropping the object, cancels the calls not yet finished.

A submitted part may stand for several results (a chunk of ``chunksize`` calls): ``expand``
turns what it returned into its results and, if the chunk stopped at an exception, that
exception, raised after the results before it.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import anyio

from rapace._future import Future, wait_on_any_loop
from rapace._progress import ProgressBar

__all__ = ("MapResults", "single")

T = TypeVar("T")

Expand = Callable[[Any], tuple[Sequence[Any], BaseException | None]]


def single(value: Any) -> tuple[Sequence[Any], BaseException | None]:
    """``expand`` of a part that is one call."""
    return (value,), None


class MapResults(Generic[T]):
    """The results of ``pool.map``: an iterator and an async iterator (see the module)."""

    def __init__(
        self,
        parts: Sequence[Future[Any]],
        expand: Expand,
        *,
        ordered: bool,
        end: float | None,
        progress: ProgressBar | None = None,
    ) -> None:
        self._parts = list(parts)
        self._expand = expand
        self._end = end  # time.monotonic() deadline
        self._progress = progress
        self._ready: deque[Any] = deque()  # results of finished parts, not yet handed out
        self._failure: BaseException | None = None  # raised once _ready is empty
        self._ordered = ordered
        self._next = 0  # ordered: index of the next part to wait for
        # Unordered: parts in the order they finish, fed by done-callbacks from any thread.
        self._lock = threading.Lock()
        self._finished: deque[Future[Any]] = deque()
        self._wake: Callable[[], None] | None = None
        self._taken = 0
        self._closed = False
        if not ordered:
            for part in self._parts:
                part.add_done_callback(self._on_done)

    def _on_done(self, part: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._finished.append(part)  # type: ignore[arg-type]
            wake, self._wake = self._wake, None
        if wake is not None:
            wake()

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[T]:
        return self._each()

    def _each(self) -> Iterator[T]:
        """What ``for`` (and ``list``) use: ``__next__``'s results, but a part's results
        are handed out by a C loop, not a method call per result (a third of a map's time
        on the caller's side at chunksize 256)."""
        try:
            while True:
                while self._ready:
                    yield self._emit()
                self._raise_failure()
                part = self._next_part_blocking()
                if part is None:
                    return
                results, failure = self._expand(part.result(self._left()))
                if self._progress is None:
                    yield from results
                else:
                    self._ready.extend(results)
                if failure is not None:
                    self._failure = failure
        finally:
            self.close()  # the end, a failure, a timeout, Ctrl-C or a break

    def __next__(self) -> T:
        while not self._ready:
            self._raise_failure()
            try:
                part = self._next_part_blocking()
                if part is None:
                    self.close()
                    raise StopIteration
                self._take(part.result(self._left()))
            except StopIteration:
                raise
            except BaseException:
                self.close()  # a failure, a timeout, Ctrl-C: the other calls are not wanted
                raise
        return self._emit()

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        while not self._ready:
            self._raise_failure()
            try:
                part = await self._next_part_async()
                if part is None:
                    self.close()
                    raise StopAsyncIteration
                self._take(part.result())
            except StopAsyncIteration:
                raise
            except BaseException:
                self.close()
                raise
        return self._emit()

    def _next_part_blocking(self) -> Future[Any] | None:
        if self._ordered:
            if self._next == len(self._parts):
                return None
            part = self._parts[self._next]
            self._next += 1
            return part
        if self._taken == len(self._parts):
            return None
        event = threading.Event()
        self._subscribe(event.set)
        if not event.wait(self._left()):
            self.close()
            raise TimeoutError("map() did not finish within its timeout")
        return self._pop_finished()

    async def _next_part_async(self) -> Future[Any] | None:
        left = self._left()
        if self._ordered:
            if self._next == len(self._parts):
                return None
            part = self._parts[self._next]
            self._next += 1
            if not part.done():
                with anyio.fail_after(left):
                    await wait_on_any_loop(lambda wake: part.add_done_callback(lambda _: wake()))
            return part
        if self._taken == len(self._parts):
            return None
        with anyio.fail_after(left):
            await wait_on_any_loop(self._subscribe)
        return self._pop_finished()

    def _subscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            if not self._finished:
                self._wake = wake
                return
        wake()

    def _pop_finished(self) -> Future[Any]:
        with self._lock:
            self._taken += 1
            return self._finished.popleft()

    def _take(self, value: Any) -> None:
        results, failure = self._expand(value)
        self._ready.extend(results)
        if failure is not None:
            self._failure = failure

    def _emit(self) -> T:
        if self._progress is not None:
            self._progress.update(1)
        return self._ready.popleft()  # type: ignore[no-any-return]

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is not None:
            self._failure = None
            self.close()
            raise failure

    def _left(self) -> float | None:
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            self.close()
            raise TimeoutError("map() did not finish within its timeout")
        return left

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: calls not finished yet are cancelled in their workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for part in self._parts:
            part.cancel()
        if self._progress is not None:
            self._progress.close()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> MapResults[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
