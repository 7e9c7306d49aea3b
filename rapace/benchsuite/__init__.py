"""The benchmark suite behind ``rapace bench``.

Every workload runs for rapace over the ``shm``, ``unix`` and ``tcp`` transports and, in
the same run, for its baselines (``ProcessPoolExecutor``, ``multiprocessing.Pipe``, pyzmq
and loky when installed) and beside the physical limits it sits on (a raw shared-memory
ring + eventfd, one memory copy of 64 MiB), so the ratios are comparable: absolute numbers
move 20-40% between runs on shared machines.

Workloads (``--only`` names): ``latency`` (sync ``submit(add, 2, 3).result()`` p50/p99,
workers=1), ``throughput`` (batches of 64 calls in flight, workers=2), ``map``
(``chunksize=256`` over small ints, workers=2), ``bulk`` (64 MiB as ``memoryview``,
``numpy.ndarray`` and ``bytes`` arguments), ``arena`` (a big and a 1 KiB array from
``pool.empty`` passed by reference), ``stream`` (a server stream of small ints), ``startup``
(start-up until ready, workers=2, and the CPU an idle pool uses).

Importing this package loads nothing beyond its own definitions; numpy, pyzmq, loky and
matplotlib are imported when a workload needs them, and skipped (with a note) when absent.
"""

from __future__ import annotations

from rapace.benchsuite._model import ROWS, TRANSPORTS, WORKLOADS, Measurement, Results, RowSpec
from rapace.benchsuite._suite import Config, Run, run_suite

__all__ = (
    "ROWS",
    "TRANSPORTS",
    "WORKLOADS",
    "Config",
    "Measurement",
    "Results",
    "RowSpec",
    "Run",
    "run_suite",
)
