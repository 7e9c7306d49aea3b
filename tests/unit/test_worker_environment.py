"""What a worker's environment says about imports and threads."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import anyio
import pytest

from rapace._bootstrap import Bootstrap
from rapace._workers import _is_foreign, portable_paths, worker_environment
from rapace.shm import SUPPORTED as SHM_SUPPORTED
from rapace.shm import LinkOffer, LinkOptions, create_link


def test_portable_paths_leave_out_an_interpreters_own_directories() -> None:
    roots = ["/opt/py", "/home/u/.venv"]
    paths = [
        "/opt/py/lib/python3.11",
        "/opt/py/lib/python3.11/site-packages",
        "/opt/pyproject",  # a sibling whose name starts like a root: kept
        "/home/u/.venv/lib/python3.11/site-packages",
        "/home/u/project",
        "/opt/py",
    ]
    assert portable_paths(paths, roots) == ["/opt/pyproject", "/home/u/project"]


def test_which_interpreters_are_foreign(tmp_path: Path) -> None:
    """A venv's python links to its base interpreter, yet its packages are its own: where the
    interpreter is decides, not what it resolves to."""
    venv_bin = tmp_path / "bin"
    venv_bin.mkdir()
    (venv_bin / "python").symlink_to(os.path.realpath(sys.executable))
    assert _is_foreign(str(venv_bin / "python"), None)
    assert not _is_foreign(None, None)
    assert not _is_foreign(sys.executable, None)
    assert not _is_foreign(os.path.join(os.path.dirname(sys.executable), "python3"), None)
    assert _is_foreign(None, ["plugin-program"])


def test_a_foreign_interpreter_gets_no_standard_library_of_the_host() -> None:
    stdlib = os.path.dirname(os.__file__)
    own = worker_environment_paths(foreign=False)
    foreign = worker_environment_paths(foreign=True)
    assert stdlib in own
    assert stdlib not in foreign
    assert os.getcwd() in foreign
    assert set(foreign) <= set(own)


def worker_environment_paths(*, foreign: bool) -> list[str]:
    class _Boot:
        def to_environment(self) -> str:
            return "{}"

    env = worker_environment(_Boot(), None, 1, foreign=foreign)  # type: ignore[arg-type]
    return env["PYTHONPATH"].split(os.pathsep)


def test_thread_variables_follow_the_cpus_this_process_may_use() -> None:
    class _Boot:
        def to_environment(self) -> str:
            return "{}"

    env = worker_environment(_Boot(), None, 1)  # type: ignore[arg-type]
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "OMP_NUM_THREADS" not in os.environ:
        assert env["OMP_NUM_THREADS"] == str(allowed)


@pytest.mark.skipif(not SHM_SUPPORTED, reason="shared memory needs Linux on x86-64")
@pytest.mark.parametrize("spin", [0.0, 50e-6])
def test_the_worker_spins_as_the_host_was_told(spin: float) -> None:
    """``PluginPool(spin=...)`` reaches the worker's end of the link, not only the host's."""
    host, offer = create_link(LinkOptions(spin=spin))
    dup = LinkOffer(
        os.dup(offer.segment_fd), os.dup(offer.doorbell_a_fd), os.dup(offer.doorbell_b_fd), ""
    )
    death_read, death_write = os.pipe()
    boot = Bootstrap(
        index=0,
        host_pid=os.getpid(),
        death_fd=death_read,
        status_fd=-1,
        service_fd=-1,
        transport="shm",
        link=dup.encode(),
        extra={"spin": spin},
    )
    worker = boot.open_transport()
    try:
        assert worker._spin.max_budget == spin
    finally:

        async def close() -> None:
            await worker.aclose()
            await host.aclose()

        anyio.run(close)
        os.close(death_write)
        os.close(death_read)  # the worker watches it; closing it is its owner's job
        for fd in offer.pass_fds:  # what a pool closes once the worker is spawned
            with contextlib.suppress(OSError):  # the doorbells may be the host's own
                os.close(fd)
