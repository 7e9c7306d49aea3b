"""Generated fast paths for the codec's CBOR-native types.

A node whose subtree holds only ``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None`` and
lists, tuples, dicts and sets of them gets:

- a type check written as one Python expression (``tuple[int, int]`` becomes ``type(v) is tuple
  and len(v) == 2 and type(v[0]) is int and type(v[1]) is int``), placed in front of the node's
  general encoder and decoder, so a matching value goes to cbor2 untouched (the same check,
  large bytes or not, is the node's exactness test, built when a union of members that take
  the same Python type first needs it to pick the member a value belongs to);
- when the node is a scalar or a short tuple of scalars (a typical argument list or result), a
  direct encoder and decoder that write and parse the few CBOR bytes in Python. cbor2 spends
  about 0.45 us on any array, even an empty one, against about 0.15 us for this; anything the
  direct decoder does not recognise (tags, big or non-minimal headers, bad UTF-8, trailing
  bytes) is handed to the general path, which decides.

Only type objects, numbers and generated names reach the generated source text.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import cbor2

NoneType: Final = type(None)
_N = TypeVar("_N")

MISS: Final = object()
"""Returned by a direct decoder that leaves the payload to the general path."""


class RawSet:
    """A set (tag 258) as read: its items, not yet typed.

    The codec reads the tag itself instead of letting cbor2 build a Python set, because a set of
    raw items merges items that differ only once typed (``False`` and a ``Flag`` member of value
    0, ``1.0`` and an ``Enum`` member of value 1 are equal as raw values): the set is built from
    the typed items. Hashed by identity, so that two raw sets read as map keys stay apart until
    typed.
    """

    __slots__ = ("items",)

    def __init__(self, items: object) -> None:
        # The content is read as immutable (see _codec._tag_set): an array arrives as a tuple.
        if type(items) is not tuple:
            raise ValueError(f"expected an array, got {type(items).__name__}")
        self.items = items


class FrozenRawSet(RawSet):
    """A set read where it must be hashable (a set item, a map key): ``Any`` gives a frozenset."""

    __slots__ = ()


# How generated checks refer to the raw set types.
_RAW_SETS: Final = {"_RawSet": RawSet, "_FrozenRawSet": FrozenRawSet}

_dumps = cbor2.dumps


def scalar_types(node: Any) -> frozenset[type] | None:
    """The exact types of a scalar node or a union of scalars, else None."""
    shape = node.shape
    if shape is None:
        return None
    if shape[0] == "scalar":
        return frozenset({shape[1]})
    if shape[0] == "union":
        out: set[type] = set()
        for member in shape[1]:
            types_ = scalar_types(member)
            if types_ is None:
                return None
            out |= types_
        return frozenset(out)
    return None


_SEQ_PYTYPE: Final = {"list": "list", "vtuple": "tuple", "set": "set", "frozenset": "frozenset"}


class _CheckGen:
    """Writes a native node's type check (and decode conversion) as one expression."""

    def __init__(self) -> None:
        self.ns: dict[str, Any] = {}
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, value: object) -> str:
        name = f"_k{len(self.ns)}"
        self.ns[name] = value
        return name

    def types_check(self, types_: frozenset[type], expr: str, exact: bool) -> str:
        check = f"set(map(type, {expr})) <= {self.const(types_)}"
        # Large bytes may have to go out of band, which only the general encoder does.
        return f"st is None and {check}" if bytes in types_ and not exact else check

    def enc(self, node: Any, v: str, exact: bool = False) -> str | None:
        """A check that the value can be handed to cbor2 as it is.

        With ``exact``, whether its types are the node's own, out-of-band bytes or not: the
        node's exactness test (see ``Node.exact``), a function of the value alone.
        """
        shape = node.shape
        if shape is None:
            return None
        kind = shape[0]
        if kind == "scalar":
            t = shape[1]
            if t is NoneType:
                return f"{v} is None"
            if t is bytes and not exact:
                return f"(type({v}) is bytes and (st is None or len({v}) < st.thr))"
            return f"type({v}) is {t.__name__}"
        if kind == "union":
            parts = []
            for member in shape[1]:
                part = self.enc(member, v, exact)
                if part is None:
                    return None
                parts.append(part)
            return "(" + " or ".join(parts) + ")"
        if kind == "tuple":
            parts = [f"type({v}) is tuple", f"len({v}) == {len(shape[1])}"]
            for i, member in enumerate(shape[1]):
                part = self.enc(member, f"{v}[{i}]", exact)
                if part is None:
                    return None
                parts.append(part)
            return "(" + " and ".join(parts) + ")"
        if kind == "dict":
            ktypes, vtypes = scalar_types(shape[1]), scalar_types(shape[2])
            if ktypes is not None and vtypes is not None:
                return (
                    f"(type({v}) is dict and {self.types_check(ktypes, v, exact)}"
                    f" and {self.types_check(vtypes, f'{v}.values()', exact)})"
                )
            k, x = self.fresh("k"), self.fresh("x")
            kc, vc = self.enc(shape[1], k, exact), self.enc(shape[2], x, exact)
            if kc is None or vc is None:
                return None
            return f"(type({v}) is dict and all({kc} and {vc} for {k}, {x} in {v}.items()))"
        item = shape[1]
        types_ = scalar_types(item)
        if types_ is not None:
            return f"(type({v}) is {_SEQ_PYTYPE[kind]} and {self.types_check(types_, v, exact)})"
        x = self.fresh("x")
        part = self.enc(item, x, exact)
        if part is None:
            return None
        return f"(type({v}) is {_SEQ_PYTYPE[kind]} and all({part} for {x} in {v}))"

    def dec(self, node: Any, o: str, imm: bool) -> tuple[str, str] | None:
        """(check, conversion) of what cbor2 read; imm: inside a set or a map key.

        cbor2 reads arrays inside set elements and map keys as tuples, elsewhere as lists.
        """
        shape = node.shape
        if shape is None:
            return None
        kind = shape[0]
        if kind == "scalar":
            t = shape[1]
            return (f"{o} is None" if t is NoneType else f"type({o}) is {t.__name__}"), o
        if kind == "union":
            parts = []
            for member in shape[1]:
                got = self.dec(member, o, imm)
                if got is None or got[1] != o:
                    return None
                parts.append(got[0])
            return "(" + " or ".join(parts) + ")", o
        array = "tuple" if imm else "list"
        if kind == "tuple":
            checks = [f"type({o}) is {array}", f"len({o}) == {len(shape[1])}"]
            convs = []
            for i, member in enumerate(shape[1]):
                got = self.dec(member, f"{o}[{i}]", imm)
                if got is None:
                    return None
                checks.append(got[0])
                convs.append(got[1])
            if all(c == f"{o}[{i}]" for i, c in enumerate(convs)):
                conv = o if imm else f"tuple({o})"
            else:
                conv = "(" + "".join(f"{c}, " for c in convs) + ")"
            return "(" + " and ".join(checks) + ")", conv
        if kind == "vtuple" or kind == "list":
            if kind == "list" and imm:
                return None  # a list can be neither a set element nor a map key
            check, each = self._each(shape[1], o, imm)
            if check is None:
                return None
            if kind == "vtuple":
                conv = (o if imm else f"tuple({o})") if each is None else f"tuple([{each}])"
            else:
                conv = o if each is None else f"[{each}]"
            return f"(type({o}) is {array} and {check})", conv
        if kind == "frozenset" or kind == "set":
            if kind == "set" and imm:
                return None
            items = f"{o}.items"
            check, each = self._each(shape[1], items, True)
            if check is None:
                return None
            if each is None:
                conv = f"{kind}({items})"
            else:
                conv = f"{{{each}}}" if kind == "set" else f"frozenset({{{each}}})"
            return f"(type({o}) is {'_FrozenRawSet' if imm else '_RawSet'} and {check})", conv
        if kind == "dict" and not imm:
            k, x = self.fresh("k"), self.fresh("x")
            kd, vd = self.dec(shape[1], k, True), self.dec(shape[2], x, False)
            if kd is None or vd is None:
                return None
            ktypes, vtypes = scalar_types(shape[1]), scalar_types(shape[2])
            if ktypes is not None and vtypes is not None:
                check = (
                    f"set(map(type, {o})) <= {self.const(ktypes)}"
                    f" and set(map(type, {o}.values())) <= {self.const(vtypes)}"
                )
            else:
                check = f"all({kd[0]} and {vd[0]} for {k}, {x} in {o}.items())"
            if kd[1] == k and vd[1] == x:
                conv = o
            else:
                conv = f"{{{kd[1]}: {vd[1]} for {k}, {x} in {o}.items()}}"
            return f"(type({o}) is dict and {check})", conv
        return None

    def _each(self, item: Any, o: str, imm: bool) -> tuple[str | None, str | None]:
        """Check every item of a raw container; the conversion is a comprehension body or None."""
        x = self.fresh("x")
        got = self.dec(item, x, imm)
        if got is None:
            return None, None
        types_ = scalar_types(item)
        if types_ is not None:
            check = f"set(map(type, {o})) <= {self.const(types_)}"
        else:
            check = f"all({got[0]} for {x} in {o})"
        return check, (None if got[1] == x else f"{got[1]} for {x} in {o}")


def _run(src: str, ns: dict[str, Any], label: str) -> dict[str, Any]:
    exec(compile(src, f"<rapace codec for {label}>", "exec"), ns)
    return ns


def finish(node: _N) -> _N:
    """Put generated checks in front of a native node's general encoder and decoder."""
    n: Any = node
    if n.shape is None:
        return node
    gen = _CheckGen()
    enc_check = gen.enc(n, "v")
    dec = gen.dec(n, "o", False)
    src = []
    if enc_check is not None:
        src.append(
            f"def enc(v, st):\n    if {enc_check}:\n        return v\n    return _slow_enc(v, st)\n"
        )
    if dec is not None:
        src.append(
            f"def dec(o):\n    if {dec[0]}:\n        return {dec[1]}\n    return _slow_dec(o)\n"
        )
    if src:
        ns = {**gen.ns, **_RAW_SETS, "_slow_enc": n.enc, "_slow_dec": n.dec}
        ns = _run("".join(src), ns, n.label)
        n.enc = ns.get("enc", n.enc)
        n.dec = ns.get("dec", n.dec)
    return node


def exact_check(node: Any) -> Callable[[Any], bool]:
    """The exactness test of a native node: its fast path's check, large bytes or not."""
    gen = _CheckGen()
    check = gen.enc(node, "v", exact=True)
    if check is None:  # not a native node
        raise AssertionError(f"no generated check for {node.label}")
    ns = _run(f"def exact(v):\n    return {check}\n", gen.ns, node.label)
    return cast("Callable[[Any], bool]", ns["exact"])


def passes_as_is(node: Any) -> bool:
    """Whether the node's encoder hands every value that passes its exactness test to cbor2
    untouched: native nodes, unless they hold bytes (which may have to go out of band)."""
    shape = node.shape
    if shape is None:
        return False
    kind = shape[0]
    if kind == "scalar":
        return shape[1] is not bytes
    if kind == "union" or kind == "tuple":
        return all(passes_as_is(m) for m in shape[1])
    if kind == "dict":
        return passes_as_is(shape[1]) and passes_as_is(shape[2])
    return passes_as_is(shape[1])


def fields_exact(
    cls: type, getter: Callable[[Any], Any], fields: list[Any]
) -> Callable[[Any], bool]:
    """The exactness test of a class sent as its fields (dataclass, named tuple).

    Written out field by field, scalar fields as inline type checks: a union of lists of
    dataclasses runs it on every item, and a loop over the fields costs several times more.
    """
    ns: dict[str, Any] = {"_cls": cls, "_getter": getter}
    checks = []
    for i, field in enumerate(fields):
        shape = field.shape
        if shape is not None and shape[0] == "scalar":
            t = shape[1]
            if t is NoneType:
                checks.append(f"f[{i}] is None")
            else:
                ns[f"_t{i}"] = t
                checks.append(f"type(f[{i}]) is _t{i}")
        else:
            ns[f"_e{i}"] = field.exact
            checks.append(f"_e{i}(f[{i}])")
    body = " and ".join(checks) or "True"
    src = (
        "def exact(v):\n"
        "    if type(v) is not _cls:\n"
        "        return False\n"
        "    f = _getter(v)\n"
        f"    return {body}\n"
    )
    return cast("Callable[[Any], bool]", _run(src, ns, cls.__qualname__)["exact"])


# -- direct encoding and decoding of scalars and short tuples of scalars ------------------------

# Encodings of -256..255, indexed by the int itself (negative indexes wrap to the back half).
_SMALL_INTS: Final = [_dumps(i) for i in range(256)] + [_dumps(i) for i in range(-256, 0)]
_pack_f64 = struct.Struct(">d").pack
_u16 = struct.Struct(">H").unpack_from
_u32 = struct.Struct(">I").unpack_from
_u64 = struct.Struct(">Q").unpack_from
_f16 = struct.Struct(">e").unpack_from
_f32 = struct.Struct(">f").unpack_from
_f64 = struct.Struct(">d").unpack_from
_MAX_DIRECT_ITEMS: Final = 23  # array header in the initial byte


class _Miss(Exception):
    """The direct decoder met something it leaves to cbor2."""


def read_scalar(d: Any, p: int) -> tuple[object, int]:
    """Parse the scalar item at ``d[p]``: (value, end). Raises for anything else."""
    b = d[p]
    major = b >> 5
    info = b & 31
    if major == 7:
        if info == 27:
            return _f64(d, p + 1)[0], p + 9
        if info == 20:
            return False, p + 1
        if info == 21:
            return True, p + 1
        if info == 22:
            return None, p + 1
        if info == 26:
            return _f32(d, p + 1)[0], p + 5
        if info == 25:
            return _f16(d, p + 1)[0], p + 3
        raise _Miss
    if info < 24:
        arg = info
        p += 1
    elif info == 24:
        arg = d[p + 1]
        p += 2
    elif info == 25:
        arg = _u16(d, p + 1)[0]
        p += 3
    elif info == 26:
        arg = _u32(d, p + 1)[0]
        p += 5
    elif info == 27:
        arg = _u64(d, p + 1)[0]
        p += 9
    else:
        raise _Miss
    if major == 0:
        return arg, p
    if major == 1:
        return -1 - arg, p
    end = p + arg
    if end > len(d):
        raise _Miss
    if major == 3:
        return str(d[p:end], "utf-8"), end
    if major == 2:
        return bytes(d[p:end]), end
    raise _Miss


_ENCODE_EXPR: Final = {
    int: "(_SMALL_INTS[{x}] if -257 < {x} < 256 else _dumps({x}))",
    float: "_F64 + _pack_f64({x})",
    str: "_dumps({x})",
    bytes: "_dumps({x})",
    bool: "(_TRUE if {x} else _FALSE)",
    NoneType: "_NULL",
}
_ORDER: Final = (int, float, str, bool, NoneType, bytes)  # most common first
_DIRECT_NS: Final = {
    "_SMALL_INTS": _SMALL_INTS,
    "_dumps": _dumps,
    "_pack_f64": _pack_f64,
    "_F64": b"\xfb",
    "_TRUE": b"\xf5",
    "_FALSE": b"\xf4",
    "_NULL": b"\xf6",
    "_read": read_scalar,
    "_f64": _f64,
    "_MISS": MISS,
    "_Miss": _Miss,
    "_struct_error": struct.error,
}


def _encode_item(types_: frozenset[type], x: str, e: str) -> list[str]:
    """Statements setting ``e`` to the encoding of ``x``, or returning None for other types."""
    lines = []
    branches = [t for t in _ORDER if t in types_]
    for i, t in enumerate(branches):
        test = f"{x} is None" if t is NoneType else f"type({x}) is {t.__name__}"
        if t is bytes:
            test = f"{test} and len({x}) < thr"
        lines.append(f"{'if' if i == 0 else 'elif'} {test}:")
        lines.append(f"    {e} = {_ENCODE_EXPR[t].format(x=x)}")
    lines += ["else:", "    return None"]
    return lines


def _read_item(types_: frozenset[type], x: str, at: str) -> list[str]:
    """Statements reading the item at offset ``at`` into ``x`` and its end into ``p``.

    The common one-byte-header cases of the expected types are parsed inline; everything else
    goes through :func:`read_scalar`.
    """
    branches = []
    if int in types_:
        branches.append(("b < 24", [f"{x} = b", f"p = {at} + 1"]))
    if str in types_:
        branches.append(
            (
                "0x60 <= b < 0x78",
                [
                    f"e = {at} + 1 + b - 0x60",
                    "if e > len(d):",
                    "    raise _Miss",
                    f'{x} = str(d[{at} + 1:e], "utf-8")',
                    "p = e",
                ],
            )
        )
    if float in types_:
        branches.append(("b == 0xFB", [f"{x} = _f64(d, {at} + 1)[0]", f"p = {at} + 9"]))
    if bool in types_:
        branches.append(("b == 0xF5", [f"{x} = True", f"p = {at} + 1"]))
        branches.append(("b == 0xF4", [f"{x} = False", f"p = {at} + 1"]))
    if NoneType in types_:
        branches.append(("b == 0xF6", [f"{x} = None", f"p = {at} + 1"]))
    lines = [f"b = d[{at}]"]
    for i, (test, body) in enumerate(branches):
        lines.append(f"{'if' if i == 0 else 'elif'} {test}:")
        lines += [f"    {line}" for line in body]
    fallback = f"{x}, p = _read(d, {at})"
    if branches:
        lines += ["else:", f"    {fallback}"]
    else:
        lines = [fallback]
    return lines


def _check_item(types_: frozenset[type], x: str) -> str:
    tests = [
        f"{x} is None" if t is NoneType else f"type({x}) is {t.__name__}"
        for t in _ORDER
        if t in types_
    ]
    return "(" + " or ".join(tests) + ")"


def _indent(lines: list[str], n: int = 1) -> str:
    pad = "    " * n
    return "".join(f"{pad}{line}\n" for line in lines)


def direct_codec(
    node: Any,
) -> tuple[Callable[[Any, int], bytes | None], Callable[[Any], Any]] | None:
    """Direct encoder and decoder for a scalar or a short tuple of scalars, else None.

    The encoder takes the value and the out-of-band threshold (bytes at least that long are
    left to the general encoder) and returns the payload or None. The decoder takes the payload
    and returns the value or :data:`MISS`.
    """
    shape = node.shape
    if shape is None:
        return None
    single = scalar_types(node)
    if single is not None:
        enc = [
            "def enc(v, thr):",
            *_indent(_encode_item(single, "v", "e")).splitlines(),
            "    return e",
        ]
        dec = [
            "def dec(d):",
            "    try:",
            _indent(_read_item(single, "x", "0"), 2).rstrip("\n"),
            "    except (_Miss, IndexError, ValueError, _struct_error):",
            "        return _MISS",
            f"    if p == len(d) and {_check_item(single, 'x')}:",
            "        return x",
            "    return _MISS",
        ]
    elif shape[0] == "tuple" and len(shape[1]) <= _MAX_DIRECT_ITEMS:
        items = [scalar_types(m) for m in shape[1]]
        if any(t is None for t in items):
            return None
        n = len(items)
        names = [f"x{i}" for i in range(n)]
        enc = [
            "def enc(v, thr):",
            f"    if type(v) is not tuple or len(v) != {n}:",
            "        return None",
        ]
        if n:
            enc.append(f"    {', '.join(names)}, = v")
        for i, types_ in enumerate(items):
            enc += _indent(
                _encode_item(cast("frozenset[type]", types_), f"x{i}", f"e{i}")
            ).splitlines()
        enc.append(
            "    return " + " + ".join([repr(bytes([0x80 + n])), *[f"e{i}" for i in range(n)]])
        )
        dec = [
            "def dec(d):",
            "    try:",
            f"        if d[0] != {0x80 + n}:",
            "            return _MISS",
        ]
        if n == 0:
            dec.append("        p = 1")
        for i, types_ in enumerate(items):
            # The first item follows the one-byte array header.
            lines = _read_item(cast("frozenset[type]", types_), f"x{i}", "1" if i == 0 else "p")
            dec.append(_indent(lines, 2).rstrip("\n"))
        checks = " and ".join(
            _check_item(cast("frozenset[type]", t), f"x{i}") for i, t in enumerate(items)
        )
        dec += [
            "    except (_Miss, IndexError, ValueError, _struct_error):",
            "        return _MISS",
            f"    if p == len(d){' and ' + checks if checks else ''}:",
            f"        return ({''.join(f'x{i}, ' for i in range(n))})",
            "    return _MISS",
        ]
    else:
        return None
    ns = _run("\n".join(enc) + "\n" + "\n".join(dec) + "\n", dict(_DIRECT_NS), node.label)
    return ns["enc"], ns["dec"]
