"""Properties of the shared-memory SPSC ring (``rapace.shm._ring``).

1. A RingWriter and a RingReader over two separate views of one buffer (as two processes map
   one segment), under any interleaving of writes, publishes, reads, consumes and refreshes,
   behave like a FIFO queue of at most ``capacity`` entries: every entry comes out once, in
   order, intact; ``space()``, ``available()``, ``in_flight`` and the shared words agree with a
   model; and nothing outside the two index words and the entries is ever written.
2. Long runs wrap around the entries many times over without losing or reordering anything.
3. A hostile peer that writes any value into the shared head (for the reader) or tail (for
   the writer) gets RemoteProtocolError unless the value is possible; an impossible count is
   never returned, and a rejected value leaves the checking side's state unchanged.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from rapace._errors import RemoteProtocolError, Status
from rapace.shm._ring import RING_HEADER_SIZE, RingReader, RingWriter, ring_size

U64 = 2**64 - 1
CAPACITIES = st.sampled_from([1, 2, 4, 8])
ENTRY_SIZES = st.sampled_from([8, 64])
OFFSETS = st.sampled_from([0, 64, 192])
GUARD = 64  # bytes after the ring that must stay untouched
FILL = 0xA5

machine_settings = settings(
    max_examples=60,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def payload(seq: int, entry_size: int) -> bytes:
    """Distinct bytes for entry number ``seq`` (never all zero, so fresh memory never matches)."""
    words = (((seq + 1) * 0x9E3779B97F4A7C15 + j) & U64 for j in range(entry_size // 8))
    return b"".join(w.to_bytes(8, "little") for w in words)


@dataclass
class Ring:
    """One ring in a guarded buffer, with a writer and a reader over separate views."""

    mem: bytearray
    raw: memoryview
    writer: RingWriter
    reader: RingReader
    offset: int
    capacity: int
    entry_size: int

    @classmethod
    def build(cls, capacity: int, entry_size: int, offset: int = 0) -> Ring:
        size = ring_size(capacity, entry_size)
        mem = bytearray([FILL]) * (offset + size + GUARD)
        mem[offset : offset + size] = bytes(size)  # a fresh segment is zeroed
        # Two casts of one buffer: the two ends never share a Python object, only memory.
        writer = RingWriter(memoryview(mem).cast("Q"), offset, capacity, entry_size)
        reader = RingReader(memoryview(mem).cast("Q"), offset, capacity, entry_size)
        return cls(mem, memoryview(mem), writer, reader, offset, capacity, entry_size)

    @property
    def head_word(self) -> int:
        return self.offset // 8

    @property
    def tail_word(self) -> int:
        return (self.offset + 64) // 8

    def shared_head(self) -> int:
        return int.from_bytes(self.mem[self.offset : self.offset + 8], "little")

    def shared_tail(self) -> int:
        return int.from_bytes(self.mem[self.offset + 64 : self.offset + 72], "little")

    def set_shared(self, word: int, value: int) -> None:
        """What a hostile peer does: store any u64 into a shared index word."""
        self.mem[word * 8 : word * 8 + 8] = value.to_bytes(8, "little")

    @property
    def entries(self) -> tuple[int, int]:
        start = self.offset + RING_HEADER_SIZE
        return start, start + self.capacity * self.entry_size

    def untouchable(self) -> bytes:
        """Every byte but the head word, the tail word and the entries."""
        start, end = self.entries
        m = self.mem
        o = self.offset
        return bytes(m[:o] + m[o + 8 : o + 64] + m[o + 72 : start] + m[end:])

    def write_entry(self, index: int, seq: int) -> None:
        off = self.writer.entry_offset(index)
        start, end = self.entries
        assert start <= off
        assert off + self.entry_size <= end
        assert (off - start) % self.entry_size == 0
        self.raw[off : off + self.entry_size] = payload(seq, self.entry_size)

    def read_entry(self, index: int) -> bytes:
        off = self.reader.entry_offset(index)
        return bytes(self.raw[off : off + self.entry_size])

    def pump(self, count: int, rng: random.Random | None = None) -> None:
        """Stream ``count`` entries through writer and reader (sequence number = index)."""
        rng = rng or random.Random(0)
        done = 0
        while done < count:
            k = min(self.writer.space(), count - done, rng.randint(1, self.capacity))
            for i in range(k):
                self.write_entry(self.writer.head + i, self.writer.head + i)
            self.writer.publish(k)
            n = self.reader.available()
            take = rng.randint(1, n) if n else 0
            for i in range(take):
                seq = self.reader.tail + i
                assert self.read_entry(seq) == payload(seq, self.entry_size)
            self.reader.consume(take)
            done += k
        n = self.reader.available()
        for i in range(n):
            seq = self.reader.tail + i
            assert self.read_entry(seq) == payload(seq, self.entry_size)
        self.reader.consume(n)


# ------------------------------------------------------------------- 1. the state machine


class RingMachine(RuleBasedStateMachine):
    """A writer and a reader of one ring against a deque of published, unconsumed entries."""

    ring: Ring

    @initialize(capacity=CAPACITIES, entry_size=ENTRY_SIZES, offset=OFFSETS)
    def setup(self, capacity: int, entry_size: int, offset: int) -> None:
        self.ring = Ring.build(capacity, entry_size, offset)
        self.frozen = self.ring.untouchable()
        self.queue: deque[int] = deque()  # sequence numbers published and not consumed
        self.pending = 0  # written by the writer, not yet published
        self.head = 0  # published
        self.tail = 0  # consumed
        self.writer_seen_tail = 0  # the last tail the writer read
        self.reader_seen_head = 0  # the last head the reader read

    def expected_space(self) -> int:
        free = self.ring.capacity - (self.head - self.writer_seen_tail)
        if free:
            return free
        self.writer_seen_tail = self.tail  # space() re-reads the tail only when full
        return self.ring.capacity - (self.head - self.tail)

    @rule(k=st.integers(0, 9))
    def write(self, k: int) -> None:
        space = self.ring.writer.space()
        assert space == self.expected_space()
        k = min(k, space - self.pending)
        for i in range(k):
            index = self.head + self.pending + i
            self.ring.write_entry(index, index)
        self.pending += k

    @precondition(lambda self: self.pending > 0)
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        n = data.draw(st.integers(1, self.pending))
        self.ring.writer.publish(n)
        self.queue.extend(range(self.head, self.head + n))
        self.head += n
        self.pending -= n

    @rule(k=st.integers(0, 9), consume=st.booleans())
    def read(self, k: int, consume: bool) -> None:
        n = self.ring.reader.available()
        assert n == self.head - self.tail
        self.reader_seen_head = self.head
        k = min(k, n)
        for i in range(k):
            seq = self.queue[i]
            assert seq == self.tail + i  # FIFO: entries come out in publication order
            assert self.ring.read_entry(self.tail + i) == payload(seq, self.ring.entry_size)
        if consume:
            self.ring.reader.consume(k)
            for _ in range(k):
                self.queue.popleft()
            self.tail += k

    @rule()
    def refresh(self) -> None:
        assert self.ring.writer.refresh() == self.ring.capacity - (self.head - self.tail)
        self.writer_seen_tail = self.tail

    @rule(extra=st.integers(0, 3))
    def consume_more_than_seen(self, extra: int) -> None:
        """Consuming entries the reader has not seen is refused without a trace."""
        too_many = self.reader_seen_head - self.tail + 1 + extra
        with pytest.raises(ValueError, match="cannot consume"):
            self.ring.reader.consume(too_many)

    @invariant()
    def agrees_with_the_model(self) -> None:
        ring = self.ring
        assert 0 <= self.head - self.tail == len(self.queue) <= ring.capacity
        assert self.pending + self.head - self.tail <= ring.capacity
        assert ring.writer.head == self.head
        assert ring.reader.tail == self.tail
        assert ring.writer.in_flight == self.head - self.writer_seen_tail
        assert 0 <= ring.writer.in_flight <= ring.capacity
        assert ring.shared_head() == self.head
        assert ring.shared_tail() == self.tail

    @invariant()
    def writes_stay_inside_the_ring(self) -> None:
        assert self.ring.untouchable() == self.frozen


def test_ring_behaves_as_a_bounded_fifo() -> None:
    """Any interleaving of writes, publishes, reads, consumes and refreshes over two views of
    one buffer matches a bounded FIFO model; counts and shared words agree with it; and only
    the index words and the entries are ever written."""
    run_state_machine_as_test(RingMachine, settings=machine_settings)


# ------------------------------------------------------------------------ 2. long runs


@settings(max_examples=30, deadline=None)
@given(capacity=CAPACITIES, entry_size=ENTRY_SIZES, offset=OFFSETS, seed=st.integers(0, 2**32))
def test_long_runs_wrap_many_times_in_order(
    capacity: int, entry_size: int, offset: int, seed: int
) -> None:
    """Streaming 64 x capacity entries in random chunk sizes wraps the entries at least 64
    times; every entry arrives intact and in order, and the ring ends empty with both free-
    running indices equal to the count."""
    ring = Ring.build(capacity, entry_size, offset)
    frozen = ring.untouchable()
    count = 64 * capacity + 3
    ring.pump(count, random.Random(seed))
    assert ring.writer.head == ring.reader.tail == count
    assert ring.shared_head() == ring.shared_tail() == count
    assert ring.reader.available() == 0
    assert ring.writer.refresh() == capacity
    assert ring.untouchable() == frozen


# -------------------------------------------------------------- 3. hostile index words


@st.composite
def ring_states(draw: st.DrawFn) -> tuple[Ring, int, int]:
    """A ring that has carried some entries: ``(ring, seen_head, true_head)`` where the reader
    last saw ``seen_head`` and the writer has since published up to ``true_head``."""
    capacity = draw(CAPACITIES)
    ring = Ring.build(capacity, draw(ENTRY_SIZES), draw(OFFSETS))
    ring.pump(draw(st.integers(0, 40)))
    first = draw(st.integers(0, capacity))
    ring.writer.publish(first)
    assert ring.reader.available() == first
    seen = ring.writer.head
    ring.writer.publish(draw(st.integers(0, capacity - first)))
    return ring, seen, ring.writer.head


@settings(max_examples=300, deadline=None)
@given(state=ring_states(), data=st.data())
def test_head_outside_the_possible_range_is_a_protocol_error(
    state: tuple[Ring, int, int], data: st.DataObject
) -> None:
    """A head below the last one seen (moving backwards) or beyond tail + capacity raises
    RemoteProtocolError; the reader keeps its state and recovers once the word is sane."""
    ring, seen, true_head = state
    tail = ring.reader.tail
    low, high = seen, tail + ring.capacity
    outside = [st.integers(high + 1, U64), st.integers(high + 1, high + 3)]
    if low > 0:
        outside += [st.integers(0, low - 1), st.integers(max(0, low - 3), low - 1)]
    hostile = data.draw(st.one_of(outside))
    ring.set_shared(ring.head_word, hostile)
    with pytest.raises(RemoteProtocolError, match="ring head") as caught:
        ring.reader.available()
    assert caught.value.status == Status.PROTOCOL_ERROR
    assert ring.reader.tail == tail
    assert ring.shared_tail() == tail
    with pytest.raises(RemoteProtocolError):  # still bad: still refused
        ring.reader.available()
    ring.set_shared(ring.head_word, true_head)
    assert ring.reader.available() == true_head - tail


@settings(max_examples=300, deadline=None)
@given(state=ring_states(), data=st.data())
def test_any_head_value_gives_a_possible_count_or_an_error(
    state: tuple[Ring, int, int], data: st.DataObject
) -> None:
    """Whatever u64 the peer stores as head, available() either raises RemoteProtocolError or
    returns a count in [seen - tail, capacity], exactly head - tail."""
    ring, seen, _ = state
    tail = ring.reader.tail
    value = data.draw(
        st.one_of(st.integers(0, U64), st.integers(max(0, seen - 3), tail + ring.capacity + 3))
    )
    ring.set_shared(ring.head_word, value)
    try:
        n = ring.reader.available()
    except RemoteProtocolError:
        assert not seen <= value <= tail + ring.capacity
    else:
        assert seen <= value <= tail + ring.capacity
        assert n == value - tail
        assert seen - tail <= n <= ring.capacity


@st.composite
def writer_states(draw: st.DrawFn) -> tuple[Ring, int]:
    """A ring whose writer last saw tail ``seen``; the reader may have consumed more since.
    Returns ``(ring, seen)``; the reader's true tail is ``ring.reader.tail``."""
    capacity = draw(CAPACITIES)
    ring = Ring.build(capacity, draw(ENTRY_SIZES), draw(OFFSETS))
    ring.pump(draw(st.integers(0, 40)))
    ring.writer.refresh()
    ring.writer.publish(draw(st.integers(0, capacity)))
    seen = ring.reader.tail
    n = ring.reader.available()
    ring.reader.consume(draw(st.integers(0, n)))
    return ring, seen


@settings(max_examples=300, deadline=None)
@given(state=writer_states(), data=st.data())
def test_tail_outside_the_possible_range_is_a_protocol_error(
    state: tuple[Ring, int], data: st.DataObject
) -> None:
    """A tail below the last one seen (moving backwards) or beyond head raises
    RemoteProtocolError from refresh(), and from space() when the writer believes the ring is
    full; the writer keeps its state and recovers once the word is sane."""
    ring, seen = state
    head = ring.writer.head
    true_tail = ring.reader.tail
    outside = [st.integers(head + 1, U64), st.integers(head + 1, head + 3)]
    if seen > 0:
        outside += [st.integers(0, seen - 1), st.integers(max(0, seen - 3), seen - 1)]
    hostile = data.draw(st.one_of(outside))
    ring.set_shared(ring.tail_word, hostile)
    with pytest.raises(RemoteProtocolError, match="ring tail") as caught:
        ring.writer.refresh()
    assert caught.value.status == Status.PROTOCOL_ERROR
    assert ring.writer.in_flight == head - seen
    assert ring.writer.head == head == ring.shared_head()
    if head - seen == ring.capacity:
        with pytest.raises(RemoteProtocolError):
            ring.writer.space()
    else:
        assert ring.writer.space() == ring.capacity - (head - seen)  # no re-read needed
    ring.set_shared(ring.tail_word, true_tail)
    assert ring.writer.refresh() == ring.capacity - (head - true_tail)


@settings(max_examples=300, deadline=None)
@given(state=writer_states(), data=st.data())
def test_any_tail_value_gives_a_possible_space_or_an_error(
    state: tuple[Ring, int], data: st.DataObject
) -> None:
    """Whatever u64 the peer stores as tail, refresh() and space() either raise
    RemoteProtocolError or return free space in [0, capacity] consistent with that tail."""
    ring, seen = state
    head = ring.writer.head
    value = data.draw(st.one_of(st.integers(0, U64), st.integers(max(0, seen - 3), head + 3)))
    ring.set_shared(ring.tail_word, value)
    for method in (ring.writer.space, ring.writer.refresh):
        try:
            free = method()
        except RemoteProtocolError:
            assert not seen <= value <= head
        else:
            assert 0 <= free <= ring.capacity
            assert ring.writer.in_flight == ring.capacity - free
            if method is ring.writer.refresh:
                assert seen <= value <= head
                assert free == ring.capacity - (head - value)


def test_ring_shape_and_placement_are_validated() -> None:
    """Capacities must be powers of two, entry sizes positive multiples of 8, rings
    cache-line aligned and inside the buffer."""
    words = memoryview(bytearray(4096)).cast("Q")
    for capacity in (0, 3, 6, -4):
        with pytest.raises(ValueError, match="power of two"):
            RingWriter(words, 0, capacity, 8)
    for entry_size in (0, 4, 12, -8):
        with pytest.raises(ValueError, match="multiple of 8"):
            RingReader(words, 0, 4, entry_size)
    with pytest.raises(ValueError, match="aligned"):
        RingWriter(words, 8, 4, 8)
    with pytest.raises(ValueError, match="overruns"):
        RingReader(words, 4096 - 128, 4, 8)
    assert ring_size(4, 8) == RING_HEADER_SIZE + 64
    assert ring_size(1, 8) == RING_HEADER_SIZE + 64
    assert ring_size(8, 64) == RING_HEADER_SIZE + 512
