"""WorkerSessionRepository: bind, heartbeat, unbind and reap worker sessions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from psycopg import sql
from psycopg.rows import class_row

from inferq.db.errors import connect
from inferq.db.pool import Pool
from inferq.db.rows import TASK_SELECT, render, task_row
from inferq.db.task_queries import REVERT_SET
from inferq.domain.records import Heartbeat, WorkerSession
from inferq.domain.task import Task
from inferq.errors import SessionNotFound

_SESSION_COLUMNS = sql.SQL(
    "id, owner_id, name, pools, capacity, created_at, last_seen_at, expires_at"
)

BIND = render(
    sql.SQL(
        """
INSERT INTO inferq.worker_session (owner_id, name, pools, capacity, expires_at)
VALUES (%(owner)s, %(name)s, %(pools)s, %(capacity)s, now() + make_interval(secs => %(ttl_s)s))
RETURNING {cols}
"""
    ).format(cols=_SESSION_COLUMNS)
)

GET = render(
    sql.SQL("SELECT {cols} FROM inferq.worker_session WHERE id = %(id)s").format(
        cols=_SESSION_COLUMNS
    )
)

GET_LIVE = render(
    sql.SQL(
        "SELECT {cols} FROM inferq.worker_session WHERE id = %(id)s AND expires_at > now()"
    ).format(cols=_SESSION_COLUMNS)
)

TOUCH = render(
    sql.SQL(
        """
UPDATE inferq.worker_session SET last_seen_at = now(),
    expires_at = now() + make_interval(secs => %(ttl_s)s)
WHERE id = %(id)s AND expires_at > now()
RETURNING {cols}
"""
    ).format(cols=_SESSION_COLUMNS)
)

# One statement: extend the session and its leases, and say what happened to the tasks the
# worker believes it holds but the database no longer gives it.
HEARTBEAT = """
WITH sess AS (
    UPDATE inferq.worker_session SET last_seen_at = now(),
        expires_at = now() + make_interval(secs => %(ttl_s)s)
    WHERE id = %(id)s AND expires_at > now()
    RETURNING id
), ext AS (
    UPDATE inferq.task t SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
    FROM sess
    -- Only what the worker reports: a task whose claim answer never reached it (the replica
    -- died mid-response) must not be kept alive forever; its lease lapses and it is rescued.
    WHERE t.claimed_by = sess.id AND t.status IN ('claimed', 'running')
      AND t.id = ANY(%(reported)s)
    RETURNING t.id, t.attempt
)
SELECT 'session' AS kind, id, 0 AS attempt FROM sess
UNION ALL
SELECT 'held', id, attempt FROM ext
UNION ALL
SELECT CASE WHEN t.status = 'cancelled' AND t.claimed_by = %(id)s THEN 'cancelled' ELSE 'lost' END,
       t.id, t.attempt
FROM inferq.task t
WHERE t.id = ANY(%(reported)s) AND NOT EXISTS (SELECT 1 FROM ext WHERE ext.id = t.id)
  -- Ended by this session's own outcome, whose answer may still be on its way to the worker:
  -- neither held nor lost (the worker would drop a task it finished).
  AND NOT (t.status IN ('completed', 'error') AND t.claimed_by = %(id)s)
UNION ALL
SELECT 'lost', r.id, 0 FROM unnest(%(reported)s::uuid[]) AS r(id)
WHERE NOT EXISTS (SELECT 1 FROM inferq.task t WHERE t.id = r.id)
"""

UNBIND = "DELETE FROM inferq.worker_session WHERE id = %(id)s"

SERVES = """
SELECT EXISTS (
    SELECT 1 FROM inferq.worker_session WHERE expires_at > now() AND %(pool)s = ANY(pools)
)
"""

REAP = render(
    sql.SQL(
        """
WITH dead AS (
    DELETE FROM inferq.worker_session
    WHERE expires_at < coalesce(%(now)s::timestamptz, now())
    RETURNING id
)
UPDATE inferq.task t {revert_set}
FROM dead
WHERE t.claimed_by = dead.id AND t.status IN ('claimed', 'running')
RETURNING {task_select}
"""
    ).format(task_select=TASK_SELECT, revert_set=REVERT_SET)
)


class WorkerSessionRepository:
    """Worker sessions over a pool of autocommit connections."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def bind(
        self,
        owner_id: str,
        pools: Sequence[str],
        capacity: int,
        *,
        ttl_s: float,
        name: str | None = None,
    ) -> WorkerSession:
        """Open a session that lives ``ttl_s`` past its last heartbeat."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(WorkerSession))
            await cur.execute(
                BIND,
                {
                    "owner": owner_id,
                    "name": name,
                    "pools": list(pools),
                    "capacity": capacity,
                    "ttl_s": ttl_s,
                },
            )
            session = await cur.fetchone()
            assert session is not None
            return session

    async def get(
        self, session_id: UUID, *, touch_ttl_s: float | None = None, live: bool = False
    ) -> WorkerSession:
        """The session; raises SessionNotFound. ``live``: one that has not expired either
        (its reaper may not have run yet). ``touch_ttl_s``: the live session, extended by it."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=class_row(WorkerSession))
            if touch_ttl_s is None:
                await cur.execute(GET_LIVE if live else GET, {"id": session_id})
            else:
                await cur.execute(TOUCH, {"id": session_id, "ttl_s": touch_ttl_s})
            session = await cur.fetchone()
        if session is None:
            raise SessionNotFound(
                f"worker session {session_id} does not exist or expired; bind again"
            )
        return session

    async def heartbeat(
        self, session_id: UUID, reported: Sequence[UUID], *, ttl_s: float, lease_s: float
    ) -> Heartbeat:
        """Extend the session and its leases; report cancelled and lost tasks.

        Raises SessionNotFound when the session expired (its tasks were already reverted).
        """
        async with connect(self.pool) as conn:
            cur = await conn.execute(
                HEARTBEAT,
                {"id": session_id, "reported": list(reported), "ttl_s": ttl_s, "lease_s": lease_s},
            )
            rows = await cur.fetchall()
        if not any(r[0] == "session" for r in rows):
            raise SessionNotFound(
                f"worker session {session_id} does not exist or expired; bind again"
            )
        held = {r[1]: r[2] for r in rows if r[0] == "held"}
        return Heartbeat(
            held,
            cancelled=[r[1] for r in rows if r[0] == "cancelled"],
            lost=[r[1] for r in rows if r[0] == "lost"],
        )

    async def serves(self, pool: str) -> bool:
        """Whether a live worker session serves ``pool`` right now."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(SERVES, {"pool": pool})
            row = await cur.fetchone()
        return bool(row and row[0])

    async def unbind(self, session_id: UUID) -> None:
        """Delete the session; the caller reverts its tasks first."""
        async with connect(self.pool) as conn:
            await conn.execute(UNBIND, {"id": session_id})

    async def reap(self, now: datetime | None = None) -> list[Task]:
        """Delete sessions that stopped heartbeating and revert the tasks they held."""
        async with connect(self.pool) as conn:
            cur = conn.cursor(row_factory=task_row)
            await cur.execute(
                REAP,
                {"now": now, "reason": "its worker stopped heartbeating", "graceful": False},
            )
            return await cur.fetchall()
