"""Byte-stream transports: an in-memory pair, Unix and TCP sockets, WebSocket
(ARCHITECTURE.md section 7). On a socket each frame is a LEB128 length, the 64-byte
descriptor, then the payload; on a WebSocket each binary message is one frame (descriptor,
then payload). A malformed or oversized frame closes the connection before any allocation.
"""
