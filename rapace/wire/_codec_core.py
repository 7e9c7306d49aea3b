"""Compiles type annotations into the codec's encoders and decoders.

Each annotation becomes a node: an encoder turning a value into objects cbor2 writes natively
(adding tags for the types CBOR lacks), a decoder checking what cbor2 read and rebuilding the
declared types, and what a union needs to tell its members apart. Nodes are cached per
annotation. Failures raise :class:`Fail`, which collects the path of the offending value on its
way out; :mod:`rapace.wire._codec` turns it into an EncodeError or DecodeError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import decimal
import enum
import itertools
import json
import operator
import sys
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from typing import Any, Final, Protocol, TypeVar, cast

import cbor2

from rapace.wire._codec_gen import (
    FrozenRawSet,
    RawSet,
    exact_check,
    fields_exact,
    finish,
    passes_as_is,
)

TAG_NDARRAY: Final = 0x72617000
TAG_OOB_BYTES: Final = 0x72617001
TAG_OOB_NDARRAY: Final = 0x72617002
TAG_DATETIME: Final = 0x72617003
TAG_TIME: Final = 0x72617004
TAG_TIMEDELTA: Final = 0x72617005
TAG_DECIMAL: Final = 0x72617006
TAG_UNION: Final = 0x72617007
TAG_SHM_BYTES: Final = 0x72617008
TAG_SHM_NDARRAY: Final = 0x72617009

TAG_UUID: Final = 37
TAG_DATE: Final = 100
TAG_SET: Final = 258
_EPOCH_ORDINAL: Final = 719163  # date(1970, 1, 1).toordinal()
_NoneType: Final = type(None)

_CBORTag = cbor2.CBORTag
# What cbor2 builds for a map used as a map key (cbor2.frozendict, builtins.frozendict on 3.15+).
_frozendict: type[Any] = type(next(iter(cbor2.loads(b"\xa1\xa0\x00"))))


class Fail(Exception):
    """A value does not fit its annotation; parents add their path segment on the way out."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.path: list[str] = []

    def where(self, root: str) -> str:
        return f"{root}{''.join(reversed(self.path))}: {self.msg}"


class BufferPlacer(Protocol):
    """Puts buffers in memory the peer can read (a transport with shared memory provides one).

    Each method returns the CBOR tag that references the placed bytes (built with
    :func:`shared_bytes_tag` or ``shared_array_tag``), or None to leave the value in the
    payload.
    """

    @property
    def threshold(self) -> int:
        """Buffers at least this large are worth placing even when not already shared."""
        ...

    def place_bytes(self, view: memoryview) -> object | None:
        """Place a contiguous one-dimensional ``"B"`` view (or reference it where it lives)."""
        ...

    def place_array(self, array: Any) -> object | None:
        """Place a numpy array of a plain-data dtype (or reference it where it lives)."""
        ...


class BufferResolver(Protocol):
    """Turns a shared-memory reference from the peer into a view, checking its bounds."""

    def resolve(self, where: object, start: int, nbytes: int, writable: bool) -> memoryview:
        """A ``"B"`` view of ``nbytes`` at ``start`` in region ``where``.

        Writable only when the peer marked it shared-writable and the region is one both
        sides may write. Raises ValueError for anything out of bounds or unknown.
        """
        ...


class OOB:
    """Encode-side state of one call with out-of-band buffers enabled."""

    __slots__ = ("bufs", "placer", "thr")

    def __init__(self, thr: int, placer: BufferPlacer | None = None) -> None:
        self.thr = thr
        self.placer = placer
        self.bufs: list[memoryview] = []

    def add(self, view: memoryview) -> int:
        self.bufs.append(view)
        return len(self.bufs) - 1


def shared_bytes_tag(where: object, offset: int, nbytes: int, writable: bool) -> object:
    """The reference to ``nbytes`` at ``offset`` of shared region ``where``."""
    return _CBORTag(TAG_SHM_BYTES, (where, offset, nbytes, writable))


class OOBView:
    """A resolved out-of-band bytes reference, waiting for the annotation to pick its type.

    ``shared`` views are memory both sides write (a pool's arena): they stay views even where
    a copy would otherwise be made, so writes through them reach the other side.
    """

    __slots__ = ("shared", "view")

    def __init__(self, view: memoryview, shared: bool = False) -> None:
        self.view = view
        self.shared = shared


class Variant:
    """A decoded union tag: which member, and its still-raw value."""

    __slots__ = ("index", "value")

    def __init__(self, index: int, value: object) -> None:
        self.index = index
        self.value = value


_Enc = Callable[[Any, "OOB | None"], Any]
_Dec = Callable[[Any], Any]
_Exact = Callable[[Any], bool]


# A set read from the payload stays a RawSet until its items are typed; messages name the set.
_RAW_NAMES: Final[dict[type, str]] = {RawSet: "set", FrozenRawSet: "frozenset"}


def tname(value: object) -> str:
    """The type of a value as messages name it: ``str``, ``numpy.int64``."""
    t = type(value)
    if t.__module__ == "builtins":
        return t.__qualname__
    raw = _RAW_NAMES.get(t)
    if raw is not None:
        return raw
    return f"{t.__module__}.{t.__qualname__}"


def label_of(tp: object) -> str:
    """An annotation as error messages show it: ``list[Point]``, ``int | None``."""
    if tp is _NoneType or tp is None:
        return "None"
    if tp is typing.Any:
        return "Any"
    if tp is Ellipsis:
        return "..."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return label_of(args[0])
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(label_of(a) for a in args)
    if origin is not None:
        inner = ", ".join(label_of(a) for a in args) if args else "()"
        return f"{label_of(origin)}[{inner}]"
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def numpy_helpers() -> Any:
    """The numpy codec helpers, importing numpy; only called once numpy is involved."""
    from rapace.wire import _codec_numpy

    return _codec_numpy


# ---------------------------------------------------------------------------------------------
# Nodes: one per annotation, holding its encoder and decoder.


class Node:
    """The compiled codec of one annotation."""

    __slots__ = ("_exact", "_exact_of", "dec", "enc", "kinds", "label", "py_types", "shape")

    def __init__(
        self,
        label: str,
        enc: _Enc,
        dec: _Dec,
        kinds: frozenset[type] | None,
        py_types: frozenset[type] | None,
        shape: tuple[Any, ...] | None = None,
        exact_of: Callable[[], _Exact] | None = None,
    ) -> None:
        self.label = label
        self.enc = enc
        self.dec = dec
        # Python types cbor2 hands back for this node's encoding; None means "anything".
        self.kinds = kinds
        # Exact Python types the encoder takes without conversion; None means "anything".
        self.py_types = py_types
        # Structure of a CBOR-native node, for the generated fast path; None otherwise.
        self.shape = shape
        # Builds the exactness test (see exact) from the children's when the node is not
        # native (native nodes generate theirs); None for a leaf.
        self._exact_of = exact_of
        self._exact: _Exact | None = None

    @property
    def exact(self) -> _Exact:
        """Whether a value comes back from this node with the same types all the way down.

        No int -> float, bool -> int or subclass -> class on the way. Only a union whose
        members take the same Python type asks, to pick the member that keeps a value as it
        is, so the test is built on first use: compiling every other annotation skips it.
        """
        test = self._exact
        if test is None:
            if self.shape is not None:
                test = exact_check(self)
            elif self._exact_of is not None:
                test = self._exact_of()
            else:
                test = _exact_by_type(self.py_types)
            self._exact = test
        return test


def _exact_by_type(py_types: frozenset[type] | None) -> _Exact:
    """The exactness test of a leaf: the value's own type is the one it decodes to."""
    if py_types is None:
        return _never
    if len(py_types) == 1:
        (t,) = py_types
        return lambda v: type(v) is t
    return lambda v: type(v) in py_types


def _never(v: object) -> bool:
    return False


_ARRAY: Final[frozenset[type]] = frozenset({list, tuple})
_MAP: Final[frozenset[type]] = frozenset({dict, _frozendict})
_SET: Final[frozenset[type]] = frozenset({RawSet, FrozenRawSet})
_BYTES: Final[frozenset[type]] = frozenset({bytes, OOBView})


def fail_type(label: str, value: object) -> Fail:
    """The failure for a value of the wrong type."""
    return Fail(f"expected {label}, got {tname(value)}")


# -- scalars ----------------------------------------------------------------------------------


def _numpy_scalar(v: object, kind: str) -> bool:
    """Whether ``v`` is a numpy scalar of a kind (``"bool_"``, ``"integer"``, ``"floating"``)."""
    if type(v).__module__ != "numpy":
        return False
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(v, getattr(numpy, kind))


def _enc_int(v: Any, st: OOB | None) -> int:
    if isinstance(v, int) or _numpy_scalar(v, "integer"):
        return operator.index(v)  # bool and IntEnum travel as plain ints
    raise fail_type("int", v)


def _enc_float(v: Any, st: OOB | None) -> float:
    # PEP 484 numeric tower: an int is acceptable where a float is declared.
    if isinstance(v, (float, int)) or _numpy_scalar(v, "floating") or _numpy_scalar(v, "integer"):
        try:
            return float(v)
        except OverflowError:
            raise Fail("int too large to convert to float") from None
    raise fail_type("float", v)


def _enc_bool(v: Any, st: OOB | None) -> bool:
    if _numpy_scalar(v, "bool_"):
        return bool(v)
    raise fail_type("bool", v)


def _enc_str(v: Any, st: OOB | None) -> str:
    if isinstance(v, str):
        return str.__str__(v)
    raise fail_type("str", v)


def _enc_none(v: Any, st: OOB | None) -> None:
    if v is not None:
        raise fail_type("None", v)


def _enc_bytes(v: Any, st: OOB | None) -> object:
    t = type(v)
    if t is bytes or t is bytearray:
        if st is None or len(v) < st.thr:
            return v
        if st.placer is not None:
            placed = st.placer.place_bytes(memoryview(v))
            if placed is not None:
                return placed
            return v
        return _CBORTag(TAG_OOB_BYTES, (st.add(memoryview(v)), len(v)))
    if t is str:
        raise fail_type("bytes-like", v)
    try:
        mv = memoryview(v)  # memoryview, mmap, array.array, ndarray: any buffer
    except TypeError:
        raise fail_type("bytes-like", v) from None
    if st is None:
        return mv.tobytes()
    if mv.c_contiguous and (mv.format != "B" or mv.ndim != 1):
        mv = mv.cast("B")
    if st.placer is not None:
        copy = None
        if not mv.c_contiguous:  # never shared memory's own layout: one copy either way
            copy = mv.tobytes()
            mv = memoryview(copy)
        # Shared memory is referenced whatever its size; other buffers only when large.
        placed = st.placer.place_bytes(mv)
        if placed is not None:
            return placed
        return copy if copy is not None else mv.tobytes()
    if mv.nbytes < st.thr:
        return mv.tobytes()
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return _CBORTag(TAG_OOB_BYTES, (st.add(mv), mv.nbytes))


def _scalar_dec(t: type, label: str) -> _Dec:
    def dec(o: Any) -> Any:
        if type(o) is t:
            return o
        raise fail_type(label, o)

    return dec


def _dec_bytes(o: Any) -> bytes:
    if type(o) is bytes:
        return o
    if type(o) is OOBView:
        return bytes(o.view)
    raise fail_type("bytes", o)


def _dec_bytearray(o: Any) -> bytearray:
    if type(o) is bytes:
        return bytearray(o)
    if type(o) is OOBView:
        return bytearray(o.view)
    raise fail_type("bytes", o)


def _dec_memoryview(o: Any) -> memoryview:
    if type(o) is bytes:
        return memoryview(o)
    if type(o) is OOBView:
        return o.view
    raise fail_type("bytes", o)


def _scalar(t: type, enc: _Enc, dec: _Dec, kinds: frozenset[type]) -> Node:
    return finish(Node(label_of(t), enc, dec, kinds, frozenset({t}), ("scalar", t)))


_INT = _scalar(int, _enc_int, _scalar_dec(int, "int"), frozenset({int}))
_FLOAT = _scalar(float, _enc_float, _scalar_dec(float, "float"), frozenset({float}))
_BOOL = _scalar(bool, _enc_bool, _scalar_dec(bool, "bool"), frozenset({bool}))
_STR = _scalar(str, _enc_str, _scalar_dec(str, "str"), frozenset({str}))
_NONE = _scalar(_NoneType, _enc_none, _scalar_dec(_NoneType, "None"), frozenset({_NoneType}))
_BYTES_NODE = _scalar(bytes, _enc_bytes, _dec_bytes, _BYTES)
_BYTEARRAY = Node("bytearray", _enc_bytes, _dec_bytearray, _BYTES, frozenset({bytearray}))
_MEMORYVIEW = Node("memoryview", _enc_bytes, _dec_memoryview, _BYTES, frozenset({memoryview}))


# -- datetime, Decimal, UUID ------------------------------------------------------------------


def _td_us(td: _dt.timedelta) -> int:
    return (td.days * 86400 + td.seconds) * 1_000_000 + td.microseconds


def _enc_datetime_value(v: _dt.datetime) -> object:
    off = v.utcoffset()
    return _CBORTag(
        TAG_DATETIME,
        (
            v.year,
            v.month,
            v.day,
            v.hour,
            v.minute,
            v.second,
            v.microsecond,
            None if off is None else _td_us(off),
            v.fold,
        ),
    )


def _enc_time_value(v: _dt.time) -> object:
    off = v.utcoffset()
    return _CBORTag(
        TAG_TIME,
        (v.hour, v.minute, v.second, v.microsecond, None if off is None else _td_us(off), v.fold),
    )


def _enc_timedelta_value(v: _dt.timedelta) -> object:
    return _CBORTag(TAG_TIMEDELTA, (v.days, v.seconds, v.microseconds))


def _enc_date_value(v: _dt.date) -> object:
    return _CBORTag(TAG_DATE, v.toordinal() - _EPOCH_ORDINAL)


def _enc_decimal_value(v: decimal.Decimal) -> object:
    return _CBORTag(TAG_DECIMAL, str(v))


def _enc_uuid_value(v: uuid.UUID) -> object:
    return _CBORTag(TAG_UUID, v.bytes)


def _enc_datetime(v: Any, st: OOB | None) -> object:
    if isinstance(v, _dt.datetime):
        return _enc_datetime_value(v)
    raise fail_type("datetime", v)


def _enc_date(v: Any, st: OOB | None) -> object:
    # A datetime is a date, but sending it as one would silently drop its time.
    if isinstance(v, _dt.date) and not isinstance(v, _dt.datetime):
        return _enc_date_value(v)
    raise fail_type("date", v)


def _enc_time(v: Any, st: OOB | None) -> object:
    if isinstance(v, _dt.time):
        return _enc_time_value(v)
    raise fail_type("time", v)


def _enc_timedelta(v: Any, st: OOB | None) -> object:
    if isinstance(v, _dt.timedelta):
        return _enc_timedelta_value(v)
    raise fail_type("timedelta", v)


def _enc_decimal(v: Any, st: OOB | None) -> object:
    if isinstance(v, decimal.Decimal):
        return _enc_decimal_value(v)
    raise fail_type("Decimal", v)


def _enc_uuid(v: Any, st: OOB | None) -> object:
    if isinstance(v, uuid.UUID):
        return _enc_uuid_value(v)
    raise fail_type("UUID", v)


def _leaf(t: type, enc: _Enc) -> Node:
    return Node(t.__name__, enc, _scalar_dec(t, t.__name__), frozenset({t}), frozenset({t}))


_DATETIME = _leaf(_dt.datetime, _enc_datetime)
_DATE = _leaf(_dt.date, _enc_date)
_TIME = _leaf(_dt.time, _enc_time)
_TIMEDELTA = _leaf(_dt.timedelta, _enc_timedelta)
_DECIMAL = _leaf(decimal.Decimal, _enc_decimal)
_UUID = _leaf(uuid.UUID, _enc_uuid)

_LEAVES: Final[dict[object, Node]] = {
    int: _INT,
    float: _FLOAT,
    bool: _BOOL,
    str: _STR,
    None: _NONE,
    _NoneType: _NONE,
    bytes: _BYTES_NODE,
    bytearray: _BYTEARRAY,
    memoryview: _MEMORYVIEW,
    _dt.datetime: _DATETIME,
    _dt.date: _DATE,
    _dt.time: _TIME,
    _dt.timedelta: _TIMEDELTA,
    decimal.Decimal: _DECIMAL,
    uuid.UUID: _UUID,
}


# -- Any ----------------------------------------------------------------------------------------

# Types an Any value may hold that cbor2 writes exactly as they are.
_ANY_NATIVE: Final = frozenset({int, float, str, bool, _NoneType})
_ANY_NATIVE_BYTES: Final = frozenset({int, float, str, bool, _NoneType, bytes})


def _any_seq(v: Any, st: OOB | None) -> list[Any]:
    if set(map(type, v)) <= (_ANY_NATIVE_BYTES if st is None else _ANY_NATIVE):
        return v if type(v) is list else list(v)
    return _enc_items(_enc_any, v, st)


def _any_list(v: Any, st: OOB | None) -> object:
    return _any_seq(v, st)


def _any_tuple(v: Any, st: OOB | None) -> object:
    # A tuple may be a dict key or set element on the way out, so keep it hashable.
    if type(v) is tuple and set(map(type, v)) <= (_ANY_NATIVE_BYTES if st is None else _ANY_NATIVE):
        return v
    return tuple(_enc_items(_enc_any, v, st))


def _any_dict(v: Any, st: OOB | None) -> object:
    native = _ANY_NATIVE_BYTES if st is None else _ANY_NATIVE
    if type(v) is dict and set(map(type, v)) <= native and set(map(type, v.values())) <= native:
        return v
    return _enc_dict(_enc_any, _enc_any, v, st)


def _any_set(v: Any, st: OOB | None) -> object:
    return _CBORTag(TAG_SET, tuple(_enc_items(_enc_any, v, st, "{*}")))


def _any_enum(v: Any, st: OOB | None) -> object:
    return _enc_any(v.value, st)


def _any_dataclass(v: Any, st: OOB | None) -> object:
    out = {}
    for f in dataclasses.fields(v):
        try:
            out[f.name] = _enc_any(getattr(v, f.name), st)
        except Fail as e:
            e.path.append(f".{f.name}")
            raise
    return out


def _any_identity(v: Any, st: OOB | None) -> object:
    return v


def _any_numpy(v: Any, st: OOB | None) -> object:
    return numpy_helpers().encode_any(v, st)


def _any_unsupported(v: Any, st: OOB | None) -> object:
    raise Fail(f"cannot encode a value of type {tname(v)}")


_ANY_ENC: dict[type, _Enc] = {
    int: _any_identity,
    float: _any_identity,
    str: _any_identity,
    bool: _any_identity,
    _NoneType: _any_identity,
    bytes: _enc_bytes,
    bytearray: _enc_bytes,
    memoryview: _enc_bytes,
    list: _any_list,
    tuple: _any_tuple,
    dict: _any_dict,
    set: _any_set,
    frozenset: _any_set,
    _dt.datetime: lambda v, st: _enc_datetime_value(v),
    _dt.date: lambda v, st: _enc_date_value(v),
    _dt.time: lambda v, st: _enc_time_value(v),
    _dt.timedelta: lambda v, st: _enc_timedelta_value(v),
    decimal.Decimal: lambda v, st: _enc_decimal_value(v),
    uuid.UUID: lambda v, st: _enc_uuid_value(v),
}


def _any_handler(t: type) -> _Enc:
    """Resolve (once per type) how an Any value of a type not in the table is encoded."""
    handler: _Enc
    if issubclass(t, enum.Enum):
        handler = _any_enum
    elif dataclasses.is_dataclass(t):
        handler = _any_dataclass
    elif t.__module__ == "numpy":
        handler = _any_numpy
    else:
        for base, base_handler in (
            (_dt.datetime, _ANY_ENC[_dt.datetime]),
            (_dt.date, _ANY_ENC[_dt.date]),
            (_dt.time, _ANY_ENC[_dt.time]),
            (_dt.timedelta, _ANY_ENC[_dt.timedelta]),
            (decimal.Decimal, _ANY_ENC[decimal.Decimal]),
            (uuid.UUID, _ANY_ENC[uuid.UUID]),
            (int, _enc_int),
            (float, _enc_float),
            (str, _enc_str),
            ((bytes, bytearray, memoryview), _enc_bytes),
            (tuple, _any_tuple),
            (list, _any_list),
            (dict, _any_dict),
            ((set, frozenset), _any_set),
        ):
            if issubclass(t, base):
                handler = base_handler
                break
        else:
            numpy = sys.modules.get("numpy")
            if numpy is not None and issubclass(t, numpy.ndarray):
                handler = _any_numpy
            else:
                handler = _any_unsupported
    _ANY_ENC[t] = handler
    return handler


def _enc_any(v: Any, st: OOB | None) -> object:
    handler = _ANY_ENC.get(type(v))
    if handler is None:
        handler = _any_handler(type(v))
    return handler(v, st)


# Types an Any value hands back as the type they were sent as.
_PLAIN_LEAVES: Final[frozenset[type]] = frozenset(
    {
        int,
        float,
        str,
        bool,
        _NoneType,
        bytes,
        _dt.datetime,
        _dt.date,
        _dt.time,
        _dt.timedelta,
        decimal.Decimal,
        uuid.UUID,
    }
)
# Raw decoded types an Any value hands back unchanged; the numpy helpers add ndarray.
DEC_LEAF: set[type] = set(_PLAIN_LEAVES)


def _dec_any(o: Any) -> Any:
    t = type(o)
    if t in DEC_LEAF:
        return o
    if t is list:
        if set(map(type, o)) <= DEC_LEAF:
            return o
        return _dec_items(_dec_any, o)
    if t is dict:
        if set(map(type, o)) <= DEC_LEAF and set(map(type, o.values())) <= DEC_LEAF:
            return o
        return _dec_dict(_dec_any, _dec_any, o)
    if t is tuple:  # an array inside a set element or a map key
        return tuple(_dec_items(_dec_any, o))
    if t is RawSet:
        return build_set(set, _dec_items(_dec_any, o.items, "{*}"))
    if t is FrozenRawSet:
        return build_set(frozenset, _dec_items(_dec_any, o.items, "{*}"))
    if t is OOBView:
        return o.view if o.shared else bytes(o.view)
    raise Fail(f"unexpected {tname(o)} in the payload")


def _exact_any(v: Any) -> bool:
    # Errs on the side of no: tuples (lists at the top), frozensets (sets), enums (their
    # values), dataclasses (dicts) change on the way, and a no only lets a rival member that
    # keeps the value as it is win over this one.
    t = type(v)
    if t in _PLAIN_LEAVES:
        return True
    if t is list or t is set:
        return all(map(_exact_any, v))
    if t is dict:
        return all(map(_exact_any, v)) and all(map(_exact_any, v.values()))
    return False


_ANY = Node("Any", _enc_any, _dec_any, None, None, exact_of=lambda: _exact_any)


def build_set(build: Callable[[list[Any]], object], items: list[Any]) -> object:
    """The set of decoded items, which a peer can make unhashable (an ndarray in ``set[Any]``)."""
    try:
        return build(items)
    except Exception as exc:
        raise Fail(f"cannot build a set of these items: {exc}") from exc


# -- item loops that name the failing item ------------------------------------------------------


def _enc_items(fn: _Enc, items: Any, st: OOB | None, seg: str = "") -> list[Any]:
    try:
        return [fn(x, st) for x in items]
    except Fail:
        pass
    # Only on failure: run again to find which item it was (cheaper than tracking the index).
    for i, x in enumerate(items):
        try:
            fn(x, st)
        except Fail as e:
            e.path.append(seg or f"[{i}]")
            raise
    raise AssertionError("an item failed to encode once and not the second time")


def _dec_items(fn: _Dec, items: Any, seg: str = "") -> list[Any]:
    try:
        return [fn(x) for x in items]
    except Fail:
        pass
    for i, x in enumerate(items):
        try:
            fn(x)
        except Fail as e:
            e.path.append(seg or f"[{i}]")
            raise
    raise AssertionError("an item failed to decode once and not the second time")


def _enc_fields(
    fns: Sequence[_Enc], values: Sequence[Any], st: OOB | None, segs: Sequence[str]
) -> tuple[Any, ...]:
    try:
        return tuple([fn(x, st) for fn, x in zip(fns, values, strict=True)])
    except Fail as e:
        i = 0
        for i, (fn, x) in enumerate(zip(fns, values, strict=True)):  # noqa: B007
            try:
                fn(x, st)
            except Fail:
                break
        e.path.append(segs[i])
        raise


def _dec_fields(fns: Sequence[_Dec], values: Sequence[Any], segs: Sequence[str]) -> list[Any]:
    try:
        return [fn(x) for fn, x in zip(fns, values, strict=True)]
    except Fail as e:
        i = 0
        for i, (fn, x) in enumerate(zip(fns, values, strict=True)):  # noqa: B007
            try:
                fn(x)
            except Fail:
                break
        e.path.append(segs[i])
        raise


def _short_repr(k: object) -> str:
    """A key as it appears in a path: ``["image"]``, ``[3]``."""
    if type(k) is str:
        r = '"' + k.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif type(k) in (int, bool, float, _NoneType):
        r = repr(k)
    else:
        return f"<{tname(k)}>"
    if len(r) > 40:
        r = r[:36] + ('..."' if r[0] == '"' else "...")
    return r


def _enc_dict(kfn: _Enc, vfn: _Enc, d: Any, st: OOB | None) -> dict[Any, Any]:
    out = {}
    for k, x in d.items():
        try:
            key = kfn(k, st)
        except Fail as e:
            e.path.append(f"<key {_short_repr(k)}>")
            raise
        try:
            out[key] = vfn(x, st)
        except Fail as e:
            e.path.append(f"[{_short_repr(k)}]")
            raise
    return out


def _dec_dict(kfn: _Dec, vfn: _Dec, d: Any) -> dict[Any, Any]:
    out = {}
    for k, x in d.items():
        try:
            key = kfn(k)
        except Fail as e:
            e.path.append(f"<key {_short_repr(k)}>")
            raise
        try:
            out[key] = vfn(x)
        except Fail as e:
            e.path.append(f"[{_short_repr(k)}]")
            raise
    return out


# -- compiling annotations ----------------------------------------------------------------------


def _unset(*args: object) -> Any:
    raise AssertionError("codec node used before it was compiled")


def _is_ndarray(tp: object) -> bool:
    tp = typing.get_origin(tp) or tp
    return isinstance(tp, type) and tp.__module__ == "numpy" and tp.__name__ == "ndarray"


def _is_typeddict(tp: object) -> bool:
    if typing.is_typeddict(tp):
        return True
    te = sys.modules.get("typing_extensions")
    return te is not None and bool(te.is_typeddict(tp))


def _is_namedtuple(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, tuple) and hasattr(tp, "_fields")


def _hints(cls: type, *, include_extras: bool = False) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls, include_extras=include_extras)
    except Exception as exc:
        raise Fail(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from exc


def _required_keys(cls: type, hints: dict[str, Any]) -> frozenset[str]:
    """The keys a TypedDict must have.

    Python 3.11 computes ``__required_keys__`` from the raw annotations, so under ``from
    __future__ import annotations`` it misses ``NotRequired[...]`` and ``Required[...]``
    (strings at that point); the resolved hints have them.
    """
    required = set(getattr(cls, "__required_keys__", hints))
    for name, hint in _hints(cls, include_extras=True).items():
        origin = typing.get_origin(hint)
        if origin is typing.NotRequired:
            required.discard(name)
        elif origin is typing.Required:
            required.add(name)
    return frozenset(required)


# Bare typing.Tuple has no arguments, like tuple[()], but means tuple[Any, ...].
_BARE_TUPLE: Final = typing.Tuple  # noqa: UP006


class _Compiler:
    """Compiles one annotation; recursive classes go through forwarding nodes."""

    def __init__(self) -> None:
        self.pending: dict[object, Node] = {}
        self.done: dict[object, Node] = {}

    def node(self, tp: object) -> Node:
        tp = self._unwrap(tp)
        try:
            found = _LEAVES.get(tp) or _NODES.get(tp) or self.done.get(tp)
            pending = self.pending.get(tp)
        except TypeError:  # unhashable annotation metadata: compile without caching
            found = pending = None
        if found is not None:
            return found
        if pending is not None:
            target = pending
            return Node(
                target.label,
                lambda v, st: target.enc(v, st),
                lambda o: target.dec(o),
                target.kinds,
                target.py_types,
                # Late: the target's own test may not be buildable yet.
                exact_of=lambda: lambda v: target.exact(v),
            )
        node = self._build(tp)
        with contextlib.suppress(TypeError):  # unhashable annotation metadata
            self.done[tp] = node
        return node

    @staticmethod
    def _unwrap(tp: object) -> object:
        while True:
            if tp is typing.Any or tp is object:
                return typing.Any
            if isinstance(tp, TypeVar):
                return typing.Any
            if typing.get_origin(tp) is typing.Annotated:
                tp = typing.get_args(tp)[0]
                continue
            supertype = getattr(tp, "__supertype__", None)  # typing.NewType
            if supertype is not None and callable(tp):
                tp = supertype
                continue
            return tp

    def _build(self, tp: object) -> Node:
        if tp is typing.Any:
            return _ANY
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Union or origin is types.UnionType:
            return self._union(tp, args)
        if tp in (list, tuple, dict, set, frozenset, _BARE_TUPLE):
            origin, args = typing.get_origin(tp) or tp, ()
        if origin is list:
            return self._list(tp, args[0] if args else typing.Any)
        if origin is tuple:
            if not args:
                if tp is tuple or tp is _BARE_TUPLE:
                    return self._vtuple(tp, typing.Any)
                return self._tuple(tp, ())  # tuple[()]
            if len(args) == 2 and args[1] is Ellipsis:
                return self._vtuple(tp, args[0])
            return self._tuple(tp, args)
        if origin is dict:
            key, value = args if args else (typing.Any, typing.Any)
            return self._dict(tp, key, value)
        if origin is set or origin is frozenset:
            return self._set(tp, origin, args[0] if args else typing.Any)
        if _is_ndarray(tp):
            return cast(Node, numpy_helpers().ndarray_node())
        if isinstance(tp, type):
            if issubclass(tp, enum.Enum):
                return _enum_node(tp)
            if dataclasses.is_dataclass(tp):
                return self._dataclass(tp)
            if _is_namedtuple(tp):
                return self._namedtuple(tp)
            if _is_typeddict(tp):
                return self._typeddict(tp)
        raise Fail(f"unsupported type annotation {label_of(tp)}")

    def _child(self, tp: object, seg: str) -> Node:
        try:
            return self.node(tp)
        except Fail as e:
            e.path.append(seg)
            raise

    def _list(self, tp: object, item_tp: object) -> Node:
        item = self._child(item_tp, "[*]")
        ienc, idec, label = item.enc, item.dec, label_of(tp)

        def enc(v: Any, st: OOB | None) -> object:
            if isinstance(v, list):
                return _enc_items(ienc, v, st)
            raise fail_type(label, v)

        def dec(o: Any) -> object:
            if type(o) is list or type(o) is tuple:
                return _dec_items(idec, o)
            raise fail_type(label, o)

        def exact_of() -> _Exact:
            iexact = item.exact
            return lambda v: type(v) is list and all(map(iexact, v))

        shape = None if item.shape is None else ("list", item)
        return finish(Node(label, enc, dec, _ARRAY, frozenset({list}), shape, exact_of))

    def _vtuple(self, tp: object, item_tp: object) -> Node:
        item = self._child(item_tp, "[*]")
        ienc, idec, label = item.enc, item.dec, label_of(tp)

        def enc(v: Any, st: OOB | None) -> object:
            if isinstance(v, tuple):
                return tuple(_enc_items(ienc, v, st))
            raise fail_type(label, v)

        def dec(o: Any) -> object:
            if type(o) is list or type(o) is tuple:
                return tuple(_dec_items(idec, o))
            raise fail_type(label, o)

        def exact_of() -> _Exact:
            iexact = item.exact
            return lambda v: type(v) is tuple and all(map(iexact, v))

        shape = None if item.shape is None else ("vtuple", item)
        return finish(Node(label, enc, dec, _ARRAY, frozenset({tuple}), shape, exact_of))

    def _tuple(self, tp: object, item_tps: Sequence[object]) -> Node:
        items = [self._child(t, f"[{i}]") for i, t in enumerate(item_tps)]
        encs = [m.enc for m in items]
        decs = [m.dec for m in items]
        segs = [f"[{i}]" for i in range(len(items))]
        n, label = len(items), label_of(tp)

        def enc(v: Any, st: OOB | None) -> object:
            if isinstance(v, tuple) and len(v) == n:
                return _enc_fields(encs, v, st, segs)
            raise _fail_length(label, v, n, tuple)

        def dec(o: Any) -> object:
            if (type(o) is list or type(o) is tuple) and len(o) == n:
                return tuple(_dec_fields(decs, o, segs))
            raise _fail_length(label, o, n, (list, tuple))

        def exact_of() -> _Exact:
            exacts = [m.exact for m in items]
            return lambda v: (
                type(v) is tuple
                and len(v) == n
                and all(e(x) for e, x in zip(exacts, v, strict=True))
            )

        native = all(m.shape is not None for m in items)
        shape = ("tuple", tuple(items)) if native else None
        return finish(Node(label, enc, dec, _ARRAY, frozenset({tuple}), shape, exact_of))

    def _dict(self, tp: object, key_tp: object, value_tp: object) -> Node:
        key = self._child(key_tp, "<key>")
        value = self._child(value_tp, "[*]")
        kenc, venc, kdec, vdec, label = key.enc, value.enc, key.dec, value.dec, label_of(tp)

        def enc(v: Any, st: OOB | None) -> object:
            if isinstance(v, dict):
                return _enc_dict(kenc, venc, v, st)
            raise fail_type(label, v)

        def dec(o: Any) -> object:
            if type(o) is dict:
                return _dec_dict(kdec, vdec, o)
            raise fail_type(label, o)

        def exact_of() -> _Exact:
            kexact, vexact = key.exact, value.exact
            return lambda v: (
                type(v) is dict and all(map(kexact, v)) and all(map(vexact, v.values()))
            )

        native = key.shape is not None and value.shape is not None
        shape = ("dict", key, value) if native else None
        return finish(Node(label, enc, dec, _MAP, frozenset({dict}), shape, exact_of))

    def _set(self, tp: object, origin: type, item_tp: object) -> Node:
        item = self._child(item_tp, "{*}")
        ienc, idec, label = item.enc, item.dec, label_of(tp)
        build: Callable[[list[Any]], object] = set if origin is set else frozenset

        def enc(v: Any, st: OOB | None) -> object:
            if isinstance(v, origin):
                return _CBORTag(TAG_SET, tuple(_enc_items(ienc, v, st, "{*}")))
            raise fail_type(label, v)

        def dec(o: Any) -> object:
            if type(o) is RawSet or type(o) is FrozenRawSet:
                return build_set(build, _dec_items(idec, o.items, "{*}"))
            raise fail_type(label, o)

        def exact_of() -> _Exact:
            iexact = item.exact
            return lambda v: type(v) is origin and all(map(iexact, cast("Iterable[Any]", v)))

        shape = None if item.shape is None else (origin.__name__, item)
        return finish(Node(label, enc, dec, _SET, frozenset({origin}), shape, exact_of))

    def _union(self, tp: object, args: Sequence[object]) -> Node:
        ranked: list[tuple[tuple[bool, str], tuple[type, ...], Node]] = []
        for arg in args:
            member = self._child(arg, "")
            if member is _ANY:
                return _ANY
            ranked.append((*_member_key(arg), member))
        # The members' positions are their wire indices, and typing may hand this process the
        # union in another order than the peer's (see member_key). sort is stable: members
        # with equal keys keep typing's order, which _union_node makes sure cannot matter.
        ranked.sort(key=operator.itemgetter(0))
        members: list[Node] = []
        keys: list[tuple[str, tuple[type, ...]]] = []
        for (_, text), classes, member in ranked:
            if member not in members:
                members.append(member)
                keys.append((text, classes))
        if len(members) == 1:
            return members[0]
        return _union_node(label_of(tp), members, keys)

    def _fields_node(
        self,
        cls: type,
        names: Sequence[str],
        hints: dict[str, Any],
        segs_prefix: str,
        build: Callable[[list[Any]], object],
        getter: Callable[[Any], Sequence[Any]],
    ) -> Node:
        """A class sent as the array of some of its attributes (dataclass, named tuple)."""
        label = cls.__qualname__
        node = Node(label, _unset, _unset, _ARRAY, frozenset({cls}))
        self.pending[cls] = node
        try:
            fields = [
                self._child(hints.get(name, typing.Any), f"{segs_prefix}{name}") for name in names
            ]
        finally:
            del self.pending[cls]
        encs = [f.enc for f in fields]
        decs = [f.dec for f in fields]
        segs = [f"{segs_prefix}{name}" for name in names]
        n = len(names)

        def enc(v: Any, st: OOB | None) -> object:
            if isinstance(v, cls):
                return _enc_fields(encs, getter(v), st, segs)
            raise fail_type(label, v)

        def dec(o: Any) -> object:
            if (type(o) is list or type(o) is tuple) and len(o) == n:
                values = _dec_fields(decs, o, segs)
                try:
                    return build(values)
                except Exception as exc:
                    raise Fail(f"cannot construct {label}: {exc}") from exc
            raise _fail_length(label, o, n, (list, tuple))

        node.enc, node.dec = enc, dec
        node._exact_of = lambda: fields_exact(cls, getter, fields)
        return node

    def _dataclass(self, cls: type) -> Node:
        hints = _hints(cls)
        for name, hint in hints.items():
            if isinstance(hint, dataclasses.InitVar):
                raise Fail(
                    f"dataclass {cls.__qualname__} has an InitVar ({name}); it cannot be rebuilt"
                )
        fields = [f for f in dataclasses.fields(cls) if f.init]
        positional = [f.name for f in fields if not f.kw_only]
        keywords = [f.name for f in fields if f.kw_only]
        names = positional + keywords
        npos = len(positional)
        if not names:
            getter: Callable[[Any], Sequence[Any]] = lambda v: ()  # noqa: E731
        elif len(names) == 1:
            single = operator.attrgetter(names[0])
            getter = lambda v: (single(v),)  # noqa: E731
        else:
            getter = operator.attrgetter(*names)

        if keywords:

            def build(values: list[Any]) -> object:
                return cls(*values[:npos], **dict(zip(keywords, values[npos:], strict=True)))

        else:

            def build(values: list[Any]) -> object:
                return cls(*values)

        return self._fields_node(cls, names, hints, ".", build, getter)

    def _namedtuple(self, cls: type) -> Node:
        names: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
        hints = _hints(cls)

        def build(values: list[Any]) -> object:
            return cls(*values)

        return self._fields_node(cls, names, hints, ".", build, lambda v: v)

    def _typeddict(self, cls: type) -> Node:
        label = cls.__qualname__
        node = Node(label, _unset, _unset, _MAP, frozenset({dict}))
        self.pending[cls] = node
        try:
            hints = _hints(cls)
            fields = {
                name: self._child(hint, f"[{_short_repr(name)}]") for name, hint in hints.items()
            }
        finally:
            del self.pending[cls]
        required = _required_keys(cls, hints)
        encs = {name: f.enc for name, f in fields.items()}
        decs = {name: f.dec for name, f in fields.items()}

        def check_keys(d: Any) -> None:
            missing = required - d.keys()
            if missing:
                raise Fail(f"{label} is missing required key {sorted(missing)[0]!r}")

        def enc(v: Any, st: OOB | None) -> object:
            if not isinstance(v, dict):
                raise fail_type(label, v)
            check_keys(v)
            out = {}
            for k, x in v.items():
                fn = encs.get(k) if type(k) is str else None
                if fn is None:
                    raise Fail(f"unexpected key {_short_repr(k)} for {label}")
                try:
                    out[k] = fn(x, st)
                except Fail as e:
                    e.path.append(f"[{_short_repr(k)}]")
                    raise
            return out

        def dec(o: Any) -> object:
            if type(o) is not dict:
                raise fail_type(label, o)
            check_keys(o)
            out = {}
            for k, x in o.items():
                fn = decs.get(k) if type(k) is str else None
                if fn is None:
                    raise Fail(f"unexpected key {_short_repr(k)} for {label}")
                try:
                    out[k] = fn(x)
                except Fail as e:
                    e.path.append(f"[{_short_repr(k)}]")
                    raise
            return out

        def exact_of() -> _Exact:
            exacts = {name: f.exact for name, f in fields.items()}

            def exact(v: Any) -> bool:
                if type(v) is not dict or not required <= v.keys():
                    return False
                for k, x in v.items():
                    fn = exacts.get(k) if type(k) is str else None
                    if fn is None or not fn(x):
                        return False
                return True

            return exact

        node.enc, node.dec, node._exact_of = enc, dec, exact_of
        return node


def _fail_length(label: str, value: object, n: int, array: type | tuple[type, ...]) -> Fail:
    """A value of the wrong type, or an array of the wrong length."""
    if isinstance(value, array):
        size = len(cast("Sized", value))
        return Fail(f"expected {label} ({n} items), got {tname(value)} of {size} items")
    return fail_type(label, value)


def _enum_node(cls: type[enum.Enum]) -> Node:
    label = cls.__qualname__
    values = [m.value for m in cls.__members__.values()]
    by_value: bool
    if issubclass(cls, enum.Flag) or (values and all(type(x) is int for x in values)):
        kind: type = int
        by_value = True
    elif values and all(type(x) is str for x in values):
        kind, by_value = str, True
    else:
        kind, by_value = str, False  # mixed or unhashable values: send the member name
    lookup: Mapping[Any, enum.Enum] = cls._value2member_map_ if by_value else cls.__members__

    def enc(v: Any, st: OOB | None) -> object:
        if isinstance(v, cls):
            return v._value_ if by_value else v._name_
        raise fail_type(label, v)

    def dec(o: Any) -> object:
        if type(o) is not kind:
            raise fail_type(label, o)
        member = lookup.get(o)
        if member is not None:
            return member
        if by_value:
            try:
                return cls(o)  # Flag combinations, _missing_
            except Exception as exc:
                raise Fail(f"{_short_repr(o)} is not a valid {label}") from exc
        raise Fail(f"{_short_repr(o)} is not a member of {label}")

    return Node(label, enc, dec, frozenset({kind}), frozenset({cls}))


# -- the canonical order of a union's members -------------------------------------------------


def type_name(tp: object) -> str:
    """A type as schemas name it: ``int``, ``datetime.date``, ``numpy.ndarray``, and any other
    class by its qualified name alone (``Point``, ``Outer.Inner``).

    Without the module: a peer may import the same class from a module named otherwise.
    """
    if not isinstance(tp, type):
        return repr(tp)
    module = tp.__module__
    if module == "builtins":
        return tp.__qualname__
    if module in ("collections.abc", "typing", "datetime", "decimal", "uuid", "enum"):
        return f"{module}.{tp.__qualname__}" if module != "typing" else tp.__qualname__
    if module == "numpy":
        return f"numpy.{tp.__qualname__}"
    return tp.__qualname__


def member_key(tp: object) -> tuple[bool, str]:
    """Where ``tp`` goes among a union's members: the canonical order, the same in every process.

    A tagged union sends a member's position. But ``A | B == B | A``, and typing's caches (and
    the codec's, looked up by equality) hand a process whichever order it happened to build
    first, so the position cannot be typing's. Members are sorted by this key instead, a
    function of the member alone: the compact JSON of its description by name (:func:`type_name`,
    generic arguments in order, nested unions in this same order, ``Annotated``, ``NewType`` and
    type variables unwrapped as the codec unwraps them), ``None`` last.

    Classes are described by name, not by their fields: the codec compiles a union once for
    every place it appears, and a description of fields has to cut a recursive class where it
    repeats, which depends on where the union sits. Members the name leaves equal are dealt with
    by :func:`_check_told_apart`. ``None`` goes last, where ``T | None`` writes it: such a union
    keeps the signature hash it had before there was a canonical order.
    """
    return _ranked(tp)[0]


def _member_key(tp: object) -> tuple[tuple[bool, str], tuple[type, ...]]:
    """:func:`member_key`, and the classes the description names, in its order."""
    key, _, classes = _ranked(tp)
    return key, tuple(classes)


# json.dumps builds an encoder per call when given separators.
_compact_json: Final = json.JSONEncoder(separators=(",", ":")).encode


def _ranked(tp: object) -> tuple[tuple[bool, str], object, list[type]]:
    classes: list[type] = []
    described = _describe(tp, classes)
    text = _compact_json(described)
    return (text == '"None"', text), described, classes


def _describe(tp: object, classes: list[type]) -> object:
    """The JSON-able description behind :func:`member_key`; every class it names is appended to
    ``classes``, so that equal descriptions with the same classes mean members the codec
    compiles alike."""
    tp = _Compiler._unwrap(tp)
    if tp is typing.Any:
        return "Any"
    if tp is None or tp is _NoneType:
        return "None"
    if tp is Ellipsis:
        return "..."
    if tp is tuple or tp is _BARE_TUPLE:
        return "tuple"  # tuple[Any, ...] to the codec, while tuple[()] also has no arguments
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        ranked = sorted(map(_ranked, typing.get_args(tp)), key=operator.itemgetter(0))
        if any(described == "Any" for _, described, _ in ranked):
            return "Any"  # as the codec compiles it
        for _, _, found in ranked:
            classes.extend(found)
        return ["union", [described for _, described, _ in ranked]]
    if origin is not None:
        if isinstance(origin, type):
            classes.append(origin)
        return [type_name(origin), [_describe(a, classes) for a in typing.get_args(tp)]]
    if isinstance(tp, type):
        classes.append(tp)
        return type_name(tp)
    return repr(tp)  # nothing the codec compiles


def _check_told_apart(label: str, keys: Sequence[tuple[str, tuple[type, ...]]]) -> None:
    """Refuse a tagged union two of whose members have one key but different classes.

    Sorting leaves them in typing's order, which need not be the peer's, so an index could mean
    either (``a.Point | b.Point``, or a class defined again under its old name, as a re-run
    notebook cell does, beside a union still holding the old one). Nothing safe tells them apart:
    their fields would not, identical fields being the likely case. Members with one key and the
    same classes (``list[int]`` and ``list[Annotated[int, ...]]``) are compiled alike, so either
    index decodes the same; and a union sent bare has no index at all.
    """
    for (text, classes), (other, other_classes) in itertools.pairwise(keys):
        if text != other:
            continue
        differ = [(a, b) for a, b in zip(classes, other_classes, strict=False) if a is not b]
        if not differ and len(classes) == len(other_classes):
            continue
        what = "different types of one name"
        if differ:
            qa, qb = (f"{t.__module__}.{t.__qualname__}" for t in differ[0])
            if qa == qb:
                what = f"two different classes both named {qa} (one defined again?)"
            else:
                what = f"{qa} and {qb}, two classes of one name"
        raise Fail(
            f"{label} cannot be sent: two of its members differ only in using {what}, and "
            "members are told apart by name, so a peer could not know which one an index "
            "means. Rename one of the classes, or build the annotation again from the current "
            "definitions"
        )


def _union_node(
    label: str, members: list[Node], keys: Sequence[tuple[str, tuple[type, ...]]]
) -> Node:
    """A union of at least two members, in the canonical order (:func:`member_key`); ``keys``
    are theirs.

    That order is their wire index, and the order the encoder tries them in: where no member
    holds a value exactly, the first in it that takes the value decides what it arrives as
    (``True`` as ``1.0`` for ``int | float``). typing's order would make that depend on which
    spelling of the union the sending process happened to build first.
    """
    # Members that cbor2 reads back as different Python types need no tag.
    seen: set[type] = set()
    tagged = False
    for member in members:
        if member.kinds is None or member.kinds & seen:
            tagged = True
            break
        seen |= member.kinds
    if tagged:
        _check_told_apart(label, keys)
    n = len(members)
    candidates: dict[type, list[tuple[int, bool]]] = {}

    def order(t: type) -> list[tuple[int, bool]]:
        exact = [
            (i, True) for i, m in enumerate(members) if m.py_types is not None and t in m.py_types
        ]
        rest = [(i, False) for i in range(n) if (i, True) not in exact]
        found = exact + rest
        candidates[t] = found
        return found

    def enc(v: Any, st: OOB | None) -> object:
        first_exact: Fail | None = None
        mark = 0 if st is None else len(st.bufs)
        for i, exact in candidates.get(type(v)) or order(type(v)):
            try:
                out = members[i].enc(v, st)
            except Fail as e:
                if st is not None:
                    del st.bufs[mark:]  # buffers a failed member had already set aside
                if exact and first_exact is None:
                    first_exact = e
                continue
            return _CBORTag(TAG_UNION, (i, out)) if tagged else out
        if first_exact is not None:
            raise first_exact
        raise fail_type(label, v)

    encoder = _prefer_exact(enc, members, tagged) if _take_a_type_in_common(members) else enc

    if tagged:

        def dec(o: Any) -> object:
            if type(o) is not Variant:
                raise fail_type(label, o)
            index = o.index
            if type(index) is not int or not 0 <= index < n:
                raise Fail(f"union member {_short_repr(index)} out of range for {label}")
            return members[index].dec(o.value)

        union_kinds: frozenset[type] | None = frozenset({Variant})
    else:
        table: dict[type, _Dec] = {}
        for member in members:
            for kind in cast("frozenset[type]", member.kinds):
                table[kind] = member.dec

        def dec(o: Any) -> object:
            fn = table.get(type(o))
            if fn is None:
                raise fail_type(label, o)
            return fn(o)

        union_kinds = frozenset(seen)
    py_types: frozenset[type] | None = frozenset()
    for member in members:
        if member.py_types is None or py_types is None:
            py_types = None
        else:
            py_types |= member.py_types

    def exact_of() -> _Exact:
        exacts = [m.exact for m in members]
        # The encoder picks an exact member whenever there is one.
        return lambda v: any(fits(v) for fits in exacts)

    native = not tagged and all(m.shape is not None for m in members)
    shape = ("union", tuple(members)) if native else None
    return finish(Node(label, encoder, dec, union_kinds, py_types, shape, exact_of))


def _take_a_type_in_common(members: Sequence[Node]) -> bool:
    """Whether two members take values of one Python type without converting them."""
    seen: set[type] = set()
    for member in members:
        if member.py_types is None or member.py_types & seen:
            return True
        seen |= member.py_types
    return False


def _prefer_exact(convert: _Enc, members: Sequence[Node], tagged: bool) -> _Enc:
    """A union encoder that sends a value through the member that keeps its types, if any.

    When several members take a value's type (a list for ``list[float] | list[int]``), the
    first to accept it is not necessarily the one it belongs to: ``list[float]`` takes ``[0]``
    under the number rules and it would arrive as ``[0.0]``. Those members are asked, in the
    union's canonical order (see :func:`_union_node`), whether the value would come back
    unchanged; ``convert`` (the first member in that order that accepts the value, converting
    it if it must) is only used when none would. Unions whose members take disjoint types
    never get here, and pay nothing for it.
    """
    exacts = [m.exact for m in members]
    # Native members pass an exact value to cbor2 as it is: no need to run their check twice.
    as_is = [passes_as_is(m) for m in members]
    rivals: dict[type, tuple[int, ...]] = {}

    def rivals_for(t: type) -> tuple[int, ...]:
        found = tuple(i for i, m in enumerate(members) if m.py_types is None or t in m.py_types)
        # A type only one member takes has nothing to choose between: that member comes first
        # in convert's order anyway.
        rivals[t] = found if len(found) > 1 else ()
        return rivals[t]

    def enc(v: Any, st: OOB | None) -> object:
        found = rivals.get(type(v))
        for i in rivals_for(type(v)) if found is None else found:
            if exacts[i](v):
                if as_is[i]:
                    return _CBORTag(TAG_UNION, (i, v)) if tagged else v
                mark = 0 if st is None else len(st.bufs)
                try:
                    out = members[i].enc(v, st)
                except Fail:
                    # Exactness should imply acceptance; if a member disagrees, convert
                    # decides as it always did, and reports the error if there is one.
                    if st is not None:
                        del st.bufs[mark:]
                    break
                return _CBORTag(TAG_UNION, (i, out)) if tagged else out
        return convert(v, st)

    return enc


# Completed nodes by annotation. Node compilation is deterministic, so two threads racing to
# compile the same type only waste work.
_NODES: dict[object, Node] = {}


def node_for(tp: object) -> Node:
    """The (cached) node of an annotation; raises :class:`Fail` for unsupported ones."""
    try:
        cached = _NODES.get(tp)
    except TypeError:
        cached = None
    if cached is not None:
        return cached
    compiler = _Compiler()
    node = compiler.node(tp)
    for key, done in compiler.done.items():
        _NODES.setdefault(key, done)
    return node


def check_ints(*values: object) -> None:
    """Raise ValueError unless every value is an int (bools are not), for fields from a peer."""
    for value in values:
        if type(value) is not int:
            raise ValueError(f"expected an int field, got {tname(value)}")
