"""Many calls of one method in one message: what ``pool.map(..., chunksize=k)`` sends.

Per-call costs (a frame each way, a task, a wake-up) dominate small calls; a chunk pays them
once for ``k`` calls. Workers started by a pool serve their service through a subclass of
the same name that adds one method, ``rapace_batch(method_id, calls)``: ``calls`` is the
chunk's arguments encoded with the method's own codec (a list of argument tuples), the reply
the results encoded the same way, so values keep their exact types. Like
``ProcessPoolExecutor``'s chunks, a batch stops at its first exception: the reply carries the
results before it and the exception.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Generator, Sequence
from typing import Any

import anyio

from rapace._errors import DecodeError, Unimplemented
from rapace.service import MethodSpec, extend_service, service_spec
from rapace.wire import ErrorPayload, TypeCodec, codec_for

__all__ = ("BATCH_METHOD", "BatchCodecs", "batch_codecs", "with_batching")

BATCH_METHOD = "rapace_batch"

_batching_classes: dict[type, type] = {}
_codecs: dict[int, tuple[MethodSpec, BatchCodecs]] = {}


class BatchCodecs:
    """Codecs for a chunk of one method: its calls and its results.

    The calls travel by column, ``[count, [a1, a2, ...], [b1, b2, ...]]``: a list of plain
    values is checked and encoded at C speed, where a list of argument tuples costs a
    container and a type check per call (measured: most of a chunk's encoding time).
    """

    def __init__(self, spec: MethodSpec) -> None:
        value_types = tuple(p.annotation for p in spec.value_params)
        column_types: tuple[Any, ...] = (int, *(list.__class_getitem__(t) for t in value_types))
        columns: Any = tuple.__class_getitem__(column_types)
        self._calls: TypeCodec[tuple[Any, ...]] = codec_for(columns, root="calls")
        self._width = len(value_types)
        self.results: TypeCodec[list[Any]] = codec_for(list[spec.returns], root="results")  # type: ignore[name-defined]

    def encode_columns(self, count: int, columns: Sequence[list[Any]]) -> bytes:
        """A chunk given by column: ``count`` calls, one list per parameter."""
        return self._calls.encode((count, *columns)).data

    def decode_calls(self, data: bytes) -> list[tuple[Any, ...]]:
        """The argument tuples of a chunk.

        Raises:
            DecodeError: malformed, or columns of different lengths.
        """
        count, *columns = self._calls.decode(data)
        if any(len(column) != count for column in columns):
            raise DecodeError("calls: the columns of a chunk differ in length")
        if not columns:
            return [()] * count
        return list(zip(*columns, strict=True))


def batch_codecs(spec: MethodSpec) -> BatchCodecs:
    entry = _codecs.get(id(spec))
    if entry is None:
        entry = _codecs[id(spec)] = (spec, BatchCodecs(spec))
    return entry[1]


def with_batching(cls: type) -> type:
    """``cls`` plus ``rapace_batch``, as a service of the same name (so the same ids)."""
    cached = _batching_classes.get(cls)
    if cached is not None:
        return cached
    spec = service_spec(cls)

    async def rapace_batch(self: Any, method_id: int, calls: bytes) -> tuple[bytes, bytes | None]:
        method = _find(spec.methods, method_id)
        if method is None or method.kind.handler_streams or method.kind.caller_streams:
            raise Unimplemented(f"{spec.name} has no unary method with id {method_id:#x}")
        codecs = batch_codecs(method)
        arguments = codecs.decode_calls(calls)
        function = getattr(self, method.name)
        results: list[Any] = []
        error: BaseException | None = None
        if inspect.iscoroutinefunction(function):
            for args in arguments:
                try:
                    # Most handlers of small calls never suspend: run each one step by
                    # hand and only hand it to the event loop if it does (~0.5 us a call).
                    coroutine = function(*args)
                    try:
                        suspended = coroutine.send(None)
                    except StopIteration as finished:
                        results.append(finished.value)
                        continue
                    results.append(await _resume(coroutine, suspended))
                except Exception as exc:
                    error = exc
                    break
        else:
            from rapace.session import HANDLER_THREADS

            error = await anyio.to_thread.run_sync(
                _run_all, function, arguments, results, limiter=HANDLER_THREADS.get()
            )
        encoded_error = ErrorPayload.from_exception(error).encode() if error is not None else None
        return codecs.results.encode(results).data, encoded_error

    batching = type(spec.name, (cls,), {BATCH_METHOD: rapace_batch, "__module__": cls.__module__})
    batching.__qualname__ = getattr(cls, "__qualname__", spec.name)
    extend_service(batching, spec, _BatchSignature, BATCH_METHOD)
    _batching_classes[cls] = batching
    return batching


class _BatchSignature:
    """Where ``rapace_batch``'s signature is resolved (in this module, not the service's)."""

    async def rapace_batch(self, method_id: int, calls: bytes) -> tuple[bytes, bytes | None]:
        raise NotImplementedError


@types.coroutine
def _resume(coroutine: Any, suspended: Any) -> Generator[Any, Any, Any]:
    """Go on awaiting ``coroutine``, which already ran up to yielding ``suspended`` to the
    event loop: what ``await`` would have done from there (sends and throws passed on)."""
    while True:
        try:
            sent = yield suspended
        except BaseException as exc:  # a cancellation, delivered to the coroutine
            try:
                suspended = coroutine.throw(exc)
            except StopIteration as finished:
                return finished.value
        else:
            try:
                suspended = coroutine.send(sent)
            except StopIteration as finished:
                return finished.value


def _run_all(
    function: Callable[..., Any], arguments: Sequence[tuple[Any, ...]], results: list[Any]
) -> BaseException | None:
    for args in arguments:
        try:
            results.append(function(*args))
        except Exception as exc:
            return exc
    return None


def _find(methods: Sequence[MethodSpec], method_id: int) -> MethodSpec | None:
    for method in methods:
        if method.method_id == method_id:
            return method
    return None
