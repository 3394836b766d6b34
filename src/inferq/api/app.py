"""create_app: the FastAPI application of one replica around an ApiContext.

The request middleware (request id, log, metrics, body limit) is the outermost layer, in
front of FastAPI's own stack, and the hot client routes are answered directly under it
(inferq.api.direct); every other request goes through FastAPI as usual.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from inferq import __version__
from inferq.api import admin, errors, openai, ops, tasks, worker
from inferq.api.body import openapi_schemas
from inferq.api.context import ApiContext
from inferq.api.direct import DirectRoutes
from inferq.api.middleware import RequestMiddleware
from inferq.api.render import OrjsonResponse


class InferqApp(FastAPI):
    """FastAPI, behind the request middleware and the direct routes."""

    front: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["app"] = self
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(ctx: ApiContext) -> FastAPI:
    """The HTTP API (docs/protocol.md) over ``ctx``; the caller owns the context's lifetime
    (the pool, listener and service are started before and stopped after serving)."""
    app = InferqApp(
        title="inferq",
        version=__version__,
        summary="A durable queue for LLM inference requests, kept in PostgreSQL",
        default_response_class=OrjsonResponse,
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.ctx = ctx
    errors.install(app)
    for module in (ops, tasks, openai, worker, admin):
        app.include_router(module.router)
    app.front = RequestMiddleware(
        app.fastapi,
        metrics=ctx.metrics,
        max_body_bytes=ctx.settings.max_body_bytes,
        direct=DirectRoutes(ctx),
    )
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # Request bodies are parsed by json_body (for the 413/415/400/422 split), so their
        # schemas are added here rather than found by FastAPI.
        if app.openapi_schema is None:
            document = generate()
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                openapi_schemas()
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
