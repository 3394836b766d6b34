"""create_app: the FastAPI application of one replica around its Services; metrics_app: the
bare app of INFERQ_METRICS_PORT.

The request middleware (request id, log, metrics, body limit) is the outermost layer, in
front of FastAPI's own stack, and the hot routes are answered under it by the fast path
(inferq.api.fastpath), derived from the same route declarations; every other request goes
through FastAPI as usual.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from inferq import __version__
from inferq.api import admin, batches, dashboard, errors, openai, ops, tasks, usage, worker
from inferq.api.body import openapi_schemas
from inferq.api.fastpath import FastPath
from inferq.api.middleware import RequestMiddleware
from inferq.api.pages import STATIC
from inferq.api.render import OrjsonResponse
from inferq.errors import InferqError, RouteNotFound
from inferq.services import Services


class InferqApp(FastAPI):
    """FastAPI, behind the request middleware and the fast path."""

    front: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["app"] = self
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)


def create_app(services: Services, *, fast_path: bool = True) -> FastAPI:
    """The HTTP API (docs/protocol.md) over ``services``; the caller owns their lifetime (the
    pool, listener and loops are started before and stopped after serving). Without
    ``fast_path`` every request goes through FastAPI (the parity test compares both)."""
    app = InferqApp(
        title="inferq",
        version=__version__,
        summary="A durable queue for LLM inference requests, kept in PostgreSQL",
        default_response_class=OrjsonResponse,
        openapi_url="/openapi.json",
        docs_url=None,  # served below from the wheel's own assets: no CDN
        redoc_url=None,
    )
    app.state.services = services
    errors.install(app)
    routers = [module.router for module in (ops, tasks, openai, batches, worker, admin, usage)]
    for router in routers:
        app.include_router(router)
    dashboard.install(app)
    install_docs(app)
    app.front = RequestMiddleware(
        app.fastapi,
        metrics=services.metrics,
        max_body_bytes=services.settings.max_body_bytes,
        # Uploads carry files: their own limit (the form's envelope on top).
        large_bodies={("POST", "/v1/files"): services.settings.max_file_bytes + 64 * 1024},
        fast_path=FastPath(routers, services) if fast_path else None,
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


def install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from assets in the wheel (inferq/api/static/swagger, vendored from
    npm's swagger-ui-dist), so it works on a machine with no internet (FastAPI's default loads
    it from a CDN)."""
    swagger = StaticFiles(directory=str(STATIC / "swagger"))
    app.mount("/docs/assets", swagger, name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="inferq — API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )


def metrics_app(services: Services) -> ASGIApp:
    """The app of INFERQ_METRICS_PORT: ``GET /metrics`` (with INFERQ_METRICS_TOKEN when set),
    404 for anything else."""
    health = services.health

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        response: Response
        try:
            if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
                raise RouteNotFound(
                    f"{scope['method']} {scope['path'][:200]}: this port serves GET /metrics"
                )
            page = await health.metrics_page(
                Headers(scope=scope).get("authorization"), on_metrics_port=True
            )
            response = Response(page, media_type=CONTENT_TYPE_LATEST)
        except InferqError as exc:
            response = errors.error_response(exc)
        await response(scope, receive, send)

    return app
