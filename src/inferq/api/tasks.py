"""The native client API: submit, get, wait, events (SSE), cancel, list — owner-scoped."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.responses import Response

from inferq.api.auth import client_token
from inferq.api.body import documented, read_document, validate
from inferq.api.context import ApiContext, get_ctx
from inferq.api.errors import InvalidRequest, error_body
from inferq.api.render import INT4_MAX, json_response, parse_task_id, task_json
from inferq.api.sse import EventStream, close_quietly, native_frames
from inferq.db.tasks import Enqueued
from inferq.db.tokens import ApiToken
from inferq.domain.task import TaskStatus
from inferq.service import Event
from inferq.wire import SubmitRequest

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

_EVENT_ID = re.compile(r"([0-9]{1,10}):([0-9]{1,10})", re.ASCII)

Ctx = Annotated[ApiContext, Depends(get_ctx)]
Client = Annotated[ApiToken, Depends(client_token)]


async def submit_task(
    ctx: ApiContext,
    token: ApiToken,
    *,
    request_body: dict[str, Any],
    model: str | None = None,
    pool: str | None = None,
    streaming: bool = False,
    agent_id: str | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
) -> Enqueued:
    """Route by registry name (``model``) or directly (``pool``) and enqueue; shared by the
    native and OpenAI routes. Raises ShuttingDown, TooManyPending, UnknownModel."""
    ctx.drain.check()
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
    llm = await ctx.resolve_llm(model) if model is not None else None
    pool_name = llm.pool_name if llm is not None else pool
    if pool_name is None:
        raise InvalidRequest("name a `model` (or `llm`) or a `pool`", param="model")
    await ctx.pending.check(token.owner_id)
    enqueued = await ctx.tasks.enqueue(
        owner_id=token.owner_id,
        pool_name=pool_name,
        request_body=request_body,
        llm_name=llm.name if llm else None,
        model=llm.model if llm else None,
        tier=llm.tier if llm else None,
        streaming=streaming,
        agent_id=agent_id,
        priority=priority,
        max_attempts=max_attempts or ctx.settings.max_attempts,
        idempotency_key=idempotency_key,
    )
    if enqueued.created:
        ctx.metrics.submitted.labels(ctx.metrics.pool_label(pool_name)).inc()
    return enqueued


@router.post("", status_code=201, summary="Submit a task", openapi_extra=documented(SubmitRequest))
async def submit(
    ctx: Ctx,
    token: Client,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    return await submit_answer(ctx, token, request, idempotency_key)


async def submit_answer(
    ctx: ApiContext, token: ApiToken, request: Request, idempotency_key: str | None
) -> Response:
    """The submit route's answer, with the body read here (also served directly, see
    inferq.api.direct)."""
    body = validate(SubmitRequest, await read_document(request))
    names = [n for n in (body.model, body.llm, body.pool) if n is not None]
    if len(names) != 1:
        raise InvalidRequest("name exactly one of `model`, `llm` or `pool`", param="model")
    enqueued = await submit_task(
        ctx,
        token,
        request_body=body.request,
        model=body.model or body.llm,
        pool=body.pool,
        streaming=body.streaming,
        agent_id=body.agent_id,
        priority=body.priority,
        max_attempts=body.max_attempts,
        idempotency_key=idempotency_key,
    )
    return json_response(task_json(enqueued.task), 201 if enqueued.created else 200)


@router.get("", summary="List the owner's tasks, newest first")
async def list_tasks(
    ctx: Ctx,
    token: Client,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    agent_id: str | None = None,
    pool: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> Response:
    try:
        page = await ctx.tasks.list_tasks(
            token.owner_id,
            statuses=status,
            agent_id=agent_id,
            pool_name=pool,
            limit=limit,
            cursor=cursor,
        )
    except ValueError:
        raise InvalidRequest("invalid cursor; pass next_cursor as given", param="cursor") from None
    return json_response(
        {"data": [task_json(t) for t in page.tasks], "next_cursor": page.next_cursor}
    )


@router.get("/{task_id}", summary="Get a task")
async def get_task(ctx: Ctx, token: Client, task_id: str) -> Response:
    task = await ctx.tasks.get(parse_task_id(task_id), token.owner_id)
    return json_response(task_json(task))


@router.get("/{task_id}/wait", summary="Wait until the task ends, or the timeout")
async def wait_task(
    ctx: Ctx,
    token: Client,
    request: Request,
    task_id: str,
    timeout: Annotated[float, Query(ge=0)] = 30.0,  # noqa: ASYNC109 (the wire name)
) -> Response:
    return await wait_answer(ctx, token, request, task_id, timeout)


async def wait_answer(
    ctx: ApiContext, token: ApiToken, request: Request, task_id: str, timeout_s: float
) -> Response:
    """The wait route's answer (also served directly, see inferq.api.direct)."""
    tid = parse_task_id(task_id)
    ctx.drain.check()
    timeout_s = min(timeout_s, ctx.settings.max_wait_s)
    started = time.perf_counter()
    ctx.acquire_wait(token)
    try:
        # A client that left frees its slot at once, not at its timeout.
        task = await ctx.guarded(
            ctx.service.wait_terminal(tid, timeout_s, owner_id=token.owner_id), request=request
        )
    finally:
        ctx.release_wait(token)
    ctx.metrics.wait_seconds.labels("wait").observe(time.perf_counter() - started)
    headers = None if task.terminal else {"X-Inferq-Wait": "timeout"}
    return json_response(task_json(task), headers=headers)


@router.get("/{task_id}/events", summary="Stream status changes and chunks (SSE)")
async def task_events(
    ctx: Ctx,
    token: Client,
    request: Request,
    task_id: str,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    tid = parse_task_id(task_id)
    ctx.drain.check()
    after = _parse_event_id(last_event_id) if last_event_id else None
    ctx.acquire_wait(token)
    try:
        events = ctx.service.events(tid, owner_id=token.owner_id, after=after)
        first = await ctx.guarded(anext(events))  # TaskNotFound is still a plain 404 here
    except BaseException:
        ctx.release_wait(token)
        raise
    return EventStream(
        native_frames(prepend(first, events)),
        heartbeat_s=ctx.settings.sse_heartbeat_s,
        drain=ctx.drain.event,
        drain_frame=_DRAIN_FRAME,
        on_close=lambda: ctx.release_wait(token),
    )


@router.post("/{task_id}/cancel", summary="Cancel a task (idempotent)")
async def cancel_task(ctx: Ctx, token: Client, task_id: str) -> Response:
    task = await ctx.tasks.cancel(parse_task_id(task_id), token.owner_id)
    return json_response(task_json(task))


def _parse_event_id(raw: str) -> tuple[int, int]:
    # ASCII digits only (str.isdigit() also accepts '²', which int() refuses), and within the
    # database's integer range: the chunk read of one stream is batched with everyone else's.
    match = _EVENT_ID.fullmatch(raw.strip())
    if match is None or max(int(match[1]), int(match[2])) > INT4_MAX:
        raise InvalidRequest(
            "Last-Event-ID must be `<attempt>:<seq>` as sent in the `id:` lines; "
            "reconnect without it to start over",
            param="Last-Event-ID",
        )
    return int(match[1]), int(match[2])


async def prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """``first``, then the events of ``rest`` (closed with this generator)."""
    try:
        yield first
        async for event in rest:
            yield event
    finally:
        await close_quietly(rest)


_DRAIN_FRAME = (
    b"event: error\ndata: "
    + orjson.dumps(
        error_body(
            "this replica is shutting down; reconnect with Last-Event-ID to resume",
            "service_unavailable",
            "shutting_down",
        )
    )
    + b"\n\n"
)
