"""What a run produces: one :class:`Measurement` per (row, column) of the table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = (
    "BASELINES",
    "LIMIT",
    "ROWS",
    "TRANSPORTS",
    "WORKLOADS",
    "Measurement",
    "Results",
    "RowSpec",
    "rapace_column",
)

TRANSPORTS = ("shm", "unix", "tcp")

#: Peer baselines, in table order; the ratio column compares rapace with the best of these.
BASELINES = ("ProcessPoolExecutor", "multiprocessing.Pipe", "pyzmq", "loky")
#: Physical limits (not peers): shown in their own column, never in the ratio.
LIMIT = "limit"

WORKLOADS = ("latency", "throughput", "map", "bulk", "arena", "stream", "startup")


def rapace_column(transport: str) -> str:
    return f"rapace {transport}"


@dataclass(frozen=True, slots=True)
class RowSpec:
    key: str
    workload: str  # the --only name that runs it
    label: str
    unit: str
    better: Literal["lower", "higher"]


ROWS = (
    RowSpec("latency.p50", "latency", "unary latency p50, workers=1", "us", "lower"),
    RowSpec("latency.p99", "latency", "unary latency p99, workers=1", "us", "lower"),
    RowSpec("throughput", "throughput", "64 calls in flight, workers=2", "calls/s", "higher"),
    RowSpec("map", "map", "map chunksize=256, workers=2", "items/s", "higher"),
    RowSpec("bulk.memoryview", "bulk", "64 MiB memoryview -> len", "ms", "lower"),
    RowSpec("bulk.ndarray", "bulk", "64 MiB ndarray -> sum", "ms", "lower"),
    RowSpec("bulk.bytes", "bulk", "64 MiB bytes -> len", "ms", "lower"),
    RowSpec("bulk.echo", "bulk", "64 MiB ndarray -> ndarray", "ms", "lower"),
    RowSpec("arena.big", "arena", "arena array -> len (big)", "ms", "lower"),
    RowSpec("arena.small", "arena", "arena array 1 KiB -> len", "us", "lower"),
    RowSpec("stream", "stream", "server stream of small ints", "items/s", "higher"),
    RowSpec("startup", "startup", "start-up until ready, workers=2", "ms", "lower"),
    RowSpec("idle.worker", "startup", "idle worker CPU", "% core", "lower"),
    RowSpec("idle.host", "startup", "idle host CPU (pool thread)", "% core", "lower"),
)


@dataclass(slots=True)
class Measurement:
    """One cell: a value in the row's unit, or None with the reason in ``note``.

    ``name`` says which variant a limit cell is (e.g. "ring sched-spin"); ``extra`` keeps
    the raw numbers behind the value (p99, best time, repetitions, counters) for the JSON.
    """

    value: float | None
    note: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def missing(cls, note: str) -> Measurement:
        return cls(None, note)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value}
        if self.note is not None:
            out["note"] = self.note
        if self.name is not None:
            out["name"] = self.name
        if self.extra:
            out["extra"] = self.extra
        return out


class Results:
    """Cells by row key and column; limit cells are a list per row (several variants)."""

    def __init__(self) -> None:
        self.cells: dict[str, dict[str, Measurement]] = {}
        self.limits: dict[str, list[Measurement]] = {}
        self.labels: dict[str, str] = {}  # a row's label when it depends on the run
        self.notes: list[str] = []

    def put(self, row: str, column: str, measurement: Measurement) -> None:
        self.cells.setdefault(row, {})[column] = measurement

    def put_limit(self, row: str, measurement: Measurement) -> None:
        self.limits.setdefault(row, []).append(measurement)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def get(self, row: str, column: str) -> Measurement | None:
        return self.cells.get(row, {}).get(column)
