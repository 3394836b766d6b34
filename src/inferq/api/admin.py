"""The admin API: the LLM registry, tokens and queue statistics (admin tokens only)."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Depends
from starlette.responses import Response

from inferq.api.body import documented, json_body
from inferq.api.deps import Admin, Svc
from inferq.api.errors import ERRORS
from inferq.api.render import json_response, llm_json, token_json
from inferq.errors import InvalidRequest
from inferq.wire import (
    LlmDeleted,
    LlmIn,
    LlmList,
    LlmOut,
    QueueStatsOut,
    TokenIn,
    TokenList,
    TokenOut,
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
    token, secret = await svc.admin.create_token(body.owner, body.role, body.pools, body.label)
    return json_response(token_json(token, secret), 201)


@router.delete("/tokens/{token_id}", response_model=TokenRevoked, summary="Revoke a token")
async def revoke_token(svc: Svc, admin: Admin, token_id: str) -> Response:
    try:
        tid = UUID(token_id)
    except ValueError:
        raise InvalidRequest("token ids are UUIDs", param="token_id") from None
    await svc.admin.revoke_token(tid)
    return json_response({"revoked": tid})


@router.get(
    "/stats", response_model=QueueStatsOut, summary="Task counts per pool and status, sessions"
)
async def stats(svc: Svc, admin: Admin) -> Response:
    return json_response((await svc.admin.queue()).as_json())
