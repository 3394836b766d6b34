"""Task, TaskStatus and the transition table the database trigger also enforces."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    CLAIMED = "claimed"
    RUNNING = "running"
    COMPLETED = "completed"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.ERROR, TaskStatus.CANCELLED})
HELD = frozenset({TaskStatus.CLAIMED, TaskStatus.RUNNING})

# Mirrors inferq.transition_allowed() in sql/0002_triggers.sql; a unit test keeps them equal.
TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.CLAIMED, TaskStatus.CANCELLED, TaskStatus.ERROR}),
    TaskStatus.CLAIMED: frozenset(
        {
            TaskStatus.RUNNING,
            TaskStatus.COMPLETED,
            TaskStatus.ERROR,
            TaskStatus.CANCELLED,
            TaskStatus.PENDING,
        }
    ),
    TaskStatus.RUNNING: frozenset(
        {TaskStatus.COMPLETED, TaskStatus.ERROR, TaskStatus.CANCELLED, TaskStatus.PENDING}
    ),
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.ERROR: frozenset(),
    TaskStatus.CANCELLED: frozenset(),
}


def transition_allowed(old: TaskStatus, new: TaskStatus) -> bool:
    """Whether the state machine allows ``old -> new``."""
    return new in TRANSITIONS[old]


@dataclass(frozen=True, slots=True)
class Task:
    """One inference request, exactly as stored in ``inferq.task``."""

    id: UUID
    status: TaskStatus
    pool_name: str
    llm_name: str | None
    model: str | None
    tier: str | None
    streaming: bool
    request_body: Any
    response_body: Any
    error_message: str | None
    claimed_by: UUID | None
    claimed_at: datetime | None
    created_at: datetime
    stream_started_at: datetime | None
    completed_at: datetime | None
    owner_id: str
    agent_id: str | None
    attempt: int
    max_attempts: int
    lease_expires_at: datetime | None
    priority: int
    idempotency_key: str | None
    releases: int = 0
    lane: str = "default"  # inferq.domain.lanes
    # Quotas and usage (sql/0007_quotas.sql): the submitting token, the answer's usage.
    token_id: UUID | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


TASK_COLUMNS = tuple(Task.__dataclass_fields__)
