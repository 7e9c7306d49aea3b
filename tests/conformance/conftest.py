"""Fixtures of the conformance suite: every test runs over every connector and backend."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from .connectors import CONNECTORS, Connect, Env


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=list(CONNECTORS))
def connect(request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str) -> Connect:
    """``connect(Service, **options)``: a connection to a ``Conformance()`` server over the
    transport of this parameter (see ``connectors.py``), yielding a proxy for ``Service``."""
    connector = CONNECTORS[request.param]
    env = Env(tmp_path=tmp_path, backend=anyio_backend)

    def bound(service: type[Any], **options: Any) -> AbstractAsyncContextManager[Any]:
        return connector(service, env, **options)

    return bound
