"""The leak checker itself must be able to fail: each kind of leak is caught."""

from __future__ import annotations

import pytest

CONFTEST = (__import__("pathlib").Path(__file__).parents[1] / "conftest.py").read_text()

LEAKY_TESTS = {
    "child": """
import subprocess, sys
def test_leaks_child():
    global proc
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
""",
    "fd": """
import os
def test_leaks_fd():
    global fds
    fds = os.pipe()
""",
    "segment": """
from multiprocessing import resource_tracker, shared_memory
# The tracker is a process of its own: started before the test, it is not the test's leak.
resource_tracker.ensure_running()
def test_leaks_segment():
    global seg
    seg = shared_memory.SharedMemory(name="rapace-leaktest", create=True, size=4096)
    resource_tracker.unregister(seg._name, "shared_memory")
    seg.close()
""",
}
EXPECTED = {
    "child": "child process",
    "fd": "left open",
    "segment": "/dev/shm/rapace-leaktest",
}


@pytest.mark.parametrize("kind", sorted(LEAKY_TESTS))
def test_leak_is_reported(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A test that leaks a child, an fd or a segment fails, and the message says what."""
    monkeypatch.setenv("RAPACE_TEST_CHILD_GRACE_S", "0.2")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(LEAKY_TESTS[kind])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([f"*{EXPECTED[kind]}*"])


def test_clean_test_passes(pytester: pytest.Pytester) -> None:
    """A test that cleans up after itself is not reported."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
import os
def test_clean():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
