"""Property tests of the type-directed codec: exact round trips and hostile input."""

from __future__ import annotations

import contextlib
import typing
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rapace._errors import DecodeError
from rapace.wire._codec import CodecLimits, TypeCodec
from rapace.wire._codec_core import _NODES
from tests.property.strategies import (
    Case,
    Movie,
    Point,
    Tree,
    arrays,
    binaries,
    cbor_documents,
    expected,
    floats,
    ints,
    leaf_cases,
    rival_unions,
    same,
    scalar_tuple_annotations,
    texts,
    typed_values,
)

moderate = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@moderate
@given(typed_values())
def test_round_trip_is_exact(case: tuple[Any, Any]) -> None:
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp)
    encoded = codec.encode(value)
    assert encoded.buffers == ()
    assert same(codec.decode(encoded.data), expected(tp, value))


@moderate
@given(rival_unions(), st.sampled_from([None, 0]))
def test_union_members_that_take_each_others_values_keep_the_types(
    case: tuple[Any, Any], threshold: int | None
) -> None:
    """A value comes back as the member that holds it exactly, never converted by another."""
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp, oob_threshold=threshold)
    encoded = codec.encode(value)
    assert same(codec.decode(encoded.data, encoded.buffers), value)


@moderate
@given(rival_unions(), st.data(), st.sampled_from([None, 0]))
def test_a_union_built_from_its_members_in_another_order_reads_the_same(
    case: tuple[Any, Any], data: st.DataObject, threshold: int | None
) -> None:
    """Another process may have met the union in another order (``A | B == B | A``, and the
    caches go by equality): its codec numbers the members the same, and reads exactly what this
    one sent. Both are compiled from scratch, in the order each was given."""
    tp, value = case
    members = typing.get_args(tp)
    permuted: Any = typing.Union[tuple(data.draw(st.permutations(members)))]  # noqa: UP007
    with mock.patch.dict(_NODES, clear=True):
        ours: TypeCodec[Any] = TypeCodec(tp, oob_threshold=threshold)
    with mock.patch.dict(_NODES, clear=True):
        theirs: TypeCodec[Any] = TypeCodec(permuted, oob_threshold=threshold)
    sent = ours.encode(value)
    assert same(theirs.decode(sent.data, sent.buffers), value)
    back = theirs.encode(value)
    assert same(ours.decode(back.data, back.buffers), value)


@moderate
@given(typed_values(leaf_cases), st.sampled_from([None, 0, 8]))
def test_every_type_on_its_own_round_trips(case: tuple[Any, Any], threshold: int | None) -> None:
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp, oob_threshold=threshold)
    encoded = codec.encode(value)
    assert same(codec.decode(encoded.data, encoded.buffers), expected(tp, value))


@moderate
@given(arrays, st.sampled_from([None, 0, 16]))
def test_arrays_round_trip_with_dtype_shape_and_byte_order(
    array: np.ndarray[Any, Any], threshold: int | None
) -> None:
    codec: TypeCodec[Any] = TypeCodec(np.ndarray, oob_threshold=threshold)
    encoded = codec.encode(array)
    out = codec.decode(encoded.data, encoded.buffers)
    assert same(out, array)
    # An array is writable exactly when it is a view of a writable out-of-band buffer.
    assert out.flags.writeable == bool(encoded.buffers and not encoded.buffers[0].readonly)
    if encoded.buffers and array.size:  # an empty array shares memory with nothing
        assert np.shares_memory(out, np.frombuffer(encoded.buffers[0], np.uint8))
        if array.flags.c_contiguous or array.flags.f_contiguous:
            assert np.shares_memory(encoded.buffers[0], array)  # sent without a copy


@moderate
@given(typed_values(), st.integers(min_value=0, max_value=16))
def test_round_trip_out_of_band_is_exact(case: tuple[Any, Any], threshold: int) -> None:
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp, oob_threshold=threshold)
    encoded = codec.encode(value)
    for buf in encoded.buffers:
        assert isinstance(buf, memoryview)
        assert buf.format == "B"
        assert buf.nbytes >= threshold
    assert same(codec.decode(encoded.data, encoded.buffers), expected(tp, value))


@moderate
@given(typed_values())
def test_decoding_from_a_memoryview_gives_the_same_value(case: tuple[Any, Any]) -> None:
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp)
    data = codec.encode(value).data
    assert same(codec.decode(memoryview(bytearray(data))), codec.decode(data))


_HOSTILE_TARGETS: list[Any] = [
    Any,
    int,
    tuple[int, int],
    tuple[str, float, bool, None, bytes],
    list[int | str],
    dict[str, list[float]],
    Point | None,
    Movie,
    Tree,
    set[frozenset[int]],
]


def _decode_or_decode_error(codec: TypeCodec[Any], data: bytes, buffers: Any = ()) -> None:
    with contextlib.suppress(DecodeError):
        codec.decode(data, buffers)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=48), st.sampled_from(_HOSTILE_TARGETS))
def test_random_bytes_only_ever_raise_decode_error(data: bytes, tp: Any) -> None:
    codec: TypeCodec[Any] = TypeCodec(tp)
    _decode_or_decode_error(codec, data)
    _decode_or_decode_error(codec, data, [b"\x00" * 8])


@settings(max_examples=300, deadline=None)
@given(cbor_documents, typed_values(), st.lists(st.binary(max_size=24), max_size=2))
def test_hostile_documents_only_ever_raise_decode_error(
    document: bytes, case: tuple[Any, Any], buffers: list[bytes]
) -> None:
    for tp in (case[0], Any):
        _decode_or_decode_error(TypeCodec(tp), document, buffers)


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(out) - 1, 0)))
        if action == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif action == "insert":
            out.insert(pos, draw(st.integers(min_value=0, max_value=255)))
        elif action == "delete" and out:
            del out[pos]
        elif action == "truncate":
            del out[pos:]
        else:
            out += draw(st.binary(min_size=1, max_size=3))
    return bytes(out)


@moderate
@given(typed_values(), st.booleans(), st.data())
def test_mutated_encodings_only_ever_raise_decode_error(
    case: tuple[Any, Any], out_of_band: bool, data: st.DataObject
) -> None:
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp, oob_threshold=4 if out_of_band else None)
    encoded = codec.encode(value)
    mutated = data.draw(st.builds(_mutate, st.just(encoded.data), st.just(data.draw)))
    for target in (codec, TypeCodec(Any)):
        _decode_or_decode_error(target, mutated, encoded.buffers)


@settings(max_examples=600, deadline=None)
@given(scalar_tuple_annotations(), st.binary(max_size=24))
def test_direct_decoder_agrees_with_cbor2(tp: Any, data: bytes) -> None:
    """Scalars and short tuples are parsed without cbor2; passing buffers forces cbor2."""
    _assert_decoders_agree(TypeCodec(tp), data)


def _assert_decoders_agree(codec: TypeCodec[Any], data: bytes) -> None:
    outcomes = []
    for buffers in ((), [b""]):  # buffers force the general (cbor2) decoder
        try:
            outcomes.append(("value", codec.decode(data, buffers)))
        except DecodeError:
            outcomes.append(("error", None))
    assert outcomes[0][0] == outcomes[1][0]
    assert same(outcomes[0][1], outcomes[1][1])


@moderate
@given(st.data())
def test_direct_encoder_agrees_with_cbor2(data: st.DataObject) -> None:
    tp = data.draw(scalar_tuple_annotations())
    value = data.draw(typed_values(st.just(_case_for(tp))))[1]
    codec: TypeCodec[Any] = TypeCodec(tp)
    direct = codec.encode(value).data
    # cbor2 reads what the direct encoder wrote (buffers force the general decoder) ...
    assert same(codec.decode(direct, [b""]), value)
    # ... and so does the direct decoder, which also agrees with cbor2 on damaged copies.
    assert same(codec.decode(direct), value)
    mutated = data.draw(st.builds(_mutate, st.just(direct), st.just(data.draw)))
    _assert_decoders_agree(codec, mutated)


def _case_for(tp: Any) -> Any:
    scalars = {
        int: ints,
        float: floats,
        str: texts,
        bytes: binaries,
        bool: st.booleans(),
        type(None): st.none(),
        int | None: st.none() | ints,
        int | str: ints | texts,
    }
    if tp in scalars:
        return Case(tp, scalars[tp], False, False)
    args = typing.get_args(tp)
    return Case(tp, st.tuples(*(scalars[a] for a in args)), False, False)


@settings(max_examples=100, deadline=None)
@given(typed_values(), st.integers(min_value=1, max_value=64))
def test_limits_only_ever_raise_decode_error(case: tuple[Any, Any], limit: int) -> None:
    """Tight limits push every payload through the header pre-scan."""
    tp, value = case
    codec: TypeCodec[Any] = TypeCodec(tp)
    encoded = codec.encode(value)
    limits = CodecLimits(max_depth=max(limit // 8, 1), max_container_len=limit, max_str_bytes=limit)
    try:
        out = codec.decode(encoded.data, limits=limits)
    except DecodeError:
        return
    assert same(out, expected(tp, value))
