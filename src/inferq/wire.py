"""Wire schemas of the v1 protocol (docs/protocol.md), shared by the daemon and the worker SDK.

Imports only pydantic, so a worker installs without the server's packages.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PoolName = str
JsonValue = Any

# The inferq.pool_name domain of sql/0001_schema.sql: what a task's pool can be.
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}", re.ASCII)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Lenient(BaseModel):
    """Answers may grow fields; clients ignore what they do not know."""

    model_config = ConfigDict(extra="ignore")


# -- errors -----------------------------------------------------------------------------------


class ErrorBody(_Lenient):
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    task: dict[str, Any] | None = None


class ErrorResponse(_Lenient):
    error: ErrorBody


# -- client, native ---------------------------------------------------------------------------


class SubmitRequest(_Wire):
    model: str | None = Field(default=None, max_length=200)
    llm: str | None = Field(default=None, max_length=200)
    pool: PoolName | None = Field(default=None, max_length=63)
    request: dict[str, JsonValue]
    streaming: bool = False
    agent_id: str | None = Field(default=None, max_length=200)
    priority: int = Field(default=0, ge=-1000, le=1000)
    max_attempts: int | None = Field(default=None, ge=1, le=100)


class TaskOut(_Lenient):
    id: UUID
    status: Literal["pending", "claimed", "running", "completed", "error", "cancelled"]
    pool: str
    llm: str | None = None
    model: str | None = None
    tier: str | None = None
    streaming: bool = False
    request: JsonValue = None
    response: JsonValue = None
    error: str | None = None
    attempt: int = 0
    max_attempts: int = 1
    priority: int = 0
    agent_id: str | None = None
    created_at: datetime
    claimed_at: datetime | None = None
    stream_started_at: datetime | None = None
    completed_at: datetime | None = None
    # GET /v1/tasks/{id} only: pending, and no live worker session serves its pool.
    waiting_for_worker: bool | None = None


class TaskPage(_Lenient):
    data: list[TaskOut]
    next_cursor: str | None = None


# -- worker -----------------------------------------------------------------------------------


class BindRequest(_Wire):
    pools: list[PoolName] = Field(min_length=1, max_length=64)
    capacity: int = Field(default=1, ge=1, le=10_000)
    name: str | None = Field(default=None, max_length=200)

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, pools: list[str]) -> list[str]:
        # No task can ever be queued in such a pool: a typo would bind a session that idles.
        for pool in pools:
            if not POOL_NAME.fullmatch(pool):
                raise ValueError(
                    f"{pool[:70]!r} is not a pool name (letters, digits, `_.:-`, at most 63)"
                )
        return pools


class WorkerTask(_Lenient):
    id: UUID
    attempt: int
    pool: str
    llm: str | None = None
    model: str | None = None
    streaming: bool = False
    request: dict[str, JsonValue]
    priority: int = 0
    lease_expires_at: datetime | None = None


class BindResponse(_Lenient):
    session_id: UUID
    pools: list[str]
    capacity: int
    lease_s: float
    heartbeat_s: float
    # Claimed tasks must be acknowledged (start, a heartbeat naming them, an outcome) within
    # this long; absent from daemons that do not ask for it.
    claim_ack_s: float | None = None
    tasks: list[WorkerTask] = []


class ClaimRequest(_Wire):
    max_tasks: int = Field(default=1, ge=1, le=1000)
    wait_s: float = Field(default=30.0, ge=0, le=600)


class ClaimResponse(_Lenient):
    tasks: list[WorkerTask]


class HeartbeatRequest(_Wire):
    tasks: list[UUID] = Field(default_factory=list, max_length=10_000)


class HeartbeatResponse(_Lenient):
    cancelled: list[UUID]
    lost: list[UUID]
    lease_s: float
    heartbeat_s: float


class UnbindResponse(_Lenient):
    released: int


# Attempts and seqs are PostgreSQL integers.
INT4_MAX = 2**31 - 1


class Holder(_Wire):
    session_id: UUID
    attempt: int = Field(ge=1, le=INT4_MAX)


class ChunkItem(_Wire):
    seq: int = Field(ge=1, le=INT4_MAX)
    data: JsonValue


class ChunksRequest(Holder):
    chunks: list[ChunkItem] = Field(min_length=1, max_length=10_000)


class ChunksResponse(_Lenient):
    last_seq: int


class CompleteRequest(Holder):
    response: JsonValue


class FailRequest(Holder):
    message: str = Field(min_length=1, max_length=100_000)


class OutcomeItem(_Wire):
    """One task's end: ``error`` fails it with that message, else ``response`` completes it."""

    task_id: UUID
    attempt: int = Field(ge=1, le=INT4_MAX)
    response: JsonValue = None
    error: str | None = Field(default=None, min_length=1, max_length=100_000)

    @model_validator(mode="after")
    def _one_of(self) -> OutcomeItem:
        if self.error is not None and "response" in self.model_fields_set:
            raise ValueError("an outcome has either a response or an error, not both")
        if self.error is None and "response" not in self.model_fields_set:
            raise ValueError("an outcome needs a response (completed) or an error (failed)")
        return self


class OutcomesRequest(_Wire):
    outcomes: list[OutcomeItem] = Field(min_length=1, max_length=1000)
    # Claim up to this many more tasks in the same call, without waiting (a busy worker's
    # next work arrives with the answer).
    claim: int = Field(default=0, ge=0, le=1000)


# -- admin ------------------------------------------------------------------------------------


class LlmIn(_Wire):
    name: str = Field(min_length=1, max_length=200)
    pool: PoolName = Field(min_length=1, max_length=63)
    model: str | None = Field(default=None, max_length=200)
    tier: str = Field(default="standard", max_length=64)
    # Caps on a request's `max_tokens` (and `max_completion_tokens`) and `n` (and `best_of`);
    # null: the replica's INFERQ_MAX_TOKENS / INFERQ_MAX_N.
    max_tokens: int | None = Field(default=None, ge=1, le=100_000_000)
    max_n: int | None = Field(default=None, ge=1, le=1000)


class LlmOut(_Lenient):
    name: str
    pool: str
    model: str
    tier: str
    max_tokens: int | None = None
    max_n: int | None = None
    created_at: datetime


class TokenIn(_Wire):
    owner: str = Field(min_length=1, max_length=200)
    role: Literal["client", "worker", "admin"] = "client"
    # None: every pool. An empty list would be stored as NULL too, silently widening it.
    pools: list[PoolName] | None = Field(default=None, min_length=1)
    label: str | None = Field(default=None, max_length=200)


class TokenOut(_Lenient):
    id: UUID
    owner: str
    role: str
    pools: list[str] | None = None
    label: str | None = None
    created_at: datetime
    revoked_at: datetime | None = None
    secret: str | None = None  # only in the answer to a create


class LlmList(_Lenient):
    data: list[LlmOut]


class LlmDeleted(_Lenient):
    deleted: str


class TokenList(_Lenient):
    data: list[TokenOut]


class TokenRevoked(_Lenient):
    revoked: UUID


class QueueStatsOut(_Lenient):
    pools: dict[str, dict[str, int]]  # pool -> status -> count
    sessions: dict[str, int]  # live, capacity


# -- worker outcomes --------------------------------------------------------------------------


class TaskState(_Lenient):
    id: UUID
    status: str
    attempt: int


class OutcomeResult(_Lenient):
    """One item's answer: the status code and body its single route would have given."""

    id: UUID
    status_code: int
    task: TaskState | None = None
    error: ErrorBody | None = None


class OutcomesResponse(_Lenient):
    results: list[OutcomeResult]
    tasks: list[WorkerTask] = []


# -- OpenAI shapes (answers are the worker's, relayed as they are) ----------------------------


class ModelOut(_Lenient):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    pool: str | None = None
    tier: str | None = None


class ModelList(_Lenient):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class _OpenAIRequest(BaseModel):
    """The fields inferq reads of an OpenAI request; the body is queued as it came."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=200)
    stream: bool | None = False


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[Any]


class TextCompletionRequest(_OpenAIRequest):
    prompt: Any


class CompletionOut(_Lenient):
    """A chat.completion or text_completion object, exactly as the worker produced it; with
    ``stream: true`` the answer is ``text/event-stream`` of its chunk objects instead."""

    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


# -- operations -------------------------------------------------------------------------------


class HealthOut(_Lenient):
    status: str


class ReadyOut(_Lenient):
    status: Literal["ready", "unavailable"]
    checks: dict[str, str]


# -- files and batches (OpenAI's shapes) ------------------------------------------------------


class FileOut(_Lenient):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    status_details: str | None = None


class FileList(_Lenient):
    object: Literal["list"] = "list"
    data: list[FileOut]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(_Lenient):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class CreateBatchRequest(_Wire):
    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=16)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


class RequestCounts(_Lenient):
    total: int
    completed: int
    failed: int


class BatchOut(_Lenient):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: dict[str, Any] | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(_Lenient):
    object: Literal["list"] = "list"
    data: list[BatchOut]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
