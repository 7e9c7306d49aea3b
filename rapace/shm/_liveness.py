"""Knowing at once when the other process is gone.

Host side: a pidfd (``os.pidfd_open``) turns readable the moment the worker exits, with no
polling and no SIGCHLD handler. Worker side: an inherited pipe whose only writer is the host
reaches EOF when the host dies, however it dies; ``PR_SET_PDEATHSIG`` adds a signal for the
case where the worker is blocked in code that never looks at the pipe. The signal is tied to
the *thread* that spawned the worker, so pools spawn from a thread that lives as long as the
pool, and the worker checks ``getppid()`` after arming it (the parent may already be gone).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
from typing import Final

__all__ = (
    "arm_parent_death_signal",
    "death_pipe",
    "fd_readable",
    "pidfd_open",
)

_PR_SET_PDEATHSIG: Final = 1


def pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where the kernel has none."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    os.set_inheritable(fd, False)
    return fd


def death_pipe() -> tuple[int, int]:
    """``(read_end, write_end)``: the child inherits the read end, the host keeps the write
    end open and never writes; EOF on the read end means the host is gone."""
    return os.pipe()


def fd_readable(fd: int) -> bool:
    """True when ``fd`` is readable now (a pidfd fired, or a death pipe hit EOF)."""
    readable, _, _ = select.select([fd], [], [], 0)
    return bool(readable)


def arm_parent_death_signal(sig: int = signal.SIGTERM, *, expected_parent: int) -> bool:
    """Ask Linux to send ``sig`` when the parent dies; False when unsupported.

    Returns False as well when the parent is already not ``expected_parent`` (it died
    before the signal was armed), so the caller can act on that at once.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    return os.getppid() == expected_parent
