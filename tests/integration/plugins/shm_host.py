"""A host process for the host-death test: offers a link to a serve_shm worker, prints
``READY <worker pid>`` once a call went through, then waits to be killed."""

from __future__ import annotations

import sys

import anyio

from rapace._connect import Proxy
from rapace.service import service_spec
from rapace.session import open_session
from rapace.wire import Role
from tests.conformance.services import Conformance
from tests.integration.shm_host import shm_child


async def main() -> None:
    async with (
        shm_child("tests.integration.plugins.serve_shm") as (transport, process),
        open_session(transport, role=Role.INITIATOR) as session,
    ):
        calc = Proxy(session, service_spec(Conformance))
        assert await calc.add(1, 2) == 3
        sys.stdout.write(f"READY {process.pid}\n")
        sys.stdout.flush()
        await calc.wait_forever()


if __name__ == "__main__":
    anyio.run(main)
