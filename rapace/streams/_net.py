"""Addresses, connecting and listening: ``tcp://host:port``, ``unix:///path`` and
``ws://host:port/path``.

TCP and WebSocket listeners require a token (an HMAC challenge-response, see
:mod:`rapace.streams._auth`); Unix sockets are protected by file permissions: the socket is
created 0600. WebSocket needs the optional ``websockets`` package (``rapace[websocket]``),
imported only when a ``ws://`` address is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import anyio
import anyio.abc

from rapace._errors import RemoteProtocolError, Unauthenticated
from rapace.streams._abc import Transport
from rapace.streams._auth import accept_greeting, send_greeting
from rapace.streams._framing import DEFAULT_MAX_FRAME_BYTES
from rapace.streams._stream_transport import StreamTransport
from rapace.streams._unix import UnixByteStream, connect_unix

__all__ = ("Address", "connect_transport", "parse_address", "serve_transports")


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed address. ``path`` is the socket file's (unix) or the HTTP path (ws)."""

    scheme: Literal["tcp", "unix", "ws"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.scheme == "ws":
            return f"ws://{host}:{self.port}{self.path}"
        return f"tcp://{host}:{self.port}"


def _refuse_a_live_socket(path: str) -> None:
    """anyio removes whatever socket file is at ``path`` before binding: a second server
    would silently take the address of one still serving. A stale file (nobody accepts on
    it) may go; a live one is EADDRINUSE."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return  # nothing there, or a stale file: binding may replace it
    except OSError:
        return  # not a socket, no permission...: let the bind report it
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another server is listening on {path}", path)


def parse_address(url: str) -> Address:
    """Parse ``tcp://host:port``, ``unix:///absolute/path`` or ``ws://host[:port][/path]``
    (port 80 and path ``/`` when left out).

    Raises:
        ValueError: the URL names another scheme or lacks a part.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path if not parts.netloc else f"/{parts.netloc}{parts.path}"
        if not path:
            raise ValueError(f"{url!r}: a unix:// address needs a path, e.g. unix:///tmp/p.sock")
        return Address("unix", path=path)
    if parts.scheme == "tcp":
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r}: a tcp:// address needs a host and a port")
        return Address("tcp", host=parts.hostname, port=parts.port)
    if parts.scheme == "ws":
        if parts.hostname is None:
            raise ValueError(f"{url!r}: a ws:// address needs a host, e.g. ws://host:7700/rapace")
        if parts.query or parts.fragment:
            raise ValueError(f"{url!r}: a ws:// address has no query or fragment")
        port = 80 if parts.port is None else parts.port
        return Address("ws", host=parts.hostname, port=port, path=parts.path or "/")
    if parts.scheme == "wss":
        raise ValueError(
            f"{url!r}: wss:// (TLS) is not supported; serve ws:// behind a TLS-terminating proxy"
        )
    raise ValueError(f"{url!r}: unsupported scheme (use tcp://, unix:// or ws://)")


def _token_bytes(token: str | bytes | None) -> bytes | None:
    if token is None:
        return None
    return token.encode() if isinstance(token, str) else bytes(token)


def _websocket() -> ModuleType:
    """:mod:`rapace.streams._websocket`, or an ImportError saying what to install."""
    try:
        from rapace.streams import _websocket
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("websockets"):
            raise
        raise ModuleNotFoundError(
            "ws:// addresses need the websockets package: pip install 'rapace[websocket]'",
            name=exc.name,
        ) from exc
    return _websocket


async def connect_transport(
    address: Address | str,
    *,
    token: str | bytes | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Transport:
    """Connect, complete the greeting (and token proof), and return the transport.

    Raises:
        Unauthenticated: the listener refused the token, or wanted one and none was given.
        RemoteProtocolError: the other end is not a rapace listener.
        OSError: nothing listens there.
    """
    if isinstance(address, str):
        address = parse_address(address)
    if address.scheme == "ws":
        transport: Transport = await _websocket().connect_websocket(
            address.host,
            address.port,
            address.path,
            token=_token_bytes(token),
            max_frame_bytes=max_frame_bytes,
        )
        return transport
    stream: anyio.abc.ByteStream
    if address.scheme == "unix":
        stream = await connect_unix(address.path)
    else:
        stream = await anyio.connect_tcp(address.host, address.port)
    try:
        initial = await accept_greeting(stream, _token_bytes(token))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
        raise
    return StreamTransport(stream, max_frame_bytes=max_frame_bytes, initial=initial)


async def serve_transports(
    address: Address | str,
    handler: Callable[[Transport], Awaitable[None]],
    *,
    token: str | bytes | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    task_status: anyio.abc.TaskStatus[Address] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Listen and run ``handler`` for each authenticated connection, each in its own task.

    A connection that fails the greeting is closed without reaching ``handler``; a handler
    that raises ends only its connection. Reports the bound address (with the real port
    when 0 was asked for) through ``task_status``.

    Raises:
        ValueError: a TCP or WebSocket listener without a token.
    """
    if isinstance(address, str):
        address = parse_address(address)
    secret = _token_bytes(token)
    websocket = _websocket() if address.scheme == "ws" else None  # fail before listening
    listener: anyio.abc.Listener[anyio.abc.SocketStream]
    if address.scheme == "unix":
        _refuse_a_live_socket(address.path)
        listener = await anyio.create_unix_listener(address.path, mode=0o600)
        bound = address
    else:
        if secret is None:
            kind = "WebSocket" if address.scheme == "ws" else "TCP"
            raise ValueError(f"a {kind} listener requires a token (token=...)")
        multi = await anyio.create_tcp_listener(local_host=address.host, local_port=address.port)
        listener = multi
        local = multi.listeners[0].extra(anyio.abc.SocketAttribute.local_address)
        assert isinstance(local, tuple)  # an IP listener's address is (host, port, ...)
        bound = Address(address.scheme, host=str(local[0]), port=int(local[1]), path=address.path)

    async def open_transport(accepted: anyio.abc.SocketStream) -> Transport:
        if websocket is not None:
            transport: Transport = await websocket.accept_websocket(
                accepted, address.path, token=secret, max_frame_bytes=max_frame_bytes
            )
            return transport
        stream: anyio.abc.ByteStream = accepted
        if address.scheme == "unix":
            # See rapace.streams._unix for why anyio's own Unix stream is bypassed.
            raw = accepted.extra(anyio.abc.SocketAttribute.raw_socket)
            stream = UnixByteStream(raw, owner=accepted)
        try:
            initial = await send_greeting(stream, secret)
        except BaseException:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()
            raise
        return StreamTransport(stream, max_frame_bytes=max_frame_bytes, initial=initial)

    async def serve_one(accepted: anyio.abc.SocketStream) -> None:
        try:
            try:
                transport = await open_transport(accepted)
            except (
                Unauthenticated,
                RemoteProtocolError,
                anyio.BrokenResourceError,
                anyio.EndOfStream,
                TimeoutError,
                OSError,
            ):
                return  # refused or gone before it said anything useful: just close
            try:
                await handler(transport)
            except* (RemoteProtocolError, anyio.BrokenResourceError, anyio.EndOfStream):
                # A peer that breaks the protocol or vanishes ends its own connection only,
                # also when the handler reports it inside an exception group (a session
                # that fails while opening does), which contextlib.suppress does not look
                # into before Python 3.12.
                pass
            finally:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await transport.aclose()
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await accepted.aclose()

    try:
        async with listener:
            task_status.started(bound)
            await listener.serve(serve_one)
    finally:
        if address.scheme == "unix":
            # The socket file outlives its listener unless removed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
