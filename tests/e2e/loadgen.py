"""LoadGenerator: clients that behave as the docs tell users to, recorded to a history file.

Four kinds of logical operation, mixed evenly, all through the load balancer:
``chat`` (sync POST /v1/chat/completions), ``chat_stream`` (the same with ``stream: true``),
``native_wait`` (POST /v1/tasks with an Idempotency-Key, then GET .../wait until terminal) and
``native_stream`` (POST /v1/tasks, then GET .../events, resuming with Last-Event-ID).

Clients retry what the protocol says is retryable: connection errors, 502/503/504 and 429,
with a short backoff. Native submits reuse their Idempotency-Key, so a retry never creates a
second task; OpenAI-style calls have no such key, so their retry is a new task and the one left
behind is cancelled by the daemon when the client vanished, or completes unobserved.

Every HTTP exchange is one JSON line in the history (op, logical id, task id, start, end,
outcome); every logical operation ends with one ``result`` line. The checker reads only this file
and the database.

Operations are numbered in the order clients take them. A fault injector that shares one run
among several faults can hold back the operations past a point (``admit_until``) until its
current fault is done, so a slow fault cannot use up the load meant for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.harness import MODEL
from tests.e2e.responses import chunk_text, response_text, sse_events, writer

KINDS = ("chat", "chat_stream", "native_wait", "native_stream")
RETRYABLE_STATUS = {429, 502, 503, 504}


class Retry(Exception):
    """This HTTP exchange failed in a way the client should retry."""


class GaveUp(Exception):
    """The logical operation ran past its overall deadline."""


def prompt_for(lid: str, words: int) -> str:
    """A prompt that names its logical operation: a response carrying another nonce is a mixup."""
    return f"nonce-{lid} " + " ".join(f"w{i}" for i in range(words))


@dataclass
class Profile:
    """How much load: ``tasks`` logical operations by ``concurrency`` clients."""

    tasks: int = 300
    concurrency: int = 32
    words: int = 40
    wait_timeout_s: float = 4.0  # short long-polls, so deadlines (I3) are exercised often
    op_deadline_s: float = 180.0
    hang_slack_s: float = 15.0  # a request open this long past its own deadline is hung
    kinds: tuple[str, ...] = KINDS


@dataclass
class History:
    """Append-only JSON lines; also kept in memory for the checker."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._file = self.path.open("a", buffering=1)

    def add(self, **record: Any) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        self._file.close()


class LoadGenerator:
    """Runs ``profile.tasks`` logical operations; counters let fault injectors pick moments."""

    def __init__(self, base_url: str, token: str, history: History, profile: Profile) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"}
        self.history = history
        self.profile = profile
        self.done = 0
        # Task ids whose native SSE reader is attached and has received chunks.
        self.streaming_now: set[str] = set()
        self._progress = asyncio.Condition()
        self._ids = itertools.count()
        self._admitted = profile.tasks  # operations numbered from here on wait (admit_until)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.profile.concurrency * 2)
        async with httpx.AsyncClient(base_url=self.base_url, limits=limits) as client:
            self.client = client
            await asyncio.gather(*(self._client_loop() for _ in range(self.profile.concurrency)))

    async def reached(self, fraction: float) -> None:
        """Return once ``fraction`` of the logical operations have ended."""
        target = int(self.profile.tasks * fraction)
        async with self._progress:
            await self._progress.wait_for(lambda: self.done >= target)

    async def admit_until(self, fraction: float) -> None:
        """Let only the first ``fraction`` of the operations start: the others wait until a
        later call admits them (1.0 admits all, as before any call)."""
        async with self._progress:
            self._admitted = int(self.profile.tasks * fraction)
            self._progress.notify_all()

    @property
    def out_of_work(self) -> bool:
        """Whether every operation allowed to start has ended: none runs now, and none will
        until more are admitted (or ever, once the run is over)."""
        return self.done >= min(self._admitted, self.profile.tasks)

    async def _client_loop(self) -> None:
        while (n := next(self._ids)) < self.profile.tasks:
            await self._admission(n)
            await self._one(n)
            async with self._progress:
                self.done += 1
                self._progress.notify_all()

    async def _admission(self, n: int) -> None:
        async with self._progress:
            await self._progress.wait_for(lambda: n < self._admitted)

    async def _one(self, n: int) -> None:
        kinds = self.profile.kinds
        kind = kinds[n % len(kinds)]
        lid = f"{n:06d}-{random.getrandbits(32):08x}"
        prompt = prompt_for(lid, self.profile.words)
        op = Op(self, kind, lid, prompt)
        start = time.time()
        outcome, extra = "ok", {}
        try:
            # The overall deadline also ends waits that keep timing out and streams that only
            # ever send heartbeats: a task that never finishes shows up as gave_up.
            async with asyncio.timeout(self.profile.op_deadline_s + self.profile.hang_slack_s):
                extra = await getattr(op, kind)()
        except TimeoutError:
            outcome, extra = "gave_up", {"error": "the operation never finished"}
        except GaveUp as exc:
            outcome, extra = "gave_up", {"error": str(exc)}
        except Exception as exc:  # recorded, and the checker fails the run on it
            outcome, extra = "failed", {"error": f"{type(exc).__name__}: {exc}"}
        self.history.add(
            op="result",
            kind=kind,
            lid=lid,
            start=start,
            end=time.time(),
            outcome=outcome,
            http_attempts=op.http_attempts,
            task_ids=op.task_ids,
            **extra,
        )


class Op:
    """One logical operation and its retries."""

    def __init__(self, gen: LoadGenerator, kind: str, lid: str, prompt: str) -> None:
        self.gen = gen
        self.kind = kind
        self.lid = lid
        self.prompt = prompt
        self.deadline = time.monotonic() + gen.profile.op_deadline_s
        self.http_attempts = 0
        self.task_ids: list[str] = []  # every task id the server named, in order

    # -- plumbing --------------------------------------------------------------------------

    def record(self, op: str, start: float, outcome: str, **extra: Any) -> None:
        self.gen.history.add(
            op=op, lid=self.lid, start=start, end=time.time(), outcome=outcome, **extra
        )

    def _note_task(self, task_id: str | None) -> None:
        if task_id and task_id not in self.task_ids:
            self.task_ids.append(task_id)

    async def _backoff(self, tries: int) -> None:
        if time.monotonic() > self.deadline:
            raise GaveUp(f"{self.kind} {self.lid} still failing after its deadline")
        await asyncio.sleep(min(0.05 * 2**tries, 1.0) * (0.5 + random.random()))

    def _timeout(self, read_s: float) -> httpx.Timeout:
        return httpx.Timeout(connect=5.0, read=read_s, write=10.0, pool=60.0)

    @contextlib.asynccontextmanager
    async def _exchange(
        self, op: str, method: str, url: str, read_s: float, **kw: Any
    ) -> AsyncIterator[tuple[httpx.Response, dict[str, Any]]]:
        """One HTTP exchange, recorded; raises Retry on retryable failures."""
        self.http_attempts += 1
        start = time.time()
        note: dict[str, Any] = {}
        outcome = "ok"
        try:
            request = self.gen.client.build_request(
                method,
                url,
                headers={**self.gen.headers, **kw.pop("headers", {})},
                timeout=self._timeout(read_s),
                **kw,
            )
            response = await self.gen.client.send(request, stream=True)
            try:
                outcome = f"http_{response.status_code}"
                if response.status_code in RETRYABLE_STATUS:
                    raise Retry(outcome)
                yield response, note
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            outcome = f"hung_{type(exc).__name__}"
            raise Retry(outcome) from exc
        except httpx.TransportError as exc:
            outcome = f"conn_{type(exc).__name__}"
            raise Retry(outcome) from exc
        finally:
            self.record(op, start, note.pop("outcome", outcome), **note)

    # -- native ----------------------------------------------------------------------------

    async def _submit(self, streaming: bool) -> dict[str, Any]:
        body = {
            "model": MODEL,
            "request": {"model": MODEL, "messages": [{"role": "user", "content": self.prompt}]},
            "streaming": streaming,
        }
        tries = 0
        while True:
            try:
                async with self._exchange(
                    "submit",
                    "POST",
                    "/v1/tasks",
                    30.0,
                    json=body,
                    headers={"Idempotency-Key": self.lid},
                ) as (resp, note):
                    await resp.aread()
                    if resp.status_code not in (200, 201):
                        raise RuntimeError(f"submit: {resp.status_code} {resp.text[:300]}")
                    task: dict[str, Any] = resp.json()
                    note["task_id"] = task["id"]
                    self._note_task(task["id"])
                    return task
            except Retry:
                tries += 1
                await self._backoff(tries)

    async def _wait(self, task_id: str) -> dict[str, Any]:
        timeout_s = self.gen.profile.wait_timeout_s
        tries = 0
        while True:
            try:
                async with self._exchange(
                    "wait",
                    "GET",
                    f"/v1/tasks/{task_id}/wait",
                    timeout_s + self.gen.profile.hang_slack_s,
                    params={"timeout": timeout_s},
                ) as (resp, note):
                    await resp.aread()
                    note.update(task_id=task_id, timeout_s=timeout_s)
                    if resp.status_code != 200:
                        raise RuntimeError(f"wait: {resp.status_code} {resp.text[:300]}")
                    task: dict[str, Any] = resp.json()
                    note["status"] = task["status"]
                    note["timed_out"] = resp.headers.get("X-Inferq-Wait") == "timeout"
                    if task["status"] in ("completed", "error", "cancelled"):
                        return task
                    tries = 0
            except Retry:
                tries += 1
                await self._backoff(tries)

    async def native_wait(self) -> dict[str, Any]:
        task = await self._submit(streaming=False)
        final = await self._wait(task["id"])
        return {
            "task_id": final["id"],
            "status": final["status"],
            "attempt": final["attempt"],
            "content": response_text(final.get("response")),
            "writer": writer(final.get("response")),
        }

    async def native_stream(self) -> dict[str, Any]:
        task = await self._submit(streaming=True)
        task_id = task["id"]
        try:
            return await self._follow(task_id)
        finally:
            self.gen.streaming_now.discard(task_id)

    async def _follow(self, task_id: str) -> dict[str, Any]:
        received: list[str] = []  # chunk ids in arrival order, across reconnects
        writers: list[str | None] = []  # who wrote each of them
        texts: dict[int, list[str]] = {}
        resets: list[int] = []
        last: str | None = None
        segments = 0
        tries = 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with self._exchange(
                    "events",
                    "GET",
                    f"/v1/tasks/{task_id}/events",
                    self.gen.profile.hang_slack_s,
                    headers=headers,
                ) as (resp, note):
                    segments += 1
                    note.update(task_id=task_id, resumed_from=last)
                    if resp.status_code != 200:
                        await resp.aread()
                        raise RuntimeError(f"events: {resp.status_code} {resp.text[:300]}")
                    async for event, data, eid in sse_events(resp):
                        if event == "chunk" and eid:
                            received.append(eid)
                            attempt = int(eid.split(":")[0])
                            chunk = json.loads(data)
                            writers.append(writer(chunk))
                            texts.setdefault(attempt, []).append(chunk_text(chunk))
                            last = eid
                            # Mid-stream from here on: a lost worker must now show a reset.
                            self.gen.streaming_now.add(task_id)
                        elif event == "reset":
                            resets.append(int(json.loads(data)["attempt"]))
                        elif event == "done":
                            final = json.loads(data)
                            note["status"] = final["status"]
                            attempt = int(final["attempt"])
                            return {
                                "task_id": task_id,
                                "status": final["status"],
                                "attempt": attempt,
                                "content": response_text(final.get("response")),
                                "writer": writer(final.get("response")),
                                "streamed": "".join(texts.get(attempt, [])),
                                "chunk_ids": received,
                                "chunk_writers": writers,
                                "resets": resets,
                                "segments": segments,
                            }
                    note["outcome"] = "eof_before_done"
                    raise Retry("eof_before_done")
            except Retry:
                tries += 1
                await self._backoff(tries)

    # -- OpenAI-compatible -----------------------------------------------------------------

    def _chat_body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": self.prompt}],
        }
        if stream:
            body["stream"] = True
        return body

    async def chat(self) -> dict[str, Any]:
        tries = 0
        while True:
            try:
                async with self._exchange(
                    "chat",
                    "POST",
                    "/v1/chat/completions",
                    self.gen.profile.op_deadline_s,
                    json=self._chat_body(False),
                ) as (resp, note):
                    task_id = resp.headers.get("X-Inferq-Task-Id")
                    self._note_task(task_id)
                    note["task_id"] = task_id
                    await resp.aread()
                    if resp.status_code != 200:
                        raise RuntimeError(f"chat: {resp.status_code} {resp.text[:300]}")
                    answer = resp.json()
                    return {
                        "task_id": task_id,
                        "status": "completed",
                        "content": response_text(answer),
                        "writer": writer(answer),
                    }
            except Retry:
                tries += 1
                await self._backoff(tries)

    async def chat_stream(self) -> dict[str, Any]:
        tries = 0
        while True:
            try:
                async with self._exchange(
                    "chat_stream",
                    "POST",
                    "/v1/chat/completions",
                    self.gen.profile.hang_slack_s,
                    json=self._chat_body(True),
                ) as (resp, note):
                    task_id = resp.headers.get("X-Inferq-Task-Id")
                    self._note_task(task_id)
                    note["task_id"] = task_id
                    if resp.status_code != 200:
                        await resp.aread()
                        raise RuntimeError(f"chat_stream: {resp.status_code} {resp.text[:300]}")
                    parts: list[str] = []
                    writers: list[str | None] = []  # distinct, in order
                    forbidden: list[str] = []
                    async for line in resp.aiter_lines():
                        if line.startswith(("id:", "retry:")):
                            forbidden.append(line)
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            return {
                                "task_id": task_id,
                                "status": "completed",
                                "content": "".join(parts),
                                "writers": writers,
                                "forbidden_lines": forbidden,
                            }
                        data = json.loads(payload)
                        if "error" in data:
                            # worker_lost / task_failed: the stream ended; ask again.
                            note["outcome"] = f"stream_error_{data['error'].get('code')}"
                            raise Retry(note["outcome"])
                        parts.append(chunk_text(data))
                        if writer(data) not in writers:
                            writers.append(writer(data))
                    note["outcome"] = "eof_before_done"
                    raise Retry("eof_before_done")
            except Retry:
                tries += 1
                await self._backoff(tries)
