"""CompletionService: an OpenAI-style call — submit, then wait for the answer or follow its
stream — with what happens to the task when nobody can read the answer any more.

The call's wait slot is taken before the task is written (a 429 leaves nothing behind) and
held until the answer or the stream ends. A client that goes away, a sync call that times out,
and a call cut short by shutdown all cancel the task when INFERQ_CANCEL_ON_DISCONNECT is on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from inferq.db.tasks import TaskRepository
from inferq.domain.records import ApiToken
from inferq.domain.task import Task
from inferq.errors import (
    InvalidTransition,
    ShuttingDown,
    TaskNotFound,
    TokenRevoked,
    WaitTimeout,
)
from inferq.metrics import Metrics
from inferq.services.drain import Drain
from inferq.services.limits import WaitSlots
from inferq.services.tasks import Following, Gone, Submission, TaskService
from inferq.services.waits import WaitService
from inferq.settings import Settings

Abandon = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Call:
    """One OpenAI call in flight: its task, and ``abandon`` (None when the task must run on
    whatever happens to its caller)."""

    token: ApiToken
    task_id: UUID
    abandon: Abandon | None


class CompletionService:
    """One per replica; see the module docstring."""

    def __init__(
        self,
        tasks: TaskService,
        repository: TaskRepository,
        waits: WaitService,
        *,
        settings: Settings,
        drain: Drain,
        slots: WaitSlots,
        metrics: Metrics,
    ) -> None:
        self.tasks = tasks
        self.repository = repository
        self.waits = waits
        self.settings = settings
        self.drain = drain
        self.slots = slots
        self.metrics = metrics

    async def start(
        self, token: ApiToken, body: dict[str, Any], *, model: str, stream: bool, key: str | None
    ) -> Call:
        """Take a wait slot and submit ``body``; the caller then calls ``answer`` or
        ``follow``, which free the slot."""
        self.slots.acquire(token)
        try:
            submission = Submission(body, model=model, streaming=stream, idempotency_key=key)
            enqueued = await self.tasks.submit(token, submission)
        except BaseException:
            self.slots.release(token)
            raise
        return Call(token, enqueued.task.id, self._abandon(token, enqueued.task.id))

    async def answer(self, call: Call, *, gone: Gone | None = None) -> Task:
        """The completed task. Raises TaskFailed, TaskCancelled, WaitTimeout (the task is
        then abandoned), ShuttingDown (likewise), ClientGone (likewise), TokenRevoked
        (likewise), TaskNotFound."""
        started = time.perf_counter()
        try:
            return await self.drain.guarded(
                self.waits.wait_for(
                    call.task_id, self.settings.max_wait_s, owner_id=call.token.owner_id
                ),
                gone=gone,
                on_gone=call.abandon,
                token_id=call.token.id,
            )
        except (WaitTimeout, ShuttingDown, TokenRevoked):
            if call.abandon is not None:
                await call.abandon()
            raise
        finally:
            self.slots.release(call.token)
            self.metrics.wait_seconds.labels("sync").observe(time.perf_counter() - started)

    async def follow(self, call: Call) -> Following:
        """The task's events, the first one read; ``Following.close`` frees the slot."""
        try:
            events = self.waits.events(call.task_id, owner_id=call.token.owner_id)
            first = await self.drain.guarded(anext(events), token_id=call.token.id)
        except BaseException:
            self.slots.release(call.token)
            raise
        revoked = self.drain.revocation(call.token.id)
        return Following(first, events, lambda: self.slots.release(call.token), revoked)

    def _abandon(self, token: ApiToken, task_id: UUID) -> Abandon | None:
        """Cancel the task nobody will read (None when INFERQ_CANCEL_ON_DISCONNECT=false)."""
        if not self.settings.cancel_on_disconnect:
            return None

        async def cancel() -> None:
            # It may have ended meanwhile: then there is nothing to cancel.
            with contextlib.suppress(InvalidTransition, TaskNotFound):
                await self.repository.cancel(
                    task_id, token.owner_id, "the client went away before the answer"
                )

        return cancel
