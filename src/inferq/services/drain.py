"""Drain: the replica's shutdown switch, and ``guarded()``, which races a wait against it and
against the client leaving.

``guarded`` runs the work in the caller's own task; the drain and the disconnect watcher
cancel that task and say why (``Interruption.reason``), so an open wait costs its request task
and one small watcher task instead of a task per racer. Someone else's cancellation (the
server stopping) stays a cancellation. The watcher is any coroutine that returns when the
client is gone (the HTTP layer passes one that reads ``http.disconnect``), so this module
knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from inferq.errors import ClientGone, ShuttingDown

T = TypeVar("T")

DRAINED = "drained"
GONE = "gone"


class Interruption:
    """Ends one guarded wait from outside; ``reason`` says why (DRAINED or GONE)."""

    __slots__ = ("reason", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.reason: str | None = None

    def interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()


class Drain:
    """The replica's shutdown switch: /readyz turns red, new work is refused, waits end."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        self.draining = False
        self.retry_after_s = retry_after_s
        self.event = asyncio.Event()
        self._waits: set[Interruption] = set()

    def start(self) -> None:
        self.draining = True
        self.event.set()
        for wait in list(self._waits):
            wait.interrupt(DRAINED)

    def check(self) -> None:
        """Raise ShuttingDown (503 + Retry-After) once draining."""
        if self.draining:
            raise ShuttingDown(retry_after_s=self.retry_after_s)

    async def guarded(
        self,
        work: Awaitable[T],
        *,
        gone: Callable[[], Awaitable[None]] | None = None,
        on_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> T:
        """``work``'s result, unless the replica drains first (ShuttingDown) or ``gone()``
        returns first (ClientGone, after awaiting ``on_gone``)."""
        if self.draining:
            _close(work)
            raise ShuttingDown(retry_after_s=self.retry_after_s)
        task = asyncio.current_task()
        assert task is not None
        stop = Interruption(task)
        self._waits.add(stop)
        watcher = asyncio.ensure_future(_watch(gone, stop)) if gone is not None else None
        try:
            result = await work
        except asyncio.CancelledError:
            if stop.reason is None or task.uncancel() > 0:
                raise
            if stop.reason == GONE:
                if on_gone is not None:
                    await on_gone()
                raise ClientGone() from None
            raise ShuttingDown(retry_after_s=self.retry_after_s) from None
        finally:
            self._waits.discard(stop)
            if watcher is not None:
                watcher.cancel()
        if stop.reason is not None:
            task.uncancel()  # the work swallowed the cancellation and ended anyway
        return result


def _close(work: Awaitable[Any]) -> None:
    close = getattr(work, "close", None)
    if close is not None:
        close()


async def _watch(gone: Callable[[], Awaitable[None]], stop: Interruption) -> None:
    await gone()
    stop.interrupt(GONE)
