"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

The request body is queued as is; ``model`` picks the pool through the registry and
``stream`` decides streaming. A sync call answers the worker's response verbatim (502
``task_failed`` with the worker's message when it fails); a streaming call relays the worker's
chunks (see inferq.api.sse). A client that goes away, a sync call that times out, and a call
cut short by shutdown all cancel the task when INFERQ_CANCEL_ON_DISCONNECT is on: nobody can
receive that answer any more.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Request
from starlette.responses import Response

from inferq.api.auth import client_token
from inferq.api.body import read_document
from inferq.api.context import ApiContext, get_ctx
from inferq.api.errors import InvalidRequest, ShuttingDown
from inferq.api.render import json_response
from inferq.api.sse import EventStream, openai_error_frame, openai_frames
from inferq.api.tasks import prepend, submit_task
from inferq.db.tokens import ApiToken
from inferq.errors import InvalidTransition, TaskNotFound, WaitTimeout
from inferq.jsontext import dumps

router = APIRouter(prefix="/v1", tags=["openai"])

Ctx = Annotated[ApiContext, Depends(get_ctx)]
Client = Annotated[ApiToken, Depends(client_token)]

_DRAIN_FRAME = openai_error_frame(
    "this replica is shutting down; retry the request", "shutting_down", "service_unavailable"
)


@router.post("/chat/completions", summary="OpenAI chat completion, queued")
async def chat_completions(
    ctx: Ctx,
    token: Client,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    return await complete(ctx, token, request, "messages", idempotency_key)


@router.post("/completions", summary="OpenAI text completion, queued")
async def completions(
    ctx: Ctx,
    token: Client,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    return await complete(ctx, token, request, "prompt", idempotency_key)


@router.get("/models", summary="The models of the LLM registry")
async def models(ctx: Ctx, token: Client) -> Response:
    data = [
        {
            "id": llm.name,
            "object": "model",
            "created": int(llm.created_at.timestamp()),
            "owned_by": "inferq",
            "pool": llm.pool_name,
            "tier": llm.tier,
        }
        for llm in await ctx.llms.all()
    ]
    return json_response({"object": "list", "data": data})


async def complete(
    ctx: ApiContext, token: ApiToken, request: Request, required: str, key: str | None
) -> Response:
    """The answer of both completion routes (also served directly, see inferq.api.direct)."""
    doc = await read_document(request)
    model, stream = _check(doc, required)
    # The wait slot is taken before the task is written: a 429 must leave nothing behind.
    ctx.acquire_wait(token)
    try:
        enqueued = await submit_task(
            ctx, token, request_body=doc, model=model, streaming=stream, idempotency_key=key
        )
    except BaseException:
        ctx.release_wait(token)
        raise
    task_id = enqueued.task.id
    # The request is stored; a sync call may wait for minutes, so its parsed body and the
    # stored row are not kept alive meanwhile.
    del doc, enqueued
    headers = {"X-Inferq-Task-Id": str(task_id)}
    abandon = _abandon(ctx, task_id, token.owner_id)
    if stream:
        return await _stream(ctx, token, task_id, headers, abandon)
    started = time.perf_counter()
    try:
        task = await ctx.guarded(
            ctx.service.wait_for(task_id, ctx.settings.max_wait_s, owner_id=token.owner_id),
            request=request,
            on_disconnect=abandon,
        )
    except (WaitTimeout, ShuttingDown):
        if abandon is not None:
            await abandon()
        raise
    finally:
        ctx.release_wait(token)
        ctx.metrics.wait_seconds.labels("sync").observe(time.perf_counter() - started)
    return Response(dumps(task.response_body), media_type="application/json", headers=headers)


async def _stream(
    ctx: ApiContext,
    token: ApiToken,
    task_id: UUID,
    headers: dict[str, str],
    abandon: Callable[[], Awaitable[None]] | None,
) -> EventStream:
    try:
        events = ctx.service.events(task_id, owner_id=token.owner_id)
        first = await ctx.guarded(anext(events))
    except BaseException:
        ctx.release_wait(token)
        raise

    async def nothing() -> None:
        return None

    return EventStream(
        openai_frames(prepend(first, events), on_abandon=abandon or nothing),
        heartbeat_s=ctx.settings.sse_heartbeat_s,
        drain=ctx.drain.event,
        drain_frame=_DRAIN_FRAME,
        on_disconnect=abandon,
        on_drain=abandon,
        on_close=lambda: ctx.release_wait(token),
        headers=headers,
    )


def _check(doc: Any, required: str) -> tuple[str, bool]:
    """The model name and stream flag of an OpenAI request body; raises InvalidRequest."""
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model or len(model) > 200:
        raise InvalidRequest("`model` must be a model name (see GET /v1/models)", param="model")
    if required not in doc:
        raise InvalidRequest(f"`{required}` is required", param=required)
    if required == "messages" and not isinstance(doc["messages"], list):
        raise InvalidRequest("`messages` must be a list of messages", param="messages")
    stream = doc.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise InvalidRequest("`stream` must be true or false", param="stream")
    return model, bool(stream)


def _abandon(ctx: ApiContext, task_id: UUID, owner_id: str) -> Callable[[], Awaitable[None]] | None:
    """Cancel the task nobody will read (None when INFERQ_CANCEL_ON_DISCONNECT=false)."""
    if not ctx.settings.cancel_on_disconnect:
        return None

    async def cancel() -> None:
        # It may have ended meanwhile: then there is nothing to cancel.
        with contextlib.suppress(InvalidTransition, TaskNotFound):
            await ctx.tasks.cancel(task_id, owner_id, "the client went away before the answer")

    return cancel
