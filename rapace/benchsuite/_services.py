"""The services the suite calls, and the plain functions its baselines call.

They live in a module of the package (not in ``__main__``) so that every worker, a
``PluginPool``'s or a ``ProcessPoolExecutor``'s, imports them by name. Nothing here needs
numpy: the array methods are in :mod:`rapace.benchsuite._array_services`.
"""

from __future__ import annotations

import os
import time

import rapace
from rapace import Streaming

__all__ = ("Bench", "add", "nbytes", "pid", "sleep_then_pid")


@rapace.service
class Bench:
    """``add(2, 3)``-sized calls, 64 MiB payloads taken in place or copied, a stream."""

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def nbytes(self, data: memoryview) -> int:
        """A ``memoryview`` parameter: the payload may be read in place."""
        return len(data)

    async def nbytes_copied(self, data: bytes) -> int:
        """A ``bytes`` parameter: the worker receives its own ``bytes`` object."""
        return len(data)

    async def count(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i

    async def pid(self) -> int:
        return os.getpid()


# --------------------------------------------------------------------- executor functions


def add(a: int, b: int) -> int:
    return a + b


def nbytes(data: bytes) -> int:
    return len(data)


def pid() -> int:
    return os.getpid()


def sleep_then_pid(seconds: float) -> int:
    """Keeps a worker busy so that the next call needs another one (start-up baseline)."""
    time.sleep(seconds)
    return os.getpid()
