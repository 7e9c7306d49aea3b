"""The pool's arena (``rapace.shm._arena``): the host's allocator and a worker's map of it.

An :class:`Arena` with the smallest block size (2 MiB) is driven against a model by a
hypothesis state machine: allocations of random sizes (zero, small, and larger than a block)
are made, written with a pattern, resolved and dropped in any order, and after every step

* live allocations never overlap (by address, and by block and offset) and keep their own
  bytes: writing one never changes another;
* the statistics match the model (bytes in use, allocations, blocks, bytes reserved);
* the first block of the arena's size stays, any other block exists (in ``/dev/shm``)
  exactly while something in it is allocated; an allocation larger than a block gets a block
  of its own (gone when freed, even if it was the first);
* ``resolve`` of a range inside a live allocation is a view of that memory which keeps the
  allocation alive on its own, and of anything else (another range, a freed allocation, a
  block that is not the arena's) is ValueError.

The :class:`ArenaMap` tests map the host's blocks in this same process (owner pid is ours).
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import os
import random
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from rapace.shm import SUPPORTED
from rapace.shm._arena import _DATA_AT, _HEADER, _MAGIC, Arena, ArenaMap, ArenaStatistics
from rapace.shm._lease import find_lease, view_of
from rapace.shm._segment import SHM_DIR, Segment, segment_name

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64")

ROOT = Path(__file__).parents[3]
BLOCK = 2 << 20  # the smallest block size an arena accepts
ALIGN = 64

machine_settings = settings(
    max_examples=30,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

SIZES = st.one_of(
    st.integers(0, 300),
    st.sampled_from([0, 63, 64, 65, 4096, 100_000, 700_000, 1 << 20, BLOCK, BLOCK + 1, 3 << 20]),
)


def rounded(nbytes: int) -> int:
    return (max(nbytes, 1) + ALIGN - 1) // ALIGN * ALIGN


def exists(name: str) -> bool:
    return (SHM_DIR / name).exists()


def data_bytes(name: str) -> int:
    """A block's data size, read from /dev/shm (its header page excluded)."""
    return os.stat(SHM_DIR / name).st_size - _DATA_AT


def address_of(view: Any) -> int:
    return int(np.asarray(view).__array_interface__["data"][0])


def all_equal(holder: Any, value: int) -> bool:
    return bool((np.frombuffer(holder, np.uint8) == value).all())


@pytest.fixture
def arena() -> Iterator[Arena]:
    arena = Arena(BLOCK)
    try:
        yield arena
    finally:
        arena.close()


@pytest.fixture
def arena_map() -> Iterator[ArenaMap]:
    mapped = ArenaMap(os.getpid())
    try:
        yield mapped
    finally:
        mapped.close()


# -- the model ----------------------------------------------------------------------------------


@dataclass
class Allocation:
    holder: Any  # the lease, or a view resolved from it: what keeps it allocated
    length: int  # the lease's length (at least 1)
    size: int  # what it takes in the block (rounded up to a cache line)
    where: str
    offset: int
    address: int
    fill: int


class ArenaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.arena = Arena(BLOCK)
        self.live: dict[int, Allocation] = {}
        self.freed: list[tuple[str, int, int]] = []  # (where, offset, length) of dropped ones
        self.first: str | None = None  # the first block ever (for draws: anything appeared)
        self.existing: list[str] = []  # blocks that exist now, in the order they appeared
        self.sizes: dict[str, int] = {}  # each block's data size, read when it appeared
        self.seen: list[str] = []  # every block name, in the order they appeared
        self.count = 0

    def teardown(self) -> None:
        self.live.clear()
        self.arena.close()
        gc.collect()

    def blocks_in_use(self) -> set[str]:
        return set(self.existing)

    def pick(self, data: st.DataObject) -> tuple[int, Allocation]:
        key = data.draw(st.sampled_from(sorted(self.live)), label="allocation")
        return key, self.live[key]

    @rule(nbytes=SIZES)
    def allocate(self, nbytes: int) -> None:
        lease = self.arena.allocate(nbytes)
        region = lease.rapace_region
        assert ctypes.sizeof(lease) == max(nbytes, 1)
        assert region.shared
        assert type(region.where) is str
        assert region.offset % ALIGN == 0
        assert find_lease(view_of(lease, True)) == (lease, 0)
        if region.where not in self.blocks_in_use():
            # A new block: of the arena's block size, or just large enough for this one.
            size = rounded(nbytes)
            expected = BLOCK if size <= BLOCK else (size + BLOCK - 1) // BLOCK * BLOCK
            assert data_bytes(region.where) == expected
        else:
            assert data_bytes(region.where) >= region.offset + rounded(nbytes)
        if region.where not in self.seen:
            self.seen.append(region.where)
        if region.where not in self.existing:
            self.existing.append(region.where)
            self.sizes[region.where] = data_bytes(region.where)
        if self.first is None:
            self.first = region.where
        self.count += 1
        fill = self.count % 251 + 1
        ctypes.memset(lease, fill, ctypes.sizeof(lease))
        self.live[self.count] = Allocation(
            lease,
            ctypes.sizeof(lease),
            rounded(nbytes),
            region.where,
            region.offset,
            ctypes.addressof(lease),
            fill,
        )

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        key, allocation = self.pick(data)
        del self.live[key]
        self.freed.append((allocation.where, allocation.offset, allocation.length))
        allocation.holder = None  # the last reference: freed by reference counting
        where = allocation.where
        emptied = not any(a.where == where for a in self.live.values())
        # An emptied block is kept only if it is the arena's first and of the usual size.
        if emptied and not (self.existing[0] == where and self.sizes[where] == BLOCK):
            self.existing.remove(where)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), writable=st.booleans())
    def resolve_inside(self, data: st.DataObject, writable: bool) -> None:
        _, allocation = self.pick(data)
        start = data.draw(st.integers(0, allocation.length - 1), label="start")
        stop = data.draw(st.integers(start + 1, allocation.length), label="stop")
        view = self.arena.resolve(
            allocation.where, allocation.offset + start, stop - start, writable
        )
        assert view.nbytes == stop - start
        assert view.readonly is not writable
        assert address_of(view) == allocation.address + start
        assert all_equal(view, allocation.fill)
        if writable:
            view[0] = allocation.fill ^ 0xFF
            assert np.frombuffer(allocation.holder, np.uint8)[start] == allocation.fill ^ 0xFF
            view[0] = allocation.fill

    @precondition(lambda self: any(type(a.holder) is not memoryview for a in self.live.values()))
    @rule(data=st.data())
    def keep_only_a_resolved_view(self, data: st.DataObject) -> None:
        """Drop the lease, keep a view resolved from it: the allocation must stay."""
        key = data.draw(
            st.sampled_from(
                sorted(k for k, a in self.live.items() if type(a.holder) is not memoryview)
            )
        )
        allocation = self.live[key]
        view = self.arena.resolve(allocation.where, allocation.offset, allocation.length, True)
        allocation.holder = view

    @precondition(lambda self: self.first is not None)
    @rule(data=st.data())
    def resolve_anywhere(self, data: st.DataObject) -> None:
        """Any range: a view when a live allocation holds it, ValueError otherwise."""
        # In order of appearance, not by name: names are random, draws must not depend on them.
        names = [name for name in self.seen if name in self.blocks_in_use() or exists(name)]
        names += [name for name in self.seen if name not in names][:1]  # a removed one
        where = data.draw(st.sampled_from(names), label="where")
        near = [a for a in self.live.values() if a.where == where]
        near += [_Freed(w, o, n) for w, o, n in self.freed if w == where]
        if near and data.draw(st.booleans()):
            anchor = data.draw(st.sampled_from(near), label="anchor")
            start = anchor.offset + data.draw(st.integers(-130, anchor.length + 130))
        else:
            start = data.draw(st.integers(-10, BLOCK + 100), label="start")
        nbytes = data.draw(st.integers(1, 300), label="nbytes")
        owner = next(
            (
                a
                for a in self.live.values()
                if a.where == where and a.offset <= start and start + nbytes <= a.offset + a.length
            ),
            None,
        )
        if owner is None:
            with pytest.raises(ValueError, match="arena"):
                self.arena.resolve(where, start, nbytes, True)
        else:
            view = self.arena.resolve(where, start, nbytes, True)
            assert address_of(view) == owner.address + start - owner.offset
            assert all_equal(view, owner.fill)

    @invariant()
    def statistics_match(self) -> None:
        stats = self.arena.statistics()
        in_use = self.blocks_in_use()
        assert stats.allocations == len(self.live)
        assert stats.bytes_in_use == sum(a.size for a in self.live.values())
        assert stats.blocks == len(in_use)
        for name in self.seen:
            assert exists(name) == (name in in_use), name
        assert stats.bytes_reserved == sum(data_bytes(name) for name in in_use)
        for name in in_use:
            size = data_bytes(name)
            assert size % BLOCK == 0
            assert size >= BLOCK

    @invariant()
    def allocations_are_disjoint_and_intact(self) -> None:
        allocations = list(self.live.values())
        by_block = sorted((a.where, a.offset, a.size) for a in allocations)
        for (w1, o1, s1), (w2, o2, _) in itertools.pairwise(by_block):
            assert w1 != w2 or o1 + s1 <= o2, "allocations overlap in a block"
        by_address = sorted((a.address, a.length) for a in allocations)
        for (a1, n1), (a2, _) in itertools.pairwise(by_address):
            assert a1 + n1 <= a2, "allocations overlap in memory"
        for allocation in allocations:
            assert all_equal(allocation.holder, allocation.fill)


@dataclass
class _Freed:
    where: str
    offset: int
    length: int


def test_arena_matches_the_model() -> None:
    run_state_machine_as_test(ArenaMachine, settings=machine_settings)


# -- allocation ---------------------------------------------------------------------------------


def test_statistics_follow_allocations(arena: Arena) -> None:
    assert arena.statistics() == ArenaStatistics(0, 0, 0, 0)
    empty = arena.allocate(0)
    assert ctypes.sizeof(empty) == 1
    assert arena.statistics() == ArenaStatistics(64, BLOCK, 1, 1)
    small = arena.allocate(100)
    assert arena.statistics() == ArenaStatistics(64 + 128, BLOCK, 1, 2)
    big = arena.allocate(BLOCK + 1)
    assert arena.statistics() == ArenaStatistics(64 + 128 + BLOCK + 64, 3 * BLOCK, 2, 3)
    big_block = big.rapace_region.where
    assert big_block != small.rapace_region.where
    del big
    assert arena.statistics() == ArenaStatistics(64 + 128, BLOCK, 1, 2)
    assert not exists(big_block)
    del empty, small
    assert arena.statistics() == ArenaStatistics(0, BLOCK, 1, 0)


def test_freed_memory_is_reused(arena: Arena) -> None:
    first = arena.allocate(1000)
    where, offset = first.rapace_region.where, first.rapace_region.offset
    del first
    again = arena.allocate(1000)
    assert (again.rapace_region.where, again.rapace_region.offset) == (where, offset)


def test_a_full_block_gets_a_second_one_which_goes_when_empty(arena: Arena) -> None:
    halves = [arena.allocate(BLOCK // 2) for _ in range(2)]  # the first block is full
    overflow = arena.allocate(10)
    second = overflow.rapace_region.where
    assert second != halves[0].rapace_region.where
    assert arena.statistics().blocks == 2
    assert exists(second)
    del overflow
    assert arena.statistics().blocks == 1
    assert not exists(second)
    first = halves[0].rapace_region.where
    halves.clear()
    assert arena.statistics().blocks == 1  # the first block stays, empty
    assert exists(first)


@pytest.mark.parametrize("block_size", [0, 1, BLOCK - 1, -BLOCK])
def test_a_block_smaller_than_the_minimum_is_refused(block_size: int) -> None:
    with pytest.raises(ValueError, match="block size"):
        Arena(block_size)


def test_the_block_size_is_rounded_up(arena: Arena) -> None:
    rounded_arena = Arena(BLOCK + 1)
    try:
        lease = rounded_arena.allocate(1)
        assert rounded_arena.statistics().bytes_reserved == 2 * BLOCK
        assert data_bytes(lease.rapace_region.where) == 2 * BLOCK
        del lease
    finally:
        rounded_arena.close()


@pytest.mark.parametrize("nbytes", [-1, -(2**40), 1.0, True, "8", None])
def test_allocate_refuses_what_is_not_a_size(arena: Arena, nbytes: Any) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        arena.allocate(nbytes)
    assert arena.statistics().allocations == 0


def test_writing_one_allocation_leaves_its_neighbours_alone(arena: Arena) -> None:
    leases = [arena.allocate(n) for n in (1, 63, 64, 65, 200, 0, 4096)]
    for i, lease in enumerate(leases):
        ctypes.memset(lease, i + 1, ctypes.sizeof(lease))
    for i, lease in enumerate(leases):
        ctypes.memset(lease, 0xFF, ctypes.sizeof(lease))
        for j, other in enumerate(leases):
            expected = 0xFF if j <= i else j + 1
            assert all_equal(other, expected), (i, j)


def test_threads_allocating_and_freeing_never_share_memory(arena: Arena) -> None:
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        held: list[tuple[Any, int]] = []
        for step in range(300):
            if held and rng.random() < 0.45:
                lease, fill = held.pop(rng.randrange(len(held)))
                if not all_equal(lease, fill):
                    errors.append(f"thread {seed}: an allocation was overwritten")
                del lease
            else:
                fill = (seed * 64 + step) % 251 + 1
                lease = arena.allocate(rng.choice([0, 1, 100, 4096, 70_000]))
                ctypes.memset(lease, fill, ctypes.sizeof(lease))
                held.append((lease, fill))
        for lease, fill in held:
            if not all_equal(lease, fill):
                errors.append(f"thread {seed}: an allocation was overwritten")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert arena.statistics().bytes_in_use == 0
    assert arena.statistics().allocations == 0


# -- resolve ------------------------------------------------------------------------------------


def test_a_resolved_view_shares_memory_and_keeps_the_allocation(arena: Arena) -> None:
    lease = arena.allocate(256)
    region = lease.rapace_region
    view = arena.resolve(region.where, region.offset + 16, 100, True)
    view[:4] = b"abcd"
    assert bytes(lease[16:20]) == b"abcd"
    array = np.frombuffer(view, np.uint8)  # derived from the resolved view only
    del lease, view
    gc.collect()
    assert arena.statistics().allocations == 1
    again = arena.resolve(region.where, region.offset, 256, False)
    assert bytes(again[16:20]) == b"abcd"
    assert array[0] == ord("a")
    del array, again
    assert arena.statistics().allocations == 0
    with pytest.raises(ValueError, match="no arena allocation"):
        arena.resolve(region.where, region.offset, 1, True)


@pytest.mark.parametrize("where", [None, 5, b"name", ["name"], ("a", 1), 1.5])
def test_resolve_refuses_a_reference_that_is_not_a_name(arena: Arena, where: Any) -> None:
    keep = arena.allocate(64)
    with pytest.raises(ValueError, match="malformed"):
        arena.resolve(where, keep.rapace_region.offset, 1, True)


def test_resolve_refuses_blocks_that_are_not_the_arenas(arena: Arena) -> None:
    keep = arena.allocate(64)
    other = Arena(BLOCK)
    try:
        foreign = other.allocate(64)
        for name in (foreign.rapace_region.where, segment_name(), "", "rp_0_x"):
            with pytest.raises(ValueError, match="not this pool's"):
                arena.resolve(name, keep.rapace_region.offset, 1, True)
        del foreign
    finally:
        other.close()


def test_resolve_refuses_a_negative_length(arena: Arena) -> None:
    """A peer's reference with a negative length must not become a view of other bytes."""
    lease = arena.allocate(100)
    region = lease.rapace_region
    for start, nbytes in ((region.offset, -1), (region.offset + 50, -10), (region.offset, -100)):
        with pytest.raises(ValueError, match=r"negative|no arena allocation"):
            arena.resolve(region.where, start, nbytes, True)


def test_resolve_of_an_empty_range_at_the_start_of_an_allocation(arena: Arena) -> None:
    """A zero-length reference (an empty slice of an array) is inside its allocation even when
    it also touches the rounded end of the allocation before it."""
    before = arena.allocate(10)  # takes 64 bytes, 10 of them leased
    after = arena.allocate(64)
    region = after.rapace_region
    assert region.offset == before.rapace_region.offset + 64
    view = arena.resolve(region.where, region.offset, 0, True)
    assert view.nbytes == 0
    full = arena.resolve(region.where, region.offset, 64, True)
    assert full.nbytes == 64


def test_resolve_stops_at_the_leased_length(arena: Arena) -> None:
    lease = arena.allocate(10)  # rounded to 64 in the block, but only 10 are leased
    region = lease.rapace_region
    assert arena.resolve(region.where, region.offset, 10, True).nbytes == 10
    for start, nbytes in ((0, 11), (9, 2), (10, 1), (63, 1)):
        with pytest.raises(ValueError, match="no arena allocation"):
            arena.resolve(region.where, region.offset + start, nbytes, True)


# -- close --------------------------------------------------------------------------------------


def test_close_with_views_alive_keeps_them_usable() -> None:
    arena = Arena(BLOCK)
    lease = arena.allocate(4096)
    big = arena.allocate(BLOCK + 10)
    names = {lease.rapace_region.where, big.rapace_region.where}
    array = np.ndarray((512,), np.float64, buffer=lease)
    array[:] = 1.5
    view = arena.resolve(big.rapace_region.where, big.rapace_region.offset, 100, True)
    view[:] = b"x" * 100
    del lease, big
    arena.close()  # must not raise, though views are alive
    arena.close()  # idempotent
    assert not any(exists(name) for name in names)
    assert (array == 1.5).all()
    array[3] = 7.0
    assert array[3] == 7.0
    assert bytes(view) == b"x" * 100
    view[0] = ord("y")
    assert view[0] == ord("y")
    with pytest.raises(RuntimeError, match="closed"):
        arena.allocate(1)
    del array, view  # their finalisers run on a closed arena: no error either
    gc.collect()
    assert arena.statistics().bytes_in_use == 0


def test_allocate_after_close_is_refused(arena: Arena) -> None:
    arena.close()
    with pytest.raises(RuntimeError):
        arena.allocate(0)
    assert arena.statistics().blocks == 0


# -- a collection inside the arena's lock -------------------------------------------------------

# Run in a child process: a thread stuck in a collection stops every later collection in the
# process (the collector is not reentrant), which would break the tests that follow.
DEADLOCK_CHILD = """
import gc, sys, threading
import numpy as np
from rapace.shm._arena import Arena
from rapace.shm._lease import view_of

operation = sys.argv[1]
arena = Arena(2 << 20)
keep = arena.allocate(64)
where, offset = keep.rapace_region.where, keep.rapace_region.offset
holder = [np.frombuffer(view_of(arena.allocate(64), True), np.uint8)]
fired = []

def collect_under_lock(phase, info):
    if phase == "start" and holder and arena._lock.locked():
        fired.append(True)
        holder.clear()  # what freeing a cycle that holds the last view does

operations = {
    "allocate": lambda: arena.allocate(64),
    "statistics": arena.statistics,
    "resolve": lambda: arena.resolve(where, offset, 64, True),
}
gc.callbacks.append(collect_under_lock)
gc.set_threshold(1)
worker = threading.Thread(target=operations[operation], daemon=True)
worker.start()
worker.join(2)
if worker.is_alive():
    for name in list(arena._blocks):  # the lock is held for good: remove the names by hand
        import os
        os.unlink("/dev/shm/" + name)
    print("DEADLOCK", flush=True)
    os._exit(3)
gc.set_threshold(700, 10, 10)
gc.callbacks.remove(collect_under_lock)
arena.close()
print("FIRED" if fired else "NOT FIRED", flush=True)
"""


@pytest.mark.parametrize("operation", ["allocate", "statistics", "resolve"])
def test_a_view_dying_in_a_collection_under_the_lock_does_not_deadlock(operation: str) -> None:
    """The last view of an allocation can die in any collection, and a collection can start
    in any allocation of objects, including those made while the arena holds its lock (a
    view kept only by a reference cycle is freed that way). The finaliser then frees the
    allocation in that same thread: it must not wait for the lock its own thread holds.

    A garbage-collector callback stands in for the collector freeing such a cycle: it drops
    the last reference to a view at the start of a collection under the lock."""
    done = subprocess.run(
        [sys.executable, "-c", DEADLOCK_CHILD, operation],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = done.stdout.strip()
    assert output != "DEADLOCK", f"arena.{operation}() deadlocked freeing an allocation"
    assert done.returncode == 0, done.stderr
    assert output == "FIRED", "no collection ran under the arena's lock: nothing was tested"


# -- a worker's map ------------------------------------------------------------------------------


def test_the_map_resolves_to_the_hosts_memory(arena: Arena, arena_map: ArenaMap) -> None:
    lease = arena.allocate(1000)
    region = lease.rapace_region
    ctypes.memset(lease, 0x11, 1000)
    view = arena_map.resolve(region.where, region.offset + 100, 500, True)
    assert not view.readonly
    assert view.nbytes == 500
    assert bytes(view) == b"\x11" * 500
    view[:3] = b"abc"
    assert bytes(lease[100:103]) == b"abc"
    lease[600] = 0x42
    assert view[500 - 1] == 0x11
    assert arena_map.resolve(region.where, region.offset + 600, 1, False)[0] == 0x42
    read_only = arena_map.resolve(region.where, region.offset, 10, False)
    assert read_only.readonly
    found = find_lease(view)
    assert found is not None
    assert found[0].rapace_region.where == region.where
    assert found[0].rapace_region.offset + found[1] == region.offset + 100
    assert found[0].rapace_region.shared


def test_the_map_reads_to_the_end_of_a_block_and_no_further(
    arena: Arena, arena_map: ArenaMap
) -> None:
    lease = arena.allocate(64)
    where = lease.rapace_region.where
    assert arena_map.resolve(where, BLOCK - 1, 1, True).nbytes == 1
    assert arena_map.resolve(where, 0, BLOCK, False).nbytes == BLOCK
    assert arena_map.resolve(where, BLOCK, 0, True).nbytes == 0
    for start, nbytes in ((BLOCK, 1), (BLOCK - 1, 2), (0, BLOCK + 1), (2**64, 1), (0, 2**70)):
        with pytest.raises(ValueError, match="out of bounds"):
            arena_map.resolve(where, start, nbytes, True)
    for start, nbytes in ((-1, 1), (0, -1), (-(2**70), 10)):
        with pytest.raises(ValueError, match="negative"):
            arena_map.resolve(where, start, nbytes, True)


@pytest.mark.parametrize("where", [None, 7, b"rp_1_x", ["rp_1_x"], 1.0])
def test_the_map_refuses_a_reference_that_is_not_a_name(arena_map: ArenaMap, where: Any) -> None:
    with pytest.raises(ValueError, match="host's memory"):
        arena_map.resolve(where, 0, 1, True)


def test_the_map_refuses_names_of_another_owner(arena: Arena) -> None:
    lease = arena.allocate(64)
    where = lease.rapace_region.where
    for pid in (os.getpid() + 1, 1, 0):
        other = ArenaMap(pid)
        with pytest.raises(ValueError, match="host's memory"):
            other.resolve(where, 0, 1, True)
        other.close()
    mine = ArenaMap(os.getpid())
    for name in (f"rp_{os.getpid() + 1:x}_{where.rsplit('_', 1)[1]}", "rapace_x", "rp__x", "x"):
        with pytest.raises(ValueError, match="host's memory"):
            mine.resolve(name, 0, 1, True)
    mine.close()


def test_the_map_refuses_what_is_not_an_arena_block(arena_map: ArenaMap) -> None:
    plain = Segment.create(2 * _DATA_AT)  # a rapace segment of ours, but not an arena block
    tiny = Segment.create(100)  # too small to hold an arena header page
    liar = Segment.create(2 * _DATA_AT)  # the arena's magic, but a length beyond its size
    _HEADER.pack_into(liar.buffer, 0, _MAGIC, 1 << 30, 0, 0)
    dead = Segment.create(2 * _DATA_AT)
    _HEADER.pack_into(dead.buffer, 0, _MAGIC, _DATA_AT, 0xFFFF_FFFF, 0)
    try:
        for segment in (plain, tiny, liar, dead):
            assert segment.name is not None
            with pytest.raises(ValueError, match=r"not a live arena block|cannot be mapped"):
                arena_map.resolve(segment.name, 0, 1, True)
        with pytest.raises(ValueError, match="cannot be mapped"):
            arena_map.resolve(segment_name(), 0, 1, True)  # no such segment
    finally:
        for segment in (plain, tiny, liar, dead):
            segment.unlink()
            segment.close()


def test_the_map_honours_a_shorter_length_in_the_header(arena_map: ArenaMap) -> None:
    segment = Segment.create(_DATA_AT + 8192)
    _HEADER.pack_into(segment.buffer, 0, _MAGIC, 100, 0, 0)
    try:
        assert segment.name is not None
        assert arena_map.resolve(segment.name, 0, 100, True).nbytes == 100
        with pytest.raises(ValueError, match="out of bounds"):
            arena_map.resolve(segment.name, 50, 51, True)
    finally:
        segment.unlink()
        segment.close()


def test_the_map_forgets_a_block_the_host_removed(arena: Arena, arena_map: ArenaMap) -> None:
    keep = arena.allocate(64)  # the first block, which stays
    big = arena.allocate(BLOCK + 1)  # a block of its own, removed once it is freed
    first, second = keep.rapace_region.where, big.rapace_region.where
    ctypes.memset(big, 0x33, 16)
    view = arena_map.resolve(second, big.rapace_region.offset, 16, True)
    assert bytes(view) == b"\x33" * 16
    del big  # the host frees it: the block is marked dead and unlinked
    assert not exists(second)
    with pytest.raises(ValueError, match="cannot be mapped"):
        arena_map.resolve(second, 0, 16, True)
    assert bytes(view) == b"\x33" * 16  # a view made before stays readable and writable
    view[0] = 1
    assert view[0] == 1
    assert arena_map.resolve(first, keep.rapace_region.offset, 64, True).nbytes == 64


def test_the_map_sees_a_new_block_after_the_host_grew(arena: Arena, arena_map: ArenaMap) -> None:
    keep = arena.allocate(64)
    assert arena_map.resolve(keep.rapace_region.where, 0, 64, True).nbytes == 64
    for _ in range(3):  # blocks come and go; the map follows by name
        big = arena.allocate(BLOCK + 100)
        region = big.rapace_region
        struct.pack_into("<Q", big, 0, region.offset + 12345)
        view = arena_map.resolve(region.where, region.offset, 8, False)
        assert struct.unpack("<Q", view)[0] == region.offset + 12345
        del big, view


def test_a_first_block_made_for_one_big_allocation_goes_with_it() -> None:
    arena = Arena(2 << 20)
    try:
        big = arena.allocate(5 << 20)  # larger than a block: a block of its own, the first
        assert arena.statistics().blocks == 1
        del big
        assert arena.statistics().blocks == 0
        small = arena.allocate(10)
        assert arena.statistics().bytes_reserved == 2 << 20
        del small
    finally:
        arena.close()


def test_closing_the_arena_marks_its_blocks_dead_for_workers() -> None:
    arena = Arena(2 << 20)
    lease = arena.allocate(64)
    region = lease.rapace_region
    worker = ArenaMap(os.getpid())
    assert worker.resolve(region.where, region.offset, 8, True).nbytes == 8
    arena.close()
    with pytest.raises(ValueError, match=r"live arena block|cannot be mapped"):
        worker.resolve(region.where, region.offset, 8, True)
    worker.close()
    del lease
