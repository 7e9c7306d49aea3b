"""Physical limits of a shared-memory transport between two processes, to choose its design.

No rapace code runs here: this measures the floor any shared-memory transport written in
Python sits on, so the design can be picked against numbers rather than guesses.

1. Raw ping-pong between two real processes: one shared-memory segment holding two
   single-producer/single-consumer rings (one per direction) of 64-byte descriptors, the
   head/tail/parked words on their own cache lines, written with single-element
   ``memoryview.cast("Q")`` stores. A request is ``cbor2.dumps([msg_id, "add", [2, 3]])``
   inline in the descriptor, the reply ``[msg_id, 5]``. Each direction has an eventfd; a
   producer writes it only if the consumer published "parked", and a parked consumer
   polls it with a 10 ms timeout (which bounds a lost wake-up: the parked flag and the
   head are a Dekker pair, and x86 may reorder a store before a later load). Variants:
   park at once when empty ("block"), busy-spin 10/50/200 us on the head first, or spin
   50 us calling ``os.sched_yield()`` between looks ("sched-spin", so that a producer on
   the same CPU gets to run); each unpinned, both processes on one CPU ("same-core") and
   one per CPU ("cross-core"). Reported: p50/p99/mean round trip, CPU time per round trip
   of each side (what spinning costs), the peer's parks per round trip, lost wake-ups,
   and how often the two sides were last seen on the same CPU (unpinned, the scheduler
   moves them, and that decides the result).
2. The same with the peer (and then both sides) inside an event loop, asyncio and trio
   through anyio: a parked consumer awaits ``anyio.wait_readable(eventfd)`` under
   ``move_on_after(10 ms)``; the spin is a busy loop (stalls the loop), ``await
   anyio.lowlevel.checkpoint()`` iterations ("yield-spin"), or both a checkpoint and
   ``os.sched_yield()`` ("yield+sched-spin"). "asyncio-native" parks on a plain Future fed
   by a permanent ``loop.add_reader`` instead, to tell anyio's share from the loop's.
3. In one process, per call: ``tg.start_soon(handler)`` + an ``anyio.Event`` vs awaiting the
   handler inline vs ``asyncio.create_task`` + ``asyncio.Future`` vs a long-lived worker
   task fed by a memory object stream; plus what the parked wait's ``move_on_after`` adds.
4. The sync path: a plain thread calling through a loop thread (``call_soon_threadsafe`` or
   anyio's blocking portal), with and without the ring behind it, vs the calling thread
   doing the ring write and eventfd wait itself under a ``threading.Lock``.

Run: ``python benchmarks/bench_shm_limits.py [--quick] [--iterations N] [--json PATH]``.
Linux on x86 only (eventfd, sched_setaffinity; the rings rely on x86 keeping stores in
order, other CPUs would need fences). The segment is unlinked as soon as it is mapped (the
peer gets the descriptor, not the name), so nothing is left in /dev/shm even if the run is
killed; peers exit when their parent goes away.
"""

from __future__ import annotations

import _posixshmem
import argparse
import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import mmap
import os
import platform
import resource
import select
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import cbor2

LINE = 64  # cache line: each control word gets its own, so the two sides never false-share
DESC = 64
SLOTS = 64
PAYLOAD_AT = 16  # descriptor: length byte, reserved header, then the inline payload
MAX_PAYLOAD = DESC - PAYLOAD_AT
HEAD, TAIL, PARKED = 0, LINE // 8, 2 * LINE // 8  # indexes into the "Q" view, one line apart
CONTROL = 4 * LINE  # a spare line keeps the adjacent-line prefetcher off the slots
RING_BYTES = CONTROL + SLOTS * DESC
SEGMENT_BYTES = 2 * RING_BYTES
WAKE_TIMEOUT_MS = 10
SPINS_US = (10, 50, 200)
LOOP_SPIN_US = 50
REPEATS = 5

PLACEMENTS: dict[str, tuple[int | None, int | None]] = {
    "unpinned": (None, None),
    "same-core": (0, 0),  # host and peer share CPU 0
    "cross-core": (0, 1),  # host on CPU 0, peer on CPU 1
}

_segments = itertools.count()


async def add(a: int, b: int) -> int:
    return a + b


# --------------------------------------------------------------------------- the rings


class Ring:
    """One SPSC ring: u64 head (producer's), tail and parked (consumer's), then the slots."""

    def __init__(self, view: memoryview, base: int) -> None:
        self.ctl = view[base : base + CONTROL].cast("Q")
        self.slots = view[base + CONTROL : base + RING_BYTES]

    def push(self, payload: bytes) -> None:
        ctl = self.ctl
        head = ctl[HEAD]
        if head - ctl[TAIL] >= SLOTS:
            raise RuntimeError("ring full")
        size = len(payload)
        if size > MAX_PAYLOAD:
            raise ValueError(f"{size} bytes do not fit inline")
        at = (head % SLOTS) * DESC
        self.slots[at] = size
        self.slots[at + PAYLOAD_AT : at + PAYLOAD_AT + size] = payload
        # Publish last: x86 keeps stores in order, so the consumer never sees a half slot.
        ctl[HEAD] = head + 1

    def pop(self) -> bytes:
        ctl = self.ctl
        tail = ctl[TAIL]
        at = (tail % SLOTS) * DESC
        size = self.slots[at]
        payload = bytes(self.slots[at + PAYLOAD_AT : at + PAYLOAD_AT + size])
        ctl[TAIL] = tail + 1
        return payload

    def release(self) -> None:
        self.ctl.release()
        self.slots.release()


@dataclass
class WaitStats:
    parks: int = 0
    timeouts: int = 0  # parked waits that ended by the 10 ms timeout with nothing to read
    lost: int = 0  # parked waits that ended by the timeout with a message waiting


class Endpoint:
    """One side of the segment: produces into `out`, consumes from `inp` (side 0 = host)."""

    def __init__(
        self,
        mapping: mmap.mmap,
        side: int,
        wake_peer: int,
        wake_me: int,
        spin: str,
        spin_us: float,
        on_idle: Callable[[], None],
    ) -> None:
        view = memoryview(mapping)
        self.out = Ring(view, side * RING_BYTES)
        self.inp = Ring(view, (1 - side) * RING_BYTES)
        view.release()
        self.wake_peer = wake_peer
        self.wake_me = wake_me
        self.spin = spin
        self.spin_ns = int(spin_us * 1000) if spin != "none" else 0
        self.on_idle = on_idle
        self.poller = select.poll()
        self.poller.register(wake_me, select.POLLIN)
        self.stats = WaitStats()
        self.next_id = 0
        self.peer_pid: int | None = None
        self.native: NativeWaker | None = None

    def close(self) -> None:
        self.out.release()
        self.inp.release()

    def send(self, payload: bytes) -> None:
        self.out.push(payload)
        # Only a parked consumer needs the syscall; a spinning or busy one sees the new head.
        if self.out.ctl[PARKED]:
            os.eventfd_write(self.wake_peer, 1)

    def recv(self) -> bytes:
        return self.inp.pop()

    def wait(self) -> None:
        """Return once `inp` holds a message: spin (if asked), then park on the eventfd."""
        ctl = self.inp.ctl
        if ctl[HEAD] != ctl[TAIL]:
            return
        if self.spin_ns:
            deadline = time.perf_counter_ns() + self.spin_ns
            give_way = self.spin == "sched_yield"
            while time.perf_counter_ns() < deadline:
                if ctl[HEAD] != ctl[TAIL]:
                    return
                if give_way:  # lets a producer sharing this CPU run, instead of starving it
                    os.sched_yield()
        while True:
            ctl[PARKED] = 1
            # A producer that pushed before it could see the flag did not signal: look again.
            if ctl[HEAD] != ctl[TAIL]:
                ctl[PARKED] = 0
                return
            self.stats.parks += 1
            woke = bool(self.poller.poll(WAKE_TIMEOUT_MS))
            ctl[PARKED] = 0
            if self._after_park(woke):
                return

    async def wait_async(self) -> None:
        """`wait` for an event loop: the spin may yield to it, the park awaits the eventfd."""
        ctl = self.inp.ctl
        if ctl[HEAD] != ctl[TAIL]:
            return
        if self.spin_ns:
            deadline = time.perf_counter_ns() + self.spin_ns
            to_loop = self.spin in ("yield", "yield+sched")
            to_os = self.spin == "yield+sched"
            while time.perf_counter_ns() < deadline:
                if to_loop:
                    await anyio.lowlevel.checkpoint()
                if to_os:
                    os.sched_yield()
                if ctl[HEAD] != ctl[TAIL]:
                    return
        while True:
            ctl[PARKED] = 1
            if ctl[HEAD] != ctl[TAIL]:
                ctl[PARKED] = 0
                return
            self.stats.parks += 1
            if self.native is not None:
                woke = await self.native.wait(WAKE_TIMEOUT_MS / 1000)
            else:
                woke = False
                with anyio.move_on_after(WAKE_TIMEOUT_MS / 1000):
                    await anyio.wait_readable(self.wake_me)
                    woke = True
            ctl[PARKED] = 0
            if self._after_park(woke, drained=self.native is not None):
                return

    def use_native_waker(self) -> None:
        """From inside a running asyncio loop: park on a Future instead of anyio's wait."""
        self.native = NativeWaker(asyncio.get_running_loop(), self.wake_me)

    def _after_park(self, woke: bool, drained: bool = False) -> bool:
        if woke and not drained:
            with contextlib.suppress(BlockingIOError):  # a stale wake already drained it
                os.eventfd_read(self.wake_me)
        ctl = self.inp.ctl
        if ctl[HEAD] != ctl[TAIL]:
            if not woke:
                self.stats.lost += 1
            return True
        if not woke:
            self.stats.timeouts += 1
            self.on_idle()
        return False

    def _request(self, method: str, args: list[int]) -> int:
        self.next_id += 1
        self.send(cbor2.dumps([self.next_id, method, args]))
        return self.next_id

    def _reply(self, msg_id: int) -> Any:
        got, result = cbor2.loads(self.recv())
        if got != msg_id:
            raise RuntimeError(f"reply {got} to request {msg_id}")
        return result

    def call(self, method: str, args: list[int]) -> Any:
        msg_id = self._request(method, args)
        self.wait()
        return self._reply(msg_id)

    async def call_async(self, method: str, args: list[int]) -> Any:
        msg_id = self._request(method, args)
        await self.wait_async()
        return self._reply(msg_id)


class NativeWaker:
    """asyncio only: the eventfd stays registered, a parked wait awaits a plain Future.

    anyio's wait_readable adds and removes the reader (two epoll_ctl) per wait and its
    timeout is a cancel scope; this is what a hand-written asyncio transport would do
    instead, to tell the framework's share of the loop cost from the loop's own.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self.waiter: asyncio.Future[bool] | None = None
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        # Level-triggered: drain here or the loop spins on the readable eventfd.
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)
        self._wake(True)

    def _wake(self, woke: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(woke)

    async def wait(self, give_up_after: float) -> bool:
        self.waiter = self.loop.create_future()
        timer = self.loop.call_later(give_up_after, self._wake, False)
        try:
            return await self.waiter
        finally:
            timer.cancel()
            self.waiter = None


def create_segment() -> tuple[int, mmap.mmap]:
    name = f"/rapace-bench-{os.getpid()}-{next(_segments)}"
    fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, SEGMENT_BYTES)
        return fd, mmap.mmap(fd, SEGMENT_BYTES)
    except BaseException:
        os.close(fd)
        raise
    finally:
        # The peer inherits the descriptor, so the name can go now: nothing outlives the run.
        _posixshmem.shm_unlink(name)


# --------------------------------------------------------------------------- the peer


def usage_counters(ep: Endpoint) -> list[int]:
    """This process's CPU time (us) and `ep`'s parks, timeouts and lost wake-ups."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_us = int((usage.ru_utime + usage.ru_stime) * 1e6)
    return [cpu_us, ep.stats.parks, ep.stats.timeouts, ep.stats.lost]


def _serve_sync(ep: Endpoint) -> None:
    while True:
        ep.wait()
        msg_id, method, args = cbor2.loads(ep.recv())
        if method == "add":
            ep.send(cbor2.dumps([msg_id, args[0] + args[1]]))
        elif method == "stats":
            ep.send(cbor2.dumps([msg_id, usage_counters(ep)]))
        else:  # stop
            ep.send(cbor2.dumps([msg_id, None]))
            return


async def _serve_async(ep: Endpoint, native: bool = False) -> None:
    if native:
        ep.use_native_waker()
    while True:
        await ep.wait_async()
        msg_id, method, args = cbor2.loads(ep.recv())
        if method == "add":
            ep.send(cbor2.dumps([msg_id, await add(*args)]))
        elif method == "stats":
            ep.send(cbor2.dumps([msg_id, usage_counters(ep)]))
        else:
            ep.send(cbor2.dumps([msg_id, None]))
            return


def peer_main(config: dict[str, Any]) -> None:
    if config["cpu"] is not None:
        os.sched_setaffinity(0, {config["cpu"]})
    parent = os.getppid()

    def on_idle() -> None:
        if os.getppid() != parent:  # orphaned: the host died without stopping us
            raise SystemExit(1)

    mapping = mmap.mmap(config["shm_fd"], SEGMENT_BYTES)
    ep = Endpoint(
        mapping,
        1,
        config["wake_peer"],
        config["wake_me"],
        config["spin"],
        config["spin_us"],
        on_idle,
    )
    print("READY", flush=True)
    if config["loop"] == "sync":
        _serve_sync(ep)
    elif config["loop"] == "asyncio-native":
        asyncio.run(_serve_async(ep, native=True))
    else:
        anyio.run(_serve_async, ep, backend=config["loop"])


# --------------------------------------------------------------------------- the host


@contextmanager
def session(
    placement: str, peer_loop: str, peer_spin: str, host_spin: str, spin_us: float
) -> Iterator[Endpoint]:
    """A segment, two eventfds and a peer process; all of it is gone on exit."""
    host_cpu, peer_cpu = PLACEMENTS[placement]
    affinity = os.sched_getaffinity(0)
    shm_fd, mapping = create_segment()
    # CLOEXEC so that only the peer they are passed to (pass_fds) gets them.
    wake_peer = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    wake_host = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    peer: subprocess.Popen[str] | None = None
    ep: Endpoint | None = None
    stopped = False  # the block ended normally, so it sent "stop": the peer is exiting
    try:
        config = {
            "shm_fd": shm_fd,
            "wake_peer": wake_host,
            "wake_me": wake_peer,
            "loop": peer_loop,
            "spin": peer_spin,
            "spin_us": spin_us,
            "cpu": peer_cpu,
        }
        peer = subprocess.Popen(
            [sys.executable, __file__, "--peer", json.dumps(config)],
            pass_fds=(shm_fd, wake_peer, wake_host),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert peer.stdout is not None
        if peer.stdout.readline().strip() != "READY":
            raise RuntimeError("the peer did not start")
        if host_cpu is not None:
            os.sched_setaffinity(0, {host_cpu})
        running = peer

        def on_idle() -> None:
            if running.poll() is not None:
                raise RuntimeError(f"the peer exited with {running.returncode}")

        ep = Endpoint(mapping, 0, wake_peer, wake_host, host_spin, spin_us, on_idle)
        ep.peer_pid = peer.pid
        yield ep
        stopped = True
    finally:
        os.sched_setaffinity(0, affinity)
        if peer is not None:
            _reap(peer, patience=2 if stopped else 0)
        if ep is not None:
            ep.close()
        mapping.close()
        for fd in (shm_fd, wake_peer, wake_host):
            os.close(fd)


def _reap(peer: subprocess.Popen[str], patience: float) -> None:
    try:
        peer.wait(timeout=patience)
    except subprocess.TimeoutExpired:
        peer.kill()
        peer.wait()
    if peer.stdout is not None:
        peer.stdout.close()


class Colocation:
    """Samples whether the calling thread and another (peer or loop thread) share a CPU.

    Unpinned, the scheduler decides, and it decides differently from run to run (wake-affine
    placement pulls a woken task next to its waker): this column says which case a row saw.
    """

    PERIOD = 256  # probe every PERIOD calls, outside the timed region

    def __init__(self, other: str | None) -> None:
        """`other` is the /proc stat file of the process or thread on the far side."""
        self.me = thread_stat(threading.get_native_id())
        self.peer = other
        self.same = 0
        self.total = 0

    def probe(self) -> None:
        if self.peer is not None:
            self.total += 1
            self.same += _last_cpu(self.me) == _last_cpu(self.peer)

    def fraction(self) -> float:
        return self.same / self.total if self.total else float("nan")


def process_stat(pid: int | None) -> str | None:
    return f"/proc/{pid}/stat" if pid is not None else None


def thread_stat(native_id: int) -> str:
    return f"/proc/self/task/{native_id}/stat"


def _last_cpu(stat_path: str) -> int:
    data = Path(stat_path).read_bytes()
    # Field 39 ("processor"); the command name may hold spaces, so count after its ")".
    return int(data.rsplit(b")", 1)[1].split()[36])


def summarise(
    samples: list[float],
    host: tuple[list[int], list[int]],
    peer: tuple[list[int], list[int]],
    colocation: Colocation,
) -> dict[str, float]:
    """Percentiles of the samples, and per-round-trip deltas of the two sides' counters."""
    count = len(samples)
    samples.sort()
    host_delta = [after - before for before, after in zip(*host, strict=True)]
    peer_delta = [after - before for before, after in zip(*peer, strict=True)]
    return {
        "p50_us": samples[count // 2] * 1e6,
        "p99_us": samples[int(count * 0.99)] * 1e6,
        "mean_us": sum(samples) / count * 1e6,
        "host_cpu_us_per_rt": host_delta[0] / count,
        "peer_cpu_us_per_rt": peer_delta[0] / count,
        "host_parks_per_rt": host_delta[1] / count,
        "peer_parks_per_rt": peer_delta[1] / count,
        "lost_wakeups": host_delta[3] + peer_delta[3],
        "same_cpu_fraction": colocation.fraction(),
        "iterations": count,
    }


def drive_sync(ep: Endpoint, iterations: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        ep.call("add", [2, 3])
    peer_before = ep.call("stats", [])
    colocation = Colocation(process_stat(ep.peer_pid))
    host_before = usage_counters(ep)
    samples = [0.0] * iterations
    clock = time.perf_counter
    for i in range(iterations):
        if i % Colocation.PERIOD == 0:
            colocation.probe()
        start = clock()
        ep.call("add", [2, 3])
        samples[i] = clock() - start
    host_after = usage_counters(ep)
    peer_after = ep.call("stats", [])
    ep.call("stop", [])
    return summarise(samples, (host_before, host_after), (peer_before, peer_after), colocation)


async def drive_async(
    ep: Endpoint, iterations: int, warmup: int, native: bool = False
) -> dict[str, float]:
    if native:
        ep.use_native_waker()
    for _ in range(warmup):
        await ep.call_async("add", [2, 3])
    peer_before = await ep.call_async("stats", [])
    colocation = Colocation(process_stat(ep.peer_pid))
    host_before = usage_counters(ep)
    samples = [0.0] * iterations
    clock = time.perf_counter
    for i in range(iterations):
        if i % Colocation.PERIOD == 0:
            colocation.probe()
        start = clock()
        await ep.call_async("add", [2, 3])
        samples[i] = clock() - start
    host_after = usage_counters(ep)
    peer_after = await ep.call_async("stats", [])
    await ep.call_async("stop", [])
    return summarise(samples, (host_before, host_after), (peer_before, peer_after), colocation)


@dataclass(frozen=True)
class PingPong:
    variant: str
    placement: str
    host_loop: str  # "sync", "asyncio" or "trio"
    peer_loop: str
    spin: str  # "none" (block), "busy", "sched_yield" (sync) or "yield" (checkpoint)
    spin_us: float = 0


def run_ping_pong(case: PingPong, iterations: int, warmup: int) -> dict[str, float]:
    host_spin = case.spin
    if case.host_loop == "sync":  # it has no loop to yield to: the nearest sync spin
        host_spin = {"yield": "busy", "yield+sched": "sched_yield"}.get(case.spin, case.spin)
    with session(case.placement, case.peer_loop, case.spin, host_spin, case.spin_us) as ep:
        if case.host_loop == "sync":
            return drive_sync(ep, iterations, warmup)
        if case.host_loop == "asyncio-native":
            return asyncio.run(drive_async(ep, iterations, warmup, native=True))
        return anyio.run(drive_async, ep, iterations, warmup, backend=case.host_loop)


def raw_cases() -> list[PingPong]:
    cases = []
    for placement in PLACEMENTS:
        cases.append(PingPong("block", placement, "sync", "sync", "none"))
        cases.extend(
            PingPong(f"spin {us}us", placement, "sync", "sync", "busy", us) for us in SPINS_US
        )
        cases.append(
            PingPong(
                f"sched-spin {LOOP_SPIN_US}us",
                placement,
                "sync",
                "sync",
                "sched_yield",
                LOOP_SPIN_US,
            )
        )
    return cases


LOOP_SPINS = {  # label -> spin kind; each spins LOOP_SPIN_US before parking
    "block": "none",
    f"busy-spin {LOOP_SPIN_US}us": "busy",
    f"yield-spin {LOOP_SPIN_US}us": "yield",
    f"yield+sched-spin {LOOP_SPIN_US}us": "yield+sched",
}


def loop_cases() -> list[PingPong]:
    cases = []
    for placement in PLACEMENTS:
        for backend in ("asyncio", "trio"):
            cases += [
                PingPong(f"{backend} peer, {label}", placement, "sync", backend, spin, LOOP_SPIN_US)
                for label, spin in LOOP_SPINS.items()
            ]
        native = "asyncio-native"
        cases.append(PingPong(f"{native} peer, block", placement, "sync", native, "none"))
        # The realistic end to end: a loop on both sides (no busy spin: it stalls the loop).
        for backend in ("asyncio", "trio"):
            cases += [
                PingPong(
                    f"{backend} both, {label}", placement, backend, backend, spin, LOOP_SPIN_US
                )
                for label, spin in LOOP_SPINS.items()
                if spin != "busy"
            ]
        cases.append(PingPong(f"{native} both, block", placement, native, native, "none"))
    return cases


def raw_baseline(case: PingPong) -> str:
    """The raw variant with the same placement and the nearest sync spin."""
    if case.spin == "none":
        return "block"
    if case.spin in ("sched_yield", "yield+sched"):
        return f"sched-spin {case.spin_us:g}us"
    return f"spin {case.spin_us:g}us"


# --------------------------------------------------------------------------- 3. in process


async def inline(count: int) -> None:
    for _ in range(count):
        await add(2, 3)


async def checkpoint_only(count: int) -> None:
    for _ in range(count):
        await anyio.lowlevel.checkpoint()


async def move_on_after_checkpoint(count: int) -> None:
    for _ in range(count):
        with anyio.move_on_after(WAKE_TIMEOUT_MS / 1000):
            await anyio.lowlevel.checkpoint()


async def start_soon_event(count: int) -> None:
    async def run(event: anyio.Event, box: list[int]) -> None:
        box.append(await add(2, 3))
        event.set()

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            event = anyio.Event()
            box: list[int] = []
            tg.start_soon(run, event, box)
            await event.wait()


async def worker_stream_event(count: int) -> None:
    send, receive = anyio.create_memory_object_stream[tuple[anyio.Event, list[int]]](1)

    async def worker() -> None:
        async with receive:
            async for event, box in receive:
                box.append(await add(2, 3))
                event.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker)
        async with send:
            for _ in range(count):
                event = anyio.Event()
                box: list[int] = []
                await send.send((event, box))
                await event.wait()


async def create_task_future(count: int) -> None:
    loop = asyncio.get_running_loop()

    async def run(future: asyncio.Future[int]) -> None:
        future.set_result(await add(2, 3))

    for _ in range(count):
        future = loop.create_future()
        task = loop.create_task(run(future))
        await future
        del task


IN_PROCESS: dict[str, Callable[[int], Awaitable[None]]] = {
    "await handler() inline": inline,
    "checkpoint (one loop pass)": checkpoint_only,
    "move_on_after + checkpoint": move_on_after_checkpoint,
    "long-lived worker: stream + Event": worker_stream_event,
    "start_soon + Event": start_soon_event,
    "asyncio create_task + Future": create_task_future,
}


async def _time_in_process(count: int, asyncio_only: bool) -> dict[str, float]:
    results = {}
    for name, case in IN_PROCESS.items():
        if case is create_task_future and not asyncio_only:
            continue
        best = float("inf")
        for _ in range(REPEATS):
            start = time.perf_counter()
            await case(count)
            best = min(best, time.perf_counter() - start)
        results[name] = best / count * 1e6
    return results


def bench_in_process(count: int) -> dict[str, dict[str, float]]:
    return {
        "asyncio": anyio.run(_time_in_process, count, True, backend="asyncio"),
        "trio": anyio.run(_time_in_process, count, False, backend="trio"),
    }


# --------------------------------------------------------------------------- 4. sync path


def sample_calls(
    call: Callable[[], object], iterations: int, warmup: int, other: str | None
) -> dict[str, float]:
    for _ in range(warmup):
        call()
    colocation = Colocation(other)
    samples = [0.0] * iterations
    clock = time.perf_counter
    for i in range(iterations):
        if i % Colocation.PERIOD == 0:
            colocation.probe()
        start = clock()
        call()
        samples[i] = clock() - start
    samples.sort()
    return {
        "p50_us": samples[iterations // 2] * 1e6,
        "p99_us": samples[int(iterations * 0.99)] * 1e6,
        "mean_us": sum(samples) / iterations * 1e6,
        "same_cpu_fraction": colocation.fraction(),
    }


def in_thread(fn: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run fn in a fresh plain thread, as an application's worker thread would call."""
    box: list[dict[str, float] | BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


@contextmanager
def loop_thread(
    background: Callable[[], Awaitable[None]] | None = None,
) -> Iterator[tuple[asyncio.AbstractEventLoop, str]]:
    """An anyio (asyncio) loop in a daemon thread, running `background` until exit.

    Yields the loop and the thread's /proc stat file (for `Colocation`).
    """
    started = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        box["loop"] = asyncio.get_running_loop()
        box["stat"] = thread_stat(threading.get_native_id())
        async with anyio.create_task_group() as tg:
            box["scope"] = tg.cancel_scope
            if background is not None:
                tg.start_soon(background)
            started.set()
            await anyio.sleep_forever()

    thread = threading.Thread(target=anyio.run, args=(main,), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the loop thread did not start")
    loop: asyncio.AbstractEventLoop = box["loop"]
    try:
        yield loop, box["stat"]
    finally:
        loop.call_soon_threadsafe(box["scope"].cancel)
        thread.join(10)


def bench_hops(iterations: int, warmup: int) -> dict[str, dict[str, float]]:
    """Thread to loop thread and back with no I/O: the price of the hop alone."""
    results = {}
    with loop_thread() as (loop, loop_stat):

        def resolve(future: concurrent.futures.Future[int]) -> None:
            future.set_result(2 + 3)

        def soon_threadsafe() -> int:
            future: concurrent.futures.Future[int] = concurrent.futures.Future()
            loop.call_soon_threadsafe(resolve, future)
            return future.result(5)

        def coroutine_threadsafe() -> int:
            return asyncio.run_coroutine_threadsafe(add(2, 3), loop).result(5)

        results["hop: call_soon_threadsafe + Future"] = in_thread(
            lambda: sample_calls(soon_threadsafe, iterations, warmup, loop_stat)
        )
        results["hop: run_coroutine_threadsafe"] = in_thread(
            lambda: sample_calls(coroutine_threadsafe, iterations, warmup, loop_stat)
        )
    with anyio.from_thread.start_blocking_portal() as portal:
        portal_stat = thread_stat(portal.call(threading.get_native_id))
        results["hop: anyio BlockingPortal.call"] = in_thread(
            lambda: sample_calls(lambda: portal.call(add, 2, 3), iterations, warmup, portal_stat)
        )
    return results


def bench_hop_ring(iterations: int, warmup: int) -> dict[str, float]:
    """A sync caller hands the request to the loop thread, which owns the rings."""
    with session("unpinned", "sync", "none", "none", 0) as ep:
        pending: dict[int, concurrent.futures.Future[int]] = {}

        async def reader() -> None:
            while True:
                await ep.wait_async()
                msg_id, result = cbor2.loads(ep.recv())
                pending.pop(msg_id).set_result(result)

        def submit(future: concurrent.futures.Future[int]) -> None:
            ep.next_id += 1
            pending[ep.next_id] = future
            ep.send(cbor2.dumps([ep.next_id, "add", [2, 3]]))

        with loop_thread(reader) as (loop, _):

            def call() -> int:
                future: concurrent.futures.Future[int] = concurrent.futures.Future()
                loop.call_soon_threadsafe(submit, future)
                return future.result(5)

            result = in_thread(
                lambda: sample_calls(call, iterations, warmup, process_stat(ep.peer_pid))
            )
        ep.call("stop", [])  # the loop thread is gone: the rings are ours again
        return result


def bench_direct_ring(iterations: int, warmup: int, spin_us: float) -> dict[str, float]:
    """The calling thread writes the ring and waits on the eventfd itself, under a lock."""
    spin = "busy" if spin_us else "none"
    with session("unpinned", "sync", "none", spin, spin_us) as ep:
        lock = threading.Lock()

        def call() -> int:
            with lock:
                return ep.call("add", [2, 3])

        result = in_thread(
            lambda: sample_calls(call, iterations, warmup, process_stat(ep.peer_pid))
        )
        ep.call("stop", [])
        return result


def bench_sync_path(iterations: int, warmup: int) -> dict[str, dict[str, float]]:
    results = bench_hops(iterations, warmup)
    results["loop thread owns the ring (hop + ring)"] = bench_hop_ring(iterations, warmup)
    results["caller does ring I/O, block"] = bench_direct_ring(iterations, warmup, 0)
    results[f"caller does ring I/O, spin {LOOP_SPIN_US}us"] = bench_direct_ring(
        iterations, warmup, LOOP_SPIN_US
    )
    return results


# --------------------------------------------------------------------------- report


def print_ping_pong(title: str, rows: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"\n{title}")
    print(
        f"  {'variant':<40} {'placement':<10} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}"
        f" {'peer cpu/RT':>11} {'host cpu/RT':>11} {'peer parks':>10} {'lost':>5} {'same cpu':>8}"
    )
    for placement, variants in rows.items():
        for variant, row in variants.items():
            print(
                f"  {variant:<40} {placement:<10} {row['p50_us']:8.1f} {row['p99_us']:8.1f}"
                f" {row['mean_us']:8.1f} {row['peer_cpu_us_per_rt']:11.1f}"
                f" {row['host_cpu_us_per_rt']:11.1f} {row['peer_parks_per_rt']:10.2f}"
                f" {row['lost_wakeups']:5.0f} {row['same_cpu_fraction']:8.0%}"
            )


def ping_pong_ratios(
    raw: dict[str, dict[str, dict[str, float]]], loop: dict[str, dict[str, dict[str, float]]]
) -> dict[str, float]:
    ratios = {}
    for placement, variants in raw.items():
        block = variants["block"]
        for spin_name in [f"spin {us}us" for us in SPINS_US] + [f"sched-spin {LOOP_SPIN_US}us"]:
            if not comparable(variants[spin_name], block):
                continue
            spin = variants[spin_name]
            ratios[f"raw {placement}: {spin_name} / block, p50"] = spin["p50_us"] / block["p50_us"]
            ratios[f"raw {placement}: {spin_name} / block, peer cpu"] = (
                spin["peer_cpu_us_per_rt"] / block["peer_cpu_us_per_rt"]
            )
    for case in loop_cases():
        row = loop[case.placement][case.variant]
        base = raw[case.placement][raw_baseline(case)]
        if comparable(row, base):
            ratios[f"loop {case.placement}: {case.variant} / raw {raw_baseline(case)}, p50"] = (
                row["p50_us"] / base["p50_us"]
            )
    return ratios


def comparable(row: dict[str, float], base: dict[str, float]) -> bool:
    """Unpinned rows are only compared when the scheduler placed both runs alike."""
    return abs(row["same_cpu_fraction"] - base["same_cpu_fraction"]) < 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, a few seconds")
    parser.add_argument("--iterations", type=int, help="round trips per variant")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_main(json.loads(args.peer))
        return 0

    iterations = args.iterations or (1500 if args.quick else 20000)
    warmup = max(100, iterations // 10)
    started = time.perf_counter()
    raw: dict[str, dict[str, dict[str, float]]] = {}
    for case in raw_cases():
        raw.setdefault(case.placement, {})[case.variant] = run_ping_pong(case, iterations, warmup)
    loop: dict[str, dict[str, dict[str, float]]] = {}
    for case in loop_cases():
        loop.setdefault(case.placement, {})[case.variant] = run_ping_pong(case, iterations, warmup)
    in_process = bench_in_process(iterations)
    sync_path = bench_sync_path(iterations, warmup)
    elapsed = time.perf_counter() - started

    ratios = ping_pong_ratios(raw, loop)
    for backend, rows in in_process.items():
        base = rows["await handler() inline"]
        ratios[f"in-process {backend}: start_soon + Event / inline"] = (
            rows["start_soon + Event"] / base
        )
        ratios[f"in-process {backend}: worker + Event / inline"] = (
            rows["long-lived worker: stream + Event"] / base
        )
    direct = sync_path["caller does ring I/O, block"]["p50_us"]
    ratios["sync path: hop + ring / direct block, p50"] = (
        sync_path["loop thread owns the ring (hop + ring)"]["p50_us"] / direct
    )

    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "anyio": version("anyio"),
        "cbor2": version("cbor2"),
        "trio": version("trio"),
        "iterations": iterations,
        "warmup": warmup,
        "seconds": round(elapsed, 1),
    }
    print(
        f"python {meta['python']}, {meta['cpus']} CPUs, anyio {meta['anyio']}, "
        f"cbor2 {meta['cbor2']}, trio {meta['trio']}; {iterations} round trips per variant "
        f"after {warmup} warm-up; {elapsed:.0f} s"
    )
    print_ping_pong("1. raw ring + eventfd + cbor2, sync on both sides (cpu in us)", raw)
    print_ping_pong("2. peer (or both sides) in an anyio event loop, sync host otherwise", loop)
    print(f"\n3. in one process, per call (best of {REPEATS} x {iterations})")
    print(f"  {'case':<36} {'asyncio us':>10} {'trio us':>10}")
    for name in IN_PROCESS:
        trio_us = in_process["trio"].get(name)
        trio_text = f"{trio_us:10.2f}" if trio_us is not None else f"{'-':>10}"
        print(f"  {name:<36} {in_process['asyncio'][name]:10.2f} {trio_text}")
    print("\n4. sync caller thread, unpinned (the loop thread runs anyio on asyncio)")
    print("   same cpu: caller thread vs the loop thread (hops) or the peer process (ring)")
    print(f"  {'path':<40} {'p50 us':>8} {'p99 us':>8} {'mean us':>8} {'same cpu':>8}")
    for name, row in sync_path.items():
        print(
            f"  {name:<40} {row['p50_us']:8.1f} {row['p99_us']:8.1f} {row['mean_us']:8.1f}"
            f" {row['same_cpu_fraction']:8.0%}"
        )
    print("\nratios")
    for name, value in ratios.items():
        print(f"  {name:<80} {value:6.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "meta": meta,
                    "raw": raw,
                    "loop": loop,
                    "in_process": in_process,
                    "sync_path": sync_path,
                    "ratios": ratios,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
