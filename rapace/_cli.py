"""What the ``rapace`` subcommands share: naming a class as ``module:Class``, importing it the
way ``python -m`` would, and reporting expected failures as one line instead of a traceback.

Only the standard library and what ``import rapace`` loads anyway are imported at module
level: ``rapace --help`` loads this module, and it must stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Final, NoReturn, TypeAlias

from rapace._errors import RapaceError
from rapace.service import service_spec

__all__ = (
    "FAILURE",
    "USAGE_ERROR",
    "CliError",
    "Commands",
    "Target",
    "load_service_class",
    "parse_target",
    "run_command",
    "user_code_failed",
    "write_err",
    "write_out",
)

#: Exit status of a command that could not do its job (a missing module, a failed check).
FAILURE = 1
#: Exit status of a command given arguments that cannot work (argparse's own status).
USAGE_ERROR = 2

#: The object ``add_subparsers`` returns, which each command module registers itself on.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CliError(Exception):
    """An expected failure of a command: reported on stderr as one line, with no traceback,
    and turned into the exit status ``exit_code``."""

    def __init__(self, message: str, exit_code: int = FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def write_out(text: str) -> None:
    """One line of a command's result on stdout (looked up at call time, so tests capture it)."""
    sys.stdout.write(text + "\n")


def write_err(text: str) -> None:
    """One line of diagnostics on stderr, flushed: a supervisor may be waiting for it."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def run_command(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand, turning a :class:`CliError` into ``rapace CMD: error: ...`` on
    stderr (argparse's own format) and its exit status."""
    try:
        return command(args)
    except CliError as exc:
        write_err(f"rapace {args.command}: error: {exc}")
        return exc.exit_code


@dataclass(frozen=True, slots=True)
class Target:
    """A class named on the command line: ``package.module:Outer.Inner``."""

    module: str
    qualname: str

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname}"


def parse_target(text: str) -> Target:
    """The argparse ``type=`` of a ``MODULE:CLASS`` argument; a malformed one is a usage
    error (exit status 2), reported by argparse with the command's usage."""
    module, colon, qualname = text.partition(":")
    if module.endswith(".py"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a module name, not a file (e.g. plugins.images:Service for "
            "plugins/images.py, run from the directory that holds plugins/)"
        )
    if not colon or not _dotted_identifiers(module) or not _dotted_identifiers(qualname):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected MODULE:CLASS, e.g. myplugin.services:Calculator"
        )
    return Target(module, qualname)


def _dotted_identifiers(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def load_service_class(target: Target) -> type:
    """Import ``target``'s module and return its class, which must be a rapace service (or
    implement one).

    Raises:
        CliError: the module is not found, has no such attribute, failed to import (its
            traceback is printed first: that is a bug in the user's code, and the traceback
            is what finds it), or the attribute is not a rapace service class.
    """
    module = _import(target.module)
    found = _resolve(module, target)
    if not isinstance(found, type):
        raise CliError(f"{target} is a {type(found).__name__}, not a class")
    if not _is_service(found):
        raise CliError(
            f"{target} is not a rapace service (decorate it, or a class it inherits from, "
            "with @rapace.service)"
        )
    return found


def _import(name: str) -> ModuleType:
    _put_cwd_on_path()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise CliError(
                f"no module named {exc.name!r} (searched the current directory and sys.path)"
            ) from None
        user_code_failed(f"importing {name!r} failed")
    except RapaceError as exc:
        # @rapace.service refusing a method at import time: its message names the method
        # and the rule, so a traceback through importlib adds nothing.
        raise CliError(f"importing {name!r} failed: {exc}") from None
    except Exception:
        user_code_failed(f"importing {name!r} failed")


def _put_cwd_on_path() -> None:
    """Make modules in the current directory importable, as ``python -m`` does (the
    ``rapace`` console script starts with its own bin directory on sys.path instead)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _resolve(module: ModuleType, target: Target) -> object:
    found: object = module
    walked = ""
    for part in target.qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            if not walked:
                raise CliError(
                    f"module {target.module!r} has no attribute {part!r}{_services_hint(module)}"
                ) from None
            raise CliError(f"{target.module}:{walked} has no attribute {part!r}") from None
        walked = f"{walked}.{part}" if walked else part
    return found


def _services_hint(module: ModuleType) -> str:
    """``" (its services: A, B)"``: what the user may have meant, or nothing."""
    names = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and not name.startswith("_") and _is_service(value)
    )
    return f" (its services: {', '.join(names)})" if names else ""


def _is_service(cls: type) -> bool:
    try:
        service_spec(cls)
    except TypeError:
        return False
    return True


def user_code_failed(what: str) -> NoReturn:
    """Print the traceback of the exception being handled, which came from the user's own
    code, then raise a :class:`CliError` saying ``what`` failed.

    The traceback is kept here, unlike for expected errors: it points at the bug. Its
    leading frames in this command line and in importlib are dropped: they are noise.
    """
    exc = sys.exception()
    assert exc is not None  # called from an except block
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and _is_machinery(tb.tb_frame):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)
    raise CliError(f"{what} (traceback above)")


def _is_machinery(frame: FrameType) -> bool:
    filename = frame.f_code.co_filename
    if filename.startswith("<frozen importlib"):
        return True
    path = Path(filename)
    return path == _IMPORTLIB or (path.parent == _PACKAGE_DIR and path.name.startswith("_cli"))


_PACKAGE_DIR: Final = Path(__file__).parent
_IMPORTLIB: Final = Path(importlib.__file__)
