"""A drain never cancels work a client can come back for; a retry with the same
Idempotency-Key on another replica reattaches to the same task (issue #13, points 1, 2, 9).

Two replicas share one database. A worker driven by hand through replica B holds the task
mid-generation while replica A drains; the client's retry goes to B.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    auth,
    chat_chunk,
    chat_response,
    make_tokens,
    read_task,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "a long answer"}]}
WORDS = ["one", " two", " three", " four"]


@dataclass
class Two:
    a: Server
    b: Server
    tokens: Tokens

    def client(self, server: Server) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=server.url, headers=auth(self.tokens.alice), timeout=30)


@pytest.fixture
async def two(settings: Settings, dsn: str) -> AsyncIterator[Two]:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as a, serve_app(settings, dsn) as b:
        yield Two(a, b, tokens)


class HandWorker:
    """A worker on replica B whose every step the test takes itself."""

    def __init__(self, two: Two) -> None:
        self.http = httpx.AsyncClient(
            base_url=two.b.url, headers=auth(two.tokens.worker), timeout=30
        )
        self.sid = ""
        self.task: dict[str, Any] = {}

    async def __aenter__(self) -> HandWorker:
        await self.bind()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def bind(self) -> None:
        r = await self.http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 1})
        self.sid = r.json()["session_id"]

    async def claim(self) -> dict[str, Any]:
        r = await self.http.post(f"/v1/worker/sessions/{self.sid}/claim", json={"wait_s": 10})
        [self.task] = r.json()["tasks"]
        return self.task

    def holder(self) -> dict[str, Any]:
        return {"session_id": self.sid, "attempt": self.task["attempt"]}

    async def start(self) -> None:
        r = await self.http.post(f"/v1/worker/tasks/{self.task['id']}/start", json=self.holder())
        assert r.status_code == 200, r.text

    async def chunks(self, first_seq: int, words: list[str]) -> None:
        items = [
            {"seq": first_seq + i, "data": chat_chunk(self.task, w)} for i, w in enumerate(words)
        ]
        r = await self.http.post(
            f"/v1/worker/tasks/{self.task['id']}/chunks", json={**self.holder(), "chunks": items}
        )
        assert r.status_code == 200, r.text

    async def complete(self, text: str) -> None:
        body = {**self.holder(), "response": chat_response(self.task, text)}
        r = await self.http.post(f"/v1/worker/tasks/{self.task['id']}/complete", json=body)
        assert r.status_code == 200, r.text


def task_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM inferq.task").fetchone()
    assert row is not None
    return int(row[0])


def sse_data(body: str) -> list[Any]:
    """The ``data:`` payloads of an OpenAI stream, decoded (``[DONE]`` kept as a string)."""
    out: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def text_of(frames: list[Any]) -> str:
    return "".join(
        f["choices"][0]["delta"].get("content", "")
        for f in frames
        if isinstance(f, dict) and "choices" in f
    )


async def test_a_drain_lets_a_sync_call_finish_within_its_grace(two: Two, dsn: str) -> None:
    async with HandWorker(two) as worker:
        async with two.client(two.a) as http:
            call = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
            await worker.claim()
            assert two.a.replica.services is not None
            two.a.replica.services.drain.start(grace_s=30)
            refused = await http.post("/v1/chat/completions", json=CHAT)
            await worker.complete("finished during the drain")
            answered = await call
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert answered.status_code == 200
        assert answered.json()["choices"][0]["message"]["content"] == "finished during the drain"


async def test_a_keyed_sync_call_cut_by_a_drain_reattaches_on_another_replica(
    two: Two, dsn: str
) -> None:
    async with HandWorker(two) as worker:
        key = {"Idempotency-Key": "order-7"}
        async with two.client(two.a) as on_a, two.client(two.b) as on_b:
            first = asyncio.create_task(on_a.post("/v1/chat/completions", json=CHAT, headers=key))
            task = await worker.claim()
            await worker.start()
            assert two.a.replica.services is not None
            two.a.replica.services.drain.start(grace_s=0.2)  # A's grace ends mid-generation
            cut = await first
            retry = asyncio.create_task(on_b.post("/v1/chat/completions", json=CHAT, headers=key))
            await eventually(
                lambda: two.b.replica.waits is not None and two.b.replica.waits.hub.parked_count > 0
            )
            await worker.complete("one two three four")
            answered = await retry
        assert cut.status_code == 503 and cut.json()["error"]["code"] == "shutting_down"
        assert cut.headers["retry-after"] and cut.headers["x-inferq-task-id"] == task["id"]
        assert answered.status_code == 200
        assert answered.headers["x-inferq-task-id"] == task["id"]
        assert answered.json()["choices"][0]["message"]["content"] == "one two three four"
        stored = read_task(dsn, task["id"])
        assert (stored["status"], stored["attempt"]) == ("completed", 1)
        assert task_count(dsn) == 1  # never a second generation


async def test_a_keyed_stream_cut_by_a_drain_resumes_from_its_first_chunk_elsewhere(
    two: Two, dsn: str
) -> None:
    async with HandWorker(two) as worker:
        key = {"Idempotency-Key": "stream-9"}
        body = {**CHAT, "stream": True}
        async with two.client(two.a) as on_a, two.client(two.b) as on_b:
            async with on_a.stream("POST", "/v1/chat/completions", json=body, headers=key) as cut:
                task = await worker.claim()
                await worker.start()
                await worker.chunks(1, WORDS[:2])
                assert two.a.replica.services is not None
                two.a.replica.services.drain.start(grace_s=0.2)
                first = sse_data((await cut.aread()).decode())
            async with on_b.stream("POST", "/v1/chat/completions", json=body, headers=key) as again:
                await worker.chunks(3, WORDS[2:])
                await worker.complete("".join(WORDS))
                second = sse_data((await again.aread()).decode())
        assert cut.headers["x-inferq-task-id"] == again.headers["x-inferq-task-id"] == task["id"]
        assert first[-1]["error"]["code"] == "shutting_down" and "[DONE]" not in first
        assert text_of(first) == "one two"
        assert second[-1] == "[DONE]"
        assert text_of(second) == "".join(WORDS)  # the whole answer, from the first chunk
        stored = read_task(dsn, task["id"])
        assert (stored["status"], stored["attempt"]) == ("completed", 1)
        assert task_count(dsn) == 1


async def test_an_unkeyed_call_cut_by_a_drain_cancels_its_task_nobody_can_come_back_for(
    two: Two, dsn: str
) -> None:
    async with HandWorker(two) as worker:
        async with two.client(two.a) as http:
            call = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
            task = await worker.claim()
            assert two.a.replica.services is not None
            two.a.replica.services.drain.start(grace_s=0.2)
            cut = await call
        assert cut.status_code == 503 and cut.headers["x-inferq-task-id"] == task["id"]
        assert read_task(dsn, task["id"])["status"] == "cancelled"


async def test_a_client_that_leaves_during_a_drain_does_not_cancel_its_task(
    two: Two, dsn: str
) -> None:
    async with HandWorker(two) as worker:
        services = two.a.replica.services
        assert services is not None
        async with two.client(two.a) as http:
            call = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
            task = await worker.claim()
            services.drain.start(grace_s=30)
            call.cancel()  # the client (or a balancer going away) closes the connection
            await asyncio.gather(call, return_exceptions=True)
            await eventually(lambda: services.metrics.open_waits._value.get() == 0)
        assert read_task(dsn, task["id"])["status"] == "claimed"
