"""The one table that maps every error to an HTTP status and OpenAI's error object.

Routes never catch: domain errors (inferq.errors, the repositories' included), the body errors
below and validation errors all end here. A value the database refuses is a 400 naming the
field; an unreachable database is a 503 with Retry-After; only a bug is a 500, and even that
answers with the same JSON shape. ``ERRORS`` documents the error answers in /openapi.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from inferq import errors
from inferq.api.ratelimits import rate_limit_headers
from inferq.domain.task import Task
from inferq.services.batches import FileTooLarge
from inferq.wire import ErrorResponse

log = structlog.get_logger(__name__)


# -- errors of the request body, raised by the HTTP layer itself -----------------------------


class BodyTooLarge(errors.InferqError):
    """The request body is larger than INFERQ_MAX_BODY_BYTES."""


class InvalidJson(errors.InferqError):
    """The request body is not valid JSON."""


class JsonTooDeep(errors.InferqError):
    """The request body nests deeper than INFERQ_MAX_JSON_DEPTH."""


class NulCharacter(errors.InferqError):
    """The request body contains a NUL character (\\u0000), which PostgreSQL cannot store."""


class UnsupportedMediaType(errors.InferqError):
    """The request body must be JSON: send `Content-Type: application/json`."""


class InvalidBody(errors.InvalidRequest):
    """The request body does not match the route's schema."""


# -- the table --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mapping:
    status: int
    type: str
    code: str | None


# Looked up along the exception's MRO, so the most specific class wins.
ERROR_TABLE: dict[type[BaseException], Mapping] = {
    errors.Unauthorized: Mapping(401, "authentication_error", "invalid_api_key"),
    errors.TokenRevoked: Mapping(401, "authentication_error", "token_revoked"),
    errors.Forbidden: Mapping(403, "permission_error", "forbidden"),
    BodyTooLarge: Mapping(413, "invalid_request_error", "body_too_large"),
    InvalidJson: Mapping(400, "invalid_request_error", "invalid_json"),
    JsonTooDeep: Mapping(400, "invalid_request_error", "json_too_deep"),
    NulCharacter: Mapping(400, "invalid_request_error", "nul_character"),
    UnsupportedMediaType: Mapping(415, "invalid_request_error", "unsupported_media_type"),
    errors.InvalidRequest: Mapping(400, "invalid_request_error", "invalid_request"),
    errors.InvalidValue: Mapping(400, "invalid_request_error", "invalid_value"),
    errors.AboveCap: Mapping(400, "invalid_request_error", "above_cap"),
    InvalidBody: Mapping(422, "invalid_request_error", "invalid_body"),
    # nginx's "client closed request": nobody reads it, but the log and metrics show it.
    errors.ClientGone: Mapping(499, "invalid_request_error", "client_closed_request"),
    errors.ShuttingDown: Mapping(503, "service_unavailable", "shutting_down"),
    errors.NoWorkerAvailable: Mapping(503, "service_unavailable", "no_worker_available"),
    errors.TooManyWaits: Mapping(429, "rate_limit_error", "too_many_waits"),
    errors.TooManyPending: Mapping(429, "rate_limit_error", "too_many_pending"),
    errors.QuotaExceeded: Mapping(429, "rate_limit_error", "rate_limit_exceeded"),
    errors.LimitExceeded: Mapping(429, "rate_limit_error", "rate_limited"),
    errors.RouteNotFound: Mapping(404, "not_found_error", "route_not_found"),
    errors.TokenNotFound: Mapping(404, "not_found_error", "token_not_found"),
    errors.TaskNotFound: Mapping(404, "not_found_error", "task_not_found"),
    errors.UnknownModel: Mapping(404, "not_found_error", "model_not_found"),
    errors.FileNotFound: Mapping(404, "not_found_error", "file_not_found"),
    errors.BatchNotFound: Mapping(404, "not_found_error", "batch_not_found"),
    FileTooLarge: Mapping(413, "invalid_request_error", "file_too_large"),
    errors.SessionNotFound: Mapping(404, "not_found_error", "session_not_found"),
    errors.LeaseLost: Mapping(409, "conflict_error", "lease_lost"),
    errors.InvalidTransition: Mapping(409, "conflict_error", "invalid_transition"),
    errors.IdempotencyConflict: Mapping(409, "conflict_error", "idempotency_conflict"),
    errors.TaskCancelled: Mapping(409, "conflict_error", "task_cancelled"),
    errors.TaskFailed: Mapping(502, "server_error", "task_failed"),
    errors.WaitTimeout: Mapping(504, "timeout_error", "wait_timeout"),
    errors.MigrationError: Mapping(503, "service_unavailable", "database_behind"),
    errors.DatabaseUnavailable: Mapping(503, "service_unavailable", "database_unavailable"),
    errors.DatabaseError: Mapping(500, "server_error", "internal_error"),
    errors.InferqError: Mapping(500, "server_error", None),
}

INTERNAL = Mapping(500, "server_error", "internal_error")

# The error answers every API route may give, for the OpenAPI document.
ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "invalid request (`invalid_request`, `invalid_json`, `invalid_value`, ...)",
        401: "missing or invalid bearer token",
        403: "this token may not do that",
        404: "no such task, model, session or route (another owner's task alike)",
        409: "the task is not in a state that allows it",
        413: "body too large",
        415: "the body must be JSON",
        422: "the body does not match the schema",
        429: "a limit was reached (`Retry-After`)",
        503: "shutting down or database unavailable (`Retry-After`)",
    }.items()
}


def lookup(exc: BaseException) -> Mapping:
    """The mapping of the most specific class of ``exc`` in the table."""
    for cls in type(exc).__mro__:
        found = ERROR_TABLE.get(cls)
        if found is not None:
            return found
    return INTERNAL


def task_state(task: Task) -> dict[str, Any]:
    return {"id": str(task.id), "status": str(task.status), "attempt": task.attempt}


def error_body(
    message: str,
    type_: str,
    code: str | None,
    *,
    param: str | None = None,
    task: Task | None = None,
) -> dict[str, Any]:
    """OpenAI's error object, with the task's current state on task conflicts."""
    body: dict[str, Any] = {"message": message, "type": type_, "code": code, "param": param}
    if task is not None:
        body["task"] = task_state(task)
    return {"error": body}


def error_response(exc: BaseException) -> Response:
    """The HTTP answer for ``exc``: status, headers and JSON body from the table."""
    mapping = lookup(exc)
    headers: dict[str, str] = {}
    if mapping.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="inferq"'
    if isinstance(exc, errors.LimitExceeded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if isinstance(exc, errors.QuotaExceeded):
        headers.update(rate_limit_headers(exc.limits))
    elif mapping.status == 503:
        headers["Retry-After"] = "1"
    task_id = getattr(exc, "task_id", None)
    if task_id is not None:
        headers["X-Inferq-Task-Id"] = str(task_id)
    return Response(
        orjson.dumps(error_json(exc, mapping)),
        status_code=mapping.status,
        headers=headers,
        media_type="application/json",
    )


def error_json(exc: BaseException, mapping: Mapping | None = None) -> dict[str, Any]:
    """The JSON body of :func:`error_response` for ``exc`` (its status: ``lookup(exc)``)."""
    mapping = mapping or lookup(exc)
    if isinstance(exc, errors.InferqError):
        message = exc.message
    elif mapping.status == 503:
        message = "the database is unavailable; retry"
    else:
        message = "internal error; see the server log"
    return error_body(
        message,
        mapping.type,
        mapping.code,
        param=getattr(exc, "param", None),
        task=getattr(exc, "task", None),
    )


def log_failure(exc: BaseException, method: str, path: str) -> None:
    """Log an error answer at the level it deserves: a bug (500) is an error with its
    traceback; an expected condition (a drain, a database restart, no worker, a worker's
    failure) is a warning without one; a refused request is not logged here at all (the
    request log has its status)."""
    mapping = lookup(exc)
    if mapping.status >= 500 and mapping.code in (None, "internal_error"):
        log.error("request_failed", method=method, path=path, exc_info=exc)
    elif mapping.status >= 500:
        message = exc.message if isinstance(exc, errors.InferqError) else str(exc)
        log.warning("request_unanswered", method=method, path=path, code=mapping.code,
                    status=mapping.status, reason=message)  # fmt: skip


async def _on_error(request: Request, exc: Exception) -> Response:
    log_failure(exc, request.method, request.url.path)
    return error_response(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
    body = error_body(message, "invalid_request_error", "invalid_request", param=param)
    return Response(orjson.dumps(body), status_code=422, media_type="application/json")


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(
        exc.status_code, "invalid_request_error"
    )
    code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return Response(
        orjson.dumps(error_body(message, type_, code)),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
        media_type="application/json",
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the error JSON."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    # Known errors go through the exception middleware (answered, not re-raised); only the
    # catch-all Exception handler sits in the server-error middleware, which logs a traceback.
    for cls in (errors.InferqError, Exception):
        app.add_exception_handler(cls, _on_error)
