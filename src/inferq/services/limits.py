"""Per-token limits of one replica: open waits and streams, and pending tasks per owner.

Open waits and streams are counted in memory per token on this replica. Pending tasks are
counted in the database per owner (bounded by the cap, so the count never scans more than
cap + 1 rows), at most once per ``refresh_s`` per owner, plus the submits this replica accepted
since: a burst is refused near the cap without a count query per submit.
"""

from __future__ import annotations

import time
from uuid import UUID

from inferq.db.tasks import TaskRepository
from inferq.domain.records import ApiToken
from inferq.errors import TooManyPending, TooManyWaits
from inferq.metrics import Metrics


class WaitSlots:
    """The open waits and streams of each token on this replica."""

    def __init__(self, cap: int, metrics: Metrics) -> None:
        self.cap = cap
        self.metrics = metrics
        self._held: dict[UUID, int] = {}

    @property
    def open_count(self) -> int:
        """Open waits and streams on this replica, all tokens together."""
        return sum(self._held.values())

    def acquire(self, token: ApiToken) -> None:
        """Take one of the token's slots; raises TooManyWaits (429) when all are taken."""
        held = self._held.get(token.id, 0)
        if held >= self.cap:
            raise TooManyWaits(
                f"this token has {held} open waits and streams "
                f"(INFERQ_MAX_WAITS_PER_TOKEN={self.cap})"
            )
        self._held[token.id] = held + 1
        self.metrics.open_waits.inc()

    def release(self, token: ApiToken) -> None:
        self.metrics.open_waits.dec()
        left = self._held.get(token.id, 1) - 1
        if left > 0:
            self._held[token.id] = left
        else:
            self._held.pop(token.id, None)


class PendingLimiter:
    """Refuses a submit once the owner has ``cap`` pending tasks."""

    def __init__(self, tasks: TaskRepository, cap: int, refresh_s: float = 1.0) -> None:
        self.tasks = tasks
        self.cap = cap
        self.refresh_s = refresh_s
        self._counts: dict[str, tuple[int, float]] = {}

    async def check(self, owner_id: str) -> None:
        """Raise TooManyPending when the owner has ``cap`` pending tasks or more."""
        now = time.monotonic()
        cached = self._counts.get(owner_id)
        if cached is None or now - cached[1] > self.refresh_s or cached[0] >= self.cap:
            cached = (await self.tasks.count_pending(owner_id, self.cap), now)
        if cached[0] >= self.cap:
            self._counts[owner_id] = cached
            raise TooManyPending(
                f"owner {owner_id!r} has {self.cap} pending tasks or more "
                "(INFERQ_MAX_PENDING_PER_TOKEN); retry when some have been claimed",
                retry_after_s=max(1.0, self.refresh_s),
            )
        self._counts[owner_id] = (cached[0] + 1, cached[1])
        if len(self._counts) > 100_000:
            self._counts.clear()
