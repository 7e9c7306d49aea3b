"""Zero-copy through a real pool (API.md section 3): arena arrays by reference, large values
copied once, leases, and the cases where shared memory must not bite the user."""

from __future__ import annotations

import gc
import os
import signal
from collections.abc import Iterator

import anyio
import pytest

from rapace import PluginPool, WorkerCrashed
from rapace.shm import SUPPORTED as SHM_SUPPORTED

np = pytest.importorskip("numpy")

from tests.integration.zero_copy_services import Imaging  # noqa: E402

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not SHM_SUPPORTED, reason="shared memory needs Linux on x86-64"),
]

LARGE = 256 * 1024  # above the copy threshold


@pytest.fixture
def pool() -> Iterator[PluginPool[Imaging]]:
    # One pool per test: the leak check must see a pool's blocks and arena go with it.
    with PluginPool(Imaging, workers=2) as pool:
        yield pool


def test_the_zero_copy_example_of_the_api(pool: PluginPool[Imaging]) -> None:
    img = pool.empty((512, 512, 3), dtype="uint8")
    img[...] = np.arange(512, dtype=np.uint8)[:, None, None]
    out = pool.submit(Imaging.blur, img, 3).result()
    np.testing.assert_array_equal(out, img[::3, ::3])
    assert not out.flags.writeable  # a received copy is read-only


def test_arena_arrays_are_passed_by_reference_and_written_in_place(
    pool: PluginPool[Imaging],
) -> None:
    before = pool.stats()
    buf = pool.zeros((64, 64), dtype="int32")
    assert pool.submit(Imaging.fill, buf, 7).result() == buf.size
    assert (buf == 7).all()
    after = pool.stats()
    assert after["bytes_by_reference"] - before["bytes_by_reference"] == buf.nbytes
    assert after["bytes_copied"] == before["bytes_copied"]


@pytest.mark.parametrize(
    "view",
    [
        lambda a: a[1:-1],
        lambda a: a[::2],
        lambda a: a[::-1],
        lambda a: a[:, ::3],
        lambda a: a.T,
        lambda a: a[5:40, 10:20].view(np.uint16),
    ],
    ids=["rows", "every-other-row", "reversed", "strided-columns", "transposed", "dtype-view"],
)
def test_any_view_of_arena_memory_is_shared(pool: PluginPool[Imaging], view: object) -> None:
    base = pool.zeros((64, 64), dtype="uint8")
    part = view(base)  # type: ignore[operator]
    writable, _, strides = pool.submit(Imaging.describe, part).result()
    assert writable
    assert strides == list(part.strides)  # not made contiguous: the worker sees the view
    pool.submit(Imaging.fill, part, 9).result()
    expected = np.zeros((64, 64), dtype="uint8")
    view(expected)[...] = 9  # type: ignore[operator]
    np.testing.assert_array_equal(base, expected)


def test_a_read_only_view_of_arena_memory_stays_read_only(pool: PluginPool[Imaging]) -> None:
    base = pool.zeros((8, 8), dtype="uint8")
    frozen = base[2:4]
    frozen.flags.writeable = False
    writable, _, _ = pool.submit(Imaging.describe, frozen).result()
    assert not writable  # shared, but the caller said nobody writes through this view
    assert pool.submit(Imaging.describe, base).result()[0]


def test_a_pool_buffer_is_shared_without_numpy_types(pool: PluginPool[Imaging]) -> None:
    buf = pool.buffer(1000)
    assert isinstance(buf, memoryview)
    assert not buf.readonly
    assert buf.nbytes == 1000
    assert pool.submit(Imaging.fill_view, buf[100:200], 5).result() == 100
    assert bytes(buf[95:105]) == b"\0" * 5 + b"\5" * 5
    assert pool.submit(Imaging.nbytes, buf).result() == 1000


def test_a_returned_arena_view_is_the_callers_memory(pool: PluginPool[Imaging]) -> None:
    img = pool.zeros((32, 32), dtype="float32")
    back = pool.submit(Imaging.same, img[4:8]).result()
    assert np.shares_memory(back, img)
    assert back.flags.writeable


def test_large_values_are_copied_once_and_read_in_place(pool: PluginPool[Imaging]) -> None:
    data = np.arange(LARGE // 8, dtype=np.float64)
    before = pool.stats()
    assert pool.submit(Imaging.total, data).result() == float(data.sum())
    writable, contiguous, _ = pool.submit(Imaging.describe, data).result()
    assert (writable, contiguous) == (False, True)  # a read-only view of the one copy
    assert pool.submit(Imaging.nbytes, memoryview(bytes(LARGE))).result() == LARGE
    after = pool.stats()
    assert after["bytes_copied"] - before["bytes_copied"] == 3 * LARGE


def test_a_non_contiguous_array_is_copied_contiguous_and_counted(
    pool: PluginPool[Imaging],
) -> None:
    data = np.ones((512, 512), dtype=np.float64)[:, ::2]
    before = pool.stats()["arrays_made_contiguous"]
    assert pool.submit(Imaging.total, data).result() == float(data.sum())
    assert pool.stats()["arrays_made_contiguous"] == before + 1


def test_bytes_annotations_get_bytes(pool: PluginPool[Imaging]) -> None:
    payload = os.urandom(LARGE)
    assert pool.submit(Imaging.is_bytes, payload).result()
    echoed = pool.submit(Imaging.echo_bytes, payload).result()
    assert type(echoed) is bytes
    assert echoed == payload


def test_object_arrays_fail_clearly(pool: PluginPool[Imaging]) -> None:
    with pytest.raises(Exception, match="object"):
        pool.submit(Imaging.total, np.array([object()] * 10)).result()
    with pytest.raises(TypeError, match="objects"):
        pool.empty(3, dtype=object)


def test_keeping_thousands_of_results_never_stalls_the_pool(pool: PluginPool[Imaging]) -> None:
    """Every result is a view leased from a worker's block: kept, they would pin the worker
    if blocks were not bounded (past the bound, results travel in the payload)."""
    kept = [f.result() for f in [pool.submit(Imaging.ones, LARGE) for _ in range(600)]]
    assert all(int(r[-1]) == 1 for r in kept)
    assert pool.submit(Imaging.nbytes, memoryview(b"x")).result() == 1
    del kept
    gc.collect()


def test_results_stay_readable_after_the_pool_closes() -> None:
    with PluginPool(Imaging, workers=1) as pool:
        result = pool.submit(Imaging.ones, LARGE).result()
        arena = pool.zeros(100, dtype="uint8")
        buf = pool.buffer(10)
    # Closing never raised BufferError although views were alive; they still work.
    assert int(result.sum()) == LARGE
    arena[:] = 3
    buf[:] = b"0123456789"
    assert int(arena.sum()) == 300
    assert bytes(buf) == b"0123456789"
    with pytest.raises(RuntimeError, match="closed"):
        pool.empty(3)
    del result, arena, buf
    gc.collect()


def test_arena_memory_is_freed_when_the_last_view_dies(pool: PluginPool[Imaging]) -> None:
    before = pool.stats()["arena_bytes_in_use"]
    a = pool.empty((1024, 1024), dtype="uint8")
    part = a[10:20]
    del a
    gc.collect()
    assert pool.stats()["arena_bytes_in_use"] >= before + 1024 * 1024  # part keeps it
    del part
    gc.collect()
    assert pool.stats()["arena_bytes_in_use"] == before


def test_a_worker_killed_while_holding_views_leaks_nothing() -> None:
    with PluginPool(Imaging, workers=1) as pool:
        data = np.ones(LARGE, dtype=np.uint8)
        shared = pool.zeros(LARGE, dtype="uint8")
        for arg in (data, shared):
            with pytest.raises(WorkerCrashed):
                pool.submit(Imaging.keep_then_die, arg).result()
        # The replacement works, with large values both ways; the dead worker's segments
        # are gone (the leak fixture checks /dev/shm after the pool closes).
        assert pool.submit(Imaging.total, data).result() == LARGE
        assert int(pool.submit(Imaging.ones, LARGE).result().sum()) == LARGE


def test_awaiting_large_results_from_an_event_loop(pool: PluginPool[Imaging]) -> None:
    async def main() -> float:
        img = pool.empty(LARGE, dtype="uint8")
        img[:] = 1
        return await pool.proxy.total(img) + float((await pool.proxy.ones(LARGE)).sum())

    assert anyio.run(main) == 2 * LARGE


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_socket_transports_copy_arena_arrays(transport: str) -> None:
    with PluginPool(Imaging, workers=1, transport=transport) as pool:
        img = pool.zeros(LARGE, dtype="uint8")
        # Copied, and so read-only in the worker: a write fails loudly instead of being lost.
        with pytest.raises(ValueError, match="read-only"):
            pool.submit(Imaging.fill, img, 4).result()
        assert pool.submit(Imaging.total, img + 1).result() == LARGE


def test_sigkill_of_the_host_leaves_no_arena_segment(tmp_path: object) -> None:
    """Covered for link segments by test_pool_crashes; arena blocks carry the host's start
    time and pid, so the workers' sweep removes them too."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np\n"
        "from rapace import PluginPool\n"
        "from tests.integration.zero_copy_services import Imaging\n"
        "pool = PluginPool(Imaging, workers=1).start()\n"
        "a = pool.zeros(1 << 20, dtype='uint8')\n"
        "pool.submit(Imaging.fill, a, 1).result()\n"
        "print(pool.workers[0].pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        assert child.stdout is not None
        worker = int(child.stdout.readline())
        host = child.pid
        prefix = f"rp_{host:x}_"
        assert any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        pidfd = os.pidfd_open(worker)
        try:
            import select

            assert select.select([pidfd], [], [], 10)[0], "the worker outlived its host"
        finally:
            os.close(pidfd)
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    finally:
        child.kill()
        child.wait()
        if child.stdin:
            child.stdin.close()
        if child.stdout:
            child.stdout.close()
