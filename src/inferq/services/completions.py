"""CompletionService: an OpenAI-style call — submit, then wait for the answer or follow its
stream — and what happens to its task when the call cannot deliver the answer.

- The call's wait slot is taken before the task is written (a 429 leaves nothing behind) and
  held until the answer or the stream ends.
- **Reattach.** A call with an ``Idempotency-Key`` submits like the native API: a retry with
  the same key, on any replica, finds the same task and waits for (or streams) it; a finished
  task answers at once. So such a task is never cancelled because one call of it failed.
- **Abandon.** A call without a key that ends without its answer — a timeout, the end of a
  drain's grace, a database that stayed away, no worker — cancels its task: nobody can come
  back for it, and a retry would otherwise generate a second time. A client that disconnects
  outside a drain cancels its task too (key or not: it chose to leave); inside a drain it
  does not, since the load balancer or the replica closing is what cut it.
  INFERQ_CANCEL_ON_DISCONNECT=false turns every cancellation off.
- **No worker.** A call waits up to INFERQ_NO_WORKER_WAIT_S for a worker to take the task;
  if by then no live worker session serves the pool, it fails fast with 503
  ``no_worker_available`` (and is abandoned as above) instead of hanging for minutes. Native
  tasks are durable and keep waiting.
- Every error after the task exists names it (``task_id``: the X-Inferq-Task-Id header).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import structlog

from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.lanes import DEFAULT_LANE
from inferq.domain.quotas import RateLimits
from inferq.domain.records import ApiToken
from inferq.domain.task import Task, TaskStatus
from inferq.errors import (
    ClientGone,
    DatabaseUnavailable,
    InferqError,
    InvalidTransition,
    NoWorkerAvailable,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    WaitTimeout,
)
from inferq.metrics import Metrics
from inferq.services.drain import Drain
from inferq.services.limits import WaitSlots
from inferq.services.tasks import Following, Gone, Submission, TaskService
from inferq.services.waits import WaitService
from inferq.settings import Settings

log = structlog.get_logger(__name__)

Abandon = Callable[[], Awaitable[None]]

# How long a cancellation of an abandoned task is retried while the database is away.
CANCEL_RETRY_S = 30.0
# How long "a live session serves this pool" is remembered per replica.
SERVED_CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class Call:
    """One OpenAI call in flight."""

    token: ApiToken
    task_id: UUID
    keyed: bool  # it carried an Idempotency-Key: its retry reattaches
    service: CompletionService
    limits: RateLimits | None = None  # the token's rate windows (x-ratelimit-* headers)

    async def abandon(self) -> None:
        """Cancel the task when nobody can come back for it (see the module docstring)."""
        if not self.keyed:
            await self.service.cancel(self)

    async def left(self) -> None:
        """The client disconnected: cancel its task, unless a drain is what cut it."""
        if not self.service.drain.draining:
            await self.service.cancel(self)


class CompletionService:
    """One per replica; see the module docstring."""

    def __init__(
        self,
        tasks: TaskService,
        repository: TaskRepository,
        sessions: WorkerSessionRepository,
        waits: WaitService,
        *,
        settings: Settings,
        drain: Drain,
        slots: WaitSlots,
        metrics: Metrics,
    ) -> None:
        self.tasks = tasks
        self.repository = repository
        self.sessions = sessions
        self.waits = waits
        self.settings = settings
        self.drain = drain
        self.slots = slots
        self.metrics = metrics
        self._cancels: set[asyncio.Task[None]] = set()
        self._served_until: dict[str, float] = {}

    async def start(
        self,
        token: ApiToken,
        body: dict[str, Any],
        *,
        model: str,
        stream: bool,
        key: str | None,
        lane: str = DEFAULT_LANE,
    ) -> Call:
        """Take a wait slot and submit ``body`` (or find the task of ``key``); the caller then
        calls ``answer`` or ``follow``, which free the slot."""
        self.slots.acquire(token)
        try:
            submission = Submission(
                body, model=model, streaming=stream, idempotency_key=key, lane=lane
            )
            enqueued = await self.tasks.submit(token, submission)
        except BaseException:
            self.slots.release(token)
            raise
        return Call(token, enqueued.task.id, key is not None, self, enqueued.limits)

    async def answer(self, call: Call, *, gone: Gone | None = None) -> Task:
        """The completed task. Raises TaskFailed, TaskCancelled, WaitTimeout, ShuttingDown,
        NoWorkerAvailable, DatabaseUnavailable, ClientGone, TokenRevoked, TaskNotFound — each
        carrying the
        task's id, the task abandoned as the module docstring says."""
        started = time.perf_counter()
        try:
            task = await self._claimed_or_fail(call, gone)
            if not task.terminal:
                left_s = self.settings.max_wait_s - (time.perf_counter() - started)
                task = await self.drain.guarded(
                    self.waits.wait_terminal(call.task_id, left_s, owner_id=call.token.owner_id),
                    gone=gone,
                    on_gone=call.left,
                    token_id=call.token.id,
                )
            return _completed(task, self.settings.max_wait_s)
        except ClientGone as exc:
            exc.task_id = call.task_id
            raise
        except InferqError as exc:
            exc.task_id = call.task_id
            if not isinstance(exc, TaskFailed | TaskCancelled | TaskNotFound):
                await call.abandon()
            raise
        finally:
            self.slots.release(call.token)
            self.metrics.wait_seconds.labels("sync").observe(time.perf_counter() - started)

    async def follow(self, call: Call, *, gone: Gone | None = None) -> Following:
        """The task's events, the first one read, once a worker took the task (or a live
        session serves its pool); ``Following.close`` frees the slot."""
        try:
            await self._claimed_or_fail(call, gone)
            events = self.waits.events(call.task_id, owner_id=call.token.owner_id)
            first = await self.drain.guarded(anext(events), token_id=call.token.id)
        except BaseException as exc:
            self.slots.release(call.token)
            if isinstance(exc, InferqError):
                exc.task_id = call.task_id
                if not isinstance(exc, ClientGone | TaskNotFound):
                    await call.abandon()
            raise
        revoked = self.drain.revocation(call.token.id)
        return Following(first, events, lambda: self.slots.release(call.token), revoked)

    async def _claimed_or_fail(self, call: Call, gone: Gone | None) -> Task:
        """The task, once it is known that a worker will take it: at once when a live session
        serves its pool (busy workers are waited for), else when a worker took it within
        INFERQ_NO_WORKER_WAIT_S. Raises NoWorkerAvailable when none did."""
        owner = call.token.owner_id
        task = await self.waits.wait_claimed(call.task_id, 0, owner_id=owner)
        if task.status is not TaskStatus.PENDING or await self._served(task.pool_name):
            return task
        wait_s = min(self.settings.no_worker_wait_s, self.settings.max_wait_s)
        task = await self.drain.guarded(
            self.waits.wait_claimed(call.task_id, wait_s, owner_id=owner),
            gone=gone,
            on_gone=call.left,
            token_id=call.token.id,
        )
        if task.status is TaskStatus.PENDING and not await self._served(task.pool_name):
            raise NoWorkerAvailable(
                f"no worker serves pool {task.pool_name!r} (waited {wait_s:g} s, "
                "INFERQ_NO_WORKER_WAIT_S); retry later",
                retry_after_s=max(1.0, wait_s),
            )
        return task

    async def _served(self, pool: str) -> bool:
        """Whether a live worker session serves ``pool``; a yes is remembered for a second
        (a worker that serves a pool keeps serving it), a no is asked again each time."""
        now = time.monotonic()
        if self._served_until.get(pool, 0.0) > now:
            return True
        if not await self.sessions.serves(pool):
            return False
        if len(self._served_until) > 10_000:
            self._served_until.clear()
        self._served_until[pool] = now + SERVED_CACHE_S
        return True

    async def cancel(self, call: Call) -> None:
        """Cancel the call's task (when INFERQ_CANCEL_ON_DISCONNECT allows); while the
        database is away, keep trying in the background for a while."""
        if not self.settings.cancel_on_disconnect:
            return
        try:
            await self._cancel(call)
        except DatabaseUnavailable:
            retry = asyncio.create_task(self._cancel_later(call))
            self._cancels.add(retry)
            retry.add_done_callback(self._cancels.discard)

    async def _cancel(self, call: Call) -> None:
        # It may have ended meanwhile: then there is nothing to cancel.
        with contextlib.suppress(InvalidTransition, TaskNotFound):
            await self.repository.cancel(
                call.task_id, call.token.owner_id, "the client went away before the answer"
            )

    async def _cancel_later(self, call: Call) -> None:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + CANCEL_RETRY_S
        while loop.time() < give_up:
            await asyncio.sleep(1.0)
            try:
                await self._cancel(call)
                return
            except DatabaseUnavailable:
                continue
        log.warning("task_not_cancelled", task_id=str(call.task_id), reason="database away")


def _completed(task: Task, waited_s: float) -> Task:
    if task.status is TaskStatus.COMPLETED:
        return task
    if task.status is TaskStatus.CANCELLED:
        raise TaskCancelled(task.error_message or f"task {task.id} was cancelled", task=task)
    if task.status is TaskStatus.ERROR:
        raise TaskFailed(task.error_message or f"task {task.id} failed", task=task)
    raise WaitTimeout(f"task {task.id} is still {task.status} after {waited_s:g} s", task=task)
