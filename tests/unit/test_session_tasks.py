"""How RpcSession runs calls: a task per call with its own context and cancel scope, sessions
that end their handlers, and the batching of writes under load.

Every test runs over an in-memory pair and a real Unix socket pair (where asyncio reads in the
loop's callback), under asyncio and trio.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import rapace
from rapace._connect import Proxy
from rapace.service import service_spec
from rapace.session import RpcSession, _codecs, open_session
from rapace.streams._memory import memory_pair
from rapace.wire import CancelReason, Role, Session

from .transport_pairs import TRANSPORT_PAIRS, Pair

pytestmark = pytest.mark.anyio

_value: contextvars.ContextVar[str] = contextvars.ContextVar("_value", default="unset")


class Boom(BaseException):
    """Not an Exception: a handler letting it out is a crash, not an error reply."""


class Probe:
    def __init__(self) -> None:
        self.started = anyio.Event()
        self.cleaned_up = anyio.Event()
        self.finished = anyio.Event()
        self.completed = False


@rapace.service
class Tasks:
    def __init__(self, probe: Probe | None = None) -> None:
        self.probe = probe or Probe()

    async def set_value(self, value: str) -> str:
        _value.set(value)
        await anyio.lowlevel.checkpoint()  # the value must survive a suspension
        return _value.get()

    async def get_value(self) -> str:
        return _value.get()

    async def own_timeout(self, seconds: float) -> str:
        with anyio.move_on_after(seconds) as scope:
            await anyio.sleep(10)
        return "moved on" if scope.cancelled_caught else "slept"

    async def own_fail_after(self, seconds: float) -> str:
        with anyio.fail_after(seconds):
            await anyio.sleep(10)
        return "never"

    async def deadline_left(self) -> float:
        return anyio.current_effective_deadline() - anyio.current_time()

    async def wait_forever(self) -> int:
        self.probe.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            # Shielded cleanup must still run to the end when the session cancels us.
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.01)
            self.probe.cleaned_up.set()
        return 0

    async def yield_once(self) -> int:
        self.probe.started.set()
        try:
            await anyio.lowlevel.checkpoint()
            self.probe.completed = True
        finally:
            self.probe.finished.set()
        return 1

    async def crash(self) -> int:
        raise Boom("out")

    async def expire(self) -> int:
        raise rapace.DeadlineExceeded("the handler's own deadline passed")

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def cancel_itself(self) -> int:
        await anyio.lowlevel.checkpoint()
        raise asyncio.CancelledError  # an error of its own, not a cancellation of the call


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(TRANSPORT_PAIRS))
def pair(request: pytest.FixtureRequest) -> Pair:
    return TRANSPORT_PAIRS[request.param]


@asynccontextmanager
async def _connected(
    pair: Pair, impl: object, **options: Any
) -> AsyncIterator[tuple[Any, RpcSession, RpcSession]]:
    """(proxy, client session, server session) over a fresh transport pair."""
    client_end, server_end = pair()
    server_ready: list[RpcSession] = []
    ready = anyio.Event()

    async def serve() -> None:
        async with open_session(server_end, role=Role.ACCEPTOR, serve=impl) as server:
            server_ready.append(server)
            ready.set()
            await server.wait_closed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        async with open_session(client_end, role=Role.INITIATOR, **options) as client:
            await ready.wait()
            yield Proxy(client, service_spec(Tasks)), client, server_ready[0]
        tg.cancel_scope.cancel()


def _connect(pair: Pair, impl: object, **options: Any) -> AbstractAsyncContextManager[Any]:
    return _connected(pair, impl, **options)


async def test_contextvars_do_not_leak_between_calls(pair: Pair) -> None:
    """A contextvar set by one handler is not seen by the next call, nor by a concurrent
    one, nor by the session itself."""
    with anyio.fail_after(10):
        async with _connect(pair, Tasks()) as (calc, _, _):
            assert await calc.set_value("first") == "first"
            assert await calc.get_value() == "unset"
            results: dict[int, str] = {}

            async def one(i: int) -> None:
                results[i] = await calc.set_value(f"v{i}")

            async with anyio.create_task_group() as tg:
                for i in range(50):
                    tg.start_soon(one, i)
            assert results == {i: f"v{i}" for i in range(50)}
            assert await calc.get_value() == "unset"


async def test_cancel_scopes_inside_a_handler_work(pair: Pair) -> None:
    """move_on_after and fail_after inside a handler behave as in any task."""
    with anyio.fail_after(10):
        async with _connect(pair, Tasks()) as (calc, _, _):
            assert await calc.own_timeout(0.01) == "moved on"
            with pytest.raises(TimeoutError):
                await calc.own_fail_after(0.01)
            assert await calc.add(1, 2) == 3


async def test_the_callers_deadline_bounds_the_handler(pair: Pair) -> None:
    """A call made under fail_after runs under (about) the same deadline on the peer: the
    innermost one of the caller's."""
    with anyio.fail_after(10):
        async with _connect(pair, Tasks()) as (calc, _, _):
            with anyio.fail_after(2):
                assert 0 < await calc.deadline_left() <= 2
            assert 2 < await calc.deadline_left() <= 10


async def test_a_deadline_answer_at_the_callers_deadline_is_the_callers_timeout(
    pair: Pair,
) -> None:
    """The peer's DEADLINE_EXCEEDED can arrive just before the caller's own timer fires (the
    deadline travelled with the call): the caller's scope still decides, so fail_after
    raises TimeoutError and move_on_after moves on. Far from the caller's deadline, it is
    the handler's own error."""
    with anyio.fail_after(10):
        async with _connect(pair, Tasks()) as (calc, _, _):
            with pytest.raises(TimeoutError):
                with anyio.fail_after(0.005):
                    await calc.expire()
            with anyio.move_on_after(0.005) as scope:
                await calc.expire()
            assert scope.cancelled_caught
            with pytest.raises(rapace.DeadlineExceeded, match="own deadline"):
                await calc.expire()


async def test_closing_the_session_cancels_running_handlers(pair: Pair) -> None:
    """Closing the serving session cancels its handler through the handler's cancel scope:
    the handler's finally runs, shielded cleanup included; the caller gets Unavailable."""
    probe = Probe()
    with anyio.fail_after(10):
        async with _connect(pair, Tasks(probe)) as (calc, _, server):
            async with anyio.create_task_group() as tg:

                async def close_when_started() -> None:
                    await probe.started.wait()
                    # aclose gives calls in flight a grace; cut it short.
                    with anyio.move_on_after(0.05):
                        await server.aclose()
                    server._shutdown(rapace.Unavailable("test closes the session"))

                tg.start_soon(close_when_started)
                with pytest.raises(rapace.Unavailable):
                    await calc.wait_forever()
            await probe.cleaned_up.wait()


async def test_a_call_cancelled_in_the_read_that_brought_it_is_cancelled(
    anyio_backend: str,
) -> None:
    """Request and CancelChannel arrive in one read, before the handler's task ever ran: the
    handler is still cancelled, at its first checkpoint."""
    probe = Probe()
    client_end, server_end = memory_pair()
    peer = Session(Role.INITIATOR, methods=())
    spec = service_spec(Tasks).by_name["yield_once"]
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def serve() -> None:
                async with open_session(server_end, role=Role.ACCEPTOR, serve=Tasks(probe)):
                    await anyio.sleep_forever()

            tg.start_soon(serve)
            await client_end.send(peer.frames_to_send())  # Hello
            while not peer.handshake_complete:
                for frame in await client_end.receive():
                    peer.receive_frame(frame, time.monotonic_ns())
            channel_id = peer.open_call(
                spec.method_id,
                _codecs(spec).args.encode(()).data,
                now_ns=time.monotonic_ns(),
                kind=spec.kind,
                deadline_ns=None,
                sig_hash=spec.sig_hash,
            )
            peer.cancel(channel_id, CancelReason.CLIENT_CANCEL)
            await client_end.send(peer.frames_to_send())  # one batch: one read
            await probe.finished.wait()
            tg.cancel_scope.cancel()
    assert not probe.completed
    await client_end.aclose()


async def test_a_burst_leaves_no_write_held(pair: Pair) -> None:
    """After many concurrent calls (written in batches), nothing is left held back and
    every call got its answer."""
    with anyio.fail_after(20):
        async with _connect(pair, Tasks()) as (calc, client, server):
            results: dict[int, int] = {}

            async def one(i: int) -> None:
                results[i] = await calc.add(i, 1)

            async with anyio.create_task_group() as tg:
                for i in range(500):
                    tg.start_soon(one, i)
            assert results == {i: i + 1 for i in range(500)}
            await anyio.wait_all_tasks_blocked()
            for session in (client, server):
                assert session._runnable == 0
                assert session._held == []


async def test_a_handler_letting_a_base_exception_out_ends_the_session(pair: Pair) -> None:
    """A BaseException out of a handler is not an error reply: it ends the serving session
    and surfaces from its open_session, as it would from a task group."""
    client_end, server_end = pair()
    caught: list[BaseException] = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def serve() -> None:
                try:
                    async with open_session(server_end, role=Role.ACCEPTOR, serve=Tasks()) as s:
                        await s.wait_closed()
                except BaseException as exc:  # the test inspects it
                    caught.append(exc)

            tg.start_soon(serve)
            async with open_session(client_end, role=Role.INITIATOR) as client:
                calc = Proxy(client, service_spec(Tasks))
                with pytest.raises(rapace.Unavailable):
                    await calc.crash()
    assert len(caught) == 1
    group = caught[0]
    assert isinstance(group, BaseExceptionGroup)
    assert group.subgroup(Boom) is not None


class _HelloThenGone:
    """A transport whose peer says Hello and closes at once: both reach the session in
    consecutive receives, with no checkpoint between them."""

    deadline_mode = "relative"

    def __init__(self) -> None:
        self._peer = Session(Role.INITIATOR, methods=())
        self._said_hello = False

    async def send(self, frames: object) -> None:
        pass

    def send_nowait(self, frames: object) -> bool:
        return True

    async def flush(self) -> None:
        pass

    async def receive(self) -> list[Any]:
        if not self._said_hello:
            self._said_hello = True
            return self._peer.frames_to_send()
        raise anyio.EndOfStream

    async def aclose(self) -> None:
        pass


async def test_a_peer_that_shakes_hands_and_leaves_makes_a_closed_session() -> None:
    """The handshake completed, then the peer closed before the session started serving:
    open_session yields a session that is already closed, instead of raising."""
    with anyio.fail_after(10):
        async with open_session(
            _HelloThenGone(),  # type: ignore[arg-type]  # a duck-typed transport
            role=Role.ACCEPTOR,
            serve=Tasks(),
        ) as server:
            await server.wait_closed()
            assert isinstance(server._close_reason, rapace.Unavailable)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_handler_raising_cancelled_error_of_its_own_is_answered(pair: Pair) -> None:
    """Not a cancellation of its scope nor of the session: the caller is told the call was
    cancelled (it used to wait forever) and the session goes on."""
    with anyio.fail_after(10):
        async with _connect(pair, Tasks()) as (calc, _, _):
            with pytest.raises(rapace.RapaceError, match="cancellation exception of its own"):
                await calc.cancel_itself()
            assert await calc.add(1, 2) == 3
