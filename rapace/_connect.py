"""``rapace.connect`` and ``rapace.serve``: services over Unix and TCP sockets and WebSocket.

::

    rapace.serve(CalculatorImpl(), listen="tcp://127.0.0.1:7700", token="...")   # blocks
    async with rapace.connect("tcp://127.0.0.1:7700", Calculator, token="...") as calc:
        await calc.add(2, 3)

    rapace.serve(CalculatorImpl(), listen="ws://0.0.0.0:7701/calc", token="...")  # WebSocket
    async with rapace.connect("ws://host:7701/calc", Calculator, token="...") as calc: ...

WebSocket carries one frame per binary message, so a browser can be a client; it needs the
``websockets`` package (``pip install 'rapace[websocket]'``).

The proxy is typed as the service class, so a type checker sees ``await calc.add(2, 3)`` as
``int`` for ``async def add(...) -> int``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar, cast

import anyio
import anyio.abc

from rapace.service import MethodSpec, ServiceSpec, service_spec
from rapace.session import RpcSession, open_session
from rapace.streams._abc import Transport
from rapace.streams._net import Address, connect_transport, serve_transports
from rapace.wire import Role

__all__ = ("Proxy", "connect", "serve", "serve_async")

S = TypeVar("S")


class Proxy:
    """A client for one service over one session: each method of the service is an
    attribute. Unary and client-streaming methods are coroutines; server- and bidi-streaming
    methods return a :class:`rapace.session.RemoteStream` to iterate."""

    def __init__(self, session: RpcSession, spec: ServiceSpec) -> None:
        self._session = session
        self._spec = spec
        for method in spec.methods:
            setattr(self, method.name, _bind(session, method))

    def __repr__(self) -> str:
        return f"<rapace proxy for {self._spec.name}>"


def _bind(session: RpcSession, method: MethodSpec) -> Callable[..., Any]:
    if method.kind.handler_streams:

        def stream(*args: Any, **kwargs: Any) -> Any:
            return session.stream(method, args, kwargs)

        stream.__name__ = stream.__qualname__ = method.name
        return stream

    async def call(*args: Any, **kwargs: Any) -> Any:
        return await session.call(method, args, kwargs)

    call.__name__ = call.__qualname__ = method.name
    return call


@contextlib.asynccontextmanager
async def connect(
    url: str,
    service: type[S],
    *,
    token: str | bytes | None = None,
    call_timeout: float | None = None,
    ping_interval: float | None = None,
) -> AsyncIterator[S]:
    """Connect to a served service and yield a proxy for it.

    Args:
        url: ``tcp://host:port``, ``unix:///path`` or ``ws://host:port/path``.
        service: the service class (or interface) the server implements.
        token: the listener's token (TCP and WebSocket listeners always require one); it
            is proven by an HMAC challenge-response, never sent.
        call_timeout: default deadline in seconds for every call; exceeding it raises
            :class:`rapace.DeadlineExceeded`.
        ping_interval: keep-alive period in seconds; a silent server closes the connection.

    Raises:
        rapace.Unauthenticated: the token was refused or missing.
        rapace.IncompatibleSchema: (on a call) the server's method has another signature.
        rapace.RemoteProtocolError: ``url`` is not a rapace listener (for ``ws://``: not
            at that path).
        OSError: nothing listens at ``url``.
        ModuleNotFoundError: a ``ws://`` URL without the ``websockets`` package.
    """
    spec = service_spec(service)
    transport = await connect_transport(url, token=token)
    async with open_session(
        transport, role=Role.INITIATOR, call_timeout=call_timeout, ping_interval=ping_interval
    ) as session:
        yield cast(S, Proxy(session, spec))


async def serve_async(
    impl: object,
    *,
    listen: str,
    token: str | bytes | None = None,
    task_status: anyio.abc.TaskStatus[Address] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``impl`` on ``listen`` until cancelled; each connection gets its own session.

    ``listen`` and ``token`` are as for :func:`serve`. The bound address (with the real port
    when port 0 was asked for) is reported through ``task_status``.

    Raises:
        ValueError: a ``tcp://`` or ``ws://`` listener without a token.
        OSError: the address cannot be listened on.
    """
    service_spec(impl)  # fail now, not on the first connection

    async def handle(transport: Transport) -> None:
        async with open_session(transport, role=Role.ACCEPTOR, serve=impl) as session:
            await session.wait_closed()

    await serve_transports(listen, handle, token=token, task_status=task_status)


def serve(impl: object, *, listen: str | None = None, token: str | bytes | None = None) -> None:
    """Serve ``impl`` and block until interrupted.

    Args:
        impl: an instance of a ``@rapace.service`` class (or of a subclass implementing one).
        listen: ``tcp://host:port`` or ``ws://host:port/path`` (a token is required; a
            WebSocket listener answers only on its path, one frame per binary message), or
            ``unix:///path`` (created 0600).
        token: the secret clients must prove they know (HMAC challenge-response).
    """
    if listen is None:
        from rapace._bootstrap import ENV_VAR

        if ENV_VAR not in os.environ:
            raise ValueError(
                "serve() without listen=... attaches to the PluginPool that started this "
                "program (PluginPool(Service, command=[...])); none did. Pass listen=URL to "
                "serve on a socket instead."
            )
        from rapace.worker import serve_from_host

        service_spec(impl)  # fail here, in the program, not in the host's handshake
        serve_from_host(impl)
    anyio.run(partial(serve_async, impl, listen=listen, token=token))
