"""The OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

The request body is queued as is; ``model`` picks the pool through the registry and
``stream`` decides streaming, and ``service_tier`` the lane (``priority`` -> interactive,
``default``/``auto`` -> default, ``flex`` -> batch). A sync call answers the worker's response
verbatim (502 ``task_failed`` with the worker's message when it fails); a streaming call relays
the worker's chunks (see inferq.api.sse). What happens to a task whose caller left is the completion
service's business (inferq.services.completions).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from inferq.api.body import documented, read_document, validate
from inferq.api.deps import Client, Svc, disconnected, hot
from inferq.api.errors import ERRORS, InvalidBody
from inferq.api.ratelimits import rate_limit_headers
from inferq.api.render import json_response, model_json
from inferq.api.sse import (
    REVOKED_OPENAI,
    EventStream,
    openai_error_frame,
    openai_frames,
    prepend,
)
from inferq.domain.lanes import DEFAULT_LANE, SERVICE_TIERS
from inferq.domain.records import ApiToken
from inferq.errors import InvalidRequest
from inferq.jsontext import dumps
from inferq.services import Services
from inferq.services.completions import Call
from inferq.wire import (
    ChatCompletionRequest,
    CompletionOut,
    ModelList,
    ModelOut,
    TextCompletionRequest,
)

router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)

_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "with `stream: true`"}
}

_DRAIN_FRAME = openai_error_frame(
    "this replica is shutting down; retry the request (with the same Idempotency-Key to "
    "reattach to the same generation)",
    "shutting_down",
    "service_unavailable",
)
_ERROR_FRAME = openai_error_frame(
    "the stream failed on the server; retry the request (with the same Idempotency-Key to "
    "reattach to the same generation)",
    "stream_failed",
    "service_unavailable",
)


@router.post(
    "/chat/completions",
    response_model=CompletionOut,
    responses=_STREAMED,
    summary="OpenAI chat completion, queued",
    openapi_extra=documented(ChatCompletionRequest),
)
@hot
async def chat_completions(
    svc: Svc,
    token: Client,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    return await _complete(svc, token, request, ChatCompletionRequest, idempotency_key)


@router.post(
    "/completions",
    response_model=CompletionOut,
    responses=_STREAMED,
    summary="OpenAI text completion, queued",
    openapi_extra=documented(TextCompletionRequest),
)
@hot
async def completions(
    svc: Svc,
    token: Client,
    request: Request,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Any:
    return await _complete(svc, token, request, TextCompletionRequest, idempotency_key)


@router.get("/models", response_model=ModelList, summary="The models of the LLM registry")
async def models(svc: Svc, token: Client) -> Response:
    return json_response(
        {"object": "list", "data": [model_json(m) for m in await svc.tasks.models()]}
    )


@router.get("/models/{model:path}", response_model=ModelOut, summary="One model of the registry")
async def model(svc: Svc, token: Client, model: str) -> Response:
    return json_response(model_json(await svc.tasks.model(model)))


async def _complete(
    svc: Services,
    token: ApiToken,
    request: Request,
    shape: type[ChatCompletionRequest | TextCompletionRequest],
    key: str | None,
) -> Response:
    doc = await read_document(request)
    try:
        parsed = validate(shape, doc)
    except InvalidBody as exc:
        # OpenAI answers a malformed completion request with 400 invalid_request_error.
        raise InvalidRequest(exc.message, param=exc.param) from None
    stream = bool(parsed.stream)
    n = (parsed.model_extra or {}).get("n")
    if stream and isinstance(n, int) and n > 1:
        raise InvalidRequest(
            "`n` > 1 is not supported with `stream: true`; send n streaming requests, "
            "or ask without `stream`",
            param="n",
        )
    lane = _lane(parsed.model_extra or {})
    call = await svc.completions.start(
        token, doc, model=parsed.model, stream=stream, key=key, lane=lane
    )
    # The request is stored; a sync call may wait for minutes, so its parsed body is not
    # kept alive meanwhile.
    del doc, parsed
    headers = {"X-Inferq-Task-Id": str(call.task_id), **rate_limit_headers(call.limits)}
    if stream:
        return await _stream(svc, call, headers, disconnected(request.receive))
    task = await svc.completions.answer(call, gone=disconnected(request.receive))
    return Response(dumps(task.response_body), media_type="application/json", headers=headers)


def _lane(extra: dict[str, Any]) -> str:
    """The lane OpenAI's ``service_tier`` asks for (inferq.domain.lanes.SERVICE_TIERS)."""
    tier = extra.get("service_tier")
    if tier is None:
        return DEFAULT_LANE
    if not isinstance(tier, str) or tier not in SERVICE_TIERS:
        raise InvalidRequest(
            f"service_tier must be one of {', '.join(SERVICE_TIERS)}", param="service_tier"
        )
    return SERVICE_TIERS[tier]


async def _stream(
    svc: Services, call: Call, headers: dict[str, str], gone: Callable[[], Awaitable[None]]
) -> EventStream:
    following = await svc.completions.follow(call, gone=gone)
    return EventStream(
        openai_frames(prepend(following.first, following.rest), on_abandon=call.abandon),
        heartbeat_s=svc.settings.sse_heartbeat_s,
        drain=svc.drain.expired_event,
        drain_frame=_DRAIN_FRAME,
        error_frame=_ERROR_FRAME,
        on_disconnect=call.left,
        on_drain=call.abandon,
        on_error=call.abandon,
        on_close=following.close,
        headers=headers,
        revoked=following.revoked,
        revoked_frame=REVOKED_OPENAI,
    )
