"""DirectRoutes: the hot routes served without FastAPI's routing and dependency solving.

An open long-poll is mostly what the HTTP stack keeps alive for it: FastAPI's middleware,
routing and dependency layers held ~15 KB of frames, exit stacks and request objects per
request for as long as it waited, and cost CPU on every call. The routes below are still
declared in FastAPI (the OpenAPI document lists them, and they answer any request this table
does not take), but a request that matches here is answered by the same route code, called
directly: same authentication, error table, body limit and request log and metrics (the
request middleware wraps both). The hot routes are the client's submit, wait and completions
and the worker's claim and outcomes. Anything unusual (a query string other than one plain
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

from inferq.api import openai, tasks, worker
from inferq.api.auth import CLIENT, WORKER
from inferq.api.context import ApiContext
from inferq.api.errors import error_response, lookup

log = structlog.get_logger("inferq.api")

_WAIT_PREFIX = "/v1/tasks/"
_WAIT_SUFFIX = "/wait"
_SESSIONS = "/v1/worker/sessions/"
# What FastAPI parses into the same float without a question: digits, an optional fraction.
_TIMEOUT = re.compile(rb"timeout=([0-9]{1,12}(?:\.[0-9]{0,12})?)", re.ASCII)

# What answer() runs for a match (client routes first).
_WAIT, _COMPLETE, _SUBMIT, _CLAIM, _OUTCOMES = range(5)


class DirectRoutes:
    """Matches a request against the direct table and answers it (see the module docstring)."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        # The routes FastAPI would have matched: their path is the metrics label.
        routes = {
            (r.path, m): r
            for router in (tasks.router, openai.router, worker.router)
            for r in router.routes
            if isinstance(r, APIRoute)
            for m in r.methods or ()
        }
        self._wait_route = routes[("/v1/tasks/{task_id}/wait", "GET")]
        chat, text = "/v1/chat/completions", "/v1/completions"
        self._posts = {
            chat: (routes[(chat, "POST")], _COMPLETE, "messages"),
            text: (routes[(text, "POST")], _COMPLETE, "prompt"),
            "/v1/tasks": (routes[("/v1/tasks", "POST")], _SUBMIT, None),
        }
        self._session_posts = {
            "/claim": (routes[(_SESSIONS + "{session_id}/claim", "POST")], _CLAIM),
            "/outcomes": (routes[(_SESSIONS + "{session_id}/outcomes", "POST")], _OUTCOMES),
        }

    def match(self, scope: Scope) -> tuple[int, Any] | None:
        """What ``answer`` runs for ``scope`` and its argument, or None to leave the request
        to FastAPI. Sets ``scope["route"]`` (the metrics label) on a match."""
        if scope.get("root_path"):
            return None
        path: str = scope["path"]
        method = scope["method"]
        query: bytes = scope["query_string"]
        if method == "POST":
            if query:
                return None
            found = self._posts.get(path)
            if found is not None:
                scope["route"] = found[0]
                return found[1], found[2]
            if not path.startswith(_SESSIONS):
                return None
            session_id, slash, action = path[len(_SESSIONS) :].partition("/")
            session_route = self._session_posts.get(slash + action)
            if not session_id or session_route is None:
                return None
            scope["route"] = session_route[0]
            return session_route[1], session_id
        if method != "GET" or not (path.startswith(_WAIT_PREFIX) and path.endswith(_WAIT_SUFFIX)):
            return None
        task_id = path[len(_WAIT_PREFIX) : -len(_WAIT_SUFFIX)]
        if not task_id or "/" in task_id:
            return None
        timeout_s = 30.0
        if query:
            m = _TIMEOUT.fullmatch(query)
            if m is None:
                return None
            timeout_s = float(m[1])
        scope["route"] = self._wait_route
        return _WAIT, (task_id, timeout_s)

    async def answer(
        self, scope: Scope, receive: Receive, send: Send, found: tuple[int, Any]
    ) -> None:
        """Answer a matched request; an exception is answered from the error table, as
        FastAPI's handlers do (errors.install)."""
        ctx = self.ctx
        request = Request(scope, receive)
        kind, arg = found
        response: Response
        try:
            role = CLIENT if kind <= _SUBMIT else WORKER
            token = await role.authorize(ctx.auth, request.headers.get("authorization"))
            if kind == _WAIT:
                response = await tasks.wait_answer(ctx, token, request, *arg)
            elif kind == _COMPLETE:
                key = request.headers.get("idempotency-key")
                response = await openai.complete(ctx, token, request, arg, key)
            elif kind == _SUBMIT:
                key = request.headers.get("idempotency-key")
                response = await tasks.submit_answer(ctx, token, request, key)
            elif kind == _CLAIM:
                response = await worker.claim_answer(ctx, token, request, arg)
            else:
                response = await worker.outcomes_answer(ctx, token, request, arg)
        except Exception as exc:
            if lookup(exc).status >= 500:
                path = scope["path"]
                log.error("request_failed", method=scope["method"], path=path, exc_info=exc)
            response = error_response(exc)
        await response(scope, receive, send)
