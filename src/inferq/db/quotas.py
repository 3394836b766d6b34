"""QuotaRepository: a token's limits, and the one statement that admits a request under them.

The admission (``ADMIT``) is one statement, one round trip: it reads the token's windows
(requests and tokens of the current minute, tokens of the current UTC day, pending tasks up
to the cap) and, when every limit has room, takes one request of the minute with an atomic
upsert of the token's minute row (``INSERT … ON CONFLICT DO UPDATE … WHERE requests < limit
RETURNING``). The row lock of the upsert orders racing admissions on every replica, and its
``WHERE`` is re-checked against the latest row, so a minute never admits more than the limit.
Windows are fixed minutes and UTC days of database time (``now()``), never a replica's clock.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from psycopg import sql
from psycopg.rows import class_row

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.db.rows import render
from inferq.domain.quotas import QUOTA_FIELDS, Quota, RateLimits
from inferq.errors import TokenNotFound

_FIELDS = sql.SQL(", ").join(map(sql.Identifier, QUOTA_FIELDS))

_SELECT = render(
    sql.SQL("SELECT {fields} FROM inferq.token_quota WHERE token_id = %s").format(fields=_FIELDS)
)

_PUT = render(
    sql.SQL(
        """
INSERT INTO inferq.token_quota (token_id, {fields})
SELECT t.id, {values} FROM inferq.api_token t WHERE t.id = %(token)s
ON CONFLICT (token_id) DO UPDATE SET ({fields}) = ({excluded}), updated_at = now()
RETURNING {fields}
"""
    ).format(
        fields=_FIELDS,
        values=sql.SQL(", ").join(map(sql.Placeholder, QUOTA_FIELDS)),
        excluded=sql.SQL(", ").join(sql.Identifier("excluded", f) for f in QUOTA_FIELDS),
    )
)

ADMIT = """
WITH q AS (
    SELECT * FROM inferq.token_quota WHERE token_id = %(token)s
), w AS (
    SELECT date_trunc('minute', now()) AS minute, date_trunc('day', now(), 'UTC') AS day,
           now() AS at
), cur AS (
    SELECT coalesce(r.requests, 0) AS requests, coalesce(r.tokens, 0) AS tokens_minute,
           CASE WHEN q.tokens_per_day IS NULL THEN 0 ELSE coalesce((
               SELECT sum(u.prompt_tokens + u.completion_tokens) FROM inferq.usage_hour u
               WHERE u.token_id = %(token)s AND u.hour >= w.day), 0) END AS tokens_day,
           CASE WHEN q.max_pending IS NULL THEN 0 ELSE (
               SELECT count(*) FROM (
                   SELECT 1 FROM inferq.task t
                   WHERE t.token_id = %(token)s AND t.status = 'pending' LIMIT q.max_pending
               ) s) END AS pending
    FROM q CROSS JOIN w
    LEFT JOIN inferq.token_rate r ON r.token_id = %(token)s AND r.minute = w.minute
), verdict AS (
    SELECT CASE
        WHEN cur.pending >= q.max_pending THEN 'max_pending'
        WHEN cur.tokens_minute >= q.tokens_per_minute THEN 'tokens_per_minute'
        WHEN cur.tokens_day >= q.tokens_per_day THEN 'tokens_per_day'
        WHEN cur.requests >= q.requests_per_minute THEN 'requests_per_minute'
    END AS refused
    FROM q CROSS JOIN cur
), bump AS (
    INSERT INTO inferq.token_rate AS r (token_id, minute, requests)
    SELECT %(token)s, w.minute, 1 FROM w CROSS JOIN q CROSS JOIN verdict
    WHERE verdict.refused IS NULL AND q.requests_per_minute IS NOT NULL
    ON CONFLICT (token_id, minute) DO UPDATE SET requests = r.requests + 1
    WHERE r.requests < (SELECT requests_per_minute FROM inferq.token_quota
                        WHERE token_id = %(token)s)
    RETURNING r.requests
)
SELECT
    coalesce(verdict.refused, CASE WHEN q.requests_per_minute IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM bump) THEN 'requests_per_minute' END) AS refused,
    q.requests_per_minute,
    coalesce((SELECT requests FROM bump), cur.requests) AS requests_used,
    extract(epoch FROM w.minute + interval '1 minute' - w.at)::float8 AS minute_left_s,
    q.tokens_per_minute, cur.tokens_minute, q.tokens_per_day, cur.tokens_day,
    extract(epoch FROM w.day + interval '1 day' - w.at)::float8 AS day_left_s,
    q.max_pending, cur.pending
FROM q CROSS JOIN cur CROSS JOIN verdict CROSS JOIN w
"""

# Minute rows older than this are of no use to any window; the maintenance sweep drops them.
PRUNE_RATES = """
DELETE FROM inferq.token_rate
WHERE minute < date_trunc('minute', coalesce(%(now)s::timestamptz, now())) - interval '1 hour'
"""


class QuotaRepository:
    """Reads and writes token quotas; admits requests under them."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def get(self, token_id: UUID) -> Quota | None:
        """The token's quota, or None when it has no quota row."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(Quota))
            await cur.execute(_SELECT, (token_id,))
            return await cur.fetchone()

    async def put(self, token_id: UUID, quota: Quota) -> Quota:
        """Replace the token's quota (None fields: no limit); raises TokenNotFound."""
        params: dict[str, Any] = {"token": token_id, **quota.as_json()}
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(Quota))
            await cur.execute(_PUT, params)
            stored = await cur.fetchone()
        if stored is None:
            raise TokenNotFound(f"token {token_id} does not exist")
        return stored

    async def admit(self, token_id: UUID) -> RateLimits | None:
        """Admit one request of the token (see the module docstring). None when the token has
        no quota row; else its windows, ``refused`` naming the limit that refused it."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(ADMIT, {"token": token_id})
            row = await cur.fetchone()
        if row is None:
            return None
        (refused, rpm, used, minute_left, tpm, tokens_minute, tpd, tokens_day, day_left,
         max_pending, pending) = row  # fmt: skip
        tokens_limit, tokens_used, tokens_reset = (
            (tpm, tokens_minute, minute_left) if tpm is not None else (tpd, tokens_day, day_left)
        )
        if refused == "requests_per_minute" and rpm is not None:
            used = max(used, rpm)
        retry = {"tokens_per_day": day_left, "max_pending": 1.0}.get(refused or "", minute_left)
        return RateLimits(
            refused=refused,
            requests_limit=rpm,
            requests_used=int(used),
            requests_reset_s=minute_left,
            tokens_limit=tokens_limit,
            tokens_used=int(tokens_used),
            tokens_reset_s=tokens_reset,
            max_pending=max_pending,
            pending=int(pending),
            retry_after_s=retry,
        )

    async def prune(self, now: Any = None) -> int:
        """Drop minute rows older than an hour; the number dropped."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(PRUNE_RATES, {"now": now})
            return cur.rowcount
