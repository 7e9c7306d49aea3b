"""``rapace demo``: an image-processing plugin pool over shared memory.

It renders a seeded batch of RGB images straight into the pool's shared memory
(``pool.empty``); two workers blur, shrink and histogram them, reading the images in place and
writing their results into output buffers that live there too. Then: what moved how
(``pool.stats()``), the same work through ``concurrent.futures.ProcessPoolExecutor``, a
streaming call, a remote error, and a worker killed mid-call.

The service is :mod:`rapace._demo_imaging`, an importable module: the demo runs from an
installed wheel, and the baseline's pickled calls find the very same functions.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rapace.pool import PluginPool

__all__ = ("run_demo",)

IMAGES = 48
SIZE = 1024  # pixels a side
SEED = 2026
RADIUS = 4  # a 9 x 9 box blur
FACTOR = 2  # thumbnails are 512 x 512
WORKERS = 2
# Timed rounds against the baseline, best kept: a shared 2-core machine is noisy, and noise
# only ever adds time.
ROUNDS = 3


def _say(text: str = "") -> None:
    print(text, flush=True)  # noqa: T201  # the demo reports by printing


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


@dataclass
class _Batch:
    images: Any  # (IMAGES, SIZE, SIZE, 3) uint8, in the pool's shared memory
    thumbnails: Any
    histograms: Any


def run_demo() -> int:
    try:
        import numpy  # noqa: F401  # only to fail early, with advice, when it is missing
    except ImportError:
        sys.stderr.write(
            "rapace demo needs numpy: pip install 'rapace[numpy]' (or pip install numpy)\n"
        )
        return 2
    from rapace import PluginPool
    from rapace._demo_imaging import Imaging

    _say(f"rapace demo: an image-processing plugin pool ({WORKERS} workers, shared memory)")
    _say()
    began = time.perf_counter()
    with PluginPool(Imaging, workers=WORKERS) as pool:
        pids = ", ".join(str(w.pid) for w in pool.workers)
        _say(
            f"PluginPool(Imaging, workers={WORKERS}) ready in "
            f"{time.perf_counter() - began:.2f} s: worker pids {pids}, "
            f"transport {pool.stats()['transport']}"
        )
        batch = _process_batch(pool)
        _compare(pool, batch)
        _stream_error_and_crash(pool, batch)
        _copy_versus_reference(pool, batch.images)
    _say()
    _say(f"Done in {time.perf_counter() - began:.1f} s.")
    return 0


def _process_batch(pool: PluginPool[Any]) -> _Batch:
    import numpy as np

    from rapace._demo_imaging import process_image, render_images

    images = pool.empty((IMAGES, SIZE, SIZE, 3), np.uint8)
    began = time.perf_counter()
    render_images(images, SEED)
    _say(
        f"Rendered {IMAGES} synthetic {SIZE}x{SIZE} RGB images ({_mb(images.nbytes)}) into "
        f"pool.empty() shared memory in {time.perf_counter() - began:.2f} s"
    )
    side = SIZE // FACTOR
    batch = _Batch(
        images,
        pool.empty((IMAGES, side, side, 3), np.uint8),
        pool.empty((IMAGES, 3, 256), np.int64),
    )
    _say(
        f"Output buffers, also from pool.empty(): {IMAGES} thumbnails {side}x{side}x3 "
        f"({_mb(batch.thumbnails.nbytes)}) and {IMAGES} x 3 x 256 histograms"
    )
    _say()
    _say(
        f"Batch: box blur (radius {RADIUS}) -> {FACTOR}x downsample -> histogram per channel, "
        "one call per image."
    )
    _say("The workers read each image in place and write their results into the buffers.")
    before = pool.stats()
    # A bar is for a person at a terminal: piped or captured, stderr stays silent.
    tty = sys.stderr is not None and sys.stderr.isatty()
    seconds = _run_pool_batch(pool, batch, progress=tty)
    after = pool.stats()
    _say(f"  {IMAGES} images in {seconds:.2f} s")
    check = IMAGES // 3
    small, hist = process_image(images[check], RADIUS, FACTOR)
    same = np.array_equal(small, batch.thumbnails[check]) and np.array_equal(
        hist, batch.histograms[check]
    )
    _say(
        f"  image {check} recomputed here: thumbnail and histograms "
        f"{'identical' if same else 'DIFFERENT'} to what the worker wrote"
    )
    counts = batch.histograms.sum(axis=(0, 2))
    levels = (batch.histograms * np.arange(256)).sum(axis=(0, 2)) / counts
    _say(
        "  mean level of the blurred batch, from the histograms: "
        + ", ".join(f"{name} {level:.1f}" for name, level in zip("RGB", levels, strict=True))
    )
    _report_stats(before, after, images.nbytes, seconds)
    return batch


def _run_pool_batch(pool: PluginPool[Any], batch: _Batch, *, progress: bool = False) -> float:
    from rapace._demo_imaging import Imaging

    began = time.perf_counter()
    for _ in pool.map(
        Imaging.process,
        batch.images,
        itertools.repeat(RADIUS),
        itertools.repeat(FACTOR),
        batch.thumbnails,
        batch.histograms,
        progress=progress,
    ):
        pass
    return time.perf_counter() - began


def _report_stats(
    before: dict[str, Any], after: dict[str, Any], input_bytes: int, seconds: float
) -> None:
    def delta(key: str) -> int:
        return int(after[key] - before[key])

    latency = after["latency_us"]
    rows = [
        ("calls", f"{delta('calls')}"),
        (
            "throughput",
            f"{IMAGES / seconds:.1f} images/s, {input_bytes / seconds / 1e6:,.0f} MB/s of input",
        ),
        ("bytes passed by reference (zero-copy)", _mb(delta("bytes_by_reference"))),
        ("bytes copied into shared memory", _mb(delta("bytes_copied"))),
        ("ring high-water mark", f"{after['ring_high_water']} messages"),
        (
            "latency p50 / p90 / p99",
            " / ".join(f"{latency[q] / 1e3:,.0f}" for q in ("p50", "p90", "p99"))
            + f" ms (map queues all {IMAGES} calls at once)",
        ),
        ("shared memory allocated with pool.empty", _mb(after["arena_bytes_in_use"])),
    ]
    _say()
    _say("pool.stats() for the batch (what the host sent its workers):")
    for name, value in rows:
        _say(f"  {name:<40}{value}")


def _compare(pool: PluginPool[Any], batch: _Batch) -> None:
    """Three workloads, from compute-bound to nearly all data movement, through the pool and
    through ProcessPoolExecutor; rounds interleave so a slow spell of the machine hits both."""
    import concurrent.futures
    import multiprocessing

    import numpy as np

    from rapace._demo_imaging import Imaging, channel_histograms, channel_levels, process_image

    _say()
    _say(
        f"Against concurrent.futures.ProcessPoolExecutor({WORKERS}): the same functions, with "
        f"images and results pickled (best of {ROUNDS} rounds each) ..."
    )
    side = SIZE // FACTOR
    thumbnails = np.empty((IMAGES, side, side, 3), np.uint8)
    histograms = np.empty((IMAGES, 3, 256), np.int64)

    def executor_pipeline() -> None:
        results = executor.map(
            process_image, batch.images, itertools.repeat(RADIUS), itertools.repeat(FACTOR)
        )
        # The executor's results come back as new arrays: into the batch's buffers they go.
        for i, (small, hist) in enumerate(results):
            thumbnails[i], histograms[i] = small, hist

    def timed(run: Callable[[], object]) -> Callable[[], float]:
        def clock() -> float:
            began = time.perf_counter()
            result = run()
            if isinstance(result, Iterator):
                for _ in result:
                    pass
            return time.perf_counter() - began

        return clock

    workloads: list[tuple[str, Callable[[], float], Callable[[], float]]] = [
        (
            "blur + downsample + histograms",
            lambda: _run_pool_batch(pool, batch),
            timed(executor_pipeline),
        ),
        (
            "histograms only",
            timed(lambda: pool.map(Imaging.histogram, batch.images)),
            timed(lambda: executor.map(channel_histograms, batch.images)),
        ),
        (
            "levels (min, max) only",
            timed(lambda: pool.map(Imaging.levels, batch.images)),
            timed(lambda: executor.map(channel_levels, batch.images)),
        ),
    ]
    best: dict[tuple[str, str], float] = {}
    # Not fork: this process runs the pool's loop thread and maps shared memory, and forking
    # a threaded process is unsafe (Python 3.12+ warns about it).
    context = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context) as executor:
        # Start the processes and import numpy in them before any clock starts, as the pool's
        # workers did.
        tiny = np.zeros((4, 4, 3), np.uint8)
        list(executor.map(channel_levels, [tiny] * WORKERS * 4))
        for _ in range(ROUNDS):
            for label, ours, theirs in workloads:
                for side_name, run in (("pool", ours), ("executor", theirs)):
                    seconds = run()
                    key = (label, side_name)
                    best[key] = min(seconds, best.get(key, seconds))
    _say(f"  {'images/s':<32}{'rapace pool':>12}{'ProcessPool':>13}{'speed-up':>10}")
    for label, _, _ in workloads:
        ours_rate = IMAGES / best[(label, "pool")]
        theirs_rate = IMAGES / best[(label, "executor")]
        _say(f"  {label:<32}{ours_rate:>12.1f}{theirs_rate:>13.1f}{ours_rate / theirs_rate:>9.2f}x")
    _say(
        "  Compute-bound work runs at the speed of the cores either way; the less work per byte,"
        "\n  the more the executor's pickling and piping of each image costs, and sharing saves."
    )


def _stream_error_and_crash(pool: PluginPool[Any], batch: _Batch) -> None:
    import numpy as np

    import rapace
    from rapace._demo_imaging import Imaging

    _say()
    _say("Streaming: Imaging.pyramid(image 0, 4 levels) sends each level as soon as it is made")
    for depth, level in enumerate(pool.proxy.pyramid(batch.images[0], 4), 1):
        height, width, _ = level.shape
        where = "a read-only view" if not level.flags.writeable else "a writable array"
        _say(f"  level {depth}: {height}x{width} ({level.nbytes:,} bytes, {where})")

    _say("A handler's exception keeps its type; the remote traceback is its __cause__:")
    try:
        pool.submit(Imaging.blur, batch.images[0], 0).result()
    except ValueError as exc:
        _say(f"  {type(exc).__name__}: {exc}")
        frames = [line.strip() for line in str(exc.__cause__).splitlines()]
        _say(f"  worker's last frame: {[f for f in frames if f.startswith('File ')][-1]}")

    _say("A worker killed (SIGKILL) mid-call fails only that call:")
    try:
        pool.submit(Imaging.crash).result()
    except rapace.WorkerCrashed as exc:
        _say(f"  rapace.WorkerCrashed: {exc}")
    # Only to show the replacement's pid: calls never need this wait, they go to a ready
    # worker or wait for one.
    deadline = time.monotonic() + 30
    while any(w.state != "ready" for w in pool.workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    again = pool.empty((4, *batch.thumbnails.shape[1:]), np.uint8)
    hists = pool.empty((4, 3, 256), np.int64)
    arguments = (itertools.repeat(RADIUS), itertools.repeat(FACTOR), again, hists)
    for _ in pool.map(Imaging.process, batch.images[:4], *arguments):
        pass
    same = np.array_equal(again, batch.thumbnails[:4])
    workers = ", ".join(f"pid {w.pid} ({w.restarts} restarts)" for w in pool.workers)
    _say(f"  the pool replaced it: workers {workers}")
    _say(f"  images 0-3 processed again: {'identical' if same else 'DIFFERENT'} results")


def _copy_versus_reference(pool: PluginPool[Any], images: Any) -> None:
    import numpy as np

    from rapace._demo_imaging import Imaging

    _say("Copied, not shared: a plain numpy image (np.array, not pool.empty) is copied once")
    private = np.array(images[2])
    before = pool.stats()["bytes_copied"]
    blurred = pool.submit(Imaging.blur, private, RADIUS).result()
    copied = pool.stats()["bytes_copied"] - before
    _say(
        f"  blur(private image): {_mb(copied)} copied into shared memory (the image there, "
        f"the result back, once each); the blurred image comes back as a "
        f"{'writable' if blurred.flags.writeable else 'read-only'} view"
    )
