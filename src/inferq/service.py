"""TaskService: waits, event streams and chunk posts on top of the repositories and wakeups.

INTERFACE DRAFT: the wakeups work (issue 3) implements these bodies and keeps the signatures;
the HTTP API codes against them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from psycopg_pool import AsyncConnectionPool

from inferq.db.chunks import ChunkRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.task import Task
from inferq.settings import Settings


@dataclass(frozen=True, slots=True)
class StatusEvent:
    """The task changed status (also sent first, with the state at subscription)."""

    task: Task


@dataclass(frozen=True, slots=True)
class ChunkEvent:
    attempt: int
    seq: int
    data: str  # compact JSON, exactly as the worker posted it


@dataclass(frozen=True, slots=True)
class ResetEvent:
    """Chunks of earlier attempts are void: the task was reverted and runs again."""

    attempt: int
    reason: str


Event = StatusEvent | ChunkEvent | ResetEvent


class PoolWaiter(Protocol):
    async def wait(self, timeout_s: float) -> bool:
        """Sleep until work may be claimable in the pools, or the timeout; True when woken."""
        ...


class TaskService:
    """One per replica. Owns no connection: uses the pool, the wakeups hub and the relay."""

    def __init__(self, pool: AsyncConnectionPool[Any], settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.tasks = TaskRepository(pool)
        self.chunks = ChunkRepository(pool)

    async def wait_terminal(
        self, task_id: UUID, timeout_s: float, *, owner_id: str | None = None
    ) -> Task:
        """The task once terminal, or its current state at the deadline (never raises on
        timeout). Raises TaskNotFound (also for another owner's task)."""
        raise NotImplementedError

    async def wait_for(
        self, task_id: UUID, timeout_s: float, *, owner_id: str | None = None
    ) -> Task:
        """The completed task. Raises TaskCancelled, TaskFailed (worker's message),
        WaitTimeout at the deadline, TaskNotFound."""
        raise NotImplementedError

    def events(
        self,
        task_id: UUID,
        *,
        owner_id: str | None = None,
        after: tuple[int, int] | None = None,
    ) -> AsyncIterator[Event]:
        """Status changes and chunks of a task in order, gap-free per attempt, from ``after``
        (attempt, seq) exclusive. Ends after the terminal StatusEvent. Raises TaskNotFound
        before the first event."""
        raise NotImplementedError

    def pool_waiter(self, pools: Sequence[str]) -> AbstractAsyncContextManager[PoolWaiter]:
        """Register interest in new pending work of ``pools`` (before trying to claim)."""
        raise NotImplementedError

    async def post_chunks(
        self, task_id: UUID, session_id: UUID, attempt: int, chunks: Sequence[tuple[int, str]]
    ) -> int:
        """Queue (seq, data) chunks for the next flush; returns the task's last stored seq once
        the flush committed. Raises LeaseLost when the worker no longer holds the attempt."""
        raise NotImplementedError
