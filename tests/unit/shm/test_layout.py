"""The link segment layout and its header (``rapace.shm._layout``): every region 64-byte
aligned and disjoint, the header round trip, and every way a header can be refused."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapace.shm._layout import (
    CONTROL_LINE,
    HEADER_SIZE,
    MAGIC,
    MAX_BLOCKS_IN_FLIGHT,
    MAX_RING_CAPACITY,
    VERSION,
    Header,
    LinkLayout,
    read_header,
    write_header,
)
from rapace.shm._ring import ring_size
from rapace.shm._slots import MAX_CLASSES, SizeClass, area_size
from rapace.wire import DESCRIPTOR_SIZE

# Field offsets of the header, from its documented struct "<8sIIQIIQII8s" and classes at 64.
MAGIC_AT, VERSION_AT, HEADER_SIZE_AT, TOTAL_AT = 0, 8, 12, 16
PID_AT, CAPACITY_AT, START_AT, N_CLASSES_AT, TOKEN_AT = 24, 28, 32, 40, 48
CLASSES_AT = 64

VALID_CLASSES = (SizeClass(64, 2), SizeClass(128, 1), SizeClass(256, 3))
VALID_CAPACITY = 8


@st.composite
def size_classes(draw: st.DrawFn, max_count: int = 300) -> tuple[SizeClass, ...]:
    n = draw(st.integers(1, 5))
    sizes = sorted(draw(st.sets(st.integers(1, 64).map(lambda k: 64 * k), min_size=n, max_size=n)))
    return tuple(SizeClass(size, draw(st.integers(1, max_count))) for size in sizes)


CAPACITIES = st.integers(0, 16).map(lambda e: 1 << e)


def regions(layout: LinkLayout) -> list[tuple[str, int, int]]:
    """(name, start, size) of every region, in address order."""
    descriptor_ring = ring_size(layout.ring_capacity, DESCRIPTOR_SIZE)
    return_ring = ring_size(layout.return_capacity, 8)
    area = area_size(layout.classes)
    return [
        ("header", 0, HEADER_SIZE),
        ("control_a", layout.control_a, CONTROL_LINE),
        ("control_b", layout.control_b, CONTROL_LINE),
        ("ring_ab", layout.ring_ab, descriptor_ring),
        ("ring_ba", layout.ring_ba, descriptor_ring),
        ("returns_a", layout.returns_a, return_ring),
        ("returns_b", layout.returns_b, return_ring),
        ("area_a", layout.area_a, area),
        ("area_b", layout.area_b, area),
    ]


@settings(max_examples=200, deadline=None)
@given(capacity=CAPACITIES, classes=size_classes())
def test_regions_are_aligned_disjoint_and_sum_to_the_total(
    capacity: int, classes: tuple[SizeClass, ...]
) -> None:
    """Every region starts on a 64-byte line, regions follow one another without overlap or
    gap, the total is their sum, and a return ring can hold every slot and block at once."""
    layout = LinkLayout.compute(capacity, classes)
    assert layout.ring_capacity == capacity
    assert layout.classes == classes
    end = 0
    for name, start, size in regions(layout):
        assert start % 64 == 0, name
        assert size % 64 == 0, name
        assert start == end, f"{name} starts at {start}, the previous region ends at {end}"
        end = start + size
    assert layout.total_size == end
    assert layout.total_size == (
        HEADER_SIZE
        + 2 * CONTROL_LINE
        + 2 * ring_size(capacity, DESCRIPTOR_SIZE)
        + 2 * ring_size(layout.return_capacity, 8)
        + 2 * area_size(classes)
    )
    returnable = sum(c.slot_count for c in classes) + MAX_BLOCKS_IN_FLIGHT
    cap = layout.return_capacity
    assert cap & (cap - 1) == 0
    assert returnable <= cap < 2 * returnable


@pytest.mark.parametrize("capacity", [0, -1, 3, 12, MAX_RING_CAPACITY + 1, 2 * MAX_RING_CAPACITY])
def test_compute_refuses_bad_ring_capacities(capacity: int) -> None:
    """Ring capacities must be powers of two in 1..MAX_RING_CAPACITY."""
    with pytest.raises(ValueError, match="ring capacity must be"):
        LinkLayout.compute(capacity, VALID_CLASSES)


TOKENS = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
    min_size=8,
    max_size=8,
)


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(0, 8).map(lambda e: 1 << e),
    classes=size_classes(max_count=8),
    pid=st.integers(0, 2**32 - 1),
    start=st.integers(0, 2**64 - 1),
    token=TOKENS,
    slack=st.integers(0, 4096),
)
def test_header_round_trip(
    capacity: int,
    classes: tuple[SizeClass, ...],
    pid: int,
    start: int,
    token: str,
    slack: int,
) -> None:
    """read_header gives back exactly what write_header wrote, with the recomputed layout,
    in a buffer of exactly the total size or larger."""
    layout = LinkLayout.compute(capacity, classes)
    buffer = memoryview(bytearray(layout.total_size + slack))
    write_header(buffer, layout, creator_pid=pid, creator_start=start, token=token)
    assert bytes(buffer[HEADER_SIZE:]) == bytes(len(buffer) - HEADER_SIZE)  # header only
    assert read_header(buffer) == Header(
        layout=layout, creator_pid=pid, creator_start=start, token=token
    )


@pytest.mark.parametrize("token", ["short", "ninechars", "abcd-123", "abcdé123"])
def test_the_token_must_be_8_ascii_alphanumerics(token: str) -> None:
    """write_header refuses a token that is not 8 ASCII characters; one that is but is not
    alphanumeric is written and then refused by read_header."""
    layout = LinkLayout.compute(VALID_CAPACITY, VALID_CLASSES)
    buffer = memoryview(bytearray(layout.total_size))
    if len(token) == 8 and token.isascii():
        write_header(buffer, layout, creator_pid=1, creator_start=1, token=token)
        with pytest.raises(ValueError, match="alphanumeric"):
            read_header(buffer)
    else:
        with pytest.raises(ValueError, match=r"(?i)token|ascii"):  # UnicodeEncodeError is one
            write_header(buffer, layout, creator_pid=1, creator_start=1, token=token)


def valid_header() -> bytearray:
    layout = LinkLayout.compute(VALID_CAPACITY, VALID_CLASSES)
    buffer = bytearray(layout.total_size)
    write_header(memoryview(buffer), layout, creator_pid=1234, creator_start=5678, token="tok3n123")
    return buffer


def u32(at: int, value: int) -> Callable[[bytearray], bytearray]:
    def mutate(buffer: bytearray) -> bytearray:
        struct.pack_into("<I", buffer, at, value)
        return buffer

    return mutate


def u64(at: int, value: int) -> Callable[[bytearray], bytearray]:
    def mutate(buffer: bytearray) -> bytearray:
        struct.pack_into("<Q", buffer, at, value)
        return buffer

    return mutate


def raw(at: int, value: bytes) -> Callable[[bytearray], bytearray]:
    def mutate(buffer: bytearray) -> bytearray:
        buffer[at : at + len(value)] = value
        return buffer

    return mutate


def slot_size(i: int, value: int) -> Callable[[bytearray], bytearray]:
    return u32(CLASSES_AT + 8 * i, value)


def slot_count(i: int, value: int) -> Callable[[bytearray], bytearray]:
    return u32(CLASSES_AT + 8 * i + 4, value)


def total(delta: int) -> Callable[[bytearray], bytearray]:
    def mutate(buffer: bytearray) -> bytearray:
        (value,) = struct.unpack_from("<Q", buffer, TOTAL_AT)
        struct.pack_into("<Q", buffer, TOTAL_AT, value + delta)
        return buffer

    return mutate


def truncate(by: int) -> Callable[[bytearray], bytearray]:
    return lambda buffer: buffer[: len(buffer) - by]


MUTATIONS: dict[str, tuple[Callable[[bytearray], bytearray], str]] = {
    "wrong magic": (raw(MAGIC_AT, b"RAPACESX"), "not a rapace link segment"),
    "zero magic": (raw(MAGIC_AT, bytes(8)), "not a rapace link segment"),
    "block magic": (raw(MAGIC_AT, b"RAPACEBK"), "not a rapace link segment"),
    "version 0": (u32(VERSION_AT, 0), "version"),
    "version 2": (u32(VERSION_AT, VERSION + 1), "version"),
    "header size 0": (u32(HEADER_SIZE_AT, 0), "header size"),
    "header size 255": (u32(HEADER_SIZE_AT, HEADER_SIZE - 1), "header size"),
    "header size 512": (u32(HEADER_SIZE_AT, 2 * HEADER_SIZE), "header size"),
    "0 classes": (u32(N_CLASSES_AT, 0), "size classes"),
    "17 classes": (u32(N_CLASSES_AT, MAX_CLASSES + 1), "size classes"),
    "2**32-1 classes": (u32(N_CLASSES_AT, 2**32 - 1), "size classes"),
    "4 classes, the 4th all zero": (u32(N_CLASSES_AT, 4), "slot sizes must ascend"),
    "2 classes: total no longer matches": (u32(N_CLASSES_AT, 2), "link header says"),
    "equal slot sizes": (slot_size(1, 64), "slot sizes must ascend"),
    "descending slot sizes": (slot_size(2, 64), "slot sizes must ascend"),
    "slot size not a multiple of 64": (slot_size(1, 96), "slot sizes must ascend"),
    "slot size 0": (slot_size(0, 0), "slot sizes must ascend"),
    "zero count": (slot_count(1, 0), "slot count"),
    "count over 2**24": (slot_count(0, 2**24 + 1), "slot count"),
    "count 2**32-1": (slot_count(2, 2**32 - 1), "slot count"),
    "capacity 0": (u32(CAPACITY_AT, 0), "ring capacity"),
    "capacity 3": (u32(CAPACITY_AT, 3), "ring capacity"),
    "capacity 12": (u32(CAPACITY_AT, 12), "ring capacity"),
    "capacity too large": (u32(CAPACITY_AT, 2 * MAX_RING_CAPACITY), "ring capacity"),
    "capacity 2**32-1": (u32(CAPACITY_AT, 2**32 - 1), "ring capacity"),
    "valid capacity, but total no longer matches": (
        u32(CAPACITY_AT, 2 * VALID_CAPACITY),
        "link header says",
    ),
    "valid count, but total no longer matches": (slot_count(0, 3), "link header says"),
    "total + 64": (total(64), "link header says"),
    "total - 1": (total(-1), "link header says"),
    "total 0": (u64(TOTAL_AT, 0), "link header says"),
    "total 2**64-1": (u64(TOTAL_AT, 2**64 - 1), "link header says"),
    "buffer one byte short": (truncate(1), "link segment holds"),
    "buffer only the header": (lambda buffer: buffer[:HEADER_SIZE], "link segment holds"),
    "buffer smaller than the header": (
        lambda buffer: buffer[: HEADER_SIZE - 1],
        "too small for a link header",
    ),
    "empty buffer": (lambda buffer: bytearray(), "too small for a link header"),
    "token with a dash": (raw(TOKEN_AT, b"tok-n123"), "alphanumeric"),
    "token with a space": (raw(TOKEN_AT, b"tok n123"), "alphanumeric"),
    "token of NULs": (raw(TOKEN_AT, bytes(8)), "alphanumeric"),
    "token not ASCII": (raw(TOKEN_AT, b"tok\xffn123"), "not ASCII"),
}


@pytest.mark.parametrize(("mutation", "message"), MUTATIONS.values(), ids=MUTATIONS.keys())
def test_read_header_refuses(mutation: Callable[[bytearray], bytearray], message: str) -> None:
    """Each corruption of a valid header is a ValueError saying what is wrong, never another
    exception or a header describing a layout the buffer cannot hold."""
    buffer = valid_header()
    read_header(memoryview(buffer))  # the unmutated header is fine
    with pytest.raises(ValueError, match=re.escape(message)):
        read_header(memoryview(mutation(buffer)))


@settings(max_examples=300, deadline=None)
@given(
    edits=st.lists(
        st.tuples(st.integers(0, HEADER_SIZE - 1), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(0, 64),
)
def test_scribbled_headers_give_a_valid_layout_or_value_error(
    edits: list[tuple[int, bytes]], cut: int
) -> None:
    """Whatever bytes a hostile creator writes into the header (and however short the
    segment), read_header raises ValueError or returns a layout that fits the buffer."""
    buffer = valid_header()
    for at, data in edits:
        buffer[at : at + len(data)] = data[: HEADER_SIZE - at]
    buffer = buffer[: len(buffer) - cut]
    try:
        header = read_header(memoryview(buffer))
    except ValueError:
        return
    assert header.layout.total_size <= len(buffer)
    assert header.layout == LinkLayout.compute(header.layout.ring_capacity, header.layout.classes)
    assert header.token.isalnum()
    assert len(header.token) == 8
    assert bytes(buffer[MAGIC_AT:8]) == MAGIC
