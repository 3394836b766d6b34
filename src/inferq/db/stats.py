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

# How long the oldest pending task of each pool has waited (database time), read from the
# pending rows only (task_pending_drain_idx leads with the pool). A lane column would join the
# GROUP BY here, and the gauge's labels (inferq.metrics), as the scheduling work adds lanes.
PENDING_AGE = """
SELECT pool_name::text, extract(epoch FROM now() - min(created_at))::float8
FROM inferq.task WHERE status = 'pending' GROUP BY pool_name
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
            ages = {pool_name: float(age) for pool_name, age in await cur.fetchall()}
        return QueueStats(tasks, sessions, capacity, ages)

    async def listeners(self) -> int:
        """How many replicas hold their LISTEN connection now (one per running replica)."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(LISTENERS)
            row = await cur.fetchone()
        return int(row[0]) if row else 0
