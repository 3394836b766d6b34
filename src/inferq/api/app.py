"""create_app: the FastAPI application of one replica around an ApiContext."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from inferq import __version__
from inferq.api import admin, errors, openai, ops, tasks, worker
from inferq.api.body import openapi_schemas
from inferq.api.context import ApiContext
from inferq.api.middleware import RequestMiddleware
from inferq.api.render import OrjsonResponse


def create_app(ctx: ApiContext) -> FastAPI:
    """The HTTP API (docs/protocol.md) over ``ctx``; the caller owns the context's lifetime
    (the pool, listener and service are started before and stopped after serving)."""
    app = FastAPI(
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
    app.add_middleware(
        RequestMiddleware, metrics=ctx.metrics, max_body_bytes=ctx.settings.max_body_bytes
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
