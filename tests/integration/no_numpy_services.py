"""A service for the numpy-free zero-copy test. Importing it hides numpy from the process
(the worker imports it by name before any call), so both sides run as without numpy."""

from __future__ import annotations

import sys

sys.modules.setdefault("numpy", None)  # type: ignore[arg-type]

import rapace  # noqa: E402


@rapace.service
class Buffers:
    def fill(self, out: memoryview, value: int) -> int:
        out[:] = bytes([value]) * out.nbytes
        return out.nbytes

    def checksum(self, data: memoryview) -> tuple[int, bool]:
        return sum(data[::4096]), data.readonly

    def numpy_hidden(self) -> bool:
        try:
            import numpy  # noqa: F401
        except ImportError:
            return True
        return False
