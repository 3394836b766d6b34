"""Files and batches as OpenAI's Files and Batches APIs know them (pure records)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

# OpenAI's batch lifecycle: validating -> in_progress -> finalizing -> completed, or failed
# (a bad input file), expired (the completion window ended), cancelling -> cancelled.
OPEN = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
ENDED = frozenset({"failed", "completed", "expired", "cancelled"})

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    owner_id: str
    purpose: str
    filename: str
    bytes: int
    lines: int
    status: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Batch:
    id: str
    owner_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    metadata: dict[str, Any] | None
    errors: dict[str, Any] | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    created_at: datetime
    expires_at: datetime
    in_progress_at: datetime | None
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None


@dataclass(frozen=True, slots=True)
class Counts:
    """How many lines of a batch ended completed or failed (cancelled and expired count as
    failed, as OpenAI counts them), of ``total``."""

    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class Line:
    """One validated input line, ready to become a task."""

    custom_id: str
    body: dict[str, Any]
    pool_name: str
    llm_name: str
    model: str
    tier: str
