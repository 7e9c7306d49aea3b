"""The floor under rapace's shared-memory transport: a raw ring + eventfd ping-pong.

A minimal version of ``benchmarks/bench_shm_limits.py`` section 1 (no rapace code): two
processes share one memfd holding two single-producer/single-consumer rings of 64-byte
descriptors, one per direction; a request is ``cbor2.dumps([id, "add", [2, 3]])`` inline in
the descriptor, the reply ``[id, 5]``. Each direction has an eventfd, written only when the
consumer has published "parked"; a parked consumer polls it with a 10 ms timeout (which
bounds a lost wake-up). "block" parks at once when the ring is empty; "sched-spin" first
looks at the ring for up to 50 us, calling ``os.sched_yield()`` between looks. Both sides
are synchronous and unpinned. Linux x86-64 only (the rings rely on x86 store ordering).

The peer runs as ``python -m rapace.benchsuite._ring CONFIG`` with the fds inherited.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import cbor2

from rapace.benchsuite._measure import latency

__all__ = ("ring_latency",)

LINE = 64
DESC = 64
SLOTS = 64
PAYLOAD_AT = 16
HEAD, TAIL, PARKED = 0, LINE // 8, 2 * LINE // 8  # indexes into the "Q" view, a line apart
CONTROL = 4 * LINE
RING_BYTES = CONTROL + SLOTS * DESC
SEGMENT_BYTES = 2 * RING_BYTES
WAKE_TIMEOUT_MS = 10
SPIN_US = 50


class _Endpoint:
    """One side: produces into the ring at ``side``, consumes from the other."""

    def __init__(
        self, mapping: mmap.mmap, side: int, wake_peer: int, wake_me: int, spin_us: float
    ) -> None:
        view = memoryview(mapping)
        out, inp = side * RING_BYTES, (1 - side) * RING_BYTES
        self.out_ctl = view[out : out + CONTROL].cast("Q")
        self.out_slots = view[out + CONTROL : out + RING_BYTES]
        self.in_ctl = view[inp : inp + CONTROL].cast("Q")
        self.in_slots = view[inp + CONTROL : inp + RING_BYTES]
        view.release()
        self.wake_peer = wake_peer
        self.wake_me = wake_me
        self.spin_ns = int(spin_us * 1000)
        self.poller = select.poll()
        self.poller.register(wake_me, select.POLLIN)
        self.next_id = 0
        self.on_idle: Callable[[], None] = lambda: None

    def release(self) -> None:
        for view in (self.out_ctl, self.out_slots, self.in_ctl, self.in_slots):
            view.release()

    def send(self, payload: bytes) -> None:
        ctl = self.out_ctl
        head = ctl[HEAD]
        if head - ctl[TAIL] >= SLOTS:
            raise RuntimeError("ring full")
        at = (head % SLOTS) * DESC
        self.out_slots[at] = len(payload)
        self.out_slots[at + PAYLOAD_AT : at + PAYLOAD_AT + len(payload)] = payload
        ctl[HEAD] = head + 1  # publish last: x86 keeps stores in order
        if ctl[PARKED]:
            os.eventfd_write(self.wake_peer, 1)

    def receive(self) -> bytes:
        self._wait()
        ctl = self.in_ctl
        tail = ctl[TAIL]
        at = (tail % SLOTS) * DESC
        size = self.in_slots[at]
        payload = bytes(self.in_slots[at + PAYLOAD_AT : at + PAYLOAD_AT + size])
        ctl[TAIL] = tail + 1
        return payload

    def _wait(self) -> None:
        ctl = self.in_ctl
        if ctl[HEAD] != ctl[TAIL]:
            return
        if self.spin_ns:
            deadline = time.perf_counter_ns() + self.spin_ns
            while time.perf_counter_ns() < deadline:
                if ctl[HEAD] != ctl[TAIL]:
                    return
                os.sched_yield()
        while True:
            ctl[PARKED] = 1
            if ctl[HEAD] != ctl[TAIL]:  # pushed before the producer could see the flag
                ctl[PARKED] = 0
                return
            woke = bool(self.poller.poll(WAKE_TIMEOUT_MS))
            ctl[PARKED] = 0
            if woke:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.wake_me)
            if ctl[HEAD] != ctl[TAIL]:
                return
            if not woke:
                self.on_idle()

    def call(self) -> int:
        self.next_id += 1
        self.send(cbor2.dumps([self.next_id, "add", [2, 3]]))
        msg_id, result = cbor2.loads(self.receive())
        if msg_id != self.next_id:
            raise RuntimeError(f"reply {msg_id} to request {self.next_id}")
        return int(result)


def _peer(config: dict[str, int | float]) -> None:
    parent = os.getppid()

    def on_idle() -> None:
        if os.getppid() != parent:  # orphaned: the host died without stopping us
            raise SystemExit(1)

    mapping = mmap.mmap(int(config["fd"]), SEGMENT_BYTES)
    ep = _Endpoint(mapping, 1, int(config["wake_peer"]), int(config["wake_me"]), config["spin_us"])
    ep.on_idle = on_idle
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    while True:
        msg_id, method, args = cbor2.loads(ep.receive())
        if method == "stop":
            ep.send(cbor2.dumps([msg_id, 0]))
            break
        ep.send(cbor2.dumps([msg_id, args[0] + args[1]]))
    ep.release()
    mapping.close()


@contextmanager
def _link(spin_us: float) -> Iterator[_Endpoint]:
    fd = os.memfd_create("rapace-bench-ring", os.MFD_CLOEXEC)
    wake_host = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    wake_peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    mapping: mmap.mmap | None = None
    ep: _Endpoint | None = None
    peer: subprocess.Popen[str] | None = None
    try:
        os.ftruncate(fd, SEGMENT_BYTES)
        mapping = mmap.mmap(fd, SEGMENT_BYTES)
        config = {"fd": fd, "wake_peer": wake_host, "wake_me": wake_peer, "spin_us": spin_us}
        peer = subprocess.Popen(
            [sys.executable, "-m", "rapace.benchsuite._ring", json.dumps(config)],
            pass_fds=(fd, wake_host, wake_peer),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert peer.stdout is not None
        if peer.stdout.readline().strip() != "READY":
            raise RuntimeError("the ring peer did not start")
        running = peer

        def on_idle() -> None:
            if running.poll() is not None:
                raise RuntimeError(f"the ring peer exited with {running.returncode}")

        ep = _Endpoint(mapping, 0, wake_peer, wake_host, spin_us)
        ep.on_idle = on_idle
        yield ep
        ep.next_id += 1
        ep.send(cbor2.dumps([ep.next_id, "stop", []]))
        ep.receive()
    finally:
        if peer is not None:
            try:
                peer.wait(timeout=2)
            except subprocess.TimeoutExpired:
                peer.kill()
                peer.wait()
            if peer.stdout is not None:
                peer.stdout.close()
        if ep is not None:
            ep.release()
        if mapping is not None:
            mapping.close()
        for each in (fd, wake_host, wake_peer):
            os.close(each)


def ring_latency(calls: int, warmup: int, spin_us: float) -> dict[str, float]:
    """p50/p99 of ``add(2, 3)`` over the raw ring; ``spin_us`` 0 parks at once."""
    with _link(spin_us) as ep:
        return latency(ep.call, calls, warmup)


if __name__ == "__main__":
    _peer(json.loads(sys.argv[1]))
