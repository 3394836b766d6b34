"""DashboardRepository: every read of the dashboard, its browser sessions and the per-minute
rollup of the queue.

WIRING POINTS for the scheduling and quota work (issue #15), all in this module:
- LANES: ``POOLS_NOW`` (the live table) is per pool and lane; ``ROLLUP`` and the charts
  stay per pool (the lanes of a pool share its workers, so its depth and throughput are one
  curve).
- USAGE: ``OWNERS`` counts completed tasks per owner per hour from ``inferq.task``; once the
  usage table (per owner, token, model, hour) exists, read tokens per hour from it into
  ``OwnerFigures.tokens``.
- WEIGHTS and QUOTAS: ``OwnerFigures.weight`` and ``.quota`` stay None until the tokens'
  weights and the quota table exist; read them in ``owners()``.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any
from uuid import UUID

from psycopg import sql

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.db.rows import TASK_SELECT, render, task_row
from inferq.domain.dashboard import (
    BatchFigures,
    DashboardLogin,
    MinuteSample,
    Overview,
    OwnerFigures,
    PoolFigures,
    TaskFilter,
    TokenFigures,
    WorkerFigures,
)
from inferq.domain.task import Task

POOLS_NOW = """
WITH depth AS (
    SELECT pool_name::text AS pool_name, lane,
           count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status IN ('claimed', 'running')) AS running,
           extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending'))
               AS oldest
    FROM inferq.task WHERE status IN ('pending', 'claimed', 'running') GROUP BY pool_name, lane
), ended AS (
    SELECT pool_name::text AS pool_name, lane,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'error') AS errors
    FROM inferq.task
    WHERE completed_at > now() - interval '1 minute' AND status IN ('completed', 'error')
    GROUP BY pool_name, lane
)
SELECT pool_name, coalesce(pending, 0)::int, coalesce(running, 0)::int, oldest::float8,
       coalesce(completed, 0)::int, coalesce(errors, 0)::int, lane
FROM depth FULL JOIN ended USING (pool_name, lane)
ORDER BY pool_name, array_position(ARRAY['interactive', 'default', 'batch'], lane)
"""

SERIES = """
SELECT minute, pool_name, pending, running, completed, errors FROM inferq.queue_minute
WHERE minute > now() - interval '1 hour' ORDER BY minute, pool_name
"""

SESSIONS = """
SELECT count(*)::int, coalesce(sum(capacity), 0)::int
FROM inferq.worker_session WHERE expires_at > now()
"""

# The depth of each pool now, and the tasks that ended in the sample's minute and the one
# before (the previous minute's last seconds may have ended after its last sample).
ROLLUP = """
WITH t AS (SELECT date_trunc('minute', coalesce(%(now)s::timestamptz, now())) AS m),
depth AS (
    SELECT pool_name::text AS pool_name,
           count(*) FILTER (WHERE status = 'pending')::int AS pending,
           count(*) FILTER (WHERE status IN ('claimed', 'running'))::int AS running
    FROM inferq.task WHERE status IN ('pending', 'claimed', 'running') GROUP BY pool_name
), ended AS (
    SELECT date_trunc('minute', completed_at) AS minute, pool_name::text AS pool_name,
           count(*) FILTER (WHERE status = 'completed')::int AS completed,
           count(*) FILTER (WHERE status = 'error')::int AS errors
    FROM inferq.task, t
    WHERE status IN ('completed', 'error')
      AND completed_at >= t.m - interval '1 minute' AND completed_at < t.m + interval '1 minute'
    GROUP BY 1, 2
), now_rows AS (
    SELECT t.m AS minute, pool_name, coalesce(d.pending, 0) AS pending,
           coalesce(d.running, 0) AS running, coalesce(e.completed, 0) AS completed,
           coalesce(e.errors, 0) AS errors
    FROM t, depth d FULL JOIN (SELECT ended.* FROM ended, t WHERE ended.minute = t.m) e
        USING (pool_name)
), before_rows AS (
    SELECT minute, pool_name, 0 AS pending, 0 AS running, completed, errors
    FROM ended, t WHERE ended.minute < t.m
), upserted AS (
    INSERT INTO inferq.queue_minute AS q (minute, pool_name, pending, running, completed, errors)
    SELECT * FROM now_rows
    UNION ALL SELECT * FROM before_rows
    ON CONFLICT (minute, pool_name) DO UPDATE SET
        pending = CASE WHEN q.minute = (SELECT m FROM t) THEN excluded.pending ELSE q.pending END,
        running = CASE WHEN q.minute = (SELECT m FROM t) THEN excluded.running ELSE q.running END,
        completed = excluded.completed, errors = excluded.errors
    RETURNING 1
), pruned AS (
    DELETE FROM inferq.queue_minute USING t WHERE minute < t.m - interval '2 days' RETURNING 1
)
SELECT (SELECT count(*) FROM upserted)::int
"""

WORKERS = """
SELECT s.id, s.owner_id, s.name, s.pools, s.capacity,
       (SELECT count(*) FROM inferq.task t
        WHERE t.claimed_by = s.id AND t.status IN ('claimed', 'running'))::int,
       s.created_at, extract(epoch FROM now() - s.last_seen_at)::float8,
       extract(epoch FROM s.expires_at - now())::float8
FROM inferq.worker_session s WHERE s.expires_at > now()
ORDER BY s.created_at, s.id
"""

OWNERS = """
SELECT owner_id, extract(epoch FROM date_trunc('hour', now()) - date_trunc('hour', completed_at))
           ::int / 3600 AS hours_ago,
       count(*) FILTER (WHERE status = 'completed')::int,
       count(*) FILTER (WHERE status = 'error')::int
FROM inferq.task
WHERE status IN ('completed', 'error')
  AND completed_at > date_trunc('hour', now()) - interval '23 hours'
GROUP BY 1, 2
"""

BATCHES = """
SELECT b.id, b.owner_id, b.status, b.endpoint, b.total,
       count(t.id) FILTER (WHERE t.status = 'completed')::int,
       count(t.id) FILTER (WHERE t.status IN ('error', 'cancelled'))::int,
       b.output_file_id, b.error_file_id, b.created_at
FROM (SELECT * FROM inferq.batch ORDER BY created_at DESC, id DESC LIMIT %(limit)s) b
LEFT JOIN inferq.task t ON t.batch_id = b.id
GROUP BY b.id, b.owner_id, b.status, b.endpoint, b.total, b.output_file_id, b.error_file_id,
         b.created_at
ORDER BY b.created_at DESC, b.id DESC
"""

BATCH_OWNER = "SELECT owner_id FROM inferq.batch WHERE id = %(id)s"
FILE_OWNER = "SELECT owner_id FROM inferq.file WHERE id = %(id)s"

TOKENS = """
SELECT id, owner_id, role, label, created_at FROM inferq.api_token
WHERE revoked_at IS NULL ORDER BY owner_id, created_at
"""

TASKS = render(
    sql.SQL(
        """
SELECT {cols} FROM inferq.task t
WHERE (%(owner)s::text IS NULL OR t.owner_id = %(owner)s)
  AND (%(pool)s::text IS NULL OR t.pool_name = %(pool)s)
  AND (%(lane)s::text IS NULL OR t.lane = %(lane)s)
  AND (%(status)s::text IS NULL OR t.status = %(status)s::inferq.task_status)
  AND (%(since)s::timestamptz IS NULL OR t.created_at >= %(since)s)
ORDER BY t.created_at DESC, t.id DESC LIMIT %(limit)s
"""
    ).format(cols=TASK_SELECT)
)

LOGIN = """
INSERT INTO inferq.dashboard_session (cookie_hash, token_id, csrf, expires_at)
VALUES (%(hash)s, %(token)s, %(csrf)s, now() + make_interval(secs => %(ttl_s)s))
RETURNING expires_at
"""

SESSION = """
SELECT s.token_id, k.owner_id, s.csrf, s.expires_at
FROM inferq.dashboard_session s JOIN inferq.api_token k ON k.id = s.token_id
WHERE s.cookie_hash = %(hash)s AND s.expires_at > now()
  AND k.revoked_at IS NULL AND k.role = 'admin'
"""

LOGOUT = """
WITH gone AS (DELETE FROM inferq.dashboard_session WHERE cookie_hash = %(hash)s RETURNING 1),
expired AS (DELETE FROM inferq.dashboard_session WHERE expires_at < now() RETURNING 1)
SELECT (SELECT count(*) FROM gone)::int
"""


PRUNE_SESSIONS = """
DELETE FROM inferq.dashboard_session WHERE expires_at < coalesce(%(now)s::timestamptz, now())
"""


def cookie_hash(cookie: str) -> bytes:
    return hashlib.sha256(cookie.encode()).digest()


class DashboardRepository:
    """The dashboard's statements; each method is one round trip."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def _rows(self, query: str, params: dict[str, Any] | None = None) -> list[Any]:
        async with connect(self.pool) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    async def overview(self) -> Overview:
        async with connect(self.pool) as conn:
            cur = await conn.execute(POOLS_NOW)
            pools = [PoolFigures(*row) for row in await cur.fetchall()]
            cur = await conn.execute(SERIES)
            series = [MinuteSample(*row) for row in await cur.fetchall()]
            cur = await conn.execute(SESSIONS)
            sessions, capacity = await cur.fetchone() or (0, 0)
            cur = await conn.execute("SELECT now()")
            now_row = await cur.fetchone()
        assert now_row is not None
        return Overview(pools, series, sessions, capacity, now_row[0])

    async def rollup(self, now: datetime | None = None) -> int:
        """Write the current minute's sample of every pool (and finish the previous minute's
        counts); prune samples older than two days. How many rows were written."""
        rows = await self._rows(ROLLUP, {"now": now})
        return int(rows[0][0]) if rows else 0

    async def prune_sessions(self, now: datetime | None = None) -> int:
        """Delete the browser sessions expired before ``now``; how many."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(PRUNE_SESSIONS, {"now": now})
            return cur.rowcount

    async def workers(self) -> list[WorkerFigures]:
        return [WorkerFigures(*row) for row in await self._rows(WORKERS)]

    async def owners(self) -> list[OwnerFigures]:
        """Tasks ended per owner per hour over the last 24 hours (see the module docstring:
        tokens, weights and quotas join here)."""
        per: dict[str, list[list[int]]] = {}
        for owner, hours_ago, completed, errors in await self._rows(OWNERS):
            buckets = per.setdefault(owner, [[0] * 24, [0] * 24])
            index = 23 - min(23, max(0, int(hours_ago)))
            buckets[0][index] += completed
            buckets[1][index] += errors
        total = sum(sum(b[0]) for b in per.values()) or 1
        return sorted(
            (
                OwnerFigures(owner, sum(b[0]), sum(b[1]), sum(b[0]) / total, b[0])
                for owner, b in per.items()
            ),
            key=lambda o: (-o.completed, o.owner_id),
        )

    async def batches(self, limit: int = 100) -> list[BatchFigures]:
        return [BatchFigures(*row) for row in await self._rows(BATCHES, {"limit": limit})]

    async def tokens(self) -> list[TokenFigures]:
        return [TokenFigures(*row) for row in await self._rows(TOKENS)]

    async def tasks(self, search: TaskFilter) -> list[Task]:
        params = {
            "owner": search.owner,
            "pool": search.pool,
            "lane": search.lane,
            "status": search.status,
            "since": search.since,
            "limit": search.limit,
        }
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=task_row)
            await cur.execute(TASKS, params)
            return await cur.fetchall()

    async def owner_of(self, kind: str, object_id: str) -> str | None:
        """The owner of a batch or a file (``kind``), None when there is none."""
        rows = await self._rows(BATCH_OWNER if kind == "batch" else FILE_OWNER, {"id": object_id})
        return str(rows[0][0]) if rows else None

    async def login(self, cookie: str, token_id: UUID, csrf: str, ttl_s: float) -> datetime:
        rows = await self._rows(
            LOGIN, {"hash": cookie_hash(cookie), "token": token_id, "csrf": csrf, "ttl_s": ttl_s}
        )
        return rows[0][0]  # type: ignore[no-any-return]

    async def session(self, cookie: str) -> DashboardLogin | None:
        """The live session of ``cookie`` (its admin token still live), or None."""
        rows = await self._rows(SESSION, {"hash": cookie_hash(cookie)})
        return DashboardLogin(*rows[0]) if rows else None

    async def logout(self, cookie: str) -> bool:
        """End the session (and every expired one); whether it existed."""
        rows = await self._rows(LOGOUT, {"hash": cookie_hash(cookie)})
        return bool(rows and rows[0][0])
