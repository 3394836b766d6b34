"""Exceptions of the worker SDK: the daemon's error JSON mapped to one class per code, and the
one a handler raises when its backend is down."""

from __future__ import annotations

from typing import Any


class WorkerApiError(Exception):
    """The daemon answered a worker call with an error (docs/protocol.md, "Errors")."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str | None = None,
        task: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.task = task


class LeaseLostError(WorkerApiError):
    """409: this session no longer holds the task at this attempt; drop it, post nothing."""


class SessionNotFoundError(WorkerApiError):
    """404 session_not_found: the session expired or was reaped; bind again."""


class TaskNotFoundError(WorkerApiError):
    """404: the task does not exist (or belongs to an owner this token cannot see)."""


class AuthenticationError(WorkerApiError):
    """401/403: the token is unknown, revoked, or may not serve these pools."""


class UnavailableError(WorkerApiError):
    """The daemon stayed unreachable (connection errors, 502/503/504) past the retry budget."""


class BackendUnavailableError(Exception):
    """A handler's backend could not be reached (refused, reset, no answer while its health
    check fails). The worker gives the task back to the queue, which uses up no attempt, and
    takes no work until the backend answers again. Its message stays on the worker."""


def error_for(status: int, body: Any) -> WorkerApiError:
    """The exception for an error answer; ``body`` is the decoded JSON (or anything else)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return WorkerApiError(f"HTTP {status}: {str(body)[:500]}", status=status)
    message = str(error.get("message") or f"HTTP {status}")
    code = error.get("code")
    task = error.get("task") if isinstance(error.get("task"), dict) else None
    cls: type[WorkerApiError] = WorkerApiError
    if status == 409 and code in ("lease_lost", "invalid_transition"):
        cls = LeaseLostError
    elif status == 404 and code == "session_not_found":
        cls = SessionNotFoundError
    elif status == 404:
        cls = TaskNotFoundError
    elif status in (401, 403):
        cls = AuthenticationError
    return cls(message, status=status, code=code, task=task)
