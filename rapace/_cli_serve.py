"""``rapace serve module:Impl --listen URL``: serve a service until interrupted.

The library prints nothing in normal operation; this command, being a server a person or a
supervisor starts, reports one line on stderr once it is bound (``listening on URL``, with the
real port when port 0 was asked for), and stops quietly with status 0 on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
from typing import TYPE_CHECKING

from rapace._cli import (
    USAGE_ERROR,
    CliError,
    Commands,
    load_service_class,
    parse_target,
    user_code_failed,
    write_err,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from rapace.streams._net import Address

__all__ = ("register",)

DESCRIPTION = (
    "Import MODULE, construct CLASS() (with the keyword arguments of --args) and serve it on "
    "--listen until interrupted. Prints 'listening on URL' on stderr once bound; Ctrl-C or "
    "SIGTERM stops it with exit status 0. A tcp:// or ws:// listener requires a token, which "
    "clients prove they know; a unix:// socket is created 0600 (only this user may connect)."
)


def register(commands: Commands) -> None:
    """Add ``serve`` to the ``rapace`` command line."""
    parser = commands.add_parser(
        "serve", help="serve a service on a socket", description=DESCRIPTION
    )
    parser.add_argument(
        "target",
        type=parse_target,
        metavar="MODULE:CLASS",
        help="the implementation class, e.g. myplugin.services:CalcImpl",
    )
    parser.add_argument(
        "--listen",
        required=True,
        metavar="URL",
        help=(
            "unix:///path/to.sock, tcp://host:port or ws://host:port/path (port 0: any free port)"
        ),
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        help="the secret clients must know (other users can read it in the process list: "
        "prefer --token-env)",
    )
    token.add_argument(
        "--token-env", metavar="VAR", help="read the token from environment variable VAR"
    )
    parser.add_argument(
        "--args",
        type=_json_object,
        default={},
        metavar="JSON",
        help="""keyword arguments for CLASS(), as a JSON object, e.g. '{"root": "/data"}'""",
    )
    parser.set_defaults(run=run)


def _json_object(text: str) -> dict[str, object]:
    """The argparse ``type=`` of ``--args``: a malformed value is a usage error."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object of keyword arguments, not {type(value).__name__}"
        )
    return value


def run(args: argparse.Namespace) -> int:
    """Check the arguments, import and construct the service, and serve it until stopped."""
    token = _token(args)
    address = _check_listen(args.listen, token)
    try:
        cls = load_service_class(args.target)
        impl = _construct(cls, args.args)
        error = _serve(impl, address, token)
    except KeyboardInterrupt:
        # Ctrl-C before the server was up (a slow import, say): stopping is what was asked.
        return 0
    if error is not None:
        raise CliError(error)
    return 0


def _token(args: argparse.Namespace) -> str | None:
    """The token from --token or --token-env; an empty one is refused (it protects nothing)."""
    if args.token_env is None:
        token: str | None = args.token
        if token == "":
            raise CliError("--token: the token is empty", USAGE_ERROR)
        return token
    value = os.environ.get(args.token_env)
    if not value:
        raise CliError(
            f"--token-env: environment variable {args.token_env} is not set or empty", USAGE_ERROR
        )
    return value


def _check_listen(url: str, token: str | None) -> Address:
    """Refuse, as usage errors, a listen address that cannot work, before any import."""
    from rapace.streams._net import parse_address

    try:
        address = parse_address(url)
    except ValueError as exc:
        raise CliError(f"--listen: {exc}", USAGE_ERROR) from None
    if address.scheme in ("tcp", "ws") and token is None:
        raise CliError(
            f"a {address.scheme}:// listener requires a token: pass --token-env VAR "
            "(or --token TOKEN)",
            USAGE_ERROR,
        )
    return address


def _construct(cls: type, kwargs: dict[str, object]) -> object:
    """``cls(**kwargs)``, with a failure reported as a :class:`CliError`."""
    try:
        return cls(**kwargs)
    except Exception as exc:
        shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        what = f"{cls.__qualname__}({shown}) failed"
        if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
            # Raised by the call itself (an unknown keyword, a missing argument), not from
            # inside __init__: the message says it all.
            raise CliError(f"{what}: {exc}") from None
        user_code_failed(what)


def _serve(impl: object, listen: Address, token: str | None) -> str | None:
    """Serve until SIGINT or SIGTERM; the reason it could not listen, or None."""
    import anyio

    def report(bound: Address) -> None:
        write_err(f"listening on {bound}")

    return anyio.run(_serve_until_signalled, impl, listen, token, report)


async def _serve_until_signalled(
    impl: object, listen: Address, token: str | None, report: Callable[[Address], None]
) -> str | None:
    """Listen, ``report`` the bound address, and serve until the first SIGINT or SIGTERM;
    return why listening failed, or None. Failing to listen is returned rather than raised
    so that it does not leave the task group wrapped in an ExceptionGroup."""
    from functools import partial

    import anyio

    from rapace._connect import serve_async

    async with anyio.create_task_group() as tg:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                bound = await tg.start(partial(serve_async, impl, listen=str(listen), token=token))
            except OSError as exc:
                return _listen_failure(listen, exc)
            report(bound)
            async for _ in signals:
                break
        # The handlers are restored by now: a second Ctrl-C interrupts a slow shutdown.
        tg.cancel_scope.cancel()
    return None


def _listen_failure(listen: Address, exc: OSError) -> str:
    """The one-line reason a listener could not be created, with a hint where one helps."""
    message = f"cannot listen on {listen}: {exc.strerror or exc}"
    if listen.scheme == "unix" and exc.errno == errno.EADDRINUSE:
        # A server that was killed (SIGKILL) leaves its socket file behind.
        message += f" (is another server running? if not, remove {listen.path})"
    return message
