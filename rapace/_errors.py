"""Status codes and the whole rapace exception tree.

Every exception rapace defines derives from :class:`RapaceError` and carries a ``status``
(gRPC numbering, plus rapace's own codes from 17 and 50 up). Where an error extends the
contract of a builtin, it also derives from that builtin, so ``except TimeoutError`` catches
:class:`DeadlineExceeded` and ``except concurrent.futures.BrokenExecutor`` catches
:class:`BrokenPluginPool`.

This module imports nothing from rapace: every layer may import it.
"""

from __future__ import annotations

import concurrent.futures
import enum
from typing import ClassVar

__all__ = (
    "BrokenPluginPool",
    "CodecError",
    "DeadlineExceeded",
    "DecodeError",
    "EncodeError",
    "IncompatibleSchema",
    "LocalProtocolError",
    "ProtocolError",
    "RapaceError",
    "RemoteError",
    "RemoteProtocolError",
    "Status",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WorkerCrashed",
)


class Status(enum.IntEnum):
    """Outcome of a call, numbered as in gRPC so the codes mean what people expect."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16
    INCOMPATIBLE_SCHEMA = 17
    PROTOCOL_ERROR = 50
    INVALID_FRAME = 51
    INVALID_CHANNEL = 52
    INVALID_METHOD = 53
    DECODE_ERROR = 54
    ENCODE_ERROR = 55

    @classmethod
    def from_wire(cls, code: int) -> Status:
        """Map a code read off the wire; codes this version does not know become UNKNOWN."""
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


class RapaceError(Exception):
    """Base of every exception rapace raises."""

    status: ClassVar[Status] = Status.UNKNOWN


class ProtocolError(RapaceError):
    """A frame or a message broke the rapace protocol.

    Never raised itself: :class:`LocalProtocolError` means this side tried to do something the
    protocol forbids, :class:`RemoteProtocolError` means the peer sent something invalid.
    """

    status = Status.PROTOCOL_ERROR

    def __init__(self, message: str, *, status: Status | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)
        if status is not None:
            self.status = status  # type: ignore[misc]  # per-instance refinement of the code


class LocalProtocolError(ProtocolError):
    """This side asked for something the protocol does not allow (a caller bug).

    The session stays usable: nothing was sent.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid. The session that received it is finished; nothing
    else is affected."""


class CodecError(RapaceError):
    """A value could not be encoded or decoded."""


class EncodeError(CodecError, TypeError):
    """A value cannot be encoded for its declared type.

    Raised at the call site before anything is sent. The message names the path of the
    offending value, for example ``args[1]["image"]: dtype object is not supported``.
    """

    status = Status.ENCODE_ERROR


class DecodeError(CodecError, ValueError):
    """Bytes received from a peer are not a valid encoding of the declared type.

    Every malformed input the decoder sees ends in this one exception, whatever went wrong
    inside (truncation, bad tags, excessive nesting, limits).
    """

    status = Status.DECODE_ERROR


class RemoteError(RapaceError):
    """A handler raised an exception whose type cannot be rebuilt on this side.

    ``type_name`` is the qualified name of the remote type; the remote traceback text is
    attached as ``__cause__`` by the session.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


class DeadlineExceeded(RapaceError, TimeoutError):
    """The call's deadline (``call_timeout`` or a per-connection default) passed."""

    status = Status.DEADLINE_EXCEEDED


class Unimplemented(RapaceError):
    """The peer does not serve the method that was called."""

    status = Status.UNIMPLEMENTED


class IncompatibleSchema(RapaceError):
    """Host and plugin disagree on a method's signature (different versions of a service)."""

    status = Status.INCOMPATIBLE_SCHEMA


class Unauthenticated(RapaceError):
    """A listener refused the token offered, or none was offered."""

    status = Status.UNAUTHENTICATED


class Unavailable(RapaceError):
    """The peer is shutting down (it sent GoAway) or refused a new call for now; retrying on
    another connection may succeed."""

    status = Status.UNAVAILABLE


class WorkerCrashed(RapaceError):
    """The worker process died while this call was in flight.

    Only calls in flight on that worker fail; the pool replaces the worker.
    """

    status = Status.UNAVAILABLE

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        exitcode: int | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.method = method


class BrokenPluginPool(RapaceError, concurrent.futures.BrokenExecutor):
    """Workers cannot be started: ``max_restarts`` consecutive starts failed.

    The last worker's start-up traceback is attached as ``__cause__``.
    """

    status = Status.UNAVAILABLE
