"""numpy arrays in the rapace codec.

Imported by :mod:`rapace.wire._codec` only once a value, an annotation or a received tag
involves an array, so numpy stays optional.

In the payload, an array whose dtype RFC 8746 covers (unsigned and signed integers of 8 to 64
bits, float16/32/64, either byte order) is tag 40 ``[shape, typed array]``; any other dtype
(bool, complex, longdouble, datetime64/timedelta64, ``S``, ``U``, void and structured) is the
private tag ``[dtype, shape, bytes]``. Both are row-major. Out of band, the reference carries
the dtype, shape and memory order (``"C"`` or ``"F"``) so a Fortran-ordered array needs no copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, Literal, cast

import cbor2
import numpy as np

from rapace.wire._codec_core import (
    DEC_LEAF,
    OOB,
    TAG_NDARRAY,
    TAG_OOB_NDARRAY,
    TAG_SHM_NDARRAY,
    BufferResolver,
    Fail,
    Node,
    check_ints,
    fail_type,
    tname,
)

_CBORTag = cbor2.CBORTag

# dtype.str -> RFC 8746 typed-array tag.
_RFC_TAG: Final = {
    "|u1": 64,
    ">u2": 65,
    ">u4": 66,
    ">u8": 67,
    "<u2": 69,
    "<u4": 70,
    "<u8": 71,
    "|i1": 72,
    ">i2": 73,
    ">i4": 74,
    ">i8": 75,
    "<i2": 77,
    "<i4": 78,
    "<i8": 79,
    ">f2": 80,
    ">f4": 81,
    ">f8": 82,
    "<f2": 84,
    "<f4": 85,
    "<f8": 86,
}
_RFC_DTYPE: Final = {tag: np.dtype(s) for s, tag in _RFC_TAG.items()} | {68: np.dtype("|u1")}

# The only dtype strings accepted from a peer: what dtype.str produces for non-object dtypes.
# np.dtype() parses many more spellings, some of them deprecated (and warning).
_DTYPE_STR: Final = re.compile(r"[<>|][biufcmMSUV][0-9]{1,9}(?:\[[0-9]{0,9}[a-zA-Z]{1,2}\])?")
# Kinds whose items are plain bytes: anything else (objects, StringDType) holds pointers.
_KINDS: Final = frozenset("biufcmMSUV")
_MAX_NDIM: Final = 64
_MAX_DTYPE_DEPTH: Final = 8
_MAX_FIELDS: Final = 4096

DEC_LEAF.add(np.ndarray)


# -- dtypes -------------------------------------------------------------------------------------


def dtype_to_wire(dt: np.dtype[Any]) -> object:
    """A dtype as CBOR-ready data: ``dtype.str``, ``[base, shape]`` or a structured-dtype map."""
    if dt.fields is not None and dt.names is not None:
        names = list(dt.names)
        return {
            "names": names,
            "formats": [dtype_to_wire(dt.fields[name][0]) for name in names],
            "offsets": [dt.fields[name][1] for name in names],
            "itemsize": dt.itemsize,
        }
    if dt.subdtype is not None:
        base, shape = dt.subdtype
        return (dtype_to_wire(base), shape)
    return dt.str


def dtype_from_wire(obj: object, depth: int = 0) -> np.dtype[Any]:
    """Rebuild a dtype sent by a peer, refusing object dtypes and unusual spellings."""
    if depth > _MAX_DTYPE_DEPTH:
        raise ValueError("dtype nested too deeply")
    if type(obj) is str:
        if _DTYPE_STR.fullmatch(obj) is None:
            raise ValueError(f"unsupported dtype {obj[:40]!r}")
        dt = np.dtype(obj)
    elif type(obj) is list or type(obj) is tuple:
        if len(obj) != 2:
            raise ValueError("malformed subarray dtype")
        dt = np.dtype((dtype_from_wire(obj[0], depth + 1), _shape(obj[1])))
    elif type(obj) is dict:
        if obj.keys() != {"names", "formats", "offsets", "itemsize"}:
            raise ValueError("malformed structured dtype")
        names, formats, offsets, itemsize = (
            obj["names"],
            obj["formats"],
            obj["offsets"],
            obj["itemsize"],
        )
        if not (type(names) is list and type(formats) is list and type(offsets) is list):
            raise ValueError("malformed structured dtype")
        if not len(names) == len(formats) == len(offsets) <= _MAX_FIELDS:
            raise ValueError("malformed structured dtype")
        if not all(type(name) is str for name in names):
            raise ValueError("structured dtype field names must be strings")
        check_ints(itemsize, *offsets)
        dt = np.dtype(
            {
                "names": names,
                "formats": [dtype_from_wire(f, depth + 1) for f in formats],
                "offsets": offsets,
                "itemsize": itemsize,
            }
        )
    else:
        raise ValueError(f"malformed dtype ({tname(obj)})")
    if dt.hasobject:
        raise ValueError("object dtypes are not accepted")
    return dt


def _shape(obj: object) -> tuple[int, ...]:
    if (type(obj) is not list and type(obj) is not tuple) or len(obj) > _MAX_NDIM:
        raise ValueError("malformed array shape")
    check_ints(*obj)
    if any(d < 0 for d in obj):
        raise ValueError("negative array dimension")
    return tuple(obj)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


# -- encoding -----------------------------------------------------------------------------------


def encode_array(arr: np.ndarray[Any, Any], st: OOB | None) -> object:
    """An array as a CBOR tag, or an out-of-band reference when it is large enough."""
    dt = arr.dtype
    if dt.kind == "O" or (dt.fields is not None and dt.hasobject):
        raise Fail("dtype object is not supported")
    if dt.kind not in _KINDS or dt.hasobject:  # StringDType and other pointer-holding dtypes
        raise Fail(f"dtype {dt} is not supported")
    if dt.itemsize == 0:
        raise Fail(f"dtype {dt} has no size and is not supported")
    if type(arr) is not np.ndarray:
        arr = arr.view(np.ndarray)
    shape = arr.shape
    if st is not None and st.placer is not None:
        # Shared memory is referenced whatever its size; other arrays only when large.
        placed = st.placer.place_array(arr)
        if placed is not None:
            return placed
    elif st is not None and arr.nbytes >= st.thr:
        if arr.flags.c_contiguous:
            flat, order = arr.reshape(-1), "C"
        elif arr.flags.f_contiguous:
            flat, order = arr.T.reshape(-1), "F"
        else:
            flat, order = np.ascontiguousarray(arr).reshape(-1), "C"
        index = st.add(flat.view(np.uint8).data)
        return _CBORTag(TAG_OOB_NDARRAY, (index, dtype_to_wire(dt), shape, order))
    data = arr.tobytes()
    if dt.fields is None:
        tag = _RFC_TAG.get(dt.str)
        if tag is not None:
            return _CBORTag(40, (shape, _CBORTag(tag, data)))
    return _CBORTag(TAG_NDARRAY, (dtype_to_wire(dt), shape, data))


def encode_ndarray(v: Any, st: OOB | None) -> object:
    """Encoder of the ``numpy.ndarray`` annotation."""
    if isinstance(v, np.ndarray):
        return encode_array(v, st)
    raise fail_type("ndarray", v)


def decode_ndarray(o: Any) -> object:
    """Decoder of the ``numpy.ndarray`` annotation: the tag handlers built the array."""
    if type(o) is np.ndarray:
        return o
    raise fail_type("ndarray", o)


def ndarray_node() -> Node:
    """The node of the ``numpy.ndarray`` annotation (any dtype and shape)."""
    kinds = frozenset({np.ndarray})
    return Node("ndarray", encode_ndarray, decode_ndarray, kinds, kinds)


def encode_any(v: Any, st: OOB | None) -> object:
    """A numpy value held by an ``Any``: arrays stay arrays, scalars become Python numbers."""
    if isinstance(v, np.ndarray):
        return encode_array(v, st)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating) and v.dtype.itemsize <= 8:
        return float(v)
    raise Fail(f"cannot encode a value of type {tname(v)}")


def shared_array_tag(
    where: object, offset: int, arr: np.ndarray[Any, Any], writable: bool
) -> object:
    """The reference to ``arr``, whose element 0 is at ``offset`` of shared region ``where``."""
    return _CBORTag(
        TAG_SHM_NDARRAY,
        (where, offset, dtype_to_wire(arr.dtype), arr.shape, arr.strides, writable),
    )


def byte_extent(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> tuple[int, int]:
    """The bytes an array touches, relative to its element 0: ``(low, high)``, high exclusive."""
    low = high = 0
    for n, stride in zip(shape, strides, strict=True):
        if n == 0:
            return 0, 0
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + itemsize


# -- decoding -----------------------------------------------------------------------------------


def _from_buffer(
    buf: Any, dtype: np.dtype[Any], shape: tuple[int, ...], order: Literal["C", "F"]
) -> Any:
    if dtype.itemsize == 0:
        raise ValueError("dtype has no size")
    if dtype.subdtype is not None:  # numpy would fold it into the shape
        raise ValueError("an array's dtype cannot be a subarray dtype")
    nbytes = len(buf) if type(buf) is bytes else memoryview(buf).nbytes
    if nbytes != _count(shape) * dtype.itemsize:
        raise ValueError(
            f"array data holds {nbytes} bytes, shape {shape} of {dtype} needs more or less"
        )
    return np.frombuffer(buf, dtype).reshape(shape, order=order)


def array_from_buffer(view: memoryview, dtype: object, shape: object, order: object) -> object:
    """Rebuild an out-of-band array as a view of the received buffer (no copy)."""
    if order == "C" or order == "F":
        return _from_buffer(view, dtype_from_wire(dtype), _shape(shape), order)
    raise ValueError("malformed array order")


def array_from_shared(
    resolver: BufferResolver,
    where: object,
    offset: object,
    dtype: object,
    shape: object,
    strides: object,
    writable: bool,
) -> object:
    """Rebuild an array referenced in shared memory as a view of it (no copy).

    The resolver checks that every byte the shape and strides can reach lies in the region.
    """
    dt = dtype_from_wire(dtype)
    if dt.itemsize == 0 or dt.subdtype is not None:
        raise ValueError("malformed shared-memory array dtype")
    dims = _shape(shape)
    if type(strides) is not list and type(strides) is not tuple:
        raise ValueError("malformed array strides")
    check_ints(offset, *strides)
    steps = tuple(cast(int, s) for s in strides)
    if len(steps) != len(dims):
        raise ValueError("array strides do not match its shape")
    low, high = byte_extent(dims, steps, dt.itemsize)
    start = cast(int, offset) + low
    view = resolver.resolve(where, start, high - low, writable)
    if high == low:
        return np.empty(dims, dt)
    return np.ndarray(dims, dt, buffer=view, offset=-low, strides=steps)


def _typed(dtype: np.dtype[Any]) -> Callable[[Any, bool], Any]:
    def handler(value: object, immutable: bool) -> object:
        if type(value) is not bytes or len(value) % dtype.itemsize:
            raise ValueError("malformed typed array")
        return np.frombuffer(value, dtype)

    return handler


def _row_major(value: object, immutable: bool) -> object:
    if (type(value) is not list and type(value) is not tuple) or len(value) != 2:
        raise ValueError("malformed multi-dimensional array")
    shape, flat = _shape(value[0]), value[1]
    if type(flat) is not np.ndarray or flat.ndim != 1 or flat.size != _count(shape):
        raise ValueError("multi-dimensional array data does not match its shape")
    return flat.reshape(shape)


def _private(value: object, immutable: bool) -> object:
    if (type(value) is not list and type(value) is not tuple) or len(value) != 3:
        raise ValueError("malformed array")
    dtype, shape, data = value
    if type(data) is not bytes:
        raise ValueError("malformed array data")
    return _from_buffer(data, dtype_from_wire(dtype), _shape(shape), "C")


def tag_handler(tag: int) -> Callable[[Any, bool], Any]:
    """The decoder of an array tag (40, 64-87 or the private array tag)."""
    if tag == 40:
        return _row_major
    if tag == TAG_NDARRAY:
        return _private
    dtype = _RFC_DTYPE.get(tag)
    if dtype is None:
        raise ValueError(f"typed array tag {tag} is not supported")
    return _typed(dtype)
