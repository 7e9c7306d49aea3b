"""``rapace inspect module:Service``: print a service's schema.

The human format shows what a caller needs (method ids, call kinds, signatures); ``--json``
prints exactly ``rapace.describe(cls)`` for tools.
"""

from __future__ import annotations

import argparse
import json
import reprlib

import rapace
from rapace._cli import Commands, load_service_class, parse_target, write_out
from rapace.service import MethodSpec, service_spec

__all__ = ("format_schema", "register")

DESCRIPTION = (
    "Import MODULE (the current directory is on the module search path, as with python -m), "
    "take the service class CLASS from it (a dotted name such as Outer.Inner is allowed) and "
    "print its schema: each method's id, call kind and signature. An implementation class "
    "shows the schema of the service it implements."
)


def _default_repr() -> reprlib.Repr:
    """Defaults are shown for the reader, not round-tripped: a long one is abbreviated."""
    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = 30
    return shortener


_DEFAULT_REPR = _default_repr()


def register(commands: Commands) -> None:
    """Add ``inspect`` to the ``rapace`` command line."""
    parser = commands.add_parser(
        "inspect", help="print the schema of a service", description=DESCRIPTION
    )
    parser.add_argument(
        "target", type=parse_target, metavar="MODULE:CLASS", help="e.g. myplugin.services:Calc"
    )
    parser.add_argument(
        "--json", action="store_true", help="print rapace.describe(CLASS) as JSON instead"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the schema of the named service class."""
    cls = load_service_class(args.target)
    if args.json:
        write_out(json.dumps(rapace.describe(cls), indent=2))
    else:
        write_out("\n".join(format_schema(cls, str(args.target))))
    return 0


def format_schema(cls: type, origin: str) -> list[str]:
    """The schema of service class ``cls`` as aligned lines of text: a header naming the
    service and ``origin`` (where it was found), then one line per method."""
    spec = service_spec(cls)
    described = spec.describe()["methods"]
    assert isinstance(described, list)  # describe() is plain data: a list of method dicts
    count = len(spec.methods)
    header = f"service {spec.name} ({origin}): {count} method{'s' if count != 1 else ''}"
    rows = [
        (f"0x{method.method_id:08x}", str(info["kind"]), _signature(method, info))
        for method, info in zip(spec.methods, described, strict=True)
    ]
    kind_width = max((len(kind) for _, kind, _ in rows), default=0)
    lines = [header]
    lines += [f"  {mid}  {kind:<{kind_width}}  {sig}" for mid, kind, sig in rows]
    return lines


def _signature(method: MethodSpec, info: dict[str, object]) -> str:
    """``name(a: int, *, k: str = 'x') -> T``, with the types as ``describe()`` writes
    them, plus a note on plain ``def`` methods (they run in a worker thread)."""
    types = info["params"]
    assert isinstance(types, list)
    parts: list[str] = []
    for param, described in zip(method.params, types, strict=True):
        if param.keyword_only and "*" not in parts:
            parts.append("*")
        text = f"{param.name}: {described['type']}"
        if param.has_default:
            text += f" = {_DEFAULT_REPR.repr(param.default)}"
        parts.append(text)
    note = "  [def: runs in a thread]" if method.is_sync else ""
    return f"{method.name}({', '.join(parts)}) -> {info['returns']}{note}"
