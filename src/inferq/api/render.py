"""JSON answers: orjson responses and the wire shapes of tasks (docs/protocol.md)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import structlog
from starlette.responses import Response

from inferq.domain.records import ApiToken, Llm
from inferq.domain.task import Task
from inferq.errors import TaskNotFound
from inferq.jsontext import dumps

# The largest value of a PostgreSQL integer column (attempt, seq, priority...).
INT4_MAX = 2**31 - 1


class OrjsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return OrjsonResponse(content, status_code=status_code, headers=headers)


def task_json(task: Task) -> dict[str, Any]:
    """The task object of the native API."""
    return {
        "id": task.id,
        "status": task.status.value,
        "pool": task.pool_name,
        "llm": task.llm_name,
        "model": task.model,
        "tier": task.tier,
        "streaming": task.streaming,
        "request": task.request_body,
        "response": task.response_body,
        "error": task.error_message,
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "priority": task.priority,
        "lane": task.lane,
        "agent_id": task.agent_id,
        "created_at": task.created_at,
        "claimed_at": task.claimed_at,
        "stream_started_at": task.stream_started_at,
        "completed_at": task.completed_at,
    }


def worker_task_json(task: Task) -> dict[str, Any]:
    """The WorkerTask object of the worker API."""
    return {
        "id": task.id,
        "attempt": task.attempt,
        "pool": task.pool_name,
        "llm": task.llm_name,
        "model": task.model,
        "streaming": task.streaming,
        "request": task.request_body,
        "priority": task.priority,
        "lease_expires_at": task.lease_expires_at,
    }


def model_json(llm: Llm) -> dict[str, Any]:
    """OpenAI's model object for a registry entry."""
    return {
        "id": llm.name,
        "object": "model",
        "created": int(llm.created_at.timestamp()),
        "owned_by": "inferq",
        "pool": llm.pool_name,
        "tier": llm.tier,
    }


def llm_json(llm: Llm) -> dict[str, Any]:
    return {
        "name": llm.name,
        "pool": llm.pool_name,
        "model": llm.model,
        "tier": llm.tier,
        "max_tokens": llm.max_tokens,
        "max_n": llm.max_n,
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
        "lanes": token.lanes,
        "priority_min": token.priority_min,
        "priority_max": token.priority_max,
        "weight": token.weight,
        "secret": secret,
    }


def parse_task_id(raw: str) -> UUID:
    """A task id from the path; anything that is not a UUID is a missing task (404)."""
    try:
        task_id = UUID(raw)
    except ValueError:
        raise TaskNotFound(f"task {raw[:64]!r} not found; task ids are UUIDs") from None
    structlog.contextvars.bind_contextvars(task_id=str(task_id))
    return task_id
