"""The worker API: bind, claim (long-poll), heartbeat, unbind; start, chunks, complete, fail,
release; outcomes (many completes and fails in one call). The use cases are
inferq.services.claims; each route parses, makes one call and renders.

The outcomes route answers each item with what its single route would have answered (status
code and body), so one stale or unknown task never fails the others.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from inferq.api.body import documented, json_body, read_document, validate
from inferq.api.deps import Svc, Worker, disconnected, hot
from inferq.api.errors import ERRORS, InvalidBody, error_json, lookup
from inferq.api.render import INT4_MAX, json_response, parse_task_id, task_json, worker_task_json
from inferq.domain.records import Finished, Outcome
from inferq.errors import SessionNotFound
from inferq.jsontext import dumps
from inferq.wire import (
    BindRequest,
    BindResponse,
    ChunksRequest,
    ChunksResponse,
    ClaimRequest,
    ClaimResponse,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    Holder,
    OutcomesRequest,
    OutcomesResponse,
    TaskOut,
    UnbindResponse,
    WorkerTask,
)

router = APIRouter(prefix="/v1/worker", tags=["worker"], responses=ERRORS)


def _parse_session_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise SessionNotFound(f"worker session {raw[:64]!r} does not exist; bind again") from None


@router.post(
    "/sessions",
    status_code=201,
    response_model=BindResponse,
    summary="Bind a worker session; claims pending work",
    openapi_extra=documented(BindRequest),
)
async def bind(
    svc: Svc, token: Worker, body: Annotated[BindRequest, Depends(json_body(BindRequest))]
) -> Response:
    session, tasks = await svc.claims.bind(token, body.pools, body.capacity, body.name)
    return json_response(
        {
            "session_id": session.id,
            "pools": session.pools,
            "capacity": session.capacity,
            "lease_s": svc.settings.lease_s,
            "heartbeat_s": svc.settings.heartbeat_s,
            "claim_ack_s": min(svc.settings.claim_ack_s, svc.settings.lease_s),
            "tasks": [worker_task_json(t) for t in tasks],
        },
        201,
    )


@router.post(
    "/sessions/{session_id}/claim",
    response_model=ClaimResponse,
    summary="Claim up to max_tasks (long-poll)",
    openapi_extra=documented(ClaimRequest),
)
@hot
async def claim(svc: Svc, token: Worker, request: Request, session_id: str) -> Response:
    body = validate(ClaimRequest, await read_document(request))
    sid = _parse_session_id(session_id)
    tasks = await svc.claims.claim(
        token, sid, body.max_tasks, body.wait_s, gone=disconnected(request.receive)
    )
    return json_response({"tasks": [worker_task_json(t) for t in tasks]})


@router.post(
    "/sessions/{session_id}/heartbeat",
    response_model=HeartbeatResponse,
    summary="Extend the session and its leases",
    openapi_extra=documented(HeartbeatRequest),
)
async def heartbeat(
    svc: Svc,
    token: Worker,
    session_id: str,
    body: Annotated[HeartbeatRequest, Depends(json_body(HeartbeatRequest))],
) -> Response:
    beat = await svc.claims.heartbeat(token, _parse_session_id(session_id), body.tasks)
    return json_response(
        {
            "cancelled": beat.cancelled,
            "lost": beat.lost,
            "lease_s": svc.settings.lease_s,
            "heartbeat_s": svc.settings.heartbeat_s,
        }
    )


@router.delete(
    "/sessions/{session_id}",
    response_model=UnbindResponse,
    summary="Unbind; held tasks go back to pending",
)
async def unbind(svc: Svc, token: Worker, session_id: str) -> Response:
    released = await svc.claims.unbind(token, _parse_session_id(session_id))
    return json_response({"released": released})


@router.post(
    "/tasks/{task_id}/start",
    response_model=WorkerTask,
    summary="claimed -> running",
    openapi_extra=documented(Holder),
)
async def start(
    svc: Svc, token: Worker, task_id: str, body: Annotated[Holder, Depends(json_body(Holder))]
) -> Response:
    task = await svc.claims.start(token, parse_task_id(task_id), body.session_id, body.attempt)
    return json_response(worker_task_json(task))


@router.post(
    "/tasks/{task_id}/chunks",
    response_model=ChunksResponse,
    summary="Post stream chunks (attempt, seq)",
    openapi_extra=documented(ChunksRequest),
)
async def chunks(
    svc: Svc,
    token: Worker,
    task_id: str,
    body: Annotated[ChunksRequest, Depends(json_body(ChunksRequest))],
) -> Response:
    tid = parse_task_id(task_id)
    if body.attempt > INT4_MAX or any(c.seq > INT4_MAX for c in body.chunks):
        # Chunk posts of all tasks share one flush: a value the database refuses would fail
        # every other worker's chunks of that flush.
        raise InvalidBody(f"attempt and seq must be at most {INT4_MAX}", param="chunks")
    items = [(c.seq, dumps(c.data).decode()) for c in body.chunks]
    last_seq = await svc.claims.post_chunks(token, tid, body.session_id, body.attempt, items)
    return json_response({"last_seq": last_seq})


@router.post(
    "/tasks/{task_id}/complete",
    response_model=TaskOut,
    summary="Store the response (idempotent)",
    openapi_extra=documented(CompleteRequest),
)
async def complete(
    svc: Svc,
    token: Worker,
    task_id: str,
    body: Annotated[CompleteRequest, Depends(json_body(CompleteRequest))],
) -> Response:
    tid = parse_task_id(task_id)
    task = await svc.claims.complete(token, tid, body.session_id, body.attempt, body.response)
    return json_response(task_json(task))


@router.post(
    "/tasks/{task_id}/fail",
    response_model=TaskOut,
    summary="Fail the task with a message (idempotent)",
    openapi_extra=documented(FailRequest),
)
async def fail(
    svc: Svc,
    token: Worker,
    task_id: str,
    body: Annotated[FailRequest, Depends(json_body(FailRequest))],
) -> Response:
    tid = parse_task_id(task_id)
    task = await svc.claims.fail(token, tid, body.session_id, body.attempt, body.message)
    return json_response(task_json(task))


@router.post(
    "/tasks/{task_id}/release",
    response_model=TaskOut,
    summary="Give the task back to pending",
    openapi_extra=documented(Holder),
)
async def release(
    svc: Svc, token: Worker, task_id: str, body: Annotated[Holder, Depends(json_body(Holder))]
) -> Response:
    task = await svc.claims.release(token, parse_task_id(task_id), body.session_id, body.attempt)
    return json_response(task_json(task))


@router.post(
    "/sessions/{session_id}/outcomes",
    response_model=OutcomesResponse,
    summary="Complete and fail many held tasks; optionally claim more",
    openapi_extra=documented(OutcomesRequest),
)
@hot
async def outcomes(svc: Svc, token: Worker, request: Request, session_id: str) -> Response:
    body = validate(OutcomesRequest, await read_document(request))
    sid = _parse_session_id(session_id)
    items = [Outcome(o.task_id, o.attempt, o.response, o.error) for o in body.outcomes]
    finished, tasks = await svc.claims.outcomes(token, sid, items, body.claim)
    results = [_outcome_json(o.task_id, r) for o, r in zip(items, finished, strict=True)]
    return json_response({"results": results, "tasks": [worker_task_json(t) for t in tasks]})


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
