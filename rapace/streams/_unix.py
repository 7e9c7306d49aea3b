"""A byte stream over a connected Unix socket, doing the non-blocking ``recv``/``send`` itself.

anyio's own ``UNIXSocketStream`` on the asyncio backend registers a reader whose callback
sets a future; when a ``receive()`` is cancelled and the socket turns readable before the
done-callback removes the reader, the loop logs an ``InvalidStateError`` (anyio issue 1267,
still present in 4.16). So this stream does its own reading:

- on asyncio, like asyncio's own transports, the socket stays registered with the loop and
  the loop's callback reads, then either buffers the data and wakes the receiver (if any,
  and only if its future is not done) or hands it straight to a consumer
  (:meth:`UnixByteStream.receive_into`). ``anyio.wait_readable`` would register and
  unregister the socket on every read: an ``epoll_ctl`` pair, a failed ``recv`` and a
  future per message, which cost a unary call over a socket pair ~28 us of ~100 (in one
  process, both ends; asyncio, 2-vCPU VM);
- on trio (or a loop without ``add_reader``) it waits with ``anyio.wait_readable``.

Sockets accepted by an anyio listener are wrapped here without ever calling the listener
stream's own receive or send.
"""

from __future__ import annotations

import asyncio
import socket

# asyncio's own Task steps use these to say which task runs; there is no public spelling.
from asyncio.tasks import _enter_task, _leave_task
from collections import deque
from collections.abc import Callable
from typing import Any, Final, NoReturn

import anyio
import anyio.abc

__all__ = ("UnixByteStream", "connect_unix")

# What one recv asks for (the frame reader parses large reads). Reads go into a buffer kept
# for the connection: ``sock.recv(256 KiB)`` would allocate 256 KiB per read, which glibc
# serves with mmap/mremap/munmap, three system calls and a page fault per message.
_RECV_BYTES: Final = 256 * 1024
# The asyncio reader stops reading while this much is buffered and nobody takes it.
_PAUSE_BYTES: Final = 4 * 1024 * 1024


_End = anyio.EndOfStream | anyio.BrokenResourceError | anyio.ClosedResourceError


class _LoopReader:
    """asyncio: the socket stays registered for reading and the loop's callback reads.

    Pull (:meth:`receive`): reads are buffered (reading pauses while too much is) and the
    receiver is woken. Push (:meth:`receive_into`): each read goes straight to a callback,
    as a view of the read buffer valid only during the call.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._buffer = memoryview(bytearray(_RECV_BYTES))
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._end: _End | None = None
        self._deliver: Callable[[memoryview], None] | None = None
        self._receiver: asyncio.Task[Any] | None = None  # the task in receive_into
        self._failure: Exception | None = None  # what ``deliver`` raised
        self._waiter: asyncio.Future[None] | None = None
        self._reading = False
        self._resume()

    def _resume(self) -> None:
        if not self._reading and self._end is None:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def _pause(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        buffer = self._buffer
        try:
            size = self._sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(anyio.BrokenResourceError(str(exc)))
            return
        if not size:
            self._finish(anyio.EndOfStream())
            return
        deliver = self._deliver
        if deliver is not None:
            task = self._receiver
            assert task is not None
            # The read is the receiving task's work: anything deliver runs (a session runs
            # handlers that never suspend right there) sees that task as the current one,
            # as anyio's cancel scopes and sniffio need.
            _enter_task(self._loop, task)
            try:
                deliver(buffer[:size])
            except Exception as exc:  # handed to receive_into's task, which raises it
                self._deliver = None
                self._failure = exc
                self._pause()
                self._wake()
            finally:
                _leave_task(self._loop, task)
            return
        data = bytes(buffer[:size])
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= _PAUSE_BYTES:
            self._pause()
        self._wake()

    def _finish(self, end: _End) -> None:
        if self._end is None:
            self._end = end
        self._pause()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # its receive() was cancelled: nothing to wake
                waiter.set_result(None)

    async def _wait(self) -> None:
        self._resume()  # no-op unless paused by a full buffer or a failed delivery
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _raise_end(self) -> NoReturn:
        end = self._end
        assert end is not None
        raise type(end)(*end.args)  # a fresh exception each time, not one growing traceback

    async def receive(self, max_bytes: int) -> bytes:
        while not self._chunks:
            if self._end is not None:
                self._raise_end()
            await self._wait()
        data = self._chunks.popleft()
        if len(data) > max_bytes:
            self._chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        self._buffered -= len(data)
        if not self._reading and self._buffered < _PAUSE_BYTES // 2:
            self._resume()
        return data

    async def receive_into(self, deliver: Callable[[memoryview], None]) -> NoReturn:
        while self._chunks:  # what was read before, first
            data = self._chunks.popleft()
            self._buffered -= len(data)
            deliver(memoryview(data))
        self._deliver = deliver
        self._receiver = asyncio.current_task()
        try:
            while True:
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                if self._end is not None:
                    self._raise_end()
                await self._wait()
        finally:
            self._deliver = None

    def close(self) -> None:
        """Stop reading (before the socket closes, so the fd number is free for reuse)."""
        self._end = anyio.ClosedResourceError()
        self._pause()
        self._wake()


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
        self._reader: _LoopReader | None = None  # asyncio: made on the first receive
        self._reader_checked = False
        self._buffer = memoryview(bytearray())  # for reads without the asyncio reader

    @property
    def extra_attributes(self) -> dict[Any, Any]:
        return {anyio.abc.SocketAttribute.raw_socket: lambda: self._sock}

    def _loop_reader(self) -> _LoopReader | None:
        if not self._reader_checked:
            self._reader_checked = True
            self._reader = _loop_reader(self._sock)
        return self._reader

    async def receive_into(self, deliver: Callable[[memoryview], None]) -> NoReturn:
        """Hand every read to ``deliver`` until the stream ends, then raise as
        :meth:`receive` would (or raise what ``deliver`` raised).

        ``deliver`` gets a view that is only valid during the call, and must not block: on
        asyncio it runs straight from the loop's read callback, a task switch less per read
        than ``receive()`` in a loop.
        """
        reader = self._loop_reader()
        if reader is None:
            while True:
                deliver(memoryview(await self.receive(_RECV_BYTES)))
        if self._closed:
            raise anyio.ClosedResourceError
        await reader.receive_into(deliver)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        reader = self._loop_reader()
        if reader is not None:
            if self._closed:
                raise anyio.ClosedResourceError
            return await reader.receive(max_bytes)
        while True:
            if self._closed:
                raise anyio.ClosedResourceError
            if self._buffer.nbytes < max_bytes:
                self._buffer = memoryview(bytearray(max_bytes))
            try:
                size = self._sock.recv_into(self._buffer, max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError(str(exc)) from exc
            if not size:
                raise anyio.EndOfStream
            return bytes(self._buffer[:size])

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
        if self._reader is not None:
            self._reader.close()
        if self._sock.fileno() >= 0:
            anyio.notify_closing(self._sock)
        if self._owner is not None:
            await self._owner.aclose()
        else:
            self._sock.close()
            await anyio.lowlevel.checkpoint()


def _loop_reader(sock: socket.socket) -> _LoopReader | None:
    """A reader driven by the running asyncio loop's callbacks, or None (trio, or a loop
    that cannot watch sockets)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # not asyncio
    try:
        return _LoopReader(loop, sock)
    except NotImplementedError:
        return None


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
