"""``pool.empty()``, ``pool.zeros()`` and ``pool.buffer()``: user memory in the pool's arena.

What they return is ordinary: a numpy array or a writable memoryview. What makes it special
is where it lives; passing it (or any slice or view of it) to a call sends a reference, and
the worker's writes into it are seen here when the call returns. The memory is freed when
the last view of it dies, and stays valid after the pool is closed.

Without shared memory (a platform the shm transport does not run on) they return private
memory, and calls copy it like any other value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rapace.shm._lease import view_of

if TYPE_CHECKING:
    from rapace.shm._arena import Arena

__all__ = ("arena_buffer", "arena_empty", "arena_zeros")


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ImportError(
            "pool.empty() and pool.zeros() need numpy (pip install 'rapace[numpy]'); "
            "pool.buffer() works without it"
        ) from None
    return numpy


def _shape(shape: int | Iterable[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    for d in dims:
        if operator.index(d) < 0:
            raise ValueError(f"negative dimensions are not allowed: {dims}")
    return tuple(operator.index(d) for d in dims)


def arena_empty(
    arena: Arena | None, shape: int | Iterable[int], dtype: Any = float, order: str = "C"
) -> Any:
    """An uninitialised array of ``shape`` and ``dtype`` in the arena."""
    np = _numpy()
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects, which cannot live in shared memory")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    dims = _shape(shape)
    if arena is None:
        return np.empty(dims, dt, order=order)
    lease = arena.allocate(math.prod(dims) * dt.itemsize)
    return np.ndarray(dims, dt, buffer=lease, order=order)


def arena_zeros(
    arena: Arena | None, shape: int | Iterable[int], dtype: Any = float, order: str = "C"
) -> Any:
    """An array of zeros (arena memory is reused, so it must be cleared)."""
    array = arena_empty(arena, shape, dtype, order)
    array.fill(0)
    return array


def arena_buffer(arena: Arena | None, nbytes: int) -> memoryview:
    """A writable ``"B"`` memoryview of ``nbytes`` in the arena."""
    nbytes = operator.index(nbytes)
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, not {nbytes}")
    if arena is None:
        return memoryview(bytearray(nbytes))
    return view_of(arena.allocate(nbytes), writable=True)[:nbytes]
