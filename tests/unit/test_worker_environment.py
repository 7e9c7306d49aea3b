"""What a worker's environment says about imports and threads."""

from __future__ import annotations

import os

from rapace._workers import portable_paths, worker_environment


def test_portable_paths_leave_out_an_interpreters_own_directories() -> None:
    roots = ["/opt/py", "/home/u/.venv"]
    paths = [
        "/opt/py/lib/python3.11",
        "/opt/py/lib/python3.11/site-packages",
        "/opt/pyproject",  # a sibling whose name starts like a root: kept
        "/home/u/.venv/lib/python3.11/site-packages",
        "/home/u/project",
        "/opt/py",
    ]
    assert portable_paths(paths, roots) == ["/opt/pyproject", "/home/u/project"]


def test_a_foreign_interpreter_gets_no_standard_library_of_the_host() -> None:
    stdlib = os.path.dirname(os.__file__)
    own = worker_environment_paths(foreign=False)
    foreign = worker_environment_paths(foreign=True)
    assert stdlib in own
    assert stdlib not in foreign
    assert os.getcwd() in foreign
    assert set(foreign) <= set(own)


def worker_environment_paths(*, foreign: bool) -> list[str]:
    class _Boot:
        def to_environment(self) -> str:
            return "{}"

    env = worker_environment(_Boot(), None, 1, foreign=foreign)  # type: ignore[arg-type]
    return env["PYTHONPATH"].split(os.pathsep)


def test_thread_variables_follow_the_cpus_this_process_may_use() -> None:
    class _Boot:
        def to_environment(self) -> str:
            return "{}"

    env = worker_environment(_Boot(), None, 1)  # type: ignore[arg-type]
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if "OMP_NUM_THREADS" not in os.environ:
        assert env["OMP_NUM_THREADS"] == str(allowed)
