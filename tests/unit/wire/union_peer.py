"""One process of the cross-process union tests (``test_union_order.py``).

``python -m tests.unit.wire.union_peer ORDER encode`` first builds ``Point | OtherPoint`` in
the ORDER given (``po`` or ``op``), as a process that happened to meet that spelling first
would: typing's caches and the codec's keep it and hand it back for the other spelling. Then it
prints, as JSON, the payloads of :func:`cases` and the signature hashes of :func:`shapes`.
``... ORDER decode`` primes the same way, reads that JSON and decodes every payload, printing
the ones that do not come back with exactly their value, and its own hashes.

Annotations are strings (``from __future__ import annotations``) so that they are resolved
after the priming, when the codec compiles them, as in a worker that unpickles a schema.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from typing import Any, NamedTuple, Optional, TypedDict, Union

from rapace.service import service, service_spec
from rapace.wire import codec_for


@dataclasses.dataclass
class Point:
    x: int
    y: int


@dataclasses.dataclass
class OtherPoint:  # same fields: only the member index tells the two apart on the wire
    x: int
    y: int


@dataclasses.dataclass
class Holder:
    shape: Point | OtherPoint
    shapes: typing.List[Union[Point, OtherPoint]]  # noqa: UP006, UP007


class Pair(NamedTuple):
    first: Optional[Union[Point, OtherPoint]]  # noqa: UP007, UP045
    second: list[OtherPoint | Point | None]


class Named(TypedDict):
    shape: Union[OtherPoint, Point]  # noqa: UP007


def prime(order: str) -> None:
    first: Any = Union[Point, OtherPoint] if order == "po" else Union[OtherPoint, Point]  # noqa: UP007
    for tp in (first, Optional[first], typing.List[first], list[first]):  # noqa: UP006, UP045
        codec_for(tp)


def cases() -> list[tuple[Any, Any]]:
    p, o = Point(1, 2), OtherPoint(3, 4)
    return [
        (Point | OtherPoint, p),
        (Point | OtherPoint, o),
        (OtherPoint | Point, p),
        (Optional[Union[Point, OtherPoint]], o),  # noqa: UP007, UP045
        (list[Point | OtherPoint], [p, o, o, p]),
        (typing.List[Union[OtherPoint, Point]], [o, p]),  # noqa: UP006, UP007
        (dict[str, tuple[Point | OtherPoint, int]], {"a": (p, 1), "b": (o, 2)}),
        (Holder, Holder(o, [p, o])),
        (Pair, Pair(p, [o, None, p])),
        (Named, {"shape": p}),
    ]


def shapes() -> type:
    """A service whose methods take and return the unions: defined after the priming."""

    @service
    class Shapes:
        async def one(self, s: Point | OtherPoint) -> Optional[Union[OtherPoint, Point]]:  # noqa: UP007, UP045
            return s

        async def many(self, s: typing.List[Union[Point, OtherPoint]]) -> Holder:  # noqa: UP006, UP007
            return Holder(s[0], s)

        async def nested(self, p: Pair, n: Named) -> dict[str, OtherPoint | Point]:
            return {}

    return Shapes


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (a named tuple is not a plain tuple)."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def main(order: str, mode: str) -> None:
    prime(order)
    hashes = {m.name: m.sig_hash.hex() for m in service_spec(shapes()).methods}
    if mode == "encode":
        payloads = [codec_for(tp).encode(value).data.hex() for tp, value in cases()]
        json.dump({"payloads": payloads, "hashes": hashes}, sys.stdout)
        return
    sent = json.load(sys.stdin)["payloads"]
    wrong = []
    for (tp, value), payload in zip(cases(), sent, strict=True):
        got = codec_for(tp).decode(bytes.fromhex(payload))
        if not same(got, value):
            wrong.append(f"{value!r} came back as {got!r}")
    json.dump({"wrong": wrong, "hashes": hashes}, sys.stdout)


if __name__ == "__main__":
    main(*sys.argv[1:])
