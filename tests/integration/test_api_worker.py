"""The worker API over HTTP: bind drains pending work, claim long-poll, heartbeat, unbind,
guarded writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.settings import Settings
from tests.api_helpers import (
    POOL,
    Server,
    Tokens,
    auth,
    make_tokens,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server:
        yield server, tokens


async def submit(http: httpx.AsyncClient, tokens: Tokens, n: int = 1) -> list[str]:
    ids = []
    for _ in range(n):
        r = await http.post(
            "/v1/tasks", json={"pool": POOL, "request": CHAT}, headers=auth(tokens.alice)
        )
        assert r.status_code == 201
        ids.append(r.json()["id"])
    return ids


async def test_bind_drains_pending_up_to_capacity(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        ids = await submit(http, tokens, 3)
        r = await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 2})
        assert r.status_code == 201
        bound = r.json()
        assert [t["id"] for t in bound["tasks"]] == ids[:2]  # FIFO
        assert all(t["attempt"] == 1 and t["request"] == CHAT for t in bound["tasks"])
        assert bound["lease_s"] > 0 and bound["heartbeat_s"] > 0
        left = await http.get(f"/v1/tasks/{ids[2]}", headers=auth(tokens.alice))
        assert left.json()["status"] == "pending"


async def test_claim_long_poll_is_woken_by_a_submit(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(
        base_url=server.url, headers=auth(tokens.worker), timeout=60
    ) as http:
        sid = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()["session_id"]
        claim = asyncio.create_task(
            http.post(f"/v1/worker/sessions/{sid}/claim", json={"max_tasks": 4, "wait_s": 30})
        )
        [tid] = await submit(http, tokens)
        r = await claim
    assert r.status_code == 200
    assert [t["id"] for t in r.json()["tasks"]] == [tid]


async def test_claim_answers_empty_at_the_deadline(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        sid = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()["session_id"]
        r = await http.post(f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 0.1})
    assert r.status_code == 200
    assert r.json() == {"tasks": []}


async def test_heartbeat_unbind_and_guarded_writes(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        cancelled, kept = await submit(http, tokens, 2)
        bound = (
            await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 2})
        ).json()
        sid = bound["session_id"]
        await http.post(f"/v1/tasks/{cancelled}/cancel", headers=auth(tokens.alice))
        r = await http.post(
            f"/v1/worker/sessions/{sid}/heartbeat", json={"tasks": [cancelled, kept]}
        )
        assert r.status_code == 200
        assert r.json()["cancelled"] == [cancelled]
        holder = {"session_id": sid, "attempt": 1}
        # A write for the cancelled task is refused with its current state.
        r = await http.post(
            f"/v1/worker/tasks/{cancelled}/complete", json={**holder, "response": {}}
        )
        assert r.status_code == 409
        assert r.json()["error"]["task"]["status"] == "cancelled"
        # A stale attempt is lease_lost.
        r = await http.post(f"/v1/worker/tasks/{kept}/start", json={**holder, "attempt": 7})
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "lease_lost"
        # Unbinding gives the held task back.
        r = await http.delete(f"/v1/worker/sessions/{sid}")
        assert r.json() == {"released": 1}
        task = (await http.get(f"/v1/tasks/{kept}", headers=auth(tokens.alice))).json()
        assert task["status"] == "pending"
        r = await http.post(f"/v1/worker/sessions/{sid}/heartbeat", json={"tasks": []})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "session_not_found"


async def test_complete_is_idempotent(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        [tid] = await submit(http, tokens)
        sid = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()["session_id"]
        body = {"session_id": sid, "attempt": 1, "response": {"ok": True}}
        first = await http.post(f"/v1/worker/tasks/{tid}/complete", json=body)
        again = await http.post(f"/v1/worker/tasks/{tid}/complete", json=body)
        other = await http.post(f"/v1/worker/tasks/{tid}/complete", json={**body, "response": {}})
    assert first.status_code == again.status_code == 200
    assert again.json()["response"] == {"ok": True}
    assert other.status_code == 409


async def test_a_task_of_a_pool_the_token_may_not_serve_is_not_found(
    app: tuple[Server, Tokens],
) -> None:
    """A refused write never shows a task of another pool: 404 as for a missing id, not the
    409 with the current task that the task's own worker gets."""
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        [tid] = await submit(http, tokens)
        holder = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()
        assert [t["id"] for t in holder["tasks"]] == [tid]
        http.headers.update(auth(tokens.worker_other))
        other = (await http.post("/v1/worker/sessions", json={"pools": ["other"]})).json()
        sid = other["session_id"]
        body = {"session_id": sid, "attempt": 1, "response": {"stolen": True}}
        single = await http.post(f"/v1/worker/tasks/{tid}/complete", json=body)
        started = await http.post(
            f"/v1/worker/tasks/{tid}/start", json={"session_id": sid, "attempt": 1}
        )
        item = {"task_id": tid, "attempt": 1, "response": {}}
        batch = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json={"outcomes": [item]})
        # The holder's own stale write still gets the 409 with the task.
        http.headers.update(auth(tokens.worker))
        stale = await http.post(
            f"/v1/worker/tasks/{tid}/complete",
            json={"session_id": holder["session_id"], "attempt": 2, "response": {}},
        )
    for r in (single, started):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "task_not_found"
        assert "task" not in r.json()["error"]
    [result] = batch.json()["results"]
    assert result["status_code"] == 404 and result["task"] is None
    assert stale.status_code == 409 and stale.json()["error"]["task"]["id"] == tid


async def test_another_owners_session_is_not_found(app: tuple[Server, Tokens], dsn: str) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url) as http:
        sid = (
            await http.post(
                "/v1/worker/sessions", json={"pools": [POOL]}, headers=auth(tokens.worker)
            )
        ).json()["session_id"]
        r = await http.post(
            f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 0}, headers=auth(tokens.admin)
        )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "session_not_found"


async def test_outcomes_answer_each_item_like_its_single_route(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        done, failed, cancelled, stale = await submit(http, tokens, 4)
        bound = (
            await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 4})
        ).json()
        sid = bound["session_id"]
        await http.post(f"/v1/tasks/{cancelled}/cancel", headers=auth(tokens.alice))
        missing = "00000000-0000-4000-8000-000000000000"
        items = [
            {"task_id": done, "attempt": 1, "response": {"text": "ok"}},
            {"task_id": failed, "attempt": 1, "error": "CUDA out of memory"},
            {"task_id": cancelled, "attempt": 1, "response": {}},
            {"task_id": stale, "attempt": 7, "response": {}},
            {"task_id": missing, "attempt": 1, "response": {}},
        ]
        r = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json={"outcomes": items})
        assert r.status_code == 200
        results = r.json()["results"]
        assert [x["id"] for x in results] == [i["task_id"] for i in items]
        assert [x["status_code"] for x in results] == [200, 200, 409, 409, 404]
        assert results[0]["task"] == {"id": done, "status": "completed", "attempt": 1}
        assert results[1]["task"]["status"] == "error"
        assert results[2]["error"]["task"]["status"] == "cancelled"
        assert results[3]["error"]["code"] == "lease_lost"
        assert results[3]["task"] == {"id": stale, "status": "claimed", "attempt": 1}
        assert results[4]["error"]["code"] == "task_not_found"
        # The same answers as the single routes, and a repeat is idempotent.
        single = await http.post(
            f"/v1/worker/tasks/{stale}/complete", json={"session_id": sid, "attempt": 7}
        )
        assert single.status_code == 422  # the single route needs a response field too
        again = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json={"outcomes": items[:2]})
        assert [x["status_code"] for x in again.json()["results"]] == [200, 200]
        got = {
            i: (await http.get(f"/v1/tasks/{i}", headers=auth(tokens.alice))).json()
            for i in (done, failed, stale)
        }
    assert got[done]["status"] == "completed" and got[done]["response"] == {"text": "ok"}
    assert got[failed]["status"] == "error" and got[failed]["error"] == "CUDA out of memory"
    assert got[stale]["status"] == "claimed"


async def test_outcomes_can_claim_the_next_tasks_in_the_same_call(
    app: tuple[Server, Tokens],
) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        first, second, third = await submit(http, tokens, 3)
        bound = (
            await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 1})
        ).json()
        sid = bound["session_id"]
        assert [t["id"] for t in bound["tasks"]] == [first]
        body = {"outcomes": [{"task_id": first, "attempt": 1, "response": "a"}], "claim": 5}
        r = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json=body)
        assert r.status_code == 200
        # The session's capacity holds: one task, the next in line.
        assert [t["id"] for t in r.json()["tasks"]] == [second]
        assert r.json()["tasks"][0]["request"] == CHAT
        await http.delete(f"/v1/worker/sessions/{sid}")
        # A session that is gone takes nothing more.
        body = {"outcomes": [{"task_id": second, "attempt": 1, "response": "b"}], "claim": 1}
        r = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json=body)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "session_not_found"
        left = await http.get(f"/v1/tasks/{third}", headers=auth(tokens.alice))
        assert left.json()["status"] == "pending"


async def test_outcomes_refuse_a_malformed_item_as_a_whole(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        [tid] = await submit(http, tokens)
        sid = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()["session_id"]
        both = {"task_id": tid, "attempt": 1, "response": {}, "error": "x"}
        neither = {"task_id": tid, "attempt": 1}
        for item in (both, neither):
            r = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json={"outcomes": [item]})
            assert r.status_code == 422
        task = (await http.get(f"/v1/tasks/{tid}", headers=auth(tokens.alice))).json()
    assert task["status"] == "claimed"  # nothing written


async def test_a_session_reaped_elsewhere_claims_nothing(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker)) as http:
        sid = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()["session_id"]
        r = await http.post(f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 0})
        assert r.status_code == 200  # this replica now knows the session
        # Another replica's reaper removes it while this replica is not looking.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("DELETE FROM inferq.worker_session WHERE id = %s", (sid,))
        [tid] = await submit(http, tokens)
        r = await http.post(f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 0})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "session_not_found"
        body = {"outcomes": [{"task_id": tid, "attempt": 1, "response": {}}], "claim": 1}
        r = await http.post(f"/v1/worker/sessions/{sid}/outcomes", json=body)
        assert r.json()["tasks"] == []  # its outcomes are answered, but it takes no work
        assert r.json()["results"][0]["error"]["code"] == "lease_lost"
        task = (await http.get(f"/v1/tasks/{tid}", headers=auth(tokens.alice))).json()
    assert task["status"] == "pending"


async def test_a_long_poll_whose_session_is_reaped_answers_404_when_work_arrives(
    settings: Settings, dsn: str
) -> None:
    # A worker stalled past its session's TTL: no heartbeat extends the session, the reaper
    # removes it, and the long-poll it left open on it is still parked.
    short = settings.model_copy(update={"session_ttl_s": 1.0})
    tokens = await make_tokens(short, dsn)
    async with (
        serve_app(short, dsn) as server,
        httpx.AsyncClient(base_url=server.url, headers=auth(tokens.worker), timeout=60) as http,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        sid = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()["session_id"]
        claim = asyncio.create_task(
            http.post(f"/v1/worker/sessions/{sid}/claim", json={"wait_s": 30})
        )
        waits = server.replica.waits
        assert waits is not None
        await eventually(lambda: waits.hub.parked_count > 0)

        async def expired() -> bool:
            query = "SELECT expires_at < now() FROM inferq.worker_session WHERE id = %s"
            row = await (await conn.execute(query, (sid,))).fetchone()
            return bool(row and row[0])

        await eventually(expired)
        await conn.execute("DELETE FROM inferq.worker_session WHERE id = %s", (sid,))
        [tid] = await submit(http, tokens)
        # Told at once that its session is gone (it binds again), not after 30 s of nothing.
        r = await asyncio.wait_for(claim, 10)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "session_not_found"
        task = (await http.get(f"/v1/tasks/{tid}", headers=auth(tokens.alice))).json()
    assert task["status"] == "pending"  # left for a live worker
