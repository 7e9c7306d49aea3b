"""Hypothesis strategies for the codec: (type annotation, value) pairs over every supported type.

:func:`typed_values` draws an annotation (nested through lists, tuples, dicts, sets, optionals,
unions, dataclasses, named tuples, typed dicts, enums, ``Any`` and numpy arrays) together with a
value of that type. :func:`expected` gives what the receiver should get back (only ``Any``
changes a value: tuples become lists, dataclasses dicts, enums their values), and :func:`same`
compares exactly: same types, floats bit for bit, NaN equal to NaN, arrays by dtype, shape and
bytes.

The classes below live at module level so that ``typing.get_type_hints`` can resolve them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import math
import operator
import typing
import uuid
from typing import Any, NamedTuple, TypedDict

import cbor2
import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

# -- types used in the generated annotations ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float = 0.0


@dataclasses.dataclass(frozen=True)
class OtherPoint:
    """Same CBOR shape as :class:`Point`: a union of both needs its member tag."""

    a: int
    b: float = 0.0


@dataclasses.dataclass(frozen=True)
class Key:
    """A hashable dataclass, for dict keys and set elements."""

    k: int
    s: str


@dataclasses.dataclass
class Labelled:
    name: str
    tags: list[str] = dataclasses.field(default_factory=list)
    point: Point | None = None
    extra: Any = None


@dataclasses.dataclass(kw_only=True)
class Settings:
    retries: int
    ratio: float = 1.0


@dataclasses.dataclass
class Reading:
    """Fields whose union members take each other's values under the number rules."""

    samples: list[float] | list[int]
    scale: tuple[float, ...] | tuple[bool, ...] | None = None


@dataclasses.dataclass
class Tree:
    value: int
    children: list[Tree] = dataclasses.field(default_factory=list)


class Pair(NamedTuple):
    left: int
    right: str


class Movie(TypedDict):
    title: str
    year: int


class Options(TypedDict, total=False):
    verbose: bool
    level: int


class Color(enum.Enum):
    RED = 1
    GREEN = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 10


class Mode(enum.StrEnum):
    READ = "r"
    WRITE = "w"


class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1


class Bits(enum.IntFlag):
    """Its members are ints too: ``list[int]`` takes them, and they arrive as plain ints."""

    A = 1
    B = 2


class Odd(enum.Enum):
    """Values that are neither all ints nor all strs: sent by name."""

    PAIR = (1, 2)
    NAME = "b"


# -- scalar strategies ----------------------------------------------------------------------------

ints = st.integers() | st.integers(min_value=-(2**130), max_value=2**130)
floats = st.floats() | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan])
texts = st.text(max_size=12)
binaries = st.binary(max_size=12)
fixed_offsets = st.builds(
    dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-23), max_value=dt.timedelta(hours=23))
)
naive_or_fixed = st.none() | fixed_offsets
datetimes = st.builds(
    lambda d, fold: d.replace(fold=fold),
    st.datetimes(timezones=naive_or_fixed | st.timezones()),
    st.integers(0, 1),
)
times = st.builds(
    lambda t, fold: t.replace(fold=fold), st.times(timezones=naive_or_fixed), st.integers(0, 1)
)
decimals = st.decimals(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [decimal.Decimal(s) for s in ("1.10", "-0", "0E-7", "sNaN", "-sNaN12", "NaN3", "-Infinity")]
)
perms = st.sets(st.sampled_from(list(Perm))).map(
    lambda members: functools.reduce(operator.or_, members, Perm(0))
)


class Case(NamedTuple):
    """An annotation, a strategy for its values, and what can be done with them."""

    tp: Any
    values: st.SearchStrategy[Any]
    hashable: bool  # values can be dict keys and set elements (and compare equal to themselves)
    has_any: bool  # Any somewhere inside: the decoded value differs from the original


def _leaf(tp: Any, values: st.SearchStrategy[Any], hashable: bool = False) -> Case:
    return Case(tp, values, hashable, False)


# Plain Python values that an ``Any`` carries; a few are transformed on the way (tuples, enums,
# dataclasses, bytearrays).
any_values: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        ints,
        floats,
        texts,
        binaries,
        st.booleans(),
        st.none(),
        st.dates(),
        decimals,
        st.uuids(),
        binaries.map(bytearray),
        st.sampled_from(list(Color)),
        st.builds(Point, st.integers(), floats),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=4),
        st.sets(st.integers() | st.text(max_size=4), max_size=4),
    ),
    max_leaves=8,
)

_LEAVES: list[Case] = [
    _leaf(int, ints, True),
    _leaf(float, floats),
    _leaf(str, texts, True),
    _leaf(bytes, binaries, True),
    _leaf(bytearray, binaries.map(bytearray)),
    _leaf(memoryview, binaries.map(memoryview)),
    _leaf(bool, st.booleans(), True),
    _leaf(type(None), st.none(), True),
    _leaf(dt.datetime, datetimes),
    _leaf(dt.date, st.dates(), True),
    _leaf(dt.time, times),
    _leaf(dt.timedelta, st.timedeltas(), True),
    _leaf(decimal.Decimal, decimals),
    _leaf(uuid.UUID, st.uuids(), True),
    _leaf(Point, st.builds(Point, ints, floats)),
    _leaf(OtherPoint, st.builds(OtherPoint, ints, floats)),
    _leaf(Key, st.builds(Key, ints, texts), True),
    _leaf(Settings, st.builds(Settings, retries=ints, ratio=floats)),
    _leaf(Pair, st.builds(Pair, ints, texts), True),
    _leaf(Movie, st.fixed_dictionaries({"title": texts, "year": ints})),
    _leaf(Options, st.fixed_dictionaries({}, optional={"verbose": st.booleans(), "level": ints})),
    _leaf(Color, st.sampled_from(list(Color)), True),
    _leaf(Level, st.sampled_from(list(Level)), True),
    _leaf(Mode, st.sampled_from(list(Mode)), True),
    _leaf(Perm, perms, True),
    _leaf(Odd, st.sampled_from(list(Odd)), True),
    _leaf(
        Tree,
        st.recursive(
            st.builds(Tree, ints, st.just([])),
            lambda inner: st.builds(Tree, ints, st.lists(inner, max_size=3)),
            max_leaves=5,
        ),
    ),
    Case(
        Labelled,
        st.builds(
            Labelled,
            texts,
            st.lists(texts, max_size=3),
            st.none() | st.builds(Point, ints, floats),
            any_values,
        ),
        False,
        True,
    ),
    Case(Any, any_values, False, True),
]


# -- numpy arrays ----------------------------------------------------------------------------

_STRUCTURED = [
    np.dtype([("a", "<i4"), ("b", ">f8", (2,))]),
    np.dtype({"names": ["x", "y"], "formats": ["u1", "<i4"], "offsets": [0, 4], "itemsize": 12}),
]


def plain_dtypes(max_str_len: int) -> st.SearchStrategy[np.dtype[Any]]:
    """Every numpy dtype without fields, in both byte orders."""
    return st.one_of(
        hnp.boolean_dtypes(),
        hnp.integer_dtypes(endianness="?"),
        hnp.unsigned_integer_dtypes(endianness="?"),
        hnp.floating_dtypes(endianness="?", sizes=(16, 32, 64)),
        st.just(np.dtype(np.longdouble)),
        hnp.complex_number_dtypes(endianness="?"),
        hnp.datetime64_dtypes(endianness="?"),
        hnp.timedelta64_dtypes(endianness="?"),
        hnp.byte_string_dtypes(endianness="?", min_len=1, max_len=max_str_len),
        hnp.unicode_string_dtypes(endianness="?", min_len=1, max_len=max_str_len),
    )


array_dtypes = st.one_of(plain_dtypes(4), st.sampled_from(_STRUCTURED))


def _layout(arr: np.ndarray[Any, Any], layout: str) -> np.ndarray[Any, Any]:
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "strided" and arr.ndim:
        return arr[::2]
    if layout == "transposed":
        return arr.T
    return arr


arrays: st.SearchStrategy[np.ndarray[Any, Any]] = st.builds(
    _layout,
    hnp.arrays(array_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
    st.sampled_from(["c", "fortran", "strided", "transposed"]),
)

_LEAVES.append(_leaf(np.ndarray, arrays))


# -- composite annotations -------------------------------------------------------------------

# Subscripted at run time with drawn annotations, which type checkers cannot follow.
_list: Any = list
_tuple: Any = tuple
_dict: Any = dict
_set: Any = set
_frozenset: Any = frozenset
_Union: Any = typing.Union


def _fixed_tuple(cases: list[Case]) -> Case:
    tp = _tuple[tuple(c.tp for c in cases)] if cases else tuple[()]
    return Case(
        tp,
        st.tuples(*(c.values for c in cases)),
        all(c.hashable for c in cases),
        any(c.has_any for c in cases),
    )


def _union(cases: list[Case]) -> Case:
    return Case(
        _Union[tuple(c.tp for c in cases)],
        st.one_of(*(c.values for c in cases)),
        all(c.hashable for c in cases),
        False,
    )


def _extend(children: st.SearchStrategy[Case]) -> st.SearchStrategy[Case]:
    hashable = children.filter(lambda c: c.hashable and not c.has_any)
    plain = children.filter(lambda c: not c.has_any)
    return st.one_of(
        children.map(lambda c: Case(_list[c.tp], st.lists(c.values, max_size=4), False, c.has_any)),
        children.map(
            lambda c: Case(
                _tuple[c.tp, ...], st.lists(c.values, max_size=4).map(tuple), c.hashable, c.has_any
            )
        ),
        st.lists(children, max_size=3).map(_fixed_tuple),
        st.tuples(hashable, children).map(
            lambda kv: Case(
                _dict[kv[0].tp, kv[1].tp],
                st.dictionaries(kv[0].values, kv[1].values, max_size=4),
                False,
                kv[1].has_any,
            )
        ),
        hashable.map(lambda c: Case(_set[c.tp], st.sets(c.values, max_size=4), False, False)),
        hashable.map(
            lambda c: Case(_frozenset[c.tp], st.frozensets(c.values, max_size=4), True, False)
        ),
        children.map(
            lambda c: (
                Case(c.tp | None, st.none() | c.values, c.hashable, c.has_any)
                if c.tp is not Any
                else c
            )
        ),
        st.lists(plain, min_size=2, max_size=3).map(_union),
    )


leaf_cases: st.SearchStrategy[Case] = st.sampled_from(_LEAVES)
"""Every supported type on its own (no nesting)."""
cases: st.SearchStrategy[Case] = st.recursive(leaf_cases, _extend, max_leaves=6)
"""Nested annotations built from :data:`leaf_cases`."""


@st.composite
def typed_values(
    draw: st.DrawFn, case_strategy: st.SearchStrategy[Case] = cases
) -> tuple[Any, Any]:
    """Draw ``(annotation, value)``."""
    case = draw(case_strategy)
    return case.tp, draw(case.values)


def scalar_tuple_annotations() -> st.SearchStrategy[Any]:
    """Scalars and short tuples of scalars: the shapes the codec encodes and decodes directly."""
    scalar = st.sampled_from([int, float, str, bytes, bool, type(None), int | None, int | str])
    return scalar | st.lists(scalar, max_size=4).map(
        lambda tps: _tuple[tuple(tps)] if tps else tuple[()]
    )


# -- unions whose members take each other's values -------------------------------------------------

_finite = st.floats(allow_nan=False)
_bits = st.sets(st.sampled_from(list(Bits))).map(
    lambda members: functools.reduce(operator.or_, members, Bits(0))
)
# Leaf types that one member takes for another without error: the number rules (an int where a
# float is declared), subclasses (bool and IntEnum are ints, StrEnum members strs) and the
# interchangeable bytes-likes. Each entry: (type, its values, hashable).
_RIVALS: list[list[tuple[Any, st.SearchStrategy[Any], bool]]] = [
    [
        (float, floats, False),
        (float, _finite, True),
        (int, ints, True),
        (bool, st.booleans(), True),
        (Level, st.sampled_from(list(Level)), True),
        (Bits, _bits, True),
    ],
    [(str, texts, True), (Mode, st.sampled_from(list(Mode)), True)],
    [
        (bytes, binaries, True),
        (bytearray, binaries.map(bytearray), False),
        (memoryview, binaries.map(memoryview), False),
    ],
    [
        (
            Reading,
            st.builds(
                Reading,
                st.lists(floats, max_size=3) | st.lists(ints, max_size=3),
                st.none()
                | st.lists(floats, max_size=3).map(tuple)
                | st.lists(st.booleans(), max_size=3).map(tuple),
            ),
            False,
        )
    ],
]

# A template is a nested annotation whose leaves are still to be picked from a family of
# _RIVALS: ("leaf", family) | ("list", t) | ("vtuple", t) | ("tuple", [t, ...]) |
# ("dict", key leaf, t) | ("set", leaf) | ("frozenset", leaf) | ("optional", t). Every member
# of a union fills in the same template, so the members share their CBOR shape and differ only
# in leaf types that can take each other's values.
_families = st.integers(min_value=0, max_value=len(_RIVALS) - 1)
_key_leaves = st.integers(min_value=0, max_value=2).map(lambda f: ("leaf", f))
_templates: st.SearchStrategy[Any] = st.recursive(
    _families.map(lambda f: ("leaf", f)),
    lambda inner: st.one_of(
        inner.map(lambda t: ("list", t)),
        inner.map(lambda t: ("vtuple", t)),
        st.lists(inner, min_size=1, max_size=3).map(lambda ts: ("tuple", ts)),
        st.tuples(_key_leaves, inner).map(lambda kt: ("dict", kt[0], kt[1])),
        _key_leaves.map(lambda k: ("set", k)),
        _key_leaves.map(lambda k: ("frozenset", k)),
        inner.map(lambda t: ("optional", t)),
    ),
    max_leaves=4,
)


def _fill(draw: st.DrawFn, template: Any, hashable: bool) -> tuple[Any, st.SearchStrategy[Any]]:
    """One member: (annotation, its values) with the template's leaves picked by ``draw``."""
    kind = template[0]
    if kind == "leaf":
        pool = [r for r in _RIVALS[template[1]] if r[2] or not hashable]
        # Now and then a leaf is itself a union of two rivals (list[float | int]).
        picked = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
        return _Union[tuple(r[0] for r in picked)], st.one_of(*(r[1] for r in picked))
    if kind == "list":
        tp, values = _fill(draw, template[1], hashable)
        return _list[tp], st.lists(values, max_size=3)
    if kind == "vtuple":
        tp, values = _fill(draw, template[1], hashable)
        return _tuple[tp, ...], st.lists(values, max_size=3).map(tuple)
    if kind == "tuple":
        items = [_fill(draw, t, hashable) for t in template[1]]
        return _tuple[tuple(tp for tp, _ in items)], st.tuples(*(v for _, v in items))
    if kind == "dict":
        ktp, keys = _fill(draw, template[1], True)
        vtp, values = _fill(draw, template[2], hashable)
        return _dict[ktp, vtp], st.dictionaries(keys, values, max_size=3)
    if kind == "set" or kind == "frozenset":
        tp, items = _fill(draw, template[1], True)
        if kind == "set":
            return _set[tp], st.sets(items, max_size=3)
        return _frozenset[tp], st.frozensets(items, max_size=3)
    tp, values = _fill(draw, template[1], hashable)
    return tp | None, st.none() | values


@st.composite
def rival_unions(draw: st.DrawFn) -> tuple[Any, Any]:
    """Draw ``(annotation, value)``: a union of two or three members of one shape whose leaf
    types take each other's values (``list[float] | list[int]``, ``tuple[str, ...] |
    tuple[Mode, ...]``), in any order, and a value of one of them, exactly typed."""
    template = draw(_templates)
    members = [_fill(draw, template, False) for _ in range(draw(st.integers(2, 3)))]
    assume(len({m[0] for m in members}) > 1)  # equal members collapse into one: no rivals
    tp = _Union[tuple(m[0] for m in members)]
    return tp, draw(st.one_of(*(m[1] for m in members)))


# -- hostile payloads -----------------------------------------------------------------------------

# Tags a peer might send: the ones the codec uses (0x72617000 and up, RFC 8746, the standard
# ones it accepts) with arbitrary contents, and a few it must refuse.
_TAGS = [2, 3, 37, 40, 64, 68, 69, 76, 85, 86, 87, 100, 258, 28, 29, 35, 55799, 9999]
_TAGS += [0x72617000 + i for i in range(8)]
_hostile_leaves = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    floats,
    texts | st.sampled_from(["C", "F", "<f8", "|u1", ">U2", "|V0", "|O", "<M8[ns]", "names"]),
    binaries,
    st.booleans(),
    st.none(),
    st.just(cbor2.undefined),
)
cbor_documents: st.SearchStrategy[bytes] = st.recursive(
    _hostile_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=10),
        st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4),
        st.builds(cbor2.CBORTag, st.sampled_from(_TAGS), inner),
    ),
    max_leaves=12,
).map(cbor2.dumps)
"""CBOR documents shaped like the codec's own, with wrong contents in every place."""


# -- what comes back, and exact comparison --------------------------------------------------------


def natural(v: Any) -> Any:
    """What an ``Any`` value decodes to."""
    if isinstance(v, enum.Enum):
        return natural(v.value)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: natural(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, (list, tuple)):
        return [natural(x) for x in v]
    if isinstance(v, dict):
        return {_natural_key(k): natural(x) for k, x in v.items()}
    if isinstance(v, (set, frozenset)):
        return {_natural_key(x) for x in v}
    return v


def _natural_key(v: Any) -> Any:
    """What an ``Any`` value decodes to inside a set element or a dict key."""
    if isinstance(v, enum.Enum):
        return _natural_key(v.value)
    if isinstance(v, tuple):
        return tuple(_natural_key(x) for x in v)
    if isinstance(v, frozenset):
        return frozenset(_natural_key(x) for x in v)
    return v


def expected(tp: Any, v: Any) -> Any:
    """What the receiver of ``v`` sent as ``tp`` gets back (annotations from :data:`cases`)."""
    if tp is Any:
        return natural(v)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return [expected(args[0], x) for x in v]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(expected(args[0], x) for x in v)
        return tuple(expected(a, x) for a, x in zip(args, v, strict=True))
    if origin is dict:
        return {k: expected(args[1], x) for k, x in v.items()}
    if origin in (typing.Union, type(int | None)):
        # Unions hold no Any (see _extend), except Optional[X] around one that does.
        members = [a for a in args if a is not type(None)]
        return expected(members[0], v) if v is not None and len(members) == 1 else v
    if tp is Labelled:
        return dataclasses.replace(v, extra=natural(v.extra))
    return v


def same(a: Any, b: Any) -> bool:
    """Exact equality: same types all the way down, floats bit for bit, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, (dt.datetime, dt.time)):
        # Aware values come back with a fixed-offset timezone: compare offset and wall time.
        return bool(
            a.utcoffset() == b.utcoffset()
            and a.replace(tzinfo=None) == b.replace(tzinfo=None)
            and a.fold == b.fold
        )
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.names:  # padding between fields is undefined: compare field by field
            return all(same(a[name], b[name]) for name in a.dtype.names)
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    if isinstance(a, memoryview):
        return bool(a.tobytes() == b.tobytes() and b.format == "B")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return _typed(a) == _typed(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return _typed(a) == _typed(b)
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, enum.Enum):
        return a is b
    return bool(a == b)


def _typed(items: Any) -> set[tuple[type, Any]]:
    """Hashable items with their types, so that ``True`` and ``1`` differ."""
    return {(type(x), x) for x in items}
