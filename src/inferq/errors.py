"""The InferqError tree; each class's docstring is its default message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from inferq.domain.task import Task


class InferqError(Exception):
    """inferq failed."""

    # The task a failed OpenAI call was about, when one exists (X-Inferq-Task-Id).
    task_id: UUID | None = None

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigurationError(InferqError):
    """The configuration is invalid; check the INFERQ_* environment variables."""


class MigrationError(InferqError):
    """The database schema could not be migrated."""


class DatabaseBehind(MigrationError):
    """The database schema is behind this version of inferq; run `inferq migrate`."""


class ChecksumMismatch(MigrationError):
    """An applied migration file was edited; migrations are forward-only, add a new file."""


class TaskError(InferqError):
    """The task operation failed."""

    def __init__(self, message: str | None = None, *, task: Task | None = None) -> None:
        super().__init__(message)
        self.task = task


class TaskNotFound(TaskError):
    """No such task."""


class InvalidTransition(TaskError):
    """The task is not in a state that allows this operation."""


class LeaseLost(TaskError):
    """This worker no longer holds the task (stale attempt, reverted, or claimed elsewhere)."""


class IdempotencyConflict(TaskError):
    """The Idempotency-Key was already used for a different request."""


class FileNotFound(InferqError):
    """No such file."""


class BatchNotFound(InferqError):
    """No such batch."""


class UnknownModel(InferqError):
    """The model is not in the LLM registry; list models with GET /v1/models."""


class SessionNotFound(InferqError):
    """The worker session does not exist or expired; bind again."""


class WaitTimeout(TaskError):
    """The task did not finish before the deadline."""


class TaskCancelled(TaskError):
    """The task was cancelled."""


class TaskFailed(TaskError):
    """The task failed."""


class LimitExceeded(InferqError):
    """A limit was exceeded; retry later."""

    def __init__(self, message: str | None = None, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(LimitExceeded):
    """This replica is shutting down; retry, another replica will answer."""


class NoWorkerAvailable(LimitExceeded):
    """No worker serves this pool right now; retry later, or use the native task API, whose
    tasks wait for a worker."""


class ClientGone(InferqError):
    """The client closed the connection while its request waited."""


class TooManyWaits(LimitExceeded):
    """This token has too many open waits and streams (INFERQ_MAX_WAITS_PER_TOKEN)."""


class TooManyPending(LimitExceeded):
    """This token's owner has too many pending tasks (INFERQ_MAX_PENDING_PER_TOKEN)."""


class QuotaExceeded(LimitExceeded):
    """This token is over one of its quotas (inferq token update, sql/0007_quotas.sql)."""

    def __init__(
        self, message: str | None = None, *, retry_after_s: float = 1.0, limits: Any = None
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.limits = limits  # inferq.domain.quotas.RateLimits: the x-ratelimit-* headers


# -- who may do what --------------------------------------------------------------------------


class Unauthorized(InferqError):
    """Missing or invalid bearer token: send `Authorization: Bearer <token>`."""


class TokenRevoked(Unauthorized):
    """This token was revoked."""


class Forbidden(InferqError):
    """This token may not use this route."""


class RouteNotFound(InferqError):
    """No such route."""


class TokenNotFound(InferqError):
    """No such token (or it is already revoked)."""


class InvalidRequest(InferqError):
    """The request is invalid."""

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# -- the database, as the repositories report it ----------------------------------------------


class DatabaseError(InferqError):
    """The database failed; see the server log."""


class DatabaseUnavailable(DatabaseError):
    """The database is unavailable; retry."""


class AboveCap(InvalidRequest):
    """A value of the request is above its cap."""


class InvalidValue(InvalidRequest):
    """The database refused a value of the request."""


def context(**values: Any) -> str:
    """Render key=value pairs for an error message."""
    return ", ".join(f"{k}={v}" for k, v in values.items())
