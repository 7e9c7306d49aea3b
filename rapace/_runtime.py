"""The per-call primitives of :class:`rapace.session.RpcSession`, picked once per session for
the running event loop.

anyio's portable primitives cost more than a call can afford on asyncio: ``start_soon``
costs ~10 us per task against ~1.5 us for ``loop.create_task``, and an ``anyio.Event`` set and
waited ~3 us against ~0.2 us for a bare future (2-vCPU VM, Python 3.11, anyio 4.16). So:

- :class:`Waiter`: a one-shot wake-up for one task. asyncio: a bare future; trio: a
  ``trio.Event``; anything else: an ``anyio.Event``.
- :meth:`Runtime.spawn` starts one handler task per incoming call. asyncio:
  ``loop.create_task``, which runs the task in a fresh copy of the spawner's context (as a
  task group does), so a contextvar a handler sets is never seen by another call. The
  spawner is the session's receive loop, or the socket's read callback, whose context is a
  copy of the one the socket was first read in: both copies of the session opener's
  context. The tasks are tracked here and :meth:`Runtime.join` waits for them when the
  session ends. trio and others: the session's task group (a nursery spawn is cheap).

Cancellation stays anyio's on every backend: the session runs each handler inside its own
anyio cancel scope and cancels that scope (never the task itself), so shielded scopes and
``finally`` blocks inside handlers behave exactly as under a task group.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVarTuple

import anyio
import anyio.abc

from rapace._loop import current_trio_token

__all__ = ("Runtime", "Waiter", "current_runtime")

Ts = TypeVarTuple("Ts")


class Waiter(Protocol):
    """Wakes the one task waiting on it; ``set`` before ``wait`` is not lost."""

    def set(self) -> None: ...

    async def wait(self) -> None: ...


class Runtime(Protocol):
    def waiter(self) -> Waiter:
        """A new one-shot waiter."""
        ...

    def spawn(self, func: Callable[[*Ts], Coroutine[Any, Any, None]], *args: *Ts) -> None:
        """Run ``func(*args)`` in a new task; an exception it lets out ends the session."""
        ...

    async def join(self) -> None:
        """Wait until every spawned task has ended (the caller has cancelled them)."""
        ...


class _FutureWaiter:
    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        # The future is cancelled when its waiter was: waking it then is a no-op.
        if not self._future.done():
            self._future.set_result(None)

    async def wait(self) -> None:
        await self._future


class _AsyncioRuntime:
    def __init__(self, on_crash: Callable[[BaseException], None]) -> None:
        self._loop = asyncio.get_running_loop()
        # Keyed by spawn number: the loop keeps only weak references to tasks.
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._spawned = 0
        self._on_crash = on_crash

    def waiter(self) -> Waiter:
        return _FutureWaiter(self._loop)

    def spawn(self, func: Callable[[*Ts], Coroutine[Any, Any, None]], *args: *Ts) -> None:
        key = self._spawned = self._spawned + 1
        # create_task runs the task in a copy of the current context: per-call contextvars.
        self._tasks[key] = self._loop.create_task(self._guard(key, func(*args)))

    async def _guard(self, key: int, coro: Coroutine[Any, Any, None]) -> None:
        # Bookkeeping inside the task, not in a done callback: a callback costs every call
        # another turn of the loop.
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._on_crash(exc)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise  # asyncio stops the loop with these
        finally:
            self._tasks.pop(key, None)

    async def join(self) -> None:
        while self._tasks:
            tasks = tuple(self._tasks.values())
            await asyncio.wait(tasks)
            for key in [k for k, task in self._tasks.items() if task.done()]:
                del self._tasks[key]  # a task cancelled before it ever ran


class _TaskGroupRuntime:
    def __init__(self, task_group: anyio.abc.TaskGroup, waiter: Callable[[], Waiter]) -> None:
        self._task_group = task_group
        self.waiter = waiter

    def spawn(self, func: Callable[[*Ts], Coroutine[Any, Any, None]], *args: *Ts) -> None:
        self._task_group.start_soon(func, *args)

    async def join(self) -> None:
        pass  # the task group waits for its own tasks


def current_runtime(
    task_group: anyio.abc.TaskGroup, on_crash: Callable[[BaseException], None]
) -> Runtime:
    """The runtime for the running event loop.

    Args:
        task_group: where handler tasks go on backends without a fast path; it must outlive
            every call (the session's own task group).
        on_crash: called with an exception a handler task let out (asyncio fast path: the
            task group would have raised it).
    """
    if current_trio_token() is not None:
        return _TaskGroupRuntime(task_group, sys.modules["trio"].Event)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _TaskGroupRuntime(task_group, anyio.Event)
    return _AsyncioRuntime(on_crash)
