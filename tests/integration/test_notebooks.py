"""The notebooks in notebooks/ run headless in a real Jupyter kernel (nbclient), end to end,
and are committed without outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rapace.shm import SUPPORTED as SHM_SUPPORTED

NOTEBOOKS = Path(__file__).parents[2] / "notebooks"

# nbclient runs in a child process: its kernel, zmq sockets and threads then end with it.
RUNNER = """
import json, sys
import nbformat
from nbclient import NotebookClient

notebook = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
cells = [
    {"source": cell.source, "outputs": cell.get("outputs", [])}
    for cell in notebook.cells
    if cell.cell_type == "code"
]
print(json.dumps(cells))
"""

# What each notebook must print: the parts a reader is promised.
EXPECTED = {
    "quickstart.ipynb": [
        "add(2, 3) = 5",
        " 600851475143 = 71 x 839 x 1471 x 6857",
        "10,000 adds, last: 19998",
        "await: 42",
        "awaited together: [0, 2, 4, 6, 8]",
        "async stream: [1, 2, 3]",
        "20 steps streamed in",
        "caught ValueError: invalid literal for int() with base 10: 'forty-two'",
        "rapace.WorkerCrashed: worker",
        "the pool still answers: 2",
        "restarts=1",
        "offset worker: 103",
    ],
    "data_processing.ipynb": [
        "151 MB in shared memory",
        "48 images in",
        # Images and output buffers (151.0 + 37.7 + 0.3 MB), all sent by reference.
        "bytes_by_reference 189,038,592",
        "thumbnail identical:  True",
        "histograms identical: True",
        "the result: (1024, 1024, 3) uint8, writeable=False",
        "levels 48",
        "thumbnail 0 still readable after shutdown",
    ],
}


def _execute(path: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=path.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    cells: list[dict[str, Any]] = json.loads(result.stdout.splitlines()[-1])
    return cells


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_headless(name: str) -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("numpy")
    cells = _execute(NOTEBOOKS / name)

    errors = [o for cell in cells for o in cell["outputs"] if o["output_type"] == "error"]
    assert not errors, [(e["ename"], e["evalue"]) for e in errors]

    # Nothing reaches stderr (rapace warns and prints nothing) except the progress bar that
    # a cell asks for with progress=True: tqdm's or rapace's own line.
    stderr = [
        (cell["source"].splitlines()[0], o["text"])
        for cell in cells
        if "progress=True" not in cell["source"]
        for o in cell["outputs"]
        if o["output_type"] == "stream" and o["name"] == "stderr"
    ]
    assert not stderr

    stdout = "".join(
        o["text"]
        for cell in cells
        for o in cell["outputs"]
        if o["output_type"] == "stream" and o["name"] == "stdout"
    )
    words = " ".join(stdout.split())  # column widths are not the point
    expected = EXPECTED[name]
    if not SHM_SUPPORTED:  # elsewhere the pool copies over Unix sockets
        expected = [text for text in expected if "by_reference" not in text]
    missing = [text for text in expected if " ".join(text.split()) not in words]
    assert not missing, f"missing {missing} in:\n{stdout}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_committed_without_outputs(name: str) -> None:
    notebook = json.loads((NOTEBOOKS / name).read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code)


def test_every_notebook_is_tested() -> None:
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
