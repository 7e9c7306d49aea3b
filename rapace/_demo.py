"""``rapace demo``: a walk-through of what rapace can do today.

Until the pool exists, this serves a small image-statistics service from a child process
over a Unix socket and calls it from here: every call shape, a remote error with its
traceback, a cancellation that reaches the handler, and a latency sample. It ends with the
per-message cost of the framing.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio

import rapace
from rapace import Streaming
from rapace.wire import Descriptor, Flags, decode_descriptor, encode_descriptor, method_id

__all__ = ("ImageStats", "run_demo")


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    low: int
    high: int


@rapace.service
class ImageStats:
    """A toy plugin: statistics over rows of 8-bit pixels."""

    async def summarize(self, pixels: bytes) -> Summary:
        return Summary(len(pixels), sum(pixels) / max(1, len(pixels)), min(pixels), max(pixels))

    async def histogram(self, pixels: bytes, bins: int) -> Streaming[int]:
        width = 256 // bins
        counts = [0] * bins
        for value in pixels:
            counts[min(value // width, bins - 1)] += 1
        for count in counts:
            yield count

    async def total(self, rows: Streaming[bytes]) -> int:
        return sum([sum(row) async for row in rows])

    async def invert(self, rows: Streaming[bytes]) -> Streaming[bytes]:
        async for row in rows:
            yield bytes(255 - v for v in row)

    async def crop(self, pixels: bytes, start: int, stop: int) -> bytes:
        if not 0 <= start <= stop <= len(pixels):
            raise ValueError(f"crop [{start}:{stop}] outside an image of {len(pixels)} pixels")
        return pixels[start:stop]

    async def slow(self) -> int:
        try:
            await anyio.sleep_forever()
        finally:
            print("  [plugin] slow() was cancelled by its caller", flush=True)  # noqa: T201
        return 0


def _say(text: str = "") -> None:
    print(text, flush=True)  # noqa: T201  # the demo reports by printing


def serve_demo(path: str) -> None:
    """The child process: serve ImageStats on ``path`` and say READY."""
    from rapace._connect import serve_async

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: serve_async(
                    ImageStats(), listen=f"unix://{path}", task_status=task_status
                )
            )
            _say("READY")

    anyio.run(main)


async def _stream(rows: list[bytes]) -> AsyncIterator[bytes]:
    # A plain list works at run time too; the proxy's static types say AsyncIterator.
    for row in rows:
        yield row


async def _client(address: str) -> None:
    pixels = bytes((i * 37) % 256 for i in range(4096))
    async with rapace.connect(address, ImageStats) as plugin:
        _say("Unary call, dataclass result:")
        _say(f"  summarize(4096 pixels) -> {await plugin.summarize(pixels)}")

        _say("Server streaming (histogram, 8 bins):")
        _say(f"  {[count async for count in plugin.histogram(pixels, 8)]}")

        _say("Client streaming (rows in, one total out):")
        rows = [pixels[i : i + 512] for i in range(0, len(pixels), 512)]
        _say(f"  total(8 rows) -> {await plugin.total(_stream(rows))} (local: {sum(pixels)})")

        _say("Bidirectional streaming (invert rows as they arrive):")
        inverted = [row async for row in plugin.invert(_stream(rows[:3]))]
        _say(f"  first pixels {list(inverted[0][:6])} (from {list(rows[0][:6])})")

        _say("A handler's exception arrives as its own type, remote traceback as __cause__:")
        try:
            await plugin.crop(pixels, 10, 99_999)
        except ValueError as exc:
            _say(f"  ValueError: {exc}")
            cause_text = str(exc.__cause__).strip().splitlines()
            _say(f"  remote traceback ends with: {cause_text[-2].strip()}")

        _say("A deadline travels with the call and cancels the handler:")
        with anyio.move_on_after(0.2) as scope:
            await plugin.slow()
        _say(f"  caller gave up after 0.2 s: {scope.cancelled_caught}")
        await plugin.crop(pixels, 0, 1)  # the session is still fine

        samples = []
        for _ in range(300):
            start = time.perf_counter()
            await plugin.crop(pixels, 0, 16)
            samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        _say(
            f"Unary round trip over the Unix socket: p50 {samples[150]:.0f} us, "
            f"p99 {samples[296]:.0f} us (300 calls)"
        )


def run_demo() -> int:
    _say("rapace demo: a service in a child process, called over a Unix socket")
    _say()
    with tempfile.TemporaryDirectory(prefix="rapace-demo-") as tmp:
        path = str(Path(tmp) / "plugin.sock")
        server = subprocess.Popen(
            [sys.executable, "-c", f"from rapace._demo import serve_demo; serve_demo({path!r})"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "READY":
                _say("the plugin process did not start")
                return 1
            anyio.run(_client, f"unix://{path}")
        finally:
            server.terminate()
            try:
                out, _ = server.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                out, _ = server.communicate()
        for line in out.splitlines():
            _say(line)

    _say()
    _say("Method ids (FNV-1a 64 folded to 32 bits): ")
    for service, method in [("Calculator", "add"), ("ImageStats", "summarize")]:
        _say(f"  {service + '.' + method:<22} -> 0x{method_id(service, method):08x}")
    request = Descriptor(
        msg_id=2, channel_id=1, method_id=method_id("Calculator", "add"), flags=Flags.DATA
    )
    number = 100_000
    seconds = min(
        timeit.repeat(
            lambda: decode_descriptor(encode_descriptor(request, b"\x82\x02\x03")),
            number=number,
            repeat=3,
        )
    )
    _say(f"64-byte descriptor encode+decode+validate: {seconds / number * 1e6:.2f} us")
    return 0
