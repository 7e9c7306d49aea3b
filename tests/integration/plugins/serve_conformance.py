"""A server process for integration tests: serves Conformance on the URL in argv[1].

Prints ``READY <bound address>`` once it listens, then serves until killed.
"""

from __future__ import annotations

import sys

import anyio

from rapace._connect import serve_async
from tests.conformance.services import Conformance


async def main(url: str, token: str | None) -> None:
    async with anyio.create_task_group() as tg:
        bound = await tg.start(
            lambda task_status: serve_async(
                Conformance(), listen=url, token=token, task_status=task_status
            )
        )
        sys.stdout.write(f"READY {bound}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
