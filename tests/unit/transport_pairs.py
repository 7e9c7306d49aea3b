"""The transport pairs session tests run over: in memory, and a real Unix socket pair (where
asyncio reads in the loop's callback)."""

from __future__ import annotations

import socket
from collections.abc import Callable

from rapace.streams._abc import Transport
from rapace.streams._memory import memory_pair
from rapace.streams._stream_transport import StreamTransport
from rapace.streams._unix import UnixByteStream

Pair = Callable[[], tuple[Transport, Transport]]


def socket_pair() -> tuple[Transport, Transport]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return StreamTransport(UnixByteStream(a)), StreamTransport(UnixByteStream(b))


#: By the id a parametrized ``pair`` fixture gives its tests.
TRANSPORT_PAIRS: dict[str, Pair] = {"memory": memory_pair, "unix": socket_pair}
