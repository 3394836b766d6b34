"""TaskRepository: task reads, and every transition as one guarded statement on inferq.task."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.db.rows import decode_cursor, encode_cursor, task_row
from inferq.db.task_queries import (
    CANCEL,
    CLAIM,
    COMPLETE,
    COUNT_PENDING,
    ENQUEUE,
    FAIL,
    FIND_PENDING,
    FINISH_MANY,
    FINISHED_AMONG,
    GC_DELETE,
    GC_PENDING,
    GET,
    GET_BY_KEY,
    GET_MANY,
    GET_OWNED,
    HELD_BY_SESSION,
    LIST,
    LOCK_SESSION,
    REVERT_EXPIRED,
    REVERT_ONE,
    REVERT_SESSION,
    START,
)
from inferq.domain.lanes import DEFAULT_LANE, LANES
from inferq.domain.records import Enqueued, Finished, GcResult, Outcome, Page
from inferq.domain.task import Task, TaskStatus
from inferq.errors import (
    IdempotencyConflict,
    InvalidTransition,
    InvalidValue,
    LeaseLost,
    QuotaExceeded,
    TaskError,
    TaskNotFound,
)
from inferq.jsontext import dumps


def scheduling_params(aging_s: float = 300.0, half_life_s: float = 60.0) -> dict[str, Any]:
    """The claim's scheduling parameters (INFERQ_AGING_S, INFERQ_FAIR_SHARE_HALF_LIFE_S)."""
    return {"lanes": list(LANES), "aging_s": aging_s, "half_life_s": half_life_s}


class TaskRepository:
    """Reads and guarded writes of inferq.task over a pool of autocommit connections.

    Every transition is one ``UPDATE ... WHERE <guard> RETURNING``. When the guard matches no
    row, a second read (a fresh snapshot) decides between an idempotent repeat and a domain
    error that carries the task's current state.
    """

    def __init__(
        self,
        pool: Pool,
        *,
        aging_s: float = 300.0,
        fair_share_half_life_s: float = 60.0,
        max_discarded_per_hour: int = 0,
    ) -> None:
        self.pool = pool
        self.scheduling = scheduling_params(aging_s, fair_share_half_life_s)
        # A token's cancelled and failed tasks per rolling hour, unless its quota says
        # otherwise (sql/0009_discards.sql); 0: no server-wide limit.
        self.max_discarded_per_hour = max_discarded_per_hour

    async def _all(self, query: Any, params: dict[str, Any]) -> list[Task]:
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=task_row)
            await cur.execute(query, params)
            return await cur.fetchall()

    async def _one(self, query: Any, params: dict[str, Any]) -> Task | None:
        rows = await self._all(query, params)
        return rows[0] if rows else None

    # -- client side ------------------------------------------------------------------------

    async def enqueue(
        self,
        *,
        owner_id: str,
        pool_name: str,
        request_body: Any,
        llm_name: str | None = None,
        model: str | None = None,
        tier: str | None = None,
        streaming: bool = False,
        agent_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
        idempotency_key: str | None = None,
        lane: str = DEFAULT_LANE,
        token_id: UUID | None = None,
    ) -> Enqueued:
        """Insert a pending task. The same idempotency key returns the first task (created=False).

        Raises IdempotencyConflict when the key was used with a different request, and
        QuotaExceeded when the token discarded (cancelled or failed) its hourly limit of tasks.
        """
        params = {
            "pool": pool_name,
            "llm": llm_name,
            "model": model,
            "tier": tier,
            "streaming": streaming,
            "body": Jsonb(request_body),
            "owner": owner_id,
            "agent": agent_id,
            "priority": priority,
            "max_attempts": max_attempts,
            "key": idempotency_key,
            "lane": lane,
            "token": token_id,
            "discard_cap": self.max_discarded_per_hour,
        }
        # Two racing submits with one key: the loser's insert does nothing and its read may
        # run before the winner commits, so it tries again.
        for _ in range(5):
            try:
                task = await self._one(ENQUEUE, params)
            except QuotaExceeded:
                # The discard check runs before ON CONFLICT: a keyed retry of a task that
                # exists still gets its task (a reattach), only a new task is refused.
                if idempotency_key is None or await self._one(GET_BY_KEY, params) is None:
                    raise
                task = None
            if task is not None:
                return Enqueued(task, created=True)
            existing = await self._one(GET_BY_KEY, params)
            if existing is not None:
                same = (existing.request_body, existing.pool_name, existing.streaming) == (
                    request_body,
                    pool_name,
                    streaming,
                )
                if not same:
                    raise IdempotencyConflict(
                        f"Idempotency-Key {idempotency_key!r} was already used for task "
                        f"{existing.id} with a different request",
                        task=existing,
                    )
                return Enqueued(existing, created=False)
        raise IdempotencyConflict("could not resolve a concurrent submit; retry the request")

    async def get(self, task_id: UUID, owner_id: str | None = None) -> Task:
        """The task; raises TaskNotFound when missing or owned by someone else."""
        if owner_id is None:
            task = await self._one(GET, {"id": task_id})
        else:
            task = await self._one(GET_OWNED, {"id": task_id, "owner": owner_id})
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        return task

    async def count_pending(self, owner_id: str, cap: int) -> int:
        """How many tasks of the owner are pending, counted up to ``cap``."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(COUNT_PENDING, {"owner": owner_id, "cap": cap})
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def finished_among(self, task_ids: Sequence[UUID]) -> set[UUID]:
        """Which of ``task_ids`` are terminal or no longer exist (one small-row statement)."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(FINISHED_AMONG, {"ids": list(task_ids)})
            return {row[0] for row in await cur.fetchall()}

    async def get_many(self, task_ids: Sequence[UUID]) -> list[Task]:
        """The tasks among ``task_ids`` that exist, in one statement."""
        return await self._all(GET_MANY, {"ids": list(task_ids)})

    async def list_tasks(
        self,
        owner_id: str,
        *,
        statuses: Sequence[TaskStatus] | None = None,
        agent_id: str | None = None,
        pool_name: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """The owner's tasks, newest first; ``next_cursor`` continues after the last one."""
        after_ts, after_id = decode_cursor(cursor) if cursor else (None, None)
        tasks = await self._all(
            LIST,
            {
                "owner": owner_id,
                "status": [s.value for s in statuses] if statuses else None,
                "agent": agent_id,
                "pool": pool_name,
                "after_ts": after_ts,
                "after_id": after_id,
                "limit": limit + 1,
            },
        )
        more = len(tasks) > limit
        tasks = tasks[:limit]
        return Page(tasks, encode_cursor(tasks[-1]) if more else None)

    async def cancel(self, task_id: UUID, owner_id: str, reason: str | None = None) -> Task:
        """Cancel a non-terminal task. Repeating it is idempotent.

        Raises TaskNotFound, or InvalidTransition when the task already ended otherwise.
        """
        task = await self._one(CANCEL, {"id": task_id, "owner": owner_id, "reason": reason})
        if task is not None:
            return task
        current = await self.get(task_id, owner_id)
        if current.status is TaskStatus.CANCELLED:
            return current
        raise InvalidTransition(
            f"task {task_id} is already {current.status}; it cannot be cancelled", task=current
        )

    # -- worker side ------------------------------------------------------------------------

    async def claim(
        self,
        session_id: UUID,
        pools: Sequence[str],
        *,
        limit: int,
        lease_s: float,
        bound: bool = False,
    ) -> list[Task]:
        """Claim up to ``limit`` pending tasks of ``pools`` (aged ones first, then lane by lane,
        owners by fair share, each owner's priority then FIFO: see CLAIM), within the
        session's capacity. An expired session claims nothing; so does a missing one when
        ``bound`` (the worker API: the statement itself then vouches that the session lives),
        while without it an id with no session row is bounded by ``limit`` alone."""
        if limit <= 0:
            return []
        params = {
            "session": session_id,
            "pools": list(pools),
            "limit": limit,
            "lease_s": lease_s,
            "unbound": 0 if bound else limit,
            **self.scheduling,
        }
        if not bound:
            return await self._all(CLAIM, params)
        # One round trip: the session lock and the claim go out together (pipeline mode).
        async with connect(self.pool) as conn:
            async with conn.pipeline(), conn.transaction():
                await conn.execute(LOCK_SESSION, params)
                cur = conn.cursor(row_factory=task_row)
                await cur.execute(CLAIM, params)
            return await cur.fetchall()

    async def find_pending(self, pools: Sequence[str], limit: int = 100) -> list[Task]:
        """Pending tasks of ``pools`` by priority then FIFO (across lanes and owners; not the
        claim's order), without claiming."""
        return await self._all(FIND_PENDING, {"pools": list(pools), "limit": limit})

    async def held_by(self, session_id: UUID) -> list[Task]:
        """The claimed and running tasks of a worker session, oldest claim first."""
        return await self._all(HELD_BY_SESSION, {"session": session_id})

    async def start(
        self, task_id: UUID, session_id: UUID, attempt: int, lease_s: float | None = None
    ) -> Task:
        """claimed -> running, the lease set to ``lease_s`` from now (kept when None): a start
        acknowledges the claim. Idempotent for the holder; raises LeaseLost otherwise."""
        params = {"id": task_id, "session": session_id, "attempt": attempt, "lease_s": lease_s}
        task = await self._one(START, params)
        if task is not None:
            return task
        current = await self._current_for_worker(task_id, session_id, attempt)
        if current.status is TaskStatus.RUNNING:
            return current
        raise InvalidTransition(f"task {task_id} is {current.status}, not claimed", task=current)

    async def complete(
        self, task_id: UUID, session_id: UUID, attempt: int, response_body: Any
    ) -> Task:
        """claimed|running -> completed with the response. Repeating it with the same body is
        idempotent; raises LeaseLost for a stale holder and InvalidTransition otherwise."""
        return (await self.complete_once(task_id, session_id, attempt, response_body))[0]

    async def complete_once(
        self, task_id: UUID, session_id: UUID, attempt: int, response_body: Any
    ) -> tuple[Task, bool]:
        """``complete``, and whether this call completed the task (False: a repeat)."""
        params = {
            "id": task_id,
            "session": session_id,
            "attempt": attempt,
            "body": Jsonb(response_body),
        }
        task = await self._one(COMPLETE, params)
        if task is not None:
            return task, True
        current = await self._current_for_worker(task_id, session_id, attempt)
        if current.status is TaskStatus.COMPLETED and current.response_body == response_body:
            return current, False
        raise InvalidTransition(
            f"task {task_id} is {current.status}; it cannot be completed", task=current
        )

    async def finish_many(
        self, session_id: UUID, outcomes: Sequence[Outcome]
    ) -> list[Finished | Exception]:
        """End many tasks held by one session: one statement for all of them.

        Returns one entry per outcome, in order: Finished, or the exception complete() or
        fail() would have raised for it alone (LeaseLost, InvalidTransition, TaskNotFound,
        InvalidValue for a value the database refuses). Items the statement did not move and
        repeats of an id within the call are retried one by one with complete() or fail(), and
        so is every item when one value is refused (which fails the whole statement, writing
        nothing): each gets its precise answer and none is written in part. Errors that are
        not about an item (the database is down) propagate.
        """
        results: list[Finished | Exception | None] = [None] * len(outcomes)
        first: dict[UUID, int] = {}
        for i, o in enumerate(outcomes):
            first.setdefault(o.task_id, i)
        batch = [outcomes[i] for i in first.values()]
        items = [
            {"task_id": o.task_id, "attempt": o.attempt, "response": o.response, "error": o.error}
            for o in batch
        ]
        params = {"session": session_id, "items": dumps(items).decode()}
        try:
            async with connect(self.pool) as conn:
                cur = await conn.execute(FINISH_MANY, params)
                rows = await cur.fetchall()
        except InvalidValue:
            rows = []  # one refused value fails the statement: find it item by item
        for task_id, status, attempt, lane in rows:
            results[first[task_id]] = Finished(task_id, TaskStatus(status), attempt, lane=lane)
        for i, o in enumerate(outcomes):
            if results[i] is None:
                results[i] = await self._finish_one(session_id, o)
        return [r for r in results if r is not None]

    async def _finish_one(self, session_id: UUID, o: Outcome) -> Finished | Exception:
        fresh = True
        try:
            if o.error is not None:
                task = await self.fail(o.task_id, session_id, o.attempt, o.error)
            else:
                write = self.complete_once(o.task_id, session_id, o.attempt, o.response)
                task, fresh = await write
        except (TaskError, InvalidValue) as exc:
            return exc
        return Finished(task.id, task.status, task.attempt, fresh, task.lane)

    async def fail(self, task_id: UUID, session_id: UUID, attempt: int, message: str) -> Task:
        """claimed|running -> error with the worker's message; idempotent like complete."""
        params = {"id": task_id, "session": session_id, "attempt": attempt, "message": message}
        task = await self._one(FAIL, params)
        if task is not None:
            return task
        current = await self._current_for_worker(task_id, session_id, attempt)
        if current.status is TaskStatus.ERROR and current.error_message == message:
            return current
        raise InvalidTransition(
            f"task {task_id} is {current.status}; it cannot be failed", task=current
        )

    async def release(
        self, task_id: UUID, session_id: UUID, attempt: int, reason: str = "released"
    ) -> Task:
        """Give one held task back to pending on purpose; it does not count as a lost attempt."""
        params = {
            "id": task_id,
            "session": session_id,
            "attempt": attempt,
            "reason": reason,
            "graceful": True,
        }
        task = await self._one(REVERT_ONE, params)
        if task is not None:
            return task
        current = await self._current_for_worker(task_id, session_id, attempt)
        raise InvalidTransition(f"task {task_id} is {current.status}", task=current)

    async def _current_for_worker(self, task_id: UUID, session_id: UUID, attempt: int) -> Task:
        """After a guard missed: the current row, or LeaseLost when this worker lost it."""
        current = await self.get(task_id)
        if current.claimed_by != session_id or current.attempt != attempt:
            raise LeaseLost(
                f"task {task_id} is no longer held by this worker (attempt {attempt}; "
                f"the task is {current.status} at attempt {current.attempt})",
                task=current,
            )
        return current

    async def revert_session(
        self, session_id: UUID, reason: str = "worker unbound", *, graceful: bool = True
    ) -> list[Task]:
        """Give back everything a session holds. Graceful (an unbind): back to pending. Not
        graceful (the worker was lost): pending, or error once max_attempts were lost."""
        return await self._all(
            REVERT_SESSION, {"session": session_id, "reason": reason, "graceful": graceful}
        )

    # -- maintenance ------------------------------------------------------------------------

    async def revert_expired(self, now: datetime | None = None) -> list[Task]:
        """Revert tasks whose lease ran out (database time unless ``now`` is given)."""
        return await self._all(
            REVERT_EXPIRED, {"now": now, "reason": "its lease expired", "graceful": False}
        )

    async def gc(
        self, *, pending_timeout_s: float, retention_s: float, now: datetime | None = None
    ) -> GcResult:
        """Fail pending tasks older than the timeout; delete terminal rows past retention."""
        expired = await self._all(GC_PENDING, {"now": now, "timeout_s": pending_timeout_s})
        async with connect(self.pool) as conn:
            cur = await conn.execute(GC_DELETE, {"now": now, "retention_s": retention_s})
            deleted = cur.rowcount
        return GcResult(expired, deleted)
