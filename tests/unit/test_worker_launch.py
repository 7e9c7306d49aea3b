"""WorkerLaunch, the host's handle on one worker process: waiting for its exit while another
thread kills it and closes the handle's fds (what a second Ctrl-C does)."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import pytest

from rapace._workers import WorkerLaunch

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_wait_exit_returns_when_another_thread_closed_the_pidfd() -> None:
    """epoll drops a closed fd without waking its waiter: the wait must not hang on it (it
    used to run out the pool's 5 s stop grace, and a Ctrl-C test failed now and then)."""
    process = subprocess.Popen(  # noqa: ASYNC220  # a spawn, not a wait
        [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    status_read, death_write = os.pipe()
    launch = WorkerLaunch(
        process=process,
        transport=None,
        pidfd=os.pidfd_open(process.pid),
        status_fd=status_read,
        death_write_fd=death_write,
        started_at=0.0,
    )
    codes: list[int | None] = []
    try:
        async with anyio.create_task_group() as tg:

            async def wait() -> None:
                codes.append(await launch.wait_exit())

            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()  # the wait is registered with the loop

            def close_and_kill() -> None:
                # A second Ctrl-C kills, reaps and closes from the main thread; when the loop
                # thread does not get to run in between, the close comes first for it.
                launch.close_fds()
                process.kill()
                process.wait()

            await anyio.to_thread.run_sync(close_and_kill)
            with anyio.fail_after(5):
                while not codes:
                    await anyio.wait_all_tasks_blocked()
                    await anyio.lowlevel.checkpoint()
    finally:
        process.kill()
        process.wait()
        launch.close_fds()
    assert codes == [process.returncode]
