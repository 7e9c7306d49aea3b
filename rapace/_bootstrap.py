"""What a host hands a worker it starts, and how each side uses it.

The host passes one environment variable, ``RAPACE_WORKER``, holding JSON that names
inherited file descriptors and plain values; nothing secret or large goes into the
environment. The service class and its constructor arguments travel in an inherited memfd as
cloudpickle bytes: cloudpickle pickles an importable class by reference and a class from
``__main__`` or a notebook cell by value, so the worker never re-runs the user's script.
This is the only pickle in rapace, written by the host for a worker it started itself,
outside any session.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ("ENV_VAR", "Bootstrap", "read_all", "write_service_payload")

ENV_VAR = "RAPACE_WORKER"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """Everything a worker reads at start-up (see the module docstring)."""

    index: int
    host_pid: int
    death_fd: int  # read end of a pipe only the host writes: EOF = host gone
    status_fd: int  # write end of a pipe for a start-up traceback
    service_fd: int  # memfd with cloudpickle bytes of (service, args, kwargs)
    transport: str  # "shm", "unix" or "tcp"
    link: str = ""  # shm: the LinkOffer; unix: the socket fd; tcp: the URL
    token: str = ""  # tcp only
    backend: str = "asyncio"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_environment(self) -> str:
        return json.dumps({"v": _VERSION, **asdict(self)})

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Bootstrap:
        raw = (environ if environ is not None else os.environ).get(ENV_VAR)
        if raw is None:
            raise SystemExit(
                "rapace.worker is started by rapace.PluginPool; it is not meant to be run by hand"
            )
        data = json.loads(raw)
        if data.pop("v", None) != _VERSION:
            raise SystemExit("rapace.worker: the host speaks another bootstrap version")
        return cls(**data)

    def load_service(self) -> tuple[type, tuple[Any, ...], dict[str, Any]]:
        import cloudpickle

        payload = read_all(self.service_fd)
        os.close(self.service_fd)
        service, args, kwargs = cloudpickle.loads(payload)
        return service, tuple(args), dict(kwargs)

    def open_transport(self) -> Any:
        """The worker's end of the link (a Transport), before any I/O."""
        if self.transport == "shm":
            return self._attach(self.link)
        if self.transport == "unix":
            from rapace.streams._stream_transport import StreamTransport
            from rapace.streams._unix import UnixByteStream

            sock = socket.socket(fileno=int(self.link))
            return StreamTransport(UnixByteStream(sock))
        if self.transport == "tcp":
            return _LazyTcp(self.link, self.token)
        raise SystemExit(f"rapace.worker: unknown transport {self.transport!r}")

    def open_lane(self) -> Any:
        """The worker's end of its direct lane (rapace._lane), or None without one."""
        lane = self.extra.get("lane")
        return self._attach(lane) if self.transport == "shm" and lane else None

    def _attach(self, offer: str) -> Any:
        from rapace.shm import attach_link
        from rapace.shm._arena import ArenaMap

        spin = self.extra.get("spin")
        transport = attach_link(
            offer,
            peer_liveness_fd=self.death_fd,
            **({"spin": float(spin)} if spin is not None else {}),
        )
        transport.buffers.arena = ArenaMap(self.host_pid)  # maps blocks as referenced
        return transport


class _LazyTcp:
    """A TCP link is connected inside the event loop; the worker opens it there."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token


def write_service_payload(payload: bytes) -> int:
    """An inheritable-on-request memfd holding ``payload``, positioned at its start."""
    fd = os.memfd_create("rapace-service", os.MFD_CLOEXEC)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
