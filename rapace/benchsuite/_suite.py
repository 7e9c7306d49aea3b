"""Running the suite: every selected workload for rapace over each transport, then the
baselines, each under a guard so that one failure marks its own rows and the run goes on."""

from __future__ import annotations

import datetime
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rapace.benchsuite._measure import Effort
from rapace.benchsuite._model import (
    ROWS,
    TRANSPORTS,
    WORKLOADS,
    Measurement,
    Results,
    rapace_column,
)
from rapace.benchsuite._workloads import (
    BASELINE_WORKLOADS,
    RAPACE_WORKLOADS,
    Context,
    NotAvailable,
    Resources,
)

__all__ = ("ARENA_FALLBACK_MIB", "Config", "Run", "arena_size", "machine_info", "run_suite")

MIB = 1 << 20
ARENA_DEFAULT_MIB = 512
ARENA_FALLBACK_MIB = 64
#: /dev/shm must hold the arena array and this much more (rings, slots, 64 MiB blocks),
#: or the default arena size falls back to ARENA_FALLBACK_MIB.
ARENA_HEADROOM_MIB = 512
SHM_DIR = "/dev/shm"


@dataclass(frozen=True, slots=True)
class Config:
    workloads: tuple[str, ...] = WORKLOADS
    transports: tuple[str, ...] = TRANSPORTS
    quick: bool = False
    baselines: bool = True
    arena_mib: int | None = None  # None: ARENA_DEFAULT_MIB, smaller if /dev/shm is small


@dataclass
class Run:
    """A finished run: its configuration, the machine, the cells, and how long it took."""

    config: Config
    machine: dict[str, Any]
    results: Results
    arena_bytes: int
    seconds: float

    @property
    def effort(self) -> Effort:
        return Effort.quick() if self.config.quick else Effort.default()

    def config_json(self) -> dict[str, Any]:
        out = asdict(self.config)
        out["arena_bytes"] = self.arena_bytes
        out["effort"] = asdict(self.effort)
        return out


def arena_size(requested_mib: int | None) -> tuple[int, str | None]:
    """The arena array's size in bytes, and a note when the default had to shrink."""
    if requested_mib is not None:
        return requested_mib * MIB, None
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return (
            ARENA_FALLBACK_MIB * MIB,
            f"{SHM_DIR} not found: arena array of {ARENA_FALLBACK_MIB} MiB",
        )
    free = stats.f_bavail * stats.f_frsize
    if free < (ARENA_DEFAULT_MIB + ARENA_HEADROOM_MIB) * MIB:
        return ARENA_FALLBACK_MIB * MIB, (
            f"{SHM_DIR} has {free // MIB} MiB free: arena array of {ARENA_FALLBACK_MIB} MiB "
            f"instead of {ARENA_DEFAULT_MIB} MiB"
        )
    return ARENA_DEFAULT_MIB * MIB, None


def run_suite(config: Config, progress: Callable[[str], None] = lambda _: None) -> Run:
    """Run ``config``'s workloads: rapace over each transport, then the baselines."""
    started = time.perf_counter()
    effort = Effort.quick() if config.quick else Effort.default()
    arena_bytes, arena_note = arena_size(config.arena_mib)
    ctx = Context(effort=effort, arena_bytes=arena_bytes)
    results = ctx.results
    if arena_note is not None and "arena" in config.workloads:
        results.note(arena_note)
    results.labels["arena.big"] = f"arena array {_size(arena_bytes)} -> len"
    results.labels["stream"] = f"server stream of {_count(effort.stream_items)} ints"

    def say(what: str) -> None:
        progress(f"[{time.perf_counter() - started:5.1f} s] {what}")

    # start-up first: its idle-CPU sample must not see the other pools' threads.
    order = sorted(config.workloads, key=lambda name: name != "startup")
    for transport in config.transports:
        res = Resources()
        try:
            for workload in order:
                say(f"rapace {transport}: {workload}")
                _run_rapace(ctx, res, transport, workload)
        finally:
            res.close()
    if config.baselines:
        res = Resources()
        try:
            for workload in order:
                if workload in BASELINE_WORKLOADS:
                    say(f"baselines: {workload}")
                    BASELINE_WORKLOADS[workload](ctx, res)
        finally:
            res.close()
    _compare_arena(results, config.transports)
    seconds = time.perf_counter() - started
    say("done")
    return Run(config, machine_info(), results, arena_bytes, seconds)


def _run_rapace(ctx: Context, res: Resources, transport: str, workload: str) -> None:
    column = rapace_column(transport)
    rows = [row.key for row in ROWS if row.workload == workload]
    try:
        cells = RAPACE_WORKLOADS[workload](ctx, res, transport)
    except NotAvailable as exc:
        cells = {row: Measurement.missing(f"n/a ({exc})") for row in rows}
    except Exception as exc:
        cells = {row: Measurement.missing(f"error: {type(exc).__name__}: {exc}") for row in rows}
    for row, measurement in cells.items():
        ctx.results.put(row, column, measurement)


def _compare_arena(results: Results, transports: Sequence[str]) -> None:
    """Zero-copy means the big arena array costs about what the 1 KiB one does: say how
    many times more it cost, per transport."""
    parts = []
    for transport in transports:
        big = results.get("arena.big", rapace_column(transport))
        small = results.get("arena.small", rapace_column(transport))
        if big and small and big.value and small.value:  # ms and us
            parts.append(f"{transport} {big.value * 1e3 / small.value:.1f}x")
    if parts:
        results.note(f"arena: big / 1 KiB call time: {', '.join(parts)} (zero-copy: about 1x)")


def _size(nbytes: int) -> str:
    if nbytes >= MIB and nbytes % MIB == 0:
        return f"{nbytes // MIB} MiB"
    return f"{nbytes / MIB:.1f} MiB"


def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, Python, platform, date and the versions that matter here."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    try:
        stats = os.statvfs(SHM_DIR)
        info["dev_shm_free_bytes"] = stats.f_bavail * stats.f_frsize
    except OSError:
        info["dev_shm_free_bytes"] = None
    info["versions"] = {name: _version(name) for name in _PACKAGES}
    return info


_PACKAGES: Sequence[str] = ("rapace", "anyio", "cbor2", "numpy", "pyzmq", "loky", "matplotlib")


def _version(name: str) -> str | None:
    if name == "rapace":
        import rapace

        return rapace.__version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
