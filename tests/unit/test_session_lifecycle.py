"""RpcSession lifecycle: keep-alive against a hung peer, graceful GoAway."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

import rapace
from rapace._connect import Proxy
from rapace.service import service_spec
from rapace.session import open_session
from rapace.streams._memory import memory_pair
from rapace.wire import Role, Session
from tests.conformance.services import Conformance, Observed

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_ping_detects_a_hung_peer() -> None:
    """A peer that shook hands and then went silent is declared dead; calls fail."""
    client_end, peer_end = memory_pair()
    hung = Session(Role.ACCEPTOR, methods=service_spec(Conformance).method_table())
    with anyio.fail_after(10):
        await peer_end.send(hung.frames_to_send())  # its Hello, then silence
        async with open_session(client_end, role=Role.INITIATOR, ping_interval=0.1) as session:
            calc = Proxy(session, service_spec(Conformance))
            with pytest.raises(rapace.Unavailable, match="ping"):
                await calc.add(1, 2)
    await peer_end.aclose()


async def test_go_away_finishes_calls_in_flight_and_refuses_new_ones() -> None:
    """Closing the serving side: the call in flight completes, a new call is refused."""
    observed = Observed()
    client_end, server_end = memory_pair()
    results: list[int] = []
    closing = anyio.Event()

    async def serve() -> None:
        async with open_session(
            server_end, role=Role.ACCEPTOR, serve=Conformance(observed)
        ) as server:
            await closing.wait()
            await server.aclose()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as outer:
            outer.start_soon(serve)
            async with open_session(client_end, role=Role.INITIATOR) as client:
                calc = Proxy(client, service_spec(Conformance))

                async def in_flight() -> None:
                    results.append(await calc.blocking(5))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(in_flight)
                    await anyio.to_thread.run_sync(observed.thread_started.wait, 5)
                    closing.set()
                    # Every task idle: the GoAway has crossed the in-memory link.
                    await anyio.wait_all_tasks_blocked()
                    assert client._wire.go_away_received is not None
                    with pytest.raises(rapace.Unavailable):
                        await calc.add(1, 1)
                    observed.release.set()
    assert results == [10]
