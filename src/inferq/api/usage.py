"""Quotas and usage over HTTP: ``GET /v1/usage`` (the caller's own; every owner's for an admin
token) and an admin's ``GET|PUT /v1/admin/tokens/{id}/quota``.

Their schemas live here, not in inferq.wire: no worker or SDK speaks them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from inferq.api.body import documented, json_body
from inferq.api.deps import Admin, Client, Svc
from inferq.api.errors import ERRORS
from inferq.api.render import json_response
from inferq.domain.quotas import Quota
from inferq.errors import InvalidRequest

_Limit = Annotated[int | None, Field(ge=0, le=1_000_000_000_000)]


class QuotaIn(BaseModel):
    """A token's limits; an absent or null field is no limit (for discarded_per_hour: the
    server's default)."""

    model_config = ConfigDict(extra="forbid")

    max_pending: _Limit = None
    max_running: _Limit = None
    requests_per_minute: _Limit = None
    tokens_per_minute: _Limit = None
    tokens_per_day: _Limit = None
    discarded_per_hour: _Limit = Field(
        default=None,
        description="cancelled or failed tasks per rolling hour; null: the server's default "
        "(INFERQ_MAX_DISCARDED_PER_HOUR)",
    )


class QuotaOut(QuotaIn):
    model_config = ConfigDict(extra="ignore")


class UsageRowOut(BaseModel):
    hour: datetime
    owner: str
    token_id: UUID | None = None
    model: str | None = None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageRowOut]


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
