"""The README's main job, `rapace demo`, runs and shows every call shape working."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    """The demo exits 0 and its output shows results from the plugin process."""
    result = subprocess.run(
        [sys.executable, "-m", "rapace", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Summary(count=4096, mean=127.5, low=0, high=255)" in out
    assert "total(8 rows) -> 522240 (local: 522240)" in out
    assert "ValueError: crop [10:99999]" in out
    assert "slow() was cancelled by its caller" in out
    assert result.stderr == ""
