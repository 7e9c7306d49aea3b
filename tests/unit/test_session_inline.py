"""Handlers that cannot suspend run where their call arrives, without a task of their own
(rapace._inline): which handlers qualify, and that running them so changes nothing a handler
or a caller can see.

Session tests run over an in-memory pair and a real Unix socket pair (where asyncio reads in
the loop's callback), under asyncio and trio. Their calls are not wrapped in
``anyio.fail_after``: that would give them a deadline, and a call with a deadline runs in a
task (pytest-timeout bounds them instead).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import sniffio

import rapace
from rapace._connect import Proxy
from rapace._inline import SuspendedError, never_suspends, run_to_completion
from rapace.service import service_spec
from rapace.session import RpcSession, open_session
from rapace.wire import Role

from .transport_pairs import TRANSPORT_PAIRS, Pair

_value: contextvars.ContextVar[str] = contextvars.ContextVar("_value", default="unset")

# ------------------------------------------------------------------ which handlers qualify


async def _returns(a: int) -> int:
    return a + 1


async def _raises() -> int:
    raise ValueError("no")


@types.coroutine
def _suspend() -> Generator[None, None, None]:
    yield  # what a bare checkpoint hands its event loop


async def _awaits() -> int:
    await _suspend()
    return 1


async def _async_with(lock: anyio.Lock) -> int:
    async with lock:
        return 1


async def _async_for(items: AsyncIterator[int]) -> int:
    async for item in items:
        return item
    return 0


async def _async_comprehension(items: AsyncIterator[int]) -> list[int]:
    return [item async for item in items]


async def _defines_an_awaiting_helper() -> int:
    # The helper's await is in its own code object and it is never run here.
    async def helper() -> None:
        await anyio.lowlevel.checkpoint()

    del helper
    return 1


async def _async_generator() -> AsyncIterator[int]:
    yield 1


def _generator() -> Any:
    yield 1


def _plain(a: int) -> int:
    return a


def _awaiting_wrapper(func: Callable[..., Awaitable[int]]) -> Callable[..., Awaitable[int]]:
    @functools.wraps(func)
    async def wrapper(*args: Any) -> int:
        return await func(*args)

    return wrapper


class _Callable:
    async def __call__(self) -> int:
        return 1


@pytest.mark.parametrize(
    ("func", "expected"),
    [
        (_returns, True),
        (_raises, True),
        (_defines_an_awaiting_helper, True),
        (_awaits, False),
        (_async_with, False),
        (_async_for, False),
        (_async_comprehension, False),
        (_async_generator, False),
        (_generator, False),
        (_plain, False),
        (_awaiting_wrapper(_returns), False),
        (functools.partial(_returns, 1), False),
        (_Callable(), False),
        (len, False),
    ],
    ids=lambda value: getattr(value, "__name__", type(value).__name__),
)
def test_only_coroutines_without_a_suspension_point_qualify(
    func: Callable[..., Any], expected: bool
) -> None:
    assert never_suspends(func) is expected


def test_a_bound_method_is_judged_by_its_function() -> None:
    class Service:
        async def plain(self) -> int:
            return 1

        async def awaits(self) -> int:
            await anyio.lowlevel.checkpoint()
            return 1

    assert never_suspends(Service().plain)
    assert not never_suspends(Service().awaits)


def test_run_to_completion_returns_or_raises_what_the_coroutine_did() -> None:
    assert run_to_completion(_returns(1)) == 2
    with pytest.raises(ValueError, match="no"):
        run_to_completion(_raises())


def test_run_to_completion_refuses_a_coroutine_that_suspends() -> None:
    coro = _awaits()
    with pytest.raises(SuspendedError):
        run_to_completion(coro)
    assert coro.cr_frame is None  # closed, not left pending


# ------------------------------------------------------------------ sessions


@rapace.service
class Inline:
    async def add(self, a: int, b: int) -> int:
        return a + b

    async def environment(self) -> list[str]:
        """What a handler may use without awaiting: anyio primitives, scopes, sniffio."""
        event = anyio.Event()
        event.set()
        with anyio.CancelScope():  # noqa: ASYNC100  # a scope entered and left unawaited
            pass
        with anyio.move_on_after(10):  # noqa: ASYNC100
            pass
        return [sniffio.current_async_library(), str(event.is_set())]

    async def set_value(self, value: str) -> str:
        _value.set(value)
        return _value.get()

    async def get_value(self) -> str:
        return _value.get()

    async def fail(self, message: str) -> int:
        raise KeyError(message)

    async def cancel_itself(self) -> int:
        raise asyncio.CancelledError  # not a cancellation: nothing can cancel it here


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(TRANSPORT_PAIRS))
def pair(request: pytest.FixtureRequest) -> Pair:
    return TRANSPORT_PAIRS[request.param]


@asynccontextmanager
async def _connected(pair: Pair, impl: object) -> AsyncIterator[tuple[Any, RpcSession]]:
    """(proxy, serving session) over a fresh transport pair; the serving session counts
    the calls it ran inline in ``inline_calls``."""
    client_end, server_end = pair()
    servers: list[RpcSession] = []
    ready = anyio.Event()

    async def serve() -> None:
        async with open_session(server_end, role=Role.ACCEPTOR, serve=impl) as server:
            counted = server._serve_inline
            server.inline_calls = 0  # type: ignore[attr-defined]

            def counting(*args: Any) -> None:
                server.inline_calls += 1  # type: ignore[attr-defined]
                counted(*args)

            server._serve_inline = counting  # type: ignore[method-assign]
            servers.append(server)
            ready.set()
            await server.wait_closed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        async with open_session(client_end, role=Role.INITIATOR) as client:
            await ready.wait()
            yield Proxy(client, service_spec(Inline)), servers[0]
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_a_handler_without_await_runs_inline_and_can_use_anyio(pair: Pair) -> None:
    """Run inline even when the socket's read callback brings the call (asyncio), the
    handler still has a current task: anyio's events and cancel scopes and sniffio work."""
    async with _connected(pair, Inline()) as (proxy, server):
        assert await proxy.add(2, 3) == 5
        backend = sniffio.current_async_library()
        assert await proxy.environment() == [backend, "True"]
        assert server.inline_calls == 2


@pytest.mark.anyio
async def test_contextvars_set_inline_do_not_leak(pair: Pair) -> None:
    async with _connected(pair, Inline()) as (proxy, server):
        assert await proxy.set_value("mine") == "mine"
        assert await proxy.get_value() == "unset"
        assert server.inline_calls == 2


@pytest.mark.anyio
async def test_an_inline_handlers_error_reaches_the_caller_as_itself(pair: Pair) -> None:
    async with _connected(pair, Inline()) as (proxy, server):
        with pytest.raises(KeyError, match="lost"):
            await proxy.fail("lost")
        assert await proxy.add(1, 1) == 2  # the session goes on
        assert server.inline_calls == 2


@pytest.mark.anyio
async def test_a_method_replaced_on_the_instance_is_the_one_called(pair: Pair) -> None:
    """The verdict was on the class's function; an instance attribute that awaits is run
    in a task, as any handler that may suspend."""
    impl = Inline()
    async with _connected(pair, impl) as (proxy, server):

        async def add(a: int, b: int) -> int:
            await anyio.lowlevel.checkpoint()
            return a * b

        impl.add = add  # type: ignore[method-assign]
        assert await proxy.add(2, 3) == 6
        assert server.inline_calls == 0


@pytest.mark.anyio
async def test_a_call_with_a_deadline_runs_in_a_task(pair: Pair) -> None:
    """Its handler may read its scope's deadline, which only a task of its own has."""
    async with _connected(pair, Inline()) as (proxy, server):
        with anyio.fail_after(10):
            assert await proxy.add(2, 3) == 5
        assert server.inline_calls == 0


@pytest.mark.anyio
async def test_a_handler_whose_code_changed_after_the_verdict_fails_cleanly(
    pair: Pair,
) -> None:
    """Swapping a function's code object is beyond any reasonable use, but must give an
    error reply, not a hang or a broken session."""

    @rapace.service
    class Swapped:
        async def swapped(self) -> int:
            return 1

    async def awaits(self: object) -> int:
        await anyio.lowlevel.checkpoint()
        return 2

    impl = Swapped()
    client_end, server_end = pair()
    async with anyio.create_task_group() as tg:
        ready = anyio.Event()

        async def serve() -> None:
            async with open_session(server_end, role=Role.ACCEPTOR, serve=impl) as server:
                Swapped.swapped.__code__ = awaits.__code__
                ready.set()
                await server.wait_closed()

        tg.start_soon(serve)
        async with open_session(client_end, role=Role.INITIATOR) as client:
            await ready.wait()
            proxy: Any = Proxy(client, service_spec(Swapped))
            with pytest.raises(SuspendedError, match="suspended"):
                await proxy.swapped()
            assert not client.closed
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_inline_handler_raising_cancelled_error_is_answered(pair: Pair) -> None:
    """Its caller is told the call was cancelled; the session goes on (it once ended)."""
    async with _connected(pair, Inline()) as (proxy, server):
        with pytest.raises(rapace.RapaceError, match="cancellation exception of its own"):
            await asyncio.wait_for(proxy.cancel_itself(), 10)  # no anyio deadline: inline
        assert await asyncio.wait_for(proxy.add(1, 2), 10) == 3
        assert server.inline_calls == 2
