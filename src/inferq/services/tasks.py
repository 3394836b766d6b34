"""TaskService: the client's use cases of the native task API — submit, get, list, cancel,
wait and follow — scoped to the caller's owner.

Submission routes by registry name (``model``) or directly (``pool``), refuses new work while
the replica drains and when the owner has too many pending tasks, and inserts the row (an
``Idempotency-Key`` returns the first task). Waits and streams take one of the token's open
slots for as long as they last; a client that leaves frees it at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any
from uuid import UUID

from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.lanes import DEFAULT_LANE
from inferq.domain.records import ApiToken, Enqueued, Llm, Page
from inferq.domain.task import Task, TaskStatus
from inferq.errors import Forbidden, InvalidRequest
from inferq.metrics import Metrics
from inferq.services.caps import check_request
from inferq.services.drain import Drain
from inferq.services.limits import PendingLimiter, WaitSlots
from inferq.services.quotas import QuotaService
from inferq.services.registry import Registry
from inferq.services.waits import Event, WaitService
from inferq.settings import Settings

Gone = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Submission:
    """What a client asks to run: a registry ``model`` or a ``pool``, and the request."""

    request_body: dict[str, Any]
    model: str | None = None
    pool: str | None = None
    streaming: bool = False
    agent_id: str | None = None
    priority: int = 0
    max_attempts: int | None = None
    idempotency_key: str | None = None
    lane: str = DEFAULT_LANE  # inferq.domain.lanes


@dataclass(frozen=True, slots=True)
class Following:
    """An open event stream: its first event, the rest, ``close`` to free its slot, and
    ``revoked``, set when the caller's token is revoked (the stream must then end)."""

    first: Event
    rest: AsyncIterator[Event]
    close: Callable[[], None]
    revoked: asyncio.Event | None = None


class TaskService:
    """One per replica; see the module docstring."""

    def __init__(
        self,
        tasks: TaskRepository,
        sessions: WorkerSessionRepository,
        registry: Registry,
        waits: WaitService,
        *,
        settings: Settings,
        drain: Drain,
        slots: WaitSlots,
        pending: PendingLimiter,
        metrics: Metrics,
        quotas: QuotaService | None = None,
    ) -> None:
        self.tasks = tasks
        self.sessions = sessions
        self.registry = registry
        self.waits = waits
        self.settings = settings
        self.drain = drain
        self.slots = slots
        self.pending = pending
        self.metrics = metrics
        self.quotas = quotas

    async def submit(self, token: ApiToken, submission: Submission) -> Enqueued:
        """Route and enqueue. Raises ShuttingDown, Forbidden (a lane or priority the token may
        not use), TooManyPending, UnknownModel, InvalidRequest, AboveCap
        (inferq.services.caps), IdempotencyConflict, QuotaExceeded."""
        self.drain.check()
        refusal = token.policy.refusal(submission.lane, submission.priority)
        if refusal is not None:
            raise Forbidden(refusal)
        key = submission.idempotency_key
        if key is not None and not 1 <= len(key) <= 255:
            raise InvalidRequest(
                "Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key"
            )
        llm = await self.registry.resolve(submission.model) if submission.model else None
        check_request(submission.request_body, llm, self.settings)  # 400 above a cap
        pool_name = llm.pool_name if llm is not None else submission.pool
        if pool_name is None:
            raise InvalidRequest("name a `model` (or `llm`) or a `pool`", param="model")
        await self.pending.check(token.owner_id)
        # The token's quotas (inferq.services.quotas): a 429 here leaves nothing behind.
        limits = await self.quotas.admit(token) if self.quotas is not None else None
        enqueued = await self.tasks.enqueue(
            owner_id=token.owner_id,
            pool_name=pool_name,
            request_body=submission.request_body,
            llm_name=llm.name if llm else None,
            model=llm.model if llm else None,
            tier=llm.tier if llm else None,
            streaming=submission.streaming,
            agent_id=submission.agent_id,
            priority=submission.priority,
            max_attempts=submission.max_attempts or self.settings.max_attempts,
            idempotency_key=key,
            lane=submission.lane,
            token_id=token.id,
        )
        if enqueued.created:
            self.metrics.submitted.labels(self.metrics.pool_label(pool_name)).inc()
        return replace(enqueued, limits=limits) if limits is not None else enqueued

    async def models(self) -> list[Llm]:
        """The registry, for clients (``GET /v1/models``)."""
        return await self.registry.all()

    async def model(self, name: str) -> Llm:
        """One registry entry; raises UnknownModel."""
        return await self.registry.resolve(name)

    async def get(self, token: ApiToken, task_id: UUID) -> tuple[Task, bool]:
        """The caller's task, and whether it is pending with no live worker serving its pool
        (``waiting_for_worker``); raises TaskNotFound (also for another owner's)."""
        task = await self.tasks.get(task_id, token.owner_id)
        waiting = task.status is TaskStatus.PENDING and not await self.sessions.serves(
            task.pool_name
        )
        return task, waiting

    async def list(
        self,
        token: ApiToken,
        *,
        statuses: Sequence[TaskStatus] | None = None,
        agent_id: str | None = None,
        pool: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """The caller's tasks, newest first; raises InvalidRequest for a foreign cursor."""
        try:
            return await self.tasks.list_tasks(
                token.owner_id,
                statuses=statuses,
                agent_id=agent_id,
                pool_name=pool,
                limit=limit,
                cursor=cursor,
            )
        except ValueError:
            raise InvalidRequest(
                "invalid cursor; pass next_cursor as given", param="cursor"
            ) from None

    async def cancel(self, token: ApiToken, task_id: UUID) -> Task:
        """Cancel the caller's task (idempotent); raises TaskNotFound, InvalidTransition."""
        return await self.tasks.cancel(task_id, token.owner_id)

    async def wait(
        self, token: ApiToken, task_id: UUID, timeout_s: float, *, gone: Gone | None = None
    ) -> Task:
        """The task once terminal, or as it is at the deadline (never raises on timeout).
        Raises TaskNotFound, TooManyWaits, ShuttingDown; ClientGone when ``gone`` returns;
        InvalidRequest for a timeout past INFERQ_MAX_WAIT_S (never silently shortened);
        TokenRevoked when the token is revoked meanwhile."""
        self.drain.check()
        if not 0 <= timeout_s <= self.settings.max_wait_s:
            raise InvalidRequest(
                f"timeout must be between 0 and {self.settings.max_wait_s:g} seconds "
                "(INFERQ_MAX_WAIT_S); wait again for longer",
                param="timeout",
            )
        self.slots.acquire(token)
        try:
            return await self.drain.guarded(
                self.waits.wait_terminal(task_id, timeout_s, owner_id=token.owner_id),
                gone=gone,
                token_id=token.id,
            )
        finally:
            self.slots.release(token)

    async def follow(
        self, token: ApiToken, task_id: UUID, after: tuple[int, int] | None = None
    ) -> Following:
        """The task's events from ``after`` (attempt, seq), its first one already read so that
        TaskNotFound is raised here. The caller must ``close()`` the Following."""
        self.drain.check()
        self.slots.acquire(token)
        try:
            events = self.waits.events(task_id, owner_id=token.owner_id, after=after)
            first = await self.drain.guarded(anext(events), token_id=token.id)
        except BaseException:
            self.slots.release(token)
            raise
        revoked = self.drain.revocation(token.id)
        return Following(first, events, lambda: self.slots.release(token), revoked)
