"""QuotaService: per-token quotas, kept and enforced in PostgreSQL so they hold across replicas.

- **Admission** (``admit``, called by TaskService.submit just before the insert): max pending,
  tokens per minute, tokens per day and requests per minute, in one statement
  (inferq.db.quotas.ADMIT). Over a limit: QuotaExceeded, a 429 with ``Retry-After`` (the end
  of that limit's window) and the x-ratelimit-* figures.
- **Max running** is enforced where tasks are claimed (sql/0007_quotas.sql: the trigger
  task_hold_running_quota, and the claim's RUNNING_CAP clause), never here.
- **The hot path.** A token without a quota row pays nothing but a dict lookup: whether a
  token has a quota is cached per replica for ``refresh_s`` (INFERQ_QUOTA_REFRESH_S). A token
  with one pays one statement per submit. So a quota set (or removed) on another replica
  takes effect here within ``refresh_s``; on this replica at once.

The slack, stated in the README: requests per minute is exact per fixed minute of database
time (a burst across a minute boundary may see up to twice the limit within a few seconds);
max pending may be passed by the submits of the token in flight at that instant on all
replicas (the count and the insert are two statements); tokens per minute and per day count
the usage of completed tasks only, so the requests admitted while the window still had room
all run, even if together they use more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from inferq.db.quotas import QuotaRepository
from inferq.domain.quotas import QUOTA_FIELDS, Quota, RateLimits
from inferq.domain.records import ApiToken
from inferq.errors import InvalidRequest, QuotaExceeded

_REFUSALS = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "tokens_per_day": "tokens per day",
    "max_pending": "pending tasks",
}
# The largest value of each limit (sql/0007_quotas.sql checks the same).
MAX_QUOTA = {
    "max_pending": 100_000_000,
    "max_running": 100_000_000,
    "requests_per_minute": 100_000_000,
    "tokens_per_minute": 1_000_000_000_000,
    "tokens_per_day": 1_000_000_000_000,
    "discarded_per_hour": 100_000_000,
}


class QuotaService:
    """One per replica; see the module docstring."""

    def __init__(self, quotas: QuotaRepository, refresh_s: float = 5.0) -> None:
        self.quotas = quotas
        self.refresh_s = refresh_s
        self._known: dict[UUID, tuple[Quota | None, float]] = {}

    async def admit(self, token: ApiToken) -> RateLimits | None:
        """Admit one request of ``token``: its windows after this request, or None when it
        has no admission limit. Raises QuotaExceeded (429) when over one."""
        quota = await self._quota(token.id)
        if quota is None or quota.admits_freely:
            return None
        limits = await self.quotas.admit(token.id)
        if limits is None:  # the quota was removed meanwhile
            self._known.pop(token.id, None)
            return None
        if limits.refused is not None:
            raise QuotaExceeded(_message(limits), retry_after_s=limits.retry_after_s, limits=limits)
        return limits

    async def get(self, token_id: UUID) -> Quota:
        """The token's quota (no limits when it has none)."""
        return await self.quotas.get(token_id) or Quota()

    async def put(self, token_id: UUID, quota: Quota) -> Quota:
        """Replace the token's quota; raises InvalidRequest, TokenNotFound."""
        for name in QUOTA_FIELDS:
            value, most = getattr(quota, name), MAX_QUOTA[name]
            if value is not None and not 0 <= value <= most:
                raise InvalidRequest(f"{name} must be between 0 and {most:,}", param=name)
        stored = await self.quotas.put(token_id, quota)
        self._known.pop(token_id, None)
        return stored

    async def _quota(self, token_id: UUID) -> Quota | None:
        now = time.monotonic()
        known = self._known.get(token_id)
        if known is not None and now - known[1] < self.refresh_s:
            return known[0]
        quota = await self.quotas.get(token_id)
        if len(self._known) >= 100_000:
            self._known.clear()
        self._known[token_id] = (quota, now)
        return quota


def _message(limits: RateLimits) -> str:
    what = _REFUSALS.get(limits.refused or "", limits.refused or "a quota")
    if limits.refused == "max_pending":
        return (
            f"this token has {limits.pending} pending tasks, its quota of {what} "
            f"(max_pending={limits.max_pending}); retry when some have been claimed"
        )
    if limits.refused == "requests_per_minute":
        figure = f"{limits.requests_limit}"
    else:
        figure = f"{limits.tokens_limit} ({limits.tokens_used} used)"
    return (
        f"rate limit reached: this token's quota of {what} is {figure}; "
        f"retry in {max(1, round(limits.retry_after_s))} s"
    )


@dataclass
class RatePruner:
    """The maintenance sweep that drops minute rows no window needs any more."""

    quotas: QuotaRepository
    name: str = "token_rates"

    async def run_once(self, now: datetime | None = None) -> int:
        return await self.quotas.prune(now)
