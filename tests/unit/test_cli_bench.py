"""``rapace bench``: the smallest runs produce the table and the JSON, and refusals are clean.

No timing assertions: only that every cell holds a number or says why it has none.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rapace.__main__ import main

ROOT = Path(__file__).parents[2]


def _bench(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m rapace bench ARGS`` from the repository root."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "rapace", "bench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_quick_latency_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = _bench("--quick", "--only", "latency", "--json", str(out))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(line for line in lines if line.startswith("workload"))
    for column in ("shm", "unix", "tcp", "Pipe", "vs best"):
        assert column in header
    assert any(line.startswith("unary latency p50") for line in lines)
    assert any(line.startswith("unary latency p99") for line in lines)
    assert "Traceback" not in done.stderr

    report = json.loads(out.read_text())
    assert {"cpu_model", "cpus", "python", "platform", "date"} <= report["machine"].keys()
    assert report["config"]["workloads"] == ["latency"]
    assert report["duration_s"] > 0
    rows = {row["key"]: row for row in report["rows"]}
    assert set(rows) == {"latency.p50", "latency.p99"}
    for row in rows.values():
        for transport in ("shm", "unix", "tcp"):
            cell = row["cells"][f"rapace {transport}"]
            assert isinstance(cell["value"], float), cell
        assert isinstance(row["cells"]["multiprocessing.Pipe"]["value"], float)


def test_arena_without_the_api_says_na_instead_of_failing(tmp_path: Path) -> None:
    """Whether or not ``pool.empty`` exists yet, the arena rows hold a number or "n/a"."""
    out = tmp_path / "bench.json"
    done = _bench(
        "--quick", "--only", "arena", "--transports", "shm", "--arena-mib", "1", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    rows = {row["key"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"arena.big", "arena.small"}
    for row in rows.values():
        cell = row["cells"]["rapace shm"]
        assert cell["value"] is not None or cell["note"].startswith("n/a"), cell
    assert "arena array 1 MiB -> len" in done.stdout


def test_unknown_workload_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "latency,nope"])
    assert exc.value.code == 2
    assert "unknown name 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed"
)
def test_png_without_matplotlib_fails_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["bench", "--quick", "--png", str(tmp_path / "bench.png")])
    assert status == 2
    err = capsys.readouterr().err
    assert "--png needs matplotlib" in err
    assert "rapace bench: [" not in err  # nothing ran


def test_the_command_line_names_what_the_suite_runs() -> None:
    """The command keeps its own copy of the names (``rapace --help`` must not import the
    suite): they must agree."""
    import rapace.benchsuite
    from rapace import _cli_bench

    assert _cli_bench.WORKLOADS == rapace.benchsuite.WORKLOADS
    assert _cli_bench.TRANSPORTS == rapace.benchsuite.TRANSPORTS
    assert {row.workload for row in rapace.benchsuite.ROWS} == set(_cli_bench.WORKLOADS)
