"""A worker's direct lane: a blocking caller does the shared-memory I/O itself.

``pool.submit(f, x).result()`` through the pool's loop pays two thread hand-overs and keeps
three things busy on the way (the caller, the pool's loop, the worker), where a machine like
this one has two CPUs: ~90 us a call, of which the ring round trip is ~4
(``benchmarks/bench_shm_limits.py``: a caller hopping to a loop thread 111 us, doing the
ring I/O itself 18 us). So each shared-memory worker gets a second link with its own wire
Session, which no task owns: the thread that makes a call writes the request, spins on the
reply ring (the worker spins too), decodes the reply and completes the future itself; the
pool's loop stays asleep.

A lane carries one call at a time; calls that find it busy take the usual path. Whoever
holds the lane's lock may drive it, for a few microseconds at a time, never while waiting.
A reply is decoded under the lock, but the future is completed after it is released, by the
same thread: done-callbacks are user code that may block (on the pool's loop, which takes
the lock to collect replies and to reap a worker) or call the pool again. The lane stays
busy until then, so a call a callback makes takes the usual path.
When nobody spins (the future is awaited, or waited for with callbacks, or its call outlasts
the spin), the worker rings the lane's doorbell and the pool's loop collects the reply.
Publishing "ring me" can race with the worker's publishing of the reply (see
``rapace.shm._doorbell``); a caller that stops spinning therefore has the pool's loop look
again after a while, as a parked transport does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from rapace._errors import RapaceError, Unavailable
from rapace._future import Future
from rapace.service import MethodSpec
from rapace.session import _bind, _cancel_error, _codecs, _decode, _encode, _remote_exception
from rapace.shm._doorbell import park_timeouts
from rapace.shm._transport import ShmTransport, SpinPolicy
from rapace.wire import (
    CancelReason,
    ChannelCancelled,
    ErrorReceived,
    GoAwayReceived,
    HandshakeComplete,
    HelloLimits,
    PayloadDropped,
    ResponseReceived,
    Role,
)
from rapace.wire._session import Session

__all__ = ("DirectLane",)

#: A worker that does not answer the lane's hello within this is served the usual way only
#: (a plugin program on an older rapace, say).
HANDSHAKE_TIMEOUT_S: Final = 5.0


class _LaneCall:
    __slots__ = ("channel_id", "future", "number", "outcome", "spec", "started")

    def __init__(self, channel_id: int, spec: MethodSpec, future: Future[Any], number: int) -> None:
        self.channel_id = channel_id
        self.number = number
        self.spec = spec
        self.future = future
        self.started = time.perf_counter()
        # (True, result) or (False, error) once answered, until delivered (see _deliver).
        self.outcome: tuple[bool, Any] | None = None


class DirectLane:
    """The host's side of one worker's lane. Made, shaken hands with and closed on the
    pool's loop; :meth:`try_call` and :meth:`wait` run in any thread."""

    def __init__(
        self,
        transport: ShmTransport,
        loop: asyncio.AbstractEventLoop,
        *,
        spin: float,
        record_latency: Callable[[float], None],
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._record_latency = record_latency
        self._wire = Session(
            Role.INITIATOR, methods=(), limits=HelloLimits(), deadline_mode=transport.deadline_mode
        )
        self._buffers: Any = transport.buffers
        self._lock = threading.Lock()
        self._call: _LaneCall | None = None
        self._answered: _LaneCall | None = None  # for the lock's holder to deliver
        self._open = False  # handshake done, not closing
        self._closed = False
        self._stalled = False  # frames wait in the transport for room (see _send)
        self._spinners = 0
        self._spin = SpinPolicy(spin) if spin > 0 else None
        self._may_spin = False
        self._handshake: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._reader_fd = -1
        self.calls = 0
        self.errors = 0
        self._calls_made = 0
        transport.want_doorbell(True)

    @property
    def busy(self) -> bool:
        return self._call is not None

    @property
    def stats(self) -> Any:
        return self._transport.stats

    # ------------------------------------------------------------------ pool's loop

    async def handshake(self) -> bool:
        """Say hello and wait for the worker's; False (lane unusable) if it does not answer."""
        loop = self._loop
        self._handshake = loop.create_future()
        fd = self._reader_fd = self._transport.doorbell_fd
        loop.add_reader(fd, self._on_doorbell)
        with self._lock:
            self._send()
            # The worker's hello may have come before we asked to be rung.
            self._collect()
        self._schedule_look_again()
        try:
            await asyncio.wait_for(asyncio.shield(self._handshake), HANDSHAKE_TIMEOUT_S)
        except (TimeoutError, Exception):
            self.close()  # no reader, no timers left behind; the worker serves its main link
            return False
        self._may_spin = self._transport.may_spin()
        self._open = True
        return True

    def _on_doorbell(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(self._reader_fd)
        with self._lock:
            self._collect()
            answered, self._answered = self._answered, None
        self._deliver(answered)

    def _look_again(self, waits: Any) -> None:
        """A caller stopped spinning with its call unanswered: look now and then while it
        stays so (a reply published as the caller asked to be rung may not have rung)."""
        self._recheck = None
        if self._closed:
            return
        with self._lock:
            self._collect()
            answered, self._answered = self._answered, None
            handshake = self._handshake
            pending = self._call is not None or (handshake is not None and not handshake.done())
        self._deliver(answered)
        if pending:
            self._recheck = self._loop.call_later(next(waits), self._look_again, waits)

    def _schedule_look_again(self) -> None:
        if self._recheck is None and not self._closed:
            waits = park_timeouts()
            self._recheck = self._loop.call_later(next(waits), self._look_again, waits)

    async def wait_idle(self) -> None:
        """Until the call in flight, if any, has ended."""
        while True:
            with self._lock:
                call = self._call
                if call is None or self._closed:
                    return
                if call.outcome is not None and call.future.done():
                    return  # only its done-callbacks run, which may be what waits for us
                idle = self._idle = self._loop.create_future()
            await idle

    def cancel_in_flight(self) -> None:
        call = self._call
        if call is not None:
            call.future.cancel()

    def close(self, error: Callable[[MethodSpec], BaseException] | None = None) -> None:
        """Stop: fail the call in flight with ``error(spec)`` (the worker is gone) or
        Unavailable, and release the link."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._open = False
            call, self._call = self._call, None
            self._wake_idle()
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if self._reader_fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._reader_fd)
            self._reader_fd = -1
        if self._handshake is not None and not self._handshake.done():
            self._handshake.cancel()
        if call is not None and call.outcome is None:
            reason = (
                error(call.spec)
                if error is not None
                else Unavailable(f"{call.spec.qualified_name}: the worker's lane was closed")
            )
            self.calls += 1
            self.errors += 1
            call.future._fail(reason)
        elif call is not None:
            # Answered: its deliverer completes it too, unless it was stopped on the way.
            self._complete(call)
        self._transport.close_now()

    # ------------------------------------------------------------------ any thread

    def try_call(
        self,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        future: Future[Any],
    ) -> bool:
        """Send the call now if the lane is free; False leaves it to the usual path."""
        if not self._lock.acquire(blocking=False):
            return False
        answered = None
        try:
            if self._call is not None or not self._open or self._stalled:
                return False
            wire = self._wire
            if wire.closed or wire.go_away_received is not None:
                self._open = False
                return False
            codecs = _codecs(spec)
            try:
                payload = _encode(codecs.args, tuple(_bind(spec, args, kwargs)), self._buffers)
                channel_id = wire.open_call(
                    spec.method_id,
                    payload,
                    now_ns=time.monotonic_ns(),
                    kind=spec.kind,
                    deadline_ns=None,
                    sig_hash=spec.sig_hash,
                )
            except Exception as exc:  # the usual path fails such a call the same way
                self.calls += 1
                self.errors += 1
                future._fail(exc)
                return True
            self._call = _LaneCall(channel_id, spec, future, self._calls_made + 1)
            future._lane = self
            # By the call's number, not the future: a hook holding the future would make a
            # cycle that keeps its result (a lease on shared memory) alive until the next
            # garbage collection, and the worker could not reuse its buffer blocks.
            self._calls_made += 1
            future._on_cancel = functools.partial(self._cancel, self._calls_made)
            self._send()
            answered, self._answered = self._answered, None  # a failed send fails the call
            return True
        finally:
            self._lock.release()
            self._deliver(answered)

    def wait(self, future: Future[Any], timeout: float | None) -> None:
        """Spin on the reply ring for the caller blocked on ``future``, collecting it here."""
        spin = self._spin
        if spin is None or not self._may_spin or future.done():
            return
        budget = spin.budget()
        if timeout is not None:
            budget = min(budget, timeout)
        if budget <= 0:
            return
        transport = self._transport
        with self._lock:
            if self._closed:
                return
            self._spinners += 1
            transport.want_doorbell(False)
        deadline = time.perf_counter() + budget
        answered = None
        try:
            looks = 0
            while True:
                # Without the lock: the pool's loop may have closed the lane (its memory
                # released) or the worker written nonsense; _collect, under it, tells which.
                try:
                    ready, unreadable = transport.input_ready(), False
                except Exception:
                    ready = unreadable = True
                if ready:
                    with self._lock:
                        self._collect()
                        answered, self._answered = self._answered, None
                    self._deliver(answered)
                    answered = None
                    if unreadable or future.done():
                        break  # answered; or the call was failed, or is about to be
                    continue
                looks += 1
                # Only this thread or a close completes the future while it spins: the
                # future's lock need not be taken on every look.
                if looks & 15 == 0 and future.done():
                    break
                if time.perf_counter() >= deadline:
                    break
                # Lets a peer or thread sharing this CPU run; costs ~1 us across CPUs.
                os.sched_yield()
        finally:
            with self._lock:
                self._spinners -= 1
                unanswered = False
                if not self._spinners and not self._closed:
                    transport.want_doorbell(True)
                    if transport.input_ready():  # published just before we asked to be rung
                        self._collect()
                    call = self._call
                    unanswered = call is not None and call.outcome is None
                answered, self._answered = self._answered, None
            self._deliver(answered)
        if future.done():
            spin.hit()
        else:
            spin.miss(long=True)
        if unanswered:
            # Ours, or another thread's made meanwhile: its reply may be published in the
            # instant the doorbell was asked for, and not ring (rapace.shm._doorbell).
            with contextlib.suppress(RuntimeError):  # the loop is gone: the pool is closed
                self._loop.call_soon_threadsafe(self._schedule_look_again)

    def _cancel(self, number: int) -> None:
        with self._lock:
            call = self._call
            if call is None or call.number != number or self._closed:
                return
            if call.outcome is not None:
                return  # answered: the future is being completed (cancelled, it stays so)
            self._call = None
            self.calls += 1
            self._wake_idle()
            with contextlib.suppress(RapaceError):
                self._wire.cancel(call.channel_id, CancelReason.CLIENT_CANCEL)
            self._send()

    # ------------------------------------------------------------------ under the lock

    def _send(self) -> None:
        frames = self._wire.frames_to_send()
        if not frames:
            return
        try:
            done = self._transport.send_nowait(frames)
        except Exception as exc:
            self._broken(exc)
            return
        if not done:
            # One call at a time leaves the ring and the slots free, so this wants a peer
            # that stopped taking frames: wait for room on the loop, calls go the usual way.
            self._stalled = True
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._flush_later, park_timeouts())

    def _flush_later(self, waits: Any) -> None:
        if self._closed:
            return
        with self._lock:
            try:
                flushed = self._transport.flush_nowait()
            except Exception as exc:
                self._broken(exc)
                flushed = True
            else:
                self._stalled = self._stalled and not flushed
            answered, self._answered = self._answered, None
        self._deliver(answered)
        if not flushed:
            self._loop.call_later(next(waits), self._flush_later, waits)

    def _collect(self) -> None:
        """Take every frame the worker published and act on it."""
        if self._closed:
            return
        try:
            frames = self._transport.poll()
            now = time.monotonic_ns()
            events = [event for frame in frames for event in self._wire.receive_frame(frame, now)]
            self._send()  # what the frames asked for: credit, pongs, a GoAway's answer
        except Exception as exc:
            self._broken(exc)
            return
        for event in events:
            self._on_event(event)

    def _on_event(self, event: object) -> None:
        match event:
            case ResponseReceived(channel_id, payload):
                call = self._take(channel_id)
                if call is None:
                    self._discard(payload)
                    return
                try:
                    result = _decode(_codecs(call.spec).result, payload, self._buffers)
                except Exception as exc:
                    self.errors += 1
                    self._answer(call, False, exc)
                else:
                    self._record_latency(time.perf_counter() - call.started)
                    self._answer(call, True, result)
            case ErrorReceived(channel_id, payload):
                call = self._take(channel_id)
                if call is not None:
                    self.errors += 1
                    self._answer(call, False, _remote_exception(payload))
            case ChannelCancelled(channel_id, reason):
                call = self._take(channel_id)
                if call is not None:
                    self.errors += 1
                    self._answer(call, False, _cancel_error(reason, call.spec))
            case PayloadDropped(_, payload):
                self._discard(payload)
            case HandshakeComplete():
                handshake = self._handshake
                if handshake is not None:
                    self._loop.call_soon_threadsafe(_settle, handshake)
            case GoAwayReceived():
                self._open = False
            case _:
                pass  # pongs, credit: nothing a unary caller waits for

    def _take(self, channel_id: int) -> _LaneCall | None:
        call = self._call
        if call is None or call.channel_id != channel_id or call.outcome is not None:
            return None
        self.calls += 1
        return call

    def _answer(self, call: _LaneCall, ok: bool, value: Any) -> None:
        call.outcome = (ok, value)
        self._answered = call

    # ------------------------------------------------------------------ after the lock

    def _deliver(self, call: _LaneCall | None) -> None:
        """Complete an answered call's future (running its done-callbacks), then free the
        lane; called by the thread that took it from ``_answered``, without the lock."""
        if call is None:
            return
        try:
            self._complete(call)
        finally:
            with self._lock:
                if self._call is call:
                    self._call = None
                    self._wake_idle()

    @staticmethod
    def _complete(call: _LaneCall) -> None:
        assert call.outcome is not None
        ok, value = call.outcome
        if ok:
            call.future._resolve(value)
        else:
            call.future._fail(value)

    def _wake_idle(self) -> None:
        idle, self._idle = self._idle, None
        if idle is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, idle)

    def _discard(self, payload: Any) -> None:
        from rapace.session import _DISCARD, _references_shared_memory

        if _references_shared_memory(payload):
            with contextlib.suppress(Exception):
                _DISCARD.decode(payload, resolver=self._buffers)

    def _broken(self, exc: BaseException) -> None:
        """The link failed (a protocol error, the worker gone): no more calls through it;
        the call in flight fails now. The pool closes the lane when the worker ends."""
        self._open = False
        call = self._call
        if call is not None and call.outcome is None:
            self.calls += 1
            self.errors += 1
            error = Unavailable(f"{call.spec.qualified_name}: the worker's lane failed: {exc}")
            error.__cause__ = exc
            self._answer(call, False, error)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
