"""BenchTasks: the batched statements only the benchmark uses (many tasks per statement).

The pipeline scenario measures what the database can do when a daemon groups requests into one
statement (one notifying commit) per batch; these are those statements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.types.json import Jsonb

from inferq.db.pool import Pool
from inferq.db.rows import TASK_SELECT, render, task_row
from inferq.domain.task import Task

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


class BenchTasks:
    """Many tasks per statement, over the benchmark's own pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def _all(self, query: str, params: dict[str, Any]) -> list[Task]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=task_row)
            await cur.execute(query, params)
            return await cur.fetchall()

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

    async def start_many(self, held: Sequence[tuple[UUID, UUID, int]]) -> list[Task]:
        """claimed -> running for many (task id, session id, attempt); the tasks that moved."""
        if not held:
            return []
        ids, sessions, attempts = zip(*held, strict=True)
        return await self._all(
            START_MANY, {"ids": list(ids), "sessions": list(sessions), "attempts": list(attempts)}
        )

    async def complete_many(self, results: Sequence[tuple[UUID, UUID, int, Any]]) -> list[Task]:
        """Complete many (task id, session id, attempt, response); the tasks that completed."""
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
