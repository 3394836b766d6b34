"""Operations routes: /healthz (alive), /readyz (database + listener, red while draining),
/metrics (Prometheus; a token and a port of its own are inferq.services.health's business)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from inferq.api.deps import Svc
from inferq.api.render import json_response
from inferq.wire import HealthOut, ReadyOut

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=HealthOut, summary="The process is alive")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "not ready (see checks)"}},
    summary="Ready for traffic: database and listener up, not draining",
)
async def readyz(svc: Svc) -> Response:
    readiness = await svc.health.readiness()
    return json_response(
        {"status": "ready" if readiness.ready else "unavailable", "checks": readiness.checks},
        200 if readiness.ready else 503,
        None if readiness.ready else {"Retry-After": "1"},
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    summary="Prometheus metrics",
)
async def metrics(svc: Svc, authorization: Annotated[str | None, Header()] = None) -> Response:
    return Response(await svc.health.metrics_page(authorization), media_type=CONTENT_TYPE_LATEST)
