"""The payload of an error response: what a caller needs to rebuild a handler's exception.

Encoded as a CBOR map with short keys::

    "s"  status code (int)             "t"  exception type, "module:qualname"
    "m"  str(exception)                "a"  args, each CBOR-native or its repr()
    "n"  notes (list of str)           "tb" remote traceback text
    "c"  cause (an error map)          "x"  context, when there is no explicit cause
    "sc" suppress_context (bool)       "g"  sub-exceptions of an exception group

The caller decides how to rebuild the exception (importable and constructible type, or
RemoteError); this module only carries the facts, and decoding trusts nothing: depth, list
lengths and string sizes are bounded.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Final

import cbor2
from typing_extensions import Buffer

from rapace._errors import DecodeError, RapaceError, Status

__all__ = ("ErrorPayload",)

_MAX_CHAIN: Final = 16  # cause/context links followed when encoding and accepted when decoding
_MAX_GROUP: Final = 64  # sub-exceptions of a group carried
_MAX_ARGS: Final = 32
_MAX_TEXT: Final = 256 * 1024  # a remote traceback can be long; a megabyte of it is not useful
_MAX_DEPTH: Final = 3 * _MAX_CHAIN + 8
_NATIVE: Final = (str, int, float, bool, bytes, type(None))


@dataclass(frozen=True, slots=True)
class ErrorPayload:
    """A handler's exception, flattened into plain data."""

    status: Status
    type_name: str
    message: str
    args: tuple[object, ...] = ()
    notes: tuple[str, ...] = ()
    traceback: str = ""
    cause: ErrorPayload | None = None
    context: ErrorPayload | None = None
    suppress_context: bool = False
    exceptions: tuple[ErrorPayload, ...] = ()

    @classmethod
    def from_exception(
        cls, exc: BaseException, *, status: Status | None = None, _depth: int = 0
    ) -> ErrorPayload:
        """Capture ``exc`` with its notes, traceback, cause chain and group members."""
        if status is None:
            status = exc.status if isinstance(exc, RapaceError) else Status.UNKNOWN
        exc_type = type(exc)
        deeper = _depth + 1 < _MAX_CHAIN
        cause = exc.__cause__
        context = exc.__context__
        members: tuple[BaseException, ...] = ()
        if isinstance(exc, BaseExceptionGroup):
            members = tuple(exc.exceptions[:_MAX_GROUP])
        return cls(
            status=status,
            type_name=f"{exc_type.__module__}:{exc_type.__qualname__}",
            message=_clip(_safe_str(exc)),
            args=tuple(_portable(a) for a in exc.args[:_MAX_ARGS]),
            notes=tuple(_clip(str(n)) for n in getattr(exc, "__notes__", ())[:_MAX_ARGS]),
            traceback=_clip("".join(traceback.format_exception(exc, chain=False))),
            cause=cls.from_exception(cause, _depth=_depth + 1) if cause and deeper else None,
            context=(
                cls.from_exception(context, _depth=_depth + 1)
                if context is not None and cause is None and deeper
                else None
            ),
            suppress_context=exc.__suppress_context__,
            exceptions=tuple(cls.from_exception(m, _depth=_depth + 1) for m in members),
        )

    def encode(self) -> bytes:
        """The CBOR payload of an error frame."""
        return cbor2.dumps(self._to_map())

    @classmethod
    def decode(cls, payload: Buffer) -> ErrorPayload:
        """Decode an error frame's payload.

        Raises:
            DecodeError: the payload is not a well-formed error map.
        """
        try:
            value = cbor2.loads(payload, max_depth=_MAX_DEPTH, allow_indefinite=False)
            return cls._from_map(value, 0)
        except DecodeError:
            raise
        except Exception as exc:  # cbor2 and the field checks raise several types
            raise DecodeError(f"malformed error payload: {exc}") from exc

    def _to_map(self) -> dict[str, object]:
        out: dict[str, object] = {"s": int(self.status), "t": self.type_name, "m": self.message}
        if self.args:
            out["a"] = list(self.args)
        if self.notes:
            out["n"] = list(self.notes)
        if self.traceback:
            out["tb"] = self.traceback
        if self.cause is not None:
            out["c"] = self.cause._to_map()
        if self.context is not None:
            out["x"] = self.context._to_map()
        if self.suppress_context:
            out["sc"] = True
        if self.exceptions:
            out["g"] = [e._to_map() for e in self.exceptions]
        return out

    @classmethod
    def _from_map(cls, value: object, depth: int) -> ErrorPayload:
        if depth > _MAX_CHAIN:
            raise DecodeError("error payload nests causes too deeply")
        if not isinstance(value, dict):
            raise DecodeError("error payload is not a map")
        code = value.get("s")
        if type(code) is not int:
            raise DecodeError("error payload has no integer status")
        args = _list(value.get("a", []), "args", _MAX_ARGS)
        if not all(isinstance(a, _NATIVE) for a in args):
            raise DecodeError("error args must be plain values")
        notes = [_text(n, "note") for n in _list(value.get("n", []), "notes", _MAX_ARGS)]
        group = _list(value.get("g", []), "exceptions", _MAX_GROUP)
        cause = value.get("c")
        context = value.get("x")
        return cls(
            status=Status.from_wire(code),
            type_name=_text(value.get("t"), "type"),
            message=_text(value.get("m"), "message"),
            args=tuple(args),
            notes=tuple(notes),
            traceback=_text(value.get("tb", ""), "traceback"),
            cause=None if cause is None else cls._from_map(cause, depth + 1),
            context=None if context is None else cls._from_map(context, depth + 1),
            suppress_context=value.get("sc", False) is True,
            exceptions=tuple(cls._from_map(e, depth + 1) for e in group),
        )

    def format(self) -> str:
        """The remote traceback text, with its cause chain, as Python would print it."""
        parts: list[str] = []
        if self.cause is not None:
            parts += [self.cause.format(), "\nThe above exception was the direct cause of:\n\n"]
        elif self.context is not None and not self.suppress_context:
            parts += [self.context.format(), "\nDuring handling of the above exception:\n\n"]
        parts.append(self.traceback or f"{self.type_name}: {self.message}\n")
        return "".join(parts)


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not stop the error from being reported
        return f"<unprintable {type(exc).__qualname__}>"


def _portable(value: object) -> object:
    """``value`` if the caller can decode it without knowing any type, else its repr.

    Only flat native values go as themselves: args are for rebuilding the exception, and a
    repr keeps a message readable when the value itself cannot travel.
    """
    if type(value) is str:
        return _clip(value)
    if type(value) in _NATIVE:  # exact types: an IntEnum arg would decode as a bare int
        return value
    try:
        return _clip(repr(value))
    except Exception:  # a broken __repr__ must not stop the error from being reported
        return f"<unrepresentable {type(value).__qualname__}>"


def _clip(text: object) -> str:
    assert isinstance(text, str)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "... [truncated]"


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT + 64:
        raise DecodeError(f"error payload {what} must be a string")
    return value


def _list(value: object, what: str, limit: int) -> list[object]:
    if not isinstance(value, list) or len(value) > limit:
        raise DecodeError(f"error payload {what} must be a list of at most {limit} items")
    return value
