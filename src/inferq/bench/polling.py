"""wait_until and eventually: poll a predicate against a deadline (the bench and the tests).

Polling is for state no event announces (a gauge, a row, another process's log); where an
event does, ``eventually`` takes it as ``changed`` and re-checks on each signal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias, TypeVar, overload

T = TypeVar("T")

# What is awaited, for the timeout's message: a text, or a function giving one (read at the
# deadline, so it can say what was seen last).
What: TypeAlias = str | Callable[[], str]


def wait_until(predicate: Callable[[], T | None], timeout_s: float = 30.0, what: What = "it") -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Checks every 20 ms at first, backing off to every 250 ms, and once more at the deadline.
    Raises TimeoutError naming ``what`` after ``timeout_s``; what ``predicate`` raises
    propagates at once.
    """
    deadline = time.monotonic() + timeout_s
    period_s = 0.02
    while True:
        value = predicate()
        if value:
            return value
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise _timed_out(timeout_s, what)
        time.sleep(min(period_s, left_s))  # the period of a deadline loop, not a wait for an event
        period_s = min(period_s * 1.5, 0.25)


@overload
async def eventually(
    predicate: Callable[[], Awaitable[T | None]],
    timeout_s: float = ...,
    what: What = ...,
    *,
    period_s: float = ...,
    changed: asyncio.Event | None = ...,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T | None],
    timeout_s: float = ...,
    what: What = ...,
    *,
    period_s: float = ...,
    changed: asyncio.Event | None = ...,
) -> T: ...


async def eventually(
    predicate: Callable[[], object],
    timeout_s: float = 10.0,
    what: What = "the condition",
    *,
    period_s: float = 0.01,
    changed: asyncio.Event | None = None,
) -> object:
    """Call ``predicate`` (a function, or a coroutine function) until it gives something
    truthy, and return that.

    Re-checks every ``period_s``, or, given ``changed``, each time that event is set (and at
    the deadline). Raises TimeoutError naming ``what`` after ``timeout_s``; what ``predicate``
    raises propagates at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if changed is not None:
            changed.clear()  # before the check, so a change made while it runs is not missed
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise _timed_out(timeout_s, what)
        if changed is None:
            await asyncio.sleep(min(period_s, left_s))
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left_s)


def _timed_out(timeout_s: float, what: What) -> TimeoutError:
    return TimeoutError(
        f"timed out after {timeout_s:g}s waiting for {what() if callable(what) else what}"
    )
