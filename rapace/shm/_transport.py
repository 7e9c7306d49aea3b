"""The shared-memory transport: one side of a link segment behind the Transport protocol.

Sending writes each descriptor into the outgoing ring (payloads over 16 bytes into a slot of
this side's area, or a one-off block when larger than any slot), publishes ``head`` once per
batch, and rings the peer's doorbell only if the peer is parked. Receiving drains every
published descriptor in one go, validating each (descriptor rules, slot reference, generation,
state) before reading its payload, copies the payload out, and returns slots through the
return ring at once, so a receiver that keeps results never pins the sender's area.

Waiting is where the design choices are, made from ``benchmarks/bench_shm_limits.py``
(numbers in ``benchmarks/README.md``):

* a raw ring round trip that parks on the eventfd costs 58 us across CPUs (9.6 us on one);
  one that spins costs 3.5 us. So a receiver with nothing to read first spins, then parks;
* a plain spin on one CPU only steals the time the peer needs to answer (12x slower than
  parking), but a spin that also calls ``sched_yield`` stays at parking speed there (7.6 us)
  and costs little across CPUs (4.1 us). So each look yields the event loop (other tasks
  run) and the CPU (a peer sharing it runs), and there is no spin at all unless the two
  sides' affinity masks, published in the control lines, let them run in parallel;
* a session's reply takes the peer's own work (~30-40 us) plus, if it had parked, its
  wake-up: the spin lasts up to 200 us so both sides stay in step (50 us let them fall out
  of step and park on every call: 156 us p50 against 48 us), and it stops after a run of
  long sleeps (an idle link), see :class:`SpinPolicy`;
* a start_soon + Event per message costs ~14 us against ~4 for a bare asyncio future, and
  anyio's wait_readable + move_on_after per park about doubles a parked round trip, so on
  asyncio the doorbell stays registered and a park is a bare future with a timer;
* a parked receiver re-checks 10 ms after parking (a lost wake-up is bounded by it, see
  ``_park``), then at growing intervals while it stays idle; it sleeps on an epoll set of its
  doorbell and the peer's liveness fd (a pidfd, or the host-death pipe), so a death wakes it
  at once without being polled for.

Exhaustion (ring full, no free slot) makes the sender wait for the peer, never fail: the
transport keeps the frames in order in a private queue, flags that it wants space, and the
peer rings its doorbell after returning slots or consuming descriptors.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.lowlevel

from rapace._errors import RemoteProtocolError, Status
from rapace.shm._blocks import BLOCK_CLASS, BlockOwner, read_block
from rapace.shm._bufblocks import BUFFER_CLASS, BufferBlocks, PeerBufferBlocks
from rapace.shm._doorbell import Doorbell, FdWaiter, park_timeouts
from rapace.shm._layout import MAX_BLOCKS_IN_FLIGHT, ControlWord, LinkLayout
from rapace.shm._liveness import fd_readable
from rapace.shm._ring import RingReader, RingWriter
from rapace.shm._segment import Segment
from rapace.shm._slots import CLASS_SHIFT, SlotAllocator, SlotReader
from rapace.shm._zerocopy import DEFAULT_COPY_THRESHOLD, SharedBuffers
from rapace.streams._abc import DeadlineMode
from rapace.wire import (
    DESCRIPTOR_SIZE,
    INLINE_MAX,
    SLOT_INLINE,
    DescriptorLimits,
    Frame,
    decode_descriptor,
    encode_descriptor,
)

__all__ = ("ShmStatistics", "ShmTransport", "SpinPolicy")

_CONTROL_WORDS: Final = 8
_U32: Final = 0xFFFF_FFFF


@dataclass(slots=True)
class ShmStatistics:
    """Counters of one side of a link (read by pool statistics)."""

    frames_sent: int = 0
    frames_received: int = 0
    bytes_in_slots: int = 0
    bytes_in_blocks: int = 0
    ring_high_water: int = 0
    parks: int = 0
    spin_hits: int = 0
    space_waits: int = 0
    bytes_by_reference: int = 0
    """Bytes of shared (arena) buffers sent as references."""
    bytes_copied: int = 0
    """Bytes of large buffers this side copied once into its buffer blocks."""
    bytes_received_in_blocks: int = 0
    """Bytes of large buffers the peer copied into its blocks for this side."""
    arrays_made_contiguous: int = 0
    buffers_inlined: int = 0
    """Large buffers sent in the payload because too many blocks were lent already."""


#: How long a receiver spins before it parks. A raw ring round trip is caught within 50 us,
#: but a session's reply includes the peer's own work (~30-40 us a side) and, when the peer
#: had parked, its wake-up (~50 us): with 50 us both sides fall out of step and park on
#: every message; 200 us keeps them in step (bench_shm: p50 68 -> 48 us; Pipe 44).
DEFAULT_SPIN: Final = 200e-6

#: A sleep after a failed spin longer than this means the peer is not about to answer.
SPIN_PATIENCE: Final = 0.001
#: Looks at the ring (each after a sched_yield) between two turns of the event loop while
#: spinning: 4 took 1.5-3 us off a small call's round trip (sync 34.5-35.3 -> 33.2-33.7 us,
#: the bare session 31 -> 28 us; 2-vCPU VM) and holds other tasks back ~2-4 us at most.
SPIN_LOOKS_PER_TURN: Final = 4


class SpinPolicy:
    """How long a receiver with nothing to read keeps looking before it parks.

    Spinning pays only when the peer answers within the budget, and only once both sides
    spin: a parked peer needs a kernel wake-up (tens of microseconds) whatever this side
    does, so a spin can miss while the link is busy and both sides are just out of step. So
    only a miss followed by a long sleep (:data:`SPIN_PATIENCE`: the link is idle or the peer
    slow) counts; after ``give_up_after`` of those in a row spinning stops (no CPU burnt on
    an idle link), and one park in ``retry_every`` spins again.
    """

    __slots__ = ("_misses", "_parks_since_retry", "give_up_after", "max_budget", "retry_every")

    def __init__(
        self, max_budget: float = DEFAULT_SPIN, give_up_after: int = 32, retry_every: int = 64
    ) -> None:
        self.max_budget = max_budget
        self.give_up_after = give_up_after
        self.retry_every = retry_every
        self._misses = 0
        self._parks_since_retry = 0

    def budget(self) -> float:
        if self._misses < self.give_up_after:
            return self.max_budget
        self._parks_since_retry += 1
        if self._parks_since_retry >= self.retry_every:
            self._parks_since_retry = 0
            return self.max_budget
        return 0.0

    def hit(self) -> None:
        self._misses = 0

    def miss(self, *, long: bool) -> None:
        if long:
            self._misses += 1
        elif self._misses >= self.give_up_after:
            self._misses = 0  # a retry found the peer answering soon: spin again


def may_run_in_parallel(mask_a: int, mask_b: int) -> bool:
    """False when the two affinity masks leave both processes one CPU to share."""
    union = mask_a | mask_b
    return (os.cpu_count() or 1) > 1 and union & (union - 1) != 0


def affinity_mask() -> int:
    """This process's allowed CPUs as a bit mask (CPUs beyond 63 fold into bit 63)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return (1 << min(os.cpu_count() or 1, 64)) - 1
    mask = 0
    for cpu in cpus:
        mask |= 1 << min(cpu, 63)
    return mask


class ShmTransport:
    """One side (``"a"`` creates, ``"b"`` attaches) of a shared-memory link.

    Built by :func:`rapace.shm.create_link`, :func:`rapace.shm.attach_link` or
    :func:`rapace.shm.shm_pair`; takes ownership of ``segment`` and both doorbells.
    """

    def __init__(
        self,
        segment: Segment,
        layout: LinkLayout,
        side: str,
        *,
        token: str,
        own_doorbell: Doorbell,
        peer_doorbell: Doorbell,
        close_doorbells: bool = True,
        peer_liveness_fd: int | None = None,
        spin: SpinPolicy | None = None,
        copy_threshold: int = DEFAULT_COPY_THRESHOLD,
    ) -> None:
        if side not in ("a", "b"):
            raise ValueError(f"side must be 'a' or 'b', not {side!r}")
        self._segment = segment
        self._buffer = segment.buffer
        self._words = segment.buffer.cast("Q")
        words = self._words
        self.side = side
        self.layout = layout
        self._token = token
        peer_side = "b" if side == "a" else "a"
        self._peer_side = peer_side
        own_control, peer_control = (
            (layout.control_a, layout.control_b)
            if side == "a"
            else (layout.control_b, layout.control_a)
        )
        self._own = own_control // 8
        self._peer = peer_control // 8
        capacity = layout.ring_capacity
        ring_out, ring_in = (
            (layout.ring_ab, layout.ring_ba) if side == "a" else (layout.ring_ba, layout.ring_ab)
        )
        self._out = RingWriter(words, ring_out, capacity, DESCRIPTOR_SIZE)
        self._in = RingReader(words, ring_in, capacity, DESCRIPTOR_SIZE)
        # Returns of this side's slots come in on this side's return ring (the peer writes);
        # this side writes returns of the peer's slots on the peer's return ring.
        own_returns, peer_returns = (
            (layout.returns_a, layout.returns_b)
            if side == "a"
            else (layout.returns_b, layout.returns_a)
        )
        self._returns_in = RingReader(words, own_returns, layout.return_capacity, 8)
        self._returns_out = RingWriter(words, peer_returns, layout.return_capacity, 8)
        own_area, peer_area = (
            (layout.area_a, layout.area_b) if side == "a" else (layout.area_b, layout.area_a)
        )
        self._area = SlotAllocator(words, own_area, layout.classes)
        self._peer_area = SlotReader(words, peer_area, layout.classes)
        self._max_slot = layout.classes[-1].slot_size
        self._blocks = BlockOwner(token, side)
        self._limits = DescriptorLimits()
        self._own_doorbell = own_doorbell
        self._peer_doorbell = peer_doorbell
        self._close_doorbells = close_doorbells
        self._waiter = FdWaiter(own_doorbell)
        self._liveness_fd: int | None = None
        if peer_liveness_fd is not None:
            self.watch_peer(peer_liveness_fd)
        self._spin = spin or SpinPolicy()
        self._pending: deque[Frame] = deque()
        self._users = 0  # tasks inside receive() or flush()
        self._released = False
        self._unreturned: list[int] = []  # returns that found the return ring full
        self._error: BaseException | None = None
        self._closed = False
        self._peer_dead: str | None = None
        self._may_spin: bool | None = None
        self.peer_pid = 0
        self.stats = ShmStatistics()
        # Large buffers: copied once into blocks of ours, or leased from the peer's blocks
        # (whose returns the leases' finalisers queue here, from any thread).
        self._lease_returns: deque[int] = deque()
        self._buffer_blocks = BufferBlocks(token, side)
        peer_blocks = PeerBufferBlocks(token, peer_side, self._lease_returns, self.peer_pid_or_read)
        self.buffers = SharedBuffers(
            self._buffer_blocks,
            peer_blocks,
            self.stats,
            threshold=copy_threshold,
            before_copy=self._collect_returns,
        )
        self._peer_buffer_blocks = peer_blocks
        for i in range(_CONTROL_WORDS):
            words[self._own + i] = 0
        words[self._own + ControlWord.PID] = os.getpid()
        words[self._own + ControlWord.AFFINITY] = affinity_mask()
        words[self._own + ControlWord.ATTACHED] = 1

    # -- Transport protocol ----------------------------------------------------------------

    @property
    def deadline_mode(self) -> DeadlineMode:
        return "absolute"  # both ends read the same CLOCK_MONOTONIC

    async def send(self, frames: Sequence[Frame]) -> None:
        await self.flush()
        if not self.send_nowait(frames):
            await self.flush()

    def send_nowait(self, frames: Sequence[Frame]) -> bool:
        self._check_sendable()
        if self._pending:
            self._pending.extend(frames)
            return False
        written = self._write(frames)
        if written < len(frames):
            self._pending.extend(frames[written:])
            return False
        return True

    async def flush(self) -> None:
        self._users += 1
        try:
            await self._flush()
        finally:
            self._leave()

    async def _flush(self) -> None:
        while self._pending:
            self._check_sendable()
            pending = self._pending
            written = self._write(pending)
            for _ in range(written):
                pending.popleft()
            if pending:
                await self._wait_for_space()

    async def receive(self) -> list[Frame]:
        self._users += 1
        try:
            return await self._receive()
        finally:
            self._leave()

    async def _receive(self) -> list[Frame]:
        while True:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise anyio.ClosedResourceError
            try:
                frames = self._drain()
            except RemoteProtocolError as exc:
                self._error = exc
                raise
            if frames:
                return frames
            if self._words[self._peer + ControlWord.CLOSED]:
                # The peer publishes CLOSED after its last head: an empty ring now is final.
                if not self._drain_or_none():
                    raise anyio.EndOfStream
                continue
            if self._peer_dead is not None:
                raise anyio.BrokenResourceError(self._peer_dead)
            await self._park()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        words = self._words
        words[self._own + ControlWord.CLOSED] = 1
        self._peer_doorbell.ring()  # a parked peer must see the close now, not in 10 ms
        await self._waiter.close()
        if not self._users:
            self._release_everything()

    def _leave(self) -> None:
        # Memory and fds outlive every task still inside receive/flush: the last one out
        # after a close releases them, so a close never pulls memory from under a reader.
        self._users -= 1
        if self._closed and not self._users:
            self._release_everything()

    # -- driven by a thread (rapace._lane) --------------------------------------------------
    # No receive() or flush() runs on such a link: whoever holds the driver's lock calls
    # these, and the doorbell is watched by the driver itself.

    def input_ready(self) -> bool:
        """Whether the peer has published a descriptor not yet taken (one word read)."""
        return self._in.available() > 0

    def poll(self) -> list[Frame]:
        """Every frame published now, validated and copied out; never waits."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            return self._drain()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def flush_nowait(self) -> bool:
        """Write what ``send_nowait`` had to queue; True once nothing is left."""
        self._check_sendable()
        self._collect_returns()
        pending = self._pending
        for _ in range(self._write(pending)):
            pending.popleft()
        return not pending

    def want_doorbell(self, wanted: bool) -> None:
        """Ask the peer to ring (or not) after publishing: False while a thread spins."""
        self._words[self._own + ControlWord.PARKED] = 1 if wanted else 0

    def want_space(self, wanted: bool) -> None:
        """Ask the peer to ring (or not) once it has taken descriptors or returned slots."""
        self._words[self._own + ControlWord.SPACE_WANTED] = 1 if wanted else 0

    @property
    def doorbell_fd(self) -> int:
        """The eventfd the peer rings for this side."""
        return self._own_doorbell.fd

    def may_spin(self) -> bool:
        """Whether the two processes may run at once (a spin can then see the answer)."""
        return may_run_in_parallel(
            self._words[self._own + ControlWord.AFFINITY],
            self._words[self._peer + ControlWord.AFFINITY],
        )

    def close_now(self) -> None:
        """Close and release at once (nobody is inside receive or flush on a driven link)."""
        if self._closed:
            return
        self._closed = True
        self._words[self._own + ControlWord.CLOSED] = 1
        self._peer_doorbell.ring()
        self._release_everything()

    # -- liveness --------------------------------------------------------------------------

    def mark_peer_dead(self, reason: str) -> None:
        """Fail this link now: the caller knows the peer died (a pidfd fired, say)."""
        if self._peer_dead is None:
            self._peer_dead = reason
        if not self._closed:
            self._own_doorbell.ring()  # wake our own receiver so it notices at once

    def watch_peer(self, liveness_fd: int) -> None:
        """Watch ``liveness_fd`` (a pidfd or death pipe, owned by the caller) from now on."""
        self._liveness_fd = liveness_fd
        self._waiter.watch(liveness_fd)

    @property
    def buffer_blocks_alive(self) -> int:
        """This side's buffer blocks: lent to the peer or kept for reuse."""
        return self._buffer_blocks.alive

    @property
    def peer_dead(self) -> bool:
        return self._peer_dead is not None

    def unlink_name(self) -> None:
        """Remove the segment's name once the peer has mapped it (idempotent)."""
        self._segment.unlink()

    # -- sending ---------------------------------------------------------------------------

    def _check_sendable(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if self._error is not None:
            raise anyio.BrokenResourceError(str(self._error))
        if self._peer_dead is not None:
            raise anyio.BrokenResourceError(self._peer_dead)
        if self._words[self._peer + ControlWord.CLOSED]:
            raise anyio.BrokenResourceError("the peer closed the shared-memory link")

    def _write(self, frames: Sequence[Frame]) -> int:
        """Write as many of ``frames`` as fit now; returns how many were published."""
        out = self._out
        space = out.refresh()  # one word read; keeps the high-water mark exact
        buffer = self._buffer
        head = out.head
        written = 0
        for frame in frames:
            if not space:
                break
            desc, payload = frame
            if type(payload) is bytes:
                view: bytes | memoryview = payload
                nbytes = len(payload)
            else:
                view = memoryview(payload).cast("B")
                nbytes = view.nbytes
            at = out.entry_offset(head + written)
            if nbytes <= INLINE_MAX:
                buffer[at : at + DESCRIPTOR_SIZE] = encode_descriptor(desc, view)
            else:
                placed = self._place(view, nbytes)
                if placed is None:
                    break
                reference, generation = placed
                buffer[at : at + DESCRIPTOR_SIZE] = encode_descriptor(
                    desc._replace(
                        payload_slot=reference, payload_generation=generation, payload_offset=0
                    ),
                    view,
                )
            written += 1
            space -= 1
        if written:
            out.publish(written)
            stats = self.stats
            stats.frames_sent += written
            if out.in_flight > stats.ring_high_water:
                stats.ring_high_water = out.in_flight
            if self._lease_returns:
                self._take_lease_returns()
            if self._words[self._peer + ControlWord.PARKED]:
                self._peer_doorbell.ring()
        return written

    def _place(self, payload: bytes | memoryview, nbytes: int) -> tuple[int, int] | None:
        """Copy a payload into a slot or block of this side; None when none is free."""
        area = self._area
        if nbytes <= self._max_slot:
            placed = area.allocate(nbytes)
            if placed is None:
                self._collect_returns()
                placed = area.allocate(nbytes)
                if placed is None:
                    return None
            reference, generation, offset = placed
            try:
                self._buffer[offset : offset + nbytes] = payload
            except BaseException:
                area.abandon(reference)
                raise
            area.publish(reference, generation)
            self.stats.bytes_in_slots += nbytes
            return reference, generation
        if len(self._blocks) >= MAX_BLOCKS_IN_FLIGHT:
            self._collect_returns()
            if len(self._blocks) >= MAX_BLOCKS_IN_FLIGHT:
                return None
        placed_block = self._blocks.create(memoryview(payload))
        self.stats.bytes_in_blocks += nbytes
        return placed_block

    def _collect_returns(self) -> None:
        """Take back every slot and block the peer has returned."""
        returns = self._returns_in
        count = returns.available()
        if not count:
            return
        area = self._area
        words = self._words
        tail = returns.tail
        for k in range(count):
            entry = words[returns.entry_offset(tail + k) // 8]
            reference, generation = entry >> 32, entry & _U32
            kind = reference >> CLASS_SHIFT
            if kind == BUFFER_CLASS:
                self._buffer_blocks.release(reference, generation)
            elif kind == BLOCK_CLASS:
                self._blocks.release(reference, generation)
            else:
                area.release(reference, generation)
        returns.consume(count)
        if self._words[self._peer + ControlWord.SPACE_WANTED]:
            self._peer_doorbell.ring()  # it may be waiting to return more

    async def _wait_for_space(self) -> None:
        words = self._words
        self.stats.space_waits += 1
        words[self._own + ControlWord.SPACE_WANTED] = 1
        try:
            # Re-check after raising the flag: the peer may have freed space just before.
            self._collect_returns()
            if self._out.refresh() and self._can_place_next():
                return
            await self._waiter.wait()
            self._check_liveness()
        finally:
            words[self._own + ControlWord.SPACE_WANTED] = 0

    def _can_place_next(self) -> bool:
        frame = self._pending[0]
        payload = frame.payload
        nbytes = len(payload) if type(payload) is bytes else memoryview(payload).nbytes
        if nbytes <= INLINE_MAX:
            return True
        if nbytes > self._max_slot:
            return len(self._blocks) < MAX_BLOCKS_IN_FLIGHT
        return self._area.can_allocate(nbytes)

    # -- receiving -------------------------------------------------------------------------

    def _drain(self) -> list[Frame]:
        """Read, validate and take every published descriptor."""
        ring = self._in
        count = ring.available()
        if not count:
            return []
        buffer = self._buffer
        limits = self._limits
        tail = ring.tail
        frames: list[Frame] = []
        returns = self._unreturned
        for k in range(count):
            at = ring.entry_offset(tail + k)
            # Copy the descriptor out before looking at it: the peer can rewrite shared memory
            # at any time, so checks and use must read the same bytes.
            desc = decode_descriptor(bytes(buffer[at : at + DESCRIPTOR_SIZE]), 0, limits)
            slot = desc.payload_slot
            nbytes = desc.payload_len
            if slot == SLOT_INLINE:
                payload = desc.inline_payload[:nbytes] if nbytes else b""
            else:
                generation = desc.payload_generation
                if slot >> CLASS_SHIFT == BLOCK_CLASS:
                    if desc.payload_offset:
                        raise RemoteProtocolError(
                            "block reference with an offset", status=Status.INVALID_FRAME
                        )
                    payload = read_block(
                        self.peer_pid_or_read(),
                        self._token,
                        self._peer_side,
                        slot,
                        generation,
                        nbytes,
                    )
                else:
                    offset = desc.payload_offset
                    start = self._peer_area.locate(slot, generation, offset + nbytes) + offset
                    payload = bytes(buffer[start : start + nbytes])
                returns.append(slot << 32 | generation)
            frames.append(Frame(desc, payload))
        ring.consume(count)
        self.stats.frames_received += count
        if len(self._blocks) or self._buffer_blocks.in_flight:
            self._collect_returns()  # a block is a whole segment: drop it as soon as possible
        words = self._words
        if self._lease_returns:
            self._take_lease_returns()
        elif returns:
            self._push_returns()
        if words[self._peer + ControlWord.SPACE_WANTED]:
            self._peer_doorbell.ring()
        return frames

    def _drain_or_none(self) -> bool:
        return self._in.available() > 0

    def peer_pid_or_read(self) -> int:
        """The peer's pid as it published it (needed to name its blocks)."""
        if not self.peer_pid:
            self.peer_pid = self._words[self._peer + ControlWord.PID]
        return self.peer_pid

    def _take_lease_returns(self) -> None:
        """Queue the returns of the peer's blocks whose last view died, and push them."""
        leased = self._lease_returns
        pending = self._unreturned
        while leased:
            pending.append(leased.popleft())
        self._push_returns()

    def _push_returns(self) -> None:
        returns = self._returns_out
        pending = self._unreturned
        room = returns.space()
        if room < len(pending):
            room = returns.refresh()  # the cached tail undercounts what the owner took back
        if not room:
            return
        count = min(room, len(pending))
        words = self._words
        head = returns.head
        for k in range(count):
            words[returns.entry_offset(head + k) // 8] = pending[k]
        returns.publish(count)
        del pending[:count]

    async def _park(self) -> None:
        """Wait until the peer may have published something: spin, then sleep."""
        if self._may_spin is None:
            self._may_spin = may_run_in_parallel(
                self._words[self._own + ControlWord.AFFINITY],
                self._words[self._peer + ControlWord.AFFINITY],
            )
        ring = self._in
        budget = 0.0
        if self._may_spin:
            budget = self._spin.budget()
            if budget:
                deadline = time.perf_counter() + budget
                while True:
                    # Yield the loop (other tasks run) and the CPU (a peer sharing it runs):
                    # measured, this keeps a same-CPU ping-pong at blocking speed or better
                    # while costing ~1 us a round trip across CPUs.
                    await anyio.lowlevel.checkpoint()
                    os.sched_yield()
                    # A few looks between turns of the loop: a turn costs several us, and a
                    # reply landing just after a look waited for the whole next one.
                    for _ in range(SPIN_LOOKS_PER_TURN):
                        if ring.available():
                            break
                        os.sched_yield()
                    if ring.available():
                        self._spin.hit()
                        self.stats.spin_hits += 1
                        return
                    if self._peer_dead is not None or self._closed:
                        return  # rung by mark_peer_dead or a close: the caller sees why
                    if time.perf_counter() >= deadline:
                        break
        spun = budget > 0
        words = self._words
        if self._lease_returns:
            self._take_lease_returns()
        if self._unreturned:
            # Returns that did not fit: the owner needs them to send again, so it must not
            # wait for our next drain. Push what fits; for the rest, ask to be rung when it
            # has taken some back, and wake it to do so.
            self._push_returns()
            if self._unreturned:
                words[self._own + ControlWord.SPACE_WANTED] = 1
                self._peer_doorbell.ring()
        words[self._own + ControlWord.PARKED] = 1
        try:
            # Re-check after publishing PARKED: the peer may have published just before it.
            if ring.available() or words[self._peer + ControlWord.CLOSED]:
                return
            self.stats.parks += 1
            parked_at = time.perf_counter()
            try:
                await self._sleep(ring)
            finally:
                if spun:
                    # A reply that came soon after we gave up says the peer is busy and
                    # near: keep spinning. Only long sleeps (an idle link) count against it.
                    self._spin.miss(long=time.perf_counter() - parked_at > SPIN_PATIENCE)
        finally:
            if not self._released:
                words[self._own + ControlWord.PARKED] = 0
                if self._unreturned:
                    self._push_returns()
                if not self._unreturned and not self._pending:
                    words[self._own + ControlWord.SPACE_WANTED] = 0

    async def _sleep(self, ring: RingReader) -> None:
        """Sleep on the doorbell until a ring, the peer's death or its close."""
        words = self._words
        # A wake-up can be lost only in the instant PARKED was published (the peer may have
        # read the old value while publishing); any later publish sees PARKED and rings. So
        # the first look comes after PARK_TIMEOUT and, PARKED staying set, later looks can
        # wait longer: an idle link costs almost nothing.
        for max_wait in park_timeouts():
            if await self._waiter.wait(max_wait):
                if not self._waiter.rang:  # not the doorbell: the liveness fd, then
                    self._check_liveness()
                self._collect_returns()  # the ring may have been a plea to take them
                return
            if ring.available() or words[self._peer + ControlWord.CLOSED]:
                return
            if self._peer_dead is not None or self._closed:
                return

    def _check_liveness(self) -> None:
        fd = self._liveness_fd
        if fd is None or self._peer_dead is not None:
            return
        if fd_readable(fd):
            self._peer_dead = "the peer process died"

    # -- teardown --------------------------------------------------------------------------

    def _release_everything(self) -> None:
        if self._released:
            return
        self._released = True
        self._waiter.release()
        self._blocks.close()
        self._buffer_blocks.close()
        self._peer_buffer_blocks.close()
        self._pending.clear()
        self._words.release()
        self._segment.unlink()
        self._segment.close()
        if self._close_doorbells:
            self._own_doorbell.close()
            self._peer_doorbell.close()
