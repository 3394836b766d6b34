"""QueueRollup: samples every pool's depth and last minutes' throughput into inferq.queue_minute,
and deletes expired dashboard sessions."""

from __future__ import annotations

from datetime import datetime

from inferq.db.dashboard import DashboardRepository


class QueueRollup:
    """The dashboard's time series, written by one replica (the sweep's leader), so every
    replica draws the same charts; an upsert per minute and pool, harmless when run twice."""

    name = "rollup"

    def __init__(self, repo: DashboardRepository) -> None:
        self.repo = repo

    async def run_once(self, now: datetime | None = None) -> int:
        """Sample at ``now`` (database time when None); how many rows were written."""
        written = await self.repo.rollup(now)
        await self.repo.prune_sessions(now)
        return written
