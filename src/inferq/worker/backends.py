"""Backends: handlers that turn a task's OpenAI request into chunks and a response.

- EchoBackend streams the last user message (or the prompt) back word by word; for demos/tests.
- OpenAIBackend forwards the request to an upstream OpenAI-compatible server (vLLM, llama.cpp
  server, Ollama ...) and relays its stream chunk by chunk as it arrives.

A request with ``prompt`` and no ``messages`` is a completions request (``text_completion``
objects); anything else is a chat request (``chat.completion.chunk`` objects).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from inferq.wire import JsonValue, WorkerTask
from inferq.worker.runner import TaskContext


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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = _api_base(base_url)
        self.timeout_s = timeout_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=capacity, max_keepalive_connections=capacity),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __call__(self, task: WorkerTask, ctx: TaskContext) -> JsonValue:
        """Relay the upstream answer; raises UpstreamError with the upstream's message."""
        body = dict(task.request)
        if task.model:
            body["model"] = task.model  # the registry's upstream name for this LLM
        body["stream"] = task.streaming
        path = "/completions" if is_completion(body) else "/chat/completions"
        try:
            async with asyncio.timeout(self.timeout_s):
                if task.streaming:
                    return await self._stream(path, body, task, ctx)
                resp = await self._http.post(path, json=body)
                if resp.status_code >= 400:
                    raise UpstreamError(_upstream_message(resp.status_code, resp.content))
                return resp.json()
        except TimeoutError:
            raise UpstreamError(
                f"the upstream server {self.base_url} did not answer within {self.timeout_s:g}s"
            ) from None
        except httpx.TimeoutException:
            raise UpstreamError(
                f"the upstream server {self.base_url} did not answer within {self.timeout_s:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise UpstreamError(
                f"the upstream server {self.base_url} failed: {type(exc).__name__}: {exc}"
            ) from None
        except json.JSONDecodeError:
            raise UpstreamError(f"the upstream server {self.base_url} sent invalid JSON") from None

    async def _stream(
        self, path: str, body: dict[str, Any], task: WorkerTask, ctx: TaskContext
    ) -> JsonValue:
        assembler = _Assembler(task, is_completion(body))
        async with self._http.stream("POST", path, json=body) as resp:
            if resp.status_code >= 400:
                raise UpstreamError(_upstream_message(resp.status_code, await resp.aread()))
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue  # SSE comments, event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if isinstance(chunk, dict) and "error" in chunk:
                    message = _upstream_message(resp.status_code, data.encode())
                    raise UpstreamError(message.replace("returned HTTP 200", "stream failed"))
                ctx.emit(chunk)
                assembler.add(chunk)
        return assembler.response()


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


def _upstream_message(status: int, content: bytes) -> str:
    """``upstream returned HTTP 500: <the upstream's own message>``."""
    detail = content.decode(errors="replace").strip()
    try:
        error = json.loads(detail).get("error")
        if isinstance(error, dict) and error.get("message"):
            detail = str(error["message"])
        elif isinstance(error, str):
            detail = error
    except (ValueError, AttributeError):
        pass
    return f"upstream returned HTTP {status}: {detail[:2000] or '(empty body)'}"
