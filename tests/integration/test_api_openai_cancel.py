"""How an OpenAI call that ends early leaves its task (docs/protocol.md): past INFERQ_MAX_WAIT_S
(504, cancelled), a client that goes away (cancelled, unless INFERQ_CANCEL_ON_DISCONNECT=false),
a task cancelled under a sync call (409 task_cancelled), a worker lost mid-stream
(``worker_lost``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import psycopg
import pytest
from openai.types.chat import ChatCompletionMessageParam

from inferq.bench.polling import eventually
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    auth,
    chat_chunk,
    make_tokens,
    read_events,
    read_task,
    serve_app,
)

pytestmark = pytest.mark.db

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = {"messages": MESSAGES}


@contextlib.asynccontextmanager
async def replica(settings: Settings, dsn: str, **changes: Any) -> AsyncIterator[App]:
    changed = settings.model_copy(update={"sse_heartbeat_s": 0.2, **changes})
    tokens = await make_tokens(changed, dsn)
    async with serve_app(changed, dsn) as server:
        yield App(server, tokens)


class App:
    """A served replica, its tokens, and the in-process state the tests synchronise on."""

    def __init__(self, server: Server, tokens: Tokens) -> None:
        self.server, self.tokens = server, tokens
        assert server.replica.services is not None and server.replica.waits is not None
        self.services, self.hub = server.replica.services, server.replica.waits.hub

    def openai(self) -> openai.AsyncOpenAI:
        url = self.server.url + "/v1"
        return openai.AsyncOpenAI(base_url=url, api_key=self.tokens.alice, max_retries=0)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.server.url, headers=auth(self.tokens.alice))

    def open_waits(self) -> float:
        """Sync calls and streams this replica is still serving."""
        return float(self.services.metrics.open_waits._value.get())


def only_task_id(dsn: str) -> Any:
    with psycopg.connect(dsn) as conn:
        [(task_id,)] = conn.execute("SELECT id FROM inferq.task").fetchall()
    return task_id


async def bind_idle(r: App) -> str:
    """A live worker session of the pool that claims nothing unless asked (a busy worker):
    calls wait for it instead of failing fast for want of a worker. Its session id."""
    async with r.http() as http:
        bound = await http.post(
            "/v1/worker/sessions", json={"pools": [POOL]}, headers=auth(r.tokens.worker)
        )
    assert bound.status_code == 201, bound.text
    return str(bound.json()["session_id"])


async def test_a_sync_call_past_max_wait_is_504_and_its_task_is_cancelled(
    settings: Settings, dsn: str
) -> None:
    async with replica(settings, dsn, max_wait_s=0.3) as r, r.openai() as client:
        # A busy worker serves the pool: the call waits out INFERQ_MAX_WAIT_S.
        await bind_idle(r)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
    error = caught.value
    assert type(error) is openai.InternalServerError
    assert (error.status_code, error.code) == (504, "wait_timeout")
    task = read_task(dsn, only_task_id(dsn))
    assert task["status"] == "cancelled"
    assert task["completed_at"] is not None


@pytest.mark.parametrize("cancel_on_disconnect", [True, False])
async def test_a_client_that_leaves_a_sync_call(
    settings: Settings, dsn: str, cancel_on_disconnect: bool
) -> None:
    async with replica(settings, dsn, cancel_on_disconnect=cancel_on_disconnect) as r:
        await bind_idle(r)  # else the no-worker fail-fast could cancel the task instead
        async with r.http() as http:
            body = {"model": MODEL, **CHAT}
            call = asyncio.create_task(http.post("/v1/chat/completions", json=body, timeout=60))
            await eventually(lambda: r.hub.parked_count == 1)  # it waits for its answer
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await call
        # The connection is closed: once the replica is done with the call, the task is...
        await eventually(lambda: r.open_waits() == 0)
    task = read_task(dsn, only_task_id(dsn))
    if cancel_on_disconnect:
        assert task["status"] == "cancelled"
        assert task["error_message"] == "the client went away before the answer"
    else:
        assert (task["status"], task["completed_at"]) == ("pending", None)


@pytest.mark.parametrize("cancel_on_disconnect", [True, False])
async def test_a_client_that_leaves_a_stream(
    settings: Settings, dsn: str, cancel_on_disconnect: bool
) -> None:
    async with replica(settings, dsn, cancel_on_disconnect=cancel_on_disconnect) as r:
        await bind_idle(r)
        async with (
            r.http() as http,
            http.stream(
                "POST", "/v1/chat/completions", json={"model": MODEL, "stream": True, **CHAT}
            ) as stream,
        ):
            assert stream.status_code == 200
            task_id = stream.headers["x-inferq-task-id"]
            await anext(stream.aiter_lines())  # the stream is live (a heartbeat)
        # Leaving the block closed the connection mid-stream.
        await eventually(lambda: r.open_waits() == 0)
    task = read_task(dsn, task_id)
    if cancel_on_disconnect:
        assert task["status"] == "cancelled"
    else:
        assert (task["status"], task["completed_at"]) == ("pending", None)


async def test_a_sync_call_whose_task_is_cancelled_is_409_task_cancelled(
    settings: Settings, dsn: str
) -> None:
    async with replica(settings, dsn) as r, r.openai() as client, r.http() as http:
        call = asyncio.create_task(
            client.chat.completions.create(model=MODEL, messages=CHAT["messages"])
        )
        await eventually(lambda: r.hub.parked_count == 1)
        cancelled = await http.post(f"/v1/tasks/{only_task_id(dsn)}/cancel")
        assert cancelled.status_code == 200
        with pytest.raises(openai.APIStatusError) as caught:
            await call
    error = caught.value
    assert type(error) is openai.ConflictError
    assert (error.status_code, error.type, error.code) == (409, "conflict_error", "task_cancelled")


async def test_a_stream_whose_worker_is_lost_after_chunks_ends_with_worker_lost(
    settings: Settings, dsn: str
) -> None:
    chat = {"model": MODEL, "stream": True, **CHAT}
    async with replica(settings, dsn) as r:
        sid = await bind_idle(r)
        worker = auth(r.tokens.worker)
        async with (
            r.http() as http,
            http.stream("POST", "/v1/chat/completions", json=chat) as stream,
        ):
            task_id = stream.headers["x-inferq-task-id"]
            lines = stream.aiter_lines()
            claimed = await http.post(
                f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 0}, headers=worker
            )
            [task] = claimed.json()["tasks"]
            holder = {"session_id": sid, "attempt": task["attempt"]}
            chunk = chat_chunk(task, "half an answer")
            for path, body in [
                ("start", holder),
                ("chunks", {**holder, "chunks": [{"seq": 1, "data": chunk}]}),
            ]:
                url = f"/v1/worker/tasks/{task_id}/{path}"
                answer = await http.post(url, json=body, headers=worker)
                assert answer.status_code == 200, answer.text
            relayed = await read_events(lines, until=lambda frame: True)
            assert relayed == [{"data": chunk}]
            # The worker goes away: its task returns to pending and will run again from scratch.
            gone = await http.delete(f"/v1/worker/sessions/{sid}", headers=worker)
            assert gone.json() == {"released": 1}
            rest = await read_events(lines)  # the stream ends
    assert len(rest) == 1, rest
    assert rest[0]["data"]["error"]["type"] == "server_error"
    assert rest[0]["data"]["error"]["code"] == "worker_lost"
    # Nobody can read the rest of that answer (no Idempotency-Key): the task was abandoned.
    assert read_task(dsn, task_id)["status"] == "cancelled"
