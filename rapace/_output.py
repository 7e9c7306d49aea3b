"""Forwarding a worker's stdout and stderr to the host's, a line at a time, prefixed.

Workers write to pipes; the host reads them on the pool's loop and writes whole lines to its
own ``sys.stdout``/``sys.stderr`` (a terminal, a log, or the notebook cell that runs), each
prefixed with the worker's index so interleaved output stays readable. The last lines of
stderr are kept: a worker that dies during start-up without a traceback of rapace's own (a
plugin program failing before it attaches) is explained by what it printed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from typing import TextIO

import anyio

__all__ = ("forward_lines",)

TAIL_LINES = 40


async def forward_lines(
    fd: int, stream_name: str, prefix: str, tail: deque[str] | None = None
) -> None:
    """Copy lines from ``fd`` (non-blocking, owned by the caller) until EOF."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            try:
                await anyio.wait_readable(fd)
            except (anyio.ClosedResourceError, OSError):
                break
            continue
        except OSError:
            break
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if lines:
            _emit(stream_name, prefix, lines, tail)
    if pending:
        _emit(stream_name, prefix, [pending], tail)


def _emit(stream_name: str, prefix: str, lines: list[bytes], tail: deque[str] | None) -> None:
    text = [line.decode("utf-8", "replace") for line in lines]
    if tail is not None:
        tail.extend(text)
    stream: TextIO | None = getattr(sys, stream_name, None)
    if stream is None:
        return
    with contextlib.suppress(Exception):  # a closed or broken stream must not stop the pool
        stream.write("".join(f"{prefix}{line}\n" for line in text))
        stream.flush()


def new_tail() -> deque[str]:
    return deque(maxlen=TAIL_LINES)
