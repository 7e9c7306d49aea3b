"""A server process for tests: serves ``Conformance`` on a Unix, TCP or WebSocket listener.

::

    python -m tests.integration.plugins.serve_conformance URL [TOKEN] [--backend trio]

Prints ``READY <bound address>`` on stdout once it listens, then serves until killed. When
its stdin is a pipe, it also stops when that pipe closes, so a server never outlives the test
process that started it (even one that died without reaping it).
"""

from __future__ import annotations

import argparse
import os
import stat
import sys

import anyio

from rapace._connect import serve_async
from tests.conformance.services import Conformance


async def _wait_for_eof(fd: int) -> None:
    """Return when the pipe ``fd`` reaches end of file (whatever is written is discarded)."""
    while True:
        await anyio.wait_readable(fd)
        if not os.read(fd, 4096):
            return


def _stdin_pipe() -> int | None:
    """stdin's fd if it is a pipe, else None (a terminal or /dev/null is not watched)."""
    if sys.stdin is None:
        return None
    try:
        fd = sys.stdin.fileno()
        return fd if stat.S_ISFIFO(os.fstat(fd).st_mode) else None
    except (OSError, ValueError):
        return None


async def main(url: str, token: str | None) -> None:
    async with anyio.create_task_group() as tg:
        bound = await tg.start(
            lambda task_status: serve_async(
                Conformance(), listen=url, token=token, task_status=task_status
            )
        )
        sys.stdout.write(f"READY {bound}\n")
        sys.stdout.flush()
        stdin = _stdin_pipe()
        if stdin is not None:
            await _wait_for_eof(stdin)
            tg.cancel_scope.cancel()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serve_conformance", description=__doc__)
    parser.add_argument(
        "url", help="unix:///path, tcp://host:port or ws://host:port/path (port 0: any)"
    )
    parser.add_argument("token", nargs="?", default=None, help="the listener's token")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    anyio.run(main, args.url, args.token, backend=args.backend)
