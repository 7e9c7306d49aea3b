"""The README's Python examples run as written (in a fresh interpreter, as a user would)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_examples_run(tmp_path: Path) -> None:
    pytest.importorskip("numpy")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3  # the pool, zero-copy and streaming examples
    script = tmp_path / "readme.py"
    # The blocks build on each other; the streaming one defines main() for asyncio to run.
    script.write_text("\n".join(blocks) + "\nimport anyio\nanyio.run(main)\nprint('ok')\n")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
    assert result.stderr == ""
