"""Starting, watching and stopping one pool worker process.

A worker is ``python -m rapace.worker`` started with ``subprocess.Popen`` from the pool's loop
thread (never a fork of a threaded host, never a re-run of the user's ``__main__``), with its
fds passed through ``pass_fds``. The host learns of its death at once through a pidfd; the
worker learns of the host's through a pipe only the host holds open, and through the
parent-death signal, which is tied to the spawning thread: the pool's loop thread lives as
long as the pool, so it is the right thread to spawn from.

Start-up is a small protocol on a status pipe: the worker writes ``R`` once its service is
constructed and its end of the link is open, or ``E`` and its traceback if that failed, so a
slow ``__init__`` (loading a model) is not mistaken for a hung handshake.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import anyio

from rapace._bootstrap import ENV_VAR, Bootstrap, write_service_payload
from rapace._output import forward_lines, new_tail
from rapace.shm import LinkOptions, SizeClass, create_link, sweep_owner
from rapace.shm._cleanup import process_start_time
from rapace.shm._liveness import death_pipe, pidfd_open
from rapace.shm._transport import ShmTransport
from rapace.streams._abc import Transport

__all__ = ("StartFailed", "WorkerLaunch", "launch_worker", "stop_process")

#: BLAS/OpenMP thread-count variables a worker gets unless the user set them.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class StartFailed(Exception):
    """A worker died or failed before it was ready; ``text`` is its traceback if it sent one."""

    def __init__(self, message: str, text: str = "") -> None:
        super().__init__(message)
        self.text = text


@dataclass
class WorkerLaunch:
    """A started worker process and the host's ends of everything it was given."""

    process: subprocess.Popen[bytes]
    transport: Transport | None
    pidfd: int | None
    status_fd: int
    death_write_fd: int
    started_at: float
    tcp_listener: Any = None
    lane: ShmTransport | None = None  # the direct lane's link (rapace._lane), shm only
    start_time: int = 0  # the worker's, recorded while it runs: see sweep_owner
    stderr_tail: deque[str] = field(default_factory=new_tail)
    exit_code: int | None = None
    exited: anyio.Event = field(default_factory=anyio.Event)
    output_done: anyio.Event = field(default_factory=anyio.Event)  # both pipes hit EOF
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_ready(self, limit: float) -> None:
        """Wait for the worker's ``R``; then, for TCP, its connection.

        Raises:
            StartFailed: it failed, died or took longer than ``timeout`` seconds.
        """
        data = b""
        with anyio.move_on_after(limit) as scope:
            while True:
                await anyio.wait_readable(self.status_fd)
                chunk = os.read(self.status_fd, 65536)
                if not chunk:
                    break
                data += chunk
                if data == b"R":
                    break
        if scope.cancelled_caught:
            raise StartFailed(f"worker did not start within {limit} s")
        if data == b"R":
            if self.tcp_listener is not None:
                self.transport = await self._accept_tcp(limit)
            return
        text = data[1:].decode("utf-8", "replace") if data.startswith(b"E") else ""
        code = self.process.poll()
        if code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = await anyio.to_thread.run_sync(self.process.wait, 5.0)
        if not text:
            # No traceback of ours (a plugin program failing before it attached): what it
            # printed is the best explanation. Let the forwarder catch up with the pipe.
            with anyio.move_on_after(0.5):
                await self.output_done.wait()
            text = "\n".join(self.stderr_tail)
        raise StartFailed(f"worker exited during start-up ({describe_exit(code)})", text)

    async def _accept_tcp(self, limit: float) -> Transport:
        from rapace.streams._auth import send_greeting
        from rapace.streams._stream_transport import StreamTransport

        listener, token = self.tcp_listener
        with anyio.fail_after(limit):
            stream = await listener.listeners[0].accept()
            try:
                initial = await send_greeting(stream, token)
            except BaseException:
                await stream.aclose()
                raise
        await listener.aclose()
        self.tcp_listener = None
        return StreamTransport(stream, initial=initial)

    async def wait_exit(self) -> int | None:
        """Wait until the process ends (pidfd, or a thread where there is none)."""
        pidfd = self.pidfd
        watched = None
        if pidfd is not None:
            # On a duplicate of our own: another thread may close the launch's fds meanwhile
            # (a second Ctrl-C kills and reaps the workers from the main thread), and epoll
            # forgets a closed fd without a word, which left this wait to run out its time.
            with contextlib.suppress(OSError):
                watched = os.dup(pidfd)
        if watched is not None:
            try:
                with contextlib.suppress(anyio.ClosedResourceError, OSError):
                    await anyio.wait_readable(watched)
            finally:
                os.close(watched)
            return await anyio.to_thread.run_sync(self.process.wait)
        return await anyio.to_thread.run_sync(self.process.wait, abandon_on_cancel=True)

    def close_fds(self) -> None:
        if self._closed:
            return
        self._closed = True
        pidfd, self.pidfd = self.pidfd, None  # its number may be reused from now on
        for fd in (self.status_fd, self.death_write_fd, pidfd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None and not pipe.closed:
                # Wake a forwarder still waiting on it (outside a loop this raises: ignore).
                with contextlib.suppress(Exception):
                    anyio.notify_closing(pipe.fileno())
                with contextlib.suppress(OSError):
                    pipe.close()

    async def forward_output(self, index: int) -> None:
        """Copy the worker's stdout/stderr to the host's until both reach EOF."""
        prefix = f"[worker {index}] "
        try:
            async with anyio.create_task_group() as tg:
                for pipe, name, tail in (
                    (self.process.stdout, "stdout", None),
                    (self.process.stderr, "stderr", self.stderr_tail),
                ):
                    if pipe is not None:
                        os.set_blocking(pipe.fileno(), False)
                        tg.start_soon(forward_lines, pipe.fileno(), name, prefix, tail)
        finally:
            self.output_done.set()


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


#: Where a worker of another interpreter finds the host's own paths, and how it appends them
#: to its sys.path (after its own standard library and packages) before starting.
FALLBACK_VAR = "RAPACE_FALLBACK_PATH"
FALLBACK_BOOT = (
    "import os, runpy, sys; "
    f"sys.path += [p for p in os.environ.pop({FALLBACK_VAR!r}, '').split(os.pathsep) "
    "if p and p not in sys.path]; "
    "runpy.run_module('rapace.worker', run_name='__main__', alter_sys=True)"
)


def worker_environment(
    boot: Bootstrap, extra: Mapping[str, str] | None, workers: int, *, foreign: bool = False
) -> dict[str, str]:
    """The environment of a worker: the host's, plus its import path and thread limits.

    ``foreign``: the worker runs another interpreter (``python=``, ``command=``), which has
    its own standard library and packages; it gets only the host's paths outside the host's
    interpreter (the project, the working directory), or the host's would shadow its own.
    """
    env = dict(os.environ)
    # Workers import what the host imports: its sys.path, first.
    paths = [p for p in sys.path if p]
    if foreign:
        everything = paths
        paths = portable_paths(paths, _interpreter_roots())
        # The rest comes after the worker interpreter's own paths (see FALLBACK_BOOT): what
        # its environment lacks (rapace's dependencies, say) is still found in the host's.
        env[FALLBACK_VAR] = os.pathsep.join(p for p in everything if p not in paths)
    if os.getcwd() not in paths:
        paths.insert(0, os.getcwd())
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join(paths + ([existing] if existing else []))
    try:
        cpus = len(os.sched_getaffinity(0))  # what this process may use, like workers=None
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    threads = str(max(1, cpus // max(1, workers)))
    for name in THREAD_VARIABLES:
        env.setdefault(name, threads)
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    env[ENV_VAR] = boot.to_environment()
    return env


def _is_foreign(python: str | None, command: Sequence[str] | None) -> bool:
    if command is not None:
        return True
    if python is None:
        return False
    # Compare where the interpreters are, not what they resolve to: a venv's python is a
    # link to the base interpreter, but its environment (site-packages) is its own.
    found = shutil.which(python) or python
    return os.path.dirname(os.path.abspath(found)) != os.path.dirname(sys.executable)


def _interpreter_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    with contextlib.suppress(Exception):
        import site

        roots.add(site.getusersitepackages())
    return [os.path.realpath(r) for r in roots if r]


def portable_paths(paths: Sequence[str], roots: Sequence[str]) -> list[str]:
    """``paths`` without those inside any of ``roots`` (an interpreter's own directories)."""
    kept = []
    for path in paths:
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root + os.sep) for root in roots):
            kept.append(path)
    return kept


def lane_link_options(link_options: LinkOptions) -> LinkOptions:
    """A direct lane (rapace._lane) carries up to 64 calls, most of them small: room for
    their frames and small payloads (larger ones take one-off blocks, large buffers the
    buffer blocks, as on any link) makes it 1.5 MiB of /dev/shm instead of the main link's
    5.3."""
    return LinkOptions(ring_capacity=256, classes=LANE_CLASSES, spin=link_options.spin)


#: The slot classes of a direct lane's link.
LANE_CLASSES: Final = (SizeClass(2048, 64), SizeClass(32768, 4), SizeClass(524288, 1))


async def launch_worker(
    *,
    index: int,
    service_payload: bytes,
    transport: str,
    link_options: LinkOptions,
    handler_threads: int | None = None,
    python: str | None,
    env: Mapping[str, str] | None,
    workers: int,
    command: Sequence[str] | None = None,
    backend: str = "asyncio",
) -> WorkerLaunch:
    """Start one worker; the caller waits for :meth:`WorkerLaunch.wait_ready`."""
    to_close: list[int] = []
    host_transport: Transport | None = None
    tcp_listener: Any = None
    status_read, status_write = os.pipe()
    death_read, death_write = death_pipe()
    service_fd = write_service_payload(service_payload)
    to_close += [status_write, death_read, service_fd]
    pass_fds: list[int] = [status_write, death_read, service_fd]
    link = token = ""
    lane: ShmTransport | None = None
    extra: dict[str, Any] = {"spin": link_options.spin, "handler_threads": handler_threads}
    try:
        if transport == "shm":
            shm_transport, offer = create_link(link_options)
            host_transport = shm_transport
            pass_fds += offer.pass_fds
            link = offer.encode()
            lane, lane_offer = create_link(lane_link_options(link_options))
            pass_fds += lane_offer.pass_fds
            extra["lane"] = lane_offer.encode()
        elif transport == "unix":
            from rapace.streams._stream_transport import StreamTransport
            from rapace.streams._unix import UnixByteStream

            host_sock, worker_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            to_close.append(worker_sock.detach())
            pass_fds.append(to_close[-1])
            link = str(to_close[-1])
            host_transport = StreamTransport(UnixByteStream(host_sock))
        elif transport == "tcp":
            import secrets

            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            token = secrets.token_hex(16)
            tcp_listener = (listener, token.encode())
            link = f"tcp://127.0.0.1:{port}"
        else:
            raise ValueError(f"unknown transport {transport!r} (use 'shm', 'unix' or 'tcp')")
        boot = Bootstrap(
            index=index,
            host_pid=os.getpid(),
            death_fd=death_read,
            status_fd=status_write,
            service_fd=service_fd,
            transport=transport,
            link=link,
            token=token,
            backend=backend,
            # The worker spins as the host was told, and runs plain def handlers this many
            # at a time.
            extra=extra,
        )
        foreign = _is_foreign(python, command)
        argv: Sequence[str] = command or (
            [python, "-c", FALLBACK_BOOT]
            if python is not None and foreign
            else [python or sys.executable, "-m", "rapace.worker"]
        )
        started_at = time.monotonic()
        # Spawned here, synchronously, on purpose: the parent-death signal is tied to the
        # spawning thread, and this is the pool's loop thread, which lives as long as it.
        process = subprocess.Popen(  # noqa: ASYNC220
            argv,
            env=worker_environment(boot, env, workers, foreign=foreign),
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Its own session: a terminal's Ctrl-C reaches the host only, which decides.
            start_new_session=True,
        )
    except BaseException:
        for fd in (status_read, death_write, *to_close):
            with contextlib.suppress(OSError):
                os.close(fd)
        if host_transport is not None:
            with anyio.CancelScope(shield=True):
                await host_transport.aclose()
        if lane is not None:
            lane.close_now()
        if tcp_listener is not None:
            await tcp_listener[0].aclose()
        raise
    for fd in to_close:
        os.close(fd)
    if transport == "shm":
        host_transport.unlink_name()  # type: ignore[union-attr]  # the worker holds the fd
        assert lane is not None
        lane.unlink_name()
    pidfd = pidfd_open(process.pid)
    start_time = process_start_time(process.pid) or 0
    if transport == "shm" and pidfd is not None:
        host_transport.watch_peer(pidfd)  # type: ignore[union-attr]
    return WorkerLaunch(
        process=process,
        transport=host_transport,
        pidfd=pidfd,
        status_fd=status_read,
        death_write_fd=death_write,
        started_at=started_at,
        tcp_listener=tcp_listener,
        lane=lane,
        start_time=start_time,
    )


async def stop_process(launch: WorkerLaunch, grace: float) -> int | None:
    """Wait ``grace`` seconds for the worker to exit, then SIGTERM, then SIGKILL; reap it,
    remove any segment it left, and close the host's fds. Returns the exit status."""
    process = launch.process
    with anyio.CancelScope(shield=True):
        for action in (None, process.terminate, process.kill):
            if action is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    action()
            with anyio.move_on_after(grace if action is None else 2.0):
                await launch.wait_exit()
            if process.poll() is not None:
                break
        code = process.poll()
        if code is None:  # unkillable (uninterruptible sleep): reap it in the background
            code = process.wait()
        sweep_owner(process.pid, launch.start_time)
        # The pipes reach EOF once the worker and anything it started are gone; a grandchild
        # holding them open must not hold up the pool.
        with anyio.move_on_after(1.0):
            await launch.output_done.wait()
        launch.close_fds()
        launch.exit_code = code
        launch.exited.set()
        if launch.tcp_listener is not None:
            await launch.tcp_listener[0].aclose()
            launch.tcp_listener = None
    return code
