"""ClaimService: a worker's use cases — bind, claim (long-poll), heartbeat, unbind; start,
chunks, complete, fail, release; outcomes (many completes and fails in one statement).

A worker token binds only the pools its token lists (Forbidden otherwise) and only sees its
owner's sessions (another owner's session is SessionNotFound, like a missing one). Which
owner and pools a session has is remembered per replica; whether it is still alive is
vouched for by the guarded statement each write runs anyway. Task writes are guarded in the
database by (session, attempt): a stale writer gets LeaseLost carrying the current task. A
refusal that would show a task of a pool this token may not serve is TaskNotFound instead.

A claim hands a task over with a short lease, INFERQ_CLAIM_ACK_S: the worker acknowledges it
by starting it, by naming it in a heartbeat, or by ending it, and only then gets the full
INFERQ_LEASE_S. A worker frozen with a long-poll open (the answer sits in its socket buffer)
therefore loses those tasks to the rescuer a few seconds later, not a whole lease later.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.records import ApiToken, Finished, Heartbeat, Outcome, WorkerSession
from inferq.domain.task import Task
from inferq.errors import SessionNotFound, ShuttingDown, TaskError, TaskNotFound
from inferq.metrics import Metrics
from inferq.services.auth import check_pools
from inferq.services.drain import Drain
from inferq.services.relay import ChunkRelay
from inferq.services.tasks import Gone
from inferq.services.usage import UsageMeter
from inferq.services.waits import WaitService
from inferq.settings import Settings

T = TypeVar("T")


class ClaimService:
    """One per replica; see the module docstring."""

    def __init__(
        self,
        tasks: TaskRepository,
        sessions: WorkerSessionRepository,
        waits: WaitService,
        relay: ChunkRelay,
        *,
        settings: Settings,
        drain: Drain,
        metrics: Metrics,
        meter: UsageMeter | None = None,
    ) -> None:
        self.tasks = tasks
        self.sessions = sessions
        self.waits = waits
        self.relay = relay
        self.settings = settings
        self.drain = drain
        self.metrics = metrics
        self.meter = meter  # tokens used, per model (inferq.services.usage)
        # A claim's first lease: a worker that does not acknowledge its tasks (a start, a
        # heartbeat naming them, an outcome) within it loses them to the rescuer; a frozen
        # worker's tasks do not wait out a whole lease.
        self._ack_s = min(settings.claim_ack_s, settings.lease_s)
        self._owners: dict[UUID, tuple[str, list[str]]] = {}
        self._touched: dict[UUID, float] = {}

    # -- sessions -----------------------------------------------------------------------------

    async def bind(
        self, token: ApiToken, pools: Sequence[str], capacity: int, name: str | None
    ) -> tuple[WorkerSession, list[Task]]:
        """Open a session and claim pending work of its pools at once, up to capacity."""
        self.drain.check()
        pools = list(dict.fromkeys(pools))
        check_pools(token, pools)
        session = await self.sessions.bind(
            token.owner_id, pools, capacity, ttl_s=self.settings.session_ttl_s, name=name
        )
        self._remember(session.id, session.owner_id, session.pools)
        tasks = await self.tasks.claim(session.id, pools, limit=capacity, lease_s=self._ack_s)
        return session, self._claimed(tasks)

    async def claim(
        self, token: ApiToken, session_id: UUID, max_tasks: int, wait_s: float, *, gone: Gone
    ) -> list[Task]:
        """Up to ``max_tasks`` tasks, waiting up to ``wait_s`` for work; empty at the deadline
        or when the replica drains. Raises SessionNotFound when the session is gone or expires
        while waiting (the worker binds again), TokenRevoked when the token is revoked."""
        self.drain.check()
        # Whether the session lives is vouched for by the claim statement itself (bound=True),
        # so a claim that finds work costs one statement.
        pools = await self.check_session(session_id, token)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_s, self.settings.max_wait_s)
        tasks: list[Task] = []
        live_until = -math.inf  # the session's expiry as last read, on the loop's clock
        # Interest is registered before the first claim, so work that arrives in between wakes.
        async with self.waits.pool_waiter(pools) as waiter:
            while not self.drain.draining:
                tasks = await self.tasks.claim(
                    session_id, pools, limit=max_tasks, lease_s=self._ack_s, bound=True
                )
                if tasks:
                    break
                # Nothing to take. An expired session never claims anything, so a long-poll
                # must not outlive it: it is checked when the first claim finds nothing (a live
                # one is extended), and again after a wake that found nothing once its expiry
                # as last read has passed; only heartbeats extend it then, or an open long-poll
                # would keep a stalled worker's session alive. An expiry only moves forward and
                # the reaper removes a session only after it, so a reaped session is found at
                # the first wake after the reap, and a live one costs no read per wake.
                if loop.time() >= live_until:
                    first = live_until == -math.inf
                    session = await self._live_session(session_id, extend=first)
                    left_s = (session.expires_at - datetime.now(UTC)).total_seconds()
                    live_until = loop.time() + left_s
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    # A worker that left must not have work claimed into its closed connection
                    # (the task would sit until its lease expired and count as a lost attempt).
                    await self.drain.guarded(
                        waiter.wait(remaining), gone=gone, at_start=True, token_id=token.id
                    )
                except ShuttingDown:
                    break  # an empty answer: the worker claims again, from another replica
        self.metrics.claim_seconds.observe(time.perf_counter() - started)
        return self._claimed(tasks)

    async def heartbeat(
        self, token: ApiToken, session_id: UUID, reported: Sequence[UUID]
    ) -> Heartbeat:
        """Extend the session and the leases of ``reported``; say which were cancelled or lost."""
        await self.check_session(session_id, token)
        return await self.sessions.heartbeat(
            session_id,
            reported,
            ttl_s=self.settings.session_ttl_s,
            lease_s=self.settings.lease_s,
        )

    async def unbind(self, token: ApiToken, session_id: UUID) -> int:
        """Close the session; what it held goes back to pending. How many tasks that was."""
        await self.check_session(session_id, token)
        released = await self.tasks.revert_session(session_id, reason="its worker unbound")
        await self.sessions.unbind(session_id)
        self._owners.pop(session_id, None)
        self._touched.pop(session_id, None)
        return len(released)

    # -- task writes --------------------------------------------------------------------------

    async def start(self, token: ApiToken, task_id: UUID, session_id: UUID, attempt: int) -> Task:
        await self.check_session(session_id, token)
        write = self.tasks.start(task_id, session_id, attempt, self.settings.lease_s)
        return await _scoped(token, write)

    async def post_chunks(
        self,
        token: ApiToken,
        task_id: UUID,
        session_id: UUID,
        attempt: int,
        chunks: Sequence[tuple[int, str]],
    ) -> int:
        """Store (seq, data) chunks and announce them; the task's last stored seq."""
        await self.check_session(session_id, token)
        return await _scoped(token, self.relay.post(task_id, session_id, attempt, chunks))

    async def complete(
        self, token: ApiToken, task_id: UUID, session_id: UUID, attempt: int, response: Any
    ) -> Task:
        await self.check_session(session_id, token)
        write = self.tasks.complete_once(task_id, session_id, attempt, response)
        task, fresh = await _scoped(token, write)
        if fresh and self.meter is not None:
            self.meter.completed(task)
        return task

    async def fail(
        self, token: ApiToken, task_id: UUID, session_id: UUID, attempt: int, message: str
    ) -> Task:
        await self.check_session(session_id, token)
        return await _scoped(token, self.tasks.fail(task_id, session_id, attempt, message))

    async def release(self, token: ApiToken, task_id: UUID, session_id: UUID, attempt: int) -> Task:
        await self.check_session(session_id, token)
        write = self.tasks.release(task_id, session_id, attempt, reason="its worker released it")
        return await _scoped(token, write)

    async def outcomes(
        self, token: ApiToken, session_id: UUID, items: Sequence[Outcome], claim: int
    ) -> tuple[list[Finished | Exception], list[Task]]:
        """End many held tasks in one statement, each answered like its single route (a
        Finished, or the error that route would raise); then claim up to ``claim`` more
        without waiting, unless the replica drains."""
        pools = await self.check_session(session_id, token)
        finished = await self.tasks.finish_many(session_id, items)
        if self.meter is not None:
            self.meter.outcomes(items, finished)
        results = [r if isinstance(r, Finished) else _hidden(r, token) for r in finished]
        tasks: list[Task] = []
        if claim and not self.drain.draining:
            # Only a live session takes work (the statement checks). A session that just
            # expired still gets its answers, and no tasks; its next claim or heartbeat tells
            # the worker to bind again.
            tasks = await self.tasks.claim(
                session_id, pools, limit=claim, lease_s=self._ack_s, bound=True
            )
        return results, self._claimed(tasks)

    # -- sessions, remembered -----------------------------------------------------------------

    async def check_session(self, session_id: UUID, token: ApiToken) -> list[str]:
        """The pools of a session of the token's owner that the token may serve.

        Raises SessionNotFound for a missing session or another owner's (alike), Forbidden when
        the token may not serve every pool of the session: a token limited to some pools must
        not drive a session bound by a wider token of the same owner.
        """
        known = self._owners.get(session_id)
        if known is None:
            session = await self.sessions.get(session_id)
            known = (session.owner_id, session.pools)
            self._remember(session_id, *known)
        if known[0] != token.owner_id:
            raise SessionNotFound(
                f"worker session {session_id} does not exist or expired; bind again"
            )
        check_pools(token, known[1])
        return known[1]

    def _remember(self, session_id: UUID, owner_id: str, pools: list[str]) -> None:
        if len(self._owners) > 100_000:
            self._owners.clear()
        self._owners[session_id] = (owner_id, pools)

    async def _live_session(self, session_id: UUID, *, extend: bool) -> WorkerSession:
        """The live session, its lifetime extended unless ``extend`` is False; raises
        SessionNotFound when it is gone or expired.

        A worker claims after every batch it receives: an UPDATE (a commit, an fsync) per claim
        is costly. The extension is written at most once per tenth of the TTL per replica; in
        between a plain read still checks the session is alive, and its expiry stays at least
        90% of the TTL ahead.
        """
        ttl_s = self.settings.session_ttl_s
        now = time.monotonic()
        touched = self._touched.get(session_id)
        if not extend or (touched is not None and now - touched < ttl_s / 10):
            return await self.sessions.get(session_id, live=True)
        session = await self.sessions.get(session_id, touch_ttl_s=ttl_s)
        if len(self._touched) > 100_000:
            self._touched.clear()
        self._touched[session_id] = now
        return session

    def _claimed(self, tasks: list[Task]) -> list[Task]:
        for task in tasks:
            if task.claimed_at is not None:
                latency = (task.claimed_at - task.created_at).total_seconds()
                pool = self.metrics.pool_label(task.pool_name)
                self.metrics.claim_latency_seconds.labels(pool).observe(max(0.0, latency))
        return tasks


async def _scoped(token: ApiToken, write: Awaitable[T]) -> T:
    """``write``'s result; a refusal naming a task of a pool this token may not serve is
    TaskNotFound, like a missing task: its 409 would show another pool's task to this worker."""
    try:
        return await write
    except TaskError as exc:
        raise _hidden(exc, token) from None


def _hidden(exc: Exception, token: ApiToken) -> Exception:
    task = getattr(exc, "task", None)
    if isinstance(task, Task) and not token.may_serve(task.pool_name):
        return TaskNotFound(f"task {task.id} not found")
    return exc
