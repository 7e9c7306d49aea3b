"""rapace: Python-native RPC for host <-> plugin architectures over shared memory.

Everything public is importable from here. Importing rapace does no work beyond defining
names: no processes, no shared memory, no event loop.
"""

from __future__ import annotations

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

__version__ = "0.1.0.dev0"

__all__ = (
    "BrokenPluginPool",
    "CodecError",
    "DeadlineExceeded",
    "DecodeError",
    "EncodeError",
    "IncompatibleSchema",
    "LocalProtocolError",
    "ProtocolError",
    "RapaceError",
    "RemoteError",
    "RemoteProtocolError",
    "Status",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WorkerCrashed",
)
