"""numpy stays optional: without it, pool buffers are memoryviews passed by reference and
large bytes-like values are still copied once into shared memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rapace.shm import SUPPORTED as SHM_SUPPORTED

ROOT = Path(__file__).parents[2]

SCRIPT = """
import sys
from tests.integration.no_numpy_services import Buffers  # hides numpy first
from rapace import PluginPool

with PluginPool(Buffers, workers=1) as pool:
    assert pool.submit(Buffers.numpy_hidden).result()
    buf = pool.buffer(1 << 20)
    assert pool.submit(Buffers.fill, buf[4096:], 3).result() == (1 << 20) - 4096
    assert bytes(buf[4094:4098]) == b"\\0\\0\\3\\3", bytes(buf[4094:4098])
    big = bytes([1]) * (1 << 20)
    assert pool.submit(Buffers.checksum, big).result() == (256, True)
    stats = pool.stats()
    assert stats["bytes_by_reference"] == (1 << 20) - 4096, stats
    assert stats["bytes_copied"] == 1 << 20, stats
    try:
        pool.empty(3)
    except ImportError as exc:
        assert "numpy" in str(exc)
    else:
        raise AssertionError("pool.empty without numpy")
    assert "numpy" not in sys.modules or sys.modules["numpy"] is None
print("OK")
"""


@pytest.mark.skipif(not SHM_SUPPORTED, reason="shared memory needs Linux on x86-64")
def test_buffers_without_numpy() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "OK"
    assert result.stderr == ""
