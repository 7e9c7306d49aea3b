"""A large result nobody decodes (its caller gave up) still gives its block back: otherwise
every cancelled call would keep one of the link's lent blocks until the link closes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

import rapace
from rapace import Streaming
from rapace._connect import Proxy
from rapace.service import service_spec
from rapace.session import open_session
from rapace.shm import SUPPORTED, ShmTransport, shm_pair
from rapace.wire import Role

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64"),
]

LARGE = 256 * 1024


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@rapace.service
class Slow:
    def __init__(self) -> None:
        self.release = anyio.Event()

    async def late(self) -> bytes:
        """Answers only once told to, long after its caller gave up (deaf to the cancel)."""
        with anyio.CancelScope(shield=True):
            await self.release.wait()
        return bytes(LARGE)

    async def let_go(self) -> None:
        self.release.set()

    async def items(self) -> Streaming[bytes]:
        for _ in range(4):
            yield bytes(LARGE)

    async def ping(self) -> int:
        return 1


@asynccontextmanager
async def linked() -> AsyncIterator[tuple[Any, ShmTransport]]:
    client_end, server_end = shm_pair()
    impl = Slow()

    async def serve() -> None:
        async with open_session(server_end, role=Role.ACCEPTOR, serve=impl) as session:
            await session.wait_closed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        async with open_session(client_end, role=Role.INITIATOR) as session:
            yield Proxy(session, service_spec(Slow)), server_end
        tg.cancel_scope.cancel()


async def _settle(proxy: Any) -> None:
    # Two round trips: the dropped frame is handled before the first answer (frames arrive
    # in order), its return rides on the next request, the server takes it on the next drain.
    assert await proxy.ping() == 1
    assert await proxy.ping() == 1


async def test_a_response_that_arrives_after_its_caller_gave_up(anyio_backend: str) -> None:
    with anyio.fail_after(10):
        async with linked() as (proxy, server_end):
            with anyio.move_on_after(0.05):
                await proxy.late()
            await proxy.let_go()  # the handler answers now, to a caller that left
            await _settle(proxy)
            assert server_end._buffer_blocks.in_flight == 0


async def test_items_left_unread_in_a_closed_stream(anyio_backend: str) -> None:
    with anyio.fail_after(10):
        async with linked() as (proxy, server_end):
            async with proxy.items() as stream:
                async for _ in stream:
                    break  # the other items arrive (or are on their way) unread
            await _settle(proxy)
            await _settle(proxy)
            assert server_end._buffer_blocks.in_flight == 0
            assert server_end.stats.bytes_copied >= LARGE
