"""WorkerClient: a thin async HTTP client for the worker routes of docs/protocol.md.

Error answers become the exceptions of ``inferq.worker.errors``. Replicas sit behind a load
balancer, so a request that meets a connection error or a 502/503/504 (a replica that died or is
draining) is sent again after a jittered exponential backoff, which lands it on the next replica;
the session lives in the database, so it survives. Every worker write is safe to repeat: chunks
are keyed by (attempt, seq), complete/fail are idempotent with the same payload, and a repeated
start is recognised below.

Design notes:
- Requests go through aiohttp, chosen by measurement (process CPU per small JSON call to a
  local uvicorn, 2 cores, uvloop, 1 and 4 calls in flight): aiohttp 95-130 us, httpx's
  default transport (httpcore over anyio) 600-650 us, the hand-written HTTP/1.1 transport
  this replaced 150-175 us under httpx's client. Through WorkerClient: ~110-160 us a call,
  ~150-185 us before. A worker makes a few calls per task, so it matters. HTTP/1.1 only
  (aiohttp has no HTTP/2, which the worker's small calls on kept-alive connections do not
  need); TLS verifies with the system's certificates (SSL_CERT_FILE / SSL_CERT_DIR apply).
- Every answer is read through ``responses.read_body`` with a size cap (``max_response_bytes``):
  a bind or claim carries whole task requests, so the default leaves room for a claim of 15
  tasks of the largest body the daemon accepts (INFERQ_MAX_BODY_BYTES, 1 MiB); `inferq
  worker` sizes it from its capacity. A larger answer is refused and not retried.
- Proxies from the environment (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY) are honoured,
  as httpx did, but looked up once per client (``proxy_for``): aiohttp's ``trust_env`` looks
  them up, and reads ~/.netrc, on a thread for every request, which tripled the CPU per call.
- ``deadline`` (event-loop time), set by the runner when it shuts down, bounds every call and
  its retries, so a worker whose daemon is unreachable still stops within its drain limit.
"""

from __future__ import annotations

import asyncio
import random
import urllib.request
from collections.abc import Sequence
from typing import Any
from uuid import UUID

import aiohttp
import orjson
import structlog
from yarl import URL

from inferq.jsontext import dumps
from inferq.wire import (
    BindRequest,
    BindResponse,
    ChunkItem,
    ChunksRequest,
    ChunksResponse,
    ClaimRequest,
    ClaimResponse,
    CompleteRequest,
    FailRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    Holder,
    JsonValue,
    TaskOut,
    UnbindResponse,
    WorkerTask,
)
from inferq.worker.errors import LeaseLostError, UnavailableError, WorkerApiError, error_for
from inferq.worker.responses import ResponseTooLargeError, read_body

log = structlog.get_logger("inferq.worker")

RETRY_STATUSES = frozenset({429, 502, 503, 504})

# One long-poll claim, a few outcome calls, a heartbeat, and one chunk post per streaming
# task at a time: sixteen connections are plenty; more requests queue for a free one.
MAX_CONNECTIONS = 16
DEFAULT_MAX_RESPONSE_BYTES = 16 << 20


class WorkerClient:
    """Calls the worker API of an inferq daemon with a worker token. Owns one aiohttp session."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        retry_budget_s: float = 120.0,
        backoff_max_s: float = 5.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retry_budget_s = retry_budget_s
        self.backoff_max_s = backoff_max_s
        self.max_response_bytes = max_response_bytes
        self.deadline: float | None = None
        self._auth = {"Authorization": f"Bearer {token}", "User-Agent": "inferq-worker"}
        self._json_headers = {**self._auth, "Content-Type": "application/json"}
        self._timeout = self._client_timeout(timeout_s)
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._auth,
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
                proxy=proxy_for(self.base_url),
                cookie_jar=aiohttp.DummyCookieJar(),  # nothing to keep; and less CPU per call
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> WorkerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- sessions -----------------------------------------------------------------------------

    async def bind(
        self, pools: Sequence[str], capacity: int, name: str | None = None
    ) -> BindResponse:
        """Open a session for ``pools``; the answer carries pending work claimed at once."""
        body = BindRequest(pools=list(pools), capacity=capacity, name=name)
        return BindResponse.model_validate(await self._call("POST", "/v1/worker/sessions", body))

    async def claim(self, session_id: UUID, max_tasks: int, wait_s: float) -> list[WorkerTask]:
        """Long-poll for up to ``max_tasks`` tasks; an empty list at the deadline."""
        body = ClaimRequest(max_tasks=max_tasks, wait_s=wait_s)
        answer = await self._call(
            "POST",
            f"/v1/worker/sessions/{session_id}/claim",
            body,
            timeout_s=wait_s + self.timeout_s,
        )
        return ClaimResponse.model_validate(answer).tasks

    async def heartbeat(self, session_id: UUID, tasks: Sequence[UUID]) -> HeartbeatResponse:
        """Extend the session and the leases of ``tasks``; learn which were cancelled or lost.
        Raises SessionNotFoundError when the session is gone (bind again)."""
        body = HeartbeatRequest(tasks=list(tasks))
        path = f"/v1/worker/sessions/{session_id}/heartbeat"
        return HeartbeatResponse.model_validate(await self._call("POST", path, body))

    async def unbind(self, session_id: UUID) -> int:
        """Close the session; the daemon sends what it still held back to pending."""
        answer = await self._call("DELETE", f"/v1/worker/sessions/{session_id}")
        return UnbindResponse.model_validate(answer).released

    # -- tasks --------------------------------------------------------------------------------

    async def start(self, task: WorkerTask, session_id: UUID) -> None:
        """Mark the task running (claimed -> running). Raises LeaseLostError."""
        body = Holder(session_id=session_id, attempt=task.attempt)
        try:
            await self._call("POST", f"/v1/worker/tasks/{task.id}/start", body)
        except LeaseLostError as exc:
            # A start repeated after a lost answer finds the task already running at our
            # attempt; attempts only grow on revert, so nobody else can have started it.
            current = exc.task or {}
            if current.get("status") != "running" or current.get("attempt") != task.attempt:
                raise

    async def post_chunks(
        self, task: WorkerTask, session_id: UUID, chunks: Sequence[tuple[int, JsonValue]]
    ) -> int:
        """Append ``(seq, data)`` chunks of this attempt; returns the last stored seq."""
        body = ChunksRequest(
            session_id=session_id,
            attempt=task.attempt,
            chunks=[ChunkItem(seq=seq, data=data) for seq, data in chunks],
        )
        answer = await self._call("POST", f"/v1/worker/tasks/{task.id}/chunks", body)
        return ChunksResponse.model_validate(answer).last_seq

    async def complete(self, task: WorkerTask, session_id: UUID, response: JsonValue) -> TaskOut:
        """Store the final response; the task becomes completed."""
        body = CompleteRequest(session_id=session_id, attempt=task.attempt, response=response)
        answer = await self._call("POST", f"/v1/worker/tasks/{task.id}/complete", body)
        return TaskOut.model_validate(answer)

    async def fail(self, task: WorkerTask, session_id: UUID, message: str) -> TaskOut:
        """End the task in error with ``message`` (shown to its client)."""
        body = FailRequest(session_id=session_id, attempt=task.attempt, message=message)
        answer = await self._call("POST", f"/v1/worker/tasks/{task.id}/fail", body)
        return TaskOut.model_validate(answer)

    async def outcomes(
        self, session_id: UUID, items: Sequence[dict[str, Any] | bytes], claim: int = 0
    ) -> tuple[list[dict[str, Any]], list[WorkerTask]]:
        """End many held tasks in one call; optionally claim up to ``claim`` more at once.

        ``items`` are ``{"task_id", "attempt", "response"}`` (complete) or ``{"task_id",
        "attempt", "error"}`` (fail), as dicts or already encoded (:func:`encode_outcome`).
        Returns one result per item, in order, each with the ``status_code`` its single route
        would have answered (``error`` set when >= 400), and the tasks claimed. Raises for the
        call as a whole (session gone, refused body). Most workers let
        :class:`inferq.worker.OutcomeBatcher` make this call.
        """
        encoded = b'{"outcomes":[' + b",".join(
            i if isinstance(i, bytes) else dumps(i) for i in items
        )
        answer = await self._call(
            "POST",
            f"/v1/worker/sessions/{session_id}/outcomes",
            content=encoded + b'],"claim":%d}' % claim,
            # A retry may follow a call the daemon did carry out: the outcomes are idempotent,
            # a claim is not (its tasks would be held by the session and never run).
            retry_content=encoded + b'],"claim":0}' if claim else None,
        )
        tasks = [WorkerTask.model_validate(t) for t in answer.get("tasks", ())]
        return answer["results"], tasks

    async def release(self, task: WorkerTask, session_id: UUID) -> TaskOut:
        """Give the task back: it returns to pending for another worker."""
        body = Holder(session_id=session_id, attempt=task.attempt)
        answer = await self._call("POST", f"/v1/worker/tasks/{task.id}/release", body)
        return TaskOut.model_validate(answer)

    # -- transport ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content: bytes | None = None,
        retry_content: bytes | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Send one request, retrying transient failures; the decoded JSON of a 2xx answer.

        The body is a wire model, or ``content`` already encoded (``retry_content`` instead
        for the retries, when set). Raises UnavailableError once the retry budget or the
        shutdown ``deadline`` is spent."""
        # orjson rather than a JSON library's default (stdlib json) both ways: cheaper.
        if body is not None:
            content = body.__pydantic_serializer__.to_json(body)
        if self.deadline is None:
            return await self._send(method, path, content, retry_content, timeout_s)
        try:
            async with asyncio.timeout_at(self.deadline):
                return await self._send(method, path, content, retry_content, timeout_s)
        except TimeoutError:
            raise UnavailableError(
                f"gave up on {method} {path}: the worker's shutdown deadline passed", status=0
            ) from None

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        retry_content: bytes | None,
        timeout_s: float | None,
    ) -> Any:
        headers = self._json_headers if content is not None else None
        timeout = self._timeout if timeout_s is None else self._client_timeout(timeout_s)
        url = self._url(path)
        http = self._http()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_budget_s
        for attempt in range(1, 1_000_000):
            retry_after: float | None = None
            try:
                async with http.request(
                    method, url, data=content, headers=headers, timeout=timeout
                ) as resp:
                    status = resp.status
                    answer = await read_body(resp, self.max_response_bytes)
                    if status in RETRY_STATUSES:
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
            except ResponseTooLargeError as exc:
                raise WorkerApiError(
                    f"inferq's answer to {method} {path} is larger than the limit of "
                    f"{exc.limit} bytes (INFERQ_WORKER_MAX_RESPONSE_BYTES)",
                    status=status,
                ) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                if status < 400:
                    return orjson.loads(answer)
                if status not in RETRY_STATUSES:
                    raise error_for(status, _decode(answer))
                problem = f"HTTP {status}"
            if retry_content is not None:
                content = retry_content
            delay = retry_after or random.uniform(0, min(self.backoff_max_s, 0.1 * 2**attempt))
            if loop.time() + delay > deadline:
                raise UnavailableError(
                    f"inferq at {self.base_url} unavailable for {self.retry_budget_s:g}s "
                    f"({method} {path}: {problem})",
                    status=0,
                )
            log.warning("request_retried", method=method, path=path, problem=problem, delay_s=delay)
            await asyncio.sleep(delay)
        raise WorkerApiError("unreachable")  # pragma: no cover - the loop above always exits

    def _client_timeout(self, total_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total_s, connect=min(total_s, 10.0))

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) > 1000:  # paths with task ids: keep the cache small
                self._urls.clear()
            url = self._urls[path] = URL(self.base_url + path)
        return url


def proxy_for(url: str) -> str | None:
    """The proxy the environment configures for ``url`` (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY,
    minus NO_PROXY), or None."""
    parts = URL(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy is None or urllib.request.proxy_bypass(parts.host or ""):
        return None
    return proxy


def encode_outcome(task: WorkerTask, response: JsonValue = None, error: str | None = None) -> bytes:
    """One item of :meth:`WorkerClient.outcomes` as JSON: ``error`` fails the task, else
    ``response`` completes it."""
    if error is not None:
        return dumps({"task_id": task.id, "attempt": task.attempt, "error": error})
    return dumps({"task_id": task.id, "attempt": task.attempt, "response": response})


def _decode(answer: bytes | bytearray) -> Any:
    try:
        return orjson.loads(answer)
    except ValueError:
        return answer.decode(errors="replace")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value or ""), 30.0)
    except ValueError:
        return None
