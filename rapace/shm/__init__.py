"""The shared-memory transport: segments, SPSC descriptor rings, owner-frees slots, eventfd
doorbells and liveness (ARCHITECTURE.md section 5).

This is the only package that maps shared memory. It builds on :mod:`rapace.wire` and is
reached by sessions through the transport protocol only. It relies on x86-64 store ordering
(single-writer words, no fences): :data:`SUPPORTED` is False elsewhere, and callers fall back
to a Unix socket.
"""

from __future__ import annotations

import platform
import sys

from rapace.shm._cleanup import find_stale as find_stale
from rapace.shm._cleanup import remove_stale as remove_stale
from rapace.shm._cleanup import sweep_owner as sweep_owner
from rapace.shm._link import LinkOffer as LinkOffer
from rapace.shm._link import LinkOptions as LinkOptions
from rapace.shm._link import attach_link as attach_link
from rapace.shm._link import create_link as create_link
from rapace.shm._link import shm_pair as shm_pair
from rapace.shm._segment import SegmentSpaceError as SegmentSpaceError
from rapace.shm._slots import SizeClass as SizeClass
from rapace.shm._transport import ShmStatistics as ShmStatistics
from rapace.shm._transport import ShmTransport as ShmTransport

__all__ = (
    "SUPPORTED",
    "LinkOffer",
    "LinkOptions",
    "SegmentSpaceError",
    "ShmStatistics",
    "ShmTransport",
    "SizeClass",
    "attach_link",
    "create_link",
    "find_stale",
    "remove_stale",
    "shm_pair",
    "sweep_owner",
)

#: True where the ring's ordering assumptions hold: Linux (eventfd) on x86-64 (TSO).
SUPPORTED: bool = sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")
