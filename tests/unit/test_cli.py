"""The ``rapace`` command line in-process: ``inspect``, ``doctor``, and ``serve``'s refusals.

Commands run through ``rapace.__main__.main([...])`` with their output captured. Every
expected error must exit non-zero with one line on stderr naming what was wrong, and no
traceback. (``serve`` actually serving is tested in a real process, in
tests/integration/test_cli.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rapace
import rapace.shm
from rapace.__main__ import main
from rapace.shm._cleanup import StaleSegment
from tests.cli_services import Greeter, Impl, Outer

ROOT = Path(__file__).parents[2]
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(autouse=True)
def _isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run from the repository root (as the command would be), and undo what importing a
    user's module does to sys.path and sys.modules."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("cli_tmp_"):
            del sys.modules[name]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """``run("inspect", ...)`` -> (exit status, stdout, stderr); argparse's SystemExit
    (usage errors, --help) is turned into its status too."""

    def invoke(*argv: str) -> tuple[int, str, str]:
        try:
            status = main(list(argv))
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return status, out, err

    return invoke


@pytest.fixture
def tmp_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Write a module named ``cli_tmp_<name>`` in an importable directory; returns its name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        module = f"cli_tmp_{name}"
        (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
        return module

    return write


def _assert_clean_error(err: str, *needles: str) -> None:
    """One diagnosis on stderr, naming what was wrong, with no traceback."""
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err


# ---------------------------------------------------------------------------------- inspect


def test_inspect_json_is_describe(run: Run) -> None:
    """--json prints exactly json.dumps(rapace.describe(cls), indent=2)."""
    status, out, err = run("inspect", "tests.cli_services:Greeter", "--json")
    assert (status, err) == (0, "")
    assert out == json.dumps(rapace.describe(Greeter), indent=2) + "\n"


def test_inspect_human_format_shows_ids_kinds_and_signatures(run: Run) -> None:
    status, out, err = run("inspect", "tests.cli_services:Greeter")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "service Greeter (tests.cli_services:Greeter): 5 methods"
    methods = {m["name"]: m for m in rapace.describe(Greeter)["methods"]}  # type: ignore[attr-defined]
    expected = {
        "greet": ("unary", "greet(name: str, *, punctuation: str = '!') -> str"),
        "count": ("server_streaming", "count(n: int) -> Streaming[int]"),
        "total": ("client_streaming", "total(xs: Streaming[int]) -> int"),
        "scale": ("bidi_streaming", "scale(xs: Streaming[float], k: float) -> Streaming[float]"),
        "shout": ("unary", "shout(text: str) -> str  [def: runs in a thread]"),
    }
    for line, (name, (kind, signature)) in zip(lines[1:], expected.items(), strict=True):
        assert line.split()[:2] == [f"0x{methods[name]['id']:08x}", kind]
        assert line.endswith(signature)


def test_inspect_an_implementation_shows_its_service(run: Run) -> None:
    """An implementation subclass has the interface's schema (and ids)."""
    status, out, _ = run("inspect", "tests.cli_services:Impl", "--json")
    assert status == 0
    assert json.loads(out) == rapace.describe(Greeter) == rapace.describe(Impl)


def test_inspect_a_dotted_class_name(run: Run) -> None:
    status, out, _ = run("inspect", "tests.cli_services:Outer.Nested", "--json")
    assert status == 0
    assert json.loads(out) == rapace.describe(Outer.Nested)


def test_inspect_finds_modules_in_the_current_directory(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like python -m: a module in the working directory is importable without setup."""
    (tmp_path / "cli_tmp_here.py").write_text(
        "import rapace\n\n@rapace.service\nclass Here:\n    async def hi(self) -> str: ...\n"
    )
    monkeypatch.chdir(tmp_path)
    status, out, _ = run("inspect", "cli_tmp_here:Here")
    assert status == 0
    assert out.startswith("service Here (cli_tmp_here:Here): 1 method\n")


@pytest.mark.parametrize(
    ("target", "needles"),
    [
        ("tests.no_such_module:X", ["no module named 'tests.no_such_module'"]),
        ("no_such_package.sub:X", ["no module named 'no_such_package'"]),
        ("tests.cli_services:Nope", ["has no attribute 'Nope'", "its services: Greeter, Impl"]),
        ("tests.cli_services:Outer.Nope", ["tests.cli_services:Outer has no attribute 'Nope'"]),
        ("tests.cli_services:NotAService", ["NotAService is not a rapace service"]),
        ("tests.cli_services:helper", ["helper is a function, not a class"]),
    ],
)
def test_inspect_errors_exit_1_without_traceback(run: Run, target: str, needles: list[str]) -> None:
    status, out, err = run("inspect", target)
    assert (status, out) == (1, "")
    assert err.startswith("rapace inspect: error: ")
    assert err.count("\n") == 1
    _assert_clean_error(err, *needles)


@pytest.mark.parametrize("target", ["tests.cli_services", "mod:", ":Cls", "a-b:C", "x.py:C"])
def test_inspect_malformed_target_is_a_usage_error(run: Run, target: str) -> None:
    status, out, err = run("inspect", target)
    assert (status, out) == (2, "")
    _assert_clean_error(err, "usage: rapace inspect", repr(target))


def test_inspect_a_service_that_fails_to_decorate(
    run: Run, tmp_module: Callable[[str, str], str]
) -> None:
    """@rapace.service refusing a method at import: its message, no traceback."""
    module = tmp_module(
        "bad_service",
        """
        import rapace

        @rapace.service
        class Bad:
            @staticmethod
            async def f(x: int) -> int: ...
        """,
    )
    status, _, err = run("inspect", f"{module}:Bad")
    assert status == 1
    _assert_clean_error(err, f"importing {module!r} failed", "Bad.f")


def test_inspect_a_module_that_raises_shows_its_traceback(
    run: Run, tmp_module: Callable[[str, str], str]
) -> None:
    """A bug in the user's module is not an expected error: its traceback is what helps."""
    module = tmp_module("raises", "raise RuntimeError('broken plugin')\n")
    status, _, err = run("inspect", f"{module}:X")
    assert status == 1
    assert "Traceback" in err
    assert "RuntimeError: broken plugin" in err
    assert err.rstrip().endswith(
        f"rapace inspect: error: importing {module!r} failed (traceback above)"
    )


def test_inspect_a_module_with_a_missing_dependency(
    run: Run, tmp_module: Callable[[str, str], str]
) -> None:
    """The module exists but imports something absent: that is not 'no module named X'."""
    module = tmp_module("needs_dep", "import cli_tmp_absent_dependency\n")
    status, _, err = run("inspect", f"{module}:X")
    assert status == 1
    assert "No module named 'cli_tmp_absent_dependency'" in err
    assert f"importing {module!r} failed" in err


# ---------------------------------------------------------------------------------- doctor


def test_doctor_json_lists_every_check(run: Run) -> None:
    status, out, err = run("doctor", "--json")
    assert err == ""
    report = json.loads(out)
    names = [check["name"] for check in report["checks"]]
    assert names == [
        "python",
        "platform",
        "/dev/shm",
        "eventfd",
        "pidfd",
        "open files",
        "stale segments",
        "numpy",
    ]
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail"}
        assert check["status"] in {"OK", "WARN", "FAIL", "INFO"}
        assert check["detail"]
    failed = any(check["status"] == "FAIL" for check in report["checks"])
    assert report["ok"] is not failed
    assert status == (1 if failed else 0)


def test_doctor_text_report(run: Run) -> None:
    status, out, _ = run("doctor")
    lines = out.splitlines()
    assert len(lines) == 9
    for line in lines[:-1]:
        assert line.split()[0] in {"OK", "WARN", "FAIL", "INFO"}
    assert lines[-1] == "all checks passed" or "failed" in lines[-1]
    assert status in (0, 1)


def _checks(run: Run) -> tuple[int, dict[str, dict[str, str]]]:
    status, out, _ = run("doctor", "--json")
    return status, {c["name"]: c for c in json.loads(out)["checks"]}


def _on_linux_x86_64() -> None:
    if not rapace.shm.SUPPORTED:
        pytest.skip("the shared-memory checks fail only where that transport is used")


def test_doctor_warns_about_a_small_dev_shm(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker's default 64 MiB /dev/shm is the classic trap: WARN, suggesting --shm-size."""
    real = os.statvfs
    mib = 1 << 20

    def small(path: str | os.PathLike[str]) -> os.statvfs_result:
        if str(path) != "/dev/shm":
            return real(path)
        fields = list(real(path))
        fields[1], fields[2], fields[4] = 4096, 64 * mib // 4096, 60 * mib // 4096
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", small)
    _, checks = _checks(run)
    assert checks["/dev/shm"]["status"] == "WARN"
    assert "60.0 MiB free of 64.0 MiB" in checks["/dev/shm"]["detail"]
    assert "--shm-size" in checks["/dev/shm"]["detail"]


def test_doctor_fails_when_eventfd_is_broken(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    _on_linux_x86_64()

    def refuse(*_: object) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "eventfd", refuse)
    status, checks = _checks(run)
    assert checks["eventfd"]["status"] == "FAIL"
    assert status == 1


def test_doctor_warns_about_a_blocked_pidfd(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old container seccomp profiles refuse pidfd_open: rapace copes, more slowly."""

    def refuse(*_: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "pidfd_open", refuse, raising=False)
    _, checks = _checks(run)
    assert checks["pidfd"]["status"] == "WARN"
    assert "Operation not permitted" in checks["pidfd"]["detail"]


def test_doctor_warns_about_a_low_fd_limit(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    _, checks = _checks(run)
    assert checks["open files"]["status"] == "WARN"
    assert "ulimit -n 4096" in checks["open files"]["detail"]


def test_doctor_suggests_cleanup_for_stale_segments(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = [StaleSegment("rp_dead_1", 12345, 3 << 20), StaleSegment("rp_dead_2", 12345, 1 << 20)]
    monkeypatch.setattr(rapace.shm, "find_stale", lambda: stale)
    _, checks = _checks(run)
    assert checks["stale segments"]["status"] == "WARN"
    assert "2 segment(s) (4.0 MiB)" in checks["stale segments"]["detail"]
    assert "rapace cleanup" in checks["stale segments"]["detail"]


def test_doctor_reports_a_crashing_check_as_a_failure(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash() -> list[StaleSegment]:
        raise RuntimeError("boom")

    monkeypatch.setattr(rapace.shm, "find_stale", crash)
    status, checks = _checks(run)
    assert checks["stale segments"]["status"] == "FAIL"
    assert "RuntimeError: boom" in checks["stale segments"]["detail"]
    assert status == 1


# ----------------------------------------------------------------- serve: refused up front


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--listen", "tcp://127.0.0.1:0"], "a tcp:// listener requires a token"),
        (["--listen", "ws://127.0.0.1:0/p"], "a ws:// listener requires a token"),
        (["--listen", "wss://127.0.0.1:0/p", "--token", "t"], "wss:// (TLS) is not supported"),
        (["--listen", "http://x"], "unsupported scheme"),
        (["--listen", "unix:///x.sock", "--token-env", "RAPACE_TEST_UNSET"], "RAPACE_TEST_UNSET"),
        (["--listen", "tcp://127.0.0.1:0", "--token", ""], "the token is empty"),
    ],
)
def test_serve_refuses_a_listener_that_cannot_work(
    run: Run, monkeypatch: pytest.MonkeyPatch, extra: list[str], needle: str
) -> None:
    monkeypatch.delenv("RAPACE_TEST_UNSET", raising=False)
    status, _, err = run("serve", "tests.cli_services:Impl", *extra)
    assert status == 2
    _assert_clean_error(err, "rapace serve: error:", needle)


@pytest.mark.parametrize(("args", "needle"), [("{not json", "not valid JSON"), ("[1]", "list")])
def test_serve_refuses_bad_constructor_arguments(run: Run, args: str, needle: str) -> None:
    status, _, err = run(
        "serve", "tests.cli_services:Impl", "--listen", "unix:///x.sock", "--args", args
    )
    assert status == 2
    _assert_clean_error(err, "usage: rapace serve", needle)


def test_serve_reports_a_constructor_that_refuses_its_arguments(run: Run, tmp_path: Path) -> None:
    url = f"unix://{tmp_path / 's.sock'}"
    status, _, err = run(
        "serve", "tests.cli_services:Impl", "--listen", url, "--args", '{"colour": "red"}'
    )
    assert status == 1
    _assert_clean_error(err, "Impl(colour='red') failed", "unexpected keyword argument 'colour'")


def test_serve_reports_where_it_cannot_listen(run: Run, tmp_path: Path) -> None:
    url = f"unix://{tmp_path / 'missing-dir' / 's.sock'}"
    status, _, err = run("serve", "tests.cli_services:Impl", "--listen", url)
    assert status == 1
    _assert_clean_error(err, f"cannot listen on {url}")


def test_serve_names_a_socket_file_left_behind(run: Run, tmp_path: Path) -> None:
    """A killed server leaves its socket file: the error says which file to remove."""
    path = tmp_path / "s.sock"
    path.touch()
    status, _, err = run("serve", "tests.cli_services:Impl", "--listen", f"unix://{path}")
    assert status == 1
    _assert_clean_error(err, "Address already in use", f"remove {path}")


def test_serve_needs_a_service(run: Run, tmp_path: Path) -> None:
    url = f"unix://{tmp_path / 's.sock'}"
    status, _, err = run("serve", "tests.cli_services:NotAService", "--listen", url)
    assert status == 1
    _assert_clean_error(err, "is not a rapace service")


# ------------------------------------------------------------------------ the command line


def test_no_command_prints_usage_and_exits_2(run: Run) -> None:
    status, _, err = run()
    assert status == 2
    assert "usage: rapace" in err


@pytest.mark.parametrize("command", ["demo", "inspect", "serve", "doctor", "cleanup"])
def test_every_command_has_a_description(run: Run, command: str) -> None:
    status, out, _ = run(command, "--help")
    assert status == 0
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith(f"usage: rapace {command}")
    assert len(description) > 40


def test_help_loads_neither_anyio_nor_numpy() -> None:
    """`rapace --help` stays fast: commands import what they need when they run."""
    code = (
        "import sys\n"
        "from rapace.__main__ import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('anyio', 'numpy', 'rapace.shm') if m in sys.modules), "
        "file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "inspect" in result.stdout
    assert result.stderr.strip() == "[]"
