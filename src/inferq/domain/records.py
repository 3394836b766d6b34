"""The records the repositories return besides tasks: tokens, models, sessions, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from inferq.domain.lanes import LANES, PRIORITY_MAX, PRIORITY_MIN, LanePolicy
from inferq.domain.quotas import RateLimits
from inferq.domain.task import Task, TaskStatus

Role = Literal["client", "worker", "admin"]


@dataclass(frozen=True, slots=True)
class ApiToken:
    """An API token; only the SHA-256 of its secret is ever stored."""

    id: UUID
    owner_id: str
    role: str
    pools: list[str] | None
    label: str | None
    created_at: datetime
    revoked_at: datetime | None
    # Scheduling (sql/0006_scheduling.sql): the lanes and priorities it may ask for, and its
    # owner's weight in the fair share of a lane.
    lanes: list[str] = field(default_factory=lambda: list(LANES))
    priority_min: int = PRIORITY_MIN
    priority_max: int = PRIORITY_MAX
    weight: int = 1

    def may_serve(self, pool: str) -> bool:
        return self.pools is None or pool in self.pools

    @property
    def policy(self) -> LanePolicy:
        lanes = tuple(lane for lane in LANES if lane in self.lanes)
        return LanePolicy(lanes, self.priority_min, self.priority_max, self.weight)


@dataclass(frozen=True, slots=True)
class Llm:
    """A registry entry: the model name a client uses, and where it is routed."""

    name: str
    pool_name: str
    model: str
    tier: str
    created_at: datetime
    # Caps on a request's `max_tokens` and `n`; None: the replica's INFERQ_MAX_TOKENS/_MAX_N.
    max_tokens: int | None = None
    max_n: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerSession:
    id: UUID
    owner_id: str
    name: str | None
    pools: list[str]
    capacity: int
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What a heartbeat tells the worker about the tasks it reported."""

    held: dict[UUID, int]  # task id -> attempt, leases extended
    cancelled: list[UUID]  # reported, and cancelled by their client
    lost: list[UUID]  # reported, but no longer held (reverted, failed by the rescuer, ...)


@dataclass(frozen=True, slots=True)
class Enqueued:
    task: Task
    created: bool
    limits: RateLimits | None = None  # the token's rate windows after it (quotas)


@dataclass(frozen=True, slots=True)
class Page:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of one held task: ``error`` fails it, else ``response`` completes it."""

    task_id: UUID
    attempt: int
    response: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """A task that an outcome ended (or found already ended the same way)."""

    task_id: UUID
    status: TaskStatus
    attempt: int
    fresh: bool = True  # False: a completion repeated (it ended the same way before)
    lane: str = "default"  # the task's lane (inferq.domain.lanes): the usage counters' label


@dataclass(frozen=True, slots=True)
class GcResult:
    expired_pending: list[Task]
    deleted: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Task counts per pool and status, the live worker sessions, and how long the oldest
    pending task of each pool has waited."""

    tasks: dict[str, dict[str, int]] = field(default_factory=dict)  # pool -> status -> n
    sessions: int = 0
    capacity: int = 0
    # pool -> seconds; pools with no pending task are absent.
    oldest_pending_s: dict[str, float] = field(default_factory=dict)
    # pool -> lane -> (pending tasks, seconds the oldest has waited); lanes with nothing
    # pending are absent.
    lanes: dict[str, dict[str, tuple[int, float]]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "pools": self.tasks,
            "sessions": {"live": self.sessions, "capacity": self.capacity},
            "lanes": {
                pool: {
                    lane: {"pending": n, "oldest_pending_s": round(age, 3)}
                    for lane, (n, age) in lanes.items()
                }
                for pool, lanes in self.lanes.items()
            },
        }
