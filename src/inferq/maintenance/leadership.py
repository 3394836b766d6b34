"""Leadership: one replica at a time holds a named lease row in inferq.maintenance_lease.

Design decisions: a lease row, not a session advisory lock, because advisory locks are bound to
a server session and PgBouncer in transaction mode hands sessions around. A holder that stops
renewing loses the lease ``ttl_s`` later; a sweep run twice around a handover is harmless
because every sweep is a guarded statement.
"""

from __future__ import annotations

from datetime import datetime

from inferq.db.leases import LeaseRepository


class Leadership:
    """The lease ``name`` as seen by ``holder`` (this replica)."""

    def __init__(self, leases: LeaseRepository, name: str, holder: str, *, ttl_s: float) -> None:
        self.leases = leases
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s

    async def acquire(self, now: datetime | None = None) -> bool:
        """Take or renew the lease; True when this holder has it for the next ``ttl_s``."""
        return await self.leases.acquire(self.name, self.holder, self.ttl_s, now)

    async def release(self) -> None:
        """Give the lease up at once (on shutdown) so another replica need not wait."""
        await self.leases.release(self.name, self.holder)

    async def current_holder(self) -> str | None:
        """Who holds (or last held) the lease."""
        return await self.leases.holder(self.name)
