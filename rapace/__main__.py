"""The ``rapace`` command line (also ``python -m rapace``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ("main",)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rapace", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run the bundled demonstration")
    args = parser.parse_args(argv)
    # Imported on demand: `rapace --help` should not pay for what a command needs.
    from rapace._demo import run_demo

    assert args.command == "demo"
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
