"""The shared-memory transport: segments, SPSC descriptor rings, owner-frees slots, eventfd
doorbells, zero-copy buffers and liveness (ARCHITECTURE.md section 5).

This is the only package that maps shared memory. It builds on :mod:`rapace.wire` and is
reached by sessions through the transport protocol only.
"""
