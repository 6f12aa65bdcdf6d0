"""Waiting for a condition that another process makes true, bounded in time.

Tests never sleep to synchronise; where the only way to learn that something happened is to
look (a DHT record appearing, a receipt stored by a node process), they poll a predicate with
one of these, which fail with what they were waiting for once the bound has passed.
"""

from __future__ import annotations

import inspect
import time
from typing import Awaitable, Callable, TypeVar

import trio

T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], *, what: str, timeout_s: float = 30.0,
                     interval_s: float = 0.1) -> T:
    """The first truthy value of ``check()`` (sync or async), polled every ``interval_s``;
    AssertionError naming ``what`` and the last value after ``timeout_s``."""
    last: object = None
    with trio.move_on_after(timeout_s):
        while True:
            last = check()
            if inspect.isawaitable(last):
                last = await last
            if last:
                return last  # type: ignore[return-value]
            await trio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


def eventually_sync(check: Callable[[], T], *, what: str, timeout_s: float = 30.0,
                    interval_s: float = 0.1) -> T:
    """``eventually`` for code outside trio (threads, plain pytest functions)."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)
