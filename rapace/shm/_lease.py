"""Leases: the objects that keep shared memory alive exactly as long as a view of it lives.

A lease is a ctypes byte array laid over a range of a mapping (``from_buffer``: no copy). It
holds a reference to the mapping, and every memoryview or numpy array made from it holds a
reference to the lease, through any number of slices and views. So:

* a mapping is never unmapped under a live view (rapace never calls ``mmap.close`` on
  memory it handed out; dropping its own reference is enough), and closing a pool never
  raises ``BufferError``;
* ``weakref.finalize`` on the lease runs when the last view dies, which is when a borrowed
  block goes back to its owner;
* a view passed back to rapace is traced to its lease (:func:`find_lease`), which names the
  region it lives in, so it travels as a reference instead of as bytes.

The finaliser may run in any thread (whichever drops the last view, or the garbage
collector): callbacks must only do thread-safe things, such as appending to a deque.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from collections.abc import Callable
from typing import Any, Final

__all__ = ("Lease", "Region", "find_lease", "make_lease", "view_of")

#: How many ``.base`` links to follow from an array to its lease (numpy chains are short).
_MAX_CHAIN: Final = 32


class Region:
    """Where a lease's bytes live, as the peer can name them.

    ``where`` is the reference the codec sends (an arena block's name, or a link block's
    ``[number, generation]``); ``offset`` is the lease's first byte in that region;
    ``shared`` regions are memory both sides may write (the pool's arena), others are
    read-only to everyone but their owner.
    """

    __slots__ = ("offset", "shared", "where")

    def __init__(self, where: object, offset: int, shared: bool) -> None:
        self.where = where
        self.offset = offset
        self.shared = shared


# A lease is a ``c_ubyte * n`` instance carrying a ``rapace_region`` attribute.
Lease = Any

_ARRAY_TYPES: dict[int, Any] = {}


def _array_type(nbytes: int) -> Any:
    cls = _ARRAY_TYPES.get(nbytes)
    if cls is None:
        cls = ctypes.c_ubyte * nbytes
        if len(_ARRAY_TYPES) < 4096:  # sizes repeat in practice; do not grow without bound
            _ARRAY_TYPES[nbytes] = cls
    return cls


def make_lease(
    mapping: mmap.mmap,
    offset: int,
    nbytes: int,
    region: Region | None,
    on_release: Callable[[], None] | None = None,
) -> Lease:
    """Lease ``nbytes`` at ``offset`` of ``mapping`` (bounds checked by ctypes too)."""
    if offset < 0 or nbytes <= 0 or offset + nbytes > len(mapping):
        raise ValueError(f"lease of {nbytes} bytes at {offset} outside a {len(mapping)}-byte map")
    lease = _array_type(nbytes).from_buffer(mapping, offset)
    lease.rapace_region = region
    if on_release is not None:
        weakref.finalize(lease, on_release)
    return lease


def view_of(lease: Lease, writable: bool) -> memoryview:
    """A one-dimensional ``"B"`` view of a lease, read-only unless ``writable``."""
    view = memoryview(lease).cast("B")
    return view if writable else view.toreadonly()


def _address_of_view(view: memoryview) -> int | None:
    """Where a contiguous view's first byte is (None for what cannot be told cheaply: the
    caller then copies, which is always correct)."""
    if not view.c_contiguous:
        return None
    if not view.readonly:
        try:
            return ctypes.addressof(ctypes.c_char.from_buffer(view))
        except (TypeError, ValueError, BufferError):
            return None
    try:
        import numpy as np
    except ImportError:
        return None
    try:
        return int(np.frombuffer(view, np.uint8).ctypes.data)
    except (TypeError, ValueError, BufferError):
        return None


def _lease_under(value: Any) -> Lease | None:
    """Follow ``.base`` (numpy) and ``.obj`` (memoryview) links down to a lease."""
    owner = value
    for _ in range(_MAX_CHAIN):
        owner = owner.obj if type(owner) is memoryview else getattr(owner, "base", None)
        if owner is None:
            return None
        if getattr(owner, "rapace_region", None) is not None:
            return owner
    return None


def find_lease(value: Any) -> tuple[Lease, int] | None:
    """The lease ``value`` (a memoryview or a numpy array) is a view of, and where in it
    ``value``'s first byte (element 0 for an array) lies; None if it is no lease's view."""
    if type(value) is memoryview and value.nbytes == 0:
        return None
    owner = _lease_under(value)
    if owner is None:
        return None
    if type(value) is memoryview:
        address = _address_of_view(value)
    else:
        try:
            address = int(value.__array_interface__["data"][0])
        except (AttributeError, KeyError, TypeError):
            return None
    if address is None:
        return None
    offset = address - ctypes.addressof(owner)
    if not 0 <= offset <= ctypes.sizeof(owner):
        return None
    return owner, offset
