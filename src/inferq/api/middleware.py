"""One pure ASGI middleware: request id, structured request log, HTTP metrics, body size limit.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task and no copy per request, and it can
refuse an oversized body before a byte of it is read. A declared Content-Length over the limit
is answered 413 at once; a body without one (chunked) is counted as it arrives and the read
that crosses the limit raises BodyTooLarge, which the error table answers with the same 413.
It is the outermost layer of the app (see inferq.api.app), in front of FastAPI's own stack and
of the fast path alike. An open long-poll keeps its frame alive, so it allocates little:
no context manager for the log binding, no receive wrapper for a body of declared length.
"""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inferq.api.errors import BodyTooLarge, error_body
from inferq.metrics import Metrics

if TYPE_CHECKING:
    from inferq.api.fastpath import FastPath

log = structlog.get_logger("inferq.api")

_QUIET = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestMiddleware:
    """Wraps the app: every HTTP request gets an id, a log line, metrics and the body limit.

    A request that ``fast_path`` matches is answered by it instead of ``app``
    (inferq.api.fastpath).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        max_body_bytes: int,
        fast_path: FastPath | None = None,
        large_bodies: dict[tuple[str, str], int] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.large_bodies = large_bodies or {}
        self.fast_path = fast_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _header(scope, b"x-request-id") or _request_id()
        if len(request_id) > 200 or not request_id.isprintable():
            request_id = _request_id()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        # The request runs in a task of its own (uvicorn), with its own context: the binding
        # ends with it, and a context manager would cost a generator per open request.
        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            limit = self.max_body_bytes
            if self.large_bodies:
                limit = self.large_bodies.get((scope["method"], scope["path"]), limit)
            declared = _header(scope, b"content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                await self._too_large(send_with_id, limit)
                return
            if _header(scope, b"transfer-encoding") is not None:
                # Only a body without a declared length needs counting as it arrives (a
                # request with neither header has no body at all).
                receive = self._limited(receive, limit)
            fast = self.fast_path
            found = fast.match(scope) if fast is not None else None
            if found is None:
                await self.app(scope, receive, send_with_id)
            else:
                assert fast is not None
                await fast.answer(scope, receive, send_with_id, found)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _limited(self, receive: Receive, limit: int) -> Receive:
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(
                        f"the request body is larger than {limit} bytes (INFERQ_MAX_BODY_BYTES)"
                    )
            return message

        return limited_receive

    async def _too_large(self, send: Send, limit: int) -> None:
        setting = (
            "INFERQ_MAX_BODY_BYTES" if limit == self.max_body_bytes else "INFERQ_MAX_FILE_BYTES"
        )
        body = orjson.dumps(
            error_body(
                f"the request body is larger than {limit} bytes ({setting})",
                "invalid_request_error",
                "body_too_large",
            )
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, status: int, elapsed_s: float) -> None:
        route: Any = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope.get("method", "")
        self.metrics.record_request(method, template, status, elapsed_s)
        if not log.is_enabled_for(logging.INFO):
            return  # at warning level (or above) the line would be dropped anyway
        if scope.get("path") in _QUIET and status < 400:
            return
        log.info(
            "request_handled",
            method=method,
            path=scope.get("path"),
            route=template,
            status=status,
            duration_ms=round(elapsed_s * 1000, 2),
        )


def _request_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex, without a getrandom() system call
    # per request: an id correlates log lines, it guards nothing.
    return f"{random.getrandbits(128):032x}"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None
