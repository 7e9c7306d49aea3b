"""PluginPool in everyday operation, with real processes: a second Ctrl-C during a slow
shutdown, a pool abandoned at interpreter exit, a notebook cell re-run, a plugin program in
another virtual environment, and ``map(..., progress=True)`` with tqdm.

Every wait is bounded (subprocess timeouts, pidfds under ``anyio.fail_after``); nothing
sleeps to synchronise. Workers of a host run as a subprocess are its children, not ours, so
the autouse leak check cannot see them: these tests watch them with pidfds themselves.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import pytest

from rapace import PluginPool
from rapace._bootstrap import ENV_VAR
from rapace.shm._liveness import fd_readable, pidfd_open
from rapace.shm._segment import SHM_DIR, SHM_PREFIX

from .pool_services import Calculator

ROOT = Path(__file__).parents[2]
HOST_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# How long a process may take to do what it was asked (start, exit, answer).
BOUND_S = 10.0


# ---------------------------------------------------------------------------- helpers


class LineReader:
    """Lines from a pipe, each read with a deadline (``readline()`` of a pipe can block
    forever if the other side hangs)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self.seen = b""  # everything read, for failure messages

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self._fd], [], [], max(0.0, left))
            if not readable:
                raise TimeoutError(f"no line within {timeout} s; read so far: {self.seen!r}")
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError(f"the pipe closed; read so far: {self.seen!r}")
            self._buffer += chunk
            self.seen += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@contextlib.contextmanager
def watching(pids: Iterable[int]) -> Iterator[dict[int, int | None]]:
    """A pidfd per pid (None: already gone), closed on exit."""
    fds = {pid: pidfd_open(pid) for pid in pids}
    try:
        yield fds
    finally:
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def wait_all_exited(fds: Iterable[int | None], timeout: float = BOUND_S) -> None:
    """Return once every pidfd is readable (its process exited); TimeoutError otherwise."""

    async def main() -> None:
        with anyio.fail_after(timeout):
            for fd in fds:
                if fd is not None:
                    await anyio.wait_readable(fd)

    anyio.run(main)


def segments_of(pids: Iterable[int]) -> list[str]:
    prefixes = tuple(f"{SHM_PREFIX}{pid:x}_" for pid in pids)
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefixes))


def workers_of_host(host_pid: int) -> list[int]:
    """Every live process started as a worker of ``host_pid`` (its bootstrap names the host),
    wherever it was reparented: catches a worker the host started and never stopped."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        for item in environ.split(b"\0"):
            name, _, value = item.partition(b"=")
            if name != ENV_VAR.encode():
                continue
            with contextlib.suppress(ValueError, AttributeError):
                if json.loads(value).get("host_pid") == host_pid:
                    found.append(int(entry))
    return found


def assert_host_left_nothing(host_pid: int, worker_pids: list[int]) -> None:
    """The host has exited: its workers (and any replacement it started) exit within the
    bound, and no segment named after the host or a worker remains."""
    with watching(worker_pids) as fds:
        wait_all_exited(fds.values())
    with watching(workers_of_host(host_pid)) as strays:
        try:
            wait_all_exited(strays.values())
        except TimeoutError:
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            message = f"workers of host {host_pid} outlived it: {list(strays)}"
            raise AssertionError(message) from None
    assert segments_of([host_pid, *worker_pids]) == []


def stop_host(host: subprocess.Popen[bytes]) -> None:
    if host.poll() is None:
        host.kill()
        host.wait(timeout=BOUND_S)
    for pipe in (host.stdout, host.stderr):
        if pipe is not None:
            pipe.close()


def write_script(path: Path, source: str) -> Path:
    path.write_text(textwrap.dedent(source))
    return path


# ---------------------------------------------------------------------------- Ctrl-C twice

SLOW_SHUTDOWN_HOST = """
import json
import sys
import threading
import rapace
from tests.integration.pool_services import Calculator


def announce_the_wait(frame, event, arg):
    # Profiles the main thread once the first Ctrl-C was handled: fires as shutdown()
    # starts waiting for the pool's loop, so a SIGINT from then on is the second Ctrl-C
    # that shutdown() itself handles.
    if (
        event == "call"
        and frame.f_code.co_name == "wait"
        and frame.f_back is not None
        and frame.f_back.f_code.co_name == "shutdown"
    ):
        sys.setprofile(None)
        print("waiting", flush=True)


with rapace.PluginPool(Calculator, workers=2) as pool:
    loop_threads = [t for t in threading.enumerate() if t.name.startswith("rapace-pool-")]
    pids = [f.result(30) for f in pool.broadcast(Calculator.pid)]
    long_call = pool.submit(Calculator.sleep, 60.0)
    try:
        print(*pids, flush=True)
        long_call.result(90)
    except KeyboardInterrupt:
        print("first", flush=True)
        sys.setprofile(announce_the_wait)
        try:
            pool.shutdown(wait=True)  # waits for the 60 s call, unless interrupted
        except KeyboardInterrupt:
            # The second Ctrl-C: shutdown() killed the workers and re-raises. The pool is
            # done with them: its loop thread ends (bounded: a still-running thread shows
            # the pool still supervising, and restarting, killed workers).
            for thread in loop_threads:
                thread.join(3)
            status = {
                "loop_threads": len(loop_threads),
                "alive": sum(t.is_alive() for t in loop_threads),
                "restarts": sum(w.restarts for w in pool.workers),
            }
            print(json.dumps(status), flush=True)
            raise
    print("not reached", flush=True)
"""


def test_a_second_ctrl_c_during_a_slow_shutdown_exits_at_once(tmp_path: Path) -> None:
    script = write_script(tmp_path / "host.py", SLOW_SHUTDOWN_HOST)
    with (tmp_path / "stderr").open("w+b") as stderr:
        host = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=stderr, env=HOST_ENV
        )
        try:
            assert host.stdout is not None
            lines = LineReader(host.stdout.fileno())
            pids = [int(p) for p in lines.readline(timeout=60).split()]
            assert len(pids) == 2
            with watching(pids) as fds:
                host.send_signal(signal.SIGINT)  # blocked on the long call: the first Ctrl-C
                assert lines.readline(timeout=BOUND_S) == "first"
                assert lines.readline(timeout=BOUND_S) == "waiting"
                # shutdown(wait=True) now waits for a call with ~60 s to go
                assert all(fd is None or not fd_readable(fd) for fd in fds.values())
                interrupted = time.monotonic()
                host.send_signal(signal.SIGINT)  # the second Ctrl-C
                status = json.loads(lines.readline(timeout=BOUND_S))
                host.wait(timeout=BOUND_S)
                took = time.monotonic() - interrupted
                wait_all_exited(fds.values())
            stderr.seek(0)
            err = stderr.read().decode(errors="replace")
            assert host.returncode == -signal.SIGINT, err
            assert "pool.shutdown(wait=True)" in err  # the second one interrupted shutdown()
            assert b"not reached" not in lines.seen
            assert status == {"loop_threads": 1, "alive": 0, "restarts": 0}
            # At once: not after the pool's 5 s grace for calls in flight, nor the call's 60 s.
            assert took < 4.0
        finally:
            stop_host(host)
    assert_host_left_nothing(host.pid, pids)


# ---------------------------------------------------------------------------- interpreter exit

ABANDONING_HOST = """
import rapace
from tests.integration.pool_services import Calculator

pool = rapace.PluginPool(Calculator, workers=2).start()
assert pool.submit(Calculator.add, 1, 2).result(30) == 3
print(*[f.result(30) for f in pool.broadcast(Calculator.pid)], flush=True)
"""


def test_a_pool_abandoned_at_interpreter_exit_stops_quietly(tmp_path: Path) -> None:
    script = write_script(tmp_path / "host.py", ABANDONING_HOST)
    host = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=HOST_ENV,
    )
    try:
        assert host.stdout is not None
        line = LineReader(host.stdout.fileno()).readline(timeout=60)
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2
        # Opened before the host's exit could reap them (None: already reaped and gone).
        with watching(pids) as fds:
            out, err = host.communicate(timeout=BOUND_S)
            wait_all_exited(fds.values())
        assert host.returncode == 0, err.decode(errors="replace")
        assert err.decode(errors="replace") == ""
        assert out == b""  # nothing after the pids
    finally:
        stop_host(host)
    assert_host_left_nothing(host.pid, pids)


# ---------------------------------------------------------------------------- notebook re-run


def test_rerunning_a_notebook_cell_stops_the_previous_pools() -> None:
    """``pool = PluginPool(...).start()`` run three times, as a cell run again: the first
    two pools are dropped and their workers exit; the last one keeps working."""
    threads_before = set(threading.enumerate())
    pool_threads: set[threading.Thread] = set()
    watchers: list[dict[int, int | None]] = []
    pool: PluginPool[Calculator] | None = None
    try:
        for _ in range(3):
            pool = PluginPool(Calculator, workers=2).start()  # drops the previous one
            pool_threads |= {
                t
                for t in set(threading.enumerate()) - threads_before
                if t.name.startswith("rapace-pool-")
            }
            assert pool.submit(Calculator.add, 1, 2).result(timeout=20) == 3
            pids = [f.result(timeout=20) for f in pool.broadcast(Calculator.pid)]
            watchers.append({pid: pidfd_open(pid) for pid in pids})
        gc.collect()
        assert pool is not None
        *dropped, last = watchers
        wait_all_exited([fd for fds in dropped for fd in fds.values()])
        assert all(fd is not None and not fd_readable(fd) for fd in last.values())
        assert pool.submit(Calculator.add, 2, 3).result(timeout=20) == 5
        assert {f.result(timeout=20) for f in pool.broadcast(Calculator.pid)} == set(last)
        pool.shutdown(wait=True)
        wait_all_exited(last.values())
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        # The dropped pools finish their clean-up in their own threads: join them (and any
        # other thread the pools started) so the leak check sees their fds closed.
        new_threads = pool_threads | (set(threading.enumerate()) - threads_before)
        deadline = time.monotonic() + BOUND_S
        for thread in new_threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for fds in watchers:
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
    assert len(pool_threads) == 3  # one loop thread per pool
    assert [t.name for t in new_threads if t.is_alive()] == []


# ---------------------------------------------------------------------------- another venv

VENV_PLUGIN = """
import sys
import rapace
from tests.integration.pool_services import Calculator


class CalculatorImpl(Calculator):
    async def add(self, a: int, b: int) -> int:
        return a + b + 1000

    def environment(self, name: str) -> str | None:
        if name in ("sys.prefix", "sys.executable"):
            return getattr(sys, name.partition(".")[2])
        return super().environment(name)


if __name__ == "__main__":
    rapace.serve(CalculatorImpl())
"""


def test_a_plugin_program_in_another_virtual_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(venv)],
            capture_output=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot create a virtual environment: {exc}")
    venv_python = venv / "bin" / "python"
    # "Install" rapace and its dependencies in the plugin's environment by pointing a .pth
    # file at the host's: the host's own interpreter paths are not inherited (they would
    # shadow the plugin environment's packages), only the project's (the test services).
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = venv / "lib" / version / "site-packages"
    host_site = [p for p in sys.path if p.endswith("site-packages")]
    (site_packages / "host_packages.pth").write_text("\n".join(host_site) + "\n")
    program = write_script(tmp_path / "calc_plugin.py", VENV_PLUGIN)
    with PluginPool(Calculator, command=[str(venv_python), str(program)], workers=1) as pool:
        assert pool.submit(Calculator.add, 2, 3).result(timeout=30) == 1005
        prefix = pool.submit(Calculator.environment, "sys.prefix").result(timeout=30)
        executable = pool.submit(Calculator.environment, "sys.executable").result(timeout=30)
        worker = pool.submit(Calculator.pid).result(timeout=30)
    assert prefix is not None
    assert Path(prefix).resolve() == venv.resolve()
    assert prefix != sys.prefix
    assert executable == str(venv_python)
    assert worker != os.getpid()


# ---------------------------------------------------------------------------- progress bar


class FakeBar:
    """Records what ``pool.map(..., progress=True)`` does with a ``tqdm.auto.tqdm``."""

    bars: ClassVar[list[FakeBar]] = []

    def __init__(self, *args: Any, total: int | None = None, **kwargs: Any) -> None:
        self.total = total
        self.kwargs = kwargs
        self.updates: list[int] = []
        self.closed = False
        FakeBar.bars.append(self)

    def update(self, n: int = 1) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> FakeBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def test_map_with_a_tqdm_progress_bar(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = types.ModuleType("tqdm")
    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeBar  # type: ignore[attr-defined]
    package.auto = auto  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tqdm", package)
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    monkeypatch.setattr(FakeBar, "bars", [])
    xs = list(range(40))
    expected = [2 * x for x in xs]
    with PluginPool(Calculator, workers=2) as pool:
        assert list(pool.map(Calculator.add, xs, xs, progress=True)) == expected
        assert list(pool.map(Calculator.add, xs, xs, progress=True, chunksize=8)) == expected
        unordered = pool.map(Calculator.add, xs, xs, progress=True, ordered=False)
        assert sorted(unordered) == expected

        async def in_a_loop() -> list[int]:
            results = pool.map(Calculator.add, xs, xs, progress=True, chunksize=4)
            return [r async for r in results]

        assert anyio.run(in_a_loop) == expected  # async use draws the same bar
    assert len(FakeBar.bars) == 4
    for bar in FakeBar.bars:
        assert bar.total == len(xs)
        assert bar.updates == [1] * len(xs)
        assert bar.closed
        assert bar.kwargs.get("desc") == "Calculator.add"
    assert capsys.readouterr().err == ""  # tqdm drew the bar, not the plain fallback
