"""DashboardRepository: every read of the dashboard, its browser sessions and the per-minute
rollup of the queue.

WIRING POINTS for the scheduling and quota work (issue #15), all in this module:
- LANES: ``POOLS_NOW`` (the live table) is per pool and lane; ``ROLLUP`` and the charts
  stay per pool (the lanes of a pool share its workers, so its depth and throughput are one
  curve).
- USAGE (wired): ``OWNERS`` counts tasks ended per owner per hour from ``inferq.task`` and
  reads tokens (prompt + completion) per hour from ``inferq.usage_hour`` into
  ``OwnerFigures.tokens`` and ``.tokens_per_hour``, in the same statement.
- WEIGHTS and QUOTAS (wired): ``owners()`` reads each owner's weight (the largest of its live
  tokens', as the claim's fair share has it) and, through ``QUOTA_STATE``, the quota of each
  of its live tokens with the current use where an index makes it cheap; ``tokens()`` shows
  the same per token. Quota and weight edits send no notification: an open Owners page shows
  them at its next periodic refresh (completions and submits refresh it through the task
  channel, so usage and the rate windows follow at once).
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

# A token's quota with its current use, "running 2/2 · rpm 14/60" (NULL without a limit),
# for the token ``k``. Each use is read only for a limit that is set, through the indexes the
# quotas use themselves: pending counted up to the cap (as admission does, so a token over its
# cap shows at it), claimed or running tasks, this minute's row, today's usage hours (UTC).
QUOTA_STATE = sql.SQL(
    """
(SELECT nullif(concat_ws(' · ',
    CASE WHEN q.max_pending IS NOT NULL THEN 'pending ' || (
        SELECT count(*) FROM (SELECT 1 FROM inferq.task t WHERE t.token_id = q.token_id
                              AND t.status = 'pending' LIMIT q.max_pending) p)
        || '/' || q.max_pending END,
    CASE WHEN q.max_running IS NOT NULL THEN 'running ' || (
        SELECT count(*) FROM inferq.task t
        WHERE t.token_id = q.token_id AND t.status IN ('claimed', 'running'))
        || '/' || q.max_running END,
    CASE WHEN q.requests_per_minute IS NOT NULL
        THEN 'rpm ' || coalesce(r.requests, 0) || '/' || q.requests_per_minute END,
    CASE WHEN q.tokens_per_minute IS NOT NULL
        THEN 'tpm ' || coalesce(r.tokens, 0) || '/' || q.tokens_per_minute END,
    CASE WHEN q.tokens_per_day IS NOT NULL THEN 'tpd ' || (
        SELECT coalesce(sum(u.prompt_tokens + u.completion_tokens), 0) FROM inferq.usage_hour u
        WHERE u.token_id = q.token_id AND u.hour >= date_trunc('day', now(), 'UTC'))
        || '/' || q.tokens_per_day END), '')
 FROM inferq.token_quota q
 LEFT JOIN inferq.token_rate r
     ON r.token_id = q.token_id AND r.minute = date_trunc('minute', now())
 WHERE q.token_id = k.id)
"""
)

# Per owner, its hours of the last day (hours ago, ascending buckets aligned with the arrays):
# tasks completed and failed (inferq.task), tokens used (inferq.usage_hour); its weight (as the
# claim's fair share has it: the largest of its live tokens', 1 with none), and the quota state
# of each of its live tokens that has one.
OWNERS = render(
    sql.SQL(
        """
WITH h AS (SELECT date_trunc('hour', now()) AS top),
ended AS (
    SELECT owner_id,
           extract(epoch FROM h.top - date_trunc('hour', completed_at))::int / 3600 AS hours_ago,
           count(*) FILTER (WHERE status = 'completed')::int AS completed,
           count(*) FILTER (WHERE status = 'error')::int AS errors
    FROM inferq.task, h
    WHERE status IN ('completed', 'error') AND completed_at >= h.top - interval '23 hours'
    GROUP BY 1, 2
), used AS (
    SELECT u.owner_id, extract(epoch FROM h.top - u.hour)::int / 3600 AS hours_ago,
           sum(u.prompt_tokens + u.completion_tokens)::bigint AS tokens
    FROM inferq.usage_hour u, h WHERE u.hour >= h.top - interval '23 hours'
    GROUP BY 1, 2
), hours AS (
    SELECT owner_id, array_agg(hours_ago) AS hours_ago,
           array_agg(coalesce(e.completed, 0)) AS completed,
           array_agg(coalesce(e.errors, 0)) AS errors,
           array_agg(coalesce(u.tokens, 0)) AS tokens
    FROM ended e FULL JOIN used u USING (owner_id, hours_ago)
    GROUP BY owner_id
)
SELECT hours.owner_id, hours.hours_ago, hours.completed, hours.errors, hours.tokens,
       coalesce(k.weight, 1)::int, k.names, k.states
FROM hours LEFT JOIN LATERAL (
    SELECT max(s.weight) AS weight,
           array_agg(coalesce(s.label, left(s.id::text, 8)) ORDER BY s.created_at)
               FILTER (WHERE s.state IS NOT NULL) AS names,
           array_agg(s.state ORDER BY s.created_at) FILTER (WHERE s.state IS NOT NULL) AS states
    FROM (SELECT k.id, k.label, k.created_at, k.weight, {quota} AS state
          FROM inferq.api_token k
          WHERE k.owner_id = hours.owner_id AND k.revoked_at IS NULL) s
) k ON true
"""
    ).format(quota=QUOTA_STATE)
)

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

TOKENS = render(
    sql.SQL(
        """
SELECT k.id, k.owner_id, k.role, k.label, k.created_at, k.weight, {quota}
FROM inferq.api_token k WHERE k.revoked_at IS NULL ORDER BY k.owner_id, k.created_at
"""
    ).format(quota=QUOTA_STATE)
)

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


def quota_text(names: list[str] | None, states: list[str] | None) -> str | None:
    """An owner's quota state: its one limited token's, else each one's after its label."""
    if not names or not states:
        return None
    if len(states) == 1:
        return states[0]
    return "; ".join(f"{name}: {state}" for name, state in zip(names, states, strict=True))


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
        """Each owner's tasks ended and tokens used per hour over the last 24 hours, its share
        of the completions against its weight's share, and its tokens' quota state."""
        read = []
        for owner, hours_ago, completed, errors, tokens, weight, names, states in await self._rows(
            OWNERS
        ):
            buckets = [[0] * 24, [0] * 24, [0] * 24]
            for ago, *counts in zip(hours_ago, completed, errors, tokens, strict=True):
                index = 23 - min(23, max(0, int(ago)))
                for bucket, count in zip(buckets, counts, strict=True):
                    bucket[index] += int(count)
            read.append((owner, buckets, int(weight), quota_text(names, states)))
        total = sum(sum(b[0]) for _, b, _, _ in read) or 1
        weights = sum(w for _, b, w, _ in read if sum(b[0])) or None
        return sorted(
            (
                OwnerFigures(
                    owner_id=owner,
                    completed=sum(done),
                    errors=sum(failed),
                    share=sum(done) / total,
                    per_hour=done,
                    tokens=sum(used),
                    weight=weight,
                    quota=quota,
                    tokens_per_hour=used,
                    weights_total=weights if sum(done) else None,
                )
                for owner, (done, failed, used), weight, quota in read
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
