"""``PluginPool``: the ``concurrent.futures`` of plugins (API.md section 2).

Threads and loops. A pool entered with ``with`` (or ``start()``) owns a background thread
running an asyncio loop where every session, call task and worker supervisor lives; a pool
entered with ``async with`` runs them on the caller's loop (asyncio or trio). Callers in
other threads or loops reach the pool's loop only through its thread-safe entry point
(:class:`rapace._loop.LoopHandle`) and wait on :class:`rapace.Future` /
:class:`rapace.Stream`, which wake each kind of waiter its own way.

One supervisor task per worker slot starts the worker, waits for its ready signal, runs the
session, and on the worker's death (seen at once through its pidfd) fails exactly the calls it
had in flight with :class:`rapace.WorkerCrashed` and starts a replacement; ``max_restarts``
consecutive failed starts break the pool. Calls go to the ready worker with the fewest calls
in flight and wait, within their deadline, while none is ready.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar, cast

import anyio
import anyio.abc
import sniffio
from anyio._core._eventloop import get_async_backend

from rapace._errors import (
    BrokenPluginPool,
    ProtocolError,
    RapaceError,
    Unavailable,
    WorkerCrashed,
)
from rapace._future import Future, Stream
from rapace._lane import DirectLane, LaneGroup
from rapace._loop import (
    LoopHandle,
    LoopThread,
    current_loop_handle,
    current_trio_token,
    running_asyncio_loop,
)
from rapace._map import Expand, MapResults, single
from rapace._shared_arrays import arena_buffer, arena_empty, arena_zeros
from rapace._workers import StartFailed, WorkerLaunch, describe_exit, launch_worker, stop_process
from rapace.service import MethodSpec, ServiceSpec, service_spec
from rapace.session import RpcSession, open_session
from rapace.shm import SUPPORTED as SHM_SUPPORTED
from rapace.shm import LinkOptions, SizeClass
from rapace.shm._arena import Arena
from rapace.wire import CallKind, Role

__all__ = ("PluginPool", "WorkerInfo")

S = TypeVar("S")
T = TypeVar("T")

TransportName = Literal["shm", "unix", "tcp"]

# How long a stopping worker may take to leave on its own, after its session said goodbye.
STOP_GRACE_S = 5.0
# Back-off between consecutive failed starts of one slot: 0.1 s doubling up to 2 s.
RESTART_BACKOFF_S = (0.1, 2.0)
# How long a call that lost its worker waits to learn the exit status for its error.
CRASH_REPORT_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker as ``pool.workers`` shows it."""

    index: int
    pid: int | None
    state: str  # "starting", "ready", "restarting", "stopped", "broken"
    restarts: int
    calls_in_flight: int
    startup_seconds: float | None


class _Slot:
    """One worker position of the pool, kept filled by its supervisor."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = "starting"
        self.launch: WorkerLaunch | None = None
        self.session: RpcSession | None = None
        self.lane: DirectLane | None = None  # set once the worker answered on it
        self.lane_driver: DirectLane | None = None  # the lane, answered or not yet
        self.in_flight = 0
        self.restarts = 0
        self.startup_seconds: float | None = None

    @property
    def load(self) -> int:
        """Calls in flight in this worker, its lane's included."""
        lane = self.lane_driver
        return self.in_flight + (lane.in_flight if lane is not None else 0)

    def info(self) -> WorkerInfo:
        pid = self.launch.pid if self.launch is not None else None
        return WorkerInfo(
            self.index, pid, self.state, self.restarts, self.load, self.startup_seconds
        )


#: Iterables map() slices into chunks as they are.
_SEQUENCES: Final = (list, tuple, range)


class _InProcess:
    """A finalizer's callback that runs only in the process it was made in (see _owner)."""

    __slots__ = ("_callback", "_pid")

    def __init__(self, pid: int, callback: Callable[[], None]) -> None:
        self._pid = pid
        self._callback = callback

    def __call__(self) -> None:
        if os.getpid() == self._pid:
            self._callback()


def _load(slot: _Slot) -> int:
    return slot.load


@dataclass(frozen=True)
class _Options:
    transport: TransportName
    command: tuple[str, ...] | None
    python: str | None
    env: dict[str, str] | None
    max_restarts: int
    call_timeout: float | None
    start_timeout: float
    link: LinkOptions
    handler_threads: int | None


class _Processes:
    """What a finalizer needs to stop workers without the pool object (GC, exit)."""

    def __init__(self) -> None:
        self.launches: dict[int, WorkerLaunch] = {}

    def kill_all(self, *, close_fds: bool = True) -> None:
        """Kill and reap every worker. ``close_fds=False`` from a thread other than a
        running pool loop's: its tasks may be waiting on those fds, and close them."""
        for launch in list(self.launches.values()):
            process = launch.process
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(Exception):
                    process.wait(timeout=5)
            from rapace.shm import sweep_owner

            sweep_owner(process.pid, launch.start_time)
            if close_fds:
                launch.close_fds()
        if close_fds:
            self.launches.clear()


class _PoolCore(Generic[S]):
    """The pool itself (see :class:`PluginPool` for the arguments); the object users hold is
    a thin :class:`PluginPool` around it, so that dropping that object stops the pool even
    though the pool's own loop thread keeps this one alive.
    """

    def __init__(
        self,
        service: type[S],
        workers: int | None = None,
        *,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        transport: TransportName = "shm",
        command: Sequence[str] | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        max_restarts: int = 3,
        call_timeout: float | None = None,
        start_timeout: float = 60.0,
        ring_capacity: int | None = None,
        slot_classes: Iterable[tuple[int, int]] | None = None,
        spin: float | None = None,
        handler_threads: int | None = 1,
    ) -> None:
        self._spec: ServiceSpec = service_spec(service)
        self._service = service
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if handler_threads is not None and handler_threads < 1:
            raise ValueError(f"handler_threads must be at least 1 or None, not {handler_threads}")
        if transport not in ("shm", "unix", "tcp"):
            raise ValueError(f"transport must be 'shm', 'unix' or 'tcp', not {transport!r}")
        if transport == "shm" and not SHM_SUPPORTED:
            transport = "unix"
        if max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        defaults = LinkOptions()
        link = LinkOptions(
            ring_capacity=ring_capacity or defaults.ring_capacity,
            classes=tuple(SizeClass(*c) for c in slot_classes)
            if slot_classes
            else defaults.classes,
            spin=defaults.spin if spin is None else spin,
        )
        link.layout()  # validate the tuning now, not in the pool's thread
        if command is not None and (isinstance(command, str) or not command):
            raise TypeError("command must be a non-empty list of program arguments")
        self._options = _Options(
            transport=transport,
            command=tuple(command) if command is not None else None,
            python=python,
            env=dict(env) if env else None,
            max_restarts=max_restarts,
            call_timeout=call_timeout,
            start_timeout=start_timeout,
            link=link,
            handler_threads=handler_threads,
        )
        self._args = tuple(args)
        self._kwargs = dict(kwargs or {})
        self._slots = [_Slot(i) for i in range(workers)]
        # Blocking callers may use the workers' direct lanes (no deadline to carry there).
        self._lanes = transport == "shm" and call_timeout is None
        self._lanes_open = LaneGroup()
        self._state: Literal["new", "running", "stopping", "closed"] = "new"
        self._broken: BrokenPluginPool | None = None
        self._loop: LoopHandle | None = None
        self._thread: LoopThread | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        self._async_exit: Any = None
        self._ready_changed: anyio.Event | None = None
        self._calls_idle: anyio.Event | None = None
        self._stop_requested: anyio.Event | None = None
        self._calls = 0
        # Work handed over from other threads; a dispatcher task on the pool's loop spawns
        # it (task groups need a running task to spawn from, callbacks are not one).
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._inbox_wake: anyio.Event | None = None
        self._handover: collections.deque[Callable[[], None]] = collections.deque()
        self._handover_scheduled = False
        self._spawn_in_callbacks = False
        self._waiting: set[Future[Any]] = set()
        self._processes = _Processes()
        # A pool belongs to the process that made it. A child forked from that process
        # inherits the pool object, its fds and its shared memory; without this guard it
        # could stop the parent's pool, kill its workers, or write into its rings.
        self._owner = os.getpid()
        self._finalizer = weakref.finalize(self, _InProcess(self._owner, self._processes.kill_all))
        self._proxy: Any = None
        self._service_payload: bytes | None = None
        self._startup_error: BaseException | None = None
        self._stats_calls = 0
        self._stats_direct = 0  # of replaced workers' lanes (rapace._lane)
        self._stats_lock = threading.Lock()
        self._stats_errors = 0
        self._retired: collections.Counter[str] = collections.Counter()  # of replaced workers
        self._latencies: collections.deque[float] = collections.deque(maxlen=10_000)
        self._call_scopes: set[anyio.CancelScope] = set()
        self._cancelling_all = False
        self._aio_loop: asyncio.AbstractEventLoop | None = None  # set on the pool's own thread
        # Of the pool's loop, once it runs (_init_loop_state).
        self._backend: type[anyio.abc.AsyncBackend] | None = None
        self._scope_type: type[anyio.CancelScope] = anyio.CancelScope
        self._call_tasks: set[asyncio.Task[None]] = set()
        # Shared memory users allocate (pool.empty): blocks are created on first use, their
        # names removed when the pool closes or is collected; views keep their memory.
        self.arena = Arena() if SHM_SUPPORTED else None
        if self.arena is not None:
            weakref.finalize(self, _InProcess(self._owner, self.arena.close))

    # ------------------------------------------------------------------ lifecycle

    def __repr__(self) -> str:
        ready = sum(slot.state == "ready" for slot in self._slots)
        return (
            f"<PluginPool {self._spec.name} {self._state} workers={ready}/{len(self._slots)} "
            f"transport={self._options.transport}>"
        )

    def start(self) -> _PoolCore[S]:
        """Start the workers on the pool's own loop thread; returns once all are ready.

        Raises:
            rapace.BrokenPluginPool: workers kept failing to start (with their traceback).
        """
        if self._state != "new":
            raise RuntimeError(f"this pool is {self._state}: it can be started once")
        self._state = "running"
        self._prepare_payload()
        thread = LoopThread(self._own_loop_main, name=f"rapace-pool-{self._spec.name}")
        self._thread = thread
        try:
            thread.start()
        except BaseException:
            self._state = "closed"
            self._processes.kill_all()
            raise
        error = self._startup_error
        if error is not None:
            self._join_thread()
            raise error
        return self

    async def _own_loop_main(self, ready: Callable[[], None], stop: anyio.Event) -> None:
        # This thread only ever runs this asyncio loop: telling sniffio so lets callbacks
        # from other threads spawn call tasks directly, without a hop through a dispatcher.
        sniffio.thread_local.name = "asyncio"
        self._spawn_in_callbacks = True
        self._aio_loop = asyncio.get_running_loop()
        self._loop = current_loop_handle()
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            self._init_loop_state()
            for slot in self._slots:
                tg.start_soon(self._supervise, slot)
            failure: BaseException | None = None
            try:
                await self._wait_started()
            except BaseException as exc:
                failure = exc
            if failure is not None:
                self._startup_error = failure
                ready()
                await self._stop_everything(wait=False)
                tg.cancel_scope.cancel()
                return
            self._startup_error = None
            ready()
            await stop.wait()
            with anyio.move_on_after(STOP_GRACE_S):  # calls were cancelled or finished
                while self._call_tasks:
                    await asyncio.wait(set(self._call_tasks))
            tg.cancel_scope.cancel()

    def __enter__(self) -> _PoolCore[S]:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C: cancel the calls in flight (in the workers too) and stop, bounded.
            self.shutdown(wait=False, cancel_futures=True)
        else:
            self.shutdown(wait=True)

    async def __aenter__(self) -> _PoolCore[S]:
        if self._state != "new":
            raise RuntimeError(f"this pool is {self._state}: it can be started once")
        self._state = "running"
        self._prepare_payload()
        self._loop = current_loop_handle()
        # On asyncio, call tasks are bare tasks here too (awaited in aclose).
        self._aio_loop = running_asyncio_loop()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._task_group = group
        self._async_exit = group
        self._init_loop_state()
        for slot in self._slots:
            group.start_soon(self._supervise, slot)
        try:
            await self._wait_started()
        except BaseException as exc:
            await self._stop_everything(wait=False)
            group.cancel_scope.cancel()
            await group.__aexit__(type(exc), exc, exc.__traceback__)
            self._state = "closed"
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _init_loop_state(self) -> None:
        # The pool loop's backend and cancel-scope class, looked up once: anyio looks both
        # up through sniffio on every use, ~2 us of a call made on this loop.
        self._backend = get_async_backend()
        self._scope_type = type(anyio.CancelScope())
        self._ready_changed = anyio.Event()
        self._stop_requested = anyio.Event()
        self._inbox_wake = anyio.Event()
        assert self._task_group is not None
        self._task_group.start_soon(self._dispatch)

    async def _dispatch(self) -> None:
        inbox = self._inbox
        while True:
            while inbox:
                try:
                    inbox[0]()
                finally:
                    inbox.popleft()  # only now: see _take_handover
            wake = self._inbox_wake = anyio.Event()
            if not inbox:
                await wake.wait()

    def _run_soon(self, start: Callable[[], None]) -> None:
        """Run ``start`` (which spawns tasks) on the pool's loop, from any thread."""
        loop = self._check_open()
        if loop.in_loop_thread() and _in_task():
            start()
            return
        # Calls submitted in a burst (64 futures, a map) share one wake-up of the loop's
        # thread: only the first of them schedules the hand-over, which takes them all.
        self._handover.append(start)
        if not self._handover_scheduled:
            self._handover_scheduled = True
            try:
                loop.call_soon(self._take_handover)
            except BaseException:  # the loop is gone
                self._handover_scheduled = False
                raise

    def _take_handover(self) -> None:
        # Cleared before taking: a start appended meanwhile is either taken below or
        # schedules a hand-over of its own (see _run_soon).
        self._handover_scheduled = False
        handover = self._handover
        while handover:
            # Taken off only once started: until then a call made in another thread sees it
            # queued, and does not overtake it through a lane (see _call).
            start = handover[0]
            try:
                if self._spawn_in_callbacks:
                    start()
                else:
                    self._enqueue(start)
            except BaseException:
                handover.popleft()
                if handover:  # the others still go
                    self._handover_scheduled = True
                    assert self._loop is not None
                    self._loop.call_soon(self._take_handover)
                raise
            handover.popleft()

    def _enqueue(self, start: Callable[[], None]) -> None:
        self._inbox.append(start)
        wake = self._inbox_wake
        if wake is not None:
            wake.set()

    def _prepare_payload(self) -> None:
        if self._options.command is not None:
            self._service_payload = b""  # the program builds its own service
            return
        self._check_interpreter()
        import cloudpickle

        try:
            payload: bytes = cloudpickle.dumps(  # type: ignore[no-untyped-call]
                (self._service, self._args, self._kwargs)
            )
            self._service_payload = payload
        except Exception as exc:
            raise TypeError(
                f"cannot ship {self._spec.name} and its constructor arguments to the workers: {exc}"
            ) from exc

    def _check_interpreter(self) -> None:
        """A class shipped by value is bytecode: only the same minor version can load it."""
        python = self._options.python
        if python is None or not _ships_by_value(self._service):
            return
        theirs = _python_version(python)
        ours = sys.version_info[:2]
        if theirs != ours:
            found = "unknown" if theirs is None else f"{theirs[0]}.{theirs[1]}"
            raise BrokenPluginPool(
                f"{self._spec.name} is defined in __main__ (a script or a notebook), so it is "
                f"shipped to the workers by value, as Python {ours[0]}.{ours[1]} bytecode; the "
                f"workers' interpreter {python!r} is Python {found} and cannot load it. Move "
                "the class into a module both interpreters can import, or use the same "
                "Python version."
            )

    async def _wait_started(self) -> None:
        while not all(slot.state == "ready" for slot in self._slots):
            if self._broken is not None:
                raise self._broken
            assert self._ready_changed is not None
            await self._ready_changed.wait()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool like ``Executor.shutdown``: with ``wait``, calls in flight finish
        first; the workers are then stopped (goodbye, terminate, kill, each bounded)."""
        if os.getpid() != self._owner:
            return  # a forked child leaving a `with` block: the pool is its parent's to stop
        if self._state in ("new", "closed"):
            self._state = "closed"
            self._close_arena()
            return
        if self._loop is not None and self._loop.in_loop_thread():
            raise RuntimeError(
                "shutdown() would block the pool's own event loop; use 'await pool.aclose()'"
            )
        if self._thread is None:
            raise RuntimeError("an 'async with' pool is closed with 'await pool.aclose()'")
        if not wait:
            # Like Executor.shutdown(wait=False): return now, the pool's thread stops the
            # calls and workers on its own (each step bounded).
            self._stop_in_background(cancel_futures)
            return
        if self._state == "running":
            self._state = "stopping"
            done = threading.Event()

            def begin() -> None:
                assert self._task_group is not None
                self._task_group.start_soon(self._shutdown_then, wait, cancel_futures, done.set)

            try:
                assert self._loop is not None
                self._loop.call_soon(self._enqueue, begin)
            except RuntimeError:
                done.set()
            try:
                done.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: stop now, whatever is running
                self._state = "closed"
                self._stop_now()
                raise
        self._join_thread()

    async def _shutdown_then(
        self, wait: bool, cancel_futures: bool, then: Callable[[], None]
    ) -> None:
        try:
            await self._stop_everything(wait=wait, cancel_futures=cancel_futures)
        finally:
            then()

    def _stop_now(self) -> None:
        """Stop without waiting for anything: calls cancelled, no restarts, workers killed,
        the loop thread told to end (it finishes its clean-up on its own)."""
        loop, thread = self._loop, self._thread

        def cancel_everything() -> None:
            self._cancelling_all = True
            for scope in list(self._call_scopes):
                scope.cancel()
            for future in list(self._waiting):
                future.cancel()
            if self._stop_requested is not None:
                self._stop_requested.set()
            if self._ready_changed is not None:
                self._ready_changed.set()

        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already gone
                loop.call_soon(cancel_everything)
        # The loop's supervisors close the fds as they reap (and _join_thread after them).
        self._processes.kill_all(close_fds=loop is None)
        if thread is not None:
            thread.request_stop()

    def _join_thread(self) -> None:
        thread = self._thread
        if thread is not None:
            thread.stop(timeout=STOP_GRACE_S + 10)
        self._state = "closed"
        self._close_arena()
        self._processes.kill_all()

    def _close_arena(self) -> None:
        if self.arena is not None:
            self.arena.close()  # names go now; memory still viewed stays until its views die

    def abandon(self) -> None:
        """The user dropped the pool without shutting it down (garbage collection, a notebook
        cell run again): stop it in the background, calls cancelled, without blocking."""
        if os.getpid() == self._owner:
            self._stop_in_background(cancel_futures=True)

    def _stop_in_background(self, cancel_futures: bool) -> None:
        thread, loop = self._thread, self._loop
        if self._state != "running" or thread is None or loop is None:
            return
        self._state = "stopping"

        def finished() -> None:
            self._state = "closed"
            self._close_arena()
            thread.request_stop()

        def begin() -> None:
            assert self._task_group is not None
            self._task_group.start_soon(self._shutdown_then, False, cancel_futures, finished)

        try:
            loop.call_soon(self._enqueue, begin)
        except RuntimeError:  # the loop is already gone
            self._processes.kill_all()

    async def aclose(self, *, wait: bool = True, cancel_futures: bool = False) -> None:
        """``shutdown`` for a pool entered with ``async with`` (or from any loop)."""
        if os.getpid() != self._owner:
            return
        if self._thread is not None:
            await anyio.to_thread.run_sync(
                lambda: self.shutdown(wait, cancel_futures=cancel_futures)
            )
            return
        if self._state in ("new", "closed"):
            self._state = "closed"
            self._close_arena()
            return
        self._state = "stopping"
        try:
            await self._stop_everything(wait=wait, cancel_futures=cancel_futures)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(STOP_GRACE_S):
                while self._call_tasks:  # calls were cancelled or finished: let them end
                    await asyncio.wait(set(self._call_tasks))
            group = self._async_exit
            self._async_exit = None
            if group is not None:
                group.cancel_scope.cancel()
                await group.__aexit__(None, None, None)
            self._state = "closed"
            self._close_arena()
            self._processes.kill_all()

    async def _stop_everything(self, *, wait: bool, cancel_futures: bool = False) -> None:
        if cancel_futures or not wait:
            for future in list(self._waiting):
                future.cancel()
        if not wait:
            self._cancelling_all = True
            for scope in list(self._call_scopes):
                scope.cancel()
            for slot in self._slots:
                if slot.lane_driver is not None:
                    slot.lane_driver.cancel_in_flight()
        if wait:
            while self._calls:
                idle = self._calls_idle = anyio.Event()
                await idle.wait()
            for slot in self._slots:
                if slot.lane_driver is not None:
                    await slot.lane_driver.wait_idle()
        assert self._stop_requested is not None
        self._stop_requested.set()
        if self._ready_changed is not None:
            self._ready_changed.set()
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for slot in self._slots:
                    if slot.launch is not None:
                        tg.start_soon(self._wait_slot_stopped, slot)

    async def _wait_slot_stopped(self, slot: _Slot) -> None:
        with anyio.move_on_after(STOP_GRACE_S + 6):
            launch = slot.launch
            while launch is not None:
                await launch.exited.wait()
                launch = slot.launch

    # ------------------------------------------------------------------ supervision

    async def _supervise(self, slot: _Slot) -> None:
        failures = 0
        stop = self._stop_requested
        assert stop is not None
        while not stop.is_set():
            started, error = await self._run_worker(slot)
            if stop.is_set():
                break
            if started:
                failures = 0
            else:
                failures += 1
                if failures > self._options.max_restarts:
                    self._break(slot, error)
                    return
            slot.restarts += 1
            slot.state = "restarting"
            if failures:
                low, high = RESTART_BACKOFF_S
                with anyio.move_on_after(min(high, low * 2 ** (failures - 1))):
                    await stop.wait()
        slot.state = "stopped"

    def _break(self, slot: _Slot, error: StartFailed | None) -> None:
        message = (
            f"worker {slot.index} of {self._spec.name} failed to start "
            f"{self._options.max_restarts + 1} times in a row"
        )
        if error is not None:
            message += f": {error}"
            if error.text:
                message += "\n\nThe worker's traceback:\n" + error.text.rstrip()
        broken = BrokenPluginPool(message)
        self._broken = broken
        slot.state = "broken"
        for future in list(self._waiting):
            future._fail(broken)
        self._notify_ready()

    def _notify_ready(self) -> None:
        changed = self._ready_changed
        self._ready_changed = anyio.Event()
        if changed is not None:
            changed.set()

    async def _run_worker(self, slot: _Slot) -> tuple[bool, StartFailed | None]:
        """One worker process from start to end: (got ready?, why it failed to start)."""
        options = self._options
        assert self._service_payload is not None
        slot.state = "starting"
        try:
            launch = await launch_worker(
                index=slot.index,
                service_payload=self._service_payload,
                transport=options.transport,
                link_options=options.link,
                handler_threads=options.handler_threads,
                python=options.python,
                env=options.env,
                workers=len(self._slots),
                command=options.command,
            )
        except Exception as exc:
            return False, StartFailed(f"could not start a worker: {exc}")
        slot.launch = launch
        self._processes.launches[slot.index] = launch
        assert self._task_group is not None
        self._task_group.start_soon(launch.forward_output, slot.index)
        started = False
        error: StartFailed | None = None
        try:
            try:
                await launch.wait_ready(options.start_timeout)
            except StartFailed as exc:
                error = exc
            except Exception as exc:
                error = StartFailed(f"worker start-up failed: {exc!r}")
            else:
                started = await self._serve_worker(slot, launch)
        finally:
            self._retire_counters(launch)
            transport = launch.transport
            if transport is not None and not started:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
            slot.session = None
            grace = STOP_GRACE_S if started else 0.0
            await stop_process(launch, grace)
            self._close_lane(slot, launch)
            self._processes.launches.pop(slot.index, None)
            slot.launch = None
        return started, error

    def _retire_counters(self, launch: WorkerLaunch) -> None:
        """Keep a finished link's counters: pool statistics never go backwards on a restart."""
        for transport in (launch.transport, launch.lane):
            counters = getattr(transport, "stats", None)
            if counters is None:
                continue
            for name in _TRANSPORT_COUNTERS:
                self._retired[name] += getattr(counters, name)
            self._retired["ring_high_water"] = max(
                self._retired["ring_high_water"], counters.ring_high_water
            )

    async def _open_lane(self, slot: _Slot, launch: WorkerLaunch) -> None:
        assert launch.lane is not None
        assert self._aio_loop is not None
        launch.lane.buffers.arena = self.arena
        lane = DirectLane(
            launch.lane,
            self._aio_loop,
            spin=self._options.link.spin,
            record_latency=self._latencies.append,
            group=self._lanes_open,
        )
        slot.lane_driver = lane  # closed with the worker, answered or not
        if await lane.handshake():
            slot.lane = lane
            self._lanes_open.add(lane)

    def _close_lane(self, slot: _Slot, launch: WorkerLaunch) -> None:
        """The worker was reaped: fail its lane's call (a crash names the worker)."""
        lane, slot.lane = slot.lane_driver, None
        if lane is None:
            if launch.lane is not None:
                launch.lane.close_now()
            return
        self._lanes_open.remove(lane)
        code = launch.exit_code
        crashed = self._state == "running" or code != 0

        def error(spec: MethodSpec) -> BaseException:
            if not crashed:
                return Unavailable(f"{spec.qualified_name}: the worker stopped")
            return WorkerCrashed(
                f"worker {slot.index} (pid {launch.pid}) {describe_exit(code)} while "
                f"running {spec.qualified_name}",
                pid=launch.pid,
                exitcode=code,
                method=spec.qualified_name,
            )

        lane.close(error)
        with self._stats_lock:  # stats() sees the lane's counts once, never zero times
            slot.lane_driver = None
            self._stats_calls += lane.calls
            self._stats_direct += lane.calls
            self._stats_errors += lane.errors

    async def _serve_worker(self, slot: _Slot, launch: WorkerLaunch) -> bool:
        assert launch.transport is not None
        stop = self._stop_requested
        assert stop is not None
        buffers = getattr(launch.transport, "buffers", None)
        if buffers is not None:
            buffers.arena = self.arena  # references to it come back from the worker
        async with (
            open_session(
                launch.transport, role=Role.INITIATOR, call_timeout=self._options.call_timeout
            ) as session,
            anyio.create_task_group() as tg,
        ):
            slot.session = session

            async def watch_process() -> None:
                code = await launch.wait_exit()
                mark = getattr(launch.transport, "mark_peer_dead", None)
                if mark is not None:
                    mark(f"worker {slot.index} (pid {launch.pid}) {describe_exit(code)}")
                tg.cancel_scope.cancel()

            async def watch_stop() -> None:
                await stop.wait()
                tg.cancel_scope.cancel()

            async def watch_session() -> None:
                await session.wait_closed()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_process)
            tg.start_soon(watch_stop)
            tg.start_soon(watch_session)
            if launch.lane is not None and self._aio_loop is not None:
                # Ready with its lane open (one more hello, answered at once), so a pool's
                # first blocking calls take the lanes as well.
                await self._open_lane(slot, launch)
            slot.state = "ready"
            slot.startup_seconds = time.monotonic() - launch.started_at
            self._notify_ready()
        slot.session = None
        slot.lane = None  # no new calls; the one in flight is failed once the worker is reaped
        slot.state = "restarting"
        return True

    # ------------------------------------------------------------------ calls

    def submit(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Call ``method`` (the service's function, e.g. ``Calculator.add``) in a worker.

        Returns a :class:`rapace.Future` at once; the call runs on the pool's loop.
        """
        spec = self._method(method)
        if spec.kind.handler_streams:
            raise TypeError(
                f"{spec.qualified_name} streams its results: call it through pool.proxy"
            )
        return self._call(spec, args, kwargs)

    def _method(self, method: Callable[..., Any] | str) -> MethodSpec:
        name = method if isinstance(method, str) else getattr(method, "__name__", None)
        for spec in self._spec.methods:
            if spec.name == name:
                return spec
        raise ValueError(f"{method!r} is not a method of {self._spec.name}")

    def _check_open(self) -> LoopHandle:
        self.check_owner()
        if self._state != "running":
            raise RuntimeError(f"cannot schedule new calls: the pool is {self._state}")
        assert self._loop is not None
        return self._loop

    def _call(self, spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Future[Any]:
        if self._lanes and spec.kind is CallKind.UNARY and not _in_event_loop():
            # A plain thread, which will most likely block on the result: straight to a
            # worker through its lane, when one is free (rapace._lane).
            self._check_open()
            future: Future[Any] = Future(self._loop)
            slots = self._slots
            if self._handover or self._inbox:
                slots = []  # calls handed to the loop go first, where they are placed
            elif len(slots) > 1:
                slots = sorted(slots, key=_load)  # the fewest calls in flight first
            for slot in slots:
                lane = slot.lane
                if lane is not None and lane.try_call(spec, args, kwargs, future):
                    return future
        else:
            args, kwargs = self._bridge_stream_argument(spec, args, kwargs)
            future = Future(self._loop)
        aio_loop = self._aio_loop
        if aio_loop is not None and asyncio._get_running_loop() is aio_loop:
            self._check_open()
            remaining = self._remaining_here()

            # On the pool's own loop, awaited at once (``await pool.proxy.f(x)``): the
            # awaiting task makes the call itself, no task of its own and no wake-ups
            # between the two. Not awaited, it starts on the loop's next turn.
            def claim() -> Coroutine[Any, Any, None] | None:
                if future._claim is None or asyncio._get_running_loop() is not aio_loop:
                    return None
                future._claim = None
                placed = self._admit(future)
                if placed is False:
                    return None
                return self._run_call(spec, args, kwargs, future, remaining, placed)

            def start_unclaimed() -> None:
                if future._claim is not None:
                    future._claim = None
                    self._start_call(spec, args, kwargs, future, remaining)

            future._claim = claim
            aio_loop.call_soon(start_unclaimed)
            return future
        remaining = _remaining_time()
        self._run_soon(lambda: self._start_call(spec, args, kwargs, future, remaining))
        return future

    def _call_many(self, spec: MethodSpec, calls: Sequence[tuple[Any, ...]]) -> list[Future[Any]]:
        """Many calls of one method without a stream argument, handed to the pool's loop in
        one go: one wake-up of its thread instead of one per call (map's many parts)."""
        loop = self._loop
        futures: list[Future[Any]] = [Future(loop) for _ in calls]
        remaining = _remaining_time()

        def start_all() -> None:
            for args, future in zip(calls, futures, strict=True):
                self._start_call(spec, args, {}, future, remaining)

        self._run_soon(start_all)
        return futures

    def _bridge_stream_argument(
        self, spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Read an async-iterable stream argument in the caller's loop, not the pool's."""
        stream = spec.stream_param
        loop = self._loop
        if stream is None or loop is None:
            return args, kwargs
        from rapace._bridge import CrossLoopSource, needs_bridge
        from rapace.session import _bind

        values = _bind(spec, args, kwargs)
        index = spec.params.index(stream)
        if not needs_bridge(values[index], loop):
            return args, kwargs
        bridge = CrossLoopSource(values[index], loop)
        bridge.start()
        values[index] = bridge
        return tuple(values), {}

    def _start_call(
        self,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: Future[Any],
        remaining: float | None,
    ) -> None:
        slot = self._admit(future)
        if slot is False:
            return
        aio_loop = self._aio_loop
        if aio_loop is not None:
            # The pool's own asyncio thread: a bare task (in a copy of the context, as a task
            # group would) costs ~4 us where anyio's start_soon costs ~14 (bench_shm_limits).
            # The task is tracked here and awaited before the loop ends.
            task = aio_loop.create_task(self._run_call(spec, args, kwargs, future, remaining, slot))
            self._call_tasks.add(task)
            return
        assert self._task_group is not None
        self._task_group.start_soon(self._run_call, spec, args, kwargs, future, remaining, slot)

    def _admit(self, future: Future[Any]) -> _Slot | Literal[False] | None:
        """Count a call about to run and place it (False: it was cancelled already).

        Placed now, not when its task runs: a call made meanwhile (through a lane, say) sees
        this one in its worker's load.
        """
        if future.cancelled():
            return False
        self._calls += 1
        slot = self._least_loaded()
        if slot is not None:
            slot.in_flight += 1
        return slot

    async def _run_call(
        self,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: Future[Any],
        remaining: float | None,
        placed: _Slot | None,
    ) -> None:
        backend = self._backend
        assert backend is not None
        deadline = math.inf if remaining is None else backend.current_time() + remaining
        started = time.perf_counter()
        scope = self._scope_type(deadline=deadline)
        self._call_scopes.add(scope)
        try:
            with scope:
                loop = self._loop
                assert loop is not None
                future._on_cancel = lambda: loop.call_soon(scope.cancel)
                if future.cancelled():
                    return
                try:
                    given, placed = placed, None  # _call_in_worker gives it back
                    result = await self._call_in_worker(spec, args, kwargs, future, given)
                except Exception as exc:
                    self._stats_errors += 1
                    future._fail(exc)
                else:
                    future._resolve(result)
                    self._latencies.append(time.perf_counter() - started)
            if scope.cancelled_caught and not future.done():
                if self._cancelling_all:
                    future.cancel()
                else:
                    future._fail(
                        TimeoutError(f"{spec.qualified_name}: the caller's deadline passed")
                    )
        finally:
            if placed is not None:
                placed.in_flight -= 1
            self._call_scopes.discard(scope)
            task = asyncio.current_task() if self._aio_loop is not None else None
            if task is not None:
                self._call_tasks.discard(task)
            self._stats_calls += 1
            self._call_ended()

    def _remaining_here(self) -> float | None:
        """_remaining_time() for a task of the pool's own loop, from its backend."""
        backend = self._backend
        assert backend is not None
        deadline = backend.current_effective_deadline()
        if math.isinf(deadline):
            return None
        return max(0.0, deadline - backend.current_time())

    def _count_calls(self, n: int, _: object) -> None:
        self._stats_calls += n

    def _call_ended(self) -> None:
        """Book a finished call; the last one wakes a shutdown waiting for calls in flight."""
        self._calls -= 1
        idle = self._calls_idle
        if not self._calls and idle is not None:
            idle.set()

    async def _pick(self, future: Future[Any] | None) -> _Slot:
        """The ready worker with the fewest calls in flight; waits while none is ready."""
        while True:
            if self._broken is not None:
                raise self._broken
            if self._state != "running" and self._state != "stopping":
                raise RuntimeError("the pool is closed")
            best = self._least_loaded()
            if best is not None:
                return best
            assert self._ready_changed is not None
            if future is not None:
                self._waiting.add(future)
            try:
                await self._ready_changed.wait()
            finally:
                if future is not None:
                    self._waiting.discard(future)

    def check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise RuntimeError(
                f"this pool belongs to process {self._owner}, not to this forked child "
                f"({os.getpid()}): start a pool in the child to use one there"
            )

    def _least_loaded(self) -> _Slot | None:
        best: _Slot | None = None
        for slot in self._slots:
            if slot.state == "ready" and (best is None or slot.load < best.load):
                best = slot
        return best

    async def _call_in_worker(
        self,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: Future[Any] | None,
        placed: _Slot | None = None,
    ) -> Any:
        """Make the call in ``placed`` (whose count of calls in flight includes it already)
        if that worker is still ready, else in the least loaded one once one is."""
        slot = placed
        if slot is None or slot.state != "ready" or slot.session is None:
            if slot is not None:
                slot.in_flight -= 1
            slot = await self._pick(future)
            slot.in_flight += 1
        session, launch = slot.session, slot.launch
        assert session is not None
        assert launch is not None
        try:
            return await session.call(spec, args, kwargs)
        except (Unavailable, ProtocolError) as exc:
            raise await self._crash_error(slot, launch, spec, exc) from None
        finally:
            slot.in_flight -= 1

    async def _crash_error(
        self, slot: _Slot, launch: WorkerLaunch, spec: MethodSpec, error: RapaceError
    ) -> BaseException:
        """The error for a call that lost its session: WorkerCrashed if the worker died."""
        with anyio.move_on_after(CRASH_REPORT_WAIT_S):
            await launch.exited.wait()
        code = launch.exit_code
        if launch.exited.is_set() and (self._state == "running" or code != 0):
            crashed = WorkerCrashed(
                f"worker {slot.index} (pid {launch.pid}) {describe_exit(code)} while running "
                f"{spec.qualified_name}",
                pid=launch.pid,
                exitcode=code,
                method=spec.qualified_name,
            )
            crashed.__cause__ = error
            return crashed
        return error

    def map(
        self,
        method: Callable[..., T],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        ordered: bool = True,
        progress: bool = False,
    ) -> MapResults[T]:
        """Like ``Executor.map``: results in order (or as they finish with ``ordered=False``),
        for ``for`` or ``async for``.

        ``chunksize > 1`` sends that many calls per message; ``progress=True`` shows a
        progress bar (tqdm's, notebook-aware, when installed; else a line on stderr).
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        # Chunks travel by column (see rapace._batch): taken from the iterables as they are,
        # without making a tuple per call and taking them apart again.
        # Other iterables may be endless (itertools.repeat): zip decides where they end.
        by_column = chunksize > 1 and self._options.command is None
        calls: list[tuple[Any, ...]] = []
        if by_column and iterables and all(type(it) in _SEQUENCES for it in iterables):
            columns: Sequence[Sequence[Any]] = cast(tuple[Sequence[Any], ...], iterables)
            count = min(len(column) for column in columns)
        else:
            calls = list(zip(*iterables, strict=False))
            count = len(calls)
            columns = [list(column) for column in zip(*calls, strict=True)] if by_column else []
        bar = None
        if progress:
            from rapace._progress import progress_bar

            bar = progress_bar(count, f"{self._spec.name}.{self._method(method).name}")
        try:
            if by_column:
                # (A plugin program serves its own class, without the batch method.)
                parts, expand = self._submit_chunks(method, columns, count, chunksize)
            else:
                spec = self._method(method)
                if spec.kind.handler_streams:
                    raise TypeError(f"map() takes unary methods; {spec.qualified_name} streams")
                if spec.stream_param is None:
                    parts = self._call_many(spec, calls)
                else:  # a client-streaming method: each stream argument may need a bridge
                    parts = [self.submit(method, *args) for args in calls]
                expand = single
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        return MapResults(parts, expand, ordered=ordered, end=end, progress=bar)

    def _submit_chunks(
        self,
        method: Callable[..., Any],
        columns: Sequence[Sequence[Any]],
        count: int,
        chunksize: int,
    ) -> tuple[list[Future[Any]], Expand]:
        from rapace._batch import batch_codecs
        from rapace.session import _bind, _remote_exception

        spec = self._method(method)
        if spec.kind.handler_streams or spec.kind.caller_streams:
            raise TypeError(f"map() takes unary methods; {spec.qualified_name} streams")
        codec = batch_codecs(spec)
        batch = self._batch_spec()
        if len(columns) != len(spec.params):  # defaults to fill in: bind each call
            bound = [_bind(spec, args, {}) for args in zip(*columns, strict=False)]
            columns = [list(column) for column in zip(*bound, strict=True)] if bound else []
        payloads = []
        sizes = []
        for start in range(0, count, chunksize):
            stop = min(start + chunksize, count)
            chunk = [c[start:stop] if type(c) is list else list(c[start:stop]) for c in columns]
            payloads.append((spec.method_id, codec.encode_columns(stop - start, chunk)))
            sizes.append(stop - start)
        parts = self._call_many(batch, payloads)
        for part, size in zip(parts, sizes, strict=True):
            # The pool counts the message as one call when it ends: count the rest of it.
            part.add_done_callback(functools.partial(self._count_calls, size - 1))

        def expand(value: Any) -> tuple[Sequence[Any], BaseException | None]:
            encoded, error = value
            failure = None
            if error is not None:
                failure = _remote_exception(error)
                self._stats_errors += 1  # the message succeeded; a call in it failed
            return codec.results.decode(encoded), failure

        return parts, expand

    def _batch_spec(self) -> MethodSpec:
        from rapace._batch import BATCH_METHOD, with_batching

        for spec in service_spec(with_batching(self._service)).methods:
            if spec.name == BATCH_METHOD:
                return spec
        raise AssertionError("with_batching always adds the batch method")

    def broadcast(
        self, method: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Future[Any]]:
        """Call ``method`` once in every ready worker."""
        spec = self._method(method)
        self._check_open()
        futures: list[Future[Any]] = []
        for slot in self._slots:
            future: Future[Any] = Future(self._loop)
            futures.append(future)

            def start(slot: _Slot = slot, future: Future[Any] = future) -> None:
                self._calls += 1
                assert self._task_group is not None
                self._task_group.start_soon(self._run_on, slot, spec, args, kwargs, future)

            self._run_soon(start)
        return futures

    async def _run_on(
        self,
        slot: _Slot,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        future: Future[Any],
    ) -> None:
        try:
            with anyio.CancelScope() as scope:
                loop = self._loop
                assert loop is not None
                future._on_cancel = lambda: loop.call_soon(scope.cancel)
                while slot.state != "ready":
                    if self._broken is not None:
                        raise self._broken
                    assert self._ready_changed is not None
                    await self._ready_changed.wait()
                session, launch = slot.session, slot.launch
                assert session is not None
                assert launch is not None
                slot.in_flight += 1
                try:
                    future._resolve(await session.call(spec, args, kwargs))
                except (Unavailable, ProtocolError) as exc:
                    future._fail(await self._crash_error(slot, launch, spec, exc))
                except Exception as exc:
                    future._fail(exc)
                finally:
                    slot.in_flight -= 1
        except Exception as exc:
            future._fail(exc)
        finally:
            self._call_ended()

    # ------------------------------------------------------------------ streams

    def _stream(
        self, spec: MethodSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Stream[Any]:
        loop = self._check_open()
        args, kwargs = self._bridge_stream_argument(spec, args, kwargs)
        stream: Stream[Any] = Stream(loop, spec.qualified_name)
        remaining = _remaining_time()

        def start() -> None:
            self._calls += 1
            assert self._task_group is not None
            self._task_group.start_soon(self._run_stream, spec, args, kwargs, stream, remaining)

        self._run_soon(start)
        return stream

    async def _run_stream(
        self,
        spec: MethodSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        stream: Stream[Any],
        remaining: float | None,
    ) -> None:
        deadline = math.inf if remaining is None else anyio.current_time() + remaining
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                loop = self._loop
                assert loop is not None
                stream._on_close = lambda: scope.cancel()
                if stream._closed:
                    return
                slot = await self._pick(None)
                session, launch = slot.session, slot.launch
                assert session is not None
                assert launch is not None
                slot.in_flight += 1
                try:
                    async with session.stream(spec, args, kwargs) as remote:
                        async for item in remote:
                            if not stream._push(item):
                                resumed = anyio.Event()
                                if stream._set_producer_wake(resumed.set):
                                    await resumed.wait()
                    stream._finish()
                except (Unavailable, ProtocolError) as exc:
                    stream._finish(await self._crash_error(slot, launch, spec, exc))
                except Exception as exc:
                    stream._finish(exc)
                finally:
                    slot.in_flight -= 1
            if scope.cancelled_caught:
                if stream._closed:
                    stream._finish()  # closed by its reader: it just ends, like a generator
                else:
                    stream._finish(TimeoutError(f"{spec.qualified_name}: the deadline passed"))
        except Exception as exc:
            stream._finish(exc)
        finally:
            if not stream._finished:
                stream._finish()
            self._call_ended()

    # ------------------------------------------------------------------ views

    @property
    def proxy(self) -> S:
        """A client typed like the service: unary methods return :class:`rapace.Future`,
        streaming methods :class:`rapace.Stream`."""
        if self._proxy is None:
            self._proxy = _PoolProxy(self)
        return cast(S, self._proxy)

    @property
    def workers(self) -> list[WorkerInfo]:
        return [slot.info() for slot in self._slots]

    def stats(self) -> dict[str, Any]:
        """Counters of this pool: calls, errors, restarts, calls in flight, latency
        percentiles of recent calls (microseconds), and the shared-memory transport's own
        counters (frames, bytes through slots and one-off blocks, ring high-water mark)."""
        latencies = sorted(self._latencies)

        def percentile(q: float) -> float | None:
            if not latencies:
                return None
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6

        transport = collections.Counter(self._retired)
        high_water = transport.pop("ring_high_water", 0)
        with self._stats_lock:
            calls, errors, in_flight = self._stats_calls, self._stats_errors, self._calls
            direct = self._stats_direct
            for slot in self._slots:
                lane = slot.lane_driver
                if lane is not None:
                    calls += lane.calls
                    direct += lane.calls
                    errors += lane.errors
                    in_flight += lane.in_flight
        for slot in self._slots:
            launch = slot.launch
            if launch is None:
                continue
            for link in (launch.transport, launch.lane):
                counters = getattr(link, "stats", None)
                if counters is None:
                    continue
                for name in _TRANSPORT_COUNTERS:
                    transport[name] += getattr(counters, name)
                high_water = max(high_water, counters.ring_high_water)
                transport["blocks_alive"] += getattr(link, "buffer_blocks_alive", 0)
        arena = self.arena.statistics() if self.arena is not None else None
        return {
            "calls": calls,
            # Blocking calls a thread made straight through a worker's lane, not the loop.
            "direct_calls": direct,
            "errors": errors,
            "restarts": sum(slot.restarts for slot in self._slots),
            "in_flight": in_flight,
            "latency_us": {"p50": percentile(0.5), "p90": percentile(0.9), "p99": percentile(0.99)},
            "transport": self._options.transport,
            "frames_sent": transport["frames_sent"],
            "frames_received": transport["frames_received"],
            "bytes_in_slots": transport["bytes_in_slots"],
            "bytes_in_blocks": transport["bytes_in_blocks"],
            "ring_high_water": high_water,
            "bytes_by_reference": transport["bytes_by_reference"],
            # Both ways: what this side copied into blocks and what workers copied for it.
            "bytes_copied": transport["bytes_copied"] + transport["bytes_received_in_blocks"],
            "arrays_made_contiguous": transport["arrays_made_contiguous"],
            "buffers_inlined": transport["buffers_inlined"],
            "blocks_alive": transport["blocks_alive"],
            "arena_bytes_in_use": arena.bytes_in_use if arena else 0,
            "arena_bytes_reserved": arena.bytes_reserved if arena else 0,
        }

    def _repr_html_(self) -> str:
        """A table of the workers, for notebooks."""
        import html

        rows = "".join(
            f"<tr><td>{w.index}</td><td>{w.pid}</td><td>{html.escape(w.state)}</td>"
            f"<td>{w.restarts}</td><td>{w.calls_in_flight}</td></tr>"
            for w in self.workers
        )
        stats = self.stats()
        return (
            f"<div><b>PluginPool</b> {html.escape(self._spec.name)} ({self._state}, "
            f"{html.escape(self._options.transport)}): {stats['calls']} calls, "
            f"{stats['errors']} errors, {stats['restarts']} restarts"
            "<table><tr><th>worker</th><th>pid</th><th>state</th><th>restarts</th>"
            f"<th>in flight</th></tr>{rows}</table></div>"
        )


class PluginPool(Generic[S]):
    """A pool of worker processes, each serving ``service``: ``concurrent.futures`` for plugins.

    Use it with ``with`` (the pool's I/O runs on its own loop thread) or ``async with`` (on the
    caller's loop); see API.md section 2.

    Args:
        service: a ``@rapace.service`` class (or a subclass implementing one).
        workers: how many workers; None means the CPUs available to this process.
        args, kwargs: passed to ``service(...)`` in every worker.
        transport: ``"shm"`` (default; ``"unix"`` where shared memory is unsupported),
            ``"unix"`` or ``"tcp"``.
        command: run this program as each worker instead of ``service`` itself; it calls
            ``rapace.serve(impl)`` to attach (it may live in another environment).
        python: the interpreter for the workers (default: this one).
        env: extra environment variables for the workers.
        max_restarts: consecutive failed starts of a worker before the pool is broken.
        call_timeout: a deadline in seconds for every call (``rapace.DeadlineExceeded``).
        start_timeout: how long a worker may take to become ready, in seconds.
        ring_capacity, slot_classes, spin: shared-memory tuning (see ``rapace.shm``).
        handler_threads: how many plain ``def`` methods a worker runs at once (1, like a
            ``ProcessPoolExecutor`` worker: more threads only fight over the GIL on CPU-bound
            work); ``async def`` methods are never limited. None: anyio's 40 threads, for
            blocking I/O in ``def`` methods.
    """

    def __init__(
        self,
        service: type[S],
        workers: int | None = None,
        *,
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        transport: TransportName = "shm",
        command: Sequence[str] | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        max_restarts: int = 3,
        call_timeout: float | None = None,
        start_timeout: float = 60.0,
        ring_capacity: int | None = None,
        slot_classes: Iterable[tuple[int, int]] | None = None,
        spin: float | None = None,
        handler_threads: int | None = 1,
    ) -> None:
        core: _PoolCore[S] = _PoolCore(
            service,
            workers,
            args=args,
            kwargs=kwargs,
            transport=transport,
            command=command,
            python=python,
            env=env,
            max_restarts=max_restarts,
            call_timeout=call_timeout,
            start_timeout=start_timeout,
            ring_capacity=ring_capacity,
            slot_classes=slot_classes,
            spin=spin,
            handler_threads=handler_threads,
        )
        self._core = core
        # Dropped without shutdown (a notebook cell run again, a forgotten pool): stop it.
        weakref.finalize(self, core.abandon)

    def __repr__(self) -> str:
        return repr(self._core)

    def _repr_html_(self) -> str:
        return self._core._repr_html_()

    def start(self) -> PluginPool[S]:
        """Start the workers on the pool's own loop thread; returns once all are ready.

        Raises:
            rapace.BrokenPluginPool: workers kept failing to start (with their traceback).
        """
        self._core.start()
        return self

    def __enter__(self) -> PluginPool[S]:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._core.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> PluginPool[S]:
        await self._core.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._core.aclose()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the pool like ``Executor.shutdown``: with ``wait``, calls in flight finish
        first; the workers are then stopped (goodbye, terminate, kill, each bounded)."""
        self._core.shutdown(wait, cancel_futures=cancel_futures)

    async def aclose(self, *, wait: bool = True, cancel_futures: bool = False) -> None:
        """``shutdown`` for a pool entered with ``async with`` (or from any loop)."""
        await self._core.aclose(wait=wait, cancel_futures=cancel_futures)

    def submit(self, method: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Call ``method`` (the service's function, e.g. ``Calculator.add``) in a worker and
        return a :class:`rapace.Future` at once."""
        return self._core.submit(method, *args, **kwargs)

    def map(
        self,
        method: Callable[..., T],
        /,
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        ordered: bool = True,
        progress: bool = False,
    ) -> MapResults[T]:
        """Like ``Executor.map``: results in order (or as they finish with ``ordered=False``),
        for ``for`` or ``async for``; ``chunksize > 1`` sends that many calls per message;
        ``progress=True`` shows a bar."""
        return self._core.map(
            method,
            *iterables,
            timeout=timeout,
            chunksize=chunksize,
            ordered=ordered,
            progress=progress,
        )

    def broadcast(
        self, method: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> list[Future[Any]]:
        """Call ``method`` once in every worker."""
        return self._core.broadcast(method, *args, **kwargs)

    @property
    def proxy(self) -> S:
        """A client typed like the service: unary methods return :class:`rapace.Future`,
        streaming methods :class:`rapace.Stream`."""
        return self._core.proxy

    @property
    def workers(self) -> list[WorkerInfo]:
        """Each worker: index, pid, state, restarts, calls in flight, start-up time."""
        return self._core.workers

    def stats(self) -> dict[str, Any]:
        """Counters: calls, errors, restarts, latency percentiles, transport counters, and
        zero-copy traffic (bytes sent by reference and copied, blocks and arena in use)."""
        return self._core.stats()

    # ------------------------------------------------------------------ shared memory

    def empty(self, shape: int | Iterable[int], dtype: Any = float, *, order: str = "C") -> Any:
        """A numpy array in shared memory: passing it, or any slice or view of it, to a call
        sends a reference, not its bytes, and a worker's writes to it are seen here when the
        call returns. Freed when the last view of it dies (it outlives the pool)."""
        self._core.check_owner()
        return arena_empty(self._core.arena, shape, dtype, order)

    def zeros(self, shape: int | Iterable[int], dtype: Any = float, *, order: str = "C") -> Any:
        """Like :meth:`empty`, filled with zeros."""
        self._core.check_owner()
        return arena_zeros(self._core.arena, shape, dtype, order)

    def buffer(self, nbytes: int) -> memoryview:
        """A writable buffer of ``nbytes`` in shared memory (a ``"B"`` memoryview), passed by
        reference like :meth:`empty`'s arrays; numpy is not needed."""
        self._core.check_owner()
        return arena_buffer(self._core.arena, nbytes)


_TRANSPORT_COUNTERS = (
    "frames_sent",
    "frames_received",
    "bytes_in_slots",
    "bytes_in_blocks",
    "bytes_by_reference",
    "bytes_copied",
    "arrays_made_contiguous",
    "buffers_inlined",
    "bytes_received_in_blocks",
)


class _PoolProxy:
    def __init__(self, pool: _PoolCore[Any]) -> None:
        self._pool = pool
        for spec in pool._spec.methods:
            setattr(self, spec.name, _bind(pool, spec))

    def __repr__(self) -> str:
        return f"<rapace pool proxy for {self._pool._spec.name}>"


def _bind(pool: _PoolCore[Any], spec: MethodSpec) -> Callable[..., Any]:
    if spec.kind.handler_streams:

        def stream(*args: Any, **kwargs: Any) -> Stream[Any]:
            return pool._stream(spec, args, kwargs)

        stream.__name__ = stream.__qualname__ = spec.name
        return stream

    def call(*args: Any, **kwargs: Any) -> Future[Any]:
        return pool._call(spec, args, kwargs)

    call.__name__ = call.__qualname__ = spec.name
    return call


def _ships_by_value(cls: type) -> bool:
    """Whether cloudpickle sends ``cls`` by value (it cannot be imported by name)."""
    module = sys.modules.get(cls.__module__)
    if cls.__module__ in ("__main__", "__mp_main__") or module is None:
        return True
    return getattr(module, cls.__qualname__.split(".")[0], None) is None


def _python_version(python: str) -> tuple[int, int] | None:
    import subprocess

    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return int(out[0]), int(out[1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _in_event_loop() -> bool:
    """Cheaply: does an asyncio loop or a trio run drive this thread?"""
    return asyncio._get_running_loop() is not None or current_trio_token() is not None


def _in_task() -> bool:
    try:
        anyio.get_current_task()
    except Exception:
        return False
    return True


def _remaining_time() -> float | None:
    """Seconds left before the calling task's anyio deadline, if it runs in an event loop."""
    if not _in_event_loop():
        return None  # a plain thread: skip anyio's backend detection, which raises there
    try:
        deadline = anyio.current_effective_deadline()
        now = anyio.current_time()
    except Exception:  # no event loop in this thread (sniffio cannot tell which)
        return None
    if math.isinf(deadline):
        return None
    return max(0.0, deadline - now)
