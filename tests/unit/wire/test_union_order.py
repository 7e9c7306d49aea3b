"""A union's member indices do not depend on the order a process happened to get it in.

``A | B == B | A``, and typing's caches and the codec's (both by equality) hand a process
whichever spelling it built first: its members are numbered in a canonical order instead
(``member_key``), the same in every process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import operator
import subprocess
import sys
from collections.abc import Iterator
from functools import reduce
from pathlib import Path
from typing import Annotated, Any, NewType, get_origin
from unittest import mock

import cbor2
import pytest

from rapace._errors import EncodeError
from rapace.wire._codec import TypeCodec
from rapace.wire._codec_core import _NODES, TAG_UNION, label_of
from tests.property.strategies import same
from tests.unit.wire.union_peer import OtherPoint, Point

ROOT = Path(__file__).parents[3]


@contextlib.contextmanager
def fresh_nodes() -> Iterator[None]:
    """Compile as a process that has not met any of these annotations yet."""
    with mock.patch.dict(_NODES, clear=True):
        yield


def built_first(*members: Any) -> TypeCodec[Any]:
    """The codec of the union of ``members``, compiled from that order of its members."""
    with fresh_nodes():
        return TypeCodec(reduce(operator.or_, members))


@dataclasses.dataclass
class Circle:
    r: float


def _id(x: Any) -> str:
    """Members as the union they make, values as they are."""
    if type(x) is tuple and all(m is None or isinstance(m, type) or get_origin(m) for m in x):
        return " | ".join(map(label_of, x))
    return repr(x)


# -- across processes -------------------------------------------------------------------------


def _peer(order: str, mode: str, stdin: str = "") -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.unit.wire.union_peer", order, mode],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_processes_that_met_the_union_in_opposite_orders_read_each_other() -> None:
    """Each process first builds ``Point | OtherPoint`` in one order, which its caches keep;
    payloads (unions bare, in lists, dicts, dataclasses, named tuples, typed dicts) and
    signature hashes must agree anyway."""
    po = _peer("po", "encode")
    op = _peer("op", "encode")
    assert po["payloads"] == op["payloads"]
    op_reads_po = _peer("op", "decode", json.dumps(po))
    po_reads_op = _peer("po", "decode", json.dumps(op))
    assert op_reads_po["wrong"] == []
    assert po_reads_op["wrong"] == []
    assert po["hashes"] == op["hashes"] == op_reads_po["hashes"] == po_reads_op["hashes"]


# -- in one process, around the caches --------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "value"),
    [
        ((Point, OtherPoint), Point(1, 2)),
        ((Point, OtherPoint), OtherPoint(1, 2)),
        ((Point, OtherPoint, Circle), Circle(0.5)),
        ((Point, OtherPoint, None), None),
        ((list[Point], list[OtherPoint]), [OtherPoint(1, 2)]),
        ((list[float], list[int]), [0]),
        ((list[float], list[int]), [1, 0.5]),  # held by neither: converted the same way
        ((int, float), True),
        ((tuple[Point, int], tuple[OtherPoint, int]), (Point(1, 2), 3)),
    ],
    ids=_id,
)
def test_codecs_built_from_either_order_interoperate(members: tuple[Any, ...], value: Any) -> None:
    forward = built_first(*members)
    backward = built_first(*reversed(members))
    sent = forward.encode(value).data
    assert backward.encode(value).data == sent  # the same member, the same index
    assert same(backward.decode(sent), forward.decode(sent))
    assert same(forward.decode(sent), TypeCodec(reduce(operator.or_, members)).decode(sent))


def test_unions_nested_in_lists_and_dataclasses_interoperate() -> None:
    forward = dataclasses.make_dataclass("Holder", [("shapes", list[Point | OtherPoint])])
    backward = dataclasses.make_dataclass("Holder", [("shapes", list[OtherPoint | Point])])
    with fresh_nodes():
        codec_f: TypeCodec[Any] = TypeCodec(list[forward])  # type: ignore[valid-type]
    with fresh_nodes():
        codec_b: TypeCodec[Any] = TypeCodec(list[backward])  # type: ignore[valid-type]
    shapes = [Point(1, 2), OtherPoint(3, 4)]
    assert same(codec_b.decode(codec_f.encode([forward(shapes)]).data), [backward(shapes)])
    back = codec_f.decode(codec_b.encode([backward(shapes[::-1])]).data)
    assert same(back, [forward(shapes[::-1])])


def test_the_index_is_the_place_in_the_canonical_order() -> None:
    """Members sorted by the compact JSON of their description by name, None last."""

    def index(tp: Any, value: Any) -> int:
        tag = cbor2.loads(TypeCodec(tp).encode(value).data)
        assert tag.tag == TAG_UNION
        return int(tag.value[0])

    assert index(Point | OtherPoint, OtherPoint(1, 2)) == 0
    assert index(Point | OtherPoint, Point(1, 2)) == 1
    assert index(None | Point | OtherPoint, None) == 2
    assert index(list[str] | list[float] | Point, Point(1, 2)) == 0  # '"' sorts before '['
    assert index(list[str] | list[float] | Point, ["x"]) == 2


# -- members a key leaves tied ----------------------------------------------------------------

UserId = NewType("UserId", int)


@pytest.mark.parametrize(
    ("members", "value"),
    [
        ((list[int], list[Annotated[int, "meta"]], list[str]), [1]),
        ((list[UserId], list[int], list[str]), [1]),
    ],
    ids=_id,
)
def test_members_compiled_alike_may_share_a_key(members: tuple[Any, ...], value: Any) -> None:
    """Which of them an index names does not matter: both decode the same."""
    forward = built_first(*members)
    backward = built_first(*reversed(members))
    assert same(backward.decode(forward.encode(value).data), value)
    assert same(forward.decode(backward.encode(value).data), value)


def _renamed(cls: type, module: str, qualname: str) -> type:
    cls.__module__ = module
    cls.__qualname__ = qualname
    return cls


def test_classes_of_one_name_in_a_tagged_union_are_refused() -> None:
    @dataclasses.dataclass
    class A:
        x: int

    @dataclasses.dataclass
    class B:
        x: int

    first = _renamed(A, "shapes.a", "Point")
    second = _renamed(B, "shapes.b", "Point")
    with pytest.raises(EncodeError, match=r"shapes\.a\.Point and shapes\.b\.Point, two classes"):
        TypeCodec(first | second)
    # Nested: the union's own compilation refuses it, and the path says where.
    with pytest.raises(EncodeError, match=r"^value\[\*\]: Point \| Point cannot be sent"):
        TypeCodec(list[first | second])  # type: ignore[valid-type]


def test_a_class_defined_again_beside_its_old_self_is_refused() -> None:
    """A notebook cell run twice: two classes of one module and qualified name."""

    def define() -> type:
        @dataclasses.dataclass
        class Point:
            x: int

        return Point

    old, new = define(), define()
    assert (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)
    with pytest.raises(EncodeError, match=r"two different classes both named .*\(one defined"):
        TypeCodec(list[old] | list[new])  # type: ignore[valid-type]
    # One of them alone is fine, and so is the new one beside other classes.
    assert TypeCodec(new | Point).decode(TypeCodec(new | Point).encode(new(1)).data) == new(1)


def test_classes_of_one_name_in_a_bare_union_are_fine() -> None:
    """No index on the wire: the decoder goes by CBOR type, and their order does not matter."""
    numbers = _renamed(enum.Enum("Color", {"RED": 1, "BLUE": 2}), "paint.a", "Color")  # type: ignore[arg-type]
    names = _renamed(enum.Enum("Color", {"RED": "r", "BLUE": "b"}), "paint.b", "Color")  # type: ignore[arg-type]
    for value in (numbers.RED, names.BLUE):  # type: ignore[attr-defined]
        forward = built_first(numbers, names)
        backward = built_first(names, numbers)
        assert backward.decode(forward.encode(value).data) is value
