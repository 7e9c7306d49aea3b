"""RpcSession: drives one sans-IO wire Session over one Transport inside an anyio task group.

::

    caller tasks ──open_call/send_item──┐                 ┌── receive loop (the only reader)
                                        ▼                 │      wire.receive_frame -> events
                              wire.Session (state) ◀──────┘      -> wake callers / start handlers
                                        │ frames_to_send
                                        ▼
                     written by whoever queued them when the transport takes them at once,
                     else by the write loop (the only one that ever waits on the transport)

- One task owns receiving; writing never waits outside the write loop. A caller or handler
  writes its own frames when the transport takes them without waiting (a task switch less
  per message); whatever does not go out at once is left to the write loop, so a caller never
  blocks on the transport and a cancelled caller can never leave half a frame on it. Under
  load, the frames of the tasks one read woke are written together (see ``_write_now``).
- A transport that can push its reads (a Unix socket on asyncio) runs the receive loop's body
  from the event loop's read callback (see ``_on_frames``): another task switch less.
- Each incoming call runs in its own task, under its own anyio cancel scope (cancelled by
  the caller, its deadline, or the session closing), in its own copy of the context. On
  asyncio the task is a bare ``loop.create_task`` and waits are bare futures, which cost a
  third of anyio's portable equivalents (see :mod:`rapace._runtime`). The exception: a unary
  call without a deadline to an ``async def`` with no ``await`` in it runs where it arrives,
  in its own copy of the context but with no task or scope, which it could not use
  (:mod:`rapace._inline`).
- Plain ``def`` handlers run in a worker thread, so the session keeps answering pings,
  cancellations and other calls meanwhile. A cancelled plain handler cannot be interrupted:
  its caller is released at once and its result dropped.
- Deadlines: a call made under ``anyio.fail_after``/``move_on_after`` sends the remaining time
  with the request (read with ``anyio.current_effective_deadline``, so trio's clock works too);
  the handler runs under a cancel scope with that deadline.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Final, Generic, NoReturn, Protocol, Self, TypeVar

import anyio
import anyio.abc
from anyio._core._eventloop import get_async_backend

from rapace._errors import (
    DeadlineExceeded,
    DecodeError,
    EncodeError,
    LocalProtocolError,
    RapaceError,
    RemoteProtocolError,
    Status,
    Unavailable,
    Unimplemented,
)
from rapace._inline import never_suspends, run_to_completion
from rapace._remote_errors import rebuild_exception
from rapace._runtime import Runtime, Waiter, current_runtime
from rapace.service import MethodSpec, ServiceSpec, bind_arguments, service_spec
from rapace.streams._abc import Transport
from rapace.wire import (
    BufferPlacer,
    BufferResolver,
    CallKind,
    CancelReason,
    ErrorPayload,
    Frame,
    GoAwayReason,
    HelloLimits,
    Role,
)
from rapace.wire._codec import TypeCodec, codec_for
from rapace.wire._session import Session
from rapace.wire._session_events import (
    CallReceived,
    ChannelCancelled,
    CreditAvailable,
    DeadlineExpired,
    EndOfStream,
    ErrorReceived,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    ItemReceived,
    PayloadDropped,
    PongReceived,
    ResponseReceived,
)

__all__ = ("RemoteStream", "RpcSession", "open_session")

T = TypeVar("T")

HANDSHAKE_TIMEOUT_S: Final = 10.0
GOODBYE_GRACE_S: Final = 5.0
# A DeadlineExceeded answer this close to the caller's own deadline is that deadline running
# out on the peer (see _raise_call_error).
DEADLINE_RACE_S: Final = 0.01
ITERATOR_CLOSE_GRACE_S: Final = 1.0
# Frames held for one write under load (_write_now) before they are written anyway, so the peer
# starts on them while the rest are made: 4 to 32 measured alike, 64 no better than none.
HELD_FRAMES_MAX: Final = 16


@dataclass(frozen=True, slots=True)
class MethodCodecs:
    """The codecs of one method, and what every call needs to know of its shape: built
    once per method and reused for every call."""

    args: TypeCodec[Any]
    result: TypeCodec[Any]
    request_item: TypeCodec[Any] | None
    response_item: TypeCodec[Any] | None
    stream_index: int | None  # where the streaming parameter is, if there is one
    handler_streams: bool  # server- or bidi-streaming: the results are a stream
    keyword_only: bool  # some parameter is keyword-only (the handler is not called *args)

    @classmethod
    def for_method(cls, spec: MethodSpec) -> MethodCodecs:
        value_types = tuple(p.annotation for p in spec.value_params)
        stream = spec.stream_param
        return cls(
            args=codec_for(tuple[value_types] if value_types else tuple[()], root="args"),  # type: ignore[valid-type]
            result=codec_for(spec.returns, root="result"),
            request_item=codec_for(stream.annotation, root=f"{stream.name}[item]")
            if stream is not None
            else None,
            response_item=codec_for(spec.returns, root="result[item]")
            if spec.kind.handler_streams
            else None,
            stream_index=spec.params.index(stream) if stream is not None else None,
            handler_streams=spec.kind.handler_streams,
            keyword_only=any(p.keyword_only for p in spec.params),
        )


# Keyed by the spec's identity (two services may share a name and ids): the spec is kept in
# the value so the id cannot be reused while the entry lives.
_codec_cache: dict[int, tuple[MethodSpec, MethodCodecs]] = {}


def _codecs(spec: MethodSpec) -> MethodCodecs:
    entry = _codec_cache.get(id(spec))
    if entry is None:
        entry = _codec_cache[id(spec)] = (spec, MethodCodecs.for_method(spec))
    return entry[1]


class _Inbox:
    """Items and the end of one receiving direction of a channel, with one waiter.

    A wake-up is counted in the session's ``_runnable`` until the woken task runs (see
    :meth:`RpcSession._write_now`).
    """

    __slots__ = ("done", "error", "items", "session", "waiter")

    def __init__(self, session: RpcSession) -> None:
        self.items: deque[Any] = deque()
        self.done = False
        self.error: BaseException | None = None
        self.session = session
        self.waiter: Waiter | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            self.session._runnable += 1
            waiter.set()

    async def wait(self) -> None:
        waiter = self.waiter = self.session._new_waiter()
        try:
            await waiter.wait()
        finally:
            if self.waiter is waiter:  # not woken: cancelled
                self.waiter = None
            else:
                self.session._runnable -= 1


class _CallerState:
    """A call this side made, from open to its terminal frame."""

    __slots__ = ("channel_id", "credit", "inbox", "response", "spec")

    def __init__(self, channel_id: int, spec: MethodSpec, session: RpcSession) -> None:
        self.channel_id = channel_id
        self.spec = spec
        self.inbox = _Inbox(session)  # stream items (server/bidi) and the outcome
        self.response: Any = None
        self.credit: Waiter | None = None


class _HandlerState:
    """A call the peer made that this side is serving.

    The cancel scope is made before the handler's task starts, so that cancelling the call
    (or closing the session) before the task ran its first step still cancels it.
    """

    __slots__ = ("cancel_reason", "credit", "inbox", "scope")

    def __init__(self, scope: anyio.CancelScope, session: RpcSession) -> None:
        self.scope = scope
        self.inbox = _Inbox(session)  # the caller's stream items (client/bidi)
        self.credit: Waiter | None = None
        self.cancel_reason: CancelReason | None = None


class RpcSession:
    """One connection to a peer: calls out through a proxy, calls in to ``serve``.

    Use :func:`open_session` to run one; the constructor only prepares state.

    Args:
        transport: a connected transport; the session owns it and closes it.
        role: INITIATOR on the side that connected, ACCEPTOR on the other.
        serve: a service instance whose methods the peer may call, or None.
        call_timeout: a default deadline in seconds for every call made through this
            session; exceeding it raises :class:`rapace.DeadlineExceeded`.
        ping_interval: seconds between keep-alive pings; a peer that does not answer within
            ``ping_interval`` is considered dead and the session closes. None disables.
        limits: what this side is prepared to receive (window, payload size, channels).
        handler_threads: how many plain ``def`` handlers may run at once (each in a thread);
            None: anyio's default limiter (40 threads).
        thread_limiter: a limiter to share with other sessions instead (a worker serving
            its main link and its lane runs ``handler_threads`` handlers in all).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        role: Role,
        serve: object | None = None,
        call_timeout: float | None = None,
        ping_interval: float | None = None,
        limits: HelloLimits | None = None,
        handler_threads: int | None = None,
        thread_limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        if handler_threads is not None and handler_threads < 1:
            raise ValueError(f"handler_threads must be at least 1, not {handler_threads}")
        self._handler_threads = handler_threads
        # Made in the session's loop, unless shared with another session (a worker's lane).
        self._thread_limiter: anyio.CapacityLimiter | None = thread_limiter
        self._transport = transport
        # Shared-memory transports place large and shared buffers themselves (zero-copy).
        self._buffers: Any = getattr(transport, "buffers", None)
        self._serve = serve
        self._spec: ServiceSpec | None = service_spec(serve) if serve is not None else None
        self._wire = Session(
            role,
            methods=self._spec.method_table() if self._spec is not None else (),
            limits=limits or HelloLimits(),
            deadline_mode=transport.deadline_mode,
        )
        # Unary handlers that cannot suspend, served where their call arrives: by method id,
        # the function judged (rapace._inline), which must still be the one called.
        self._inline_methods: dict[int, tuple[MethodSpec, MethodCodecs, Callable[..., Any]]] = {}
        if self._spec is not None:
            for spec in self._spec.methods:
                if spec.kind is CallKind.UNARY and not spec.is_sync:
                    method = getattr(serve, spec.name)
                    if never_suspends(method):
                        func = getattr(method, "__func__", method)
                        self._inline_methods[spec.method_id] = (spec, _codecs(spec), func)
        self._call_timeout = call_timeout
        self._ping_interval = ping_interval
        self._calls: dict[int, _CallerState] = {}
        self._handlers: dict[int, _HandlerState] = {}
        self._writer_wakeup: Waiter | None = None
        self._handshake = anyio.Event()
        self._closed = anyio.Event()
        self._is_closed = False  # what _closed says, read on every call without a lookup
        self._close_reason: BaseException | None = None
        self._pong: anyio.Event | None = None
        # Set (and dropped) when the last call or handler finishes, for a graceful close.
        self._idle: anyio.Event | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._runtime: Runtime | None = None  # set when the session runs
        self._new_waiter: Callable[[], Waiter] = anyio.Event
        self._crash: BaseException | None = None  # a handler task's unexpected exception
        # The running backend's CancelScope class: it can be made outside a task, and
        # without anyio looking the backend up again for every call.
        self._scope_type: type[anyio.CancelScope] = anyio.CancelScope
        self._backend: _Backend = _AnyBackend  # the running backend, once the session runs
        # Tasks this session made runnable (handlers spawned, callers woken) that have not
        # run yet: while there are any, frames are held to be written together (_write_now).
        self._runnable = 0
        self._held: list[Frame] = []  # frames taken from the wire, held for one write
        # fast_acquire: taking the free lock must not cost the writer a trip round the loop.
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._flush_needed = False  # send_nowait left bytes in the transport

    # ------------------------------------------------------------------ public

    @property
    def closed(self) -> bool:
        return self._is_closed

    async def wait_closed(self) -> None:
        """Wait until the connection ends (peer gone, protocol error, or closed here)."""
        await self._closed.wait()

    async def call(self, spec: MethodSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """Call a unary or client-streaming method and return its result.

        A cancellation point: cancelling the calling task cancels the handler on the peer.

        Raises:
            DeadlineExceeded: ``call_timeout`` passed.
            Unavailable: the connection was lost or the peer is shutting down.
            Exception: whatever the handler raised, rebuilt (see ``rapace.RemoteError``).
        """
        codecs = _codecs(spec)
        if codecs.handler_streams:
            raise TypeError(f"{spec.qualified_name} streams its results: iterate it instead")
        values = _bind(spec, args, kwargs)
        stream_source = _pop_stream(spec, values) if codecs.stream_index is not None else None
        payload = _encode(codecs.args, tuple(values), self._buffers)
        if self._call_timeout is None:
            # The common case: no scope of our own, only the caller's deadline (if any).
            state = self._open(spec, payload, self._deadline_ns())
            try:
                if stream_source is None:
                    await self._wait_outcome(state)
                else:
                    await self._wait_call(state, stream_source, codecs)
            except BaseException:
                self._abandon(state, None)
                raise
            return _decode(codecs.result, state.response, self._buffers)
        with anyio.CancelScope(deadline=anyio.current_time() + self._call_timeout) as scope:
            state = self._open(spec, payload, self._deadline_ns())
            try:
                await self._wait_call(state, stream_source, codecs)
            except BaseException:
                self._abandon(state, scope)
                raise
        if scope.cancelled_caught:
            raise DeadlineExceeded(
                f"{spec.qualified_name} did not finish within {self._call_timeout} s"
            )
        return _decode(codecs.result, state.response, self._buffers)

    async def _wait_call(
        self,
        state: _CallerState,
        stream_source: Iterable[Any] | AsyncIterable[Any] | None,
        codecs: MethodCodecs,
    ) -> None:
        """Wait for the outcome of a call, streaming its argument meanwhile if it has one."""
        if stream_source is not None:
            assert codecs.request_item is not None
            async with anyio.create_task_group() as tg:
                # The async iterable is consumed here, in the caller's task group.
                tg.start_soon(self._pump_caller_items, state, stream_source, codecs.request_item)
                await self._wait_outcome(state, raise_error=False)
                tg.cancel_scope.cancel()
        await self._wait_outcome(state)

    def stream(
        self, spec: MethodSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> RemoteStream[Any]:
        """Call a server- or bidi-streaming method; iterate the returned stream.

        The call is sent when iteration starts. Closing the stream (or leaving an ``async for``
        early) cancels the producer on the peer.
        """
        if not spec.kind.handler_streams:
            raise TypeError(f"{spec.qualified_name} returns one result: await it instead")
        values = _bind(spec, args, kwargs)
        stream_source = _pop_stream(spec, values)
        return RemoteStream(self, spec, tuple(values), stream_source)

    async def aclose(self) -> None:
        """Say goodbye (GoAway), give calls in flight a bounded grace, then close."""
        if self.closed:
            return
        if not self._wire.closed:
            with contextlib.suppress(RapaceError):
                self._wire.go_away(GoAwayReason.SHUTDOWN, "closing")
            self._kick()
        with anyio.move_on_after(GOODBYE_GRACE_S):
            while self._calls or self._handlers:
                idle = self._idle = anyio.Event()
                await idle.wait()
        # Flush what the last handlers queued (their responses) before the writer stops.
        with anyio.move_on_after(GOODBYE_GRACE_S, shield=True):
            async with self._send_lock:
                frames = self._take_frames()
                with contextlib.suppress(
                    anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
                ):
                    await self._transport.send(frames)
        self._shutdown(Unavailable("the session was closed"))
        with anyio.CancelScope(shield=True):
            await self._transport.aclose()

    # --------------------------------------------------------------- run loops

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            runtime = self._runtime = current_runtime(tg, self._on_crash)
            self._new_waiter = runtime.waiter
            self._scope_type = type(anyio.CancelScope())
            self._backend = get_async_backend()
            try:
                tg.start_soon(self._write_loop)
                tg.start_soon(self._receive_loop)
                self._kick()
                with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
                    await self._handshake.wait()
                if self._close_reason is not None and not self._wire.handshake_complete:
                    raise self._close_reason
                # A peer that shook hands and is already gone (it connected, found nothing
                # to call, and closed) still made a session: it is merely closed already.
                if self._ping_interval is not None:
                    tg.start_soon(self._ping_loop, self._ping_interval)
                task_status.started()
                await self._closed.wait()
            finally:
                tg.cancel_scope.cancel()
                # Handler tasks may live outside the task group (see rapace._runtime): end
                # them as the task group would have, through their cancel scopes.
                for handler in self._handlers.values():
                    handler.scope.cancel()
                with anyio.CancelScope(shield=True):
                    await runtime.join()
                if self._crash is not None:
                    # Even when _run was cancelled meanwhile: a task group, too, lets a
                    # child's exception win over its own cancellation.
                    raise self._crash

    def _on_crash(self, exc: BaseException) -> None:
        """A handler task let an exception out: a bug here, or a BaseException such as
        KeyboardInterrupt. End the session with it, as a task group would have."""
        if self._crash is None:
            self._crash = exc
        self._shutdown(exc)

    async def _write_loop(self) -> None:
        transport = self._transport
        while True:
            try:
                # Frames are taken from the outbox only while holding the lock: aclose's
                # final flush takes the same lock, so no frame can be in a limbo where
                # neither of them will write it. While the writer holds it, _kick leaves
                # every frame to the writer, which takes them until none is left.
                async with self._send_lock:
                    while True:
                        if self._flush_needed:
                            self._flush_needed = False
                            await transport.flush()
                        frames = self._take_frames()
                        if not frames:
                            break
                        # No trip round the loop when the transport takes it all at once.
                        if not transport.send_nowait(frames):
                            await transport.flush()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._shutdown(Unavailable(f"connection lost while sending: {exc}"))
                return
            # No await since the outbox was found empty (releasing the lock does not
            # yield), so no frame can be queued unseen before the writer parks.
            wakeup = self._writer_wakeup = self._new_waiter()
            await wakeup.wait()

    def _kick(self) -> None:
        """Get queued frames moving: written here if possible, else by the writer."""
        if self._send_lock.locked():
            # The writer is writing (it takes these too before it parks), or aclose is
            # flushing (the writer takes the rest after it).
            self._wake_writer()
        elif not self._write_now():
            self._wake_writer()
        idle = self._idle
        if idle is not None and not self._calls and not self._handlers:
            self._idle = None
            idle.set()

    def _wake_writer(self) -> None:
        wakeup = self._writer_wakeup
        if wakeup is not None:
            self._writer_wakeup = None
            wakeup.set()

    def _write_now(self) -> bool:
        """Write what is queued without waiting, from the task that queued it: False when
        the writer has to (what is left stays queued, in order, for it).

        Writing here saves a task switch per message. But under load one read brings many
        calls (or responses), so many handlers (or callers) run in the same loop turn, each
        queueing frames: while some of them have yet to run, their frames are held, and
        the last of them writes them all at once (the writer, woken meanwhile, does if that
        one queues nothing), or whichever holds HELD_FRAMES_MAX first. A write that wakes
        the peer costs tens of microseconds on a Unix socket, so writing each frame is slow;
        but a whole window in one write makes the two sides take turns, each idle while the
        other works. Writing every 16 frames keeps both busy: 64 calls in flight over a Unix
        socket went from 50-55k to 78-81k calls/s (2-vCPU VM).
        """
        if self._runnable > 0:
            frames = self._wire.frames_to_send()
            if not frames:
                return True
            self._held += frames
            if len(self._held) < HELD_FRAMES_MAX:
                return False
        frames = self._take_frames()
        if not frames:
            return True
        try:
            done = self._transport.send_nowait(frames)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            done = False  # the writer's flush reports the failure
        self._flush_needed = not done
        return done

    def _take_frames(self) -> list[Frame]:
        """Every frame to send, in order: those _kick held for the writer, then the wire's."""
        frames = self._wire.frames_to_send()
        held = self._held
        if held:
            self._held = []
            held += frames
            return held
        return frames

    async def _receive_loop(self) -> None:
        transport = self._transport
        # A transport that can push its reads (see StreamTransport.receive_into) runs
        # _on_frames from the event loop's read callback: a task switch less per read.
        receive_into = getattr(transport, "receive_into", None)
        try:
            if receive_into is not None:
                await receive_into(self._on_frames)
            while True:
                self._on_frames(await transport.receive())
        except anyio.EndOfStream:
            self._shutdown(Unavailable("the peer closed the connection"))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self._shutdown(Unavailable(f"connection lost: {exc}"))
        except RemoteProtocolError as exc:  # from the transport, or the wire (_on_frames)
            self._shutdown(exc)

    def _on_frames(self, frames: list[Frame]) -> None:
        """Act on every frame of one read, then get what that queued moving, in one go.

        May run outside any task (from the event loop's read callback), so nothing here
        may need a current task: no anyio calls, only waking, spawning and writing.
        """
        wire = self._wire
        now = time.monotonic_ns()
        try:
            for frame in frames:
                for event in wire.receive_frame(frame, now):
                    self._on_event(event)
        finally:
            self._kick()  # after a protocol error: the GoAway the wire queued

    async def _ping_loop(self, interval: float) -> None:
        while not self.closed:
            await anyio.sleep(interval)
            pong = self._pong = anyio.Event()
            with contextlib.suppress(RapaceError):
                self._wire.ping(secrets.token_bytes(8))
            self._kick()
            with anyio.move_on_after(interval) as scope:
                await pong.wait()
            if scope.cancelled_caught:
                self._shutdown(Unavailable(f"the peer did not answer a ping within {interval} s"))
                return

    def _shutdown(self, reason: BaseException) -> None:
        """End the session: fail every waiting caller, cancel every handler."""
        if self._is_closed:
            return
        self._is_closed = True
        self._close_reason = reason
        for state in self._calls.values():
            inbox = state.inbox
            if not inbox.done:
                inbox.done = True
                inbox.error = reason
            inbox.wake()
            if state.credit is not None:
                state.credit.set()
        for handler in self._handlers.values():
            handler.scope.cancel()
            handler.inbox.done = True
            handler.inbox.wake()
        self._calls.clear()
        self._handshake.set()
        self._closed.set()

    # ------------------------------------------------------------------ events

    def _on_event(self, event: Event) -> None:
        match event:
            case ResponseReceived(channel_id, payload):
                state = self._calls.pop(channel_id, None)
                if state is not None:
                    state.response = payload
                    state.inbox.done = True
                    state.inbox.wake()
                else:
                    self._discard(payload)
            case ItemReceived(channel_id, payload):
                caller = self._calls.get(channel_id)
                inbox = caller.inbox if caller is not None else None
                if inbox is None:
                    handler = self._handlers.get(channel_id)
                    inbox = handler.inbox if handler is not None else None
                if inbox is not None:
                    inbox.items.append(payload)
                    inbox.wake()
                else:
                    self._discard(payload)
            case PayloadDropped(_, payload):
                self._discard(payload)
            case EndOfStream(channel_id):
                caller = self._calls.pop(channel_id, None)
                if caller is not None:
                    caller.inbox.done = True
                    caller.inbox.wake()
                handler = self._handlers.get(channel_id)
                if handler is not None:
                    handler.inbox.done = True
                    handler.inbox.wake()
            case ErrorReceived(channel_id, payload):
                state = self._calls.pop(channel_id, None)
                if state is not None:
                    state.inbox.error = _remote_exception(payload)
                    state.inbox.done = True
                    state.inbox.wake()
            case CallReceived():
                self._start_handler(event)
            case ChannelCancelled(channel_id, reason):
                handler = self._handlers.get(channel_id)
                if handler is not None:
                    handler.cancel_reason = reason
                    handler.scope.cancel()
                state = self._calls.pop(channel_id, None)
                if state is not None:
                    state.inbox.error = _cancel_error(reason, state.spec)
                    state.inbox.done = True
                    state.inbox.wake()
            case CreditAvailable(channel_id):
                waiter: _CallerState | _HandlerState | None = self._calls.get(
                    channel_id
                ) or self._handlers.get(channel_id)
                if waiter is not None and waiter.credit is not None:
                    waiter.credit.set()
                    waiter.credit = None
            case DeadlineExpired(channel_id):
                handler = self._handlers.get(channel_id)
                if handler is not None:
                    handler.cancel_reason = CancelReason.DEADLINE_EXCEEDED
                    handler.scope.cancel()
            case HandshakeComplete():
                self._handshake.set()
            case PongReceived():
                if self._pong is not None:
                    self._pong.set()
            case GoAwayReceived():
                pass  # the wire refuses new calls itself; calls in flight continue

    def _limiter(self) -> anyio.CapacityLimiter | None:
        if self._handler_threads is None and self._thread_limiter is None:
            return None
        if self._thread_limiter is None:
            assert self._handler_threads is not None
            self._thread_limiter = anyio.CapacityLimiter(self._handler_threads)
        return self._thread_limiter

    def _discard(self, payload: Any) -> None:
        """A payload nobody will decode: give back the shared memory it references."""
        if self._buffers is not None and _references_shared_memory(payload):
            with contextlib.suppress(DecodeError):
                _DISCARD.decode(payload, resolver=self._buffers)

    # ------------------------------------------------------------- caller side

    def _open(self, spec: MethodSpec, payload: bytes, deadline_ns: int | None) -> _CallerState:
        if self.closed:
            raise Unavailable("the session is closed") from self._close_reason
        channel_id = self._wire.open_call(
            spec.method_id,
            payload,
            now_ns=time.monotonic_ns(),
            kind=spec.kind,
            deadline_ns=deadline_ns,
            sig_hash=spec.sig_hash,
        )
        state = _CallerState(channel_id, spec, self)
        self._calls[channel_id] = state
        self._kick()
        return state

    def _deadline_ns(self) -> int | None:
        """The calling task's effective deadline as a monotonic_ns value, or None.

        Read through anyio so that trio's clock (not time.monotonic) works; what travels is
        the remaining time, re-based on time.monotonic_ns for the wire Session. The backend
        is the session's, looked up once: anyio.current_effective_deadline() looks it up on
        every call through sniffio, which was a tenth of a caller's time per call.
        """
        backend = self._backend
        effective = backend.current_effective_deadline()
        if effective == math.inf:
            return None
        remaining = effective - backend.current_time()
        return time.monotonic_ns() + max(1, int(remaining * 1e9))

    async def _wait_outcome(self, state: _CallerState, *, raise_error: bool = True) -> None:
        inbox = state.inbox
        while not inbox.done:
            await inbox.wait()
        if raise_error and inbox.error is not None:
            await _raise_call_error(inbox.error)

    def _abandon(self, state: _CallerState, timeout_scope: anyio.CancelScope | None) -> None:
        """The caller stopped waiting: cancel the call on the peer if it is still open."""
        if state.response is not None:
            self._discard(state.response)  # arrived as the caller gave up: never decoded
            state.response = None
        if self._calls.pop(state.channel_id, None) is None or self.closed:
            return
        deadline_passed = (timeout_scope is not None and timeout_scope.cancel_called) or (
            anyio.current_effective_deadline() <= anyio.current_time()
        )
        reason = CancelReason.DEADLINE_EXCEEDED if deadline_passed else CancelReason.CLIENT_CANCEL
        with contextlib.suppress(RapaceError):
            self._wire.cancel(state.channel_id, reason)
        self._kick()

    async def _pump_items(
        self,
        state: _CallerState | _HandlerState,
        channel_id: int,
        source: Iterable[Any] | AsyncIterable[Any],
        codec: TypeCodec[Any],
    ) -> None:
        """Send every item of ``source`` on the channel, honouring the peer's credit, then EOS.

        Returns early, quietly, when the direction closes under it (the peer ended or
        cancelled the call, or the session closed).
        """
        wire = self._wire
        if isinstance(source, AsyncIterable):
            iterator = aiter(source)
            try:
                async for item in iterator:
                    if not await self._send_item(state, channel_id, codec, item):
                        return
            finally:
                # An async generator is not finalized by cancellation on trio (no GC hooks
                # run it): close it here so its cleanup (a producer's finally) runs now.
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with anyio.move_on_after(ITERATOR_CLOSE_GRACE_S, shield=True):
                        await aclose()
        else:
            for item in source:
                if not await self._send_item(state, channel_id, codec, item):
                    return
                await anyio.lowlevel.checkpoint()
        if not self.closed and _direction_open(wire, channel_id):
            with contextlib.suppress(LocalProtocolError):
                wire.send_eos(channel_id)
            self._kick()

    async def _send_item(
        self,
        state: _CallerState | _HandlerState,
        channel_id: int,
        codec: TypeCodec[Any],
        item: Any,
    ) -> bool:
        """Send one item once credit allows; False if the direction closed meanwhile."""
        if isinstance(state, _HandlerState) and state.scope.cancel_called:
            # The call was cancelled: the wire would drop the item, and a producer that never
            # awaits would spin here forever without reaching a cancellation point.
            return False
        data = _encode(codec, item, self._buffers)
        wire = self._wire
        while not wire.can_send(channel_id):
            if self.closed or not _direction_open(wire, channel_id):
                return False
            credit = state.credit = self._new_waiter()
            await credit.wait()
        wire.send_item(channel_id, data)
        self._kick()
        return True

    async def _pump_caller_items(
        self,
        state: _CallerState,
        source: Iterable[Any] | AsyncIterable[Any],
        codec: TypeCodec[Any],
    ) -> None:
        """Stream a caller's argument; if producing or encoding an item fails, the call
        fails with that exception and is cancelled on the peer."""
        try:
            await self._pump_items(state, state.channel_id, source, codec)
        except Exception as exc:
            inbox = state.inbox
            if not inbox.done:
                inbox.error = exc
                inbox.done = True
                inbox.wake()
            if self._calls.pop(state.channel_id, None) is not None and not self.closed:
                with contextlib.suppress(RapaceError):
                    self._wire.cancel(state.channel_id, CancelReason.CLIENT_CANCEL)
                self._kick()

    # ------------------------------------------------------------ handler side

    def _start_handler(self, event: CallReceived) -> None:
        inline = self._inline_methods.get(event.method_id)
        # A call with a deadline gets a task: its handler may read the deadline of its
        # scope (anyio.current_effective_deadline) even if it never awaits.
        if inline is not None and event.deadline_ns is None:
            spec, codecs, func = inline
            method = getattr(self._serve, spec.name)
            if getattr(method, "__func__", None) is func:
                # In a copy of the context, as a task would be: a contextvar a handler sets
                # is never seen by another call.
                contextvars.copy_context().run(self._serve_inline, event, spec, codecs, method)
                return
        # No anyio call here (see _on_frames): the scope is made from its concrete class and
        # gets its deadline in the handler's task.
        state = _HandlerState(self._scope_type(), self)
        self._handlers[event.channel_id] = state
        assert self._runtime is not None
        self._runnable += 1
        self._runtime.spawn(self._serve_call, event, state)

    def _serve_inline(
        self, event: CallReceived, spec: MethodSpec, codecs: MethodCodecs, method: Any
    ) -> None:
        """Serve a call to a handler that cannot suspend (rapace._inline) where it arrived.

        What _call_handler does, less what only a suspension point could need: no task, no
        cancel scope (the call has no deadline), no thread limiter.
        """
        wire = self._wire
        try:
            values = self._arguments(spec, codecs, event.payload)
            if codecs.keyword_only:
                positional, keywords = _split_arguments(spec, values)
                result = run_to_completion(method(*positional, **keywords))
            else:
                result = run_to_completion(method(*values))
            data = _encode(codecs.result, result, self._buffers)
            send = wire.send_response
        except Exception as exc:
            data = ErrorPayload.from_exception(exc, status=_status_of(exc)).encode()
            send = wire.send_error
        except BaseException as exc:
            if not isinstance(exc, self._backend.cancelled_exception_class()):
                self._on_crash(exc)  # as a handler task's would, it ends the session
                raise
            # Raised by the handler itself: nothing can cancel a handler that never awaits.
            data, send = _HANDLER_CANCELLED, wire.send_error
        if not self.closed:
            with contextlib.suppress(LocalProtocolError):
                send(event.channel_id, data)
        # Not written yet: _on_frames writes what every frame of the read queued at once.

    def _arguments(self, spec: MethodSpec, codecs: MethodCodecs, payload: Any) -> list[Any]:
        """A request's argument values, in declaration order (the stream's place left out).

        Raises:
            _InvalidArgument: they do not decode into the parameters' types.
        """
        try:
            return list(_decode(codecs.args, payload, self._buffers))
        except DecodeError as exc:
            raise _InvalidArgument(f"{spec.qualified_name}: {exc}") from exc

    async def _serve_call(self, event: CallReceived, state: _HandlerState) -> None:
        self._runnable -= 1
        try:
            terminal = await self._call_handler(event, state)
        finally:
            # Even if something other than an Exception left the handler: a graceful close
            # must not wait for a call that is over.
            self._handlers.pop(event.channel_id, None)
        if not self.closed:
            with contextlib.suppress(LocalProtocolError):
                terminal()
            self._kick()

    async def _call_handler(self, event: CallReceived, state: _HandlerState) -> Callable[[], None]:
        """Run the handler under the call's cancel scope; what sends its terminal frame."""
        if event.deadline_ns is not None:
            remaining = (event.deadline_ns - time.monotonic_ns()) / 1e9
            state.scope.deadline = anyio.current_time() + remaining
        channel_id = event.channel_id
        wire = self._wire
        spec = self._spec.by_id.get(event.method_id) if self._spec is not None else None
        with state.scope as scope:
            try:
                if spec is None:
                    raise Unimplemented(f"method 0x{event.method_id:08x} is not served here")
                return await self._run_handler(spec, event, state)
            except Exception as exc:
                payload = ErrorPayload.from_exception(exc, status=_status_of(exc)).encode()
                return partial(wire.send_error, channel_id, payload)
            except self._backend.cancelled_exception_class():
                if scope.cancel_called or self._backend.current_effective_deadline() == -math.inf:
                    raise  # a real cancellation: this call's, or the session's
                # The handler raised it itself (asyncio.CancelledError() as an error): an
                # answer, or its caller would wait for one forever.
                return partial(wire.send_error, channel_id, _HANDLER_CANCELLED)
        # Cancelled: by the caller, its deadline, or the session (then nothing is sent).
        reason = state.cancel_reason
        if reason is None and scope.cancelled_caught:
            reason = CancelReason.DEADLINE_EXCEEDED
        status = reason.status if reason is not None else Status.CANCELLED
        if status is Status.DEADLINE_EXCEEDED:
            error: RapaceError = DeadlineExceeded("the call's deadline passed")
        else:
            error = RapaceError("the call was cancelled")
        payload = ErrorPayload.from_exception(error, status=status).encode()
        return partial(wire.send_error, channel_id, payload)

    async def _run_handler(
        self, spec: MethodSpec, event: CallReceived, state: _HandlerState
    ) -> Callable[[], None]:
        assert self._serve is not None
        codecs = _codecs(spec)
        values = self._arguments(spec, codecs, event.payload)
        if codecs.stream_index is not None:
            assert codecs.request_item is not None
            stream = self._incoming_items(event.channel_id, state, codecs.request_item)
            values.insert(codecs.stream_index, stream)
        HANDLER_THREADS.set(self._limiter())  # e.g. a map chunk's def calls (rapace._batch)
        method = getattr(self._serve, spec.name)
        if codecs.keyword_only:
            positional, keywords = _split_arguments(spec, values)
        else:
            positional, keywords = values, {}
        wire = self._wire
        channel_id = event.channel_id
        if not codecs.handler_streams:
            if spec.is_sync:
                result = await anyio.to_thread.run_sync(
                    partial(method, *positional, **keywords),
                    abandon_on_cancel=True,
                    limiter=self._limiter(),
                )
            else:
                result = await method(*positional, **keywords)
            data = _encode(codecs.result, result, self._buffers)
            return partial(wire.send_response, channel_id, data)
        assert codecs.response_item is not None
        produced = method(*positional, **keywords)
        if not isinstance(produced, AsyncIterator | AsyncIterable):
            raise TypeError(f"{spec.qualified_name} must return an async iterator")
        await self._pump_items(state, channel_id, produced, codecs.response_item)
        return _noop  # the EOS after the last item was the terminal frame

    async def _incoming_items(
        self, channel_id: int, state: _HandlerState, codec: TypeCodec[Any]
    ) -> AsyncIterator[Any]:
        inbox = state.inbox
        while True:
            while inbox.items:
                payload = inbox.items.popleft()
                with contextlib.suppress(LocalProtocolError):
                    self._wire.consumed(channel_id, _nbytes(payload))
                self._kick()
                yield _decode(codec, payload, self._buffers)
            if inbox.done:
                return
            await inbox.wait()


class RemoteStream(Generic[T]):
    """The results of a streaming call: an async iterator with ``aclose()``.

    The call starts on the first ``__anext__``. Leaving an ``async for`` early (``break``,
    an exception) cancels the producer, as do ``aclose()`` and leaving ``async with``.
    """

    def __init__(
        self,
        session: RpcSession,
        spec: MethodSpec,
        values: tuple[Any, ...],
        source: Iterable[Any] | AsyncIterable[Any] | None,
    ) -> None:
        self._session = session
        self._spec = spec
        self._values = values
        self._source = source
        self._state: _CallerState | None = None
        self._pump_scope: anyio.CancelScope | None = None
        self._finished = False
        self._codec = _codecs(spec).response_item
        self._timeout_at = math.inf  # call_timeout, on anyio's clock, once started

    def __aiter__(self) -> AsyncIterator[T]:
        return _RemoteLoop(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __anext__(self) -> T:
        if self._finished:
            raise StopAsyncIteration
        state = self._state
        if state is None:
            state = self._start()
        inbox = state.inbox
        session = self._session
        try:
            while not inbox.items:
                if inbox.done:
                    self._finished = True
                    if inbox.error is not None:
                        await _raise_call_error(inbox.error)
                    raise StopAsyncIteration
                with anyio.CancelScope(deadline=self._timeout_at) as scope:
                    await inbox.wait()
                if scope.cancelled_caught:
                    raise DeadlineExceeded(
                        f"{self._spec.qualified_name} did not finish within "
                        f"{session._call_timeout} s"
                    )
        except BaseException as exc:
            if not isinstance(exc, StopAsyncIteration):
                await self.aclose()
            raise
        payload = inbox.items.popleft()
        with contextlib.suppress(LocalProtocolError):
            session._wire.consumed(state.channel_id, _nbytes(payload))
        session._kick()
        assert self._codec is not None
        item: T = _decode(self._codec, payload, session._buffers)
        return item

    def _start(self) -> _CallerState:
        session = self._session
        codecs = _codecs(self._spec)
        payload = _encode(codecs.args, self._values, session._buffers)
        deadline = self._session._deadline_ns()
        timeout = session._call_timeout
        if timeout is not None:
            # The whole stream is one call: the handler is cancelled when it runs out, and
            # a consumer waiting for the next item gives up then too.
            self._timeout_at = anyio.current_time() + timeout
            limit = time.monotonic_ns() + int(timeout * 1e9)
            deadline = limit if deadline is None else min(deadline, limit)
        state = self._state = session._open(self._spec, payload, deadline)
        if self._source is not None:
            assert codecs.request_item is not None
            assert session._task_group is not None
            session._task_group.start_soon(self._pump, state, self._source, codecs.request_item)
        return state

    async def _pump(
        self, state: _CallerState, source: Iterable[Any] | AsyncIterable[Any], codec: TypeCodec[Any]
    ) -> None:
        with anyio.CancelScope() as scope:
            self._pump_scope = scope
            await self._session._pump_caller_items(state, source, codec)

    async def aclose(self) -> None:
        """Stop the stream; if the call is still running, cancel it on the peer."""
        self.close_now()

    def close_now(self) -> None:
        """:meth:`aclose` without awaiting (it never needs to); from the session's loop."""
        self._finished = True
        if self._pump_scope is not None:
            self._pump_scope.cancel()
        state = self._state
        if state is None:
            return
        session = self._session
        items = state.inbox.items
        while items:  # received but never read: their shared memory goes back now
            session._discard(items.popleft())
        if session._calls.pop(state.channel_id, None) is not None and not session.closed:
            with contextlib.suppress(RapaceError):
                session._wire.cancel(state.channel_id, CancelReason.CLIENT_CANCEL)
            session._kick()


class _RemoteLoop(Generic[T]):
    """What an ``async for`` over a :class:`RemoteStream` iterates: only the loop holds it,
    so leaving the loop drops it, and that closes the stream (a no-op once it ended)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: RemoteStream[T]) -> None:
        self._stream = stream

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        return await self._stream.__anext__()

    def __del__(self) -> None:
        stream = self._stream
        if not stream._finished and stream._state is not None:
            stream.close_now()


# What the caller of a handler that raised a cancellation exception of its own is told.
_HANDLER_CANCELLED: Final = ErrorPayload.from_exception(
    RapaceError("the handler raised a cancellation exception of its own: the call was cancelled"),
    status=Status.CANCELLED,
).encode()


class _InvalidArgument(RapaceError, ValueError):
    """The request's arguments did not decode into the method's parameter types."""

    status = Status.INVALID_ARGUMENT


@contextlib.asynccontextmanager
async def open_session(
    transport: Transport,
    *,
    role: Role,
    serve: object | None = None,
    call_timeout: float | None = None,
    ping_interval: float | None = None,
    limits: HelloLimits | None = None,
    handler_threads: int | None = None,
    thread_limiter: anyio.CapacityLimiter | None = None,
) -> AsyncIterator[RpcSession]:
    """Run an :class:`RpcSession` for the duration of the ``async with`` block.

    Returns once the handshake is complete. Leaving the block says goodbye to the peer (calls
    in flight get a bounded grace) and closes the transport.

    Raises:
        RemoteProtocolError: the peer is not a compatible rapace peer.
        TimeoutError: no handshake within 10 seconds.
    """
    session = RpcSession(
        transport,
        role=role,
        serve=serve,
        call_timeout=call_timeout,
        ping_interval=ping_interval,
        limits=limits,
        handler_threads=handler_threads,
        thread_limiter=thread_limiter,
    )
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(session._run)
            try:
                yield session
            finally:
                with anyio.CancelScope(shield=True):
                    await session.aclose()
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await transport.aclose()


# ------------------------------------------------------------------ helpers


def _noop() -> None:
    return None


async def _raise_call_error(error: BaseException) -> NoReturn:
    """Raise what ended a call.

    But the deadline a call carries runs out on both sides at about the same moment, and
    whether the peer's DEADLINE_EXCEEDED answer or the caller's own timer is seen first is
    up to the event loop (asyncio runs I/O callbacks before due timers). That answer, coming
    as the caller's own deadline runs out, is left to the caller's cancel scope, so that
    ``fail_after`` raises TimeoutError and ``move_on_after`` moves on, as when the timer
    wins.
    """
    if isinstance(error, DeadlineExceeded):
        left = anyio.current_effective_deadline() - anyio.current_time()
        if left <= DEADLINE_RACE_S:
            await anyio.sleep_forever()  # cancelled by that scope within DEADLINE_RACE_S
    raise error


def _nbytes(payload: Any) -> int:
    return len(payload) if type(payload) is bytes else memoryview(payload).nbytes


#: The limiter of the session running the current handler: code a handler runs in threads
#: (a chunk of ``def`` calls) takes its threads from it, as the session's own calls do.
HANDLER_THREADS: contextvars.ContextVar[anyio.CapacityLimiter | None] = contextvars.ContextVar(
    "rapace_handler_threads", default=None
)

_DISCARD: Final = codec_for(Any, root="dropped payload")
# The CBOR heads of the shared-memory tags (0x72617008, 0x72617009): a payload without them
# references no block, and most payloads are scanned, not decoded.
_SHARED_TAG_HEADS: Final = (b"\xda\x72\x61\x70\x08", b"\xda\x72\x61\x70\x09")


def _references_shared_memory(payload: Any) -> bool:
    data = payload if type(payload) is bytes else bytes(payload)
    return any(head in data for head in _SHARED_TAG_HEADS)


def _encode(codec: TypeCodec[Any], value: Any, buffers: BufferPlacer | None) -> bytes:
    return codec.encode(value, buffers).data


def _decode(codec: TypeCodec[Any], payload: Any, buffers: BufferResolver | None) -> Any:
    if buffers is None:
        return codec.decode(payload)
    return codec.decode(payload, resolver=buffers)


def _bind(spec: MethodSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[Any]:
    # All positional and complete is the usual call: skip inspect's Signature.bind (~7 us).
    if not kwargs and len(args) == len(spec.params):
        return list(args)
    return bind_arguments(spec, args, kwargs)


class _Backend(Protocol):
    """What the session asks of its anyio backend class."""

    def current_effective_deadline(self) -> float: ...

    def current_time(self) -> float: ...

    def cancelled_exception_class(self) -> type[BaseException]: ...


class _AnyBackend:
    """Until the session runs: whatever backend is running (only tests call that early)."""

    @staticmethod
    def current_effective_deadline() -> float:
        return anyio.current_effective_deadline()

    @staticmethod
    def current_time() -> float:
        return anyio.current_time()

    @staticmethod
    def cancelled_exception_class() -> type[BaseException]:
        return anyio.get_cancelled_exc_class()


def _pop_stream(spec: MethodSpec, values: list[Any]) -> Iterable[Any] | AsyncIterable[Any] | None:
    stream = spec.stream_param
    if stream is None:
        return None
    source = values.pop(spec.params.index(stream))
    if not isinstance(source, Iterable | AsyncIterable):
        raise EncodeError(
            f"{stream.name}: a stream argument must be an iterable or async iterable, "
            f"got {type(source).__name__}"
        )
    return source


def _split_arguments(spec: MethodSpec, values: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    for param, value in zip(spec.params, values, strict=True):
        if param.keyword_only:
            keywords[param.name] = value
        else:
            positional.append(value)
    return positional, keywords


def _direction_open(wire: Session, channel_id: int) -> bool:
    try:
        wire.send_credit(channel_id)
    except LocalProtocolError:
        return False
    return True


def _status_of(exc: BaseException) -> Status:
    if isinstance(exc, RapaceError):
        return exc.status
    return Status.UNKNOWN


def _remote_exception(payload: Any) -> Exception:
    try:
        return rebuild_exception(ErrorPayload.decode(payload))
    except DecodeError as exc:
        return RemoteProtocolError(f"undecodable error payload: {exc}")


def _cancel_error(reason: CancelReason, spec: MethodSpec) -> Exception:
    status = reason.status
    if status is Status.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{spec.qualified_name}: the deadline passed on the peer")
    if status is Status.RESOURCE_EXHAUSTED:
        return Unavailable(f"{spec.qualified_name}: the peer refused the call ({reason.name})")
    return Unavailable(f"{spec.qualified_name}: the peer cancelled the call ({reason.name})")
