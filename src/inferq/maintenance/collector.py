"""Collector: fails stale pending tasks, deletes terminal rows past retention and dead chunks."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog

from inferq.db.chunks import ChunkRepository
from inferq.db.tasks import TaskRepository
from inferq.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Collected:
    expired_pending: int
    deleted_tasks: int
    deleted_chunks: int


class Collector:
    """The GC sweep; each statement is guarded, so two replicas running it at once is harmless."""

    name = "collector"

    def __init__(self, tasks: TaskRepository, chunks: ChunkRepository, settings: Settings) -> None:
        self.tasks = tasks
        self.chunks = chunks
        self.settings = settings

    async def run_once(self, now: datetime | None = None) -> Collected:
        """One sweep at ``now`` (database time when None)."""
        result = await self.tasks.gc(
            pending_timeout_s=self.settings.pending_timeout_s,
            retention_s=self.settings.retention_s,
            now=now,
        )
        chunks = await self.chunks.gc(retention_s=self.settings.chunk_retention_s, now=now)
        for task in result.expired_pending:
            log.info("task_expired", task_id=str(task.id), pool=task.pool_name)
        if result.expired_pending or result.deleted or chunks:
            log.info(
                "garbage_collected",
                expired_pending=len(result.expired_pending),
                deleted_tasks=result.deleted,
                deleted_chunks=chunks,
            )
        return Collected(len(result.expired_pending), result.deleted, chunks)
