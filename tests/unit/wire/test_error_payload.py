"""The error payload carries type, message, args, notes, traceback, causes and groups."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapace import DeadlineExceeded, DecodeError, Status
from rapace.wire import ErrorPayload


def _raise_chain() -> BaseException:
    try:
        try:
            raise KeyError("radius")
        except KeyError as inner:
            raise ValueError("bad options", 7) from inner
    except ValueError as exc:
        exc.add_note("while processing image 7")
        return exc


def test_captures_type_message_args_notes_and_traceback() -> None:
    """Every fact about the exception survives an encode/decode round trip."""
    payload = ErrorPayload.decode(ErrorPayload.from_exception(_raise_chain()).encode())
    assert payload.type_name == "builtins:ValueError"
    assert payload.message == "('bad options', 7)"
    assert payload.args == ("bad options", 7)
    assert payload.notes == ("while processing image 7",)
    assert "_raise_chain" in payload.traceback
    assert payload.status is Status.UNKNOWN


def test_explicit_cause_travels_and_formats_like_python() -> None:
    """``raise ... from`` keeps its cause, and format() prints the chain in order."""
    payload = ErrorPayload.decode(ErrorPayload.from_exception(_raise_chain()).encode())
    assert payload.cause is not None
    assert payload.cause.type_name == "builtins:KeyError"
    assert payload.context is None
    text = payload.format()
    assert text.index("KeyError") < text.index("direct cause") < text.index("ValueError")


def test_implicit_context_travels_unless_suppressed() -> None:
    """An exception raised while handling another keeps it as context."""
    try:
        try:
            raise OSError("disk")
        except OSError:
            raise RuntimeError("cleanup failed") from None
    except RuntimeError as exc:
        suppressed = ErrorPayload.from_exception(exc)
    assert suppressed.suppress_context
    assert "During handling" not in ErrorPayload.decode(suppressed.encode()).format()

    try:
        try:
            raise OSError("disk")
        except OSError:
            raise RuntimeError("cleanup failed")  # noqa: B904  # the implicit context is the point
    except RuntimeError as exc:
        implicit = ErrorPayload.decode(ErrorPayload.from_exception(exc).encode())
    assert implicit.context is not None
    assert implicit.context.type_name == "builtins:OSError"
    assert "During handling" in implicit.format()


def test_exception_groups_keep_their_members() -> None:
    """Members of an ExceptionGroup travel as sub-payloads."""
    group = ExceptionGroup("two failed", [ValueError("a"), TypeError("b")])
    payload = ErrorPayload.decode(ErrorPayload.from_exception(group).encode())
    assert payload.type_name == "builtins:ExceptionGroup"
    assert [e.type_name for e in payload.exceptions] == [
        "builtins:ValueError",
        "builtins:TypeError",
    ]


def test_rapace_errors_carry_their_status() -> None:
    """A rapace exception's status becomes the payload's status."""
    payload = ErrorPayload.from_exception(DeadlineExceeded("too slow"))
    assert payload.status is Status.DEADLINE_EXCEEDED


def test_unportable_args_become_reprs() -> None:
    """Args that cannot travel as plain values are sent as their repr."""

    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    payload = ErrorPayload.decode(ErrorPayload.from_exception(ValueError(Opaque(), 1.5)).encode())
    assert payload.args == ("<Opaque>", 1.5)


def test_broken_str_and_repr_do_not_stop_reporting() -> None:
    """An exception whose __str__ raises is still reported."""

    class Nasty(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    payload = ErrorPayload.from_exception(Nasty())
    assert "unprintable" in payload.message


def test_cause_chain_depth_is_bounded() -> None:
    """A very long chain is cut rather than followed forever."""
    exc: BaseException = ValueError("root")
    for i in range(100):
        nxt = ValueError(str(i))
        nxt.__cause__ = exc
        exc = nxt
    payload = ErrorPayload.decode(ErrorPayload.from_exception(exc).encode())
    depth = 0
    node: ErrorPayload | None = payload
    while node is not None:
        depth += 1
        node = node.cause
    assert depth <= 16


@pytest.mark.parametrize(
    "value",
    [
        [1, 2],
        {"t": "x", "m": "y"},
        {"s": "1", "t": "x", "m": "y"},
        {"s": 1, "t": 3, "m": "y"},
        {"s": 1, "t": "x", "m": "y", "a": [[1]]},
        {"s": 1, "t": "x", "m": "y", "g": [1]},
    ],
)
def test_malformed_maps_are_decode_errors(value: object) -> None:
    """Structurally wrong payloads raise DecodeError."""
    with pytest.raises(DecodeError):
        ErrorPayload.decode(cbor2.dumps(value))


def test_unknown_status_codes_map_to_unknown() -> None:
    """A status this version does not know is read as UNKNOWN, not rejected."""
    payload = ErrorPayload.decode(cbor2.dumps({"s": 4242, "t": "x", "m": "y"}))
    assert payload.status is Status.UNKNOWN


@given(st.binary(max_size=256))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    """Whatever a peer sends, decoding ends in a payload or a DecodeError."""
    with contextlib.suppress(DecodeError):
        ErrorPayload.decode(data)
