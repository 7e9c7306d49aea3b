"""Handlers that can be run without a task of their own.

An ``async def`` whose body has no ``await``, ``async for`` or ``async with`` cannot suspend:
its coroutine finishes on its first step. A session runs such a unary handler right where
the call arrives (:meth:`rapace.session.RpcSession._start_handler`), which saves the task,
its cancel scope and a turn of the event loop: about a third of a worker's time per call
(ARCHITECTURE.md section 8 asks for exactly this). Nothing is lost by it: cancellation and
deadlines only ever act at a suspension point, and such a handler has none.

The test is on the bytecode of the function that is called, so a decorator that wraps a
handler in a coroutine that awaits it (``functools.wraps`` or not) makes it an ordinary,
task-run handler again: the wrapper is what is examined.
"""

from __future__ import annotations

import dis
import inspect
import types
from collections.abc import Callable, Coroutine
from typing import Any, Final

__all__ = ("SuspendedError", "never_suspends", "run_to_completion")

# Every way a coroutine can hand control back to its event loop goes through one of these
# (``await``, ``async with`` and ``async for`` all compile to a YIELD_VALUE; 3.11 to 3.13).
_SUSPENDING_OPS: Final = frozenset({"YIELD_VALUE", "YIELD_FROM", "SEND"})


def never_suspends(method: Callable[..., Any]) -> bool:
    """Whether ``method(...)`` returns a coroutine that finishes on its first step.

    False whenever that cannot be told for sure: callable objects, builtins, partials, and
    functions that are not ``async def``. Reads the bytecode: callers keep the verdict.
    """
    func = getattr(method, "__func__", method)
    if not isinstance(func, types.FunctionType):
        return False
    code = func.__code__
    if not code.co_flags & inspect.CO_COROUTINE:  # not generators, not async generators
        return False
    return not any(op.opname in _SUSPENDING_OPS for op in dis.get_instructions(code))


class SuspendedError(RuntimeError):
    """A coroutine judged never to suspend did: its code was swapped after it was judged."""


def run_to_completion(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that cannot suspend, and return its result (or raise its error)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    name = getattr(coro, "__qualname__", "the handler")
    raise SuspendedError(f"{name} suspended; it was expected not to")
