"""Rescuer: reverts tasks whose lease expired (pending again, or error after max_attempts)."""

from __future__ import annotations

from datetime import datetime

import structlog

from inferq.db.tasks import TaskRepository
from inferq.domain.task import Task

log = structlog.get_logger(__name__)


class Rescuer:
    """The lease-expiry sweep; a guarded UPDATE, harmless when run twice."""

    name = "rescuer"

    def __init__(self, tasks: TaskRepository) -> None:
        self.tasks = tasks

    async def run_once(self, now: datetime | None = None) -> list[Task]:
        """Revert every task whose lease expired before ``now`` (database time when None)."""
        reverted = await self.tasks.revert_expired(now)
        for task in reverted:
            log.info(
                "task_rescued", task_id=str(task.id), status=str(task.status), attempt=task.attempt
            )
        return reverted
