"""Drain: the replica's shutdown switch, and ``guarded()``, which races a wait against it,
against the client leaving and against its token being revoked.

A drain never cancels work a client can come back for. When it starts, new work is refused
(503 + Retry-After), /readyz turns red and worker long-polls end at once (their workers claim
from another replica); the waits and streams already open keep going for ``grace_s``
(INFERQ_DRAIN_GRACE_S) so that most answers arrive here. Past the grace they end with 503 (a
stream with a retryable error frame); what then happens to their task is the caller's choice
(inferq.services.completions keeps a task whose request carried an Idempotency-Key, so its
retry reattaches, and cancels the others, which nobody can come back for).

``guarded`` runs the work in the caller's own task; the drain and the disconnect watcher
cancel that task and say why (``Interruption.reason``), so an open wait costs its request task
and one small watcher task instead of a task per racer. Someone else's cancellation (the
server stopping) stays a cancellation. The watcher is any coroutine that returns when the
client is gone (the HTTP layer passes one that reads ``http.disconnect``), so this module
knows nothing of HTTP.

Revocation (``revoke(token_id)``, subscribed to Authenticator.revoked): the token's guarded
waits end with TokenRevoked, found through a per-token index (no task per wait), and the
``revocation(token_id)`` events of its streams are set, so the stream can send its last frame.
A wait or stream that starts for a token revoked a moment before ends at once.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

from inferq.errors import ClientGone, ShuttingDown, TokenRevoked

T = TypeVar("T")

DRAINED = "drained"
GONE = "gone"
REVOKED = "revoked"


class Interruption:
    """Ends one guarded wait from outside; ``reason`` says why (DRAINED, GONE or REVOKED)."""

    __slots__ = ("reason", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.reason: str | None = None

    def interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.task.cancel()


class Drain:
    """The replica's shutdown switch (see the module docstring)."""

    def __init__(
        self,
        grace_s: float = 30.0,
        retry_after_s: float = 1.0,
        is_revoked: Callable[[UUID], bool] | None = None,
    ) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.expired = False
        self.retry_after_s = retry_after_s
        self.event = asyncio.Event()  # set when the drain starts
        self.expired_event = asyncio.Event()  # set when the grace is over
        self.is_revoked = is_revoked or (lambda token_id: False)
        self._waits: set[Interruption] = set()  # interrupted when the grace is over
        self._now: set[Interruption] = set()  # interrupted when the drain starts
        self._timer: asyncio.TimerHandle | None = None
        self._by_token: dict[UUID, set[Interruption]] = {}
        self._revocations: weakref.WeakValueDictionary[UUID, asyncio.Event] = (
            weakref.WeakValueDictionary()
        )

    def start(self, grace_s: float | None = None) -> None:
        """Start draining; open waits end ``grace_s`` later (idempotent)."""
        if self.draining:
            return
        self.draining = True
        self.event.set()
        for wait in list(self._now):
            wait.interrupt(DRAINED)
        grace = self.grace_s if grace_s is None else grace_s
        self._timer = asyncio.get_running_loop().call_later(grace, self.expire)

    def expire(self) -> None:
        """End every open wait now (the grace is over, or the process must stop)."""
        if not self.draining:
            self.start(0)
            return
        if self._timer is not None:
            self._timer.cancel()
        self.expired = True
        self.expired_event.set()
        for wait in list(self._waits):
            wait.interrupt(DRAINED)

    def revoke(self, token_id: UUID) -> None:
        """End the token's guarded waits (TokenRevoked) and signal its streams."""
        for wait in list(self._by_token.get(token_id, ())):
            wait.interrupt(REVOKED)
        event = self._revocations.get(token_id)
        if event is not None:
            event.set()

    def revocation(self, token_id: UUID) -> asyncio.Event:
        """An event set when ``token_id`` is revoked (already set when it was), for a stream
        to race; it lives as long as someone holds it."""
        event = self._revocations.get(token_id)
        if event is None:
            event = self._revocations[token_id] = asyncio.Event()
        if self.is_revoked(token_id):
            event.set()
        return event

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
        at_start: bool = False,
        token_id: UUID | None = None,
    ) -> T:
        """``work``'s result, unless the drain's grace runs out first (ShuttingDown; with
        ``at_start``, as soon as the drain starts), ``gone()`` returns first (ClientGone,
        after awaiting ``on_gone``) or ``token_id`` is revoked first (TokenRevoked)."""
        if self.expired or (at_start and self.draining):
            _close(work)
            raise ShuttingDown(retry_after_s=self.retry_after_s)
        if token_id is not None and self.is_revoked(token_id):
            _close(work)
            raise TokenRevoked("this token was revoked")
        task = asyncio.current_task()
        assert task is not None
        stop = Interruption(task)
        watched = self._now if at_start else self._waits
        watched.add(stop)
        if token_id is not None:
            self._by_token.setdefault(token_id, set()).add(stop)
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
            if stop.reason == REVOKED:
                raise TokenRevoked("this token was revoked while the request waited") from None
            raise ShuttingDown(retry_after_s=self.retry_after_s) from None
        finally:
            watched.discard(stop)
            if token_id is not None:
                held = self._by_token.get(token_id)
                if held is not None:
                    held.discard(stop)
                    if not held:
                        del self._by_token[token_id]
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
