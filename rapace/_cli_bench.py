"""``rapace bench``: the benchmark suite, rapace over every transport beside its baselines.

The workloads live in :mod:`rapace.benchsuite` (loaded when the command runs, not when
``rapace --help`` does). The table goes to stdout, progress to stderr. The exit status is 1
when a rapace measurement failed with an error (a workload that needs an API not available
yet says "n/a" and does not count), else 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapace._cli import USAGE_ERROR, CliError, Commands, write_err, write_out

__all__ = ("register",)

WORKLOADS = ("latency", "throughput", "map", "bulk", "arena", "stream", "startup")
TRANSPORTS = ("shm", "unix", "tcp")
ALIASES = {"idle": "startup", "64mib": "bulk", "zerocopy": "arena", "streaming": "stream"}

DESCRIPTION = (
    "Run rapace's benchmark suite: unary latency, 64 calls in flight, map(chunksize=256), "
    "64 MiB round trips (memoryview, ndarray, bytes), zero-copy arena arrays, streaming, "
    "start-up and idle CPU; for rapace over shm, unix and tcp and, in the same run, for "
    "ProcessPoolExecutor, multiprocessing.Pipe, pyzmq and loky (when installed) and beside "
    "physical limits (a raw shared-memory ring, one memory copy). Prints a table; a default "
    "run takes under 3 minutes on 2 cores."
)


def register(commands: Commands) -> None:
    """Add ``bench`` to the ``rapace`` command line."""
    parser = commands.add_parser(
        "bench", help="run the benchmark suite against the baselines", description=DESCRIPTION
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of about 30 s (fewer, shorter samples)"
    )
    parser.add_argument(
        "--only",
        type=_names(WORKLOADS, ALIASES),
        metavar="NAME[,NAME]",
        help=f"run only these workloads: {', '.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--transports",
        type=_names(TRANSPORTS, {}),
        metavar="NAME[,NAME]",
        help="rapace's transports to measure (default: shm,unix,tcp)",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="measure rapace only, not its baselines"
    )
    parser.add_argument(
        "--arena-mib",
        type=_positive_int,
        metavar="N",
        help="size of the big arena array in MiB (default 512, 64 if /dev/shm is small)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every number here")
    parser.add_argument(
        "--png", type=Path, metavar="PATH", help="also draw a bar chart here (needs matplotlib)"
    )
    parser.set_defaults(run=run)


def _names(valid: tuple[str, ...], aliases: dict[str, str]) -> argparse._ActionType:
    def parse(text: str) -> tuple[str, ...]:
        names: list[str] = []
        for raw in text.split(","):
            name = aliases.get(raw.strip().lower(), raw.strip().lower())
            if name not in valid:
                raise argparse.ArgumentTypeError(
                    f"unknown name {raw.strip()!r} (choose from {', '.join(valid)})"
                )
            if name not in names:
                names.append(name)
        return tuple(names)

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Check the outputs can be written, run the suite, print the table, write the files."""
    for path in (args.json, args.png):
        if path is not None and not path.resolve().parent.is_dir():
            raise CliError(f"{path}: no such directory", USAGE_ERROR)
    from rapace.benchsuite._report import format_table, load_matplotlib, to_json, write_png

    if args.png is not None:
        try:
            load_matplotlib()
        except ImportError:
            raise CliError(
                "--png needs matplotlib, which is not installed (pip install matplotlib)",
                USAGE_ERROR,
            ) from None
    from rapace.benchsuite import Config, run_suite

    selected = args.only or WORKLOADS
    config = Config(
        workloads=tuple(w for w in WORKLOADS if w in selected),
        transports=args.transports or TRANSPORTS,
        quick=args.quick,
        baselines=not args.no_baselines,
        arena_mib=args.arena_mib,
    )
    result = run_suite(config, progress=lambda line: write_err(f"rapace bench: {line}"))
    for line in format_table(result):
        write_out(line)
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(result), indent=2) + "\n")
        write_err(f"rapace bench: wrote {args.json}")
    if args.png is not None:
        write_png(result, args.png)
        write_err(f"rapace bench: wrote {args.png}")
    failed = [
        column
        for cells in result.results.cells.values()
        for column, cell in cells.items()
        if column.startswith("rapace ") and (cell.note or "").startswith("error")
    ]
    return 1 if failed else 0
