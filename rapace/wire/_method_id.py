"""Method ids: FNV-1a 64 over ``"Service.method"``, folded to 32 bits.

Kept byte-compatible with the Rust rapace so the published vectors hold::

    Calculator.add   -> 0x193fa158     Vfs.read    -> 0xc8c061c2
    EchoService.echo -> 0x57c4bf02     Test.method -> 0xf4bfdab6
"""

from __future__ import annotations

from typing import Final

__all__ = ("fnv1a_64", "method_id")

_FNV_OFFSET: Final = 0xCBF29CE484222325
_FNV_PRIME: Final = 0x100000001B3
_MASK64: Final = 0xFFFF_FFFF_FFFF_FFFF


def fnv1a_64(data: bytes) -> int:
    """64-bit FNV-1a: xor the byte in, then multiply, modulo 2**64."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def method_id(service: str, method: str) -> int:
    """The 32-bit id of ``service.method``.

    Id 0 is reserved; callers that build a method table must reject it (the service
    decorator does, at decoration time).
    """
    h = fnv1a_64(f"{service}.{method}".encode())
    return (h >> 32) ^ (h & 0xFFFF_FFFF)
