"""POSIX shared-memory segments without the stdlib resource tracker.

``multiprocessing.shared_memory`` on Python 3.11 registers every segment, created or attached,
with the resource tracker: a helper process that unlinks the segment (and warns) when the
registering process exits, even while others still use it (cpython#82300). rapace needs the
opposite guarantees, so it calls ``_posixshmem`` (the module under ``SharedMemory``) and maps
the fd itself; cleanup is rapace's own job:

* names are ``rp_<owner pid in hex>_<random>``: short enough for macOS's 31-byte limit, and
  the owner's pid in the name lets a survivor or ``rapace cleanup`` remove what a dead
  process left behind;
* space is reserved at creation with ``posix_fallocate``: ``ftruncate`` alone succeeds on a
  too-small tmpfs and the first write later dies with SIGBUS;
* the name is unlinked as soon as every process that needs it holds an fd or a mapping, so a
  SIGKILL afterwards leaves nothing in ``/dev/shm``.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import mmap
import os
import secrets
import stat
from pathlib import Path
from typing import Final

from rapace._errors import RapaceError

# The C module under multiprocessing.shared_memory: shm_open/shm_unlink without the tracker.
_posixshmem = importlib.import_module("_posixshmem")

__all__ = (
    "SHM_DIR",
    "SHM_PREFIX",
    "Segment",
    "SegmentSpaceError",
    "owner_of",
    "remove_mapped",
    "segment_name",
    "shm_unlink",
)

SHM_DIR: Final = Path("/dev/shm")
_MAP_POPULATE: Final = getattr(mmap, "MAP_POPULATE", 0)
SHM_PREFIX: Final = "rp_"
_NAME_TOKEN_BYTES: Final = 5  # 8 base32 characters


class SegmentSpaceError(RapaceError, MemoryError):
    """``/dev/shm`` cannot hold a segment of the requested size."""


def segment_name(owner_pid: int | None = None, suffix: str | None = None) -> str:
    """A fresh segment name, ``rp_<pid hex>_<suffix>``, at most 30 characters."""
    pid = os.getpid() if owner_pid is None else owner_pid
    if suffix is None:
        suffix = secrets.token_hex(_NAME_TOKEN_BYTES)
    name = f"{SHM_PREFIX}{pid:x}_{suffix}"
    if len(name) > 30:
        raise ValueError(f"segment name {name!r} is longer than 30 characters")
    return name


def owner_of(name: str) -> int | None:
    """The owner pid encoded in a rapace segment name, or None for any other name."""
    if not name.startswith(SHM_PREFIX):
        return None
    pid_hex, sep, _ = name[len(SHM_PREFIX) :].partition("_")
    if not sep or not pid_hex:
        return None
    try:
        return int(pid_hex, 16)
    except ValueError:
        return None


class Segment:
    """One mapped shared-memory segment: its fd, its mapping, and (until unlinked) its name.

    The fd stays open for the segment's life so it can be passed to a child process; closing
    releases the mapping and the fd. Views of :attr:`buffer` handed out must be released
    first; :meth:`close` reports a ``BufferError`` as a bug rather than leaking the mapping
    silently.
    """

    __slots__ = ("_fd", "_map", "_name", "buffer", "size")

    def __init__(self, fd: int, size: int, name: str | None, populate: bool = False) -> None:
        self._fd = fd
        self._name = name
        self.size = size
        # MAP_POPULATE faults every page in now, in one go, instead of one fault per page at
        # first touch: for large buffers that is most of the cost of a fresh mapping.
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
        self._map = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        self.buffer = memoryview(self._map)

    @classmethod
    def create(cls, size: int, *, name: str | None = None, populate: bool = False) -> Segment:
        """Create, reserve and map a new segment of ``size`` bytes (0600, exclusive).

        Raises:
            SegmentSpaceError: ``/dev/shm`` has less than ``size`` bytes free.
        """
        if size <= 0:
            raise ValueError(f"segment size must be positive, not {size}")
        while True:
            chosen = name or segment_name()
            try:
                fd = _shm_open(chosen, os.O_RDWR | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                if name is not None:
                    raise
                continue  # a random-name collision: draw again
            break
        try:
            _reserve(fd, size, chosen)
            return cls(fd, size, chosen, populate)
        except BaseException:
            os.close(fd)
            _unlink_quietly(chosen)
            raise

    @classmethod
    def open(cls, name: str, *, min_size: int = 1, populate: bool = False) -> Segment:
        """Map an existing segment by name; its size is what the file holds now."""
        fd = _shm_open(name, os.O_RDWR)
        try:
            size = _checked_size(fd, min_size)
            return cls(fd, size, name, populate)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, *, min_size: int = 1) -> Segment:
        """Map a segment from an inherited fd; takes ownership of ``fd`` (closed on failure)."""
        try:
            size = _checked_size(fd, min_size)
            return cls(fd, size, None)
        except BaseException:
            os.close(fd)
            raise

    @property
    def name(self) -> str | None:
        """The segment's name until :meth:`unlink`; None once unlinked or when from an fd."""
        return self._name

    def fileno(self) -> int:
        return self._fd

    def unlink(self) -> None:
        """Remove the name; the mapping and fd stay valid. Idempotent."""
        if self._name is not None:
            _unlink_quietly(self._name)
            self._name = None

    def close(self) -> None:
        """Unmap and close the fd (the name, if any, is left to :meth:`unlink`). Idempotent."""
        if self._fd < 0:
            return
        self.buffer.release()
        self._map.close()
        os.close(self._fd)
        self._fd = -1

    def detach(self) -> mmap.mmap:
        """Close the fd and hand the mapping over to the caller, who keeps it as long as it is
        needed (the memory is unmapped when the last reference to it goes)."""
        if self._fd < 0:
            raise ValueError("segment already closed")
        self.buffer.release()
        os.close(self._fd)
        self._fd = -1
        return self._map

    @property
    def mapping(self) -> mmap.mmap:
        """The mapping itself, for leases (:mod:`rapace.shm._lease`)."""
        return self._map

    @property
    def closed(self) -> bool:
        return self._fd < 0


def _shm_open(name: str, flags: int) -> int:
    return int(_posixshmem.shm_open(f"/{name}", flags, 0o600))


def _reserve(fd: int, size: int, name: str) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG):
            raise
        free = _free_bytes()
        raise SegmentSpaceError(
            f"cannot reserve {_mib(size)} for shared-memory segment {name!r}: {SHM_DIR} has "
            f"{_mib(free)} free. Give the container more shared memory (docker run "
            f"--shm-size=...), or use smaller rings/slots or fewer workers."
        ) from exc


def _checked_size(fd: int, min_size: int) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("fd is not a shared-memory segment")
    if info.st_size < min_size:
        raise ValueError(f"segment holds {info.st_size} bytes, at least {min_size} are needed")
    return info.st_size


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _unlink_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        shm_unlink(name)


def remove_mapped(name: str, mapping: mmap.mmap) -> None:
    """Remove segment ``name`` and unmap it, unless leases still view the memory: then the
    mapping goes when the last of them dies (rapace never unmaps memory it handed out)."""
    _unlink_quietly(name)
    with contextlib.suppress(BufferError):
        mapping.close()


def shm_unlink(name: str) -> None:
    """Remove the segment called ``name`` (FileNotFoundError if there is none)."""
    _posixshmem.shm_unlink(f"/{name}")
