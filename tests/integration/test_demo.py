"""The README's main job, `rapace demo`: an image-processing pool over shared memory.

Only lines that do not depend on the machine's speed are checked: no timings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(150)
def test_demo_runs_end_to_end() -> None:
    """The demo exits 0, prints nothing on stderr, and shows every part working."""
    pytest.importorskip("numpy")
    result = subprocess.run(
        [sys.executable, "-m", "rapace", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    expected = [
        "rapace demo: an image-processing plugin pool (2 workers, shared memory)",
        "PluginPool(Imaging, workers=2) ready in",
        "Rendered 48 synthetic 1024x1024 RGB images (151.0 MB) into pool.empty() shared memory",
        "  48 images in ",
        # The workers' writes into pool.empty() buffers are seen by the host.
        "thumbnail and histograms identical to what the worker wrote",
        "  calls                                   48\n",
        "Against concurrent.futures.ProcessPoolExecutor(2)",
        "  blur + downsample + histograms ",
        "  histograms only ",
        "  levels (min, max) only ",
        "  level 1: 512x512 (786,432 bytes, ",
        "  level 4: 64x64 (12,288 bytes, ",
        "  ValueError: blur radius must be >= 1, got 0",
        "in box_blur",
        "rapace.WorkerCrashed: worker ",
        "killed by SIGKILL while running Imaging.crash",
        "(1 restarts)",
        "images 0-3 processed again: identical results",
        "Done in ",
    ]
    if "transport shm" in out:  # elsewhere (not x86-64) the pool copies over Unix sockets
        expected += [
            # Inputs (151.0 MB) and output buffers (37.7 + 0.3 MB) all went by reference.
            "  bytes passed by reference (zero-copy)   189.0 MB\n",
            "  bytes copied into shared memory         0.0 MB\n",
            "  level 1: 512x512 (786,432 bytes, a read-only view)",
            "blur(private image): 6.3 MB copied into shared memory (the image there, the "
            "result back, once each); the blurred image comes back as a read-only view",
        ]
    missing = [line for line in expected if line not in out]
    assert not missing, f"missing {missing} in:\n{out}"
    assert "DIFFERENT" not in out


def test_demo_without_numpy_says_what_to_install() -> None:
    """numpy is an extra: without it the demo explains itself and exits 2."""
    # A None entry in sys.modules makes `import numpy` raise ImportError.
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "from rapace._demo import run_demo\n"
        "sys.exit(run_demo())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "pip install 'rapace[numpy]'" in result.stderr
