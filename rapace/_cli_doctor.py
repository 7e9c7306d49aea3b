"""``rapace doctor``: check that this machine can run rapace, shared memory included.

Each check reports OK, WARN (works, but something will hurt: too little shared memory, a low
fd limit, leftovers), FAIL (something rapace needs is broken) or INFO (an optional extra is
absent). The exit status is 1 when any check FAILs, so scripts and CI can gate on it. A
check that crashes is itself reported as a FAIL instead of ending the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Final, Literal, TypeAlias

from rapace._cli import Commands, write_out

__all__ = ("Check", "register", "run_checks")

Status: TypeAlias = Literal["OK", "WARN", "FAIL", "INFO"]
Finding: TypeAlias = tuple[Status, str]

MIB: Final = 1 << 20
#: Below this much free /dev/shm a pool of a few workers with large payloads runs out.
SHM_WARN_BYTES: Final = 256 * MIB
#: Below this many fds a pool of many workers (each holds several) hits EMFILE.
NOFILE_WARN: Final = 1024

DESCRIPTION = (
    "Check this machine for what rapace needs: the Python version, a platform where the "
    "shared-memory transport runs (Linux x86-64), free space in /dev/shm, eventfd, pidfd, "
    "the open-file limit, segments left by dead processes, and the optional numpy. Prints "
    "OK, WARN, FAIL or INFO per check; exits 1 if any check FAILs."
)


@dataclass(frozen=True, slots=True)
class Check:
    """The outcome of one check: ``name``, ``status`` and a one-line ``detail``."""

    name: str
    status: Status
    detail: str


def register(commands: Commands) -> None:
    """Add ``doctor`` to the ``rapace`` command line."""
    parser = commands.add_parser(
        "doctor", help="check this machine for what rapace needs", description=DESCRIPTION
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='print {"ok": ..., "checks": [{"name", "status", "detail"}, ...]} instead',
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks and report them; 1 if any FAILed."""
    checks = run_checks()
    ok = not any(check.status == "FAIL" for check in checks)
    if args.json:
        report = {"ok": ok, "checks": [asdict(check) for check in checks]}
        write_out(json.dumps(report, indent=2))
    else:
        _print_report(checks)
    return 0 if ok else 1


def _print_report(checks: list[Check]) -> None:
    """One aligned line per check, then a one-line verdict."""
    width = max(len(check.name) for check in checks)
    for check in checks:
        write_out(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
    counts = {s: sum(c.status == s for c in checks) for s in ("FAIL", "WARN")}
    if counts["FAIL"] or counts["WARN"]:
        write_out(f"{counts['FAIL']} failed, {counts['WARN']} warning(s)")
    else:
        write_out("all checks passed")


def run_checks() -> list[Check]:
    """Run every check, in order; a check that raises is reported as a FAIL."""
    checks = []
    for name, check in _CHECKS:
        try:
            status, detail = check()
        except Exception as exc:
            status, detail = "FAIL", f"the check itself failed: {type(exc).__name__}: {exc}"
        checks.append(Check(name, status, detail))
    return checks


def _shm_supported() -> bool:
    from rapace.shm import SUPPORTED

    return SUPPORTED


def _missing(what: str) -> Finding:
    """A shared-memory prerequisite is absent: fatal where that transport would be used,
    only a warning where rapace already falls back to Unix sockets."""
    if _shm_supported():
        return "FAIL", f"{what}: the shared-memory transport cannot work"
    return "WARN", f"{what} (the shared-memory transport is not used on this platform)"


def _check_python() -> Finding:
    # An older Python cannot even import rapace (requires-python keeps it from installing),
    # so reaching this check means the version is fine: it reports which one it is.
    return "OK", f"{platform.python_implementation()} {platform.python_version()} (3.11+ needed)"


def _check_platform() -> Finding:
    where = f"{platform.system()} {platform.machine()}"
    if _shm_supported():
        return "OK", f"{where}: the shared-memory transport is available"
    return "WARN", (
        f"{where}: the shared-memory transport needs Linux x86-64; pools fall back to Unix "
        "sockets (slower)"
    )


def _check_dev_shm() -> Finding:
    from rapace.shm import LinkOptions
    from rapace.shm._segment import SHM_DIR

    if not SHM_DIR.is_dir():
        return _missing(f"{SHM_DIR} does not exist")
    if not os.access(SHM_DIR, os.W_OK | os.X_OK):
        return _missing(f"{SHM_DIR} is not writable by this user")
    stats = os.statvfs(SHM_DIR)
    free, total = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    from rapace._workers import lane_link_options

    options = LinkOptions()
    # A shared-memory worker has two links: the main one and its direct lane.
    link = options.layout().total_size + lane_link_options(options).layout().total_size
    detail = f"{_size(free)} free of {_size(total)}; a worker's links take {_size(link)}"
    if free < link:
        return "FAIL", f"{detail}: not even one worker fits. {_SHM_ADVICE}"
    if free < SHM_WARN_BYTES:
        return "WARN", f"{detail}, under {_size(SHM_WARN_BYTES)}. {_SHM_ADVICE}"
    return "OK", detail


_SHM_ADVICE: Final = (
    "In Docker (64 MiB by default) start the container with --shm-size=1g; elsewhere remount "
    "/dev/shm larger"
)


def _check_eventfd() -> Finding:
    if not hasattr(os, "eventfd"):
        return _missing("os.eventfd is missing (needs Linux and Python 3.10+)")
    try:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    except OSError as exc:
        return _missing(f"os.eventfd failed: {exc}")
    try:
        # The doorbell is exactly this: one side adds, the other reads the count.
        os.eventfd_write(fd, 1)
        if os.eventfd_read(fd) != 1:
            return _missing("an eventfd did not count")
    finally:
        os.close(fd)
    return "OK", "eventfd works (shared-memory wake-ups)"


def _check_pidfd() -> Finding:
    fallback = "a worker's death is noticed later instead of at once"
    if not hasattr(os, "pidfd_open"):
        return "WARN", f"os.pidfd_open is missing (needs Linux 5.3+): {fallback}"
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as exc:
        # EPERM here is typically an old container seccomp profile (Docker before 20.10).
        return "WARN", f"os.pidfd_open failed ({exc}): {fallback}"
    os.close(fd)
    return "OK", "pidfd works (a worker's death is noticed at once)"


def _check_nofile() -> Finding:
    try:
        import resource
    except ImportError:
        return "WARN", "cannot read the open-file limit on this platform"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    detail = f"soft limit {_limit(soft)}, hard limit {_limit(hard)}"
    if soft != resource.RLIM_INFINITY and soft < NOFILE_WARN:
        return "WARN", (
            f"{detail}: each worker and connection holds several fds; raise it with "
            f"'ulimit -n {_limit(hard) if hard != resource.RLIM_INFINITY else 65536}'"
        )
    return "OK", detail


def _check_stale() -> Finding:
    from rapace.shm import find_stale

    stale = find_stale()
    if not stale:
        return "OK", "no segments left behind by dead processes"
    total = sum(segment.size for segment in stale)
    return "WARN", (
        f"{len(stale)} segment(s) ({_size(total)}) left by dead processes hold /dev/shm: "
        "run 'rapace cleanup'"
    )


def _check_numpy() -> Finding:
    try:
        import numpy
    except ImportError:
        return "INFO", "not installed (optional: pip install 'rapace[numpy]' to pass arrays)"
    return "OK", f"numpy {numpy.__version__}: arrays can be arguments and results"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _limit(n: int) -> str:
    import resource

    return "unlimited" if n == resource.RLIM_INFINITY else str(n)


_CHECKS: Final[tuple[tuple[str, Callable[[], Finding]], ...]] = (
    ("python", _check_python),
    ("platform", _check_platform),
    ("/dev/shm", _check_dev_shm),
    ("eventfd", _check_eventfd),
    ("pidfd", _check_pidfd),
    ("open files", _check_nofile),
    ("stale segments", _check_stale),
    ("numpy", _check_numpy),
)
