"""Wakeup benchmarks: cross-replica wake latency, chunk relay throughput, memory per waiter.

Each "replica" is a ``Stack`` (its own pool, hub, Listener and TaskService) inside one process;
the notifications still travel through PostgreSQL, exactly as between processes.
Run: ``python -m inferq.bench.wakeups --dsn postgresql://...`` (a migrated, disposable database;
the tasks it creates are left behind).
"""

from __future__ import annotations

from dataclasses import dataclass

from inferq.db.listener import Listener
from inferq.db.pool import Pool, create_pool
from inferq.service import TaskService
from inferq.settings import Settings
from inferq.wakeups import Hub


@dataclass
class Stack:
    """One replica's wakeup machinery: pool, hub, listener, service."""

    settings: Settings
    pool: Pool
    hub: Hub
    listener: Listener
    service: TaskService

    @classmethod
    async def open(cls, settings: Settings) -> Stack:
        """Open the pool and start listening (unless poll-only); close() undoes it."""
        pool = create_pool(settings)
        await pool.open(wait=True)
        hub = Hub()
        listener = Listener(settings, hub)
        await listener.start()
        return cls(settings, pool, hub, listener, TaskService(pool, settings, hub=hub))

    async def close(self) -> None:
        await self.service.stop()
        await self.listener.stop()
        await self.pool.close()
