"""A pool worker: ``python -m rapace.worker``, started by :class:`rapace.PluginPool`.

Everything it needs arrives from its host (``rapace._bootstrap``): how to reach the host
(inherited fds of a shared-memory link or a Unix socket, or a TCP address and token), the
service class and constructor arguments (cloudpickled into an inherited memfd: by reference for
importable classes, by value for classes defined in ``__main__`` or a notebook), the host's
pid, a pipe whose EOF means the host died, and a pipe for a start-up traceback.

The worker builds the service first and only then opens its session: the Hello it sends is
the host's signal that this worker is ready. A failure before that is written to the status
pipe, so the host can show the user the worker's own traceback.

The worker ignores SIGINT (Ctrl-C in a terminal reaches the whole process group; the host
decides what stops) and exits on its own when the host goes away: its session ends (the death
pipe or the peer's close), or the parent-death signal arrives; either way it removes whatever
shared memory the dead host left.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import anyio

__all__ = ("main",)

# Exit codes the host understands (anything else is a crash).
EXIT_OK = 0
# How long a SIGTERMed worker waits to learn whether its host died (see _host_gone).
_DEATH_GRACE_S = 0.5
EXIT_START_FAILED = 3

_host_start = 0


def main() -> NoReturn:
    """``python -m rapace.worker``: build the service the host shipped and serve it."""
    boot = _prepare()

    def build() -> object:
        from rapace._batch import with_batching

        service, args, kwargs = boot.load_service()
        return with_batching(service)(*args, **kwargs)

    run(boot, build)


def serve_from_host(impl: object) -> NoReturn:
    """``rapace.serve(impl)`` in a plugin program a pool started with ``command=[...]``."""
    run(_prepare(), lambda: impl)


def _prepare() -> Any:
    from rapace._bootstrap import Bootstrap
    from rapace.shm._cleanup import process_start_time

    boot = Bootstrap.from_environment()
    global _host_start
    _host_start = process_start_time(boot.host_pid) or 0  # while the host surely runs
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_host(boot.host_pid, boot.death_fd)
    return boot


def run(boot: Any, build: Any) -> NoReturn:
    """Build the service, attach, say ready, serve until the host goes; then exit."""
    try:
        impl = build()
        transport = boot.open_transport()
        lane = boot.open_lane()
    except BaseException:
        _report_start_failure(boot.status_fd)
        _exit(boot, EXIT_START_FAILED)
    _write_all(boot.status_fd, b"R")
    os.close(boot.status_fd)
    code = EXIT_OK
    try:
        import anyio

        threads = boot.extra.get("handler_threads")
        anyio.run(_serve, impl, transport, threads, lane, backend=boot.backend)
    except SystemExit:  # the parent-death signal: the host is gone
        pass
    except BaseException:  # an unexpected crash of the session itself: say so, exit non-zero
        traceback.print_exc()
        code = 1
    _exit(boot, code)


async def _serve(
    impl: object, transport: Any, handler_threads: int | None = None, lane: Any = None
) -> None:
    import anyio

    from rapace._bootstrap import _LazyTcp
    from rapace.session import open_session
    from rapace.wire import Role

    if isinstance(transport, _LazyTcp):
        from rapace.streams._net import connect_transport

        transport = await connect_transport(transport.url, token=transport.token)
    # One limit on def handlers for both links.
    limiter = anyio.CapacityLimiter(handler_threads) if handler_threads is not None else None
    async with (
        open_session(transport, role=Role.ACCEPTOR, serve=impl, thread_limiter=limiter) as session,
        anyio.create_task_group() as tg,
    ):
        if lane is not None:
            tg.start_soon(_serve_lane, impl, lane, limiter)
        await session.wait_closed()
        tg.cancel_scope.cancel()


async def _serve_lane(impl: object, lane: Any, limiter: anyio.CapacityLimiter | None) -> None:
    """The host's blocking callers' own link (rapace._lane): served like the main one,
    but its end, for whatever reason, is not the worker's."""
    from rapace.session import open_session
    from rapace.wire import Role

    try:
        async with open_session(
            lane, role=Role.ACCEPTOR, serve=impl, thread_limiter=limiter
        ) as session:
            await session.wait_closed()
    except Exception:  # the main link decides when this worker ends
        traceback.print_exc()


def _report_start_failure(status_fd: int) -> None:
    _write_all(status_fd, b"E" + traceback.format_exc().encode("utf-8", "replace"))
    os.close(status_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        pass  # the host is gone: nobody to tell


def _watch_host(host_pid: int, death_fd: int) -> None:
    """Arm the parent-death signal; exit now if the host is already gone."""
    from rapace.shm._liveness import arm_parent_death_signal

    def on_host_death(signum: int, frame: FrameType | None) -> None:
        # SIGTERM: the host died (parent-death signal) or is stopping this worker. Either
        # way leave now and quietly, from here: unwinding the event loop would print.
        if _host_gone(host_pid, death_fd):
            _cleanup_after_host(host_pid)
        os._exit(EXIT_OK)

    signal.signal(signal.SIGTERM, on_host_death)
    if (
        not arm_parent_death_signal(signal.SIGTERM, expected_parent=host_pid)
        and os.getppid() != host_pid
    ):
        _cleanup_after_host(host_pid)
        os._exit(EXIT_OK)


def _host_gone(host_pid: int, death_fd: int) -> bool:
    """Whether the SIGTERM came from the host's death rather than from the host.

    The parent-death signal fires when the *thread* that started us exits: during a SIGKILL
    of the host its other threads may still be exiting, so we are not reparented yet and
    ``getppid()`` still says the host. Its death pipe reaches EOF once every thread is gone:
    wait for that, briefly (a host that is alive and stopping us keeps the pipe open).
    """
    if os.getppid() != host_pid:
        return True
    try:
        readable, _, _ = select.select([death_fd], [], [], _DEATH_GRACE_S)
    except (OSError, ValueError):
        return False
    return bool(readable)


def _cleanup_after_host(host_pid: int) -> None:
    from rapace.shm import sweep_owner

    sweep_owner(host_pid, _host_start)


def _exit(boot: Any, code: int) -> NoReturn:
    from rapace.shm._liveness import fd_readable

    if fd_readable(boot.death_fd):  # EOF: the host is gone, remove what it left
        _cleanup_after_host(boot.host_pid)
    sys.stdout.flush()
    sys.stderr.flush()
    # Handler threads of plain def methods may still run: do not wait for them.
    os._exit(code)


if __name__ == "__main__":
    main()
