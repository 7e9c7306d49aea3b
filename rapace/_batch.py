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
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from rapace._errors import Unimplemented
from rapace.service import MethodSpec, extend_service, service_spec
from rapace.wire import ErrorPayload, TypeCodec, codec_for

__all__ = ("BATCH_METHOD", "BatchCodecs", "batch_codecs", "with_batching")

BATCH_METHOD = "rapace_batch"

_batching_classes: dict[type, type] = {}
_codecs: dict[int, tuple[MethodSpec, BatchCodecs]] = {}


class BatchCodecs:
    """Codecs for a chunk of one method: its argument tuples and its results, as lists."""

    def __init__(self, spec: MethodSpec) -> None:
        value_types = tuple(p.annotation for p in spec.value_params)
        args_type = tuple[value_types] if value_types else tuple[()]  # type: ignore[valid-type]
        self.calls: TypeCodec[list[tuple[Any, ...]]] = codec_for(list[args_type], root="calls")  # type: ignore[valid-type]
        self.results: TypeCodec[list[Any]] = codec_for(list[spec.returns], root="results")  # type: ignore[name-defined]


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
        arguments = codecs.calls.decode(calls)
        function = getattr(self, method.name)
        results: list[Any] = []
        error: BaseException | None = None
        if inspect.iscoroutinefunction(function):
            for args in arguments:
                try:
                    results.append(await function(*args))
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
