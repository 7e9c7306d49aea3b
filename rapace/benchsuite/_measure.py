"""Timing helpers shared by every workload: percentiles, batches, repetitions, CPU time."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = (
    "IN_FLIGHT",
    "Effort",
    "batch_rate",
    "cpu_seconds",
    "latency",
    "repeat",
)

#: Calls submitted together before waiting for all of them (the throughput workload).
IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class Effort:
    """How long each workload measures: the default run, or ``--quick``."""

    latency_calls: int
    latency_warmup: int
    rate_seconds: float  # time budget of a throughput measurement
    map_items: int
    bulk_reps: tuple[int, int]  # at least, at most (within bulk_seconds)
    bulk_seconds: float
    small_calls: int  # calls with a 1 KiB arena array
    stream_items: int
    stream_runs: int  # the best of these many
    startup_reps: int  # timed, after one untimed start
    idle_seconds: float

    @classmethod
    def default(cls) -> Effort:
        return cls(
            latency_calls=5000,
            latency_warmup=500,
            rate_seconds=2.0,
            map_items=200_000,
            bulk_reps=(5, 15),
            bulk_seconds=2.0,
            small_calls=1000,
            stream_items=100_000,
            stream_runs=2,
            startup_reps=5,
            idle_seconds=1.0,
        )

    @classmethod
    def quick(cls) -> Effort:
        return cls(
            latency_calls=300,
            latency_warmup=50,
            rate_seconds=0.25,
            map_items=20_000,
            bulk_reps=(1, 3),
            bulk_seconds=0.3,
            small_calls=100,
            stream_items=20_000,
            stream_runs=1,
            startup_reps=1,
            idle_seconds=0.3,
        )


def latency(call: Callable[[], object], calls: int, warmup: int) -> dict[str, float]:
    """p50/p99/mean of ``calls`` sequential calls, in microseconds, after ``warmup``."""
    for _ in range(warmup):
        call()
    samples = [0.0] * calls
    clock = time.perf_counter
    for i in range(calls):
        start = clock()
        call()
        samples[i] = clock() - start
    samples.sort()
    return {
        "p50_us": samples[calls // 2] * 1e6,
        "p99_us": samples[min(calls - 1, int(calls * 0.99))] * 1e6,
        "mean_us": sum(samples) / calls * 1e6,
        "calls": calls,
    }


def batch_rate(batch: Callable[[], int], seconds: float, min_batches: int = 5) -> dict[str, float]:
    """Calls per second of ``batch`` (which makes some calls, waits for all of them and
    returns how many), repeated for about ``seconds`` after one warm-up batch."""
    batch()
    calls = batches = 0
    start = time.perf_counter()
    deadline = start + seconds
    while batches < min_batches or time.perf_counter() < deadline:
        calls += batch()
        batches += 1
    elapsed = time.perf_counter() - start
    return {"per_s": calls / elapsed, "calls": calls, "seconds": elapsed}


def repeat(
    run: Callable[[], Any], reps: tuple[int, int], seconds: float, *, warmup: bool = True
) -> dict[str, float]:
    """Median and best time of ``run``: at least ``reps[0]`` times, then more (up to
    ``reps[1]``) while within ``seconds``. A first slow run stops it early: a 64 MiB call
    that takes a second is measured twice, not ten times."""
    if warmup:
        start = time.perf_counter()
        run()
        if time.perf_counter() - start > seconds:
            reps = (1, 1)
    low, high = reps
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < low or (len(times) < high and time.perf_counter() - began < seconds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "reps": len(times),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time every thread of process ``pid`` has used so far.

    From /proc/PID/task/*/schedstat (nanoseconds) where the kernel has it, else from
    /proc/PID/stat (clock ticks, 10 ms: too coarse for a one-second sample).
    """
    total = 0
    found = False
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
            found = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile, or no schedstat
    if found:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
