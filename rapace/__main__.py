"""The ``rapace`` command line (also ``python -m rapace``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

# Each command module imports only the standard library at load time: `rapace --help` stays
# fast, and a command imports what it needs (anyio, the user's module) when it runs.
from rapace import _cli, _cli_bench, _cli_doctor, _cli_inspect, _cli_serve

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rapace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="run the bundled demonstration",
        description="Process a batch of images with a pool of two plugin workers over shared "
        "memory (zero-copy in and out), compare with ProcessPoolExecutor, and show a stream, a "
        "remote error and a crashed worker. Needs numpy (pip install 'rapace[numpy]').",
    )
    _cli_inspect.register(commands)
    _cli_serve.register(commands)
    _cli_doctor.register(commands)
    _cli_bench.register(commands)
    cleanup = commands.add_parser(
        "cleanup",
        help="remove shared-memory segments left by dead rapace processes",
        description="Remove every rapace segment in /dev/shm whose owning process is gone "
        "(killed hosts or workers). Segments of running processes are never touched.",
    )
    cleanup.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    args = parser.parse_args(argv)
    # Imported on demand: `rapace --help` should not pay for what a command needs.
    if args.command == "cleanup":
        return _cleanup(dry_run=args.dry_run)
    if args.command != "demo":
        return _cli.run_command(args.run, args)
    from rapace._demo import run_demo

    return run_demo()


def _cleanup(*, dry_run: bool) -> int:
    from rapace.shm import find_stale, remove_stale

    segments = find_stale() if dry_run else remove_stale()
    verb = "would remove" if dry_run else "removed"
    for segment in segments:
        print(f"{verb} /dev/shm/{segment.name} ({segment.size} bytes, pid {segment.owner_pid})")
    total = sum(segment.size for segment in segments)
    print(f"{verb} {len(segments)} segment(s), {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
