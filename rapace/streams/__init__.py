"""Byte-stream transports: an in-memory pair, Unix and TCP sockets, WebSocket
(ARCHITECTURE.md section 7). Each frame is a LEB128 length, the 64-byte descriptor, then
the payload; a malformed or oversized length closes the connection before any allocation.
"""
