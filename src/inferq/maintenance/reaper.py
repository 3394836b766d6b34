"""SessionReaper: deletes worker sessions that stopped heartbeating and reverts their tasks."""

from __future__ import annotations

from datetime import datetime

import structlog

from inferq.db.sessions import WorkerSessionRepository
from inferq.domain.task import Task

log = structlog.get_logger(__name__)


class SessionReaper:
    """The dead-session sweep; one guarded statement, harmless when run twice."""

    name = "reaper"

    def __init__(self, sessions: WorkerSessionRepository) -> None:
        self.sessions = sessions

    async def run_once(self, now: datetime | None = None) -> list[Task]:
        """Reap sessions expired before ``now`` (database time when None); the reverted tasks."""
        reverted = await self.sessions.reap(now)
        for task in reverted:
            log.info(
                "task_reverted",
                task_id=str(task.id),
                status=str(task.status),
                reason="session_expired",
            )
        return reverted
