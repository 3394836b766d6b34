"""Quotas and usage over HTTP: ``GET /v1/usage`` (the caller's own; every owner's for an admin
token) and an admin's ``GET|PUT /v1/admin/tokens/{id}/quota``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from inferq.api.body import documented, json_body
from inferq.api.deps import Admin, Client, Svc
from inferq.api.errors import ERRORS
from inferq.api.render import json_response
from inferq.domain.quotas import Quota
from inferq.errors import InvalidRequest
from inferq.wire import QuotaIn, QuotaOut, UsageOut

router = APIRouter(tags=["usage"], responses=ERRORS)


@router.get(
    "/v1/usage",
    response_model=UsageOut,
    summary="Tokens used per hour, owner, token and model (an admin sees every owner)",
)
async def usage(
    svc: Svc,
    token: Client,
    start: Annotated[datetime | None, Query(alias="from")] = None,
    end: Annotated[datetime | None, Query(alias="to")] = None,
    owner: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    rows = await svc.usage.report(token, start=start, end=end, owner=owner, limit=limit)
    return json_response({"object": "list", "data": [row.as_json() for row in rows]})


@router.get("/v1/admin/tokens/{token_id}/quota", response_model=QuotaOut, summary="A token's quota")
async def get_quota(svc: Svc, admin: Admin, token_id: str) -> Response:
    return json_response((await svc.quotas.get(_token_id(token_id))).as_json())


@router.put(
    "/v1/admin/tokens/{token_id}/quota",
    response_model=QuotaOut,
    summary="Replace a token's quota (absent fields: no limit)",
    openapi_extra=documented(QuotaIn),
)
async def put_quota(
    svc: Svc,
    admin: Admin,
    token_id: str,
    body: Annotated[QuotaIn, Depends(json_body(QuotaIn))],
) -> Response:
    quota = await svc.quotas.put(_token_id(token_id), Quota(**body.model_dump()))
    return json_response(quota.as_json())


def _token_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise InvalidRequest("token ids are UUIDs", param="token_id") from None
