"""The admin API: the LLM registry, tokens and queue statistics (admin tokens only)."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends
from starlette.responses import Response

from inferq.api.auth import admin_token
from inferq.api.body import documented, json_body
from inferq.api.context import ApiContext, get_ctx
from inferq.api.errors import InvalidBody, InvalidRequest, TokenNotFound
from inferq.api.render import json_response
from inferq.db.llms import Llm
from inferq.db.tokens import ApiToken
from inferq.errors import UnknownModel
from inferq.metrics import queue_stats
from inferq.wire import LlmIn, TokenIn

router = APIRouter(prefix="/v1/admin", tags=["admin"])

Ctx = Annotated[ApiContext, Depends(get_ctx)]
Admin = Annotated[ApiToken, Depends(admin_token)]


def llm_json(llm: Llm) -> dict[str, Any]:
    return {
        "name": llm.name,
        "pool": llm.pool_name,
        "model": llm.model,
        "tier": llm.tier,
        "created_at": llm.created_at,
    }


def token_json(token: ApiToken, secret: str | None = None) -> dict[str, Any]:
    return {
        "id": token.id,
        "owner": token.owner_id,
        "role": token.role,
        "pools": token.pools,
        "label": token.label,
        "created_at": token.created_at,
        "revoked_at": token.revoked_at,
        "secret": secret,
    }


@router.get("/llms", summary="List the LLM registry")
async def list_llms(ctx: Ctx, admin: Admin) -> Response:
    return json_response({"data": [llm_json(x) for x in await ctx.llms.all()]})


@router.post(
    "/llms", status_code=201, summary="Add or replace a model", openapi_extra=documented(LlmIn)
)
async def put_llm(
    ctx: Ctx, admin: Admin, body: Annotated[LlmIn, Depends(json_body(LlmIn))]
) -> Response:
    llm = await ctx.llms.put(body.name, body.pool, body.model, body.tier)
    ctx.forget_llm(llm.name)
    return json_response(llm_json(llm), 201)


# `:path`: registry names are often Hugging Face ids such as meta-llama/Llama-3-8B.
@router.delete("/llms/{name:path}", summary="Remove a model")
async def delete_llm(ctx: Ctx, admin: Admin, name: str) -> Response:
    if not await ctx.llms.remove(name):
        raise UnknownModel(f"model {name!r} does not exist")
    ctx.forget_llm(name)
    return json_response({"deleted": name})


@router.get("/tokens", summary="List tokens (never their secrets)")
async def list_tokens(ctx: Ctx, admin: Admin) -> Response:
    return json_response({"data": [token_json(t) for t in await ctx.tokens.all()]})


@router.post(
    "/tokens",
    status_code=201,
    summary="Create a token; the secret is shown once",
    openapi_extra=documented(TokenIn),
)
async def create_token(
    ctx: Ctx, admin: Admin, body: Annotated[TokenIn, Depends(json_body(TokenIn))]
) -> Response:
    if body.pools is not None and not body.pools:
        # The repository stores an empty list as NULL, which means every pool.
        raise InvalidBody(
            "pools: name at least one pool, or send null for a token that serves every pool",
            param="pools",
        )
    token, secret = await ctx.tokens.create(
        body.owner, body.role, pools=body.pools, label=body.label
    )
    return json_response(token_json(token, secret), 201)


@router.delete("/tokens/{token_id}", summary="Revoke a token")
async def revoke_token(ctx: Ctx, admin: Admin, token_id: str) -> Response:
    try:
        tid = UUID(token_id)
    except ValueError:
        raise InvalidRequest("token ids are UUIDs", param="token_id") from None
    if not await ctx.tokens.revoke(tid):
        raise TokenNotFound(f"token {tid} does not exist or is already revoked")
    ctx.auth.invalidate(tid)
    return json_response({"revoked": tid})


@router.get("/stats", summary="Task counts per pool and status, live sessions")
async def stats(ctx: Ctx, admin: Admin) -> Response:
    return json_response((await queue_stats(ctx.pool)).as_json())
