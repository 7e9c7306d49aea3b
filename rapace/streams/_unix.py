"""A byte stream over a connected Unix socket, driven with ``anyio.wait_readable``.

anyio's own ``UNIXSocketStream`` on the asyncio backend registers a reader whose callback
sets a future; when a ``receive()`` is cancelled and the socket turns readable before the
done-callback removes the reader, the loop logs an ``InvalidStateError`` (anyio issue 1267,
still present in 4.16). ``anyio.wait_readable`` guards against exactly that, so this stream
waits with it and does the non-blocking ``recv``/``send`` itself. It works the same on
trio. Sockets accepted by an anyio listener are wrapped here without ever calling the
listener stream's own receive or send.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import anyio.abc

__all__ = ("UnixByteStream", "connect_unix")


class UnixByteStream(anyio.abc.ByteStream):
    """The stream side of one connected Unix socket.

    Args:
        sock: a connected ``AF_UNIX`` stream socket; it is made non-blocking.
        owner: an anyio stream that owns ``sock`` and must be closed instead of the socket.
    """

    def __init__(self, sock: socket.socket, owner: anyio.abc.AsyncResource | None = None) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._owner = owner
        self._closed = False

    @property
    def extra_attributes(self) -> dict[Any, Any]:
        return {anyio.abc.SocketAttribute.raw_socket: lambda: self._sock}

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        view = memoryview(item).cast("B")
        while view.nbytes:
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            view = view[sent:]
        await anyio.lowlevel.checkpoint()

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the socket takes now, without waiting; the number of bytes written.

        Raises:
            OSError: the connection failed (the next ``send`` reports it as broken).
        """
        if self._closed:
            raise OSError("the stream is closed")
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    async def send_eof(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Wake any task parked on this socket before the fd number can be reused.
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)
        if self._owner is not None:
            await self._owner.aclose()
        else:
            self._sock.close()
            await anyio.lowlevel.checkpoint()


async def connect_unix(path: str) -> UnixByteStream:
    """Connect to a Unix stream socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            # The listener's backlog is full: wait until it accepts us.
            await anyio.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, f"cannot connect to {path}") from None
    except BaseException:
        sock.close()
        raise
    return UnixByteStream(sock)
