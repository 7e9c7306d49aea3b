"""A progress bar for ``pool.map(..., progress=True)``.

tqdm (``tqdm.auto``: a widget in notebooks, text in terminals) when it is installed; without
it, one self-rewriting line on stderr, redrawn at most ten times a second.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator
from typing import Any, TypeVar

__all__ = ("with_progress",)

T = TypeVar("T")


def with_progress(results: Iterator[T], total: int, description: str) -> Iterator[T]:
    try:
        tqdm = importlib.import_module("tqdm.auto").tqdm  # optional: not a dependency
    except ImportError:
        return _plain(results, total, description)
    return _tqdm(tqdm, results, total, description)


def _tqdm(tqdm: Any, results: Iterator[T], total: int, description: str) -> Iterator[T]:
    with tqdm(total=total, desc=description, unit="call") as bar:
        for result in results:
            bar.update(1)
            yield result


def _plain(results: Iterator[T], total: int, description: str) -> Iterator[T]:
    done = 0
    last = 0.0
    try:
        for result in results:
            done += 1
            now = time.monotonic()
            if now - last >= 0.1 or done == total:
                last = now
                sys.stderr.write(f"\r{description}: {done}/{total}")
                sys.stderr.flush()
            yield result
    finally:
        if done:
            sys.stderr.write("\n")
            sys.stderr.flush()
