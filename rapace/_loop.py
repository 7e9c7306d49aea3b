"""Reaching an event loop from any thread, and the pool's own loop thread.

A pool runs all its sessions on one loop: its own, in a background thread (``with``,
``start()``), or the caller's (``async with``). Other threads reach it through
:class:`LoopHandle`, which wraps the loop's own thread-safe entry point (asyncio's
``call_soon_threadsafe``, trio's token) and never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

__all__ = (
    "LoopHandle",
    "LoopThread",
    "current_loop_handle",
    "current_trio_token",
    "running_asyncio_loop",
)


class LoopHandle:
    """A thread-safe way to run callbacks on one running event loop."""

    __slots__ = ("_call_soon", "thread_id")

    def __init__(self, call_soon: Callable[..., Any], thread_id: int) -> None:
        self._call_soon = call_soon
        self.thread_id = thread_id

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop soon; callable from any thread.

        Raises:
            RuntimeError: the loop has stopped.
        """
        self._call_soon(callback, *args)

    def in_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread_id


def current_trio_token() -> Any | None:
    """The token of the trio run driving this thread, or None (trio is never imported here:
    if the program has not imported it, no trio run can be going on)."""
    trio = sys.modules.get("trio")
    if trio is None:
        return None
    try:
        return trio.lowlevel.current_trio_token()
    except (RuntimeError, AttributeError):  # no trio run here; or trio still half-imported
        return None


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop driving this thread, or None (no loop, or a trio run)."""
    if current_trio_token() is not None:
        return None
    return asyncio._get_running_loop()


def current_loop_handle() -> LoopHandle:
    """The handle of the loop running in this thread (asyncio or trio)."""
    token = current_trio_token()
    if token is not None:
        return LoopHandle(token.run_sync_soon, threading.get_ident())
    loop = asyncio.get_running_loop()
    return LoopHandle(loop.call_soon_threadsafe, threading.get_ident())


class LoopThread:
    """A daemon thread running an asyncio loop (via anyio) until :meth:`stop`.

    ``main`` runs as the loop's main task: it receives a ``ready`` callback to call once it
    is set up, and a stop event to wait for; whatever it raises before ``ready`` is re-raised
    by :meth:`start`.
    """

    def __init__(
        self,
        main: Callable[[Callable[[], None], anyio.Event], Coroutine[Any, Any, None]],
        name: str,
    ) -> None:
        self._main = main
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: anyio.Event | None = None
        self.handle: LoopHandle | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        try:
            anyio.run(self._amain)
        except BaseException as exc:
            if not self._started.is_set():
                self._error = exc
        finally:
            self._started.set()

    async def _amain(self) -> None:
        self._stop = anyio.Event()
        self.handle = current_loop_handle()

        def ready() -> None:
            self._started.set()

        await self._main(ready, self._stop)

    def request_stop(self) -> None:
        """Ask ``main`` to return, without waiting (callable from any thread)."""
        handle, stop = self.handle, self._stop
        if handle is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                handle.call_soon(stop.set)

    def stop(self, timeout: float | None = None) -> bool:
        """Ask ``main`` to return and wait for the thread; False if it did not end in time."""
        self.request_stop()
        if threading.current_thread() is self._thread:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
