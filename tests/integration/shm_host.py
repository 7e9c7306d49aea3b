"""Host side of shared-memory integration tests: offer a link to a child and watch it."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.abc

from rapace.shm import LinkOptions, ShmTransport, create_link, sweep_owner
from rapace.shm._cleanup import process_start_time
from rapace.shm._liveness import death_pipe, pidfd_open

ROOT = Path(__file__).parents[2]
REAP_TIMEOUT_S = 10.0
EXIT_GRACE_S = 5.0


@asynccontextmanager
async def shm_child(
    module: str,
    *extra_args: str,
    options: LinkOptions | None = None,
    backend: str = "asyncio",
) -> AsyncIterator[tuple[ShmTransport, anyio.abc.Process]]:
    """Start ``python -m module OFFER DEATH_FD HOST_PID BACKEND *extra_args`` on a new link.

    Yields side A's transport (watching the child's pidfd) and the process; always kills
    and reaps the child and closes every fd, even when the test fails.
    """
    transport, offer = create_link(options)
    read_end, write_end = death_pipe()
    pidfd: int | None = None
    start_time = 0
    process: anyio.abc.Process | None = None
    try:
        command: Sequence[str] = [
            sys.executable,
            "-m",
            module,
            offer.encode(),
            str(read_end),
            str(os.getpid()),
            backend,
            *extra_args,
        ]
        process = await anyio.open_process(
            command, cwd=ROOT, pass_fds=(*offer.pass_fds, read_end), stdin=None, stdout=None
        )
        transport.unlink_name()  # the child holds the fd: the name is no longer needed
        pidfd = pidfd_open(process.pid)
        start_time = process_start_time(process.pid) or 0
        if pidfd is not None:
            transport.watch_peer(pidfd)
        yield transport, process
    finally:
        os.close(read_end)
        try:
            # Closing the link lets the worker finish on its own; kill only a straggler.
            await transport.aclose()
            if process is not None:
                with anyio.move_on_after(EXIT_GRACE_S, shield=True):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                with anyio.fail_after(REAP_TIMEOUT_S, shield=True):
                    await process.wait()
                await process.aclose()
                sweep_owner(process.pid, start_time)  # what a killed worker left
        finally:
            os.close(write_end)
            if pidfd is not None:
                os.close(pidfd)
