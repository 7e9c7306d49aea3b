"""Services: ``@rapace.service`` turns a typed class into a frozen schema.

A service is a plain class. Its public methods (no leading underscore) are the RPC methods and
their type hints are the schema: no IDL, no generated code. ``Streaming[T]`` marks a stream::

    @rapace.service
    class Calculator:
        async def add(self, a: int, b: int) -> int: ...                       # unary
        async def range(self, n: int) -> Streaming[int]: ...                   # server streaming
        async def total(self, xs: Streaming[int]) -> int: ...                  # client streaming
        async def scale(self, xs: Streaming[float], k: float) -> Streaming[float]: ...  # bidi
        def blur(self, image: bytes, radius: int) -> bytes: ...                # runs in a thread

Decoration resolves the hints once (``typing.get_type_hints``, so string annotations and
``from __future__ import annotations`` work), checks every signature, computes method ids and
signature hashes, and fails right there, naming the method, on anything it cannot serve.
Method ids come from the decorated class's name, so an implementation subclass of a decorated
interface keeps the interface's ids.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import hashlib
import inspect
import json
import types
import typing
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from typing_extensions import is_typeddict

from rapace._errors import EncodeError, RapaceError
from rapace.wire import CallKind, MethodEntry, codec_for, method_id
from rapace.wire._codec_core import member_key, type_name

__all__ = (
    "MethodSpec",
    "ParamSpec",
    "ServiceDefinitionError",
    "ServiceSpec",
    "Streaming",
    "describe",
    "service",
    "service_spec",
)

T = TypeVar("T")
C = TypeVar("C", bound=type)

#: The async-iterator type of a stream of ``T``: ``collections.abc.AsyncIterator[T]``.
Streaming = AsyncIterator

_SPEC_ATTRIBUTE: Final = "__rapace_service__"
_STREAM_ORIGINS: Final = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)
_KIND_NAMES: Final = {
    CallKind.UNARY: "unary",
    CallKind.SERVER_STREAMING: "server_streaming",
    CallKind.CLIENT_STREAMING: "client_streaming",
    CallKind.BIDI_STREAMING: "bidi_streaming",
}


class ServiceDefinitionError(RapaceError, TypeError):
    """A class given to ``@rapace.service`` cannot be served as written.

    Raised at decoration time; the message names the service, the method and the rule.
    """


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One parameter of a method, ``self`` excluded."""

    name: str
    annotation: object
    default: object = inspect.Parameter.empty
    keyword_only: bool = False
    streaming: bool = False  # the parameter receives a stream; annotation is the item type

    @property
    def has_default(self) -> bool:
        return self.default is not inspect.Parameter.empty


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """The schema of one RPC method."""

    service_name: str
    name: str
    method_id: int
    kind: CallKind
    params: tuple[ParamSpec, ...]
    returns: object  # the return type; the item type for a streaming return
    is_sync: bool  # a plain ``def``: served from a thread
    sig_hash: bytes
    signature: inspect.Signature = dataclasses.field(compare=False, repr=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.service_name}.{self.name}"

    @property
    def stream_param(self) -> ParamSpec | None:
        return next((p for p in self.params if p.streaming), None)

    @property
    def value_params(self) -> tuple[ParamSpec, ...]:
        """The parameters that travel in the request payload (all but the stream)."""
        return tuple(p for p in self.params if not p.streaming)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "id": self.method_id,
            "kind": _KIND_NAMES[self.kind],
            "params": [
                {"name": p.name, "type": _stream_repr(p.annotation, p.streaming)}
                for p in self.params
            ],
            "returns": _stream_repr(self.returns, self.kind.handler_streams),
        }


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The frozen schema of a service: its name and methods."""

    name: str
    cls: type
    methods: tuple[MethodSpec, ...]
    by_name: Mapping[str, MethodSpec] = dataclasses.field(compare=False, repr=False)
    by_id: Mapping[int, MethodSpec] = dataclasses.field(compare=False, repr=False)

    def method_table(self) -> tuple[MethodEntry, ...]:
        """The method table announced in Hello."""
        return tuple(MethodEntry(m.method_id, m.name, m.sig_hash) for m in self.methods)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "methods": [m.describe() for m in self.methods]}


def service(cls: C) -> C:
    """Make ``cls`` a rapace service. See the module docstring for what is allowed.

    Raises:
        ServiceDefinitionError: a method cannot be served (unsupported signature, a stream
            where none is allowed, a method id of 0 or a collision).
    """
    if not isinstance(cls, type):
        raise ServiceDefinitionError(f"@rapace.service decorates classes, not {cls!r}")
    setattr(cls, _SPEC_ATTRIBUTE, _build_spec(cls))
    return cls


def service_spec(cls_or_instance: object) -> ServiceSpec:
    """The schema of a service class, of a subclass implementing one, or of an instance."""
    cls = cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)
    spec = getattr(cls, _SPEC_ATTRIBUTE, None)
    if not isinstance(spec, ServiceSpec):
        raise TypeError(f"{cls.__qualname__} is not a rapace service (decorate it with @service)")
    return spec


def describe(cls_or_instance: object) -> dict[str, object]:
    """The schema as plain data that ``json.dumps`` accepts.

    ``{"name": "Calculator", "methods": [{"name": "add", "id": 423600472, "kind": "unary",
    "params": [{"name": "a", "type": "int"}, ...], "returns": "int"}, ...]}``
    """
    return service_spec(cls_or_instance).describe()


def _build_spec(cls: type) -> ServiceSpec:
    name = cls.__name__
    return _assemble(name, cls, [_method_spec(cls, name, attr) for attr in _public_methods(cls)])


def extend_service(cls: type, base: ServiceSpec, helper: type, method: str) -> None:
    """Make ``cls`` (a subclass of ``base``'s class) a service with ``base``'s methods, as
    they were resolved, plus ``helper``'s ``method`` served under ``base``'s name.

    Nothing of ``base`` is resolved again: in a worker, a class shipped by value keeps the
    schema its host resolved (annotations that name things only the host's ``__main__``
    imported could not be resolved there).
    """
    extra = _method_spec(helper, base.name, method)
    setattr(cls, _SPEC_ATTRIBUTE, _assemble(base.name, cls, [*base.methods, extra]))


def _assemble(name: str, cls: type, methods: list[MethodSpec]) -> ServiceSpec:
    by_id: dict[int, MethodSpec] = {}
    for spec in methods:
        if spec.method_id == 0:
            raise ServiceDefinitionError(
                f"{spec.qualified_name} hashes to method id 0, which is reserved: rename it"
            )
        clash = by_id.get(spec.method_id)
        if clash is not None:
            raise ServiceDefinitionError(
                f"{clash.qualified_name} and {spec.qualified_name} share method id "
                f"0x{spec.method_id:08x}: rename one of them"
            )
        by_id[spec.method_id] = spec
    return ServiceSpec(
        name=name,
        cls=cls,
        methods=tuple(methods),
        by_name={m.name: m for m in methods},
        by_id=by_id,
    )


def _public_methods(cls: type) -> list[str]:
    """Public callables defined by ``cls`` or its bases (``object`` excluded), in the order
    they were first defined."""
    seen: dict[str, None] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for attr, value in vars(klass).items():
            if attr.startswith("_"):
                continue
            if isinstance(value, staticmethod | classmethod):
                raise ServiceDefinitionError(
                    f"{cls.__name__}.{attr}: static and class methods cannot be RPC methods "
                    "(prefix the name with '_' to keep it local)"
                )
            if inspect.isfunction(value):
                seen[attr] = None
    return list(seen)


def _method_spec(cls: type, service_name: str, attr: str) -> MethodSpec:
    qualified = f"{service_name}.{attr}"
    func = getattr(cls, attr)
    try:
        hints = typing.get_type_hints(func, include_extras=False)
    except Exception as exc:
        raise ServiceDefinitionError(f"{qualified}: cannot resolve its type hints: {exc}") from exc
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ServiceDefinitionError(f"{qualified}: an RPC method must take self first")
    params: list[ParamSpec] = []
    for param in parameters[1:]:
        if param.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ServiceDefinitionError(
                f"{qualified}: *{param.name} / **{param.name} cannot be part of a schema; "
                "list the parameters explicitly"
            )
        annotation = hints.get(param.name, Any)
        item = _stream_item(annotation)
        params.append(
            ParamSpec(
                name=param.name,
                annotation=annotation if item is None else item,
                default=param.default,
                keyword_only=param.kind is inspect.Parameter.KEYWORD_ONLY,
                streaming=item is not None,
            )
        )
    streams_in = [p for p in params if p.streaming]
    if len(streams_in) > 1:
        raise ServiceDefinitionError(
            f"{qualified}: at most one Streaming parameter is allowed, got "
            f"{', '.join(p.name for p in streams_in)}"
        )
    returns = hints.get("return", Any)
    return_item = _stream_item(returns)
    is_async_gen = inspect.isasyncgenfunction(func)
    is_coroutine = inspect.iscoroutinefunction(func)
    is_sync = not (is_async_gen or is_coroutine)
    if inspect.isgeneratorfunction(func):
        raise ServiceDefinitionError(
            f"{qualified}: a plain generator cannot stream; make it an async generator"
        )
    if is_async_gen and return_item is None:
        if returns is not Any:
            raise ServiceDefinitionError(
                f"{qualified}: an async generator must be annotated '-> Streaming[T]', "
                f"not {type_repr(returns)}"
            )
        return_item = Any
    if return_item is not None and is_sync:
        raise ServiceDefinitionError(
            f"{qualified}: a streaming method must be 'async def' (an async generator)"
        )
    if streams_in and is_sync:
        raise ServiceDefinitionError(
            f"{qualified}: a method taking a Streaming parameter must be 'async def'"
        )
    if return_item is not None:
        kind = CallKind.BIDI_STREAMING if streams_in else CallKind.SERVER_STREAMING
    else:
        kind = CallKind.CLIENT_STREAMING if streams_in else CallKind.UNARY
    result = returns if return_item is None else return_item
    _check_types(qualified, params, result)
    return MethodSpec(
        service_name=service_name,
        name=attr,
        method_id=method_id(service_name, attr),
        kind=kind,
        params=tuple(params),
        returns=result,
        is_sync=is_sync,
        sig_hash=_signature_hash(kind, params, result),
        signature=signature,
    )


def _check_types(qualified: str, params: list[ParamSpec], result: object) -> None:
    """Fail at decoration, not at the first call, on a type the codec cannot carry."""
    checks = [(p.annotation, p.name if not p.streaming else f"{p.name}[item]") for p in params]
    checks.append((result, "return value"))
    for annotation, where in checks:
        try:
            codec_for(annotation, root=where)
        except EncodeError as exc:
            raise ServiceDefinitionError(f"{qualified}: {exc}") from None


def _stream_item(annotation: object) -> object | None:
    """The item type if ``annotation`` is a stream type, else None."""
    if annotation in _STREAM_ORIGINS:
        return Any
    if typing.get_origin(annotation) in _STREAM_ORIGINS:
        args = typing.get_args(annotation)
        return args[0] if args else Any
    return None


def _stream_repr(annotation: object, streaming: bool) -> str:
    text = type_repr(annotation)
    return f"Streaming[{text}]" if streaming else text


def type_repr(tp: object) -> str:
    """A short, stable, human-readable name for a type annotation (``list[int] | None``)."""
    if tp is Any:
        return "Any"
    if tp is None or tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_repr(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        base = type_name(origin)
        if not args:
            return base
        parts = ", ".join("..." if a is Ellipsis else type_repr(a) for a in args)
        return f"{base}[{parts}]"
    if isinstance(tp, type):
        return type_name(tp)
    return repr(tp)


def _signature_hash(kind: CallKind, params: list[ParamSpec], returns: object) -> bytes:
    """SHA-256 over a canonical, structural description of the signature.

    Structural, so that a host and a plugin whose dataclass gained a field, or whose enum
    gained a member, disagree here instead of mis-decoding each other's payloads. Unions are
    described in the order the codec numbers their members, which does not depend on how a
    process came by the union (see ``_shape``).
    """
    shape = [
        int(kind),
        [[p.name, p.streaming, p.keyword_only, _shape(p.annotation, set())] for p in params],
        _shape(returns, set()),
    ]
    return hashlib.sha256(json.dumps(shape, separators=(",", ":")).encode()).digest()


def _shape(tp: object, seen: set[int]) -> object:
    """A JSON-able structural description of ``tp`` (recursive types are cut at the repeat)."""
    if isinstance(tp, type) and id(tp) in seen:
        return ["ref", type_repr(tp)]
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        # typing's caches go by equality, so a process may get ``B | A`` for ``A | B``, and
        # Union[...] for ``|`` (``List[int | str]`` can come back as ``List[Union[int, str]]``):
        # two processes would hash different descriptions of one signature. The members go in
        # the codec's canonical order, their wire indices, so equal hashes also mean equal
        # indices; members that order leaves tied are compiled alike, or refused by the codec
        # in a tagged union, and their own descriptions order them. Always named UnionType, as
        # ``A | B`` was before: its hash stays the same where it was written in this order.
        members = [(member_key(a), _shape(a, seen)) for a in typing.get_args(tp)]
        members.sort(key=lambda m: (m[0], json.dumps(m[1], separators=(",", ":"))))
        return ["UnionType", [shape for _, shape in members]]
    if origin is not None:
        return [type_repr(origin), [_shape(a, seen) for a in typing.get_args(tp)]]
    if not isinstance(tp, type):
        return type_repr(tp)
    seen = seen | {id(tp)}
    if dataclasses.is_dataclass(tp):
        hints = _hints_or_empty(tp)
        return [
            "dataclass",
            type_repr(tp),
            [[f.name, _shape(hints.get(f.name, Any), seen)] for f in dataclasses.fields(tp)],
        ]
    if issubclass(tp, enum.Enum):
        return ["enum", type_repr(tp), [[m.name, repr(m.value)] for m in tp]]
    if issubclass(tp, tuple) and hasattr(tp, "_fields"):
        hints = _hints_or_empty(tp)
        fields: tuple[str, ...] = tp._fields
        return ["namedtuple", type_repr(tp), [[f, _shape(hints.get(f, Any), seen)] for f in fields]]
    if is_typeddict(tp):
        hints = _hints_or_empty(tp)
        required: frozenset[str] = getattr(tp, "__required_keys__", frozenset())
        return [
            "typeddict",
            type_repr(tp),
            [[k, k in required, _shape(v, seen)] for k, v in sorted(hints.items())],
        ]
    return type_repr(tp)


def _hints_or_empty(tp: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(tp)
    except Exception:  # an unresolvable hint still describes the field by name
        return {}


def bind_arguments(
    spec: MethodSpec, args: tuple[object, ...], kwargs: Mapping[str, object]
) -> list[object]:
    """Bind a call's arguments to ``spec``'s parameters, in declaration order, defaults applied.

    Raises:
        TypeError: the arguments do not fit the signature (as a direct call would).
    """
    bound = spec.signature.bind(None, *args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())[1:]
