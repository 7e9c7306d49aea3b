"""Cost of rapace's framing for one small call, beside raw cbor2 and pickle in the same run.

What one `add(2, 3)` costs on the wire path, per message, in microseconds:

- request: encode the args with the type-directed codec, pack the descriptor (payload inline),
  unpack and validate the descriptor, decode the args;
- response: the same for the `int` result;
- the baselines do the same data with plain ``cbor2.dumps/loads`` and ``pickle``.

The goal is a framing overhead under 2x raw cbor2. Run: ``python benchmarks/bench_wire.py``
(``--json PATH`` writes the numbers too). Numbers move 20-40% between runs on shared
machines: compare the ratios printed by one run.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import sys
import timeit
from collections.abc import Callable
from importlib.metadata import version

import cbor2

from rapace.wire import Descriptor, Flags, decode_descriptor, encode_descriptor, method_id
from rapace.wire._codec import codec_for

ADD_ID = method_id("Calculator", "add")
REPEATS = 7


def per_call_us(fn: Callable[[], object], number: int) -> float:
    """Best-of-REPEATS mean time per call; the minimum is the least disturbed run."""
    return min(timeit.repeat(fn, number=number, repeat=REPEATS)) / number * 1e6


def bench(number: int) -> dict[str, float]:
    args_codec = codec_for(tuple[int, int], root="args")
    result_codec = codec_for(int, root="result")
    request_desc = Descriptor(
        msg_id=2, channel_id=1, method_id=ADD_ID, flags=Flags.DATA | Flags.EOS
    )
    response_desc = Descriptor(
        msg_id=2, channel_id=1, flags=Flags.DATA | Flags.EOS | Flags.RESPONSE
    )

    def rapace_request() -> object:
        encoded = args_codec.encode((2, 3))
        raw = encode_descriptor(request_desc, encoded.data)
        desc = decode_descriptor(raw)
        return args_codec.decode(desc.inline_payload[: desc.payload_len])

    def rapace_response() -> object:
        encoded = result_codec.encode(5)
        raw = encode_descriptor(response_desc, encoded.data)
        desc = decode_descriptor(raw)
        return result_codec.decode(desc.inline_payload[: desc.payload_len])

    assert rapace_request() == (2, 3)
    assert rapace_response() == 5

    results = {
        "rapace_request_us": per_call_us(rapace_request, number),
        "rapace_response_us": per_call_us(rapace_response, number),
        "rapace_codec_args_us": per_call_us(
            lambda: args_codec.decode(args_codec.encode((2, 3)).data), number
        ),
        "rapace_descriptor_us": per_call_us(
            lambda: decode_descriptor(encode_descriptor(request_desc, b"\x82\x02\x03")), number
        ),
        "cbor2_request_us": per_call_us(lambda: cbor2.loads(cbor2.dumps((2, 3))), number),
        "cbor2_response_us": per_call_us(lambda: cbor2.loads(cbor2.dumps(5)), number),
        # The same call with its header fields in the CBOR message, as a hand-written
        # CBOR protocol frames it: what rapace's 64-byte descriptor replaces.
        "cbor2_framed_request_us": per_call_us(
            lambda: cbor2.loads(cbor2.dumps([2, 1, ADD_ID, 5, (2, 3)])), number
        ),
        "cbor2_framed_response_us": per_call_us(
            lambda: cbor2.loads(cbor2.dumps([2, 1, 0, 0x205, 5])), number
        ),
        "pickle_request_us": per_call_us(lambda: pickle.loads(pickle.dumps((2, 3))), number),
        "pickle_response_us": per_call_us(lambda: pickle.loads(pickle.dumps(5)), number),
    }
    results["ratio_request_vs_cbor2"] = results["rapace_request_us"] / results["cbor2_request_us"]
    results["ratio_response_vs_cbor2"] = (
        results["rapace_response_us"] / results["cbor2_response_us"]
    )
    results["ratio_call_vs_cbor2"] = (
        results["rapace_request_us"] + results["rapace_response_us"]
    ) / (results["cbor2_request_us"] + results["cbor2_response_us"])
    results["ratio_call_vs_cbor2_framed"] = (
        results["rapace_request_us"] + results["rapace_response_us"]
    ) / (results["cbor2_framed_request_us"] + results["cbor2_framed_response_us"])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50_000, help="calls per timing run")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    results = bench(args.number)
    print(f"python {platform.python_version()} on {platform.machine()}, cbor2 {version('cbor2')}")
    width = max(map(len, results))
    for name, value in results.items():
        unit = "x" if name.startswith("ratio") else "us"
        print(f"  {name:<{width}}  {value:8.3f} {unit}")
    print(
        f"framing overhead on top of raw cbor2 for a whole call: "
        f"{results['ratio_call_vs_cbor2']:.2f}x vs bare payloads, "
        f"{results['ratio_call_vs_cbor2_framed']:.2f}x vs cbor2 carrying the same header fields "
        "(goal: under 2x)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
