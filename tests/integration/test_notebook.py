"""A notebook that defines a service in a cell, uses the pool synchronously and with
top-level ``await``, executed headless in a real Jupyter kernel (nbclient)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "pool_in_a_notebook.ipynb"

# nbclient runs in a child process: its kernel, zmq sockets and threads then end with it.
RUNNER = """
import json, sys
import nbformat
from nbclient import NotebookClient

notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
print(json.dumps([cell.get("outputs", []) for cell in notebook.cells]))
"""


def test_a_pool_in_a_notebook() -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(NOTEBOOK)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=NOTEBOOK.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout.splitlines()[-1])
    results = [o["data"]["text/plain"] for cell in outputs for o in cell if "data" in o]
    assert results == ["42", "10"]
    # rapace printed nothing and warned nothing.
    assert not [o for cell in outputs for o in cell if o["output_type"] == "stream"]
