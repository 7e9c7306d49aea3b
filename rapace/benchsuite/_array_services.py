"""The suite's service for numpy arrays; imported only when numpy is installed."""

from __future__ import annotations

import os

import numpy

import rapace

__all__ = ("BenchArrays", "array_echo", "array_sum")


@rapace.service
class BenchArrays:
    async def total(self, arr: numpy.ndarray) -> float:
        return float(arr.sum())

    async def length(self, arr: numpy.ndarray) -> int:
        """The array's length: touches none of its bytes (the zero-copy probe)."""
        return len(arr)

    async def echo(self, arr: numpy.ndarray) -> numpy.ndarray:
        """The array back: a 64 MiB argument and a 64 MiB result."""
        return arr

    async def nbytes(self, data: memoryview) -> int:
        return len(data)

    async def pid(self) -> int:
        return os.getpid()


def array_echo(arr: numpy.ndarray) -> numpy.ndarray:
    """The executor baseline's echo: pickled both ways."""
    return arr


def array_sum(arr: numpy.ndarray) -> float:
    """The executor baseline's function: the array arrives pickled."""
    return float(arr.sum())
