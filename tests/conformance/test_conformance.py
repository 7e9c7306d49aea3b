"""One suite of scenarios, run over every transport and both anyio backends.

In-memory defines the semantics; Unix and TCP sockets, WebSocket and shared memory must behave
the same, with the server in this process or in another one (``connectors.py`` lists the
transports and says how to add one). Tests observe the handler side only through calls
(``services.py``), never through shared objects, so that a server in another process is
checked exactly like one in here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

import rapace
from rapace._remote_errors import RemoteTraceback
from rapace.session import RpcSession

from .connectors import Connect
from .services import Conformance

pytestmark = pytest.mark.anyio


async def test_unary(connect: Connect) -> None:
    """A unary call returns the handler's result."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            assert await calc.add(2, 3) == 5
            assert await calc.add(a=-7, b=2**70) == 2**70 - 7


async def test_server_streaming(connect: Connect) -> None:
    """A server stream yields every item in order, then ends."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            assert [x async for x in calc.range(5)] == [0, 1, 2, 3, 4]
            assert [x async for x in calc.range(0)] == []


async def test_client_streaming_sync_and_async_iterables(connect: Connect) -> None:
    """A client stream accepts sync and async iterables."""

    async def numbers() -> AsyncIterator[int]:
        for i in range(100):
            yield i

    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            assert await calc.total([1, 2, 3]) == 6
            assert await calc.total(numbers()) == sum(range(100))
            assert await calc.total([]) == 0


async def test_bidirectional_streaming(connect: Connect) -> None:
    """Items flow both ways on one call."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            got = [x async for x in calc.scale([1.0, 2.5, -3.0], k=2.0)]
            assert got == [2.0, 5.0, -6.0]


async def test_errors_keep_type_notes_and_remote_traceback(connect: Connect) -> None:
    """A handler's ValueError arrives as ValueError, with notes and the remote traceback."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            with pytest.raises(ValueError, match="boom") as info:
                await calc.fail("boom")
            assert info.value.__notes__ == ["raised by Conformance.fail"]
            remote = info.value.__cause__
            assert isinstance(remote, RemoteTraceback)
            assert "in fail" in remote.text
            assert isinstance(remote.__cause__, KeyError)
            # An error never breaks the session.
            assert await calc.add(1, 1) == 2


async def test_caller_cancellation_cancels_the_handler(connect: Connect) -> None:
    """Cancelling the caller's task cancels the handler's task on the other side."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            async with anyio.create_task_group() as tg:
                tg.start_soon(calc.wait_forever)
                await calc.wait_started()
                tg.cancel_scope.cancel()
            await calc.wait_cancelled()
            assert await calc.add(1, 2) == 3


async def test_deadline_travels_with_the_call(connect: Connect) -> None:
    """fail_after around a call: the caller sees TimeoutError, the handler is cancelled."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.2):
                    await calc.wait_forever()
            await calc.wait_cancelled()


async def test_call_timeout_raises_deadline_exceeded(connect: Connect) -> None:
    """A per-connection default timeout gives rapace.DeadlineExceeded."""
    with anyio.fail_after(10):
        async with connect(Conformance, call_timeout=0.2) as calc:
            with pytest.raises(rapace.DeadlineExceeded):
                await calc.wait_forever()
            await calc.wait_cancelled()
            assert await calc.add(2, 2) == 4


async def test_large_payloads(connect: Connect) -> None:
    """Payloads of several MiB cross intact."""
    data = os.urandom(8 * 1024 * 1024)
    with anyio.fail_after(20):
        async with connect(Conformance) as calc:
            assert await calc.echo(data) == data


async def test_a_thousand_concurrent_calls(connect: Connect) -> None:
    """1000 calls in flight at once all complete with the right answers."""
    results: dict[int, int] = {}

    async def one(i: int, calc: Any) -> None:
        results[i] = await calc.add(i, i)

    with anyio.fail_after(30):
        async with connect(Conformance) as calc, anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(one, i, calc)
    assert results == {i: 2 * i for i in range(1000)}


async def test_flow_control_bounds_a_fast_producer(connect: Connect) -> None:
    """A slow consumer keeps an endless producer within the window."""
    item_bytes = 4096
    window_items = 64 * 1024 // item_bytes
    with anyio.fail_after(20):
        async with connect(Conformance) as calc:
            consumed = 0
            async with calc.produce(item_bytes) as stream:  # a failure closes it at once
                async for item in stream:
                    assert len(item) == item_bytes
                    consumed += 1
                    # produced() answers once every other task of the server is blocked: the
                    # producer has run as far as its credit allows and is parked on credit
                    # with the next item in hand. (Flow control is per channel: this call on
                    # the same session is not held up by the stream.)
                    produced = await calc.produced()
                    # Credit comes back only for items consumed here, so the producer is at
                    # most one window (plus the item in hand, plus the one that took the
                    # credit below zero) ahead, at any instant; without flow control it would
                    # run far beyond.
                    assert produced <= consumed + window_items + 2
                    # Not vacuous: the producer really is parked on credit. Credit is granted
                    # back once half a window has been consumed, so a producer that has used
                    # up its credit is at least half a window ahead.
                    assert produced >= consumed + window_items // 2
                    if consumed == 50:
                        break
            await calc.wait_cancelled()


async def test_closing_a_stream_cancels_the_producer(connect: Connect) -> None:
    """Leaving a stream early (aclose) cancels the producer on the other side."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            async with calc.produce(16) as stream:
                async for _ in stream:
                    break
            await calc.wait_cancelled()
            assert await calc.add(1, 1) == 2


async def test_breaking_out_of_a_stream_loop_cancels_the_producer(connect: Connect) -> None:
    """A bare ``break`` (no ``async with``, no ``aclose``) cancels the producer too, even
    while the stream object is still referenced."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            stream = calc.produce(16)
            async for _ in stream:
                break
            await calc.wait_cancelled()
            assert await calc.add(1, 1) == 2
            del stream


async def test_concurrent_streams_of_large_items_keep_flowing(connect: Connect) -> None:
    """8 streams of 256 KiB items at once (more than a window, more than the shm transport's
    large slots) all flow, and closing them early stops producers that never await."""
    item_bytes = 256 * 1024
    counts: list[int] = []

    async def consume(calc: Any) -> None:
        got = 0
        async with calc.produce(item_bytes) as stream:
            async for item in stream:
                assert len(item) == item_bytes
                got += 1
                if got == 12:
                    break
        counts.append(got)

    with anyio.fail_after(30):
        async with connect(Conformance) as calc:
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(consume, calc)
            assert counts == [12] * 8
            assert await calc.add(1, 1) == 2


async def test_plain_def_handler_does_not_block_the_session(connect: Connect) -> None:
    """While a plain def handler blocks in its thread, other calls are served."""
    results: list[int] = []

    async def run_blocking(calc: Any) -> None:
        results.append(await calc.blocking(21))

    with anyio.fail_after(10):
        async with (
            connect(Conformance) as calc,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(run_blocking, calc)
            await calc.wait_thread_started()
            assert await calc.add(2, 2) == 4
            await calc.release()
    assert results == [42]


async def test_unknown_method_is_unimplemented(connect: Connect) -> None:
    """Calling a method the peer does not serve raises Unimplemented before sending."""

    @rapace.service
    class Conformance:  # same name, one method the server lacks
        async def missing(self) -> int: ...

    with anyio.fail_after(10):
        async with connect(Conformance) as other:
            with pytest.raises(rapace.Unimplemented):
                await other.missing()


async def test_mismatched_signature_is_incompatible_schema(connect: Connect) -> None:
    """Same method id, different signature: IncompatibleSchema, nothing is sent."""

    @rapace.service
    class Conformance:
        async def add(self, a: str, b: str) -> str: ...

    with anyio.fail_after(10):
        async with connect(Conformance) as other:
            with pytest.raises(rapace.IncompatibleSchema):
                await other.add("a", "b")


async def test_peer_closing_mid_call_fails_the_call(connect: Connect) -> None:
    """When the peer goes away mid-call, the caller gets an error promptly, not a hang."""
    with anyio.fail_after(10):
        async with connect(Conformance) as calc:
            session: RpcSession = calc._session
            async with anyio.create_task_group() as tg:

                async def cut() -> None:
                    await calc.wait_started()
                    await session._transport.aclose()

                tg.start_soon(cut)
                with pytest.raises(rapace.Unavailable):
                    await calc.wait_forever()
