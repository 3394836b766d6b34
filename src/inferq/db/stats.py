"""StatsRepository: the queue statistics (tasks per pool and status, the oldest pending task
per pool, live sessions)."""

from __future__ import annotations

import asyncio

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.domain.records import QueueStats
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

    async def listeners(self) -> int:
        """How many replicas hold their LISTEN connection now (one per running replica)."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(LISTENERS)
            row = await cur.fetchone()
        return int(row[0]) if row else 0
