"""Operations routes: /healthz (alive), /readyz (database + listener, red while draining),
/metrics (Prometheus)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

from fastapi import APIRouter, Depends
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from inferq.api.context import ApiContext, get_ctx
from inferq.api.render import json_response
from inferq.metrics import queue_stats

router = APIRouter(tags=["ops"])

Ctx = Annotated[ApiContext, Depends(get_ctx)]


@router.get("/healthz", summary="The process is alive")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="Ready for traffic: database and listener up, not draining")
async def readyz(ctx: Ctx) -> Response:
    checks: dict[str, str] = {}
    checks["draining"] = "yes" if ctx.drain.draining else "no"
    listener = ctx.listener
    checks["listener"] = "down" if listener is not None and not listener.healthy else "ok"
    try:
        async with asyncio.timeout(2.0), ctx.pool.connection(timeout=2.0) as conn:
            await conn.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"down: {type(exc).__name__}"
    ready = checks["database"] == "ok" and checks["listener"] == "ok" and not ctx.drain.draining
    headers = None if ready else {"Retry-After": "1"}
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        200 if ready else 503,
        headers,
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(ctx: Ctx) -> Response:
    # The process metrics are still worth a scrape while the database is away.
    with contextlib.suppress(Exception):
        ctx.metrics.set_queue(await queue_stats(ctx.pool))
    ctx.metrics.set_listener(ctx.listener)
    ctx.metrics.parked_waiters.set(ctx.service.hub.parked_count)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
