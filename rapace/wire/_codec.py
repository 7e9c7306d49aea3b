"""Type-directed CBOR codec for call arguments, results and stream items.

A :class:`TypeCodec` is compiled once per type annotation (as returned by
``typing.get_type_hints``) into a pair of closures: the encoder turns a value into objects cbor2
writes natively, the decoder checks what cbor2 read against the annotation and rebuilds the
declared types. Subtrees made only of CBOR-native types (``int``, ``float``, ``str``, ``bytes``,
``bool``, ``None`` and lists, tuples, dicts and sets of them) get a generated fast path that
checks the exact types in one expression and hands the value to cbor2 untouched; a scalar or a
short tuple of scalars (the usual arguments and result) is written and parsed without cbor2
(see :mod:`rapace.wire._codec_gen`).

Encoding rules worth knowing:

- ``bool`` (and ``IntEnum``) passed where ``int`` is declared travels as a plain ``int``; an
  ``int`` passed where ``float`` is declared travels as a ``float`` (PEP 484 numeric tower). An
  int too large for a float is an :class:`~rapace._errors.EncodeError`.
- ``bytes``, ``bytearray`` and ``memoryview`` are interchangeable on the way in; the receiver gets
  the type its annotation names. A ``memoryview`` arrives as a one-dimensional ``"B"`` view.
- A union whose members read back as different Python types (``int | str``, ``T | None``) is
  sent as the bare value. When two members share a CBOR shape (two dataclasses, ``list[int] |
  list[str]``), the value is wrapped in a union tag carrying the member index. A value goes to
  the member that holds it exactly, same types all the way down, when one does (``[0]`` is the
  ``list[int]`` of ``list[float] | list[int]``, ``True`` the ``bool`` of ``int | bool``); only
  otherwise to the first member that takes it by the rules above. Index and "first" go by the
  union's canonical order (by name, ``None`` last; see ``_codec_core.member_key``), not the
  order written: ``A | B == B | A``, and which one a process gets depends on what it built
  first.
- Dataclasses and named tuples travel as arrays of their fields, typed dicts as maps. Enums
  travel as their value when every value is an ``int`` (or every value a ``str``), else by name.
- Datetimes keep their ``utcoffset`` (as a fixed-offset timezone, the zone name is not sent) and
  ``fold``. A ``time`` whose tzinfo needs a date to give an offset (``ZoneInfo``) arrives naive.
- ``Any`` and ``object`` carry any supported value and decode to plain Python: CBOR arrays become
  lists, maps dicts, dataclasses arrive as dicts of their fields, enums as their values.
- Generic parameters (``TypeVar``) are treated as ``Any``.

Out-of-band buffers: with ``oob_threshold`` set, bytes-like values and arrays of at least that
many bytes are not copied into the CBOR. They are appended to :attr:`Encoded.buffers` and the
payload carries a reference (index and layout) that :meth:`TypeCodec.decode` resolves against
the buffers the transport hands back, without copying when the annotation allows it.

Shared memory: with a ``placer`` (:class:`~rapace.wire.BufferPlacer`, provided by the shared-
memory transport), buffers already in shared memory are sent as references to where they are,
whatever their size, and other large ones are placed by the transport; the payload carries
``where`` (a region the transport names: an arena block, a link block), the offset of the
first byte (of element 0 for an array, whose strides may be negative), and whether the
receiver may write. The receiver's :class:`~rapace.wire.BufferResolver` checks every byte the
reference can reach against the region before making a view.

Tags this codec writes or accepts (cbor2 decodes the standard ones itself, except sets, whose
items are typed before the set is built; every other tag a peer sends is rejected, including
shared references 28/29, string references 25/256, regular expressions 35 and MIME 36):

==========  ======================================  =====================================
tag         meaning                                 content
==========  ======================================  =====================================
2, 3        bignum (RFC 8949)                       byte string
37          UUID                                    16-byte string
40          row-major array (RFC 8746)              ``[shape, typed array]``
64-87       typed array (RFC 8746)                  byte string
100         date: days since 1970-01-01 (RFC 8943)  int
258         set                                     array
0x72617000  ndarray of a dtype RFC 8746 lacks       ``[dtype, shape, bytes]``
0x72617001  out-of-band bytes                       ``[index, nbytes]``
0x72617002  out-of-band ndarray                     ``[index, dtype, shape, order]``
0x72617003  datetime                                ``[Y, M, D, h, m, s, us, off, fold]``
0x72617004  time                                    ``[h, m, s, us, off, fold]``
0x72617005  timedelta                               ``[days, seconds, us]``
0x72617006  Decimal                                 text, ``str(d)`` (exact)
0x72617007  union member                            ``[member index, value]`` (canonical
                                                    order)
0x72617008  bytes in shared memory                  ``[where, offset, nbytes, writable]``
0x72617009  ndarray in shared memory                ``[where, offset, dtype, shape,
                                                    strides, writable]``
==========  ======================================  =====================================

``off`` is the UTC offset in microseconds or null for naive values. Tag 40 is used for the
dtypes RFC 8746 covers: unsigned and signed integers of 8 to 64 bits and float16/32/64, in
either byte order. ``dtype`` is ``dtype.str`` (``"<f8"``), ``[dtype, shape]`` for a subarray, or
a map ``{names, formats, offsets, itemsize}`` for a structured dtype (field titles are not
sent). ``order`` is ``"C"`` or ``"F"``. Arrays decode read-only unless they are views of a
writable out-of-band buffer.

Decoding treats the payload as hostile: size, nesting depth, container and string lengths are
checked against :class:`CodecLimits` before anything large is built, trailing bytes are an
error, and every failure surfaces as :class:`~rapace._errors.DecodeError`.

numpy is optional and only imported once a value, annotation or received tag involves it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import io  # BytesIO only: an in-memory buffer, no I/O
import re
import struct
import uuid
from collections.abc import Callable, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    NamedTuple,
    TypeVar,
    cast,
    overload,
)

import cbor2

from rapace._errors import DecodeError, EncodeError
from rapace.wire._codec_core import (
    OOB,
    TAG_DATE,
    TAG_DATETIME,
    TAG_DECIMAL,
    TAG_NDARRAY,
    TAG_OOB_BYTES,
    TAG_OOB_NDARRAY,
    TAG_SET,
    TAG_SHM_BYTES,
    TAG_SHM_NDARRAY,
    TAG_TIME,
    TAG_TIMEDELTA,
    TAG_UNION,
    TAG_UUID,
    BufferPlacer,
    BufferResolver,
    Fail,
    OOBView,
    Variant,
    check_ints,
    label_of,
    node_for,
    numpy_helpers,
)
from rapace.wire._codec_gen import MISS, FrozenRawSet, RawSet, direct_codec

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = (
    "DEFAULT_LIMITS",
    "CodecLimits",
    "Encoded",
    "TypeCodec",
    "codec_for",
)

T = TypeVar("T")

_dumps = cbor2.dumps
_loads = cbor2.loads
_load = cbor2.load
_tuple_new = tuple.__new__

# Tags cbor2 decodes itself that are safe to let through: bignums, UUID, date.
_CBOR2_TAGS: Final = frozenset({2, 3, TAG_UUID, TAG_DATE})
# RFC 8746: 40 wraps a typed array (64-87) with its shape.
_NUMPY_TAGS: Final = frozenset({40, TAG_NDARRAY, *range(64, 88)})


@dataclasses.dataclass(frozen=True)
class CodecLimits:
    """Decode-side limits applied to bytes received from a peer.

    Attributes:
        max_payload_bytes: Largest payload accepted, checked before anything else.
        max_depth: Deepest nesting of arrays, maps and tags.
        max_container_len: Most items in one array or entries in one map.
        max_str_bytes: Longest byte or text string.
    """

    max_payload_bytes: int = 256 * 2**20
    max_depth: int = 64
    max_container_len: int = 2**24
    max_str_bytes: int = 256 * 2**20
    _small: ClassVar[int]  # set per instance in __post_init__

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"CodecLimits.{field.name} must be a positive int, got {value!r}")
        # Payloads up to this size pass the size limit and need no header pre-scan (they cannot
        # hold a string or a container larger than themselves): one comparison on the hot path.
        # Kept out of the fields so that asdict() and replace() see only the limits.
        object.__setattr__(
            self, "_small", min(self.max_payload_bytes, self.max_container_len, self.max_str_bytes)
        )


DEFAULT_LIMITS: Final = CodecLimits()


class Encoded(NamedTuple):
    """An encoded value: the CBOR payload and the buffers it references out of band."""

    data: bytes
    """The CBOR payload."""
    buffers: tuple[memoryview, ...]
    """Out-of-band buffers (format ``"B"``), referenced from ``data`` by index.

    They are views of the encoded objects, not copies: leave those unchanged until sent (a
    ``bytearray`` cannot be resized while a view of it exists)."""


# -- decoding: tags, buffers, limits ------------------------------------------------------------


def _fields_of(value: object, n: int, what: str) -> Sequence[Any]:
    if (type(value) is list or type(value) is tuple) and len(value) == n:
        return cast("Sequence[Any]", value)
    raise ValueError(f"malformed {what}")


def _tz(off: object) -> _dt.tzinfo | None:
    if off is None:
        return None
    check_ints(off)
    return _dt.timezone(_dt.timedelta(microseconds=cast(int, off)))


def _tag_datetime(value: object, immutable: bool) -> _dt.datetime:
    y, mo, d, h, mi, s, us, off, fold = _fields_of(value, 9, "datetime")
    check_ints(y, mo, d, h, mi, s, us, fold)
    return _dt.datetime(y, mo, d, h, mi, s, us, _tz(off), fold=fold)


def _tag_time(value: object, immutable: bool) -> _dt.time:
    h, mi, s, us, off, fold = _fields_of(value, 6, "time")
    check_ints(h, mi, s, us, fold)
    return _dt.time(h, mi, s, us, _tz(off), fold=fold)


def _tag_timedelta(value: object, immutable: bool) -> _dt.timedelta:
    days, seconds, us = _fields_of(value, 3, "timedelta")
    check_ints(days, seconds, us)
    return _dt.timedelta(days=days, seconds=seconds, microseconds=us)


def _tag_decimal(value: object, immutable: bool) -> decimal.Decimal:
    if type(value) is not str:
        raise ValueError("malformed Decimal")
    return decimal.Decimal(value)


def _tag_union(value: object, immutable: bool) -> Variant:
    index, member = _fields_of(value, 2, "union member")
    return Variant(index, member)


@cbor2.shareable_decoder(name="set", immutable=True)
def _tag_set(immutable: bool) -> tuple[None, type[RawSet]]:
    """Decoder of sets, in cbor2's two-stage form: the only one that can ask for immutable content.

    Immutable content (arrays as tuples, maps as frozendicts) is how cbor2 reads the items of its
    own sets: the item decoders expect it, and it keeps an ``Any`` inside an item hashable.
    ``immutable`` says whether this set is itself a set item or inside a map key. The None is
    what a shared reference to the set would see while it is read; the codec refuses those
    tags (28, 29).
    """
    return (None, FrozenRawSet) if immutable else (None, RawSet)


# Semantic decoders (value, immutable) and, for sets, cbor2's two-stage decoder (immutable).
_TAG_HANDLERS: Final[dict[int, Callable[..., Any]]] = {
    TAG_DATETIME: _tag_datetime,
    TAG_TIME: _tag_time,
    TAG_TIMEDELTA: _tag_timedelta,
    TAG_DECIMAL: _tag_decimal,
    TAG_UNION: _tag_union,
    TAG_SET: _tag_set,
}


class _Tags(dict[int, Callable[..., Any]]):
    """cbor2's ``semantic_decoders``: every tag a peer sends is looked up here.

    cbor2 falls back to its own decoder only when the lookup raises ``LookupError``, so this
    doubles as the allow-list: standard tags we accept raise ``KeyError``, ours get a handler,
    and any other tag raises ``ValueError`` before its content is even decoded.
    """

    __slots__ = ("buffers", "resolver")

    def __init__(
        self, buffers: Sequence[memoryview] = (), resolver: BufferResolver | None = None
    ) -> None:
        super().__init__()
        self.buffers = buffers
        self.resolver = resolver

    def __missing__(self, tag: int) -> Callable[..., Any]:
        handler = _TAG_HANDLERS.get(tag)
        if handler is not None:
            self[tag] = handler
            return handler
        if tag == TAG_OOB_BYTES:
            return self._oob_bytes
        if tag == TAG_OOB_NDARRAY:
            return self._oob_ndarray
        if tag == TAG_SHM_BYTES:
            return self._shm_bytes
        if tag == TAG_SHM_NDARRAY:
            return self._shm_ndarray
        if tag in _NUMPY_TAGS:
            try:
                handler = cast("Callable[[Any, bool], Any]", numpy_helpers().tag_handler(tag))
            except ImportError:
                raise ValueError("the payload holds an array but numpy is not installed") from None
            self[tag] = handler
            return handler
        if tag in _CBOR2_TAGS:
            raise KeyError(tag)
        raise ValueError(f"CBOR tag {tag} is not allowed")

    def _buffer(self, index: object) -> memoryview:
        check_ints(index)
        if not 0 <= cast(int, index) < len(self.buffers):
            raise ValueError(
                f"out-of-band buffer {index} referenced, {len(self.buffers)} buffers supplied"
            )
        return self.buffers[cast(int, index)]

    def _oob_bytes(self, value: object, immutable: bool) -> OOBView:
        index, nbytes = _fields_of(value, 2, "out-of-band reference")
        view = self._buffer(index)
        if nbytes != view.nbytes or type(nbytes) is not int:
            raise ValueError(f"out-of-band buffer {index} holds {view.nbytes} bytes, not {nbytes}")
        return OOBView(view)

    def _oob_ndarray(self, value: object, immutable: bool) -> object:
        index, dtype, shape, order = _fields_of(value, 4, "out-of-band array")
        return numpy_helpers().array_from_buffer(self._buffer(index), dtype, shape, order)

    def _resolver(self) -> BufferResolver:
        if self.resolver is None:
            raise ValueError("a shared-memory reference arrived over a link without shared memory")
        return self.resolver

    def _shm_bytes(self, value: object, immutable: bool) -> OOBView:
        where, offset, nbytes, writable = _fields_of(value, 4, "shared-memory reference")
        check_ints(offset, nbytes)
        if type(writable) is not bool:
            raise ValueError("malformed shared-memory reference")
        view = self._resolver().resolve(where, offset, nbytes, writable)
        return OOBView(view, shared=not view.readonly)

    def _shm_ndarray(self, value: object, immutable: bool) -> object:
        where, offset, dtype, shape, strides, writable = _fields_of(value, 6, "shared-memory array")
        check_ints(offset)
        if type(writable) is not bool:
            raise ValueError("malformed shared-memory array")
        return numpy_helpers().array_from_shared(
            self._resolver(), where, offset, dtype, shape, strides, writable
        )


_TAGS: Final = _Tags()


def _buffers(buffers: Sequence[Buffer]) -> list[memoryview]:
    out = []
    for buf in buffers:
        view = buf if type(buf) is memoryview else memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        elif not view.c_contiguous:
            raise ValueError("out-of-band buffers must be contiguous")
        out.append(view)
    return out


_u16 = struct.Struct(">H").unpack_from
_u32 = struct.Struct(">I").unpack_from
_u64 = struct.Struct(">Q").unpack_from
# Runs of one-byte items (small ints, false/true/null/undefined) and of 8-byte floats: the common
# contents of huge arrays, skipped at C speed.
_RUN1: Final = re.compile(rb"[\x00-\x17\x20-\x37\xf4-\xf7]+")
_RUN9: Final = re.compile(rb"(?:\xfb[\x00-\xff]{8})+")
_RUN1_START: Final = (
    frozenset(range(0x18)) | frozenset(range(0x20, 0x38)) | {0xF4, 0xF5, 0xF6, 0xF7}
)


def _prescan(data: Any, limits: CodecLimits) -> int:
    """Walk the CBOR headers of a large payload; return where its first item ends.

    Checks every string and container length against the limits before cbor2 allocates
    anything for them. Only needed when the payload is larger than those limits: a smaller
    payload cannot hold a longer string or more items than its own size.
    """
    n = len(data)
    max_items, max_str = limits.max_container_len, limits.max_str_bytes
    max_frames = 2 * limits.max_depth + 2
    stack: list[int] = []  # items still expected by each open array, map or tag
    pos = 0
    while True:
        if stack and stack[-1] > 1 and pos < n:
            first = data[pos]
            # Leave at least one item to the general path, which closes containers.
            if first in _RUN1_START:
                m = _RUN1.match(data, pos)
                if m is not None:
                    count = min(m.end() - pos, stack[-1] - 1)
                    pos += count
                    stack[-1] -= count
            elif first == 0xFB:
                m = _RUN9.match(data, pos)
                if m is not None:
                    count = min((m.end() - pos) // 9, stack[-1] - 1)
                    pos += 9 * count
                    stack[-1] -= count
        if pos >= n:
            raise ValueError("truncated payload")
        initial = data[pos]
        pos += 1
        major, info = initial >> 5, initial & 31
        if info < 24:
            arg = info
        elif info == 24:
            arg = data[pos]
            pos += 1
        elif info == 25:
            (arg,) = _u16(data, pos)
            pos += 2
        elif info == 26:
            (arg,) = _u32(data, pos)
            pos += 4
        elif info == 27:
            (arg,) = _u64(data, pos)
            pos += 8
        else:
            raise ValueError("indefinite-length or reserved item")
        if major == 2 or major == 3:
            if arg > max_str:
                raise ValueError(f"string of {arg} bytes exceeds max_str_bytes ({max_str})")
            pos += arg
            if pos > n:
                raise ValueError("truncated payload")
        elif major == 4 or major == 5:
            if arg > max_items:
                raise ValueError(
                    f"container of {arg} items exceeds max_container_len ({max_items})"
                )
            if arg:
                if major == 5:
                    arg *= 2
                if arg > n - pos:
                    raise ValueError("truncated payload")
                stack.append(arg)
                if len(stack) > max_frames:
                    raise ValueError("payload nested too deeply")
                continue
        elif major == 6:
            stack.append(1)
            if len(stack) > max_frames:
                raise ValueError("payload nested too deeply")
            continue
        # One item is complete: count it against its container, closing finished ones.
        while stack:
            if stack[-1] > 1:
                stack[-1] -= 1
                break
            stack.pop()
        else:
            return pos


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


# Trailing bytes: cbor2.loads stops after the first item and ignores the rest.
# - Small payloads are wrapped as [payload, nonce]: trailing bytes become the second element
#   instead of the nonce. The nonce is per-process and never sent, so a peer cannot forge it.
#   This costs one extra array (about 0.1 us); cbor2.load on a BytesIO, which reports where the
#   item ended, costs 0.5 us more than loads.
# - Larger payloads use that BytesIO instead: the wrapper would copy the payload, and copying a
#   fresh MiB costs far more than 0.5 us.
# - Payloads larger than the limits get their headers pre-scanned, which finds the end too.
_NONCE: Final = uuid.uuid4().bytes
_HEAD: Final = b"\x82"
_TAIL: Final = _dumps(_NONCE)
_WRAP_MAX: Final = 8192


# -- public API ---------------------------------------------------------------------------------


class TypeCodec(Generic[T]):
    """Encoder and decoder for the values of one type annotation.

    The annotation is compiled once, here; :meth:`encode` and :meth:`decode` only run the
    compiled code.

    Args:
        tp: The annotation, as ``typing.get_type_hints`` returns it.
        root: Name of the value in error messages (``"args"`` gives ``args[1]["image"]``).
        oob_threshold: Bytes-like values and arrays of at least this many bytes go out of band;
            None keeps everything in the payload.

    Raises:
        EncodeError: The annotation holds a type the codec cannot carry.

    Type checkers infer ``T`` from a class (``TypeCodec(int)`` is a ``TypeCodec[int]``); they see
    ``typing.Any`` as a class too, so annotate ``TypeCodec[Any]`` (or use :func:`codec_for`).
    """

    __slots__ = ("_dec", "_direct_dec", "_direct_enc", "_enc", "_limit", "_root", "_thr", "tp")

    @overload
    def __init__(
        self: TypeCodec[T], tp: type[T], *, root: str = ..., oob_threshold: int | None = ...
    ) -> None: ...
    @overload
    def __init__(
        self: TypeCodec[Any], tp: object, *, root: str = ..., oob_threshold: int | None = ...
    ) -> None: ...
    def __init__(
        self, tp: object, *, root: str = "value", oob_threshold: int | None = None
    ) -> None:
        if oob_threshold is not None and (type(oob_threshold) is not int or oob_threshold < 0):
            raise ValueError(
                f"oob_threshold must be a non-negative int or None, got {oob_threshold!r}"
            )
        self.tp = tp
        self._root = root
        self._thr = oob_threshold
        # Bytes this long go out of band; the direct encoder leaves them to the general one.
        self._limit = _NO_OOB if oob_threshold is None else oob_threshold
        try:
            node = node_for(tp)
        except Fail as e:
            raise EncodeError(e.where(root)) from e.__cause__
        self._enc = node.enc
        self._dec = node.dec
        direct = direct_codec(node)
        self._direct_enc: Callable[[Any, int], bytes | None] | None = None
        self._direct_dec: Callable[[Any], Any] | None = None
        if direct is not None:
            self._direct_enc, self._direct_dec = direct

    def __repr__(self) -> str:
        return f"TypeCodec({label_of(self.tp)}, root={self._root!r}, oob_threshold={self._thr!r})"

    def encode(self, value: T, placer: BufferPlacer | None = None) -> Encoded:
        """Encode a value of the codec's type.

        With a ``placer`` (a transport with shared memory), shared buffers are sent as
        references and bytes-like values and arrays of at least ``placer.threshold`` bytes are
        placed by it instead of copied into the payload.

        Raises:
            EncodeError: The value does not match the annotation or cannot be encoded; the
                message names the path of the offending part.
        """
        if placer is not None:
            return self._encode_placed(value, placer)
        if self._direct_enc is not None:
            data = self._direct_enc(value, self._limit)
            if data is not None:
                return _tuple_new(Encoded, (data, ()))
        st = None if self._thr is None else OOB(self._thr)
        try:
            data = _dumps(self._enc(value, st))
        except Fail as e:
            raise EncodeError(e.where(self._root)) from e.__cause__
        except Exception as exc:
            raise EncodeError(f"{self._root}: {_why(exc)}") from exc
        if st is None or not st.bufs:
            return _tuple_new(Encoded, (data, ()))
        return _tuple_new(Encoded, (data, tuple(st.bufs)))

    def _encode_placed(self, value: T, placer: BufferPlacer) -> Encoded:
        threshold = placer.threshold
        if self._direct_enc is not None:
            data = self._direct_enc(value, threshold)
            if data is not None:
                return _tuple_new(Encoded, (data, ()))
        try:
            data = _dumps(self._enc(value, OOB(threshold, placer)))
        except Fail as e:
            raise EncodeError(e.where(self._root)) from e.__cause__
        except Exception as exc:
            raise EncodeError(f"{self._root}: {_why(exc)}") from exc
        return _tuple_new(Encoded, (data, ()))

    def decode(
        self,
        data: Buffer,
        buffers: Sequence[Buffer] = (),
        *,
        limits: CodecLimits = DEFAULT_LIMITS,
        resolver: BufferResolver | None = None,
    ) -> T:
        """Decode a payload received from a peer.

        Args:
            data: The CBOR payload, exactly (trailing bytes are an error).
            buffers: The out-of-band buffers sent with it, in order.
            limits: Bounds on what the payload may ask for.
            resolver: Resolves shared-memory references (a transport with shared memory).

        Raises:
            DecodeError: The payload is malformed, breaks a limit, or does not match the
                annotation. No other exception escapes.
        """
        direct = self._direct_dec
        if (
            direct is not None
            and not buffers
            and (
                type(data) is bytes
                or (isinstance(data, memoryview) and data.format == "B" and data.ndim == 1)
            )
            and len(data) <= limits._small
        ):
            value = direct(data)
            if value is not MISS:
                return cast(T, value)
        root = self._root
        try:
            return cast(T, self._dec(_read(data, buffers, limits, root, resolver)))
        except DecodeError:
            raise
        except Fail as e:
            raise DecodeError(e.where(root)) from e.__cause__
        except Exception as exc:
            raise DecodeError(f"{root}: malformed payload: {_why(exc)}") from exc


_NO_OOB: Final = 1 << 63


def _read(
    data: Buffer,
    buffers: Sequence[Buffer],
    limits: CodecLimits,
    root: str,
    resolver: BufferResolver | None = None,
) -> Any:
    """Parse a payload with cbor2 under the limits; what it holds is checked by the caller."""
    if type(data) is bytes:
        n = len(data)
    else:
        data = memoryview(data).cast("B")
        n = data.nbytes
    if n > limits.max_payload_bytes:
        raise DecodeError(
            f"{root}: payload of {n} bytes exceeds max_payload_bytes ({limits.max_payload_bytes})"
        )
    tags = _Tags(_buffers(buffers), resolver) if buffers or resolver is not None else _TAGS
    if n > limits._small:
        if _prescan(data, limits) != n:
            raise DecodeError(f"{root}: trailing bytes after the payload")
        return _loads(
            data, semantic_decoders=tags, max_depth=limits.max_depth, allow_indefinite=False
        )
    if n > _WRAP_MAX:
        # Reading from a BytesIO (which shares a bytes object) tells where the item ended.
        fp = io.BytesIO(data)
        raw = _load(fp, semantic_decoders=tags, max_depth=limits.max_depth, allow_indefinite=False)
        if fp.tell() != n:
            raise DecodeError(f"{root}: trailing bytes after the payload")
        return raw
    pair = _loads(
        b"".join((_HEAD, data, _TAIL)),
        semantic_decoders=tags,
        max_depth=limits.max_depth + 1,
        allow_indefinite=False,
    )
    if type(pair[1]) is not bytes or pair[1] != _NONCE:
        raise DecodeError(f"{root}: trailing bytes after the payload")
    return pair[0]


_CODECS: dict[tuple[object, str, int | None], TypeCodec[Any]] = {}


def codec_for(
    tp: object, *, root: str = "value", oob_threshold: int | None = None
) -> TypeCodec[Any]:
    """Return the (cached) codec for an annotation.

    Raises:
        EncodeError: The annotation holds a type the codec cannot carry.
    """
    key = (tp, root, oob_threshold)
    try:
        codec = _CODECS.get(key)
    except TypeError:  # unhashable annotation metadata
        return TypeCodec(tp, root=root, oob_threshold=oob_threshold)
    if codec is None:
        codec = _CODECS[key] = TypeCodec(tp, root=root, oob_threshold=oob_threshold)
    return codec
