"""Rebuild a handler's exception on the caller's side from its :class:`ErrorPayload`.

The rebuilt exception has the handler's type when that type is already imported on this
side and can be constructed from the transmitted args; otherwise it is a
:class:`rapace.RemoteError` naming the remote type. Either way the remote traceback text
hangs off ``__cause__`` as a :class:`RemoteTraceback`, like ``concurrent.futures`` does, and
the remote cause chain, notes and exception-group members come along.

Nothing is imported on a peer's say-so: a type is looked up in ``sys.modules`` only, so a
payload cannot make this process import a module. Only ``Exception`` subclasses are rebuilt:
a peer cannot raise ``SystemExit``, ``KeyboardInterrupt`` or a cancellation here.
"""

from __future__ import annotations

import sys
from typing import Final

from rapace._errors import (
    DeadlineExceeded,
    IncompatibleSchema,
    RemoteError,
    Status,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from rapace.wire import ErrorPayload

__all__ = ("RemoteTraceback", "rebuild_exception")

_MAX_GROUP_DEPTH: Final = 8


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` of a rebuilt exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


_STATUS_ERRORS: Final[dict[Status, type[Exception]]] = {
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
    Status.UNIMPLEMENTED: Unimplemented,
    Status.INCOMPATIBLE_SCHEMA: IncompatibleSchema,
    Status.UNAUTHENTICATED: Unauthenticated,
    Status.UNAVAILABLE: Unavailable,
}


def _find_type(type_name: str) -> type[Exception] | None:
    module_name, _, qualname = type_name.partition(":")
    module = sys.modules.get(module_name)
    if module is None or not qualname:
        return None
    obj: object = module
    for part in qualname.split("."):
        if part.startswith("<"):  # a class defined inside a function: not reachable
            return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def rebuild_exception(payload: ErrorPayload, _depth: int = 0) -> Exception:
    """The exception the caller should see for ``payload``."""
    exc = _construct(payload, _depth)
    if payload.notes:
        exc.__notes__ = list(payload.notes)
    remote = RemoteTraceback(payload.format())
    if payload.cause is not None and _depth < _MAX_GROUP_DEPTH:
        remote.__cause__ = rebuild_exception(payload.cause, _depth + 1)
    elif payload.context is not None and _depth < _MAX_GROUP_DEPTH:
        remote.__context__ = rebuild_exception(payload.context, _depth + 1)
    exc.__cause__ = remote
    return exc


def _construct(payload: ErrorPayload, depth: int) -> Exception:
    exc_type = _find_type(payload.type_name)
    if exc_type is not None and issubclass(exc_type, BaseExceptionGroup):
        members = [
            rebuild_exception(m, depth + 1) for m in payload.exceptions if depth < _MAX_GROUP_DEPTH
        ]
        message = payload.args[0] if payload.args and isinstance(payload.args[0], str) else ""
        if members:
            try:
                group = exc_type(message, members)
            except Exception:  # a custom group with another constructor
                return ExceptionGroup(message or payload.message, members)
            if isinstance(group, Exception):
                return group
    if exc_type is not None:
        try:
            exc = exc_type(*payload.args)
        except Exception:  # not constructible from its args: fall through to RemoteError
            pass
        else:
            if str(exc) == payload.message:
                return exc
    status_type = _STATUS_ERRORS.get(payload.status)
    if status_type is not None and exc_type is None:
        return status_type(payload.message)
    return RemoteError(payload.type_name.replace(":", "."), payload.message)
