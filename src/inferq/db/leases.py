"""LeaseRepository: named leases in inferq.maintenance_lease, one holder at a time.

One guarded upsert both acquires and renews: it takes the row when it is free, expired, or
already ours, and returns nothing otherwise. Expiry is database time
(``coalesce(%(now)s, now())`` so tests can pin the clock).
"""

from __future__ import annotations

from datetime import datetime

from inferq.db.errors import connect
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


class LeaseRepository:
    """Acquire, renew, release and read named leases."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def acquire(
        self, name: str, holder: str, ttl_s: float, now: datetime | None = None
    ) -> bool:
        """Take or renew ``name`` for ``holder``; True when it holds it for ``ttl_s``."""
        params = {"name": name, "holder": holder, "ttl_s": ttl_s, "now": now}
        async with connect(self.pool) as conn:
            cur = await conn.execute(ACQUIRE, params)
            return await cur.fetchone() is not None

    async def release(self, name: str, holder: str) -> None:
        async with connect(self.pool) as conn:
            await conn.execute(RELEASE, {"name": name, "holder": holder})

    async def holder(self, name: str) -> str | None:
        """Who holds (or last held) ``name``."""
        async with connect(self.pool) as conn:
            cur = await conn.execute(CURRENT, {"name": name})
            row = await cur.fetchone()
            return None if row is None else str(row[0])
