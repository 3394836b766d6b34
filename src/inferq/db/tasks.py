"""TaskRepository: every task transition as one guarded statement on inferq.task."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from inferq.db.pool import Pool
from inferq.db.rows import TASK_SELECT, render, task_row
from inferq.domain.task import HELD, Task, TaskStatus
from inferq.errors import (
    IdempotencyConflict,
    InferqError,
    InvalidTransition,
    LeaseLost,
    TaskNotFound,
)
from inferq.jsontext import dumps

_HELD = [s.value for s in HELD]

ENQUEUE = render(
    sql.SQL(
        """
INSERT INTO inferq.task AS t (pool_name, llm_name, model, tier, streaming, request_body,
                              owner_id, agent_id, priority, max_attempts, idempotency_key)
VALUES (%(pool)s, %(llm)s, %(model)s, %(tier)s, %(streaming)s, %(body)s,
        %(owner)s, %(agent)s, %(priority)s, %(max_attempts)s, %(key)s)
ON CONFLICT (owner_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

GET_BY_KEY = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t WHERE t.owner_id = %(owner)s AND t.idempotency_key = %(key)s
"""
    ).format(task_select=TASK_SELECT)
)

_GET = sql.SQL("SELECT {task_select} FROM inferq.task t WHERE t.id = %(id)s").format(
    task_select=TASK_SELECT
)
GET = render(_GET)
GET_OWNED = render(_GET + sql.SQL(" AND t.owner_id = %(owner)s"))
GET_MANY = render(
    sql.SQL("SELECT {task_select} FROM inferq.task t WHERE t.id = ANY(%(ids)s)").format(
        task_select=TASK_SELECT
    )
)

LIST = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
WHERE t.owner_id = %(owner)s
  AND (%(status)s::inferq.task_status[] IS NULL OR t.status = ANY(%(status)s))
  AND (%(agent)s::text IS NULL OR t.agent_id = %(agent)s)
  AND (%(pool)s::text IS NULL OR t.pool_name = %(pool)s)
  AND (%(after_ts)s::timestamptz IS NULL OR (t.created_at, t.id) < (%(after_ts)s, %(after_id)s))
ORDER BY t.created_at DESC, t.id DESC
LIMIT %(limit)s
"""
    ).format(task_select=TASK_SELECT)
)

# SKIP LOCKED: racing claimers each take different rows and never wait on each other. A bound
# session never holds more than its capacity, and an expired one claims nothing; an id with no
# session row claims up to the limit (tests, tools) or, when %(unbound)s is 0, nothing.
CLAIM = render(
    sql.SQL(
        """
WITH room AS (
    SELECT CASE WHEN s.expires_at > now() THEN greatest(0, s.capacity - (
        SELECT count(*) FROM inferq.task h
        WHERE h.claimed_by = s.id AND h.status IN ('claimed', 'running'))) ELSE 0 END AS n
    FROM inferq.worker_session s WHERE s.id = %(session)s
), picked AS (
    SELECT id FROM inferq.task
    WHERE status = 'pending' AND pool_name = ANY(%(pools)s)
    ORDER BY priority DESC, created_at, id
    LIMIT least(%(limit)s, coalesce((SELECT n FROM room), %(unbound)s))
    FOR UPDATE SKIP LOCKED
)
UPDATE inferq.task t
SET status = 'claimed', claimed_by = %(session)s, claimed_at = now(), attempt = t.attempt + 1,
    lease_expires_at = now() + make_interval(secs => %(lease_s)s)
FROM picked WHERE t.id = picked.id
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

FIND_PENDING = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
WHERE t.status = 'pending' AND t.pool_name = ANY(%(pools)s)
ORDER BY t.priority DESC, t.created_at, t.id
LIMIT %(limit)s
"""
    ).format(task_select=TASK_SELECT)
)

HELD_BY_SESSION = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
WHERE t.claimed_by = %(session)s AND t.status IN ('claimed', 'running')
ORDER BY t.claimed_at
"""
    ).format(task_select=TASK_SELECT)
)

# The guard every worker write shares: this session holds this attempt of the task.
_HOLDS = sql.SQL("t.id = %(id)s AND t.claimed_by = %(session)s AND t.attempt = %(attempt)s")

START = render(
    sql.SQL(
        """
UPDATE inferq.task t SET status = 'running', stream_started_at = now()
WHERE {holds} AND t.status = 'claimed'
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS)
)

COMPLETE = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'completed', response_body = %(body)s, completed_at = now(), lease_expires_at = NULL
WHERE {holds} AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS)
)

FAIL = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'error', error_message = %(message)s, completed_at = now(), lease_expires_at = NULL
WHERE {holds} AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS)
)

CANCEL = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'cancelled', completed_at = now(), lease_expires_at = NULL,
    error_message = coalesce(%(reason)s, 'cancelled by the client')
WHERE t.id = %(id)s AND t.owner_id = %(owner)s AND t.status IN ('pending', 'claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

# A lost claim (lease expired, session reaped) counts against max_attempts: once the task was
# lost that often it ends in error. A graceful release (worker shutdown, unbind) never does.
_LOST_FOR_GOOD = sql.SQL("(NOT %(graceful)s::boolean AND t.attempt - t.releases >= t.max_attempts)")
_REVERT_SET = sql.SQL(
    """
SET status = (CASE WHEN {lost} THEN 'error' ELSE 'pending' END)::inferq.task_status,
    error_message = CASE WHEN {lost}
        THEN format('the worker was lost %%s times (max_attempts=%%s); last time %%s',
                    t.attempt - t.releases, t.max_attempts, %(reason)s::text)
        ELSE t.error_message END,
    completed_at = CASE WHEN {lost} THEN now() END,
    releases = t.releases + CASE WHEN %(graceful)s::boolean THEN 1 ELSE 0 END,
    claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL, stream_started_at = NULL
"""
).format(lost=_LOST_FOR_GOOD)

REVERT_SESSION = render(
    sql.SQL(
        """
UPDATE inferq.task t {revert_set}
WHERE t.claimed_by = %(session)s AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, revert_set=_REVERT_SET)
)

REVERT_ONE = render(
    sql.SQL(
        """
UPDATE inferq.task t {revert_set}
WHERE {holds} AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS, revert_set=_REVERT_SET)
)

REVERT_EXPIRED = render(
    sql.SQL(
        """
UPDATE inferq.task t {revert_set}
WHERE t.status IN ('claimed', 'running')
  AND t.lease_expires_at < coalesce(%(now)s::timestamptz, now())
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, revert_set=_REVERT_SET)
)

EXTEND_LEASES = """
UPDATE inferq.task t SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
WHERE t.claimed_by = %(session)s AND t.status IN ('claimed', 'running')
RETURNING t.id, t.attempt
"""

# Batched forms: one statement (so one notifying commit) for many tasks. The statement-level
# trigger folds their notifications into a few payloads.
ENQUEUE_MANY = render(
    sql.SQL(
        """
INSERT INTO inferq.task AS t (pool_name, llm_name, model, tier, streaming, request_body,
                              owner_id, agent_id, priority, max_attempts)
SELECT * FROM unnest(%(pools)s::text[], %(llms)s::text[], %(models)s::text[], %(tiers)s::text[],
                     %(streaming)s::bool[], %(bodies)s::jsonb[], %(owners)s::text[],
                     %(agents)s::text[], %(priorities)s::int[], %(max_attempts)s::int[])
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

_HOLDS_MANY = sql.SQL(
    "t.id = c.id AND t.claimed_by = c.session AND t.attempt = c.attempt "
    "AND t.status IN ('claimed', 'running')"
)

START_MANY = render(
    sql.SQL(
        """
UPDATE inferq.task t SET status = 'running', stream_started_at = now()
FROM unnest(%(ids)s::uuid[], %(sessions)s::uuid[], %(attempts)s::int[]) AS c(id, session, attempt)
WHERE {holds} AND t.status = 'claimed'
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS_MANY)
)

COMPLETE_MANY = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'completed', response_body = c.body, completed_at = now(), lease_expires_at = NULL
FROM unnest(%(ids)s::uuid[], %(sessions)s::uuid[], %(attempts)s::int[], %(bodies)s::jsonb[])
    AS c(id, session, attempt, body)
WHERE {holds}
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, holds=_HOLDS_MANY)
)

# Completes and fails of one worker session in one statement: an item with an error fails its
# task, one without completes it. The items travel as one JSON array (jsonb_to_recordset): far
# cheaper to send than one array parameter per column with a Jsonb per response. Only
# (id, status, attempt) come back, not the whole row.
FINISH_MANY = """
UPDATE inferq.task t
SET status = (CASE WHEN c.error IS NULL THEN 'completed' ELSE 'error' END)::inferq.task_status,
    response_body = CASE WHEN c.error IS NULL THEN c.response ELSE t.response_body END,
    error_message = coalesce(c.error, t.error_message),
    completed_at = now(), lease_expires_at = NULL
FROM jsonb_to_recordset(%(items)s::jsonb)
    AS c(task_id uuid, attempt int, response jsonb, error text)
WHERE t.id = c.task_id AND t.claimed_by = %(session)s AND t.attempt = c.attempt
  AND t.status IN ('claimed', 'running')
RETURNING t.id, t.status::text, t.attempt
"""

# Of these tasks, the ones a waiter for the outcome must re-read: ended, or gone.
FINISHED_AMONG = """
SELECT u.id FROM unnest(%(ids)s::uuid[]) AS u(id)
LEFT JOIN inferq.task t ON t.id = u.id
WHERE t.id IS NULL OR t.status IN ('completed', 'error', 'cancelled')
"""

GC_PENDING = render(
    sql.SQL(
        """
UPDATE inferq.task t
SET status = 'error', completed_at = coalesce(%(now)s::timestamptz, now()),
    error_message = format('not claimed within %%s s (INFERQ_PENDING_TIMEOUT_S): '
                           'no worker served pool %%s in time', %(timeout_s)s, t.pool_name)
WHERE t.status = 'pending'
  AND t.created_at < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(timeout_s)s)
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT)
)

GC_DELETE = """
DELETE FROM inferq.task t
WHERE t.status IN ('completed', 'error', 'cancelled')
  AND t.completed_at < coalesce(%(now)s::timestamptz, now())
                       - make_interval(secs => %(retention_s)s)
"""


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task to insert with enqueue_many."""

    owner_id: str
    pool_name: str
    request_body: Any
    llm_name: str | None = None
    model: str | None = None
    tier: str | None = None
    streaming: bool = False
    agent_id: str | None = None
    priority: int = 0
    max_attempts: int = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one held task for finish_many: ``error`` fails it, else ``response``
    completes it."""

    task_id: UUID
    attempt: int
    response: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """A task that finish_many ended (or found already ended the same way)."""

    task_id: UUID
    status: TaskStatus
    attempt: int


@dataclass(frozen=True, slots=True)
class Enqueued:
    task: Task
    created: bool


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class GcResult:
    expired_pending: list[Task]
    deleted: int


def encode_cursor(task: Task) -> str:
    raw = orjson.dumps([task.created_at.isoformat(), str(task.id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """Parse a listing cursor; raises ValueError when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, task_id = orjson.loads(raw)
        return datetime.fromisoformat(ts), UUID(task_id)
    except Exception as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc


class TaskRepository:
    """Reads and guarded writes of inferq.task over a pool of autocommit connections.

    Every transition is one ``UPDATE ... WHERE <guard> RETURNING``. When the guard matches no
    row, a second read (a fresh snapshot) decides between an idempotent repeat and a domain
    error that carries the task's current state.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def _all(self, query: Any, params: dict[str, Any]) -> list[Task]:
        async with self.pool.connection() as conn:
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
    ) -> Enqueued:
        """Insert a pending task. The same idempotency key returns the first task (created=False).

        Raises IdempotencyConflict when the key was used with a different request.
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
        }
        # Two racing submits with one key: the loser's insert does nothing and its read may
        # run before the winner commits, so it tries again.
        for _ in range(5):
            task = await self._one(ENQUEUE, params)
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

    async def enqueue_many(self, items: Sequence[NewTask]) -> list[Task]:
        """Insert many pending tasks in one statement (no idempotency keys on this path)."""
        if not items:
            return []
        return await self._all(
            ENQUEUE_MANY,
            {
                "pools": [i.pool_name for i in items],
                "llms": [i.llm_name for i in items],
                "models": [i.model for i in items],
                "tiers": [i.tier for i in items],
                "streaming": [i.streaming for i in items],
                "bodies": [Jsonb(i.request_body) for i in items],
                "owners": [i.owner_id for i in items],
                "agents": [i.agent_id for i in items],
                "priorities": [i.priority for i in items],
                "max_attempts": [i.max_attempts for i in items],
            },
        )

    async def get(self, task_id: UUID, owner_id: str | None = None) -> Task:
        """The task; raises TaskNotFound when missing or owned by someone else."""
        if owner_id is None:
            task = await self._one(GET, {"id": task_id})
        else:
            task = await self._one(GET_OWNED, {"id": task_id, "owner": owner_id})
        if task is None:
            raise TaskNotFound(f"task {task_id} not found")
        return task

    async def finished_among(self, task_ids: Sequence[UUID]) -> set[UUID]:
        """Which of ``task_ids`` are terminal or no longer exist (one small-row statement)."""
        async with self.pool.connection() as conn:
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
        """Claim up to ``limit`` pending tasks of ``pools`` (priority, then FIFO), within the
        session's capacity. An expired session claims nothing; so does a missing one when
        ``bound`` (the worker API: the statement itself then vouches that the session lives),
        while without it an id with no session row is bounded by ``limit`` alone."""
        if limit <= 0:
            return []
        return await self._all(
            CLAIM,
            {
                "session": session_id,
                "pools": list(pools),
                "limit": limit,
                "lease_s": lease_s,
                "unbound": 0 if bound else limit,
            },
        )

    async def find_pending(self, pools: Sequence[str], limit: int = 100) -> list[Task]:
        """Pending tasks of ``pools`` in drain order, without claiming them."""
        return await self._all(FIND_PENDING, {"pools": list(pools), "limit": limit})

    async def held_by(self, session_id: UUID) -> list[Task]:
        """The claimed and running tasks of a worker session."""
        return await self._all(HELD_BY_SESSION, {"session": session_id})

    async def start(self, task_id: UUID, session_id: UUID, attempt: int) -> Task:
        """claimed -> running. Idempotent for the holder; raises LeaseLost otherwise."""
        params = {"id": task_id, "session": session_id, "attempt": attempt}
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
        params = {
            "id": task_id,
            "session": session_id,
            "attempt": attempt,
            "body": Jsonb(response_body),
        }
        task = await self._one(COMPLETE, params)
        if task is not None:
            return task
        current = await self._current_for_worker(task_id, session_id, attempt)
        if current.status is TaskStatus.COMPLETED and current.response_body == response_body:
            return current
        raise InvalidTransition(
            f"task {task_id} is {current.status}; it cannot be completed", task=current
        )

    async def start_many(self, held: Sequence[tuple[UUID, UUID, int]]) -> list[Task]:
        """claimed -> running for many (task id, session id, attempt) in one statement.

        Returns the tasks that moved; the caller retries the others one by one with start()
        to get their precise outcome.
        """
        if not held:
            return []
        ids, sessions, attempts = zip(*held, strict=True)
        return await self._all(
            START_MANY, {"ids": list(ids), "sessions": list(sessions), "attempts": list(attempts)}
        )

    async def complete_many(self, results: Sequence[tuple[UUID, UUID, int, Any]]) -> list[Task]:
        """Complete many (task id, session id, attempt, response) in one statement.

        Returns the tasks that completed; the caller retries the others with complete() to get
        their precise outcome (idempotent repeat, LeaseLost, InvalidTransition).
        """
        if not results:
            return []
        ids, sessions, attempts, bodies = zip(*results, strict=True)
        return await self._all(
            COMPLETE_MANY,
            {
                "ids": list(ids),
                "sessions": list(sessions),
                "attempts": list(attempts),
                "bodies": [Jsonb(b) for b in bodies],
            },
        )

    async def finish_many(
        self, session_id: UUID, outcomes: Sequence[Outcome]
    ) -> list[Finished | Exception]:
        """End many tasks held by one session: one statement for all of them.

        Returns one entry per outcome, in order: Finished, or the exception complete() or
        fail() would have raised for it alone (LeaseLost, InvalidTransition, TaskNotFound, a
        psycopg DataError for a value the database refuses). Items the statement did not move and
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
            async with self.pool.connection() as conn:
                cur = await conn.execute(FINISH_MANY, params)
                rows = await cur.fetchall()
        except (psycopg.errors.DataError, psycopg.errors.IntegrityError):
            rows = []  # one refused value fails the statement: find it item by item
        for task_id, status, attempt in rows:
            results[first[task_id]] = Finished(task_id, TaskStatus(status), attempt)
        for i, o in enumerate(outcomes):
            if results[i] is None:
                results[i] = await self._finish_one(session_id, o)
        return [r for r in results if r is not None]

    async def _finish_one(self, session_id: UUID, o: Outcome) -> Finished | Exception:
        try:
            if o.error is not None:
                task = await self.fail(o.task_id, session_id, o.attempt, o.error)
            else:
                task = await self.complete(o.task_id, session_id, o.attempt, o.response)
        except (InferqError, psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
            return exc
        return Finished(task.id, task.status, task.attempt)

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

    async def extend_leases(self, session_id: UUID, lease_s: float) -> dict[UUID, int]:
        """Push the lease of every task the session holds; returns {task id: attempt}."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(EXTEND_LEASES, {"session": session_id, "lease_s": lease_s})
            return {row[0]: row[1] for row in await cur.fetchall()}

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
        async with self.pool.connection() as conn:
            cur = await conn.execute(GC_DELETE, {"now": now, "retention_s": retention_s})
            deleted = cur.rowcount
        return GcResult(expired, deleted)
