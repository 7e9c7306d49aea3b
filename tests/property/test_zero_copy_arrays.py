"""Arrays and buffers through a shared-memory link, end to end: by copy and by reference.

Both ends of an in-process link run an :class:`RpcSession`; the server end serves
:class:`Echo`. The client end plays the pool's host (its buffers have an :class:`Arena`), the
server end a worker (an :class:`ArenaMap` of that arena). Checked:

* any array of a plain-data dtype (every kind, both byte orders, structured, 0-4 dimensions,
  empty ones, C or Fortran order, strided and reversed views) comes back equal, whether it
  travels in the payload (small) or copied once into a buffer block (from 64 KiB), and read-only;
* an array in the arena travels as a reference both ways: what comes back is a writable view
  of the caller's own memory, and writes the worker makes land in it;
* the link's counters (bytes copied, by reference, arrays made contiguous) move by exactly
  what was sent;
* a hostile payload naming shared memory (wrong names, generations, bounds, strides, types)
  is a DecodeError, and anything it decodes to lies inside the memory it names.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rapace
from rapace._connect import Proxy
from rapace._errors import DecodeError, EncodeError
from rapace.service import service_spec
from rapace.session import open_session
from rapace.shm import SUPPORTED, ShmTransport, shm_pair
from rapace.shm._arena import Arena, ArenaMap
from rapace.shm._lease import view_of
from rapace.shm._zerocopy import DEFAULT_COPY_THRESHOLD
from rapace.wire import Role, TypeCodec
from rapace.wire._codec_core import TAG_SHM_BYTES, TAG_SHM_NDARRAY
from tests.property.strategies import plain_dtypes, same

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64"),
]

THRESHOLD = DEFAULT_COPY_THRESHOLD
BLOCK = 2 << 20
CALL_TIMEOUT_S = 20.0
examples = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@rapace.service
class Echo:
    async def echo(self, a: np.ndarray) -> np.ndarray:
        return a

    async def echo_view(self, m: memoryview) -> memoryview:
        return m

    async def echo_bytes(self, b: bytes) -> bytes:
        return b

    async def fill(self, a: np.ndarray, value: int) -> int:
        a[...] = value
        return int(a.size)

    async def nbytes(self, m: memoryview) -> int:
        return m.nbytes

    async def take(self, a: np.ndarray, start: int, stop: int) -> np.ndarray:
        return a[start:stop]

    async def writable(self, a: np.ndarray) -> bool:
        return bool(a.flags.writeable)


@dataclass
class Linked:
    proxy: Any
    client: ShmTransport
    server: ShmTransport
    arena: Arena


@asynccontextmanager
async def linked() -> AsyncIterator[Linked]:
    """A link in this process: the client end has the arena, the server end maps it."""
    client_end, server_end = shm_pair()
    arena = Arena(BLOCK)
    arena_map = ArenaMap(os.getpid())
    client_end.buffers.arena = arena
    server_end.buffers.arena = arena_map

    async def run_server() -> None:
        async with open_session(server_end, role=Role.ACCEPTOR, serve=Echo()) as session:
            await session.wait_closed()

    try:
        with anyio.fail_after(CALL_TIMEOUT_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_server)
                async with open_session(client_end, role=Role.INITIATOR) as session:
                    yield Linked(Proxy(session, service_spec(Echo)), client_end, server_end, arena)
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await client_end.aclose()
            await server_end.aclose()
        arena.close()
        arena_map.close()


def counters(transport: ShmTransport) -> tuple[int, int, int]:
    stats = transport.stats
    return stats.bytes_copied, stats.bytes_by_reference, stats.arrays_made_contiguous


def address(array: Any) -> int:
    return int(np.asarray(array).__array_interface__["data"][0])


# -- strategies ---------------------------------------------------------------------------------

scalar_dtypes = plain_dtypes(6)
_PADDED = [
    np.dtype({"names": ["x", "y"], "formats": ["u1", ">i4"], "offsets": [0, 4], "itemsize": 12}),
    np.dtype([("a", "<i2"), ("b", [("c", ">f8"), ("d", "S3")], (2,))]),
]


def _untitled(dtype: np.dtype[Any]) -> bool:
    """Field titles are not sent (documented), so dtypes with them do not come back equal."""
    if dtype.fields is None:
        return dtype.subdtype is None or _untitled(dtype.subdtype[0])
    return all(len(field) == 2 and _untitled(field[0]) for field in dtype.fields.values())


all_dtypes = st.one_of(
    scalar_dtypes,
    hnp.array_dtypes(scalar_dtypes, min_size=1, max_size=3, allow_subarrays=True).filter(_untitled),
    st.sampled_from(_PADDED),
)
numeric_dtypes = st.one_of(
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?", sizes=(32, 64)),
    hnp.complex_number_dtypes(endianness="?"),
)


# How to view an array: as it is, transposed, or sliced with any steps (drawn before the test
# body runs: a draw inside an async body that hypothesis stops would skip the cleanup).
view_specs = st.tuples(
    st.sampled_from(["as is", "transposed", "sliced", "sliced"]),
    st.lists(
        st.tuples(st.sampled_from([1, 2, 3, -1, -2]), st.integers(0, 9), st.integers(0, 9)),
        min_size=4,
        max_size=4,
    ),
)


def apply_view(array: np.ndarray[Any, Any], spec: Any) -> np.ndarray[Any, Any]:
    layout, axes = spec
    if layout == "transposed":
        return array.T
    if layout == "sliced" and array.ndim:
        index = []
        for n, (step, a, b) in zip(array.shape, axes, strict=False):
            first, last = a % max(n, 1), (n - b) % (n + 1)
            index.append(slice(first, last, step) if step > 0 else slice(last, first, step))
        return array[tuple(index)]
    return array


def shaped(draw: st.DrawFn, count: int) -> tuple[int, ...]:
    """A shape of 1-4 dimensions holding about ``count`` items (at least that many)."""
    ndim = draw(st.integers(1, 4))
    outer = [draw(st.integers(1, 3)) for _ in range(ndim - 1)]
    inner = -(-count // max(int(np.prod(outer)), 1))
    return (*outer, inner)


def random_array(
    dtype: np.dtype[Any], shape: tuple[int, ...], order: str, seed: int
) -> np.ndarray[Any, Any]:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    flat = np.frombuffer(bytearray(random.Random(seed).randbytes(nbytes)), dtype)
    return np.array(flat.reshape(shape), order=order)  # type: ignore[call-overload]


@st.composite
def plain_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    """Small arrays drawn element by element, or random arrays around the copy threshold."""
    dtype = draw(all_dtypes)
    order = draw(st.sampled_from("CF"))
    if draw(st.booleans()):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))
        base = np.array(draw(hnp.arrays(dtype, shape)), order=order)  # type: ignore[call-overload]
    else:
        target = draw(st.sampled_from([THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 3 * THRESHOLD]))
        count = target // dtype.itemsize + draw(st.integers(-1, 1))
        base = random_array(dtype, shaped(draw, max(count, 1)), order, draw(st.integers(0, 2**32)))
    return apply_view(base, draw(view_specs))


# -- round trips by copy ------------------------------------------------------------------------


@examples
@given(array=plain_arrays())
async def test_arrays_round_trip_by_copy(array: np.ndarray[Any, Any]) -> None:
    async with linked() as link:
        before = counters(link.client)
        back = await link.proxy.echo(array)
        assert same(array, back)
        assert type(back) is np.ndarray
        assert not back.flags.writeable
        copied, by_reference, made_contiguous = counters(link.client)
        large = array.nbytes >= THRESHOLD
        contiguous = array.flags.c_contiguous or array.flags.f_contiguous
        assert copied - before[0] == (array.nbytes if large else 0)
        assert by_reference == before[1]
        assert made_contiguous - before[2] == (1 if large and not contiguous else 0)
        assert link.server.stats.bytes_copied == (array.nbytes if large else 0)


async def test_large_arrays_are_made_contiguous_by_their_one_copy() -> None:
    base = np.arange(8 * THRESHOLD // 8, dtype=np.float64).reshape(64, -1)
    cases = [
        (base, 0),  # C order
        (np.asfortranarray(base), 0),  # F order: copied as it is
        (base.T, 0),  # F-contiguous too
        (base[::2], 1),
        (base[:, ::-1], 1),
        (base[::-1, ::3].T, 1),
        (base[:1, ::2], 0),  # non-contiguous but small: in the payload
    ]
    async with linked() as link:
        for array, made in cases:
            before = counters(link.client)
            back = await link.proxy.echo(array)
            assert same(array, back)
            copied, _, made_contiguous = counters(link.client)
            assert made_contiguous - before[2] == made
            assert copied - before[0] == (array.nbytes if array.nbytes >= THRESHOLD else 0)
            del back


@examples
@given(
    size=st.one_of(
        st.sampled_from([0, 1, THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 5 * THRESHOLD]),
        st.integers(0, 3 * THRESHOLD),
    ),
    seed=st.integers(0, 2**32),
)
async def test_bytes_and_memoryviews_round_trip(size: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    async with linked() as link:
        view = await link.proxy.echo_view(memoryview(data))
        assert type(view) is memoryview
        assert (view.format, view.ndim, view.readonly) == ("B", 1, True)
        assert view.tobytes() == data
        back = await link.proxy.echo_bytes(data)
        assert type(back) is bytes
        assert back == data
        assert await link.proxy.nbytes(memoryview(bytearray(data))) == size
        assert await link.proxy.echo_bytes(bytearray(data)) == data
        assert link.client.stats.bytes_copied == (4 * size if size >= THRESHOLD else 0)
        assert link.client.stats.bytes_by_reference == 0
        del view


async def test_received_copies_cannot_be_written_by_the_worker() -> None:
    async with linked() as link:
        for size in (10, THRESHOLD, 4 * THRESHOLD):
            array = np.zeros(size, np.uint8)
            assert not await link.proxy.writable(array)
            with anyio.fail_after(CALL_TIMEOUT_S), pytest.raises(ValueError, match="read-only"):
                await link.proxy.fill(array, 1)
            assert not array.any()


async def test_many_held_results_fall_back_to_the_payload() -> None:
    """A caller keeping every large result holds the worker's blocks: past the lending limit
    results come in the payload instead, all still correct, and blocks come back once
    dropped."""
    async with linked() as link:
        sent = [np.full(THRESHOLD, i, np.uint8) for i in range(40)]
        held = [await link.proxy.echo(array) for array in sent]
        assert all(same(a, b) for a, b in zip(sent, held, strict=True))
        assert link.server.stats.buffers_inlined > 0
        inlined = link.server.stats.buffers_inlined
        held.clear()
        for _ in range(3):  # the returns travel with the next messages
            again = await link.proxy.echo(sent[0])
            assert same(sent[0], again)
            del again
        assert link.server.stats.buffers_inlined == inlined


async def test_received_arrays_outlive_the_link() -> None:
    sent = np.arange(THRESHOLD, dtype=np.int32)
    async with linked() as link:
        back = await link.proxy.echo(sent)
        small = await link.proxy.echo(sent[:10])
        view = await link.proxy.echo_view(memoryview(sent))
    # Both ends are closed and every block removed: what was received stays readable.
    assert same(sent, back)
    assert same(sent[:10], small)
    assert view.tobytes() == sent.tobytes()
    del back, view


async def test_object_arrays_are_refused_before_sending() -> None:
    async with linked() as link:
        cases = [
            np.array([object(), 1], dtype=object),
            np.empty((0,), dtype=object),
            np.zeros(THRESHOLD, dtype=object),
            np.zeros(3, dtype=[("a", "i4"), ("b", object)]),
        ]
        for array in cases:
            with pytest.raises(EncodeError):
                await link.proxy.echo(array)
        assert counters(link.client) == (0, 0, 0)
        assert link.client._buffer_blocks.in_flight == 0
        assert link.client._buffer_blocks.alive <= 1


# -- by reference through the arena ------------------------------------------------------------


def arena_array(
    arena: Arena, dtype: np.dtype[Any], shape: tuple[int, ...], order: str, seed: int
) -> np.ndarray[Any, Any]:
    lease = arena.allocate(int(np.prod(shape)) * dtype.itemsize)
    base: np.ndarray[Any, Any] = np.ndarray(shape, dtype, buffer=lease, order=order)  # type: ignore[call-overload]
    base[...] = random_array(dtype, shape, order, seed)
    return base


@st.composite
def arena_specs(draw: st.DrawFn, dtypes: st.SearchStrategy[np.dtype[Any]] = all_dtypes) -> Any:
    dtype = draw(dtypes)
    if draw(st.booleans()):
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    else:
        target = draw(st.sampled_from([THRESHOLD - 1, THRESHOLD + 1, 3 * THRESHOLD]))
        shape = shaped(draw, max(target // dtype.itemsize, 1))
    return dtype, shape, draw(st.sampled_from("CF")), draw(st.integers(0, 2**32))


@examples
@given(spec=arena_specs(), view=view_specs)
async def test_arena_arrays_travel_by_reference(spec: Any, view: Any) -> None:
    async with linked() as link:
        dtype, shape, order, seed = spec
        base = arena_array(link.arena, dtype, shape, order, seed)
        array = apply_view(base, view)
        back = await link.proxy.echo(array)
        assert same(array, back)
        assert link.client.stats.bytes_by_reference == array.nbytes
        assert link.client.stats.bytes_copied == 0
        assert link.client.stats.arrays_made_contiguous == 0
        if array.size:
            # The very same memory, laid out the same way, and writable.
            assert address(back) == address(array)
            assert back.strides == array.strides
            assert back.flags.writeable
            assert link.server.stats.bytes_by_reference == array.nbytes
            assert link.server.stats.bytes_copied == 0
        del back, array, base


@examples
@given(spec=arena_specs(numeric_dtypes), view=view_specs, value=st.integers(0, 100))
async def test_the_worker_writes_into_arena_arrays(spec: Any, view: Any, value: int) -> None:
    async with linked() as link:
        dtype, shape, order, seed = spec
        base = arena_array(link.arena, dtype, shape, order, seed)
        expected = base.copy(order="K")  # the same layout, in memory of its own
        array = apply_view(base, view)
        # (An empty view may point past its allocation: it is then sent as a copy, which the
        # worker cannot fill: there is nothing to fill anyway.)
        if array.size:
            assert await link.proxy.writable(array)
            assert await link.proxy.fill(array, value) == array.size
            # The same view of the expected copy, filled here.
            mirror = np.ndarray(
                array.shape,
                dtype,
                buffer=expected,
                offset=address(array) - address(base),
                strides=array.strides,
            )
            mirror[...] = value
            del mirror
        assert base.tobytes() == expected.tobytes()
        assert link.client.stats.bytes_copied == 0
        del array, base


async def test_arena_memoryviews_travel_by_reference() -> None:
    async with linked() as link:
        lease = link.arena.allocate(THRESHOLD * 2)
        view = view_of(lease, writable=True)[16:1000]
        view[:5] = b"hello"
        back = await link.proxy.echo_view(view)
        assert not back.readonly
        assert address(back) == address(view)
        back[:5] = b"HELLO"
        assert bytes(view[:5]) == b"HELLO"
        assert await link.proxy.nbytes(view) == 984
        assert link.client.stats.bytes_by_reference == 2 * 984
        assert link.client.stats.bytes_copied == 0
        copied = await link.proxy.echo_bytes(view)  # bytes are a copy, whatever arrived
        assert copied == bytes(view)
        del back, view, lease


async def test_a_slice_made_by_the_worker_comes_back_as_the_callers_memory() -> None:
    async with linked() as link:
        base = arena_array(link.arena, np.dtype("<i8"), (100,), "C", 1)
        part = await link.proxy.take(base, 10, 20)
        assert address(part) == address(base[10:20])
        assert part.flags.writeable
        part[0] = -7
        assert base[10] == -7


async def test_an_empty_slice_made_by_the_worker_comes_back() -> None:
    """An empty slice at the start of an allocation that follows a short one."""
    async with linked() as link:
        short = link.arena.allocate(10)
        base = arena_array(link.arena, np.dtype("u1"), (64,), "C", 2)
        with anyio.fail_after(CALL_TIMEOUT_S):
            empty = await link.proxy.take(base, 0, 0)
        assert empty.shape == (0,)
        assert empty.dtype == np.dtype("u1")
        del short


async def test_a_memoryview_of_an_arena_array_travels_by_reference() -> None:
    """pool.empty() gives arrays; passed where bytes are declared they are still shared."""
    async with linked() as link:
        base = arena_array(link.arena, np.dtype("<f8"), (THRESHOLD,), "C", 3)
        assert await link.proxy.nbytes(memoryview(base)) == base.nbytes
        assert link.client.stats.bytes_by_reference == base.nbytes
        assert link.client.stats.bytes_copied == 0


# -- a hostile peer -----------------------------------------------------------------------------

ARENA_BYTES = 4096


@dataclass
class Victim:
    """Both ends of a link, with real blocks and arena memory a payload may name."""

    host: ShmTransport  # has the arena
    worker: ShmTransport  # maps it
    block_ref: list[int]  # a block the host lent the worker, THRESHOLD bytes
    arena_name: str  # an arena block with ARENA_BYTES allocated at offset 0
    keep: Any


@asynccontextmanager
async def victim() -> AsyncIterator[Victim]:
    host, worker = shm_pair()
    arena = Arena(BLOCK)
    arena_map = ArenaMap(os.getpid())
    host.buffers.arena = arena
    worker.buffers.arena = arena_map
    try:
        placed = host.buffers.place_bytes(memoryview(bytes(THRESHOLD)))
        assert isinstance(placed, cbor2.CBORTag)
        where, offset, nbytes, _ = placed.value
        assert (offset, nbytes) == (0, THRESHOLD)
        lease = arena.allocate(ARENA_BYTES)
        assert lease.rapace_region.offset == 0
        yield Victim(host, worker, list(where), lease.rapace_region.where, lease)
    finally:
        with anyio.CancelScope(shield=True):
            await host.aclose()
            await worker.aclose()
        arena.close()
        arena_map.close()


def _other_pid(name: str) -> str:
    return f"rp_{os.getpid() + 1:x}_{name.rsplit('_', 1)[1]}"


# What a payload's ``where`` may be, made from the victim's real references.
WHERES: dict[str, Any] = {
    "block": lambda v: v.block_ref,
    "block, other generation": lambda v: [v.block_ref[0], v.block_ref[1] ^ 1],
    "block, generation + 2**32": lambda v: [v.block_ref[0], v.block_ref[1] + 2**32],
    "block, next number": lambda v: [v.block_ref[0] + 1, v.block_ref[1]],
    "block, number -1": lambda v: [-1, v.block_ref[1]],
    "block, negative generation": lambda v: [v.block_ref[0], -v.block_ref[1] - 1],
    "block, dead generation": lambda v: [v.block_ref[0], 0xFFFF_FFFF],
    "block, bool number": lambda v: [True, v.block_ref[1]],
    "block, no generation": lambda v: [v.block_ref[0], None],
    "block, one field": lambda v: [v.block_ref[0]],
    "block, three fields": lambda v: [*v.block_ref, 0],
    "block, nested": lambda v: [[v.block_ref[0]], v.block_ref[1]],
    "arena": lambda v: v.arena_name,
    "arena, truncated name": lambda v: v.arena_name[:-1],
    "arena, other pid": lambda v: _other_pid(v.arena_name),
    "no such segment": lambda v: f"rp_{os.getpid():x}_nosuchblock",
    "path": lambda v: f"rp_{os.getpid():x}_../../tmp/x",
    "nul": lambda v: f"rp_{os.getpid():x}_a\x00b",
    "foreign": lambda v: "rp_1_x",
    "empty": lambda v: "",
    "none": lambda v: None,
    "int": lambda v: 5,
    "bytes": lambda v: b"rp_x",
    "map": lambda v: {"where": 1},
}
INT_EDGES = [0, 1, -1, 63, 64, ARENA_BYTES - 1, ARENA_BYTES, THRESHOLD - 1, THRESHOLD]
INT_EDGES += [THRESHOLD + 1, 2**31, 2**63, -(2**63), 2**64, 2**70]
fields_int = st.one_of(
    st.sampled_from(INT_EDGES),
    st.integers(-(2**66), 2**66),
    st.sampled_from([1.0, None, "0", True, False, [0], b"\x00"]),
)
flags = st.sampled_from([True, False, 1, 0, None, "yes"])
dtype_fields = st.sampled_from(
    [
        "|u1",
        "<f8",
        ">i4",
        "<U2",
        "|S0",
        "<U0",
        "|V0",
        "|O",
        "|O8",
        "<M8[ns]",
        "<M8[1000000000000s]",
        "int",
        "f8",
        "<f8 ",
        "",
        ["|u1", [2]],
        ["|u1", [2**40]],
        ["|u1", []],
        {"names": ["a"], "formats": ["<i4"], "offsets": [0], "itemsize": 4},
        {"names": ["a"], "formats": ["<i4"], "offsets": [2**40], "itemsize": 4},
        {"names": ["a"], "formats": ["|O8"], "offsets": [0], "itemsize": 8},
        {"names": [], "formats": [], "offsets": [], "itemsize": 2**40},
        {"names": [], "formats": [], "offsets": [], "itemsize": -1},
        {"names": ["a", "a"], "formats": ["u1", "u1"], "offsets": [0, 0], "itemsize": 1},
        [[[[[[[[[["|u1", [1]], [1]], [1]], [1]], [1]], [1]], [1]], [1]], [1]], [1]],
        None,
        1,
    ]
)
dims = st.one_of(st.integers(0, 5), st.sampled_from([2**31, 2**40, 2**63, 2**64, -1, -(2**63)]))
shapes = st.one_of(
    st.lists(dims, max_size=4),
    st.sampled_from([None, "3", [1.0], [True], [[2]], [1] * 65, [0, 2**70], [2**62, 2**62]]),
)
stride_lists = st.one_of(
    st.lists(
        st.one_of(
            st.sampled_from([0, 1, 8, -1, -8, 4096, 2**31, 2**62, -(2**62), 2**64]),
            st.integers(-5000, 5000),
        ),
        max_size=4,
    ),
    st.sampled_from([None, "8", [1.0], [True], [None]]),
)
where_labels = st.sampled_from(sorted(WHERES))
# A payload as (tag, fields); fields name their ``where`` by label, filled in per victim.
hostile_payloads = st.one_of(
    st.tuples(
        st.just(TAG_SHM_BYTES),
        st.tuples(where_labels, fields_int, fields_int, flags).map(list),
    ),
    st.tuples(
        st.just(TAG_SHM_NDARRAY),
        st.tuples(where_labels, fields_int, dtype_fields, shapes, stride_lists, flags).map(list),
    ),
    st.tuples(
        st.sampled_from([TAG_SHM_BYTES, TAG_SHM_NDARRAY]),
        st.one_of(st.lists(st.integers(0, 4), max_size=7), st.sampled_from([None, 0, "x", {}])),
    ),
)
ANNOTATIONS = [np.ndarray, bytes, memoryview, bytearray, Any]


def encode_hostile(v: Victim, tag: int, fields: Any) -> bytes:
    if type(fields) is list and fields and fields[0] in WHERES and len(fields) in (4, 6):
        fields = [WHERES[fields[0]](v), *fields[1:]]
    return bytes(cbor2.dumps(cbor2.CBORTag(tag, fields)))


def memory_of(value: Any) -> memoryview | None:
    """The memory an array was built on: numpy keeps the exporter (a lease) as its base."""
    owner = value
    while isinstance(owner, np.ndarray):
        owner = owner.base
    return None if owner is None else memoryview(owner).cast("B")


def check_decoded(value: Any, tag: int, fields: Any) -> None:
    """What a hostile payload decodes to must be what it says, inside the memory it names."""
    if tag == TAG_SHM_BYTES:
        assert isinstance(value, (bytes, bytearray, memoryview))
        assert len(value) == fields[2], "a view of other bytes than those referenced"
        assert bytes(value) == bytes(len(value))  # all the victim's memory holds is zeros
        return
    assert isinstance(value, np.ndarray)
    if value.size:
        low, high = np.lib.array_utils.byte_bounds(value)
        shared = memory_of(value)
        assert shared is not None
        start = address(np.frombuffer(shared, np.uint8))
        assert start <= low <= high <= start + shared.nbytes
        if value.nbytes <= 1 << 20:
            value.tobytes()  # every element can be read


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(hostile_payloads, st.sampled_from(ANNOTATIONS)), min_size=1, max_size=4))
async def test_hostile_shared_memory_references_are_decode_errors(cases: list[Any]) -> None:
    async with victim() as v:
        for (tag, fields), annotation in cases:
            payload = encode_hostile(v, tag, fields)
            sent = cbor2.loads(payload).value
            codec: TypeCodec[Any] = TypeCodec(annotation)
            for transport in (v.host, v.worker):
                try:
                    value = codec.decode(payload, resolver=transport.buffers)
                except DecodeError:
                    continue
                check_decoded(value, tag, sent)
                del value


async def test_the_victims_own_references_decode() -> None:
    """The references the hostile payloads are made from are valid: a sanity check."""
    async with victim() as v:
        block = encode_hostile(v, TAG_SHM_BYTES, ["block", 0, THRESHOLD, False])
        view = TypeCodec(memoryview).decode(block, resolver=v.worker.buffers)
        assert view.readonly
        assert view.nbytes == THRESHOLD
        with pytest.raises(DecodeError):  # the host's own block is not the worker's to send
            TypeCodec(memoryview).decode(block, resolver=v.host.buffers)
        arena = encode_hostile(v, TAG_SHM_NDARRAY, ["arena", 80, "<u2", [10, 4], [-8, 2], True])
        for transport in (v.host, v.worker):
            array = TypeCodec(np.ndarray).decode(arena, resolver=transport.buffers)
            assert array.shape == (10, 4)
            assert array.flags.writeable
            array[0, 0] = 7  # element 0 is at byte 80 of the allocation, the rows go down
            array[9, 3] = 9  # the last one at byte 8 + 3 * 2
            assert (v.keep[80], v.keep[14]) == (7, 9)
            v.keep[80] = v.keep[14] = 0
            with pytest.raises(IndexError):
                array[10, 0]
        del view, array


@pytest.mark.parametrize("nbytes", [-1, -10, -ARENA_BYTES])
@pytest.mark.parametrize("where", ["arena", "block"])
async def test_a_negative_length_is_a_decode_error(where: str, nbytes: int) -> None:
    async with victim() as v:
        for transport in (v.host, v.worker):
            payload = encode_hostile(v, TAG_SHM_BYTES, [where, 64, nbytes, True])
            with pytest.raises(DecodeError):
                TypeCodec(memoryview).decode(payload, resolver=transport.buffers)
