"""StatsRepository: the queue statistics (tasks per pool and status, depth and oldest pending
task per pool and lane, live sessions) and the operators' listing of tasks across owners."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from psycopg import sql

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.db.rows import TASK_SELECT, decode_cursor, encode_cursor, render, task_row
from inferq.domain.records import Page, QueueStats
from inferq.domain.task import TaskStatus
from inferq.errors import DatabaseUnavailable

STATS = """
SELECT 'task' AS kind, pool_name::text, status::text, count(*)::bigint, 0::bigint
FROM inferq.task GROUP BY pool_name, status
UNION ALL
SELECT 'session', '', '', count(*)::bigint, coalesce(sum(capacity), 0)::bigint
FROM inferq.worker_session WHERE expires_at > now()
"""

# Per pool and lane, the pending tasks and how long the oldest has waited (database time),
# read from the pending rows only (task_lane_drain_idx leads with pool and lane).
PENDING_AGE = """
SELECT pool_name::text, lane, count(*)::bigint,
       extract(epoch FROM now() - min(created_at))::float8
FROM inferq.task WHERE status = 'pending' GROUP BY pool_name, lane
"""


# Tasks across owners, newest first, for admins; each filter is optional. An owner's listing
# reads task_owner_listing_idx; the rest walk the tasks newest first, which is fine for an
# operator's page (the cursor keeps each page bounded).
LIST_ALL = render(
    sql.SQL(
        """
SELECT {task_select} FROM inferq.task t
WHERE (%(owner)s::text IS NULL OR t.owner_id = %(owner)s)
  AND (%(pool)s::text IS NULL OR t.pool_name = %(pool)s)
  AND (%(lane)s::text IS NULL OR t.lane = %(lane)s)
  AND (%(status)s::inferq.task_status[] IS NULL OR t.status = ANY(%(status)s))
  AND (%(after_ts)s::timestamptz IS NULL OR (t.created_at, t.id) < (%(after_ts)s, %(after_id)s))
ORDER BY t.created_at DESC, t.id DESC
LIMIT %(limit)s
"""
    ).format(task_select=TASK_SELECT)
)

# Replicas name their LISTEN connection (inferq.db.listener); the same role sees them all.
LISTENERS = """
SELECT count(*) FROM pg_stat_activity
WHERE application_name = 'inferq-listener' AND datname = current_database()
"""


class StatsRepository:
    """Cluster-wide figures read in one grouped statement."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.queue_reads = 0  # statements run by queue(), for tests and curious operators

    async def ping(self, timeout_s: float) -> None:
        """One round trip within ``timeout_s``; raises DatabaseUnavailable otherwise."""
        try:
            async with asyncio.timeout(timeout_s), connect(self.pool, timeout_s) as conn:
                await conn.execute("SELECT 1")
        except TimeoutError:
            raise DatabaseUnavailable(f"no answer within {timeout_s:g} s") from None

    async def queue(self) -> QueueStats:
        """Task counts per pool and status, the live worker sessions, and the age of the
        oldest pending task per pool."""
        tasks: dict[str, dict[str, int]] = {}
        sessions = capacity = 0
        async with connect(self.pool) as conn:
            self.queue_reads += 1
            cur = await conn.execute(STATS)
            for kind, pool_name, status, n, cap in await cur.fetchall():
                if kind == "task":
                    tasks.setdefault(pool_name, {})[status] = int(n)
                else:
                    sessions, capacity = int(n), int(cap)
            cur = await conn.execute(PENDING_AGE)
            lanes: dict[str, dict[str, tuple[int, float]]] = {}
            for pool_name, lane, n, age in await cur.fetchall():
                lanes.setdefault(pool_name, {})[lane] = (int(n), float(age))
        ages = {p: max(age for _, age in per.values()) for p, per in lanes.items()}
        return QueueStats(tasks, sessions, capacity, ages, lanes)

    async def list_tasks(
        self,
        *,
        owner_id: str | None = None,
        pool_name: str | None = None,
        lane: str | None = None,
        statuses: Sequence[TaskStatus] | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Tasks of every owner matching the filters, newest first; raises ValueError for a
        cursor that is not one of ours."""
        after_ts, after_id = decode_cursor(cursor) if cursor else (None, None)
        params = {
            "owner": owner_id,
            "pool": pool_name,
            "lane": lane,
            "status": [s.value for s in statuses] if statuses else None,
            "after_ts": after_ts,
            "after_id": after_id,
            "limit": limit + 1,
        }
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=task_row)
            await cur.execute(LIST_ALL, params)
            tasks = await cur.fetchall()
        more = len(tasks) > limit
        tasks = tasks[:limit]
        return Page(tasks, encode_cursor(tasks[-1]) if more else None)

    async def listeners(self) -> int:
        """How many replicas hold their LISTEN connection now (one per running replica)."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(LISTENERS)
            row = await cur.fetchone()
        return int(row[0]) if row else 0
