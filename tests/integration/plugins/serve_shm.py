"""A worker process for shared-memory integration tests: attaches to the link offered in
argv and serves Conformance until the host closes the link or dies.

argv: OFFER DEATH_FD HOST_PID [BACKEND]. On host death it removes what the host left.
"""

from __future__ import annotations

import sys

import anyio

from rapace.session import open_session
from rapace.shm import attach_link, sweep_owner
from rapace.shm._cleanup import process_start_time
from rapace.wire import Role
from tests.conformance.services import Conformance


async def main(offer: str, death_fd: int) -> None:
    transport = attach_link(offer, peer_liveness_fd=death_fd)
    async with open_session(transport, role=Role.ACCEPTOR, serve=Conformance()) as session:
        await session.wait_closed()


if __name__ == "__main__":
    offer, death_fd, host_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    host_start = process_start_time(host_pid) or 0
    backend = sys.argv[4] if len(sys.argv) > 4 else "asyncio"
    try:
        anyio.run(main, offer, death_fd, backend=backend)
    finally:
        from rapace.shm._liveness import fd_readable

        if fd_readable(death_fd):
            sweep_owner(host_pid, host_start)
