"""A hostile worker: serves Scribbler, whose one method overwrites the whole link segment
with random bytes from the worker's side (argv as for serve_shm)."""

from __future__ import annotations

import mmap
import os
import sys

import anyio

import rapace
from rapace.session import open_session
from rapace.shm import LinkOffer, attach_link
from rapace.wire import Role


@rapace.service
class Scribbler:
    def __init__(self, segment_fd: int) -> None:
        self._segment_fd = segment_fd

    async def scribble(self) -> int:
        size = os.fstat(self._segment_fd).st_size
        with mmap.mmap(self._segment_fd, size) as view:
            view[:] = os.urandom(size)
        return size


async def main(offer_text: str, death_fd: int) -> None:
    offer = LinkOffer.decode(offer_text)
    spare_fd = os.dup(offer.segment_fd)
    transport = attach_link(offer, peer_liveness_fd=death_fd)
    async with open_session(transport, role=Role.ACCEPTOR, serve=Scribbler(spare_fd)) as session:
        await session.wait_closed()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], int(sys.argv[2]), backend=sys.argv[4])
