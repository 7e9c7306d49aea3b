"""The crash matrix: a worker dies at every stage of a call, or the host dies. Each case ends
with the right error, no hang, and (the autouse leak check) no process, fd or segment left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import rapace
from rapace import PluginPool
from rapace.shm._liveness import pidfd_open
from rapace.shm._segment import SHM_DIR, SHM_PREFIX

from .pool_services import Calculator, Fatal, Fragile

ENV = {"RAPACE_TEST_WORKER": "1"}


@pytest.fixture(params=["shm", "unix"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_worker_dies_while_decoding_the_arguments(transport: str) -> None:
    with PluginPool(Fragile, workers=1, env=ENV, transport=transport) as pool:  # type: ignore[arg-type]
        with pytest.raises(rapace.WorkerCrashed) as info:
            pool.submit(Fragile.take, Fatal(armed=True)).result(timeout=20)
        assert info.value.exitcode == 11
        assert pool.submit(Fragile.take, Fatal(armed=False)).result(timeout=20) == 1


def test_worker_dies_while_encoding_the_reply(transport: str) -> None:
    with PluginPool(Fragile, workers=1, env=ENV, transport=transport) as pool:  # type: ignore[arg-type]
        with pytest.raises(rapace.WorkerCrashed) as info:
            pool.submit(Fragile.give).result(timeout=20)
        assert info.value.exitcode == 12
        assert info.value.method == "Fragile.give"


def test_worker_killed_mid_stream(transport: str) -> None:
    with PluginPool(Fragile, workers=1, transport=transport) as pool:  # type: ignore[arg-type]
        pid = pool.submit(Fragile.pid).result(timeout=20)
        stream = pool.proxy.stream(10**9)
        assert next(stream) == 0
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(rapace.WorkerCrashed) as info:
            for _ in stream:
                pass
        assert info.value.exitcode == -signal.SIGKILL
        assert pool.submit(Fragile.pid).result(timeout=20) != pid


def test_worker_killed_during_shutdown_does_not_hang() -> None:
    pool = PluginPool(Calculator, workers=2).start()
    pids = [f.result(timeout=20) for f in pool.broadcast(Calculator.pid)]
    slow = pool.submit(Calculator.sleep, 0.5)
    os.kill(pids[0], signal.SIGKILL)
    pool.shutdown(wait=True)
    assert slow.done()


@pytest.mark.parametrize("transport", ["shm", "unix"])
def test_host_killed_its_workers_exit_and_nothing_remains(tmp_path: Path, transport: str) -> None:
    script = tmp_path / "host.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            import rapace
            from tests.integration.pool_services import Calculator

            pool = rapace.PluginPool(Calculator, workers=2, transport={transport!r}).start()
            pids = [f.result(20) for f in pool.broadcast(Calculator.pid)]
            fut = pool.submit(Calculator.sleep, 60.0)  # a call in flight
            print(*pids, flush=True)
            time.sleep(120)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    host = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert host.stdout is not None
        pids = [int(p) for p in host.stdout.readline().split()]
        assert len(pids) == 2
        watchers = [pidfd_open(pid) for pid in pids]
        try:
            host.kill()
            host.wait(timeout=10)

            async def all_exited() -> None:
                with anyio.fail_after(10):
                    for fd in watchers:
                        if fd is not None:
                            await anyio.wait_readable(fd)

            anyio.run(all_exited)
        finally:
            for fd in watchers:
                if fd is not None:
                    os.close(fd)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(timeout=10)
        if host.stdout is not None:
            host.stdout.close()
    prefixes = [f"{SHM_PREFIX}{pid:x}_" for pid in (host.pid, *pids)]
    assert [n for n in os.listdir(SHM_DIR) if n.startswith(tuple(prefixes))] == []


def test_a_killed_worker_is_reported_as_crashed_however_long_the_host_spins() -> None:
    """A receiver spinning on its ring notices the peer's death as a parked one does: the
    call fails with WorkerCrashed, and the next one goes to the replacement."""
    with PluginPool(Calculator, workers=1, spin=2.0, call_timeout=60) as pool:
        with pytest.raises(rapace.WorkerCrashed) as caught:
            pool.submit(Calculator.die, "kill").result(timeout=30)
        assert caught.value.exitcode == -9
        assert pool.submit(Calculator.add, 1, 1).result(timeout=30) == 2
