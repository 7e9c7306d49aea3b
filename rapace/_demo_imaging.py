"""The image-processing plugin behind ``rapace demo`` and the notebooks.

It lives in the package, not in ``__main__``, for two reasons: workers started from an
installed wheel import it by name, and ``concurrent.futures.ProcessPoolExecutor`` (the
baseline the demo measures against) can only pickle functions that are importable.

Every operation is plain vectorised numpy, so the pool and the baseline run exactly the same
code; the module-level functions are the work, :class:`Imaging` only exposes them as a
service. numpy is required here (``pip install 'rapace[numpy]'``).
"""

from __future__ import annotations

import os
import signal
import threading

import anyio
import numpy as np
import numpy.typing as npt

import rapace
from rapace import Streaming

__all__ = (
    "Imaging",
    "box_blur",
    "channel_histograms",
    "channel_levels",
    "downsample",
    "process_image",
    "render_images",
)

Image = npt.NDArray[np.uint8]
Histograms = npt.NDArray[np.int64]


def box_blur(image: Image, radius: int) -> Image:
    """A (2 * radius + 1)-square box blur of an ``(h, w, channels)`` image, edges repeated.

    Two running sums (one per axis) make the cost independent of the radius.
    """
    if radius < 1:
        raise ValueError(f"blur radius must be >= 1, got {radius}")
    if image.ndim != 3:
        raise ValueError(f"expected an (height, width, channels) image, got shape {image.shape}")
    k = 2 * radius + 1
    # One extra leading row and column so that sums[i + k] - sums[i] is exactly the window
    # at i. A window sum is at most k * k * 255, far inside uint32, and unsigned wrap-around
    # in the running sums cancels out in the differences.
    padded = np.pad(image, ((radius + 1, radius), (radius + 1, radius), (0, 0)), mode="edge")
    sums = padded.cumsum(axis=0, dtype=np.uint32)
    rows = sums[k:] - sums[:-k]
    sums = rows.cumsum(axis=1, dtype=np.uint32)
    window = sums[:, k:] - sums[:, :-k]
    blurred: Image = (window // (k * k)).astype(np.uint8)
    return blurred


def downsample(image: Image, factor: int) -> Image:
    """Shrink by an integer ``factor`` by averaging each factor x factor block (area resize)."""
    if factor < 1:
        raise ValueError(f"downsample factor must be >= 1, got {factor}")
    h, w, c = image.shape
    h, w = h // factor, w // factor
    blocks = image[: h * factor, : w * factor].reshape(h, factor, w, factor, c)
    small: Image = (blocks.sum(axis=(1, 3), dtype=np.uint32) // (factor * factor)).astype(np.uint8)
    return small


def channel_histograms(image: Image) -> Histograms:
    """A 256-bin histogram of each channel: shape ``(channels, 256)``."""
    return np.stack(
        [np.bincount(image[..., c].ravel(), minlength=256) for c in range(image.shape[2])]
    ).astype(np.int64)


def channel_levels(image: Image) -> Image:
    """The darkest and brightest value of each channel, shape ``(channels, 2)``: what an
    auto-contrast needs, and about the least work one can do with a whole image."""
    channels = range(image.shape[2])
    return np.array([(image[..., c].min(), image[..., c].max()) for c in channels], np.uint8)


def process_image(image: Image, radius: int, factor: int) -> tuple[Image, Histograms]:
    """The demo's pipeline on one image: blur, downsample, and the blurred image's histograms."""
    blurred = box_blur(image, radius)
    return downsample(blurred, factor), channel_histograms(blurred)


def render_images(out: Image, seed: int) -> None:
    """Fill ``out`` (``(n, h, w, 3)`` uint8) with seeded synthetic photos: a colour gradient,
    a few flat discs and sensor noise, so blurs and histograms have something to show."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = out.shape
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * (127.0 / max(1, h + w - 2))).astype(
        np.float32
    )
    ys, xs = np.ogrid[:h, :w]
    for i in range(n):
        image = out[i]
        for c in range(3):
            np.multiply(ramp, rng.uniform(0.4, 2.0), out=image[..., c], casting="unsafe")
        for _ in range(4):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            r = int(rng.integers(h // 20, h // 4))
            # Only the disc's bounding box is tested, not the whole image.
            top, left = max(0, cy - r), max(0, cx - r)
            inside = (ys[top : cy + r] - cy) ** 2 + (xs[:, left : cx + r] - cx) ** 2 < r * r
            image[top : cy + r, left : cx + r][inside] = rng.integers(0, 256, 3, dtype=np.uint8)
        # Noise in 0..31 on top, saturating at white.
        noise = rng.integers(0, 32, image.shape, dtype=np.uint8)
        np.minimum(image, 255 - noise, out=image)
        image += noise


@rapace.service
class Imaging:
    """Image operations as a plugin service (one instance per worker)."""

    def __init__(self) -> None:
        # Plain def handlers run in a thread each, so a worker given many calls at once (a
        # pool.map) would run them all together: on one core that only thrashes caches and
        # memory. One image at a time per worker is faster, and each call's latency is honest.
        self._cpu = threading.Lock()

    def blur(self, image: Image, radius: int) -> Image:
        """Blur and return a new image (it comes back through shared memory, read-only)."""
        with self._cpu:
            return box_blur(image, radius)

    def process(
        self, image: Image, radius: int, factor: int, small: Image, histograms: Histograms
    ) -> None:
        """Run the pipeline on ``image`` and write the results into ``small`` and
        ``histograms``: buffers from ``pool.empty()``, so the caller sees the writes."""
        with self._cpu:
            small[...], histograms[...] = process_image(image, radius, factor)

    def histogram(self, image: Image) -> Histograms:
        with self._cpu:
            return channel_histograms(image)

    def levels(self, image: Image) -> Image:
        with self._cpu:
            return channel_levels(image)

    async def pyramid(self, image: Image, levels: int) -> Streaming[Image]:
        """Halve the image ``levels`` times, sending each level as soon as it is ready."""
        for _ in range(levels):
            # In a thread: an async handler that computes for long would keep this worker
            # from answering pings and other calls meanwhile.
            image = await anyio.to_thread.run_sync(downsample, image, 2)
            yield image

    def pid(self) -> int:
        return os.getpid()

    def crash(self) -> None:
        """Die at once, as a segfaulting extension or the OOM killer would."""
        os.kill(os.getpid(), signal.SIGKILL)
