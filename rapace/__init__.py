"""rapace: Python-native RPC for host <-> plugin architectures over shared memory.

Everything public is importable from here. Importing rapace does no work beyond defining
names: no processes, no shared memory, no event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rapace._errors import BrokenPluginPool as BrokenPluginPool
from rapace._errors import CodecError as CodecError
from rapace._errors import DeadlineExceeded as DeadlineExceeded
from rapace._errors import DecodeError as DecodeError
from rapace._errors import EncodeError as EncodeError
from rapace._errors import IncompatibleSchema as IncompatibleSchema
from rapace._errors import LocalProtocolError as LocalProtocolError
from rapace._errors import ProtocolError as ProtocolError
from rapace._errors import RapaceError as RapaceError
from rapace._errors import RemoteError as RemoteError
from rapace._errors import RemoteProtocolError as RemoteProtocolError
from rapace._errors import Status as Status
from rapace._errors import Unauthenticated as Unauthenticated
from rapace._errors import Unavailable as Unavailable
from rapace._errors import Unimplemented as Unimplemented
from rapace._errors import WorkerCrashed as WorkerCrashed
from rapace.service import Streaming as Streaming
from rapace.service import describe as describe
from rapace.service import service as service

if TYPE_CHECKING:
    from rapace._connect import connect as connect
    from rapace._connect import serve as serve
    from rapace._future import Future as Future
    from rapace._future import Stream as Stream
    from rapace.pool import PluginPool as PluginPool
    from rapace.pool import WorkerInfo as WorkerInfo

__version__ = "0.1.0.dev0"

# Loaded on first use: importing rapace (or rapace.wire) must not pull in an event loop.
_LAZY = {
    "connect": "rapace._connect",
    "serve": "rapace._connect",
    "Future": "rapace._future",
    "Stream": "rapace._future",
    "PluginPool": "rapace.pool",
    "WorkerInfo": "rapace.pool",
}


def __getattr__(name: str) -> object:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'rapace' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__all__ = (
    "BrokenPluginPool",
    "CodecError",
    "DeadlineExceeded",
    "DecodeError",
    "EncodeError",
    "Future",
    "IncompatibleSchema",
    "LocalProtocolError",
    "PluginPool",
    "ProtocolError",
    "RapaceError",
    "RemoteError",
    "RemoteProtocolError",
    "Status",
    "Stream",
    "Streaming",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WorkerCrashed",
    "WorkerInfo",
    "connect",
    "describe",
    "serve",
    "service",
)
