"""A worker for the stress test: receives numbered frames on a raw shm link, checks that
each arrives once and in order, and acknowledges every ACK_EVERY with the count so far.
Pauses at random to force the park/wake paths. Exits 0 on a clean end, 3 on a bad frame.

argv: OFFER DEATH_FD HOST_PID BACKEND SEED
"""

from __future__ import annotations

import random
import struct
import sys

import anyio

from rapace.shm import attach_link
from rapace.wire import Descriptor, Flags, Frame

ACK_EVERY = 10_000
_SEQ = struct.Struct("<Q")


def ack(count: int) -> Frame:
    return Frame(Descriptor(msg_id=count, channel_id=2, flags=Flags.DATA), _SEQ.pack(count))


async def main(offer: str, death_fd: int, seed: int) -> int:
    rng = random.Random(seed)
    transport = attach_link(offer, peer_liveness_fd=death_fd)
    expected = 0
    try:
        while True:
            try:
                frames = await transport.receive()
            except anyio.EndOfStream:
                return 0
            for frame in frames:
                (seq,) = _SEQ.unpack_from(bytes(frame.payload), 0)
                if seq != expected or frame.descriptor.msg_id != seq + 1:
                    sys.stderr.write(
                        f"frame {seq} (msg {frame.descriptor.msg_id}), not {expected}\n"
                    )
                    return 3
                expected += 1
                if expected % ACK_EVERY == 0:
                    await transport.send([ack(expected)])
            if rng.random() < 0.002:
                await anyio.sleep(rng.random() * 0.003)
    finally:
        await transport.aclose()


if __name__ == "__main__":
    sys.exit(anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[5]), backend=sys.argv[4]))
