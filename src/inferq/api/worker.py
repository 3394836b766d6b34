"""The worker API: bind, claim (long-poll), heartbeat, unbind; start, chunks, complete, fail,
release; outcomes (many completes and fails in one call).

A worker token binds only the pools its token lists (403 otherwise) and only sees its owner's
sessions (another owner's session id is 404 like a missing one). Task writes are guarded in the
database by (session, attempt): a stale writer gets 409 ``lease_lost`` with the current task.
The outcomes route answers each item with what its single route would have answered (status
code and body), so one stale or unknown task never fails the others; it ends them all with
one statement, hence one notifying commit.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from inferq.api.auth import check_pools, worker_token
from inferq.api.body import documented, json_body, read_document, validate
from inferq.api.context import ApiContext, get_ctx
from inferq.api.errors import InvalidBody, ShuttingDown, error_json, lookup
from inferq.api.render import (
    INT4_MAX,
    json_response,
    parse_task_id,
    task_json,
    worker_task_json,
)
from inferq.db.tasks import Finished, Outcome
from inferq.db.tokens import ApiToken
from inferq.domain.task import Task
from inferq.errors import SessionNotFound, TaskError, TaskNotFound
from inferq.jsontext import dumps
from inferq.wire import (
    BindRequest,
    ChunksRequest,
    ClaimRequest,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    Holder,
    OutcomesRequest,
)

T = TypeVar("T")

router = APIRouter(prefix="/v1/worker", tags=["worker"])

# The inferq.pool_name domain of sql/0001_schema.sql: what a task's pool can be.
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}", re.ASCII)

Ctx = Annotated[ApiContext, Depends(get_ctx)]
Worker = Annotated[ApiToken, Depends(worker_token)]


def _parse_session_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise SessionNotFound(f"worker session {raw[:64]!r} does not exist; bind again") from None


async def _held(token: ApiToken, write: Awaitable[T]) -> T:
    """``write``'s result. A refusal that names a task of a pool this token may not serve is
    404, like a missing task: its 409 would show another pool's task to this worker."""
    try:
        return await write
    except TaskError as exc:
        raise _scoped(exc, token) from None


def _scoped(exc: Exception, token: ApiToken) -> Exception:
    task = getattr(exc, "task", None)
    if isinstance(task, Task) and not token.may_serve(task.pool_name):
        return TaskNotFound(f"task {task.id} not found")
    return exc


def _claimed(ctx: ApiContext, tasks: list[Task]) -> list[dict[str, object]]:
    for task in tasks:
        if task.claimed_at is not None:
            latency = (task.claimed_at - task.created_at).total_seconds()
            pool = ctx.metrics.pool_label(task.pool_name)
            ctx.metrics.claim_latency_seconds.labels(pool).observe(max(0.0, latency))
    return [worker_task_json(t) for t in tasks]


@router.post(
    "/sessions",
    status_code=201,
    summary="Bind a worker session; claims pending work",
    openapi_extra=documented(BindRequest),
)
async def bind(
    ctx: Ctx, token: Worker, body: Annotated[BindRequest, Depends(json_body(BindRequest))]
) -> Response:
    ctx.drain.check()
    pools = list(dict.fromkeys(body.pools))
    bad = [p for p in pools if not POOL_NAME.fullmatch(p)]
    if bad:
        # No task can ever be queued there: a typo would otherwise bind a session that idles.
        raise InvalidBody(
            f"pools: {bad[0][:70]!r} is not a pool name (letters, digits, `_.:-`, at most 63)",
            param="pools",
        )
    check_pools(token, pools)
    session = await ctx.sessions.bind(
        token.owner_id, pools, body.capacity, ttl_s=ctx.settings.session_ttl_s, name=body.name
    )
    ctx.remember_session(session.id, session.owner_id, session.pools)
    tasks = await ctx.tasks.claim(
        session.id, pools, limit=body.capacity, lease_s=ctx.settings.lease_s
    )
    return json_response(
        {
            "session_id": session.id,
            "pools": session.pools,
            "capacity": session.capacity,
            "lease_s": ctx.settings.lease_s,
            "heartbeat_s": ctx.settings.heartbeat_s,
            "tasks": _claimed(ctx, tasks),
        },
        201,
    )


@router.post(
    "/sessions/{session_id}/claim",
    summary="Claim up to max_tasks (long-poll)",
    openapi_extra=documented(ClaimRequest),
)
async def claim(ctx: Ctx, token: Worker, request: Request, session_id: str) -> Response:
    return await claim_answer(ctx, token, request, session_id)


async def claim_answer(
    ctx: ApiContext, token: ApiToken, request: Request, session_id: str
) -> Response:
    """The claim route's answer, with the body read here: callable without FastAPI's routing
    and dependency solving (as inferq.api.direct does for the hot client routes)."""
    body = validate(ClaimRequest, await read_document(request))
    sid = _parse_session_id(session_id)
    ctx.drain.check()
    # Owner and pools (remembered per replica); whether the session lives is vouched for by
    # the claim statement itself (bound=True), so a claim that finds work costs one statement.
    pools = await ctx.check_session(sid, token)
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(body.wait_s, ctx.settings.max_wait_s)
    tasks: list[Task] = []
    live_until = -math.inf  # the session's expiry as last read, on the loop's clock
    # Interest is registered before the first claim, so work that arrives in between wakes us.
    async with ctx.service.pool_waiter(pools) as waiter:
        while not ctx.drain.draining:
            tasks = await ctx.tasks.claim(
                sid, pools, limit=body.max_tasks, lease_s=ctx.settings.lease_s, bound=True
            )
            if tasks:
                break
            # Nothing to take. An expired session never claims anything, so a long-poll must not
            # outlive it: a session that is gone or expired is told so (404: bind again). It is
            # checked when the first claim finds nothing (a live one is extended), and again
            # after a wake that found nothing once its expiry as last read has passed; only
            # heartbeats extend it then, or an open long-poll would keep a stalled worker's
            # session alive. An expiry only moves forward and the reaper removes a session only
            # after it, so a reaped session is found at the first wake after the reap, and a
            # live one costs no read per wake.
            if loop.time() >= live_until:
                first = live_until == -math.inf
                session = await ctx.live_session(sid, extend=first)
                left_s = (session.expires_at - datetime.now(UTC)).total_seconds()
                live_until = loop.time() + left_s
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                # A worker that left must not have work claimed into its closed connection
                # (the task would sit until its lease expired and count as a lost attempt).
                await ctx.guarded(waiter.wait(remaining), request=request)
            except ShuttingDown:
                break  # an empty answer: the worker claims again, from another replica
    ctx.metrics.claim_seconds.observe(time.perf_counter() - started)
    return json_response({"tasks": _claimed(ctx, tasks)})


@router.post(
    "/sessions/{session_id}/heartbeat",
    summary="Extend the session and its leases",
    openapi_extra=documented(HeartbeatRequest),
)
async def heartbeat(
    ctx: Ctx,
    token: Worker,
    session_id: str,
    body: Annotated[HeartbeatRequest, Depends(json_body(HeartbeatRequest))],
) -> Response:
    sid = _parse_session_id(session_id)
    await ctx.check_session(sid, token)
    beat = await ctx.sessions.heartbeat(
        sid, body.tasks, ttl_s=ctx.settings.session_ttl_s, lease_s=ctx.settings.lease_s
    )
    return json_response(
        {
            "cancelled": beat.cancelled,
            "lost": beat.lost,
            "lease_s": ctx.settings.lease_s,
            "heartbeat_s": ctx.settings.heartbeat_s,
        }
    )


@router.delete("/sessions/{session_id}", summary="Unbind; held tasks go back to pending")
async def unbind(ctx: Ctx, token: Worker, session_id: str) -> Response:
    sid = _parse_session_id(session_id)
    await ctx.check_session(sid, token)
    released = await ctx.tasks.revert_session(sid, reason="its worker unbound")
    await ctx.sessions.unbind(sid)
    ctx.forget_session(sid)
    return json_response({"released": len(released)})


@router.post(
    "/tasks/{task_id}/start", summary="claimed -> running", openapi_extra=documented(Holder)
)
async def start(
    ctx: Ctx, token: Worker, task_id: str, body: Annotated[Holder, Depends(json_body(Holder))]
) -> Response:
    tid = parse_task_id(task_id)
    await ctx.check_session(body.session_id, token)
    task = await _held(token, ctx.tasks.start(tid, body.session_id, body.attempt))
    return json_response(worker_task_json(task))


@router.post(
    "/tasks/{task_id}/chunks",
    summary="Post stream chunks (attempt, seq)",
    openapi_extra=documented(ChunksRequest),
)
async def chunks(
    ctx: Ctx,
    token: Worker,
    task_id: str,
    body: Annotated[ChunksRequest, Depends(json_body(ChunksRequest))],
) -> Response:
    tid = parse_task_id(task_id)
    if body.attempt > INT4_MAX or any(c.seq > INT4_MAX for c in body.chunks):
        # Chunk posts of all tasks share one flush: a value the database refuses would fail
        # every other worker's chunks of that flush.
        raise InvalidBody(f"attempt and seq must be at most {INT4_MAX}", param="chunks")
    await ctx.check_session(body.session_id, token)
    items = [(c.seq, dumps(c.data).decode()) for c in body.chunks]
    last_seq = await _held(
        token, ctx.service.post_chunks(tid, body.session_id, body.attempt, items)
    )
    return json_response({"last_seq": last_seq})


@router.post(
    "/tasks/{task_id}/complete",
    summary="Store the response (idempotent)",
    openapi_extra=documented(CompleteRequest),
)
async def complete(
    ctx: Ctx,
    token: Worker,
    task_id: str,
    body: Annotated[CompleteRequest, Depends(json_body(CompleteRequest))],
) -> Response:
    tid = parse_task_id(task_id)
    await ctx.check_session(body.session_id, token)
    task = await _held(token, ctx.tasks.complete(tid, body.session_id, body.attempt, body.response))
    return json_response(task_json(task))


@router.post(
    "/tasks/{task_id}/fail",
    summary="Fail the task with a message (idempotent)",
    openapi_extra=documented(FailRequest),
)
async def fail(
    ctx: Ctx,
    token: Worker,
    task_id: str,
    body: Annotated[FailRequest, Depends(json_body(FailRequest))],
) -> Response:
    tid = parse_task_id(task_id)
    await ctx.check_session(body.session_id, token)
    task = await _held(token, ctx.tasks.fail(tid, body.session_id, body.attempt, body.message))
    return json_response(task_json(task))


@router.post(
    "/tasks/{task_id}/release",
    summary="Give the task back to pending",
    openapi_extra=documented(Holder),
)
async def release(
    ctx: Ctx, token: Worker, task_id: str, body: Annotated[Holder, Depends(json_body(Holder))]
) -> Response:
    tid = parse_task_id(task_id)
    await ctx.check_session(body.session_id, token)
    task = await _held(
        token,
        ctx.tasks.release(tid, body.session_id, body.attempt, reason="its worker released it"),
    )
    return json_response(task_json(task))


@router.post(
    "/sessions/{session_id}/outcomes",
    summary="Complete and fail many held tasks; optionally claim more",
    openapi_extra=documented(OutcomesRequest),
)
async def outcomes(ctx: Ctx, token: Worker, request: Request, session_id: str) -> Response:
    return await outcomes_answer(ctx, token, request, session_id)


async def outcomes_answer(
    ctx: ApiContext, token: ApiToken, request: Request, session_id: str
) -> Response:
    """The outcomes route's answer, with the body read here (see claim_answer)."""
    body = validate(OutcomesRequest, await read_document(request))
    sid = _parse_session_id(session_id)
    pools = await ctx.check_session(sid, token)
    items = [Outcome(o.task_id, o.attempt, o.response, o.error) for o in body.outcomes]
    finished = await ctx.tasks.finish_many(sid, items)
    results = [
        _outcome_json(o.task_id, r if isinstance(r, Finished) else _scoped(r, token))
        for o, r in zip(items, finished, strict=True)
    ]
    tasks: list[Task] = []
    if body.claim and not ctx.drain.draining:
        # Only a live session takes work (the statement checks). A session that just expired
        # still gets the answers above, and no tasks; its next claim or heartbeat tells the
        # worker to bind again.
        tasks = await ctx.tasks.claim(
            sid, pools, limit=body.claim, lease_s=ctx.settings.lease_s, bound=True
        )
    return json_response({"results": results, "tasks": _claimed(ctx, tasks)})


def _outcome_json(task_id: UUID, result: Finished | Exception) -> dict[str, Any]:
    if isinstance(result, Finished):
        state = {"id": task_id, "status": result.status.value, "attempt": result.attempt}
        return {"id": task_id, "status_code": 200, "task": state}
    # The very answer the single route gives for this error, status and body alike.
    mapping = lookup(result)
    error = error_json(result, mapping)["error"]
    return {
        "id": task_id,
        "status_code": mapping.status,
        "task": error.get("task"),
        "error": error,
    }
