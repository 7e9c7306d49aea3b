"""Imports point one way (ARCHITECTURE.md section 1), checked on the source with ast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "rapace"
FORBIDDEN_IN_WIRE = {"anyio", "os", "mmap", "socket", "time", "trio", "asyncio", "threading"}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                assert node.module is not None
                names.add(node.module)
    return names


def _modules(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("wire"), ids=lambda p: p.name)
def test_wire_is_sans_io(path: Path) -> None:
    """rapace.wire does no I/O and imports only rapace._errors of rapace."""
    for name in _imports(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN_IN_WIRE, f"{path.name} imports {name}"
        if top == "rapace":
            assert name == "rapace._errors" or name.startswith("rapace.wire"), (
                f"{path.name} imports {name}"
            )


@pytest.mark.parametrize("path", _modules("shm") + _modules("streams"), ids=lambda p: p.name)
def test_transports_do_not_import_upper_layers(path: Path) -> None:
    """Transports know frames, not sessions, services or pools."""
    for name in _imports(path):
        assert not name.startswith(("rapace.session", "rapace.pool", "rapace.service")), (
            f"{path.name} imports {name}"
        )


def test_importing_wire_loads_no_event_loop_or_numpy() -> None:
    """Importing rapace.wire pulls in neither anyio nor numpy (numpy stays optional)."""
    code = (
        "import sys, rapace.wire; "
        "print(sorted(m for m in ('anyio', 'numpy', 'trio', 'mmap') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
