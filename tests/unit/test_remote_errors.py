"""Rebuilding a handler's exception on the caller's side."""

from __future__ import annotations

import pytest

from rapace import DeadlineExceeded, RemoteError, Status
from rapace._remote_errors import RemoteTraceback, rebuild_exception
from rapace.wire import ErrorPayload


class PluginFailure(Exception):
    """An ordinary custom exception: its args rebuild it."""


class Unconstructible(Exception):
    def __init__(self) -> None:
        super().__init__("fixed")


def _round_trip(exc: BaseException) -> Exception:
    return rebuild_exception(ErrorPayload.decode(ErrorPayload.from_exception(exc).encode()))


def test_builtin_type_is_rebuilt_with_traceback_as_cause() -> None:
    """ValueError stays ValueError; the remote traceback hangs off __cause__."""
    try:
        raise ValueError("bad")
    except ValueError as exc:
        rebuilt = _round_trip(exc)
    assert type(rebuilt) is ValueError
    assert str(rebuilt) == "bad"
    assert isinstance(rebuilt.__cause__, RemoteTraceback)
    assert "test_builtin_type_is_rebuilt" in rebuilt.__cause__.text


def test_imported_custom_type_with_its_args() -> None:
    """A custom exception already imported here is rebuilt from its args."""
    rebuilt = _round_trip(PluginFailure("disk full", 28))
    assert type(rebuilt) is PluginFailure
    assert rebuilt.args == ("disk full", 28)


def test_unconstructible_or_unknown_types_become_remote_error() -> None:
    """A type that cannot be rebuilt faithfully, or is unknown here, is RemoteError."""
    rebuilt = _round_trip(Unconstructible())
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.type_name.endswith("Unconstructible")
    payload = ErrorPayload(Status.UNKNOWN, "not_imported_module:Boom", "kaboom")
    unknown = rebuild_exception(payload)
    assert isinstance(unknown, RemoteError)
    assert str(unknown) == "not_imported_module.Boom: kaboom"


def test_base_exceptions_are_never_raised_here() -> None:
    """A peer cannot make the caller raise SystemExit or KeyboardInterrupt."""
    for name in ("builtins:SystemExit", "builtins:KeyboardInterrupt", "builtins:GeneratorExit"):
        rebuilt = rebuild_exception(ErrorPayload(Status.UNKNOWN, name, ""))
        assert isinstance(rebuilt, RemoteError)


def test_status_errors_map_to_rapace_types() -> None:
    """A DEADLINE_EXCEEDED status from an unknown type maps to DeadlineExceeded."""
    rebuilt = rebuild_exception(ErrorPayload(Status.DEADLINE_EXCEEDED, "x:Y", "late"))
    assert isinstance(rebuilt, DeadlineExceeded)


def test_exception_groups_keep_members_and_notes() -> None:
    """Groups come back as groups with rebuilt members; notes survive."""
    group = ExceptionGroup("two", [ValueError("a"), KeyError("b")])
    group.add_note("from the plugin")
    rebuilt = _round_trip(group)
    assert isinstance(rebuilt, ExceptionGroup)
    assert [type(e) for e in rebuilt.exceptions] == [ValueError, KeyError]
    assert rebuilt.__notes__ == ["from the plugin"]


def test_cause_chain_is_rebuilt_below_the_traceback() -> None:
    """The remote cause is reachable as __cause__.__cause__."""
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        rebuilt = _round_trip(exc)
    assert isinstance(rebuilt, RuntimeError)
    assert rebuilt.__cause__ is not None
    assert isinstance(rebuilt.__cause__.__cause__, KeyError)
    with pytest.raises(RuntimeError, match="outer"):
        raise rebuilt
