"""ShmTransport between two mappings in one process: ordering, waiting, closing, limits,
and a peer that breaks the rules."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import AsyncIterator

import anyio
import pytest

import rapace
from rapace.shm import (
    SUPPORTED,
    LinkOptions,
    SegmentSpaceError,
    ShmTransport,
    SizeClass,
    attach_link,
    create_link,
    shm_pair,
)
from rapace.shm._doorbell import Doorbell
from rapace.shm._layout import ControlWord
from rapace.shm._segment import SHM_DIR, owner_of
from rapace.wire import Descriptor, Flags, Frame

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64"),
]
TINY = LinkOptions(ring_capacity=4, classes=(SizeClass(64, 1), SizeClass(1024, 1)))
_SEQ = struct.Struct("<Q")


def _own_segments() -> list[str]:
    # Only this process's: other test runs on the machine share /dev/shm.
    return [n for n in os.listdir(SHM_DIR) if owner_of(n) == os.getpid()]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[ShmTransport, ShmTransport]]:
    a, b = shm_pair()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@pytest.fixture
async def tiny_pair() -> AsyncIterator[tuple[ShmTransport, ShmTransport]]:
    a, b = shm_pair(TINY)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def frame(seq: int, payload: bytes = b"") -> Frame:
    return Frame(
        Descriptor(msg_id=seq + 1, channel_id=1, flags=Flags.DATA), _SEQ.pack(seq) + payload
    )


async def receive_n(transport: ShmTransport, n: int) -> list[Frame]:
    got: list[Frame] = []
    while len(got) < n:
        got += await transport.receive()
    return got


async def test_frames_arrive_in_order_with_their_payloads(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    """Inline, slot and block payloads keep their bytes and their order."""
    a, b = pair
    sizes = [0, 8, 9, 16, 17, 2048, 2049, 40_000, 600_000, 3 * 2**20]
    frames = [frame(i, os.urandom(size)) for i, size in enumerate(sizes)]
    with anyio.fail_after(10):
        await a.send(frames)
        got = await receive_n(b, len(frames))
    assert [bytes(f.payload) for f in got] == [bytes(f.payload) for f in frames]
    assert [f.descriptor.msg_id for f in got] == list(range(1, len(frames) + 1))
    assert a.deadline_mode == "absolute"


async def test_a_full_ring_and_exhausted_slots_make_the_sender_wait(
    tiny_pair: tuple[ShmTransport, ShmTransport],
) -> None:
    """With 4 ring entries and one slot per class, 200 frames still all arrive in order:
    the sender waits for space instead of failing."""
    a, b = tiny_pair
    frames = [frame(i, bytes(i % 3 * 500)) for i in range(200)]
    assert not a.send_nowait(frames[:50])  # cannot all fit: the rest is kept, in order
    got: list[Frame] = []

    async def consume() -> None:
        nonlocal got
        got = await receive_n(b, len(frames))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await a.flush()
            await a.send(frames[50:])
    assert [_SEQ.unpack_from(bytes(f.payload))[0] for f in got] == list(range(200))
    assert a.stats.space_waits > 0


async def test_closing_delivers_what_was_sent_then_ends_the_stream(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    a, b = pair
    with anyio.fail_after(5):
        await a.send([frame(0), frame(1, bytes(100))])
        await a.aclose()
        assert len(await receive_n(b, 2)) == 2
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await b.send([frame(2)])
        with pytest.raises(anyio.ClosedResourceError):
            await a.send([frame(3)])


async def test_closing_wakes_a_parked_receiver_of_either_side(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    """A receiver parked on its doorbell sees its own close at once and the peer's close
    as the end of the stream."""
    a, b = pair
    outcomes: list[type[BaseException]] = []

    async def wait_on(transport: ShmTransport) -> None:
        try:
            await transport.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError) as exc:
            outcomes.append(type(exc))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_on, a)
            tg.start_soon(wait_on, b)
            await anyio.wait_all_tasks_blocked()
            await a.aclose()
    assert sorted(o.__name__ for o in outcomes) == ["ClosedResourceError", "EndOfStream"]


async def test_a_peer_marked_dead_fails_the_parked_receiver_at_once(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    a, _ = pair

    async def mark() -> None:
        await anyio.wait_all_tasks_blocked()
        a.mark_peer_dead("worker 123 was killed by SIGKILL")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(mark)
            with pytest.raises(anyio.BrokenResourceError, match="SIGKILL"):
                await a.receive()
    with pytest.raises(anyio.BrokenResourceError):
        a.send_nowait([frame(0)])


async def test_a_readable_liveness_fd_is_noticed_within_the_park_bound() -> None:
    """The liveness fd (a pidfd or a death pipe) is checked on every park timeout."""
    read_end, write_end = os.pipe()
    a, b = shm_pair()
    try:
        a.watch_peer(read_end)
        os.close(write_end)  # the "host" is gone: EOF
        write_end = -1
        with anyio.fail_after(5), pytest.raises(anyio.BrokenResourceError, match="died"):
            await a.receive()
    finally:
        await a.aclose()
        await b.aclose()
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


async def test_blocks_are_removed_once_the_receiver_is_done(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    """A payload larger than every slot travels in its own segment, gone once received."""
    a, b = pair
    with anyio.fail_after(10):
        await a.send([frame(0, bytes(2**20))])
        assert _own_segments()
        await receive_n(b, 1)
        await a.send([frame(1)])  # the sender collects returns on its next pass
        await receive_n(b, 1)
        await b.send([frame(0)])
        await receive_n(a, 1)
    assert a.stats.bytes_in_blocks > 0
    assert not _own_segments()


async def test_a_scribbled_segment_is_a_protocol_error_not_a_crash(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    """Random bytes over everything the peer writes: the reader raises RemoteProtocolError
    (or, if the garbage happens to parse, never anything but rapace errors)."""
    a, b = pair
    await a.send([frame(i, bytes(100)) for i in range(10)])
    layout = b.layout
    buffer = a._segment.buffer  # the writer's mapping: scribble as the peer would
    # Everything side A writes except A's own control line.
    start, end = layout.ring_ab, layout.returns_b
    buffer[start:end] = os.urandom(end - start)

    async def receive_until_it_fails() -> None:
        for _ in range(3):
            await b.receive()

    with anyio.fail_after(5), pytest.raises(rapace.RemoteProtocolError):
        await receive_until_it_fails()
    with pytest.raises(rapace.RemoteProtocolError):
        await b.receive()  # the transport stays failed


async def test_a_double_return_is_a_protocol_error_for_the_owner(
    pair: tuple[ShmTransport, ShmTransport],
) -> None:
    """The owner checks every returned slot: returning one twice is the peer's error."""
    a, b = pair
    with anyio.fail_after(5):
        await a.send([frame(0, bytes(100))])
        await receive_n(b, 1)
        # Forge a second return of the same slot from B's side.
        returns = b._returns_out
        last = returns.entry_offset(returns.head - 1) // 8
        entry = b._words[last]
        b._words[returns.entry_offset(returns.head) // 8] = entry
        returns.publish(1)
        with pytest.raises(rapace.RemoteProtocolError, match="not in flight"):
            a._collect_returns()


async def test_the_peer_cannot_spin_a_single_cpu_pair() -> None:
    """Affinity masks published in the control lines decide whether spinning can pay."""
    from rapace.shm._transport import may_run_in_parallel

    assert not may_run_in_parallel(0b1, 0b1)
    assert may_run_in_parallel(0b1, 0b10) == ((os.cpu_count() or 1) > 1)


async def test_a_full_dev_shm_is_a_clear_error_at_creation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(SegmentSpaceError, match=r"shm-size") as info:
        create_link()
    assert "MiB" in str(info.value)


async def test_attaching_to_something_else_fails_clearly() -> None:
    """A bad offer is a ValueError, and the fds it named are closed (the leak check)."""
    read_end, write_end = os.pipe()
    with pytest.raises(ValueError, match="not a shared-memory segment"):
        attach_link(f"rapace-shm-1:{read_end}:{os.dup(read_end)}:{write_end}:x")
    with pytest.raises(ValueError, match="offer"):
        attach_link("not an offer")


async def test_the_control_lines_record_each_side() -> None:
    a, b = shm_pair()
    try:
        for side in (a, b):
            words = side._words
            assert words[side._own + ControlWord.PID] == os.getpid()
            assert words[side._own + ControlWord.ATTACHED] == 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_lost_wake_up_costs_at_most_the_first_park_timeout(
    pair: tuple[ShmTransport, ShmTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the doorbell cannot close (the peer reads PARKED just before it is set) is
    simulated by a ring that never sounds: the parked receiver still finds the frame at its
    first look, 10 ms after parking."""
    a, b = pair
    got: list[Frame] = []

    async def receive() -> None:
        got.extend(await b.receive())

    real_ring = Doorbell.ring
    silent = a._peer_doorbell.fd

    def ring_unless_silent(doorbell: Doorbell) -> None:
        if doorbell.fd != silent:
            real_ring(doorbell)

    monkeypatch.setattr(Doorbell, "ring", ring_unless_silent)
    with anyio.fail_after(1):  # far below the idle sleeps (up to 1 s): only the first look
        async with anyio.create_task_group() as tg:
            tg.start_soon(receive)
            await anyio.wait_all_tasks_blocked()
            assert a.send_nowait([frame(7)])
    assert [f.descriptor.msg_id for f in got] == [8]
