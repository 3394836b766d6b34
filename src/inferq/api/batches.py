"""OpenAI's Files and Batches APIs: /v1/files and /v1/batches, owner-scoped, in OpenAI's shapes
(the official ``openai`` client works unchanged). The use cases are inferq.services.batches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response, StreamingResponse

from inferq.api.body import documented, json_body
from inferq.api.deps import Client, Svc
from inferq.api.errors import ERRORS
from inferq.api.multipart import read_form
from inferq.api.render import json_response
from inferq.domain.batch import Batch, Counts, StoredFile
from inferq.services.batches import Upload
from inferq.wire import (
    BatchList,
    BatchOut,
    CreateBatchRequest,
    FileDeleted,
    FileList,
    FileOut,
)

router = APIRouter(prefix="/v1", tags=["batches"], responses=ERRORS)

_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                    },
                }
            }
        },
    }
}


@router.post("/files", response_model=FileOut, summary="Upload a file", openapi_extra=_UPLOAD)
async def upload_file(svc: Svc, token: Client, request: Request) -> Response:
    async def begin(filename: str) -> Upload:
        return await svc.files.begin(token, filename)

    upload, fields = await read_form(request, "file", begin)
    try:
        stored = await upload.finish(fields.get("purpose", ""))
    except BaseException:
        await upload.abort()
        raise
    return json_response(file_json(stored))


@router.get("/files", response_model=FileList, summary="List files")
async def list_files(
    svc: Svc,
    token: Client,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    found = await svc.files.list(token, purpose=purpose, after=after, limit=limit + 1, order=order)
    return json_response(page([file_json(f) for f in found], limit))


@router.get("/files/{file_id}", response_model=FileOut, summary="A file")
async def get_file(svc: Svc, token: Client, file_id: str) -> Response:
    return json_response(file_json(await svc.files.get(token, file_id)))


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
    summary="A file's content, streamed",
)
async def file_content(svc: Svc, token: Client, file_id: str) -> StreamingResponse:
    stored, parts = await svc.files.content(token, file_id)
    return StreamingResponse(
        _closing(parts),
        media_type="application/octet-stream",
        headers={"Content-Length": str(stored.bytes)},
    )


@router.delete("/files/{file_id}", response_model=FileDeleted, summary="Delete a file")
async def delete_file(svc: Svc, token: Client, file_id: str) -> Response:
    await svc.files.delete(token, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


@router.post(
    "/batches",
    response_model=BatchOut,
    summary="Create a batch",
    openapi_extra=documented(CreateBatchRequest),
)
async def create_batch(
    svc: Svc,
    token: Client,
    body: Annotated[CreateBatchRequest, Depends(json_body(CreateBatchRequest))],
) -> Response:
    batch, counts = await svc.batches.create(
        token,
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
    )
    return json_response(batch_json(batch, counts))


@router.get("/batches", response_model=BatchList, summary="List batches, newest first")
async def list_batches(
    svc: Svc,
    token: Client,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    found = await svc.batches.list(token, after=after, limit=limit + 1)
    return json_response(page([batch_json(b, c) for b, c in found], limit))


@router.get("/batches/{batch_id}", response_model=BatchOut, summary="A batch")
async def get_batch(svc: Svc, token: Client, batch_id: str) -> Response:
    return json_response(batch_json(*await svc.batches.get(token, batch_id)))


@router.post("/batches/{batch_id}/cancel", response_model=BatchOut, summary="Cancel a batch")
async def cancel_batch(svc: Svc, token: Client, batch_id: str) -> Response:
    return json_response(batch_json(*await svc.batches.cancel(token, batch_id)))


async def _closing(parts: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for part in parts:
            yield part
    finally:
        aclose = getattr(parts, "aclose", None)
        if aclose is not None:
            await aclose()


def page(items: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's cursor page of ``items`` (one more than ``limit`` was read: ``has_more``)."""
    shown = items[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(items) > limit,
    }


def _epoch(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def file_json(stored: StoredFile) -> dict[str, Any]:
    return {
        "id": stored.id,
        "object": "file",
        "bytes": stored.bytes,
        "created_at": int(stored.created_at.timestamp()),
        "filename": stored.filename,
        "purpose": stored.purpose,
        "status": "processed",
        "status_details": None,
    }


def batch_json(batch: Batch, counts: Counts) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        "errors": batch.errors,
        "created_at": int(batch.created_at.timestamp()),
        "in_progress_at": _epoch(batch.in_progress_at),
        "expires_at": _epoch(batch.expires_at),
        "finalizing_at": _epoch(batch.finalizing_at),
        "completed_at": _epoch(batch.completed_at),
        "failed_at": _epoch(batch.failed_at),
        "expired_at": _epoch(batch.expired_at),
        "cancelling_at": _epoch(batch.cancelling_at),
        "cancelled_at": _epoch(batch.cancelled_at),
        "request_counts": {
            "total": counts.total,
            "completed": counts.completed,
            "failed": counts.failed,
        },
        "metadata": batch.metadata,
    }
