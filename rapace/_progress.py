"""A progress bar for ``pool.map(..., progress=True)``, sync or async.

tqdm (``tqdm.auto``: a widget in notebooks, text in terminals) when it is installed; without
it, one self-rewriting line on stderr, redrawn at most ten times a second.
"""

from __future__ import annotations

import importlib
import sys
import time
from typing import Any

__all__ = ("ProgressBar", "progress_bar")


class ProgressBar:
    """``update(n)`` as results are handed out, ``close()`` once (idempotent)."""

    def update(self, n: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def progress_bar(total: int, description: str) -> ProgressBar:
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm  # optional: not a dependency
    except ImportError:
        return _Line(total, description)
    return _Tqdm(tqdm(total=total, desc=description, unit="call"))


class _Tqdm(ProgressBar):
    def __init__(self, bar: Any) -> None:
        self._bar = bar
        self._closed = False

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._bar.close()


class _Line(ProgressBar):
    def __init__(self, total: int, description: str) -> None:
        self._total = total
        self._description = description
        self._done = 0
        self._last = 0.0
        self._closed = False

    def update(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._last >= 0.1 or self._done == self._total:
            self._last = now
            sys.stderr.write(f"\r{self._description}: {self._done}/{self._total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._done:
            sys.stderr.write("\n")
            sys.stderr.flush()
