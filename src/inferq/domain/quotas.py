"""Quotas of a token, the state of its rate windows at admission, and usage totals."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Quota:
    """A token's limits; None is no limit. ``max_running`` is enforced at claim time, the
    others when a request is admitted."""

    max_pending: int | None = None
    max_running: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    # Tasks cancelled or failed per rolling hour; None: the server's default
    # (INFERQ_MAX_DISCARDED_PER_HOUR). Checked by the submit's own INSERT, not at admission.
    discarded_per_hour: int | None = None

    @property
    def unlimited(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    @property
    def admits_freely(self) -> bool:
        """No limit is checked at admission (only max running, or nothing, is set)."""
        return (
            self.max_pending is None
            and self.requests_per_minute is None
            and (self.tokens_per_minute is None and self.tokens_per_day is None)
        )

    def as_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


QUOTA_FIELDS = tuple(f.name for f in fields(Quota))


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Where a token stands in its windows after an admission (OpenAI's x-ratelimit-*).

    ``refused`` names the limit that refused the request (None: admitted); ``retry_after_s``
    is when that limit's window ends.
    """

    refused: str | None
    requests_limit: int | None
    requests_used: int
    requests_reset_s: float
    tokens_limit: int | None  # tokens per minute, else per day
    tokens_used: int
    tokens_reset_s: float
    max_pending: int | None = None
    pending: int = 0
    retry_after_s: float = 1.0

    @property
    def requests_remaining(self) -> int | None:
        if self.requests_limit is None:
            return None
        return max(0, self.requests_limit - self.requests_used)

    @property
    def tokens_remaining(self) -> int | None:
        if self.tokens_limit is None:
            return None
        return max(0, self.tokens_limit - self.tokens_used)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """The usage of one owner, token and model in one hour (completed tasks only)."""

    hour: datetime
    owner_id: str
    token_id: UUID | None
    model: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict[str, Any]:
        return {
            "hour": self.hour,
            "owner": self.owner_id,
            "token_id": self.token_id,
            "model": self.model,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
