"""UnixByteStream: pull and push reads (on asyncio from the loop's read callback), read
pausing under backpressure, cancellation and closing; StreamTransport.receive_into."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import anyio
import pytest

from rapace.streams import _unix
from rapace.streams._framing import encode_frame
from rapace.streams._stream_transport import StreamTransport
from rapace.streams._unix import UnixByteStream
from rapace.wire import Descriptor, Frame
from rapace.wire._descriptor import DATA

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def pair() -> Iterator[tuple[UnixByteStream, socket.socket]]:
    """(our stream, the raw peer socket, blocking)."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = UnixByteStream(ours)
    yield stream, peer
    peer.close()
    ours.close()


async def test_a_cancelled_receive_loses_nothing(
    pair: tuple[UnixByteStream, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A receive cancelled while waiting leaves the stream usable; data that arrives after
    it is read by the next receive, and the loop logs no error (anyio issue 1267)."""
    stream, peer = pair
    with anyio.move_on_after(0.05):
        await stream.receive()
    peer.sendall(b"after")
    await anyio.sleep(0.01)  # the loop sees the socket readable with nobody waiting
    with anyio.fail_after(5):
        assert await stream.receive() == b"after"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    await stream.aclose()


async def test_receive_into_delivers_everything_in_order(
    pair: tuple[UnixByteStream, socket.socket],
) -> None:
    """Bytes already read for a pull receive come first, then every later read; the end of
    the stream ends receive_into with EndOfStream."""
    stream, peer = pair
    peer.sendall(b"first")
    with anyio.fail_after(5):
        assert await stream.receive() == b"first"
    peer.sendall(b"second")
    await anyio.sleep(0.01)  # may be buffered by the loop's reader before receive_into
    got = bytearray()

    def deliver(data: memoryview) -> None:
        got.extend(data)  # a view of the read buffer: copied, not kept
        if got == b"secondthird":
            peer.shutdown(socket.SHUT_WR)

    peer.sendall(b"third")
    with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
        await stream.receive_into(deliver)
    assert got == b"secondthird"
    await stream.aclose()


async def test_receive_into_raises_what_deliver_raises(
    pair: tuple[UnixByteStream, socket.socket],
) -> None:
    stream, peer = pair

    def deliver(data: memoryview) -> None:
        raise ValueError(bytes(data).decode())

    peer.sendall(b"bad")
    with anyio.fail_after(5), pytest.raises(ValueError, match="bad"):
        await stream.receive_into(deliver)
    # The stream still reads afterwards.
    peer.sendall(b"more")
    with anyio.fail_after(5):
        assert await stream.receive() == b"more"
    await stream.aclose()


async def test_reading_pauses_while_too_much_is_buffered(
    pair: tuple[UnixByteStream, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nobody receiving: the reader stops reading past the limit (the peer's writes then
    block on a full socket), and everything arrives intact once it is received."""
    monkeypatch.setattr(_unix, "_PAUSE_BYTES", 64 * 1024)
    stream, peer = pair
    data = bytes(range(256)) * 4096  # 1 MiB
    with anyio.fail_after(10):
        peer.sendall(b"!")
        assert await stream.receive() == b"!"  # the stream is reading from here on
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, peer.sendall, data)
            reader = stream._reader
            if reader is not None:  # asyncio: the loop's reader pauses itself
                for _ in range(1000):
                    if not reader._reading:
                        break
                    await anyio.sleep(0.005)
                assert not reader._reading
                assert reader._buffered < 64 * 1024 + _unix._RECV_BYTES
            received = bytearray()
            while len(received) < len(data):
                received += await stream.receive(65536)
    assert received == data
    await stream.aclose()


async def test_closing_wakes_a_waiting_receive(
    pair: tuple[UnixByteStream, socket.socket],
) -> None:
    stream, _ = pair
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def receive() -> None:
                with pytest.raises((anyio.ClosedResourceError, anyio.BrokenResourceError)):
                    await stream.receive()

            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()


def _frame(payload: bytes) -> bytes:
    frame = Frame(Descriptor(msg_id=1, channel_id=1, flags=DATA), payload)
    return b"".join(bytes(piece) for piece in encode_frame(frame))


async def test_transport_receive_into_frames_and_end(
    pair: tuple[UnixByteStream, socket.socket],
) -> None:
    """Frames split across reads are delivered whole; an EOF in the middle of a frame is
    a broken connection, not a clean end."""
    stream, peer = pair
    transport = StreamTransport(stream)
    payloads: list[bytes] = []
    wire = _frame(b"x" * 100) + _frame(b"y" * 5)

    def deliver(frames: list[Frame]) -> None:
        payloads.extend(bytes(f.payload) for f in frames)
        if len(payloads) == 2:
            peer.sendall(wire[:10])  # half a frame, then the end
            peer.shutdown(socket.SHUT_WR)

    peer.sendall(wire[:7])
    await anyio.sleep(0.01)
    peer.sendall(wire[7:])
    with anyio.fail_after(5), pytest.raises(anyio.BrokenResourceError, match="middle of a frame"):
        await transport.receive_into(deliver)
    assert payloads == [b"x" * 100, b"y" * 5]
    await transport.aclose()
