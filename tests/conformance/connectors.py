"""How the conformance suite reaches a ``Conformance`` server: one connector per transport.

A connector starts (or reaches) a server that serves a fresh ``Conformance()`` — always that
impl, whatever the client asks for, so tests can call it through a differently shaped service
class — and yields a client proxy for ``service``::

    async with connector(service, env, **options) as proxy: ...

``env`` (:class:`Env`) holds the test's ``tmp_path`` and anyio backend (a server process runs
on the same backend as the test); ``options`` are client session options (``call_timeout``).
Leaving the context closes the connection and stops the server, even when the test failed:
a server process is killed and reaped. Tests observe the server only through RPC (see
``services.py``), so the same test runs against a server in this process or another one.

Adding a transport is one small function plus one entry in :data:`CONNECTORS`:

* Server in the test process: an ``@asynccontextmanager`` like :func:`memory`, which serves
  ``Conformance()`` on one end and yields ``Proxy(session, service_spec(service))`` for the
  other; or, for a transport with a listener URL, :func:`listener` of that URL.
* Server in a child process: :func:`process_connector` of a command line that starts a server
  printing ``READY <address>`` on stdout (e.g. :func:`serve_conformance`) and of an
  :class:`Attach` that connects to that address from the test (e.g. :func:`attach_socket`).
  A connector that needs more (say, an fd to hand to the child) can use :func:`server_process`
  directly: it starts such a command, yields the address and always kills and reaps it.

A connector that cannot run here (a platform without the transport) calls ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

import rapace
from rapace._connect import Proxy, serve_async
from rapace.service import service_spec
from rapace.session import open_session
from rapace.shm import SUPPORTED as SHM_SUPPORTED
from rapace.shm import shm_pair
from rapace.streams._abc import Transport
from rapace.streams._memory import memory_pair
from rapace.wire import Role
from tests.integration.shm_host import shm_child

from .services import Conformance

S = TypeVar("S")

ROOT = Path(__file__).parents[2]
TOKEN = "conformance-token"
# A server process must print READY within this (interpreter start and imports, on a busy
# machine), and exit within this once killed.
READY_TIMEOUT_S = 20.0
REAP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Env:
    """What a connector may use from the test: a private directory and the anyio backend."""

    tmp_path: Path
    backend: str


Connect = Callable[..., AbstractAsyncContextManager[Any]]
"""What tests get from the ``connect`` fixture: ``connect(Service, **options)``, an async
context manager yielding a proxy (typed ``Any``: tests call observation methods freely)."""


class Connector(Protocol):
    def __call__(
        self, service: type[S], env: Env, /, **options: Any
    ) -> AbstractAsyncContextManager[S]: ...


class Attach(Protocol):
    """Connect to the server at ``address`` (from its READY line); yield a proxy."""

    def __call__(
        self, address: str, service: type[S], /, **options: Any
    ) -> AbstractAsyncContextManager[S]: ...


# ---------------------------------------------------------------- in this process


def pair_connector(make_pair: Callable[[], tuple[Transport, Transport]]) -> Connector:
    """Both ends of a link made by ``make_pair``, the server end served by a task here."""

    @asynccontextmanager
    async def connect(service: type[S], env: Env, /, **options: Any) -> AsyncIterator[S]:
        async with _serve_pair(make_pair(), service, **options) as proxy:
            yield proxy

    return connect


@asynccontextmanager
async def _serve_pair(
    ends: tuple[Transport, Transport], service: type[S], **options: Any
) -> AsyncIterator[S]:
    client_end, server_end = ends

    async def run_server() -> None:
        async with open_session(server_end, role=Role.ACCEPTOR, serve=Conformance()) as session:
            await session.wait_closed()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_server)
        async with open_session(client_end, role=Role.INITIATOR, **options) as session:
            yield cast(S, Proxy(session, service_spec(service)))
        tg.cancel_scope.cancel()


memory = pair_connector(memory_pair)


@asynccontextmanager
async def shm_process(service: type[S], env: Env, /, **options: Any) -> AsyncIterator[S]:
    """A worker process attached to a shared-memory link through inherited fds."""
    if not SHM_SUPPORTED:
        pytest.skip("shared memory needs Linux on x86-64")
    async with (
        shm_child("tests.integration.plugins.serve_shm", backend=env.backend) as (transport, _),
        open_session(transport, role=Role.INITIATOR, **options) as session,
    ):
        yield cast(S, Proxy(session, service_spec(service)))


def _shm_pair() -> tuple[Transport, Transport]:
    if not SHM_SUPPORTED:
        pytest.skip("shared memory needs Linux on x86-64")
    return shm_pair()


def listener(url_for: Callable[[Env], str], token: str | None) -> Connector:
    """A real listener served by a task here (``serve_async``), reached by ``rapace.connect``."""

    @asynccontextmanager
    async def connect(service: type[S], env: Env, /, **options: Any) -> AsyncIterator[S]:
        async with anyio.create_task_group() as tg:
            bound = await tg.start(
                lambda task_status: serve_async(
                    Conformance(), listen=url_for(env), token=token, task_status=task_status
                )
            )
            async with rapace.connect(str(bound), service, token=token, **options) as proxy:
                yield proxy
            tg.cancel_scope.cancel()

    return connect


# ------------------------------------------------------------ in a child process


@asynccontextmanager
async def server_process(
    command: Sequence[str], *, pass_fds: Sequence[int] = ()
) -> AsyncIterator[str]:
    """Run ``command``, a server that prints ``READY <address>``; yield the address.

    The child's stderr is the test's (pytest shows it when the test fails); its stdin is a
    pipe that closes when it is reaped. On leaving, whatever happened, the child is killed
    and waited for (bounded: the leak check reports a child that outlives its test).
    """
    process = await anyio.open_process(list(command), cwd=ROOT, stderr=None, pass_fds=pass_fds)
    async with process:  # closes the pipes
        try:
            with anyio.fail_after(READY_TIMEOUT_S):
                address = await _read_ready(process, command)
            yield address
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            with anyio.move_on_after(REAP_TIMEOUT_S, shield=True):
                await process.wait()


async def _read_ready(process: anyio.abc.Process, command: Sequence[str]) -> str:
    assert process.stdout is not None
    try:
        line = await BufferedByteReceiveStream(process.stdout).receive_until(b"\n", 4096)
    except (anyio.IncompleteRead, anyio.DelimiterNotFound) as exc:
        raise RuntimeError(
            f"server process {list(command)} exited or wrote garbage before READY "
            "(its stderr is in the captured output)"
        ) from exc
    words = line.decode(errors="replace").split()
    if len(words) != 2 or words[0] != "READY":
        raise RuntimeError(f"server process {list(command)} said {line!r}, not READY <address>")
    return words[1]


def process_connector(command: Callable[[Env], Sequence[str]], attach: Attach) -> Connector:
    """A server started by ``command(env)`` in a child process, reached by ``attach``."""

    @asynccontextmanager
    async def connect(service: type[S], env: Env, /, **options: Any) -> AsyncIterator[S]:
        async with (
            server_process(command(env)) as address,
            attach(address, service, **options) as proxy,
        ):
            yield proxy

    return connect


def serve_conformance(
    url_for: Callable[[Env], str], token: str | None
) -> Callable[[Env], list[str]]:
    """The command line of ``tests/integration/plugins/serve_conformance.py`` on a URL."""

    def command(env: Env) -> list[str]:
        return [
            sys.executable,
            "-m",
            "tests.integration.plugins.serve_conformance",
            url_for(env),
            *([token] if token is not None else []),
            "--backend",
            env.backend,
        ]

    return command


def attach_socket(token: str | None) -> Attach:
    """``rapace.connect`` to a Unix, TCP or WebSocket address, with ``token``."""

    def attach(address: str, service: type[S], /, **options: Any) -> AbstractAsyncContextManager[S]:
        return rapace.connect(address, service, token=token, **options)

    return attach


# --------------------------------------------------------------------- registry


def _unix_url(env: Env) -> str:
    return f"unix://{env.tmp_path / 'rapace.sock'}"


def _tcp_url(env: Env) -> str:
    return "tcp://127.0.0.1:0"


def _ws_url(env: Env) -> str:
    return "ws://127.0.0.1:0/rapace"


CONNECTORS: dict[str, Connector] = {
    "memory": memory,
    "unix": listener(_unix_url, None),
    "tcp": listener(_tcp_url, TOKEN),
    "ws": listener(_ws_url, TOKEN),
    "shm": pair_connector(_shm_pair),
    "unix-process": process_connector(serve_conformance(_unix_url, None), attach_socket(None)),
    "tcp-process": process_connector(serve_conformance(_tcp_url, TOKEN), attach_socket(TOKEN)),
    "ws-process": process_connector(serve_conformance(_ws_url, TOKEN), attach_socket(TOKEN)),
    "shm-process": shm_process,
}
"""Every transport the suite runs over, by name (the name is the test id)."""
