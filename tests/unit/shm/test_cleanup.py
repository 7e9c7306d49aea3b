"""Finding and removing segments whose owner is gone (``rapace.shm._cleanup``).

Other test processes may be using ``/dev/shm`` at the same time, so the tests that list it
see only the entries they made (:func:`only_ours`): ``remove_stale`` here never removes a
segment another process is still checking. Tests about odd entries (directories, FIFOs,
impossible pids) point the module at a private directory instead of ``/dev/shm``.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rapace.shm import _cleanup
from rapace.shm._cleanup import (
    StaleSegment,
    find_stale,
    owner_alive,
    process_start_time,
    remove_stale,
    sweep_owner,
)
from rapace.shm._layout import LinkLayout, write_header
from rapace.shm._segment import SHM_DIR, Segment, segment_name
from rapace.shm._slots import SizeClass

WAIT_S = 10.0


@pytest.fixture
def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        child.wait(timeout=WAIT_S)
    finally:
        if child.returncode is None:
            child.kill()
            child.wait(timeout=WAIT_S)
    assert process_start_time(child.pid) is None, "pid reused already"
    return child.pid


@pytest.fixture
def segments() -> Iterator[list[Segment]]:
    """Segments a test makes; each is unlinked and closed afterwards, whatever happened."""
    made: list[Segment] = []
    yield made
    for segment in made:
        segment.unlink()
        segment.close()


class _OnlyOurs:
    """``os`` for the cleanup module, except that listing ``/dev/shm`` shows only ``names``."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def listdir(self, path: Any) -> list[str]:
        listed = os.listdir(path)
        if Path(path) == SHM_DIR:
            return [n for n in listed if n in self.names]
        return listed

    def __getattr__(self, attr: str) -> Any:
        return getattr(os, attr)


@pytest.fixture
def only_ours(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Names the cleanup functions may see in /dev/shm; add a segment's name to expose it."""
    names: set[str] = set()
    monkeypatch.setattr(_cleanup, "os", _OnlyOurs(names))
    return names


@pytest.fixture
def make(segments: list[Segment], only_ours: set[str]) -> Callable[..., Segment]:
    def make(name: str, size: int = 4096) -> Segment:
        segment = Segment.create(size, name=name)
        segments.append(segment)
        only_ours.add(name)
        return segment

    return make


@pytest.fixture
def private_shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point find_stale at a private directory, for entries that must not appear in the
    real /dev/shm while other processes scan it."""
    monkeypatch.setattr(_cleanup, "SHM_DIR", tmp_path)
    return tmp_path


def write_link_header(segment: Segment, *, creator_pid: int, creator_start: int) -> None:
    layout = LinkLayout.compute(4, (SizeClass(64, 1),))
    assert layout.total_size <= segment.size
    write_header(
        segment.buffer,
        layout,
        creator_pid=creator_pid,
        creator_start=creator_start,
        token="abcd1234",
    )


# -------------------------------------------------------------------- process identity


def test_process_start_time_of_self_and_of_the_dead(dead_pid: int) -> None:
    """This process has a stable integer start time, not later than now; an exited pid has
    none, nor has a pid that cannot exist."""
    own = process_start_time(os.getpid())
    assert isinstance(own, int)
    assert own == process_start_time(os.getpid())
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    assert 0 <= own <= uptime_s * os.sysconf("SC_CLK_TCK") + 1
    assert process_start_time(dead_pid) is None
    assert process_start_time(2**40) is None
    assert process_start_time(0) is None


def test_process_start_time_survives_odd_command_names() -> None:
    """A process whose command name holds spaces and parentheses still gets its real start
    time (no earlier than ours, no later than now)."""
    odd = "a) 1 2 (b) c"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; open('/proc/self/comm', 'w').write(sys.argv[1]); "
            "print('ready', flush=True); sys.stdin.read()",
            odd,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], WAIT_S)
        assert ready, "the child did not start"
        assert child.stdout.readline() == b"ready\n"
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == odd
        started = process_start_time(child.pid)
        own = process_start_time(os.getpid())
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        assert isinstance(started, int)
        assert own is not None
        assert own <= started <= uptime_s * os.sysconf("SC_CLK_TCK") + 1
        assert owner_alive(child.pid, started)
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=WAIT_S)
        finally:
            if child.returncode is None:
                child.kill()
                child.wait(timeout=WAIT_S)
            child.stdout.close()


def test_owner_alive(dead_pid: int) -> None:
    """A running pid is alive, and the same process if its start time matches; a dead pid,
    pid 0 and negative pids are not."""
    me = os.getpid()
    started = process_start_time(me)
    assert started is not None
    assert owner_alive(me)
    assert owner_alive(me, started)
    assert not owner_alive(me, started + 1)
    assert not owner_alive(dead_pid)
    assert not owner_alive(dead_pid, started)
    assert not owner_alive(0)
    assert not owner_alive(-1)
    assert owner_alive(1)  # init: alive even if it belongs to someone else


# -------------------------------------------------------------------- stale segments


def test_a_dead_owners_segment_is_found_and_removed(
    dead_pid: int, make: Callable[..., Segment]
) -> None:
    """A segment named with an exited pid is reported with its owner and size, and
    remove_stale unlinks it (and reports it) exactly once."""
    segment = make(segment_name(dead_pid), size=12_288)
    name = segment.name
    assert name is not None
    expected = StaleSegment(name, dead_pid, 12_288)
    assert find_stale() == [expected]
    assert (SHM_DIR / name).exists()  # finding removes nothing
    assert remove_stale() == [expected]
    assert not (SHM_DIR / name).exists()
    assert find_stale() == []
    assert remove_stale() == []
    segment.buffer[0] = 1  # the mapping outlives the name


def test_a_live_owners_segment_is_not_stale(make: Callable[..., Segment]) -> None:
    """Segments of this (running) process, plain or with a matching link header, are never
    reported or removed."""
    plain = make(segment_name())
    link = make(segment_name())
    started = process_start_time(os.getpid())
    assert started is not None
    write_link_header(link, creator_pid=os.getpid(), creator_start=started)
    assert find_stale() == []
    assert remove_stale() == []
    for segment in (plain, link):
        assert segment.name is not None
        assert (SHM_DIR / segment.name).exists()


def test_a_link_of_a_reused_pid_is_stale(make: Callable[..., Segment]) -> None:
    """A link segment whose header records another start time than the running process with
    its pid has now belonged to an earlier process with that pid: it is stale. A header
    without a rapace magic is ignored and the segment counts as the live pid's."""
    started = process_start_time(os.getpid())
    assert started is not None
    reused = make(segment_name())
    write_link_header(reused, creator_pid=os.getpid(), creator_start=started - 1)
    not_a_link = make(segment_name())
    write_link_header(not_a_link, creator_pid=os.getpid(), creator_start=started - 1)
    not_a_link.buffer[0:8] = b"SOMEELSE"
    assert reused.name is not None
    assert find_stale() == [StaleSegment(reused.name, os.getpid(), reused.size)]
    assert remove_stale() == [StaleSegment(reused.name, os.getpid(), reused.size)]
    assert not (SHM_DIR / reused.name).exists()
    assert not_a_link.name is not None
    assert (SHM_DIR / not_a_link.name).exists()


def test_sweep_owner_removes_only_that_pids_segments(
    dead_pid: int, make: Callable[..., Segment]
) -> None:
    """sweep_owner(pid) unlinks every segment named ``rp_<pid hex>_...`` and nothing else,
    not even a pid whose hex starts with the same digits, nor this process's own."""
    mine = [make(segment_name(dead_pid)), make(segment_name(dead_pid, "blk1"))]
    longer_pid = make(segment_name(dead_pid * 16 + 1))
    own = make(segment_name())
    removed = sweep_owner(dead_pid)
    assert sorted(removed) == sorted(s.name for s in mine if s.name)
    for segment in mine:
        assert segment.name is not None
        assert not (SHM_DIR / segment.name).exists()
    for segment in (longer_pid, own):
        assert segment.name is not None
        assert (SHM_DIR / segment.name).exists()
    assert sweep_owner(dead_pid) == []


# ------------------------------------------------------- odd entries (private directory)


def test_find_stale_in_a_private_directory_works(private_shm_dir: Path, dead_pid: int) -> None:
    """With the directory redirected, plain files are judged like segments (a sanity check
    for the tests below), and names that are not rapace's are ignored."""
    stale = segment_name(dead_pid)
    (private_shm_dir / stale).write_bytes(b"x" * 10)
    (private_shm_dir / segment_name()).write_bytes(b"x")
    (private_shm_dir / f"sem.{stale}").write_bytes(b"x")
    assert find_stale() == [StaleSegment(stale, dead_pid, 10)]


def test_a_directory_with_a_rapace_name_does_not_break_find_stale(
    private_shm_dir: Path,
) -> None:
    """/dev/shm is world-writable: a directory named like a segment of a live owner is not
    reported and does not make find_stale raise."""
    (private_shm_dir / segment_name()).mkdir()
    assert find_stale() == []


def test_a_fifo_with_a_rapace_name_does_not_block_find_stale(private_shm_dir: Path) -> None:
    """A FIFO named like a segment does not make find_stale block (waited for at most 1 s)
    or raise."""
    fifo = private_shm_dir / segment_name()
    os.mkfifo(fifo)
    outcome: list[object] = []

    def scan() -> None:
        try:
            outcome.append(find_stale())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    try:
        thread.join(timeout=1.0)
        blocked = thread.is_alive()
    finally:
        # A writer end of our own unblocks an open() still waiting on the FIFO.
        unblock = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            fifo.unlink()
            thread.join(timeout=WAIT_S)
        finally:
            os.close(unblock)
    assert not thread.is_alive()
    assert not blocked, "find_stale blocked opening a FIFO"
    assert outcome == [[]]


@pytest.mark.parametrize("pid_hex", ["80000000", "100000000", "ffffffffffffffffff"])
def test_an_impossible_pid_in_a_name_is_stale_not_an_error(
    private_shm_dir: Path, pid_hex: str
) -> None:
    """A segment named with a pid no process can have is stale (its owner cannot be
    running), not a crash of the whole scan."""
    name = f"rp_{pid_hex}_x"
    (private_shm_dir / name).write_bytes(b"x")
    assert find_stale() == [StaleSegment(name, int(pid_hex, 16), 1)]


def test_sweep_owner_spares_segments_of_a_new_process_with_the_same_pid(
    make: Callable[..., Segment],
) -> None:
    """After pid reuse, sweeping the dead process (by its start time) removes only what it
    made: a segment recording another start time belongs to the pid's new owner."""
    started = process_start_time(os.getpid())
    assert started is not None
    ours = make(segment_name())
    write_link_header(ours, creator_pid=os.getpid(), creator_start=started)
    earlier = make(segment_name())
    write_link_header(earlier, creator_pid=os.getpid(), creator_start=started - 1)
    assert earlier.name is not None
    assert sweep_owner(os.getpid(), started - 1) == [earlier.name]
    assert ours.name is not None
    assert (SHM_DIR / ours.name).exists()
    assert sweep_owner(os.getpid()) == []  # no start time, pid alive: nothing is removed
