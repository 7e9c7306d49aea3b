"""What a type checker sees through a proxy: `await calc.add(2, 3)` is an int."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = textwrap.dedent(
    """
    import rapace
    from rapace import Streaming

    @rapace.service
    class Calculator:
        async def add(self, a: int, b: int) -> int:
            return a + b

        async def range(self, n: int) -> Streaming[int]:
            for i in range(n):
                yield i

    async def main() -> None:
        async with rapace.connect("unix:///tmp/x.sock", Calculator) as calc:
            reveal_type(await calc.add(2, 3))
            reveal_type([x async for x in calc.range(3)])
            await calc.add("2", 3)
    """
)


def test_mypy_sees_proxy_methods_with_their_types(tmp_path: Path) -> None:
    """Results are typed from the service's annotations, and bad arguments are caught."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it comes with the lint extra)")
    source = tmp_path / "uses_proxy.py"
    source.write_text(SNIPPET)
    # In a subprocess: mypy loaded into this process would make every later gc.collect()
    # (the leak check runs one per test) walk its huge object graph.
    command = [sys.executable, "-m", "mypy", str(source), "--strict", "--no-incremental"]
    result = subprocess.run(
        [*command, "--cache-dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    stdout = result.stdout
    # mypy spells builtins with or without their module, depending on its version.
    assert re.search(r'Revealed type is "(builtins\.)?int"', stdout), stdout
    assert re.search(r'Revealed type is "(builtins\.)?list\[(builtins\.)?int\]"', stdout), stdout
    assert 'Argument 1 to "add" of "Calculator" has incompatible type "str"' in stdout, stdout
