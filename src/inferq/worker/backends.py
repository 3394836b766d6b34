"""Backends: handlers that turn a task's OpenAI request into chunks and a response.

- EchoBackend streams the last user message (or the prompt) back word by word; for demos/tests.
- OpenAIBackend forwards the request to an upstream OpenAI-compatible server (vLLM, llama.cpp
  server, Ollama ...) and relays its stream chunk by chunk as it arrives.

A request with ``prompt`` and no ``messages`` is a completions request (``text_completion``
objects); anything else is a chat request (``chat.completion.chunk`` objects).

How OpenAIBackend sorts upstream failures (docs/protocol.md, "Worker API"):
- The upstream cannot be reached (connection refused, reset, or cut before the answer ended):
  BackendUnavailableError. The worker gives the task back to the queue, uses up no attempt,
  and takes no work until :meth:`OpenAIBackend.check` passes again.
- No answer within ``timeout_s``: a non-streaming answer only starts once generation ends,
  so a slow generation and a dead server look alike. One health check decides: a server
  that still answers ``GET /models`` is slow (UpstreamError, the task fails), one that does
  not is down (BackendUnavailableError).
- An HTTP error (4xx, 5xx), a malformed or oversized answer: UpstreamError with the
  upstream's own message. These messages reach the task's client, so they never carry the
  upstream's URL, headers or key; the details go to the worker's own log.
- Answers are read within limits (``max_response_bytes`` for a whole answer,
  ``max_line_bytes`` for one line of a stream), see ``inferq.worker.responses``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog
from yarl import URL

from inferq.jsontext import dumps
from inferq.wire import JsonValue, WorkerTask
from inferq.worker.client import proxy_for
from inferq.worker.context import TaskContext
from inferq.worker.errors import BackendUnavailableError
from inferq.worker.responses import ResponseTooLargeError, read_body, read_lines

log = structlog.get_logger("inferq.worker")

DEFAULT_MAX_RESPONSE_BYTES = 16 << 20
DEFAULT_MAX_LINE_BYTES = 1 << 20
CHECK_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
_ERROR_BODY_BYTES = 64 << 10  # enough of an error answer for its message


class UpstreamError(Exception):
    """The upstream inference server failed; the message is what the task's client sees."""


def is_completion(request: dict[str, Any]) -> bool:
    """Whether ``request`` is a /v1/completions body (a prompt and no messages)."""
    return "prompt" in request and "messages" not in request


class EchoBackend:
    """Answers with the request's own text, one word per chunk, ``delay_s`` apart.

    Every chunk and the response name the attempt that wrote them in OpenAI's
    ``system_fingerprint`` field: ``fp_echo_<task id hex>_<attempt>``. The text is the same on
    every attempt, so this is what tells a re-run's answer from a stale worker's; the e2e
    checker reads it to verify fencing (I5).
    """

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def __call__(self, task: WorkerTask, ctx: TaskContext) -> JsonValue:
        """Emit the words as chunks (for a streaming task) and return the whole response."""
        completion = is_completion(task.request)
        text = _prompt_text(task.request) if completion else _last_user_text(task.request)
        words = text.split()
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        shape = _Shape(task, completion, fingerprint=f"fp_echo_{task.id.hex}_{task.attempt}")
        if not completion:
            ctx.emit(shape.chunk("", role=True))
        for piece in pieces:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            ctx.emit(shape.chunk(piece))
        ctx.emit(shape.chunk("", finish_reason="stop"))
        return shape.response("".join(pieces), prompt_tokens=len(text.split()))

    async def aclose(self) -> None:
        return None


class OpenAIBackend:
    """Forwards each task to ``base_url`` (…/v1 is added when the URL has no path)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        capacity: int = 1,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self.base_url = _api_base(base_url)
        self.timeout_s = timeout_s
        self.capacity = capacity
        self.max_response_bytes = max_response_bytes
        self.max_line_bytes = max_line_bytes
        self.check_timeout_s = CHECK_TIMEOUT_S
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop. One
        # connection more than the capacity, so a health check never waits for a slot.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.capacity + 1),
                # No total: ``timeout_s`` bounds each call (aiohttp's default would be 300 s).
                timeout=aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S),
                proxy=proxy_for(self.base_url),
                cookie_jar=aiohttp.DummyCookieJar(),  # nothing to keep; and less CPU per call
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def check(self) -> bool:
        """Whether the upstream answers ``GET /models`` (any answer below 500) within a few
        seconds. A 4xx is logged: the URL or the key may be wrong, but the server is up."""
        try:
            async with self._http().get(
                URL(self.base_url + "/models"),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.check_timeout_s),
            ) as resp:
                await read_body(resp, _ERROR_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError, ResponseTooLargeError) as exc:
            log.info("backend_check_failed", backend=_safe(self.base_url), error=_describe(exc))
            return False
        if resp.status >= 400:
            log.warning("backend_check_refused", backend=_safe(self.base_url), status=resp.status)
        return resp.status < 500

    async def __call__(self, task: WorkerTask, ctx: TaskContext) -> JsonValue:
        """Relay the upstream answer. Raises UpstreamError with the upstream's message, or
        BackendUnavailableError when the upstream cannot be reached."""
        body = dict(task.request)
        if task.model:
            body["model"] = task.model  # the registry's upstream name for this LLM
        body["stream"] = task.streaming
        options = body.get("stream_options")
        client_asked = isinstance(options, dict) and options.get("include_usage") is True
        if task.streaming:
            # The usage of a streamed answer (for inferq's accounting) comes in a last chunk
            # only when asked for; the client gets that chunk only if it asked for it itself.
            extra = options if isinstance(options, dict) else {}
            body["stream_options"] = {**extra, "include_usage": True}
        url = URL(self.base_url + ("/completions" if is_completion(body) else "/chat/completions"))
        answered = False
        try:
            async with (
                asyncio.timeout(self.timeout_s),
                self._http().post(url, data=dumps(body), headers=self._headers) as resp,
            ):
                answered = True
                if resp.status >= 400:
                    detail = await read_body(resp, _ERROR_BODY_BYTES)
                    raise UpstreamError(_upstream_message(resp.status, detail))
                if task.streaming:
                    return await self._relay(resp, task, ctx, client_asked)
                answer: JsonValue = orjson.loads(await read_body(resp, self.max_response_bytes))
                return answer
        except TimeoutError:
            if not answered and not await self.check():
                raise self._unavailable("no answer and no health check", task) from None
            raise UpstreamError(
                f"the upstream server did not answer within {self.timeout_s:g}s"
            ) from None
        except ResponseTooLargeError as exc:
            what = "an event line of its stream" if task.streaming else "its answer"
            raise UpstreamError(
                f"the upstream server sent {what} larger than the limit of {exc.limit} bytes"
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # Refused, reset, or closed before the answer ended: the server went away.
            raise self._unavailable(_describe(exc), task) from None
        except aiohttp.ClientError as exc:
            log.warning("backend_answer_malformed", backend=_safe(self.base_url), error=str(exc))
            raise UpstreamError(
                f"the upstream server sent a malformed answer ({type(exc).__name__})"
            ) from None
        except orjson.JSONDecodeError:
            raise UpstreamError("the upstream server sent invalid JSON") from None

    def _unavailable(self, error: str, task: WorkerTask) -> BackendUnavailableError:
        log.warning(
            "backend_unreachable", backend=_safe(self.base_url), error=error, task_id=str(task.id)
        )
        return BackendUnavailableError("the upstream server is unreachable")

    async def _relay(
        self,
        resp: aiohttp.ClientResponse,
        task: WorkerTask,
        ctx: TaskContext,
        usage_chunk: bool = False,
    ) -> JsonValue:
        assembler = _Assembler(task, is_completion(task.request))
        async with contextlib.aclosing(read_lines(resp, self.max_line_bytes)) as lines:
            async for line in lines:
                if not line.startswith(b"data:"):
                    continue  # SSE comments, event names, blank separators
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = orjson.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    message = _upstream_message(resp.status, data)
                    raise UpstreamError(message.replace("returned HTTP 200", "stream failed"))
                if usage_chunk or not _usage_only(chunk):
                    ctx.emit(chunk)
                assembler.add(chunk)
        return assembler.response()


def _usage_only(chunk: Any) -> bool:
    """The last chunk of a stream asked with ``include_usage``: usage and no choices."""
    return isinstance(chunk, dict) and not chunk.get("choices") and "usage" in chunk


# -- OpenAI object shapes ---------------------------------------------------------------------


class _Shape:
    """Builds chunk and response objects for one task, chat or completion."""

    def __init__(
        self, task: WorkerTask, completion: bool, *, fingerprint: str | None = None
    ) -> None:
        self.completion = completion
        self.fingerprint = fingerprint
        self.id = ("cmpl-" if completion else "chatcmpl-") + task.id.hex
        self.model = task.model or str(task.request.get("model") or "echo")
        self.created = int(time.time())

    def chunk(
        self, text: str, *, role: bool = False, finish_reason: str | None = None
    ) -> dict[str, Any]:
        if self.completion:
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None}
            kind = "text_completion"
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None}
            kind = "chat.completion.chunk"
        choice["finish_reason"] = finish_reason
        return {**self._head(kind), "choices": [choice]}

    def response(
        self,
        text: str,
        *,
        finish_reason: str = "stop",
        prompt_tokens: int = 0,
        usage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        if self.completion:
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None}
            kind = "text_completion"
        else:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None}
            kind = "chat.completion"
        choice["finish_reason"] = finish_reason
        completion_tokens = len(text.split())
        usage = usage or {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return {**self._head(kind), "choices": [choice], "usage": usage}

    def _head(self, kind: str) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        if self.fingerprint is not None:
            head["system_fingerprint"] = self.fingerprint
        return head


class _Assembler:
    """Folds relayed stream chunks into the non-streaming response object."""

    def __init__(self, task: WorkerTask, completion: bool) -> None:
        self.shape = _Shape(task, completion)
        self.parts: list[str] = []
        self.finish_reason = "stop"
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        self.shape.id = str(chunk.get("id") or self.shape.id)
        self.shape.model = str(chunk.get("model") or self.shape.model)
        self.shape.created = int(chunk.get("created") or self.shape.created)
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") if not self.shape.completion else choice
            text = (delta or {}).get("content" if not self.shape.completion else "text")
            if isinstance(text, str):
                self.parts.append(text)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def response(self) -> dict[str, Any]:
        return self.shape.response(
            "".join(self.parts), finish_reason=self.finish_reason, usage=self.usage
        )


# -- request parsing --------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def _last_user_text(request: dict[str, Any]) -> str:
    messages = request.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _prompt_text(request: dict[str, Any]) -> str:
    prompt = request.get("prompt")
    if isinstance(prompt, list):
        return str(prompt[0]) if prompt else ""
    return str(prompt or "")


def _api_base(url: str) -> str:
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def _safe(url: str) -> str:
    """``url`` without a user or password, for the worker's log."""
    return str(URL(url).with_user(None))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _upstream_message(status: int, content: bytes | bytearray) -> str:
    """``upstream returned HTTP 500: <the upstream's own message>``."""
    detail = content.decode(errors="replace").strip()
    try:
        error = orjson.loads(detail).get("error")
        if isinstance(error, dict) and error.get("message"):
            detail = str(error["message"])
        elif isinstance(error, str):
            detail = error
    except (ValueError, AttributeError):
        pass
    return f"upstream returned HTTP {status}: {detail[:2000] or '(empty body)'}"
