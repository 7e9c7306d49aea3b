"""@rapace.service: schema, method ids, kinds, describe(), and decoration-time errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from typing import Any, Literal, Optional, Union

import pytest

from rapace._errors import IncompatibleSchema
from rapace.service import (
    MethodSpec,
    ServiceDefinitionError,
    Streaming,
    bind_arguments,
    describe,
    service,
    service_spec,
    type_repr,
)
from rapace.wire import CallKind, MethodEntry, Role, Session


@dataclasses.dataclass
class Point:
    x: float
    y: float


@service
class Calculator:
    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    async def add(self, a: int, b: int) -> int:
        return a + b + self.offset

    async def range(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i

    async def total(self, xs: Streaming[int]) -> int:
        return sum([x async for x in xs])

    async def scale(self, xs: Streaming[float], k: float) -> Streaming[float]:
        async for x in xs:
            yield x * k

    def norm(self, p: Point, *, squared: bool = False) -> float:
        n = p.x * p.x + p.y * p.y
        return n if squared else n**0.5

    def _helper(self) -> None:
        """Private: not an RPC method."""


def test_methods_kinds_and_ids() -> None:
    """Each public method becomes a MethodSpec of the right kind with the published id."""
    spec = service_spec(Calculator)
    kinds = {m.name: m.kind for m in spec.methods}
    assert kinds == {
        "add": CallKind.UNARY,
        "range": CallKind.SERVER_STREAMING,
        "total": CallKind.CLIENT_STREAMING,
        "scale": CallKind.BIDI_STREAMING,
        "norm": CallKind.UNARY,
    }
    assert spec.by_name["add"].method_id == 0x193FA158
    assert spec.by_id[0x193FA158].name == "add"
    assert spec.by_name["norm"].is_sync
    assert not spec.by_name["add"].is_sync


def test_string_annotations_are_resolved() -> None:
    """This module uses `from __future__ import annotations`; hints are real types."""
    add = service_spec(Calculator).by_name["add"]
    assert [p.annotation for p in add.params] == [int, int]
    assert add.returns is int
    scale = service_spec(Calculator).by_name["scale"]
    assert scale.stream_param is not None
    assert scale.stream_param.annotation is float
    assert [p.name for p in scale.value_params] == ["k"]


def test_describe_is_plain_json_data() -> None:
    """describe() matches API.md's shape and json.dumps accepts it."""
    data = describe(Calculator)
    assert json.loads(json.dumps(data)) == data
    assert data["name"] == "Calculator"
    methods = {m["name"]: m for m in data["methods"]}  # type: ignore[attr-defined]
    assert methods["add"] == {
        "name": "add",
        "id": 423600472,
        "kind": "unary",
        "params": [{"name": "a", "type": "int"}, {"name": "b", "type": "int"}],
        "returns": "int",
    }
    assert methods["range"]["returns"] == "Streaming[int]"
    assert methods["total"]["params"] == [{"name": "xs", "type": "Streaming[int]"}]
    assert methods["norm"]["params"][0] == {"name": "p", "type": "Point"}


def test_instances_and_implementations_share_the_interface_schema() -> None:
    """An implementation subclass keeps the decorated interface's name and ids."""

    @service
    class Vfs:
        async def read(self, path: str) -> bytes: ...

    class LocalVfs(Vfs):
        async def read(self, path: str) -> bytes:
            return path.encode()

    assert service_spec(LocalVfs) is service_spec(Vfs)
    assert service_spec(LocalVfs()).by_name["read"].method_id == 0xC8C061C2


def test_non_service_is_rejected() -> None:
    """service_spec on an undecorated class says how to fix it."""

    class Plain:
        pass

    with pytest.raises(TypeError, match="@service"):
        service_spec(Plain)


def _define(body: dict[str, Any]) -> type:
    return service(type("Bad", (), body))


async def _agen(self: object) -> Streaming[int]:
    yield 1


def _var_args(self: object, *values: int) -> int:
    return 0


def _var_kwargs(self: object, **options: int) -> int:
    return 0


async def _two_streams(self: object, a: Streaming[int], b: Streaming[int]) -> int:
    return 0


def _sync_stream_return(self: object) -> Streaming[int]:
    raise NotImplementedError


def _sync_generator(self: object) -> Any:
    yield 1


async def _untyped_agen(self: object) -> int:  # type: ignore[misc]
    yield 1


def _sync_stream_param(self: object, xs: Streaming[int]) -> int:
    return 0


async def _complex_param(self: object, z: complex) -> int:
    return 0


async def _literal_return(self: object) -> Literal["a", "b"]:
    return "a"


async def _stream_of_unsupported(self: object, xs: Streaming[complex]) -> int:
    return 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"f": _var_args}, r"\*values"),
        ({"f": _var_kwargs}, r"\*\*options|\*options"),
        ({"f": _two_streams}, "at most one Streaming parameter"),
        ({"f": _sync_stream_return}, "must be 'async def'"),
        ({"f": _sync_generator}, "plain generator"),
        ({"f": _untyped_agen}, r"Streaming\[T\]"),
        ({"f": _sync_stream_param}, "must be 'async def'"),
        ({"f": staticmethod(lambda: 1)}, "static and class methods"),
        ({"f": _complex_param}, "z: unsupported type annotation complex"),
        ({"f": _literal_return}, "return value: unsupported type annotation Literal"),
        ({"f": _stream_of_unsupported}, r"xs\[item\]: unsupported type"),
    ],
)
def test_unsupported_signatures_fail_at_decoration(body: dict[str, Any], message: str) -> None:
    """Each unsupported shape fails when the class is decorated, naming the method."""
    with pytest.raises(ServiceDefinitionError, match=message) as info:
        _define(body)
    assert "Bad.f" in str(info.value)


# `rapace.service` is the decorator; the module of the same name lives in sys.modules.
service_module = sys.modules["rapace.service"]


def test_method_id_zero_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name hashing to id 0 fails at decoration (0 is reserved)."""
    monkeypatch.setattr(service_module, "method_id", lambda s, m: 0)
    with pytest.raises(ServiceDefinitionError, match="method id 0"):
        _define({"f": _agen})


def test_method_id_collision_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two methods with the same id in one service fail at decoration."""
    monkeypatch.setattr(service_module, "method_id", lambda s, m: 7)
    with pytest.raises(ServiceDefinitionError, match="share method id"):
        _define({"f": _agen, "g": _agen})


def test_signature_hash_tracks_structure() -> None:
    """Changing a dataclass field changes the hash; renaming nothing keeps it."""

    def build(point_type: type) -> bytes:
        async def f(self: object, p: point_type) -> int:  # type: ignore[valid-type]
            return 0

        f.__annotations__ = {"p": point_type, "return": int}
        return service_spec(_define({"f": f})).by_name["f"].sig_hash

    @dataclasses.dataclass
    class V1:
        x: int

    @dataclasses.dataclass
    class V1Again:
        x: int

    @dataclasses.dataclass
    class V2:
        x: int
        y: int

    V1Again.__qualname__ = V1.__qualname__
    assert build(V1) == build(V1Again)
    assert build(V1) != build(V2)
    assert len(build(V1)) == 32


@dataclasses.dataclass
class Segment:
    start: Point
    end: Point


def _method(annotations: dict[str, Any]) -> MethodSpec:
    async def f(self: object, p: Any) -> Any:
        return p

    f.__annotations__ = annotations
    return service_spec(_define({"f": f})).by_name["f"]


def _sketch(parts: Any) -> type:
    """A dataclass named Sketch holding a union: the same structure, whatever ``parts`` order."""
    cls = dataclasses.make_dataclass("Sketch", [("parts", parts)])
    cls.__qualname__ = "Sketch"
    return cls


UNIONS_IN_EITHER_ORDER: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"p": Point | Segment, "return": int}, {"p": Segment | Point, "return": int}),
    ({"p": Union[Point, Segment], "return": int}, {"p": Segment | Point, "return": int}),  # noqa: UP007
    ({"p": int, "return": Optional[str]}, {"p": int, "return": None | str}),  # noqa: UP045
    ({"p": list[Point | None], "return": int}, {"p": list[None | Point], "return": int}),  # noqa: RUF036
    (
        {"p": dict[str, tuple[Point | Segment, int]], "return": int},
        {"p": dict[str, tuple[Segment | Point, int]], "return": int},
    ),
    (
        {"p": _sketch(list[Point | Segment]), "return": int},
        {"p": _sketch(list[Segment | Point]), "return": int},
    ),
]


def _signature_id(annotations: dict[str, Any]) -> str:
    return f"{type_repr(annotations['p'])} -> {type_repr(annotations['return'])}"


@pytest.mark.parametrize(("forward", "backward"), UNIONS_IN_EITHER_ORDER, ids=_signature_id)
def test_signature_hash_does_not_depend_on_the_order_of_union_members(
    forward: dict[str, Any], backward: dict[str, Any]
) -> None:
    """``A | B == B | A`` and typing's caches may give a process either: one hash for both,
    and a Hello announcing one lets a caller holding the other through."""
    served, calling = _method(forward), _method(backward)
    assert served.sig_hash == calling.sig_hash
    caller = Session(Role.INITIATOR)
    server = Session(Role.ACCEPTOR, methods=[MethodEntry(served.method_id, "f", served.sig_hash)])
    for frame in caller.frames_to_send():
        server.receive_frame(frame, 0)
    for frame in server.frames_to_send():
        caller.receive_frame(frame, 0)
    caller.open_call(calling.method_id, b"", now_ns=0, sig_hash=calling.sig_hash)
    changed = _method({**backward, "return": float})
    with pytest.raises(IncompatibleSchema):
        caller.open_call(changed.method_id, b"", now_ns=0, sig_hash=changed.sig_hash)


@pytest.mark.parametrize(
    ("tp", "returns"),
    [
        (int | None, Point | str),  # the canonical order: hashed as before there was one
        (None | int, str | Point),
        (Optional[int], Union[str, Point]),  # noqa: UP007, UP045
        (Union[None, int], Union[Point, str]),  # noqa: UP007
    ],
    ids=["canonical", "reversed", "typing", "typing-reversed"],
)
def test_a_union_is_hashed_under_one_name_with_its_members_in_canonical_order(
    tp: Any, returns: Any
) -> None:
    """Whatever the spelling: named UnionType, members sorted by their key (``"Point"`` before
    ``"str"``) and described in full, ``None`` last, where ``T | None`` always had it."""
    point = ["dataclass", "Point", [["x", "float"], ["y", "float"]]]
    described = [
        0,
        [["p", False, False, ["UnionType", ["int", "None"]]]],
        ["UnionType", [point, "str"]],
    ]
    expected = hashlib.sha256(json.dumps(described, separators=(",", ":")).encode()).digest()
    assert _method({"p": tp, "return": returns}).sig_hash == expected


def test_a_union_the_codec_cannot_number_fails_the_definition() -> None:
    other = dataclasses.make_dataclass("Point", [("x", float), ("y", float)])
    other.__module__ = "elsewhere"
    with pytest.raises(ServiceDefinitionError, match=r"Bad\.f: p: .*two classes of one name"):
        _method({"p": list[Point] | list[other], "return": int})  # type: ignore[valid-type]


def test_bind_arguments_applies_defaults_in_order() -> None:
    """Positional, keyword and default arguments bind in declaration order."""
    norm = service_spec(Calculator).by_name["norm"]
    assert bind_arguments(norm, (Point(3, 4),), {}) == [Point(3, 4), False]
    assert bind_arguments(norm, (), {"p": Point(1, 0), "squared": True}) == [Point(1, 0), True]
    with pytest.raises(TypeError):
        bind_arguments(norm, (1, 2, 3), {})
