"""A million frames across processes with random pauses on both sides: none lost, none
duplicated, none out of order, and the link never stalls (every wait is bounded)."""

from __future__ import annotations

import random
import struct

import anyio
import pytest

from rapace.shm import SUPPORTED
from rapace.wire import Descriptor, Flags, Frame

from .shm_host import shm_child

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not SUPPORTED, reason="shared memory needs Linux on x86-64"),
]
MESSAGES = 1_000_000
BATCH_MAX = 64
ACK_EVERY = 10_000
# No single wait for an acknowledgement may take this long: a lost wake-up costs at most
# the 10 ms park re-check, so anything near this is a stall.
STALL_LIMIT_S = 10.0
_SEQ = struct.Struct("<Q")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _frame(seq: int) -> Frame:
    # Every 97th frame carries a slot payload, so the slot and return paths run too.
    payload = _SEQ.pack(seq) + (bytes(300) if seq % 97 == 0 else b"")
    return Frame(Descriptor(msg_id=seq + 1, channel_id=1, flags=Flags.DATA), payload)


async def test_a_million_frames_with_random_pauses() -> None:
    rng = random.Random(1234)
    async with shm_child("tests.integration.plugins.shm_sink", "99") as (transport, process):
        acked = 0

        async def read_acks() -> None:
            nonlocal acked
            while acked < MESSAGES:
                with anyio.fail_after(STALL_LIMIT_S):
                    frames = await transport.receive()
                for frame in frames:
                    (count,) = _SEQ.unpack(bytes(frame.payload))
                    assert count == acked + ACK_EVERY
                    acked = count

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_acks)
            seq = 0
            while seq < MESSAGES:
                n = min(rng.randint(1, BATCH_MAX), MESSAGES - seq)
                with anyio.fail_after(STALL_LIMIT_S):
                    await transport.send([_frame(s) for s in range(seq, seq + n)])
                seq += n
                if rng.random() < 0.002:
                    await anyio.sleep(rng.random() * 0.003)
        assert acked == MESSAGES
        await transport.aclose()
        with anyio.fail_after(STALL_LIMIT_S):
            assert await process.wait() == 0
        assert transport.stats.frames_sent == MESSAGES
