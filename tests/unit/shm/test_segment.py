"""POSIX shared-memory segments (``rapace.shm._segment``): creation, names, sharing, unlink,
close, and the errors for a full ``/dev/shm`` and for name collisions."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rapace._errors import RapaceError
from rapace.shm import _segment
from rapace.shm._segment import (
    SHM_DIR,
    Segment,
    SegmentSpaceError,
    owner_of,
    segment_name,
    shm_unlink,
)

NAME_RE = re.compile(r"rp_(?P<pid>[0-9a-f]+)_(?P<token>[0-9a-f]{10})")


@pytest.fixture
def segments() -> Iterator[list[Segment]]:
    """Segments a test makes; each is unlinked and closed afterwards, whatever happened."""
    made: list[Segment] = []
    yield made
    still_viewed = []
    for segment in made:
        segment.unlink()
        try:
            segment.close()
        except BufferError:  # a failed test kept a view: the leak check reports the fd
            still_viewed.append(segment)
    assert not still_viewed, "segments left with live views"


@pytest.fixture
def create(segments: list[Segment]) -> Callable[..., Segment]:
    def create(size: int = 4096, *, name: str | None = None) -> Segment:
        segment = Segment.create(size, name=name)
        segments.append(segment)
        return segment

    return create


def rapace_names() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(("rapace", "rp-", "rp_"))}


def test_create_makes_a_private_reserved_segment(create: Callable[..., Segment]) -> None:
    """A new segment is a 0600 regular file of exactly the requested size, already
    allocated (posix_fallocate, not a sparse ftruncate), even with a permissive umask."""
    old = os.umask(0)
    try:
        segment = create(10_000)
    finally:
        os.umask(old)
    info = os.fstat(segment.fileno())
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == segment.size == 10_000
    assert info.st_blocks * 512 >= 10_000  # reserved, not sparse
    assert segment.buffer.nbytes == 10_000
    assert bytes(segment.buffer[:64]) == bytes(64)
    assert segment.name is not None
    assert (SHM_DIR / segment.name).stat().st_size == 10_000
    assert not segment.closed


def test_names_carry_the_owner_pid_and_fit_in_30_characters(
    create: Callable[..., Segment],
) -> None:
    """Random names are ``rp_<pid hex>_<10 hex>``, at most 30 characters, distinct, and
    ``owner_of`` recovers the pid from them."""
    segment = create(64)
    assert segment.name is not None
    match = NAME_RE.fullmatch(segment.name)
    assert match, segment.name
    assert int(match["pid"], 16) == os.getpid()
    assert len(segment.name) <= 30
    assert owner_of(segment.name) == os.getpid()
    names = {segment_name() for _ in range(100)}
    assert len(names) == 100
    biggest_pid = 2**22  # Linux's pid_max ceiling
    assert len(segment_name(biggest_pid)) <= 30
    assert segment_name(0x1F, "tok") == "rp_1f_tok"
    with pytest.raises(ValueError, match="longer than 30"):
        segment_name(1, "x" * 30)


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("rp_1f_abc", 0x1F),
        ("rp_1f_", 0x1F),
        ("rp_0_x", 0),
        ("rp__x", None),
        ("rp_1f", None),
        ("rp_zz_x", None),
        ("rapace_1f_x", None),
        ("sem.rp_1f_x", None),
    ],
)
def test_owner_of_parses_only_rapace_names(name: str, owner: int | None) -> None:
    """``owner_of`` returns the hex pid after ``rp_`` and before the next ``_``, else None."""
    assert owner_of(name) == owner


def test_a_second_mapping_shares_the_bytes_both_ways(
    create: Callable[..., Segment], segments: list[Segment]
) -> None:
    """Mappings from ``Segment.open(name)`` and ``Segment.from_fd(dup)`` see the creator's
    writes and the creator sees theirs; an fd-mapped segment has no name."""
    a = create(8192)
    assert a.name is not None
    b = Segment.open(a.name)
    segments.append(b)
    c = Segment.from_fd(os.dup(a.fileno()))
    segments.append(c)
    assert b.size == c.size == 8192
    assert b.name == a.name
    assert c.name is None
    a.buffer[0:4] = b"abcd"
    assert bytes(b.buffer[0:4]) == bytes(c.buffer[0:4]) == b"abcd"
    b.buffer[8000:8004] = b"from"
    c.buffer[100:102] = b"fd"
    assert bytes(a.buffer[8000:8004]) == bytes(c.buffer[8000:8004]) == b"from"
    assert bytes(a.buffer[100:102]) == bytes(b.buffer[100:102]) == b"fd"
    words = c.buffer.cast("Q")
    try:
        words[3] = 2**64 - 1
        assert bytes(a.buffer[24:32]) == b"\xff" * 8
    finally:
        words.release()
    assert len({a.fileno(), b.fileno(), c.fileno()}) == 3


def test_unlink_removes_the_name_but_keeps_the_mapping(
    create: Callable[..., Segment], segments: list[Segment]
) -> None:
    """After unlink the name is gone from /dev/shm and cannot be opened, while the mapping,
    the fd and mappings made from it keep working; unlink is idempotent."""
    a = create(4096)
    name = a.name
    assert name is not None
    a.unlink()
    assert a.name is None
    assert not (SHM_DIR / name).exists()
    with pytest.raises(FileNotFoundError):
        Segment.open(name)
    a.unlink()  # idempotent
    a.buffer[10:15] = b"still"
    c = Segment.from_fd(os.dup(a.fileno()))
    segments.append(c)
    assert bytes(c.buffer[10:15]) == b"still"
    c.buffer[20] = 7
    assert a.buffer[20] == 7
    with pytest.raises(FileNotFoundError):
        shm_unlink(name)


def test_close_is_idempotent_and_refuses_while_views_exist(
    segments: list[Segment],
) -> None:
    """close releases the mapping and the fd, and a second close does nothing; while a view
    of the buffer is alive close raises BufferError instead of leaking silently, and works once
    the view is released. The name survives close until unlink."""
    segment = Segment.create(4096)
    segments.append(segment)
    name = segment.name
    assert name is not None
    view = segment.buffer.cast("Q")
    try:
        with pytest.raises(BufferError):
            segment.close()
    finally:
        view.release()
    segment.close()
    assert segment.closed
    segment.close()
    assert segment.closed
    assert (SHM_DIR / name).exists()
    segment.unlink()
    assert not (SHM_DIR / name).exists()


def test_open_and_from_fd_check_the_size(create: Callable[..., Segment]) -> None:
    """Opening a segment smaller than ``min_size`` is a ValueError and leaks no fd (the leak
    check verifies), and ``from_fd`` refuses an fd that is not a shared-memory file."""
    a = create(100)
    assert a.name is not None
    with pytest.raises(ValueError, match="at least 101"):
        Segment.open(a.name, min_size=101)
    dup = os.dup(a.fileno())
    try:
        with pytest.raises(ValueError, match="at least 101"):
            Segment.from_fd(dup, min_size=101)
    finally:
        with contextlib.suppress(OSError):
            os.close(dup)
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a shared-memory segment"):
            Segment.from_fd(r)
    finally:
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)
    for size in (0, -1):
        with pytest.raises(ValueError, match="positive"):
            Segment.create(size)


def _fallocate_failing_with(code: int, seen: list[str]) -> Callable[[int, int, int], None]:
    def posix_fallocate(fd: int, offset: int, length: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        raise OSError(code, os.strerror(code))

    return posix_fallocate


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_no_space_is_a_clear_segment_space_error(
    monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """When posix_fallocate finds /dev/shm full, create raises SegmentSpaceError (a
    MemoryError and a RapaceError) naming the size needed and --shm-size, and leaves no
    segment and no fd behind."""
    seen: list[str] = []
    monkeypatch.setattr(os, "posix_fallocate", _fallocate_failing_with(code, seen))
    before = rapace_names()
    with pytest.raises(SegmentSpaceError) as caught:
        Segment.create(5 * 2**20 + 2**19)
    message = str(caught.value)
    assert "5.5 MiB" in message
    assert "--shm-size" in message
    assert isinstance(caught.value, MemoryError)
    assert isinstance(caught.value, RapaceError)
    assert isinstance(caught.value.__cause__, OSError)
    assert len(seen) == 1
    assert seen[0].startswith(str(SHM_DIR))
    assert not Path(seen[0]).exists()
    assert Path(seen[0]).name in message
    assert rapace_names() == before


def test_other_reservation_errors_propagate_and_clean_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A posix_fallocate failure other than no-space is re-raised as is, and the half-made
    segment is still removed."""
    seen: list[str] = []
    monkeypatch.setattr(os, "posix_fallocate", _fallocate_failing_with(errno.EIO, seen))
    before = rapace_names()
    with pytest.raises(OSError, match=os.strerror(errno.EIO)) as caught:
        Segment.create(4096)
    assert caught.value.errno == errno.EIO
    assert not isinstance(caught.value, SegmentSpaceError)
    assert not Path(seen[0]).exists()
    assert rapace_names() == before


def test_an_explicit_name_collision_raises(create: Callable[..., Segment]) -> None:
    """Creating a segment under a name that exists raises FileExistsError and leaves the
    existing segment and its contents alone."""
    first = create(4096)
    assert first.name is not None
    first.buffer[0:5] = b"first"
    before = rapace_names()
    with pytest.raises(FileExistsError):
        Segment.create(64, name=first.name)
    assert rapace_names() == before
    assert (SHM_DIR / first.name).stat().st_size == 4096
    assert bytes(first.buffer[0:5]) == b"first"
    assert first.name is not None
    assert first.name in before


def test_a_random_name_collision_draws_again(
    monkeypatch: pytest.MonkeyPatch, create: Callable[..., Segment]
) -> None:
    """If the random name is taken, create draws another instead of failing or opening the
    other segment."""
    taken = create(4096)
    assert taken.name is not None
    taken.buffer[0:5] = b"taken"
    real = _segment.segment_name
    calls: list[str] = []

    def colliding(owner_pid: int | None = None, suffix: str | None = None) -> str:
        name = taken.name if not calls else real(owner_pid, suffix)
        assert name is not None
        calls.append(name)
        return name

    monkeypatch.setattr(_segment, "segment_name", colliding)
    fresh = create(128)
    assert len(calls) == 2
    assert calls[0] == taken.name
    assert fresh.name == calls[1] != taken.name
    assert fresh.size == 128
    assert bytes(taken.buffer[0:5]) == b"taken"
    assert (SHM_DIR / taken.name).stat().st_size == 4096
