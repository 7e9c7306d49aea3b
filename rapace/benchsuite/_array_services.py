"""The suite's service for numpy arrays; imported only when numpy is installed."""

from __future__ import annotations

import os

import numpy

import rapace

__all__ = ("BenchArrays", "array_sum")


@rapace.service
class BenchArrays:
    async def total(self, arr: numpy.ndarray) -> float:
        return float(arr.sum())

    async def length(self, arr: numpy.ndarray) -> int:
        """The array's length: touches none of its bytes (the zero-copy probe)."""
        return len(arr)

    async def nbytes(self, data: memoryview) -> int:
        return len(data)

    async def pid(self) -> int:
        return os.getpid()


def array_sum(arr: numpy.ndarray) -> float:
    """The executor baseline's function: the array arrives pickled."""
    return float(arr.sum())
