"""The admin API: the LLM registry, tokens (lanes, priorities, weights), queue statistics and
tasks across owners (admin tokens only)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from inferq.api.body import documented, json_body
from inferq.api.deps import Admin, Svc
from inferq.api.errors import ERRORS
from inferq.api.render import json_response, llm_json, task_json, token_json
from inferq.domain.lanes import LanePolicy
from inferq.domain.task import TaskStatus
from inferq.errors import InvalidRequest
from inferq.wire import (
    AdminTaskPage,
    LaneName,
    LlmDeleted,
    LlmIn,
    LlmList,
    LlmOut,
    QueueStatsOut,
    TokenIn,
    TokenList,
    TokenOut,
    TokenPolicyIn,
    TokenRevoked,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ERRORS)


@router.get("/llms", response_model=LlmList, summary="List the LLM registry")
async def list_llms(svc: Svc, admin: Admin) -> Response:
    return json_response({"data": [llm_json(x) for x in await svc.admin.llms()]})


@router.post(
    "/llms",
    status_code=201,
    response_model=LlmOut,
    summary="Add or replace a model",
    openapi_extra=documented(LlmIn),
)
async def put_llm(
    svc: Svc, admin: Admin, body: Annotated[LlmIn, Depends(json_body(LlmIn))]
) -> Response:
    llm = await svc.admin.put_llm(
        body.name, body.pool, body.model, body.tier, max_tokens=body.max_tokens, max_n=body.max_n
    )
    return json_response(llm_json(llm), 201)


# `:path`: registry names are often Hugging Face ids such as meta-llama/Llama-3-8B.
@router.delete("/llms/{name:path}", response_model=LlmDeleted, summary="Remove a model")
async def delete_llm(svc: Svc, admin: Admin, name: str) -> Response:
    await svc.admin.remove_llm(name)
    return json_response({"deleted": name})


@router.get("/tokens", response_model=TokenList, summary="List tokens (never their secrets)")
async def list_tokens(svc: Svc, admin: Admin) -> Response:
    return json_response({"data": [token_json(t) for t in await svc.admin.token_list()]})


@router.post(
    "/tokens",
    status_code=201,
    response_model=TokenOut,
    summary="Create a token; the secret is shown once",
    openapi_extra=documented(TokenIn),
)
async def create_token(
    svc: Svc, admin: Admin, body: Annotated[TokenIn, Depends(json_body(TokenIn))]
) -> Response:
    defaults = LanePolicy()
    policy = LanePolicy(
        body.lanes or defaults.lanes,
        defaults.priority_min if body.priority_min is None else body.priority_min,
        defaults.priority_max if body.priority_max is None else body.priority_max,
        body.weight or defaults.weight,
    )
    token, secret = await svc.admin.create_token(
        body.owner, body.role, body.pools, body.label, policy
    )
    return json_response(token_json(token, secret), 201)


@router.patch(
    "/tokens/{token_id}",
    response_model=TokenOut,
    summary="Change a token's lanes, priority range or weight",
    openapi_extra=documented(TokenPolicyIn),
)
async def update_token(
    svc: Svc,
    admin: Admin,
    token_id: str,
    body: Annotated[TokenPolicyIn, Depends(json_body(TokenPolicyIn))],
) -> Response:
    token = await svc.admin.update_token(
        _token_id(token_id),
        lanes=body.lanes,
        priority_min=body.priority_min,
        priority_max=body.priority_max,
        weight=body.weight,
    )
    return json_response(token_json(token))


@router.delete("/tokens/{token_id}", response_model=TokenRevoked, summary="Revoke a token")
async def revoke_token(svc: Svc, admin: Admin, token_id: str) -> Response:
    tid = _token_id(token_id)
    await svc.admin.revoke_token(tid)
    return json_response({"revoked": tid})


def _token_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise InvalidRequest("token ids are UUIDs", param="token_id") from None


@router.get("/tasks", response_model=AdminTaskPage, summary="Tasks of every owner, newest first")
async def list_tasks(
    svc: Svc,
    admin: Admin,
    owner: str | None = None,
    pool: str | None = None,
    lane: LaneName | None = None,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> Response:
    page = await svc.admin.list_tasks(
        owner=owner, pool=pool, lane=lane, statuses=status, limit=limit, cursor=cursor
    )
    return json_response(
        {
            "data": [{**task_json(t), "owner": t.owner_id} for t in page.tasks],
            "next_cursor": page.next_cursor,
        }
    )


@router.get(
    "/stats", response_model=QueueStatsOut, summary="Task counts per pool and status, sessions"
)
async def stats(svc: Svc, admin: Admin) -> Response:
    return json_response((await svc.admin.queue()).as_json())
