"""Servers of the baselines: a ``multiprocessing.Pipe`` peer and a pyzmq ROUTER peer.

The pipe peer runs as a spawned ``multiprocessing.Process``; the pyzmq peer as
``python -m rapace.benchsuite._peers zmq ADDRESS``, which prints READY once bound. Both
answer the same operations: ``add`` (pickled ``(a, b)``), ``len`` of a payload, ``sum`` of a
float64 array, and (the pipe) a stream of ``n`` ints, one message each.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from multiprocessing.connection import Connection
from typing import Any

__all__ = ("serve_pipe", "serve_zmq")

#: Pipe messages: a pickled tuple whose first item is one of these.
ADD, LEN, SUM, ECHO, RAW_NEXT, COUNT = "add", "len", "sum", "echo", "raw", "count"


def serve_pipe(conn: Connection) -> None:
    """Answer one message at a time until the other end closes."""
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        op = message[0]
        if op == ADD:
            conn.send(message[1] + message[2])
        elif op == LEN:
            conn.send(len(message[1]))
        elif op == SUM:
            conn.send(float(message[1].sum()))
        elif op == ECHO:
            conn.send(message[1])
        elif op == RAW_NEXT:  # the next message is a raw buffer (send_bytes), not a pickle
            conn.send(len(conn.recv_bytes()))
        elif op == COUNT:
            for i in range(message[1]):
                conn.send(i)


def _zmq() -> Any:
    return importlib.import_module("zmq")


def serve_zmq(address: str) -> None:
    """A ROUTER socket: frames ``[identity, op, payload]``, replies ``[identity, result]``."""
    zmq = _zmq()
    parent = os.getppid()
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(address)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    try:
        while True:
            if not sock.poll(1000):
                if os.getppid() != parent:  # orphaned
                    return
                continue
            ident, op, payload = sock.recv_multipart(copy=False)
            kind = op.bytes
            if kind == b"add":
                a, b = pickle.loads(payload.buffer)
                sock.send_multipart([ident, pickle.dumps(a + b)])
            elif kind == b"len":
                sock.send_multipart([ident, pickle.dumps(len(payload.buffer))])
            elif kind == b"sum":
                numpy = importlib.import_module("numpy")
                total = float(numpy.frombuffer(payload.buffer, dtype=numpy.float64).sum())
                sock.send_multipart([ident, pickle.dumps(total)])
            else:  # stop
                sock.send_multipart([ident, b""])
                return
    finally:
        sock.close(linger=0)
        context.term()


if __name__ == "__main__":
    if sys.argv[1:2] == ["zmq"]:
        serve_zmq(sys.argv[2])
