"""Leadership: one replica at a time holds a named lease row in inferq.maintenance_lease.

Design decisions: a lease row, not a session advisory lock, because advisory locks are bound to
a server session and PgBouncer in transaction mode hands sessions around. One guarded upsert
both acquires and renews: it takes the row when it is free, expired, or already ours, and
returns nothing otherwise. Expiry is database time (``coalesce(%(now)s, now())`` so tests can
pin the clock). A holder that stops renewing loses the lease ``ttl_s`` later; a sweep run twice
around a handover is harmless because every sweep is a guarded statement.
"""

from __future__ import annotations

from datetime import datetime

from inferq.db.pool import Pool

ACQUIRE = """
INSERT INTO inferq.maintenance_lease AS l (name, holder, expires_at)
VALUES (%(name)s, %(holder)s,
        coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(ttl_s)s))
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE l.holder = excluded.holder OR l.expires_at < coalesce(%(now)s::timestamptz, now())
RETURNING l.holder
"""

RELEASE = "DELETE FROM inferq.maintenance_lease WHERE name = %(name)s AND holder = %(holder)s"

CURRENT = "SELECT holder FROM inferq.maintenance_lease WHERE name = %(name)s"


class Leadership:
    """The lease ``name`` as seen by ``holder`` (this replica)."""

    def __init__(self, pool: Pool, name: str, holder: str, *, ttl_s: float) -> None:
        self.pool = pool
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s

    async def acquire(self, now: datetime | None = None) -> bool:
        """Take or renew the lease; True when this holder has it for the next ``ttl_s``."""
        params = {"name": self.name, "holder": self.holder, "ttl_s": self.ttl_s, "now": now}
        async with self.pool.connection() as conn:
            cur = await conn.execute(ACQUIRE, params)
            return await cur.fetchone() is not None

    async def release(self) -> None:
        """Give the lease up at once (on shutdown) so another replica need not wait."""
        async with self.pool.connection() as conn:
            await conn.execute(RELEASE, {"name": self.name, "holder": self.holder})

    async def current_holder(self) -> str | None:
        """Who holds (or last held) the lease."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(CURRENT, {"name": self.name})
            row = await cur.fetchone()
            return None if row is None else str(row[0])
