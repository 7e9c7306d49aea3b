"""One suite of scenarios, run over every transport and both anyio backends.

In-memory defines the semantics; Unix and TCP sockets must behave the same. The shared-memory
transport joins this suite when it exists.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

import rapace
from rapace._connect import Proxy, serve_async
from rapace._remote_errors import RemoteTraceback
from rapace.service import service_spec
from rapace.session import RpcSession, open_session
from rapace.streams._memory import memory_pair
from rapace.wire import Role

from .services import Conformance, Observed

pytestmark = pytest.mark.anyio

TOKEN = "conformance-token"
Connector = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@asynccontextmanager
async def _memory(impl: object, service: type, **options: Any) -> AsyncIterator[Any]:
    client_end, server_end = memory_pair()

    async def run_server() -> None:
        async with open_session(server_end, role=Role.ACCEPTOR, serve=impl) as session:
            await session.wait_closed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server)
        async with open_session(client_end, role=Role.INITIATOR, **options) as session:
            yield Proxy(session, service_spec(service))
        tg.cancel_scope.cancel()


def _socket_connector(url_for: Callable[[Path], str], token: str | None) -> Connector:
    @asynccontextmanager
    async def connect(
        impl: object, service: type, tmp_path: Path, **options: Any
    ) -> AsyncIterator[Any]:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(
                lambda task_status: serve_async(
                    impl, listen=url_for(tmp_path), token=token, task_status=task_status
                )
            )
            async with rapace.connect(str(bound), service, token=token, **options) as proxy:
                yield proxy
            tg.cancel_scope.cancel()

    return connect


_unix = _socket_connector(lambda tmp: f"unix://{tmp / 'rapace.sock'}", None)
_tcp = _socket_connector(lambda tmp: "tcp://127.0.0.1:0", TOKEN)


@pytest.fixture(params=["memory", "unix", "tcp"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Connector:
    """``connect(impl, Service, **options)``: an async context manager yielding a proxy."""
    kind = request.param
    if kind == "memory":
        return _memory

    def bound(impl: object, service: type, **options: Any) -> AbstractAsyncContextManager[Any]:
        factory = _unix if kind == "unix" else _tcp
        return factory(impl, service, tmp_path, **options)

    return bound


async def test_unary(connect: Connector) -> None:
    """A unary call returns the handler's result."""
    with anyio.fail_after(10):
        async with connect(Conformance(), Conformance) as calc:
            assert await calc.add(2, 3) == 5
            assert await calc.add(a=-7, b=2**70) == 2**70 - 7


async def test_server_streaming(connect: Connector) -> None:
    """A server stream yields every item in order, then ends."""
    with anyio.fail_after(10):
        async with connect(Conformance(), Conformance) as calc:
            assert [x async for x in calc.range(5)] == [0, 1, 2, 3, 4]
            assert [x async for x in calc.range(0)] == []


async def test_client_streaming_sync_and_async_iterables(connect: Connector) -> None:
    """A client stream accepts sync and async iterables."""

    async def numbers() -> AsyncIterator[int]:
        for i in range(100):
            yield i

    with anyio.fail_after(10):
        async with connect(Conformance(), Conformance) as calc:
            assert await calc.total([1, 2, 3]) == 6
            assert await calc.total(numbers()) == sum(range(100))
            assert await calc.total([]) == 0


async def test_bidirectional_streaming(connect: Connector) -> None:
    """Items flow both ways on one call."""
    with anyio.fail_after(10):
        async with connect(Conformance(), Conformance) as calc:
            got = [x async for x in calc.scale([1.0, 2.5, -3.0], k=2.0)]
            assert got == [2.0, 5.0, -6.0]


async def test_errors_keep_type_notes_and_remote_traceback(connect: Connector) -> None:
    """A handler's ValueError arrives as ValueError, with notes and the remote traceback."""
    with anyio.fail_after(10):
        async with connect(Conformance(), Conformance) as calc:
            with pytest.raises(ValueError, match="boom") as info:
                await calc.fail("boom")
            assert info.value.__notes__ == ["raised by Conformance.fail"]
            remote = info.value.__cause__
            assert isinstance(remote, RemoteTraceback)
            assert "in fail" in remote.text
            assert isinstance(remote.__cause__, KeyError)
            # An error never breaks the session.
            assert await calc.add(1, 1) == 2


async def test_caller_cancellation_cancels_the_handler(connect: Connector) -> None:
    """Cancelling the caller's task cancels the handler's task on the other side."""
    observed = Observed()
    with anyio.fail_after(10):
        async with connect(Conformance(observed), Conformance) as calc:
            async with anyio.create_task_group() as tg:
                tg.start_soon(calc.wait_forever)
                await observed.started.wait()
                tg.cancel_scope.cancel()
            await observed.cancelled.wait()
            assert await calc.add(1, 2) == 3


async def test_deadline_travels_with_the_call(connect: Connector) -> None:
    """fail_after around a call: the caller sees TimeoutError, the handler is cancelled."""
    observed = Observed()
    with anyio.fail_after(10):
        async with connect(Conformance(observed), Conformance) as calc:
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.2):
                    await calc.wait_forever()
            await observed.cancelled.wait()


async def test_call_timeout_raises_deadline_exceeded(connect: Connector) -> None:
    """A per-connection default timeout gives rapace.DeadlineExceeded."""
    observed = Observed()
    with anyio.fail_after(10):
        async with connect(Conformance(observed), Conformance, call_timeout=0.2) as calc:
            with pytest.raises(rapace.DeadlineExceeded):
                await calc.wait_forever()
            await observed.cancelled.wait()
            assert await calc.add(2, 2) == 4


async def test_large_payloads(connect: Connector) -> None:
    """Payloads of several MiB cross intact."""
    data = os.urandom(8 * 1024 * 1024)
    with anyio.fail_after(20):
        async with connect(Conformance(), Conformance) as calc:
            assert await calc.echo(data) == data


async def test_a_thousand_concurrent_calls(connect: Connector) -> None:
    """1000 calls in flight at once all complete with the right answers."""
    results: dict[int, int] = {}

    async def one(i: int, calc: Any) -> None:
        results[i] = await calc.add(i, i)

    with anyio.fail_after(30):
        async with connect(Conformance(), Conformance) as calc, anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i, calc)
    assert results == {i: 2 * i for i in range(1000)}


async def test_flow_control_bounds_a_fast_producer(connect: Connector) -> None:
    """A slow consumer keeps an endless producer within the window."""
    observed = Observed()
    item_bytes = 4096
    window_items = 64 * 1024 // item_bytes
    with anyio.fail_after(20):
        async with connect(Conformance(observed), Conformance) as calc:
            stream = calc.produce(item_bytes)
            consumed = 0
            async for item in stream:
                assert len(item) == item_bytes
                consumed += 1
                await anyio.wait_all_tasks_blocked()
                # Never more than one window (plus the item in hand) ahead of the consumer.
                assert observed.produced <= consumed + window_items + 2
                if consumed == 50:
                    break
            await stream.aclose()
            await observed.cancelled.wait()


async def test_closing_a_stream_cancels_the_producer(connect: Connector) -> None:
    """Leaving a stream early (aclose) cancels the producer on the other side."""
    observed = Observed()
    with anyio.fail_after(10):
        async with connect(Conformance(observed), Conformance) as calc:
            async with calc.produce(16) as stream:
                async for _ in stream:
                    break
            await observed.cancelled.wait()
            assert await calc.add(1, 1) == 2


async def test_plain_def_handler_does_not_block_the_session(connect: Connector) -> None:
    """While a plain def handler blocks in its thread, other calls are served."""
    observed = Observed()
    results: list[int] = []

    async def run_blocking(calc: Any) -> None:
        results.append(await calc.blocking(21))

    with anyio.fail_after(10):
        async with (
            connect(Conformance(observed), Conformance) as calc,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(run_blocking, calc)
            await anyio.to_thread.run_sync(observed.thread_started.wait, 5)
            assert await calc.add(2, 2) == 4
            observed.release.set()
    assert results == [42]


async def test_unknown_method_is_unimplemented(connect: Connector) -> None:
    """Calling a method the peer does not serve raises Unimplemented before sending."""

    @rapace.service
    class Conformance:  # same name, one method the server lacks
        async def missing(self) -> int: ...

    with anyio.fail_after(10):
        async with connect(_server(), Conformance) as other:
            with pytest.raises(rapace.Unimplemented):
                await other.missing()


async def test_mismatched_signature_is_incompatible_schema(connect: Connector) -> None:
    """Same method id, different signature: IncompatibleSchema, nothing is sent."""

    @rapace.service
    class Conformance:
        async def add(self, a: str, b: str) -> str: ...

    with anyio.fail_after(10):
        async with connect(_server(), Conformance) as other:
            with pytest.raises(rapace.IncompatibleSchema):
                await other.add("a", "b")


def _server() -> object:
    return Conformance()


async def test_peer_closing_mid_call_fails_the_call(connect: Connector) -> None:
    """When the peer goes away mid-call, the caller gets an error promptly, not a hang."""
    observed = Observed()
    with anyio.fail_after(10):
        async with connect(Conformance(observed), Conformance) as calc:
            session: RpcSession = calc._session
            async with anyio.create_task_group() as tg:

                async def cut() -> None:
                    await observed.started.wait()
                    await session._transport.aclose()

                tg.start_soon(cut)
                with pytest.raises(rapace.Unavailable):
                    await calc.wait_forever()
