"""DirectRoutes: the hot client routes served without FastAPI's routing and dependency solving.

An open long-poll is mostly what the HTTP stack keeps alive for it: FastAPI's middleware,
routing and dependency layers held ~15 KB of frames, exit stacks and request objects per
request for as long as it waited, and cost CPU on every call. The routes below are still
declared in FastAPI (the OpenAPI document lists them, and they answer any request this table
does not take), but a request that matches here is answered by the same route code, called
directly: same authentication, error table, body limit and request log and metrics (the
request middleware wraps both). Anything unusual (a query string other than one plain
``timeout``, a root path) is left to FastAPI, so its validation errors stay word for word.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from inferq.api import openai, tasks
from inferq.api.auth import CLIENT
from inferq.api.context import ApiContext
from inferq.api.errors import error_response, lookup

log = structlog.get_logger("inferq.api")

_WAIT_PREFIX = "/v1/tasks/"
_WAIT_SUFFIX = "/wait"
# What FastAPI parses into the same float without a question: digits, an optional fraction.
_TIMEOUT = re.compile(rb"timeout=([0-9]{1,12}(?:\.[0-9]{0,12})?)", re.ASCII)


class DirectRoutes:
    """Matches a request against the direct table and answers it (see the module docstring)."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        # The routes FastAPI would have matched: their path is the metrics label.
        routes = {
            (r.path, m): r
            for router in (tasks.router, openai.router)
            for r in router.routes
            if isinstance(r, APIRoute)
            for m in r.methods or ()
        }
        self._wait_route = routes[("/v1/tasks/{task_id}/wait", "GET")]
        self._posts = {
            "/v1/chat/completions": (routes[("/v1/chat/completions", "POST")], "messages"),
            "/v1/completions": (routes[("/v1/completions", "POST")], "prompt"),
        }

    def match(self, scope: Scope) -> Any:
        """What ``answer`` needs for ``scope`` (a wait's (task id, timeout), a completion's
        required field), or None to leave the request to FastAPI. Sets ``scope["route"]``
        (the metrics label) on a match."""
        if scope.get("root_path"):
            return None
        path: str = scope["path"]
        method = scope["method"]
        if method == "POST":
            found = self._posts.get(path)
            if found is None or scope["query_string"]:
                return None
            scope["route"] = found[0]
            return found[1]
        if method != "GET" or not (path.startswith(_WAIT_PREFIX) and path.endswith(_WAIT_SUFFIX)):
            return None
        task_id = path[len(_WAIT_PREFIX) : -len(_WAIT_SUFFIX)]
        if not task_id or "/" in task_id:
            return None
        query: bytes = scope["query_string"]
        timeout_s = 30.0
        if query:
            m = _TIMEOUT.fullmatch(query)
            if m is None:
                return None
            timeout_s = float(m[1])
        scope["route"] = self._wait_route
        return task_id, timeout_s

    async def answer(self, scope: Scope, receive: Receive, send: Send, found: Any) -> None:
        """Answer a matched request; an exception is answered from the error table, as
        FastAPI's handlers do (errors.install)."""
        ctx = self.ctx
        request = Request(scope, receive)
        response: Response
        try:
            token = await CLIENT.authorize(ctx.auth, request.headers.get("authorization"))
            if isinstance(found, tuple):
                response = await tasks.wait_answer(ctx, token, request, *found)
            else:
                key = request.headers.get("idempotency-key")
                response = await openai.complete(ctx, token, request, found, key)
        except Exception as exc:
            if lookup(exc).status >= 500:
                path = scope["path"]
                log.error("request_failed", method=scope["method"], path=path, exc_info=exc)
            response = error_response(exc)
        await response(scope, receive, send)
