"""Connection greeting and token authentication, before the first rapace frame.

The listener speaks first::

    server -> client   b"RAPACE\\x01" | mode (1 byte: 0 open, 1 token required) | nonce_s (32)
    client -> server   nonce_c (32) | HMAC-SHA256(token, b"client" | nonce_s | nonce_c)   [mode 1]
    server -> client   b"\\x01" | HMAC-SHA256(token, b"server" | nonce_c | nonce_s)  accepted
                       b"\\x00"                                                  refused, closed

The token never crosses the wire; both sides prove they know it (the client checks the
server's proof too, so a server without the token cannot pose as the real one). Fresh nonces
on both sides make a recorded exchange useless for a later connection.
"""

from __future__ import annotations

import hmac
import secrets
from hashlib import sha256
from typing import Final

import anyio
import anyio.abc

from rapace._errors import RemoteProtocolError, Status, Unauthenticated

__all__ = ("HANDSHAKE_TIMEOUT_S", "accept_greeting", "send_greeting")

MAGIC: Final = b"RAPACE\x01"
NONCE_BYTES: Final = 32
MAC_BYTES: Final = 32
HANDSHAKE_TIMEOUT_S: Final = 5.0
_OPEN: Final = 0
_TOKEN: Final = 1
_ACCEPTED: Final = b"\x01"
_REFUSED: Final = b"\x00"


def _mac(token: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token, label + first + second, sha256).digest()


async def _receive_exactly(stream: anyio.abc.ByteStream, nbytes: int, pending: bytearray) -> bytes:
    """Read exactly ``nbytes``; bytes read past them stay in ``pending`` for the framer."""
    while len(pending) < nbytes:
        try:
            pending += await stream.receive(max(nbytes - len(pending), 4096))
        except anyio.EndOfStream:
            raise anyio.BrokenResourceError(
                "the peer closed the connection during the handshake"
            ) from None
    out = bytes(pending[:nbytes])
    del pending[:nbytes]
    return out


async def send_greeting(stream: anyio.abc.ByteStream, token: bytes | None) -> bytes:
    """Listener side: greet, and if a token is set, verify the client's proof.

    Returns:
        Bytes the client sent after the handshake (the start of its first frame).

    Raises:
        Unauthenticated: the client's proof is missing or wrong (it was told, and the
            caller should close the connection).
    """
    nonce_s = secrets.token_bytes(NONCE_BYTES)
    mode = _TOKEN if token is not None else _OPEN
    await stream.send(MAGIC + bytes([mode]) + nonce_s)
    pending = bytearray()
    if token is None:
        return bytes(pending)
    with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
        answer = await _receive_exactly(stream, NONCE_BYTES + MAC_BYTES, pending)
    nonce_c, proof = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    if not hmac.compare_digest(proof, _mac(token, b"client", nonce_s, nonce_c)):
        await stream.send(_REFUSED)
        raise Unauthenticated("a client offered a wrong token")
    await stream.send(_ACCEPTED + _mac(token, b"server", nonce_c, nonce_s))
    return bytes(pending)


async def accept_greeting(stream: anyio.abc.ByteStream, token: bytes | None) -> bytes:
    """Connecting side: read the greeting and, if asked, prove we know the token.

    Returns:
        Bytes the server sent after the handshake (the start of its first frame).

    Raises:
        Unauthenticated: the server wants a token we do not have, refused ours, or could
            not prove it knows it.
        RemoteProtocolError: the other end is not a rapace listener.
    """
    pending = bytearray()
    with anyio.fail_after(HANDSHAKE_TIMEOUT_S):
        greeting = await _receive_exactly(stream, len(MAGIC) + 1 + NONCE_BYTES, pending)
        if not greeting.startswith(MAGIC):
            raise RemoteProtocolError(
                "the server did not greet like a rapace listener", status=Status.PROTOCOL_ERROR
            )
        mode = greeting[len(MAGIC)]
        nonce_s = greeting[len(MAGIC) + 1 :]
        if mode == _OPEN:
            return bytes(pending)
        if mode != _TOKEN:
            raise RemoteProtocolError(f"unknown greeting mode {mode}", status=Status.PROTOCOL_ERROR)
        if token is None:
            raise Unauthenticated("the server requires a token and none was given")
        nonce_c = secrets.token_bytes(NONCE_BYTES)
        await stream.send(nonce_c + _mac(token, b"client", nonce_s, nonce_c))
        try:
            verdict = await _receive_exactly(stream, 1, pending)
        except anyio.BrokenResourceError:
            raise Unauthenticated("the server closed the connection: token refused") from None
        if verdict != _ACCEPTED:
            raise Unauthenticated("the server refused the token")
        proof = await _receive_exactly(stream, MAC_BYTES, pending)
    if not hmac.compare_digest(proof, _mac(token, b"server", nonce_c, nonce_s)):
        raise Unauthenticated("the server could not prove it knows the token")
    return bytes(pending)
