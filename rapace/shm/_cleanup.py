"""Finding and removing segments whose owner is gone.

Every rapace segment is named ``rp_<owner pid hex>_...``. A segment is stale when that pid no
longer runs, or (for link segments, whose header records the creator's start time) when the
pid now belongs to a younger process. A survivor that sees its peer die removes every segment
named with the peer's pid at once (:func:`sweep_owner`); ``rapace cleanup`` removes the rest.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from rapace.shm._segment import SHM_DIR, SHM_PREFIX, owner_of, shm_unlink

__all__ = (
    "StaleSegment",
    "find_stale",
    "owner_alive",
    "process_start_time",
    "remove_stale",
    "sweep_owner",
)

_PID_MAX = 1 << 22  # Linux's ceiling (pid_max is at most 4194304)
_START_FIELD = 22  # /proc/<pid>/stat: starttime, in clock ticks since boot
_LINK_HEAD = struct.Struct("<8sIIQIIQ")  # the link header up to the creator's start time
_BLOCK_HEAD = struct.Struct("<8sQIQ")  # the block header
_HEADER_BYTES = max(_LINK_HEAD.size, _BLOCK_HEAD.size)


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its end.
    fields = raw[raw.rindex(b")") + 2 :].split()
    try:
        return int(fields[_START_FIELD - 3])
    except (IndexError, ValueError):
        return None


def owner_alive(pid: int, start_time: int = 0) -> bool:
    """True while ``pid`` runs (and, if ``start_time`` is given, is the same process)."""
    if not 0 < pid <= _PID_MAX:
        return False  # no process can have that pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    if start_time:
        now = process_start_time(pid)
        return now is None or now == start_time
    return True


@dataclass(frozen=True, slots=True)
class StaleSegment:
    name: str
    owner_pid: int
    size: int


def creator_start(name: str) -> int:
    """The start time its creator recorded in segment ``name`` (0 when unknown)."""
    # /dev/shm is world-writable: whatever carries a rapace name may be a directory, a FIFO
    # or a link planted by someone else. Never block on it, never follow it.
    try:
        fd = os.open(SHM_DIR / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0
        raw = os.pread(fd, _HEADER_BYTES, 0)
    except OSError:
        return 0
    finally:
        os.close(fd)
    if len(raw) < _HEADER_BYTES:
        return 0
    if raw[:8] == b"RAPACESM":
        return int(_LINK_HEAD.unpack_from(raw)[-1])
    if raw[:8] in (b"RAPACEBK", b"RAPACEBF", b"RAPACEAR"):
        return int(_BLOCK_HEAD.unpack_from(raw)[-1])
    return 0


def find_stale() -> list[StaleSegment]:
    """Every rapace segment in ``/dev/shm`` whose owner is no longer running."""
    stale = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    for name in sorted(names):
        pid = owner_of(name)
        if pid is None:
            continue
        try:
            info = (SHM_DIR / name).lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue  # not a segment rapace made: not ours to remove
        if owner_alive(pid, creator_start(name)):
            continue
        size = info.st_size
        stale.append(StaleSegment(name, pid, size))
    return stale


def remove_stale() -> list[StaleSegment]:
    """Unlink every stale rapace segment; returns what was removed."""
    return [segment for segment in find_stale() if _unlink(segment.name)]


def sweep_owner(pid: int, start_time: int = 0) -> list[str]:
    """Unlink the segments a dead process left: those named with ``pid``.

    ``pid`` may already belong to a new process. With the dead one's ``start_time`` (taken
    while it ran), only segments recording that start time are removed; without it, nothing
    is removed while some process holds the pid.
    """
    prefix = f"{SHM_PREFIX}{pid:x}_"
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        recorded = creator_start(name)
        if start_time and recorded:
            if recorded != start_time:
                continue  # made by the process that holds the pid now
        elif owner_alive(pid):
            continue
        if _unlink(name):
            removed.append(name)
    return removed


def _unlink(name: str) -> bool:
    try:
        shm_unlink(name)
    except FileNotFoundError:
        return False
    return True
