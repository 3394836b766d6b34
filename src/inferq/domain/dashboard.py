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
    """An owner's use over the last day: tasks and tokens (prompt + completion) per hour, the
    share of all completions, its weight (the largest of its live tokens'; None without one)
    against the weights of the owners with completions, and its tokens' quota state."""

    owner_id: str
    completed: int
    errors: int
    share: float
    per_hour: list[int]  # oldest hour first, 24 buckets
    tokens: int | None = None
    weight: int | None = None
    quota: str | None = None
    tokens_per_hour: list[int] | None = None  # oldest hour first, 24 buckets
    weights_total: int | None = None  # of the owners with completions; None: not among them

    @property
    def weight_share(self) -> float | None:
        """The share of completions the weight promises under saturation."""
        if self.weight is None or not self.weights_total:
            return None
        return self.weight / self.weights_total


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
    """A live token, its weight, and its quota with the current use ("running 2/2 · rpm
    14/60"; None without a limit)."""

    id: UUID
    owner_id: str
    role: str
    label: str | None
    created_at: datetime
    weight: int | None = None
    quota: str | None = None


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
