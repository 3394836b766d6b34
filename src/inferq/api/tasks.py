"""The native client API: submit, get, wait, events (SSE), cancel, list — owner-scoped."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from inferq.api.body import documented, read_document, validate
from inferq.api.deps import Client, Svc, disconnected, hot
from inferq.api.errors import ERRORS, error_body
from inferq.api.ratelimits import rate_limit_headers
from inferq.api.render import INT4_MAX, json_response, parse_task_id, task_json
from inferq.api.sse import EventStream, native_frames, prepend
from inferq.domain.task import TaskStatus
from inferq.errors import InvalidRequest
from inferq.services.tasks import Submission
from inferq.wire import SubmitRequest, TaskOut, TaskPage

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], responses=ERRORS)

_EVENT_ID = re.compile(r"([0-9]{1,10}):([0-9]{1,10})", re.ASCII)


@router.post(
    "",
    status_code=201,
    response_model=TaskOut,
    summary="Submit a task",
    openapi_extra=documented(SubmitRequest),
)
@hot
async def submit(
    svc: Svc,
    token: Client,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    body = validate(SubmitRequest, await read_document(request))
    names = [n for n in (body.model, body.llm, body.pool) if n is not None]
    if len(names) != 1:
        raise InvalidRequest("name exactly one of `model`, `llm` or `pool`", param="model")
    submission = Submission(
        body.request,
        model=body.model or body.llm,
        pool=body.pool,
        streaming=body.streaming,
        agent_id=body.agent_id,
        priority=body.priority,
        max_attempts=body.max_attempts,
        idempotency_key=idempotency_key,
        lane=body.lane,
    )
    enqueued = await svc.tasks.submit(token, submission)
    status = 201 if enqueued.created else 200
    return json_response(task_json(enqueued.task), status, rate_limit_headers(enqueued.limits))


@router.get("", response_model=TaskPage, summary="List the owner's tasks, newest first")
async def list_tasks(
    svc: Svc,
    token: Client,
    status: Annotated[list[TaskStatus] | None, Query()] = None,
    agent_id: str | None = None,
    pool: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> Response:
    page = await svc.tasks.list(
        token, statuses=status, agent_id=agent_id, pool=pool, limit=limit, cursor=cursor
    )
    return json_response(
        {"data": [task_json(t) for t in page.tasks], "next_cursor": page.next_cursor}
    )


@router.get("/{task_id}", response_model=TaskOut, summary="Get a task")
async def get_task(svc: Svc, token: Client, task_id: str) -> Response:
    task, waiting = await svc.tasks.get(token, parse_task_id(task_id))
    return json_response({**task_json(task), "waiting_for_worker": waiting})


@router.get(
    "/{task_id}/wait", response_model=TaskOut, summary="Wait until the task ends, or the timeout"
)
@hot
async def wait_task(
    svc: Svc,
    token: Client,
    request: Request,
    task_id: str,
    timeout: Annotated[float, Query(ge=0)] = 30.0,  # noqa: ASYNC109 (the wire name)
) -> Response:
    tid = parse_task_id(task_id)
    started = time.perf_counter()
    # A client that left frees its slot at once, not at its timeout.
    task = await svc.tasks.wait(token, tid, timeout, gone=disconnected(request.receive))
    svc.metrics.wait_seconds.labels("wait").observe(time.perf_counter() - started)
    headers = None if task.terminal else {"X-Inferq-Wait": "timeout"}
    return json_response(task_json(task), headers=headers)


@router.get(
    "/{task_id}/events",
    summary="Stream status changes and chunks (SSE)",
    status_code=200,
    response_class=EventStream,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def task_events(
    svc: Svc,
    token: Client,
    task_id: str,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Any:
    tid = parse_task_id(task_id)
    after = _parse_event_id(last_event_id) if last_event_id else None
    following = await svc.tasks.follow(token, tid, after)
    return EventStream(
        native_frames(prepend(following.first, following.rest)),
        heartbeat_s=svc.settings.sse_heartbeat_s,
        drain=svc.drain.expired_event,
        drain_frame=_DRAIN_FRAME,
        error_frame=_ERROR_FRAME,
        on_close=following.close,
        revoked=following.revoked,
    )


@router.post("/{task_id}/cancel", response_model=TaskOut, summary="Cancel a task (idempotent)")
async def cancel_task(svc: Svc, token: Client, task_id: str) -> Response:
    return json_response(task_json(await svc.tasks.cancel(token, parse_task_id(task_id))))


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


def _error_event(message: str, code: str) -> bytes:
    body = orjson.dumps(error_body(message, "service_unavailable", code))
    return b"event: error\ndata: " + body + b"\n\n"


_DRAIN_FRAME = _error_event(
    "this replica is shutting down; reconnect with Last-Event-ID to resume", "shutting_down"
)
_ERROR_FRAME = _error_event(
    "the stream failed on the server; reconnect with Last-Event-ID to resume", "stream_failed"
)
