"""Shared fixtures: every test is checked for leaked child processes, fds and segments.

The check is autouse so that a test cannot forget it: a test that leaves a child process,
an open file descriptor or a rapace ``/dev/shm`` segment behind fails, naming what it left.
Waiting for a child to exit uses a pidfd with a bounded timeout, never a sleep.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rapace.shm._cleanup import owner_alive
from rapace.shm._segment import owner_of

pytest_plugins = ["pytester"]

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIXES = ("rapace", "rp-", "rp_")
# How long a child may take to exit after its test ends (the checker's own tests shorten it).
CHILD_EXIT_GRACE_S = float(os.environ.get("RAPACE_TEST_CHILD_GRACE_S", "5"))


@dataclass(frozen=True)
class Snapshot:
    children: frozenset[int]
    fds: dict[int, str]
    segments: frozenset[str]


def _children_of(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (transitively), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # the process exited while we looked
            continue
        # The command name may contain spaces and parentheses: the fields after it are
        # found from the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        state, ppid = fields[0], int(fields[1])
        if state != "Z":
            parents.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def _open_fds() -> dict[int, str]:
    fds: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd of the listdir itself, already closed
            continue
    return fds


def _segments() -> frozenset[str]:
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return frozenset()
    return frozenset(n for n in names if n.startswith(SEGMENT_PREFIXES) and _maybe_ours(n))


def _maybe_ours(name: str) -> bool:
    """False for a rapace segment of another running process: /dev/shm is shared, and a test
    run beside this one (another checkout, a benchmark) must not count as this test's leak.
    A segment of this process, of a dead one (a killed worker) or of no pid still counts."""
    pid = owner_of(name)
    if pid is None or pid == os.getpid():
        return True
    return not owner_alive(pid) or _is_descendant(pid)


def _is_descendant(pid: int) -> bool:
    try:
        return pid in _children_of(os.getpid())
    except OSError:
        return False


def take_snapshot() -> Snapshot:
    return Snapshot(frozenset(_children_of(os.getpid())), _open_fds(), _segments())


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """True if ``pid`` exits within ``timeout`` seconds (or is already gone)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


def find_leaks(before: Snapshot) -> list[str]:
    """What exists now that did not exist in ``before``; leaked children are killed so one
    test's leak does not cascade into the next."""
    gc.collect()  # objects that close their fds in __del__ get their chance first
    problems: list[str] = []
    for pid in sorted(_children_of(os.getpid()) - before.children):
        if _wait_for_exit(pid, CHILD_EXIT_GRACE_S):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmdline = "?"
        problems.append(f"child process {pid} still running: {cmdline.strip()}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    now_fds = _open_fds()
    for fd, target in sorted(now_fds.items()):
        if before.fds.get(fd) != target:
            problems.append(f"fd {fd} left open: {target}")
    for name in sorted(_segments() - before.segments):
        problems.append(f"shared-memory segment left behind: {SHM_DIR / name}")
        (SHM_DIR / name).unlink(missing_ok=True)
    return problems


@pytest.fixture(autouse=True)
def leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a child process, an fd or a /dev/shm segment behind."""
    if request.node.get_closest_marker("no_leakcheck"):
        yield
        return
    before = take_snapshot()
    yield
    problems = find_leaks(before)
    if problems:
        pytest.fail("test leaked resources:\n  " + "\n  ".join(problems), pytrace=False)
