"""What the dashboard shows: plain records read by inferq.db.dashboard, rendered by inferq.api."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID


@dataclass(frozen=True, slots=True)
class PoolFigures:
    """One pool and lane now: depth, oldest wait, the last minute's completions and errors."""

    pool_name: str
    pending: int
    running: int
    oldest_pending_s: float | None
    completed_per_min: int
    errors_per_min: int
    lane: str | None = None


@dataclass(frozen=True, slots=True)
class MinuteSample:
    """One minute of one pool from inferq.queue_minute (written by the rollup sweep)."""

    minute: datetime
    pool_name: str
    pending: int
    running: int
    completed: int
    errors: int


@dataclass(frozen=True, slots=True)
class Overview:
    pools: list[PoolFigures]
    series: list[MinuteSample]
    sessions: int
    capacity: int
    now: datetime


@dataclass(frozen=True, slots=True)
class WorkerFigures:
    """A live worker session: what it serves and holds. ``backend_healthy`` is None while the
    worker protocol does not report it."""

    id: UUID
    owner_id: str
    name: str | None
    pools: list[str]
    capacity: int
    in_flight: int
    created_at: datetime
    last_seen_s: float
    expires_in_s: float
    backend_healthy: bool | None = None


@dataclass(frozen=True, slots=True)
class OwnerFigures:
    """An owner's use over the last day: tasks (and, once usage is accounted, tokens) per hour,
    the share of all completions, and the quota state (None until quotas exist)."""

    owner_id: str
    completed: int
    errors: int
    share: float
    per_hour: list[int]  # oldest hour first, 24 buckets
    tokens: int | None = None
    weight: float | None = None
    quota: str | None = None


@dataclass(frozen=True, slots=True)
class BatchFigures:
    id: str
    owner_id: str
    status: str
    endpoint: str
    total: int
    completed: int
    failed: int
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime

    @property
    def done_ratio(self) -> float:
        return (self.completed + self.failed) / self.total if self.total else 0.0


@dataclass(frozen=True, slots=True)
class TokenFigures:
    id: UUID
    owner_id: str
    role: str
    label: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class OwnersPage:
    """The Owners page: each owner's use, and the live tokens (to revoke)."""

    owners: list[OwnerFigures]
    tokens: list[TokenFigures]


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """The tasks list's search: every field optional; ``since`` bounds created_at."""

    owner: str | None = None
    pool: str | None = None
    status: str | None = None
    since: datetime | None = None
    lane: str | None = None
    limit: int = 100


@dataclass(frozen=True, slots=True)
class DashboardLogin:
    """A browser session: the admin token behind it and the CSRF secret of its forms."""

    token_id: UUID
    owner_id: str
    csrf: str
    expires_at: datetime
