"""Leases (``rapace.shm._lease``): tracing views back to their lease, bounds, and the
finaliser that hands a block back when the last view of it dies.

A lease is laid over an anonymous mapping here (no segment, no fd), so these tests touch
neither ``/dev/shm`` nor a transport.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rapace.shm._lease import Region, find_lease, make_lease, view_of

MAP_SIZE = 8192
LEASE_AT = 320
LEASE_SIZE = 4096
small = settings(max_examples=60, deadline=None)


@pytest.fixture
def mapping() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, MAP_SIZE)
    yield m
    gc.collect()
    with contextlib.suppress(BufferError):  # a failed test's traceback may hold a view
        m.close()


def shared_lease(mapping: mmap.mmap, on_release: Callable[[], None] | None = None) -> Any:
    return make_lease(mapping, LEASE_AT, LEASE_SIZE, Region("block", LEASE_AT, True), on_release)


def data_address(value: Any) -> int:
    """Where element 0 (or byte 0) of a memoryview or array is, found without rapace."""
    return int(np.asarray(value).__array_interface__["data"][0])


# -- find_lease on memoryviews ------------------------------------------------------------------


@small
@given(
    start=st.integers(0, LEASE_SIZE - 1),
    length=st.integers(1, LEASE_SIZE),
    writable=st.booleans(),
)
def test_sliced_views_trace_to_their_offset(start: int, length: int, writable: bool) -> None:
    mapping = mmap.mmap(-1, MAP_SIZE)
    lease = shared_lease(mapping)
    stop = min(start + length, LEASE_SIZE)
    view = view_of(lease, writable)
    part = view[start:stop]
    found = find_lease(part)
    assert found is not None
    assert found[0] is lease
    assert found[1] == start
    assert ctypes.addressof(lease) + found[1] == data_address(part)
    assert part.readonly is not writable
    del view, part, found, lease
    gc.collect()
    mapping.close()


def test_whole_cast_and_read_only_views_trace_to_their_lease(mapping: mmap.mmap) -> None:
    lease = shared_lease(mapping)
    view = view_of(lease, True)
    cases = {
        "whole": (view, 0),
        "read-only": (view.toreadonly(), 0),
        "read-only slice": (view.toreadonly()[100:200], 100),
        "cast to u32": (view.cast("I"), 0),
        "slice cast to f8": (view[64:128].cast("d"), 64),
        "cast then sliced": (view.cast("I")[3:], 12),
        "two-dimensional": (view.cast("B", (64, 64)), 0),
        "raw memoryview of the lease": (memoryview(lease), 0),
    }
    for name, (candidate, offset) in cases.items():
        found = find_lease(candidate)
        assert found is not None, name
        assert found[0] is lease, name
        assert found[1] == offset, name


def test_a_strided_memoryview_is_traced_or_refused_but_never_raises(
    mapping: mmap.mmap,
) -> None:
    """find_lease promises a lease or None; a non-contiguous view must not make it raise."""
    lease = shared_lease(mapping)
    view = view_of(lease, True)
    for candidate in (view[::2], view[::-1], view.toreadonly()[::2], view.toreadonly()[::-3]):
        found = find_lease(candidate)
        if found is not None:
            assert found[0] is lease
            assert ctypes.addressof(lease) + found[1] == data_address(candidate)


def test_an_empty_view_is_not_traced(mapping: mmap.mmap) -> None:
    lease = shared_lease(mapping)
    assert find_lease(view_of(lease, True)[10:10]) is None


def test_a_memoryview_of_an_array_over_a_lease_traces_to_it(mapping: mmap.mmap) -> None:
    """pool.empty() hands out arrays; memoryview(array) is how one is passed as bytes."""
    lease = shared_lease(mapping)
    array = np.ndarray((LEASE_SIZE // 8,), np.float64, buffer=lease)
    found = find_lease(memoryview(array[4:]))
    assert found is not None
    assert found[0] is lease
    assert found[1] == 32


# -- find_lease on numpy arrays -----------------------------------------------------------------

DTYPES = [np.uint8, np.int16, ">i4", np.float64, np.complex128, "S3", [("a", "<u2"), ("b", "f4")]]


@st.composite
def derived_arrays(draw: st.DrawFn, lease: Any) -> np.ndarray[Any, Any]:
    """An array over the lease, then a chain of slices, reshapes and transposes of it."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    base_offset = draw(st.integers(0, 64)) // dtype.itemsize * dtype.itemsize
    count = (LEASE_SIZE - base_offset) // dtype.itemsize
    if draw(st.booleans()):
        array = np.ndarray((count,), dtype, buffer=lease, offset=base_offset)
    else:
        view = view_of(lease, draw(st.booleans()))
        array = np.frombuffer(view, dtype, count=count, offset=base_offset)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["slice", "reshape", "transpose", "reverse"]))
        if array.size == 0:
            break
        if op == "slice":
            axis = draw(st.integers(0, array.ndim - 1))
            n = array.shape[axis]
            start = draw(st.integers(0, n - 1))
            step = draw(st.sampled_from([1, 2, 3, -1, -2]))
            index: list[Any] = [slice(None)] * array.ndim
            index[axis] = slice(start, None, step)
            array = array[tuple(index)]
        elif op == "reshape" and array.flags.c_contiguous and array.size % 4 == 0:
            array = array.reshape(4, -1)
        elif op == "transpose":
            array = array.T
        elif op == "reverse":
            array = array[::-1]
    return array


@small
@given(st.data())
def test_arrays_trace_to_the_address_of_element_zero(data: st.DataObject) -> None:
    mapping = mmap.mmap(-1, MAP_SIZE)
    lease = shared_lease(mapping)
    array = data.draw(derived_arrays(lease))
    found = find_lease(array)
    assert found is not None
    assert found[0] is lease
    assert ctypes.addressof(lease) + found[1] == data_address(array)
    assert 0 <= found[1] <= LEASE_SIZE
    del array, found, lease
    gc.collect()
    mapping.close()


def test_named_array_views_trace_to_their_lease(mapping: mmap.mmap) -> None:
    lease = shared_lease(mapping)
    base = np.ndarray((16, 32), np.float64, buffer=lease)
    cases = {
        "whole": base,
        "row slice": base[3:9],
        "strided": base[::2, ::4],
        "negative strides": base[::-1, ::-3],
        "reshaped": base.reshape(32, 16),
        "transposed": base.T,
        "transposed slice": base.T[2:],
        "field of a structured view": base.view([("x", "f8"), ("y", "f8")])["y"],
        "read-only": np.frombuffer(view_of(lease, False), np.int32)[7:],
    }
    for name, candidate in cases.items():
        found = find_lease(candidate)
        assert found is not None, name
        assert found[0] is lease, name
        assert ctypes.addressof(lease) + found[1] == data_address(candidate), name


# -- what is not a lease ------------------------------------------------------------------------


def test_values_that_are_not_views_of_a_lease_give_none(mapping: mmap.mmap) -> None:
    buffer = bytearray(64)
    plain = np.arange(10)
    unshared = make_lease(mapping, 0, 64, None)  # a leased peer block: region None
    anonymous = (ctypes.c_ubyte * 16)()
    candidates = [
        b"bytes",
        buffer,
        memoryview(buffer),
        memoryview(buffer)[4:],
        memoryview(b"bytes"),
        plain,
        plain[::2],
        np.frombuffer(buffer, np.uint8),
        np.frombuffer(memoryview(buffer)[8:], np.uint32),
        memoryview(mapping)[:16],
        np.frombuffer(mapping, np.uint8, count=16),
        view_of(unshared, True),
        np.frombuffer(view_of(unshared, False), np.uint8),
        memoryview(anonymous),
        np.ctypeslib.as_array(anonymous),
        None,
        42,
        "text",
    ]
    for candidate in candidates:
        assert find_lease(candidate) is None, repr(candidate)
    del candidates


# -- make_lease bounds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "nbytes"),
    [
        (-1, 10),
        (0, 0),
        (0, -5),
        (MAP_SIZE, 1),
        (MAP_SIZE - 10, 11),
        (0, MAP_SIZE + 1),
        (2**62, 1),
    ],
)
def test_make_lease_refuses_ranges_outside_the_mapping(
    mapping: mmap.mmap, offset: int, nbytes: int
) -> None:
    released: list[int] = []
    with pytest.raises(ValueError, match="outside"):
        make_lease(mapping, offset, nbytes, Region("b", 0, True), lambda: released.append(1))
    gc.collect()
    assert released == []


@pytest.mark.parametrize(("offset", "nbytes"), [(0, 1), (0, MAP_SIZE), (MAP_SIZE - 1, 1)])
def test_make_lease_accepts_the_edges(mapping: mmap.mmap, offset: int, nbytes: int) -> None:
    lease = make_lease(mapping, offset, nbytes, Region("b", offset, False))
    assert ctypes.sizeof(lease) == nbytes
    assert ctypes.addressof(lease) - data_address(memoryview(mapping)) == offset
    assert lease.rapace_region.offset == offset
    view = view_of(lease, True)
    view[-1] = 0x5A
    assert mapping[offset + nbytes - 1] == 0x5A
    del view


def test_view_of_is_a_flat_byte_view_sharing_memory(mapping: mmap.mmap) -> None:
    lease = shared_lease(mapping)
    writable = view_of(lease, True)
    read_only = view_of(lease, False)
    assert (writable.format, writable.ndim, writable.nbytes) == ("B", 1, LEASE_SIZE)
    assert read_only.readonly
    assert not writable.readonly
    with pytest.raises(TypeError):
        read_only[0] = 1
    writable[5] = 0xEE
    assert read_only[5] == 0xEE
    assert mapping[LEASE_AT + 5] == 0xEE


# -- the finaliser ------------------------------------------------------------------------------


def derive_views(lease: Any) -> list[Any]:
    """Memoryviews and arrays derived from a lease, some from others."""
    view = view_of(lease, True)
    read_only = view_of(lease, False)
    array = np.ndarray((LEASE_SIZE // 4,), np.uint32, buffer=lease)
    from_view = np.frombuffer(read_only, np.uint16)
    return [
        view,
        view[100:200],
        view.cast("I")[2:],
        read_only,
        read_only[7:],
        array,
        array[::3],
        array.reshape(16, -1).T,
        from_view[::-1],
        from_view.view(np.int8)[5:],
    ]


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(11)))
def test_the_finaliser_runs_once_when_the_last_view_dies(order: list[int]) -> None:
    mapping = mmap.mmap(-1, MAP_SIZE)
    calls: list[int] = []
    lease = shared_lease(mapping, lambda: calls.append(1))
    holders: list[Any] = [lease, *derive_views(lease)]  # index 0 is the lease itself
    del lease
    for step, index in enumerate(order):
        holders[index] = None  # freed by reference counting: no collection needed
        expected = [1] if step == len(order) - 1 else []
        assert calls == expected, (step, index)
    gc.collect()
    assert calls == [1]
    mapping.close()  # no export left: every view really is gone


def test_the_finaliser_runs_without_a_collection(mapping: mmap.mmap) -> None:
    """Views are freed by reference counting: the block goes back at once, not at the next
    garbage collection."""
    calls: list[int] = []
    lease = shared_lease(mapping, lambda: calls.append(1))
    array = np.frombuffer(view_of(lease, False), np.uint8)[10:]
    del lease
    gc.disable()
    try:
        assert calls == []
        del array
        assert calls == [1]
    finally:
        gc.enable()


def test_the_finaliser_runs_in_the_thread_that_drops_the_last_view(mapping: mmap.mmap) -> None:
    threads: list[str] = []
    lease = shared_lease(mapping, lambda: threads.append(threading.current_thread().name))
    holder = [view_of(lease, False)[1:]]
    del lease

    def drop() -> None:
        holder.clear()

    worker = threading.Thread(target=drop, name="dropper")
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert threads == ["dropper"]
