"""Services for the zero-copy pool tests (importable by name in the workers)."""

from __future__ import annotations

import os
import signal

import numpy as np

import rapace

_kept: list[object] = []


@rapace.service
class Imaging:
    def blur(self, img: np.ndarray, k: int) -> np.ndarray:
        """The API's example: a smaller, new array (copied back once)."""
        return img[::k, ::k].copy()

    def fill(self, out: np.ndarray, value: int) -> int:
        """Writes into the caller's buffer: only visible if it was shared, not copied."""
        out[...] = value
        return int(out.size)

    def fill_view(self, out: memoryview, value: int) -> int:
        out[:] = bytes([value]) * out.nbytes
        return out.nbytes

    def nbytes(self, data: memoryview) -> int:
        return data.nbytes

    def total(self, a: np.ndarray) -> float:
        return float(a.sum())

    def describe(self, a: np.ndarray) -> tuple[bool, bool, list[int]]:
        """(writable, C-contiguous, strides) as the worker sees the array."""
        return bool(a.flags.writeable), bool(a.flags.c_contiguous), list(a.strides)

    def same(self, a: np.ndarray) -> np.ndarray:
        return a

    def echo_bytes(self, data: bytes) -> bytes:
        return data

    def is_bytes(self, data: bytes) -> bool:
        return type(data) is bytes

    def ones(self, n: int) -> np.ndarray:
        return np.ones(n, dtype=np.uint8)

    def keep_then_die(self, a: np.ndarray) -> int:
        """Hold a view of a received array, then die with it alive."""
        _kept.append(a)
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    def pid(self) -> int:
        return os.getpid()
