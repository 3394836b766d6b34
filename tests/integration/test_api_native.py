"""The native client API over HTTP: submit, wait, idempotency, events with resume, list, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    EchoWorker,
    Server,
    Tokens,
    auth,
    make_tokens,
    read_events,
    read_task,
    running_worker,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi there"}]}


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"sse_heartbeat_s": 0.2, "safety_poll_s": 1.0})


@pytest.fixture
async def app(fast: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    tokens = await make_tokens(fast, dsn)
    async with serve_app(fast, dsn) as server:
        yield server, tokens


async def test_submit_wait_result(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with (
        running_worker(EchoWorker(server.url, tokens.worker)),
        httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http,
    ):
        r = await http.post("/v1/tasks", json={"model": MODEL, "request": CHAT, "agent_id": "a1"})
        assert r.status_code == 201, r.text
        task = r.json()
        assert (task["status"], task["pool"], task["llm"], task["model"]) == (
            "pending",
            POOL,
            MODEL,
            "echo/1",
        )
        r = await http.get(f"/v1/tasks/{task['id']}/wait", params={"timeout": 10}, timeout=20)
    assert r.status_code == 200
    done = r.json()
    assert done["status"] == "completed"
    assert done["response"]["choices"][0]["message"]["content"] == "echo: hi there"
    assert "x-inferq-wait" not in r.headers


async def test_wait_timeout_answers_current_state(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http:
        r = await http.post("/v1/tasks", json={"pool": "nobody-serves-this", "request": CHAT})
        r = await http.get(f"/v1/tasks/{r.json()['id']}/wait", params={"timeout": 0.2})
    assert r.status_code == 200
    assert r.json()["status"] == "pending"
    assert r.headers["x-inferq-wait"] == "timeout"


async def test_idempotent_submit(app: tuple[Server, Tokens], dsn: str) -> None:
    server, tokens = app
    body = {"model": MODEL, "request": CHAT}
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http:
        first = await http.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k-1"})
        again = await http.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k-1"})
        other = await http.post(
            "/v1/tasks",
            json={**body, "request": {"messages": []}},
            headers={"Idempotency-Key": "k-1"},
        )
        # Keys are per owner: bob's "k-1" is another task.
        bobs = await http.post(
            "/v1/tasks", json=body, headers={"Idempotency-Key": "k-1", **auth(tokens.bob)}
        )
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert bobs.status_code == 201 and bobs.json()["id"] != first.json()["id"]


async def test_list_filters_and_cursor(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http:
        ids = []
        for i in range(5):
            r = await http.post(
                "/v1/tasks", json={"pool": POOL, "request": CHAT, "agent_id": f"a{i % 2}"}
            )
            ids.append(r.json()["id"])
        await http.post(f"/v1/tasks/{ids[0]}/cancel")
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/v1/tasks", params=params)).json()
            seen += [t["id"] for t in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        pending = (await http.get("/v1/tasks", params={"status": "pending"})).json()["data"]
        agent = (await http.get("/v1/tasks", params={"agent_id": "a1"})).json()["data"]
        bobs = (await http.get("/v1/tasks", headers=auth(tokens.bob))).json()["data"]
    assert seen == list(reversed(ids))
    assert {t["id"] for t in pending} == set(ids[1:])
    assert {t["id"] for t in agent} == {ids[1], ids[3]}
    assert bobs == []


async def test_cancel_is_idempotent_and_refused_after_completion(
    app: tuple[Server, Tokens],
) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http:
        tid = (await http.post("/v1/tasks", json={"model": MODEL, "request": CHAT})).json()["id"]
        first = await http.post(f"/v1/tasks/{tid}/cancel")
        again = await http.post(f"/v1/tasks/{tid}/cancel")
        assert first.status_code == again.status_code == 200
        assert again.json()["status"] == "cancelled"
        async with running_worker(EchoWorker(server.url, tokens.worker)):
            done = await http.post("/v1/tasks", json={"model": MODEL, "request": CHAT})
            r = await http.get(f"/v1/tasks/{done.json()['id']}/wait", params={"timeout": 10})
            assert r.json()["status"] == "completed"
        late = await http.post(f"/v1/tasks/{done.json()['id']}/cancel")
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "invalid_transition"
    assert late.json()["error"]["task"]["status"] == "completed"


async def test_events_resume_on_another_replica(
    app: tuple[Server, Tokens], fast: Settings, dsn: str
) -> None:
    server, tokens = app
    async with (
        serve_app(fast, dsn) as second,
        httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as worker,
        httpx.AsyncClient(headers=auth(tokens.alice), timeout=20) as client,
    ):
        r = await client.post(
            server.url + "/v1/tasks", json={"model": MODEL, "request": CHAT, "streaming": True}
        )
        tid = r.json()["id"]
        bound = (await worker.post("/v1/worker/sessions", json={"pools": [POOL]})).json()
        [task] = bound["tasks"]
        holder = {"session_id": bound["session_id"], "attempt": task["attempt"]}
        assert (await worker.post(f"/v1/worker/tasks/{tid}/start", json=holder)).status_code == 200

        async def post(seq: int) -> None:
            r = await worker.post(
                f"/v1/worker/tasks/{tid}/chunks",
                json={**holder, "chunks": [{"seq": seq, "data": {"n": seq}}]},
            )
            assert r.status_code == 200, r.text

        for seq in (1, 2, 3):
            await post(seq)
        async with client.stream("GET", f"{server.url}/v1/tasks/{tid}/events") as stream:
            assert stream.status_code == 200
            first = await read_events(stream.aiter_lines(), until=lambda f: f.get("id") == "1:2")
        assert [f["event"] for f in first] == ["status", "chunk", "chunk"]
        assert [f["data"] for f in first[1:]] == [{"n": 1}, {"n": 2}]

        for seq in (4, 5):
            await post(seq)
        r = await worker.post(
            f"/v1/worker/tasks/{tid}/complete", json={**holder, "response": {"text": "done"}}
        )
        assert r.status_code == 200
        async with client.stream(
            "GET", f"{second.url}/v1/tasks/{tid}/events", headers={"Last-Event-ID": "1:2"}
        ) as stream:
            rest = await read_events(stream.aiter_lines())
    chunks = [f for f in rest if f["event"] == "chunk"]
    assert [c["id"] for c in chunks] == ["1:3", "1:4", "1:5"]
    assert [c["data"] for c in chunks] == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert rest[-1]["event"] == "done"
    assert rest[-1]["data"]["status"] == "completed"
    assert rest[-1]["data"]["response"] == {"text": "done"}


async def test_a_stream_cut_by_a_drain_ends_with_an_error_event_and_leaves_the_task(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    svc = server.replica.services
    assert svc is not None
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http:
        submitted = await http.post(
            "/v1/tasks", json={"model": MODEL, "request": CHAT, "streaming": True}
        )
        tid = submitted.json()["id"]
        async with http.stream("GET", f"/v1/tasks/{tid}/events", timeout=20) as stream:
            lines = stream.aiter_lines()
            first = await read_events(lines, until=lambda frame: True)
            svc.drain.start(grace_s=0)
            rest = await read_events(lines)
    assert first == [{"event": "status", "data": {"id": tid, "status": "pending", "attempt": 0}}]
    assert [f["event"] for f in rest] == ["error"]
    error = rest[0]["data"]["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down")
    assert "Last-Event-ID" in error["message"]
    # A drain never cancels work: the task waits for a worker, and its client reconnects.
    assert read_task(dsn, tid)["status"] == "pending"
