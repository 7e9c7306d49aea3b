"""Buffer blocks (``rapace.shm._bufblocks``): the owner's blocks and the receiver's leases.

Both sides run in this process: a :class:`BufferBlocks` owner and a :class:`PeerBufferBlocks`
receiver naming the owner by our own pid, with a deque standing in for the return ring. The
receiver's views are read-only and hold their block; when the last view (or array, or slice
of one) dies exactly one return word is queued, and the owner takes the block back with it.
"""

from __future__ import annotations

import gc
import os
import random
import secrets
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapace._errors import RemoteProtocolError, Status
from rapace.shm import SUPPORTED
from rapace.shm import _bufblocks as bufblocks
from rapace.shm._bufblocks import (
    BUFFER_CLASS,
    CACHE_ENTRIES,
    DATA_AT,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_BYTES,
    MIN_CAPACITY,
    BufferBlocks,
    PeerBufferBlocks,
    return_entry,
)
from rapace.shm._segment import SHM_DIR
from rapace.shm._slots import CLASS_SHIFT, INDEX_MASK

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64")

U32 = 0xFFFF_FFFF
small = settings(max_examples=25, deadline=None)


@dataclass
class Link:
    """One direction of a link's buffer blocks: the owner sends, the peer receives."""

    token: str
    owner: BufferBlocks
    peer: PeerBufferBlocks
    returns: deque[int] = field(default_factory=deque)

    def send(self, data: bytes, capacity_for: int | None = None) -> tuple[int, int]:
        block = self.owner.acquire(len(data) if capacity_for is None else capacity_for)
        block.mapping[DATA_AT : DATA_AT + len(data)] = data
        return self.owner.publish(block, len(data))

    def take_returns(self) -> list[tuple[int, int]]:
        """Give every queued return back to the owner, as the transport does."""
        taken = []
        while self.returns:
            entry = self.returns.popleft()
            reference, generation = entry >> 32, entry & U32
            self.owner.release(reference, generation)
            taken.append((reference & INDEX_MASK, generation))
        return taken

    def names(self) -> set[str]:
        """The owner's blocks in /dev/shm."""
        prefix = f"rp_{os.getpid():x}_{self.token}"
        return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


@contextmanager
def linked(cache_bytes: int = bufblocks.CACHE_BYTES) -> Iterator[Link]:
    token = secrets.token_hex(4)
    returns: deque[int] = deque()
    owner = BufferBlocks(token, "a", cache_bytes=cache_bytes)
    peer = PeerBufferBlocks(token, "a", returns, os.getpid)
    try:
        yield Link(token, owner, peer, returns)
    finally:
        peer.close()
        owner.close()


@pytest.fixture
def link() -> Iterator[Link]:
    with linked() as made:
        yield made


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- round trip ---------------------------------------------------------------------------------


@small
@given(
    size=st.one_of(st.integers(0, 300), st.integers(MIN_CAPACITY - 2, MIN_CAPACITY + 2)),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_published_bytes_arrive_read_only_and_return_once(
    size: int, seed: int, data: st.DataObject
) -> None:
    sent = payload(size, seed)
    with linked() as link:
        number, generation = link.send(sent)
        assert link.owner.in_flight == 1
        start = data.draw(st.integers(0, size), label="start")
        stop = data.draw(st.integers(start, size), label="stop")
        view = link.peer.resolve([number, generation], start, stop - start)
        assert view.readonly
        assert (view.format, view.ndim) == ("B", 1)
        assert bytes(view) == sent[start:stop]
        with pytest.raises(TypeError):
            view[:1] = b"x"
        assert not link.returns
        del view
        assert list(link.returns) == [return_entry(number, generation)]
        assert link.take_returns() == [(number, generation)]
        assert link.owner.in_flight == 0
        assert link.owner.alive == 1  # kept for the next large buffer


def test_the_return_word_names_a_buffer_block() -> None:
    entry = return_entry(INDEX_MASK, U32 - 1)
    reference, generation = entry >> 32, entry & U32
    assert reference >> CLASS_SHIFT == BUFFER_CLASS
    assert reference & INDEX_MASK == INDEX_MASK
    assert generation == U32 - 1
    assert return_entry(5, 7) == (BUFFER_CLASS << CLASS_SHIFT | 5) << 32 | 7


def derived(view: memoryview) -> list[Any]:
    array = np.frombuffer(view, np.uint8)
    return [
        view,
        view[10:],
        view[:-3][::2],
        view.cast("I"),
        array,
        array[::-1],
        array[16:].view(np.uint32).reshape(4, -1),
        np.frombuffer(view[96:], np.float64)[::-3],
        memoryview(array)[5:9],
    ]


@settings(max_examples=40, deadline=None)
@given(st.permutations(range(9)))
def test_every_derived_view_must_die_before_the_block_returns(order: list[int]) -> None:
    with linked() as link:
        number, generation = link.send(payload(4096))
        holders: list[Any] = derived(link.peer.resolve([number, generation], 0, 4096))
        for step, index in enumerate(order):
            holders[index] = None  # reference counting frees it: no collection needed
            expected = [return_entry(number, generation)] if step == len(order) - 1 else []
            assert list(link.returns) == expected, (step, index)
        gc.collect()
        assert list(link.returns) == [return_entry(number, generation)]


def test_an_empty_reference_returns_too(link: Link) -> None:
    number, generation = link.send(b"abc")
    view = link.peer.resolve([number, generation], 3, 0)
    assert view.nbytes == 0
    del view
    assert list(link.returns) == [return_entry(number, generation)]


def test_an_empty_reference_at_the_end_of_a_full_block(link: Link) -> None:
    """A zero-length reference is accepted at the end of any payload, including one that
    fills its block to the last byte."""
    number, generation = link.send(bytes(MIN_CAPACITY))  # exactly the block's capacity
    view = link.peer.resolve([number, generation], MIN_CAPACITY, 0)
    assert view.nbytes == 0


def test_a_reference_may_be_a_tuple(link: Link) -> None:
    number, generation = link.send(b"abcdef")
    assert bytes(link.peer.resolve((number, generation), 2, 3)) == b"cde"


# -- recycling ----------------------------------------------------------------------------------


def test_a_returned_block_is_reused_without_a_new_segment(link: Link) -> None:
    number, generation = link.send(payload(1000, 1))
    names = link.names()
    assert len(names) == 1
    view = link.peer.resolve([number, generation], 0, 1000)
    del view
    link.take_returns()
    again, new_generation = link.send(payload(1500, 2))
    assert again == number
    assert new_generation != generation
    assert link.names() == names  # no segment was created
    assert link.owner.alive == 1
    assert bytes(link.peer.resolve([again, new_generation], 0, 1500)) == payload(1500, 2)
    with pytest.raises(ValueError, match="does not match"):
        link.peer.resolve([number, generation], 0, 1)  # the old reference is stale now


def test_a_huge_kept_block_is_not_spent_on_a_small_buffer(link: Link) -> None:
    big = link.owner.acquire(MIN_CAPACITY * 16)
    link.owner.give_back(big)
    small_block = link.owner.acquire(10)
    assert small_block.number != big.number
    assert small_block.capacity == MIN_CAPACITY
    link.owner.give_back(small_block)
    again = link.owner.acquire(MIN_CAPACITY * 8)
    assert again.number == big.number
    link.owner.give_back(again)


def test_a_block_given_back_unpublished_is_reused(link: Link) -> None:
    block = link.owner.acquire(100)
    link.owner.give_back(block)
    assert link.owner.in_flight == 0
    assert link.owner.alive == 1
    again = link.owner.acquire(200)
    assert again.number == block.number
    assert link.owner.alive == 0  # an acquired block is the caller's until published
    link.owner.give_back(again)


@pytest.mark.parametrize("nbytes", [0, 1, MIN_CAPACITY, MIN_CAPACITY + 1, 5 * MIN_CAPACITY])
def test_capacity_is_a_power_of_two_that_fits(link: Link, nbytes: int) -> None:
    block = link.owner.acquire(nbytes)
    assert block.capacity >= max(nbytes, MIN_CAPACITY)
    assert block.capacity & (block.capacity - 1) == 0
    assert block.capacity < 2 * max(nbytes, MIN_CAPACITY)
    assert len(block.mapping) >= DATA_AT + block.capacity
    link.owner.give_back(block)


def test_without_a_cache_a_returned_block_is_removed() -> None:
    with linked(cache_bytes=0) as link:
        number, generation = link.send(b"x" * 100)
        assert len(link.names()) == 1
        link.peer.resolve([number, generation], 0, 100)  # dies at once
        link.take_returns()
        assert link.names() == set()
        assert link.owner.alive == 0


def test_at_most_cache_entries_blocks_are_kept(link: Link) -> None:
    sent = [link.send(b"y" * 10) for _ in range(CACHE_ENTRIES + 3)]
    for number, generation in sent:
        link.peer.resolve([number, generation], 0, 10)
    link.take_returns()
    assert link.owner.in_flight == 0
    assert link.owner.alive == CACHE_ENTRIES
    assert len(link.names()) == CACHE_ENTRIES


# -- release errors -----------------------------------------------------------------------------


def test_release_refuses_what_is_not_in_flight(link: Link) -> None:
    number, generation = link.send(b"abc")
    unpublished = link.owner.acquire(10)
    reference = BUFFER_CLASS << CLASS_SHIFT | number
    cases = [
        (BUFFER_CLASS << CLASS_SHIFT | (number + 1), generation),  # no such block
        (reference, generation ^ 1),  # stale generation
        (reference, U32),
        (BUFFER_CLASS << CLASS_SHIFT | unpublished.number, 0),  # acquired, not lent
    ]
    for bad_reference, bad_generation in cases:
        with pytest.raises(RemoteProtocolError) as caught:
            link.owner.release(bad_reference, bad_generation)
        assert caught.value.status is Status.PROTOCOL_ERROR
        assert link.owner.in_flight == 1
    link.owner.release(reference, generation)
    assert link.owner.in_flight == 0
    with pytest.raises(RemoteProtocolError):
        link.owner.release(reference, generation)  # a double return
    assert link.owner.alive == 1  # kept for reuse, nothing lost or duplicated
    link.owner.give_back(unpublished)
    assert link.owner.alive == 2


# -- resolve errors -----------------------------------------------------------------------------


def bad_references(number: int, generation: int) -> list[object]:
    return [
        None,
        number,
        "0",
        b"\x00\x00",
        [number],
        [number, generation, 0],
        {number: generation},
        [True, generation],
        [number, True],
        [number, False],
        [float(number), generation],
        [number, float(generation)],
        [str(number), generation],
        [-1, generation],
        [INDEX_MASK + 1, generation],
        [number, -1],
        [number, U32],  # the dead marker
        [number, U32 + 1],
        [number, 2**64 + generation],
        [number, generation ^ 1],  # wrong generation
        [number + 1, generation],  # no such block
        [INDEX_MASK, generation],
    ]


def test_resolve_refuses_malformed_and_unknown_references(link: Link) -> None:
    number, generation = link.send(b"0123456789")
    for where in bad_references(number, generation):
        with pytest.raises(ValueError, match="block"):
            link.peer.resolve(where, 0, 1)
    assert not link.returns  # a refused reference never queues a return
    assert bytes(link.peer.resolve([number, generation], 0, 10)) == b"0123456789"


@pytest.mark.parametrize(
    ("start", "nbytes"),
    [(0, 11), (10, 1), (5, 6), (11, 0), (2**40, 1), (0, 2**64), (-1, 1), (0, -1), (-5, 5)],
)
def test_resolve_refuses_ranges_beyond_the_payload(link: Link, start: int, nbytes: int) -> None:
    """The block's capacity is 64 KiB, but only the 10 bytes published may be referenced."""
    number, generation = link.send(b"0123456789")
    with pytest.raises(ValueError, match=r"beyond block|negative"):
        link.peer.resolve([number, generation], start, nbytes)
    assert not link.returns


def test_resolve_refuses_a_block_of_another_side_or_token(link: Link) -> None:
    number, generation = link.send(b"abc")
    for token, side in ((link.token, "b"), (secrets.token_hex(4), "a")):
        other = PeerBufferBlocks(token, side, link.returns, os.getpid)
        with pytest.raises(ValueError, match="cannot be mapped"):
            other.resolve([number, generation], 0, 1)
        other.close()
    assert not link.returns


# -- a number used again by a new block ---------------------------------------------------------


def test_a_recycled_block_shows_its_new_bytes(link: Link) -> None:
    number, generation = link.send(b"old" * 10)
    old = link.peer.resolve([number, generation], 0, 30)
    assert bytes(old) == b"old" * 10
    del old
    link.take_returns()
    again, new_generation = link.send(b"new" * 10)
    assert again == number
    assert bytes(link.peer.resolve([again, new_generation], 0, 30)) == b"new" * 10


@pytest.mark.parametrize("keep_old_view", [False, True])
def test_a_number_reused_by_a_new_segment_replaces_the_cached_mapping(
    keep_old_view: bool,
) -> None:
    """An owner removes its blocks (closing, or past its cache) and a new one of the same
    name is created: the receiver's cached mapping of the old one must not be used."""
    token = secrets.token_hex(4)
    returns: deque[int] = deque()
    peer = PeerBufferBlocks(token, "a", returns, os.getpid)
    first = BufferBlocks(token, "a")
    second = None
    try:
        old_link = Link(token, first, peer, returns)
        number, generation = old_link.send(b"A" * 64)
        old_view = peer.resolve([number, generation], 0, 64)
        if not keep_old_view:
            del old_view
            old_link.take_returns()
        first.close()  # every block removed (marked dead, unlinked)
        second = BufferBlocks(token, "a")
        new_number, new_generation = Link(token, second, peer, returns).send(b"B" * 64)
        assert new_number == number  # same number, same name, new segment
        assert bytes(peer.resolve([new_number, new_generation], 0, 64)) == b"B" * 64
        with pytest.raises(ValueError, match="does not match"):
            peer.resolve([number, generation], 0, 64)
        if keep_old_view:
            assert bytes(old_view) == b"A" * 64  # the old view keeps the old memory
    finally:
        peer.close()
        first.close()
        if second is not None:
            second.close()


# -- lending limits -----------------------------------------------------------------------------


def test_lending_stops_at_max_in_flight(link: Link) -> None:
    assert link.owner.may_lend(1)
    lent = [link.send(b"z") for _ in range(MAX_IN_FLIGHT)]
    assert link.owner.in_flight == MAX_IN_FLIGHT
    assert not link.owner.may_lend(1)
    number, generation = lent[0]
    link.owner.release(BUFFER_CLASS << CLASS_SHIFT | number, generation)
    assert link.owner.may_lend(1)


def test_lending_stops_at_max_in_flight_bytes(link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 4 * MIN_CAPACITY
    monkeypatch.setattr(bufblocks, "MAX_IN_FLIGHT_BYTES", limit)
    assert link.owner.may_lend(100 * limit)  # nothing lent: one oversized block is allowed
    number, generation = link.send(b"q")  # a 1-byte buffer lends a whole 64 KiB block
    # Blocks count by capacity (a power of two): 64 KiB lent + a 128 KiB block fit in 256 KiB,
    # one byte more needs a 256 KiB block, which does not.
    assert link.owner.may_lend(2 * MIN_CAPACITY)
    assert not link.owner.may_lend(2 * MIN_CAPACITY + 1)
    assert not link.owner.may_lend(100 * limit)  # not beside another one
    link.owner.release(BUFFER_CLASS << CLASS_SHIFT | number, generation)
    assert link.owner.may_lend(100 * limit)


def test_the_default_byte_limit_allows_one_oversized_block(link: Link) -> None:
    assert link.owner.may_lend(MAX_IN_FLIGHT_BYTES + 1)
    link.send(b"x")
    assert not link.owner.may_lend(MAX_IN_FLIGHT_BYTES)


# -- close --------------------------------------------------------------------------------------


def test_close_with_views_alive_keeps_them_readable() -> None:
    token = secrets.token_hex(4)
    returns: deque[int] = deque()
    owner = BufferBlocks(token, "a")
    peer = PeerBufferBlocks(token, "a", returns, os.getpid)
    link = Link(token, owner, peer, returns)
    sent = [payload(n, n) for n in (10, 5000, MIN_CAPACITY + 1)]
    refs = [link.send(data) for data in sent]
    views = [peer.resolve(list(ref), 0, len(data)) for ref, data in zip(refs, sent, strict=True)]
    arrays = [np.frombuffer(view, np.uint8) for view in views]
    kept_number, kept_generation = link.send(b"kept")  # returned below: kept, not lent
    peer.resolve([kept_number, kept_generation], 0, 4)
    link.take_returns()
    assert owner.alive == 4
    owner.close()  # must not raise
    peer.close()
    owner.close()  # idempotent
    assert link.names() == set()
    assert owner.alive == 0
    for view, array, data in zip(views, arrays, sent, strict=True):
        assert bytes(view) == data
        assert array.tobytes() == data
    del views, arrays, view, array
    gc.collect()
    assert len(returns) == len(sent)  # the returns still come; nobody takes them
