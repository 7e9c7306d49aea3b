"""A worker's direct lane: a blocking caller does the shared-memory I/O itself.

``pool.submit(f, x).result()`` through the pool's loop pays two thread hand-overs and keeps
three things busy on the way (the caller, the pool's loop, the worker), where a machine like
this one has two CPUs: ~90 us a call, of which the ring round trip is ~4
(``benchmarks/bench_shm_limits.py``: a caller hopping to a loop thread 111 us, doing the
ring I/O itself 18 us). So each shared-memory worker gets a second link with its own wire
Session, which no task owns: the thread that makes a call writes the request, spins on the
reply ring (the worker spins too), decodes the reply and completes the future itself; the
pool's loop stays asleep.

A lane carries up to :data:`MAX_IN_FLIGHT` calls; a thread that keeps many in flight (a
window of futures) writes them all itself, and whoever spins collects every reply that
comes, its own and the others'. Calls that find the lanes full take the usual path. Whoever
holds the lane's lock may drive it, for a few microseconds at a time, never while waiting.
A reply is decoded under the lock, but the future is completed after it is released, by the
same thread: done-callbacks are user code that may block (on the pool's loop, which takes
the lock to collect replies and to reap a worker) or call the pool again, or wait for
another call without spinning: a spinner stops spinning, so that the workers ring again,
before it runs any. A call stays on the lane until then.
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

__all__ = ("DirectLane", "LaneGroup")

#: A worker that does not answer the lane's hello within this is served the usual way only
#: (a plugin program on an older rapace, say).
HANDSHAKE_TIMEOUT_S: Final = 5.0

#: Calls one lane carries at once: a window of 64 futures from one thread fits in one lane,
#: and its link (rapace._workers.LANE_OPTIONS) has room for their frames and small payloads.
MAX_IN_FLIGHT: Final = 64


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


class LaneGroup:
    """A pool's open lanes, which a spinning caller watches together."""

    __slots__ = ("_lanes",)

    def __init__(self) -> None:
        self._lanes: tuple[DirectLane, ...] = ()  # replaced, never changed: read anywhere

    def add(self, lane: DirectLane) -> None:
        self._lanes = (*self._lanes, lane)

    def remove(self, lane: DirectLane) -> None:
        self._lanes = tuple(other for other in self._lanes if other is not lane)

    def others(self, lane: DirectLane) -> tuple[DirectLane, ...]:
        lanes = self._lanes
        if len(lanes) < 2:
            return ()
        return tuple(other for other in lanes if other is not lane)


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
        group: LaneGroup | None = None,
    ) -> None:
        self.group = group if group is not None else LaneGroup()
        self._transport = transport
        self._loop = loop
        self._record_latency = record_latency
        self._wire = Session(
            Role.INITIATOR, methods=(), limits=HelloLimits(), deadline_mode=transport.deadline_mode
        )
        self._buffers: Any = transport.buffers
        self._lock = threading.Lock()
        # By channel id: calls sent, until their futures are completed.
        self._calls: dict[int, _LaneCall] = {}
        self._answered: list[_LaneCall] = []  # for the lock's holder to deliver
        self._open = False  # handshake done, not closing
        self._closed = False
        self._stalled = False  # frames wait in the transport for room (see _send)
        self._spinners = 0
        self._spin = SpinPolicy(spin) if spin > 0 else None
        self._may_spin = False
        self._handshake: asyncio.Future[None] | None = None
        self._idle: asyncio.Future[None] | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._reader_fd = -1
        self.calls = 0
        self.errors = 0
        self._calls_made = 0
        self._pid = os.getpid()
        transport.want_doorbell(True)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

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
            answered = self._take_answered()
        self._deliver(answered)

    def _look_again(self, waits: Any) -> None:
        """A caller stopped spinning with a call unanswered: look now and then while one
        stays so (a reply published as the caller asked to be rung may not have rung)."""
        self._recheck = None
        if self._closed:
            return
        with self._lock:
            self._collect()
            answered = self._take_answered()
            handshake = self._handshake
            pending = self._unanswered() or (handshake is not None and not handshake.done())
        self._deliver(answered)
        if pending:
            self._recheck = self._loop.call_later(next(waits), self._look_again, waits)

    def _schedule_look_again(self) -> None:
        if self._recheck is None and not self._closed:
            waits = park_timeouts()
            self._recheck = self._loop.call_later(next(waits), self._look_again, waits)

    async def wait_idle(self) -> None:
        """Until the calls in flight, if any, have ended."""
        while True:
            with self._lock:
                if self._closed or all(call.outcome is not None for call in self._calls.values()):
                    # An answered call may still be on the lane while its deliverer runs
                    # done-callbacks, its own or another's it collected with it, which may
                    # be what waits for us. Its worker is done with it; close() completes
                    # its future if the deliverer has not yet.
                    return
                idle = self._idle = self._loop.create_future()
            await idle

    def cancel_in_flight(self) -> None:
        for call in list(self._calls.values()):
            call.future.cancel()

    def close(self, error: Callable[[MethodSpec], BaseException] | None = None) -> None:
        """Stop: fail the calls in flight with ``error(spec)`` (the worker is gone) or
        Unavailable, and release the link."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._open = False
            calls = list(self._calls.values())
            self._calls.clear()
            self._wake_idle()
        for timer in (self._recheck, self._flush_timer):
            if timer is not None:
                timer.cancel()
        self._recheck = self._flush_timer = None
        if self._reader_fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._reader_fd)
            self._reader_fd = -1
        if self._handshake is not None and not self._handshake.done():
            self._handshake.cancel()
        for call in calls:
            if call.outcome is None:
                reason = (
                    error(call.spec)
                    if error is not None
                    else Unavailable(f"{call.spec.qualified_name}: the worker's lane was closed")
                )
                self.calls += 1
                self.errors += 1
                call.future._fail(reason)
            else:
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
        """Send the call now if the lane has room; False leaves it to the usual path."""
        if not self._lock.acquire(blocking=False):
            return False
        answered = None
        try:
            if len(self._calls) >= MAX_IN_FLIGHT or not self._open or self._stalled:
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
            self._calls_made += 1
            number = self._calls_made
            self._calls[channel_id] = _LaneCall(channel_id, spec, future, number)
            future._lane = self
            # By the call's number, not the future: a hook holding the future would make a
            # cycle that keeps its result (a lease on shared memory) alive until the next
            # garbage collection, and the worker could not reuse its buffer blocks.
            future._on_cancel = functools.partial(self._cancel, channel_id, number)
            self._send()
            answered = self._take_answered()  # a failed send fails the calls
            return True
        finally:
            self._lock.release()
            self._deliver(answered)

    def wait(self, future: Future[Any], timeout: float | None) -> None:
        """Spin on the reply rings for the caller blocked on ``future``, collecting what
        comes: on this lane and its group's others (a thread with calls in flight on several
        workers gets them all back without waking the pool's loop)."""
        spin = self._spin
        if spin is None or not self._may_spin or future.done() or os.getpid() != self._pid:
            return  # (a forked child must not touch its parent's rings)
        budget = spin.budget()
        if timeout is not None:
            budget = min(budget, timeout)
        if budget <= 0:
            return
        others = self.group.others(self)
        lanes = (self, *others) if others else (self,)
        spinning = [lane for lane in lanes if lane._start_spinning()]
        if not spinning:
            return
        deadline = time.perf_counter() + budget
        # Replies whose futures have done-callbacks: delivered once no lane is told not to
        # ring, as such user code may wait, without spinning, for another call on them.
        collected: list[tuple[DirectLane, list[_LaneCall]]] = []
        try:
            looks = 0
            while spinning:
                looked = False
                for lane in spinning:
                    # Without the lock: the pool's loop may have closed the lane (its memory
                    # released) or the worker written nonsense; _collect, under it, tells.
                    try:
                        ready, unreadable = lane._transport.input_ready(), False
                    except Exception:
                        ready = unreadable = True
                    if ready:
                        with lane._lock:
                            lane._collect()
                            answered = lane._take_answered()
                        if answered is not None:
                            if _calls_back(answered):
                                collected.append((lane, answered))
                            else:
                                lane._deliver(answered)
                        looked = True
                    if unreadable:  # closed or broken now: nothing more to spin for there
                        spinning.remove(lane)
                        _stop_on(lane, collected)
                        break
                if collected:
                    stopped, spinning = spinning, []
                    for lane in stopped:
                        _stop_on(lane, collected)
                    _deliver_all(collected)
                    if future.done() or time.perf_counter() >= deadline:
                        break
                    spinning = [lane for lane in stopped if lane._start_spinning()]
                if looked:
                    if future.done():
                        break  # answered; or the call was failed, or is about to be
                    continue
                looks += 1
                # Only a spinner or a close completes the future meanwhile: the future's
                # lock need not be taken on every look.
                if looks & 15 == 0 and future.done():
                    break
                if time.perf_counter() >= deadline:
                    break
                # Lets a peer or thread sharing this CPU run; costs ~1 us across CPUs.
                os.sched_yield()
        finally:
            for lane in spinning:  # every lane first, then what they had: see above
                _stop_on(lane, collected)
            if collected:
                _deliver_all(collected)
        if future.done():
            spin.hit()
        else:
            spin.miss(long=True)

    def _start_spinning(self) -> bool:
        with self._lock:
            if self._closed or not self._open:
                return False
            self._spinners += 1
            self._transport.want_doorbell(False)
            return True

    def _stop_spinning(self) -> list[_LaneCall] | None:
        """Stop spinning here; returns what was collected, for the caller to deliver."""
        with self._lock:
            self._spinners -= 1
            unanswered = False
            if not self._spinners and not self._closed:
                self._transport.want_doorbell(True)
                if self._transport.input_ready():  # published just before we asked to be rung
                    self._collect()
                unanswered = self._unanswered()
            answered = self._take_answered()
        if unanswered and self._recheck is None:
            # Its reply may be published in the instant the doorbell was asked for, and not
            # ring (rapace.shm._doorbell): the pool's loop looks again after a while. A look
            # already pending re-arms itself while a call is unanswered, so a window of
            # calls wakes the loop once, not once per call.
            with contextlib.suppress(RuntimeError):  # the loop is gone: the pool is closed
                self._loop.call_soon_threadsafe(self._schedule_look_again)
        return answered

    def _cancel(self, channel_id: int, number: int) -> None:
        with self._lock:
            call = self._calls.get(channel_id)
            if call is None or call.number != number or self._closed:
                return
            if call.outcome is not None:
                return  # answered: the future is being completed (cancelled, it stays so)
            del self._calls[channel_id]
            self.calls += 1
            if not self._calls:
                self._wake_idle()
            with contextlib.suppress(RapaceError):
                self._wire.cancel(channel_id, CancelReason.CLIENT_CANCEL)
            self._send()

    # ------------------------------------------------------------------ under the lock

    def _send(self) -> None:
        transport = self._transport
        frames = self._wire.frames_to_send()
        if not frames:
            return
        try:
            done = transport.send_nowait(frames)
        except Exception as exc:
            self._broken(exc)
            return
        if not done and not self._stalled:
            # Out of descriptors or slots: the frames wait in the transport, in order, and
            # new calls take the usual path until the worker has taken them. It rings when
            # it returns slots or takes descriptors; the loop also looks now and then.
            self._stalled = True
            transport.want_space(True)
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._flush_later, park_timeouts())

    def _unstall(self) -> None:
        try:
            flushed = self._transport.flush_nowait()
        except Exception as exc:
            self._broken(exc)
            flushed = True
        if flushed:
            self._stalled = False
            if not self._closed:
                self._transport.want_space(False)

    def _flush_later(self, waits: Any) -> None:
        self._flush_timer = None
        if self._closed:
            return
        with self._lock:
            if self._stalled:
                self._unstall()
            answered = self._take_answered()
            stalled = self._stalled
        self._deliver(answered)
        if stalled:
            self._flush_timer = self._loop.call_later(next(waits), self._flush_later, waits)

    def _collect(self) -> None:
        """Take every frame the worker published and act on it."""
        if self._closed:
            return
        try:
            frames = self._transport.poll()
            now = time.monotonic_ns()
            events = [event for frame in frames for event in self._wire.receive_frame(frame, now)]
            if self._stalled:
                self._unstall()  # the worker took frames, or gave slots back
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
        call = self._calls.get(channel_id)
        if call is None or call.outcome is not None:
            return None
        self.calls += 1
        return call

    def _answer(self, call: _LaneCall, ok: bool, value: Any) -> None:
        call.outcome = (ok, value)
        self._answered.append(call)

    def _take_answered(self) -> list[_LaneCall] | None:
        answered = self._answered
        if not answered:
            return None
        self._answered = []
        return answered

    def _unanswered(self) -> bool:
        calls = self._calls
        return bool(calls) and any(call.outcome is None for call in calls.values())

    # ------------------------------------------------------------------ after the lock

    def _deliver(self, answered: list[_LaneCall] | None) -> None:
        """Complete answered calls' futures (running their done-callbacks), then take them
        off the lane; called by the thread that took them, without the lock."""
        if answered is None:
            return
        error: BaseException | None = None
        for call in answered:
            try:
                self._complete(call)
            except BaseException as exc:
                # A callback's SystemExit or KeyboardInterrupt (concurrent.futures lets them
                # through): the other futures must be completed all the same, as nobody else
                # will once they leave the lane.
                if error is None:
                    error = exc
        with self._lock:
            calls = self._calls
            for call in answered:
                if calls.get(call.channel_id) is call:
                    del calls[call.channel_id]
            if not calls:
                self._wake_idle()
        if error is not None:
            raise error

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
        the calls in flight fail now. The pool closes the lane when the worker ends."""
        self._open = False
        for call in self._calls.values():
            if call.outcome is None:
                self.calls += 1
                self.errors += 1
                error = Unavailable(f"{call.spec.qualified_name}: the worker's lane failed: {exc}")
                error.__cause__ = exc
                self._answer(call, False, error)


def _calls_back(answered: list[_LaneCall]) -> bool:
    return any(call.future._calls_back() for call in answered)


def _stop_on(lane: DirectLane, collected: list[tuple[DirectLane, list[_LaneCall]]]) -> None:
    """Stop spinning on ``lane``; what it had collected goes to ``collected`` to deliver."""
    answered = lane._stop_spinning()
    if answered is not None:
        collected.append((lane, answered))


def _deliver_all(collected: list[tuple[DirectLane, list[_LaneCall]]]) -> None:
    """Deliver what a spinner collected, emptying ``collected``: every lane's, whatever a
    done-callback raises."""
    while collected:
        lane, answered = collected.pop(0)
        try:
            lane._deliver(answered)
        except BaseException:
            _deliver_all(collected)
            raise


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
