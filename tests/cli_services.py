"""Services for the ``rapace`` command-line tests (``rapace inspect`` and ``rapace serve``).

``Greeter`` is an interface with every call shape, a keyword-only parameter with a default
and a plain ``def``; ``Impl`` implements it and takes constructor keyword arguments (for
``rapace serve --args``). ``Outer.Nested`` checks dotted class names; ``NotAService`` and
``helper`` are the wrong things to name.
"""

from __future__ import annotations

import rapace
from rapace import Streaming


@rapace.service
class Greeter:
    async def greet(self, name: str, *, punctuation: str = "!") -> str:
        raise NotImplementedError

    async def count(self, n: int) -> Streaming[int]:
        raise NotImplementedError
        yield 0  # an async generator, as an implementation is

    async def total(self, xs: Streaming[int]) -> int:
        raise NotImplementedError

    async def scale(self, xs: Streaming[float], k: float) -> Streaming[float]:
        raise NotImplementedError
        yield 0.0

    def shout(self, text: str) -> str:
        raise NotImplementedError


class Impl(Greeter):
    """Greets with ``greeting`` (``rapace serve ... --args '{"greeting": "hi"}'``)."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    async def greet(self, name: str, *, punctuation: str = "!") -> str:
        return f"{self.greeting}, {name}{punctuation}"

    async def count(self, n: int) -> Streaming[int]:
        for i in range(n):
            yield i

    async def total(self, xs: Streaming[int]) -> int:
        return sum([x async for x in xs])

    async def scale(self, xs: Streaming[float], k: float) -> Streaming[float]:
        async for x in xs:
            yield x * k

    def shout(self, text: str) -> str:
        return text.upper()


class Outer:
    @rapace.service
    class Nested:
        async def ping(self) -> None:
            pass


class NotAService:
    async def ping(self) -> None:
        pass


def helper() -> None:
    """Not a class at all."""
