"""Properties of the owner-frees slot areas (``rapace.shm._slots``).

A SlotAllocator (the owner) and a SlotReader (the peer) over two separate views of one buffer,
with two or three tiny size classes so that exhaustion and fallback happen often, are driven
against a model:

* allocate takes the smallest class that fits and has a free slot, falls back to larger ones,
  and returns None when none can; the slot's bytes are its own (no overlap with other slots,
  the meta words or anything outside the area) and its generation differs from every earlier
  one of that slot;
* the reader locates exactly the published, in-flight slots with their current generation and
  a length that fits; everything else (never published, abandoned, released, reused under a
  newer generation, out of range, too long) is RemoteProtocolError;
* release takes back exactly what locate accepts; a double, stale, unpublished or out-of-range
  return is RemoteProtocolError and changes nothing, shared memory included;
* abandon returns an unpublished slot, reclaim_all every slot in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
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
from rapace.shm._slots import (
    CLASS_SHIFT,
    MAX_CLASSES,
    SizeClass,
    SlotAllocator,
    SlotReader,
    area_size,
    validate_classes,
)

U32 = 2**32 - 1
FILL = 0xA5
GUARD = 64
STATE_IN_FLIGHT = 1

machine_settings = settings(
    max_examples=80,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def size_classes(draw: st.DrawFn) -> tuple[SizeClass, ...]:
    """Two or three ascending classes of 64..512-byte slots, one to three slots each."""
    n = draw(st.integers(2, 3))
    sizes = sorted(draw(st.sets(st.sampled_from([64, 128, 192, 256, 512]), min_size=n, max_size=n)))
    return tuple(SizeClass(size, draw(st.integers(1, 3))) for size in sizes)


def pattern(cls: int, index: int, generation: int, size: int) -> bytes:
    """What the owner writes into a slot it holds: unique per slot and generation."""
    return bytes([(cls * 37 + index * 11 + generation) % 251 + 1]) * size


@dataclass
class Slot:
    cls: int
    index: int
    generation: int = 0  # the generation of the latest allocation
    meta: int = 0  # what the shared meta word must hold
    state: str = "free"  # free | allocated | in_flight
    past: set[int] = field(default_factory=set)  # every generation handed out

    @property
    def reference(self) -> int:
        return self.cls << CLASS_SHIFT | self.index


class SlotMachine(RuleBasedStateMachine):
    """An owner and a reader of one area against a per-slot model."""

    @initialize(classes=size_classes(), offset=st.sampled_from([0, 64, 192]))
    def setup(self, classes: tuple[SizeClass, ...], offset: int) -> None:
        self.classes = classes
        self.offset = offset
        size = area_size(classes)
        self.mem = bytearray([FILL]) * (offset + size + GUARD)  # garbage before allocator init
        self.raw = memoryview(self.mem)
        self.owner = SlotAllocator(memoryview(self.mem).cast("Q"), offset, classes)
        self.reader = SlotReader(memoryview(self.mem).cast("Q"), offset, classes)
        self.outside = self.outside_bytes()
        self.slots = {
            (cls, index): Slot(cls, index)
            for cls, (_, count) in enumerate(classes)
            for index in range(count)
        }
        self.meta_bytes = (8 * sum(c.slot_count for c in classes) + 63) // 64 * 64
        self.handed_out: list[tuple[int, int]] = [(0, 0), (0, 1)]  # (reference, generation)

    # -- helpers --------------------------------------------------------------------------

    def outside_bytes(self) -> bytes:
        return bytes(self.mem[: self.offset] + self.mem[self.offset + area_size(self.classes) :])

    def data_offset(self, cls: int, index: int) -> int:
        """Where slot (cls, index) lives, computed independently of the module."""
        start = self.offset + self.meta_bytes
        start += sum(size * count for size, count in self.classes[:cls])
        return start + index * self.classes[cls].slot_size

    def meta_word(self, cls: int, index: int) -> int:
        first = sum(count for _, count in self.classes[:cls])
        at = self.offset + 8 * (first + index)
        return int.from_bytes(self.mem[at : at + 8], "little")

    def in_state(self, state: str) -> list[Slot]:
        return [s for s in self.slots.values() if s.state == state]

    def lookup(self, reference: int) -> Slot | None:
        return self.slots.get((reference >> CLASS_SHIFT, reference & (1 << CLASS_SHIFT) - 1))

    def locatable(self, reference: int, generation: int, nbytes: int) -> bool:
        slot = self.lookup(reference)
        return (
            slot is not None
            and slot.state == "in_flight"
            and slot.generation == generation
            and nbytes <= self.classes[slot.cls].slot_size
        )

    def returnable(self, reference: int, generation: int) -> bool:
        slot = self.lookup(reference)
        return slot is not None and slot.state == "in_flight" and slot.generation == generation

    def fill(self, slot: Slot) -> None:
        size = self.classes[slot.cls].slot_size
        at = self.data_offset(slot.cls, slot.index)
        self.raw[at : at + size] = pattern(slot.cls, slot.index, slot.generation, size)

    def snapshot(self) -> tuple[int, int, bytes]:
        return self.owner.free_slots, self.owner.slots_in_flight, bytes(self.mem)

    # -- rules ----------------------------------------------------------------------------

    @rule(nbytes=st.integers(0, 600))
    def allocate(self, nbytes: int) -> None:
        fitting = [
            cls
            for cls, (size, _) in enumerate(self.classes)
            if size >= nbytes and any(s.cls == cls for s in self.in_state("free"))
        ]
        assert self.owner.can_allocate(nbytes) == bool(fitting)
        got = self.owner.allocate(nbytes)
        if not fitting:
            assert got is None
            return
        assert got is not None
        reference, generation, offset = got
        slot = self.lookup(reference)
        assert slot is not None
        assert slot.cls == fitting[0], "not the smallest class that fits and has room"
        assert slot.state == "free"
        assert 0 <= generation <= U32
        assert generation not in slot.past, "a generation was reused"
        assert offset == self.data_offset(slot.cls, slot.index)
        assert offset % 64 == 0
        slot.generation = generation
        slot.past.add(generation)
        slot.state = "allocated"
        self.fill(slot)
        self.handed_out.append((reference, generation))

    @precondition(lambda self: self.in_state("allocated"))
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.in_state("allocated")))
        self.owner.publish(slot.reference, slot.generation)
        slot.state = "in_flight"
        slot.meta = slot.generation << 32 | STATE_IN_FLIGHT

    @precondition(lambda self: self.in_state("allocated"))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.in_state("allocated")))
        self.owner.abandon(slot.reference)
        slot.state = "free"

    @precondition(lambda self: self.in_state("in_flight"))
    @rule(data=st.data())
    def locate_in_flight(self, data: st.DataObject) -> None:
        """The reader finds a published slot, and refuses a length beyond the slot."""
        slot = data.draw(st.sampled_from(self.in_state("in_flight")))
        size = self.classes[slot.cls].slot_size
        nbytes = data.draw(st.integers(0, size))
        at = self.reader.locate(slot.reference, slot.generation, nbytes)
        assert at == self.data_offset(slot.cls, slot.index)
        assert bytes(self.raw[at : at + size]) == pattern(
            slot.cls, slot.index, slot.generation, size
        )
        with pytest.raises(RemoteProtocolError, match="overruns") as caught:
            self.reader.locate(slot.reference, slot.generation, size + 1 + nbytes)
        assert caught.value.status == Status.INVALID_FRAME

    @precondition(lambda self: self.in_state("in_flight"))
    @rule(data=st.data(), twice=st.booleans())
    def release(self, data: st.DataObject, twice: bool) -> None:
        slot = data.draw(st.sampled_from(self.in_state("in_flight")))
        self.owner.release(slot.reference, slot.generation)
        slot.state = "free"
        slot.meta = slot.generation << 32
        if twice:
            self.hostile_release(slot.reference, slot.generation)

    def references(self) -> st.SearchStrategy[tuple[int, int]]:
        """References a peer might send: ones seen before (possibly stale), near misses of
        generation, out-of-range classes and indices, and anything in a u32."""
        seen = st.sampled_from(self.handed_out)
        return st.one_of(
            seen,
            st.tuples(seen.map(lambda rg: rg[0]), st.integers(0, U32)),
            seen.map(lambda rg: (rg[0], (rg[1] + 1) & U32)),
            seen.map(lambda rg: (rg[0], (rg[1] - 1) & U32)),
            st.tuples(
                st.builds(
                    lambda c, i: c << CLASS_SHIFT | i,
                    st.integers(0, MAX_CLASSES + 1),
                    st.integers(0, 4) | st.just((1 << CLASS_SHIFT) - 1),
                ),
                st.integers(0, 4),
            ),
            st.tuples(st.integers(0, U32), st.integers(0, U32)),
        )

    @rule(data=st.data())
    def locate_anything(self, data: st.DataObject) -> None:
        reference, generation = data.draw(self.references())
        nbytes = data.draw(st.integers(0, 600))
        before = self.snapshot()
        if self.locatable(reference, generation, nbytes):
            at = self.reader.locate(reference, generation, nbytes)
            slot = self.lookup(reference)
            assert slot is not None
            assert at == self.data_offset(slot.cls, slot.index)
        else:
            with pytest.raises(RemoteProtocolError) as caught:
                self.reader.locate(reference, generation, nbytes)
            assert caught.value.status == Status.INVALID_FRAME
        assert self.snapshot() == before  # the reader never writes

    def hostile_release(self, reference: int, generation: int) -> None:
        before = self.snapshot()
        with pytest.raises(RemoteProtocolError) as caught:
            self.owner.release(reference, generation)
        assert caught.value.status == Status.PROTOCOL_ERROR
        assert self.snapshot() == before

    @rule(data=st.data())
    def release_anything(self, data: st.DataObject) -> None:
        reference, generation = data.draw(self.references())
        if self.returnable(reference, generation):
            self.owner.release(reference, generation)
            slot = self.lookup(reference)
            assert slot is not None
            slot.state = "free"
            slot.meta = slot.generation << 32
        else:
            self.hostile_release(reference, generation)

    @precondition(lambda self: self.in_state("allocated"))
    @rule(data=st.data())
    def release_unpublished(self, data: st.DataObject) -> None:
        """A peer returning a slot the owner never published is refused."""
        slot = data.draw(st.sampled_from(self.in_state("allocated")))
        self.hostile_release(slot.reference, slot.generation)
        with pytest.raises(RemoteProtocolError):
            self.reader.locate(slot.reference, slot.generation, 0)

    @rule()
    def reclaim_all(self) -> None:
        in_flight = self.in_state("in_flight")
        assert self.owner.reclaim_all() == len(in_flight)
        for slot in in_flight:
            slot.state = "free"
            slot.meta = slot.generation << 32

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def counts_agree(self) -> None:
        assert self.owner.free_slots == len(self.in_state("free"))
        assert self.owner.slots_in_flight == len(self.in_state("in_flight"))

    @invariant()
    def meta_words_agree(self) -> None:
        for (cls, index), slot in self.slots.items():
            assert self.meta_word(cls, index) == slot.meta

    @invariant()
    def held_slots_keep_their_bytes(self) -> None:
        """No slot overlaps another, the meta words, or anything outside the area."""
        for slot in self.slots.values():
            if slot.state != "free":
                size = self.classes[slot.cls].slot_size
                at = self.data_offset(slot.cls, slot.index)
                assert bytes(self.raw[at : at + size]) == pattern(
                    slot.cls, slot.index, slot.generation, size
                )
        assert self.outside_bytes() == self.outside


def test_slot_area_matches_the_model() -> None:
    """Any sequence of allocations, publishes, abandons, locates, releases (valid or hostile)
    and reclaims matches the per-slot model: smallest fitting class first, exhaustion gives
    None, only published in-flight slots of the current generation can be located or
    returned, hostile returns change nothing, and a slot's generation never repeats."""
    run_state_machine_as_test(SlotMachine, settings=machine_settings)


def test_an_old_reference_is_rejected_after_reuse() -> None:
    """A single slot reused many times gets a new generation each time; the reader and the
    owner reject every earlier (reference, generation) pair."""
    classes = (SizeClass(64, 1),)
    mem = bytearray(area_size(classes))
    owner = SlotAllocator(memoryview(mem).cast("Q"), 0, classes)
    reader = SlotReader(memoryview(mem).cast("Q"), 0, classes)
    old: list[tuple[int, int]] = []
    for _ in range(50):
        got = owner.allocate(64)
        assert got is not None
        reference, generation, _ = got
        assert owner.allocate(1) is None  # exhausted
        assert all(generation != g for _, g in old)
        owner.publish(reference, generation)
        assert reader.locate(reference, generation, 64) == 64
        for ref, gen in old:
            with pytest.raises(RemoteProtocolError):
                reader.locate(ref, gen, 1)
            with pytest.raises(RemoteProtocolError):
                owner.release(ref, gen)
        owner.release(reference, generation)
        with pytest.raises(RemoteProtocolError):
            reader.locate(reference, generation, 1)
        old.append((reference, generation))
    assert owner.free_slots == 1
    assert owner.slots_in_flight == 0


def test_class_validation() -> None:
    """Classes must be 1..16, ascending multiples of 64 bytes, with 1..2**24 slots each, and
    an area must be 64-aligned and fit its buffer."""
    validate_classes([SizeClass(64, 1), SizeClass(128, 2**24)])
    bad = [
        ([], "size classes"),
        ([SizeClass(64, 1)] * 2, "ascend"),
        ([SizeClass(128, 1), SizeClass(64, 1)], "ascend"),
        ([SizeClass(96, 1)], "ascend"),
        ([SizeClass(0, 1)], "ascend"),
        ([SizeClass(64, 0)], "slot count"),
        ([SizeClass(64, 2**24 + 1)], "slot count"),
        ([SizeClass(64 * (i + 1), 1) for i in range(MAX_CLASSES + 1)], "size classes"),
    ]
    for classes, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_classes(classes)
    classes = (SizeClass(64, 2),)
    words = memoryview(bytearray(area_size(classes) + 64)).cast("Q")
    with pytest.raises(ValueError, match="does not fit"):
        SlotAllocator(words, 8, classes)
    with pytest.raises(ValueError, match="does not fit"):
        SlotReader(words, 128, classes)
    assert area_size(classes) == 64 + 128
    assert area_size((SizeClass(64, 7), SizeClass(128, 1))) == 64 + 448 + 128
    assert area_size((SizeClass(64, 9),)) == 128 + 576
