"""Quotas per token, enforced in PostgreSQL: they hold across replicas, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.db.pool import Pool
from inferq.db.quotas import QuotaRepository
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.quotas import Quota
from inferq.services.quotas import RatePruner
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    EchoWorker,
    Server,
    Tokens,
    auth,
    make_tokens,
    running_worker,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
HEADERS = ("limit", "remaining", "reset")


@contextlib.asynccontextmanager
async def replicas(settings: Settings, dsn: str, n: int) -> AsyncIterator[list[Server]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(serve_app(settings, dsn)) for _ in range(n)]


async def put_quota(url: str, tokens: Tokens, who: str, **quota: int) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.put(
            f"/v1/admin/tokens/{tokens.ids[who]}/quota", json=quota, headers=auth(tokens.admin)
        )
    assert r.status_code == 200, r.text
    assert {k: v for k, v in r.json().items() if v is not None} == quota


def seconds_left_in_minute(dsn: str) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM date_trunc('minute', now()) + interval '1 minute' - now())"
        ).fetchone()
        assert row is not None
        return float(row[0])


async def early_in_a_minute(dsn: str, needed_s: float) -> None:
    """Wait (on the database clock) until ``needed_s`` of the current minute are left."""
    await eventually(lambda: seconds_left_in_minute(dsn) >= needed_s, timeout_s=needed_s + 5)


def assert_rate_limited(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 86_400
    error = r.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"


async def test_requests_per_minute_hold_across_three_replicas(settings: Settings, dsn: str) -> None:
    tokens = await make_tokens(settings, dsn)
    async with replicas(settings, dsn, 3) as servers, contextlib.AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=s.url, timeout=60))
            for s in servers
        ]
        await put_quota(servers[1].url, tokens, "alice", requests_per_minute=60)
        await stack.enter_async_context(running_worker(EchoWorker(servers[0].url, tokens.worker)))
        await early_in_a_minute(dsn, 20)
        gate = asyncio.Semaphore(40)

        async def call(i: int) -> httpx.Response:
            async with gate:
                return await https[i % 3].post(
                    "/v1/chat/completions", json=CHAT, headers=auth(tokens.alice)
                )

        answers = await asyncio.gather(*(call(i) for i in range(200)))
    ok = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code != 200]
    with psycopg.connect(dsn) as conn:
        windows = conn.execute(
            "SELECT count(*) FROM inferq.token_rate WHERE token_id = %s AND requests > 0",
            (tokens.ids["alice"],),
        ).fetchone()
    assert windows is not None and windows[0] >= 1
    # A fixed window per minute: exactly 60 when the burst fell in one minute (it started
    # with 20 s of it left), at most 60 in each minute it touched otherwise.
    assert 60 <= len(ok) <= 60 * windows[0]
    if windows[0] == 1:
        assert len(ok) == 60
    for r in refused:
        assert_rate_limited(r)
        assert int(r.headers["Retry-After"]) <= 60
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    for r in ok:
        assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
        assert r.headers["x-ratelimit-limit-requests"] == "60"
        assert 0 <= int(r.headers["x-ratelimit-remaining-requests"]) < 60
        assert r.headers["x-ratelimit-reset-requests"].endswith("s")
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok)
    if windows[0] == 1:
        assert remaining == list(range(60))  # each admission saw the shared counter


async def test_max_pending_refuses_until_a_task_is_claimed(settings: Settings, dsn: str) -> None:
    tokens = await make_tokens(settings, dsn)
    submit = {"model": MODEL, "request": CHAT}
    async with replicas(settings, dsn, 2) as (a, b), httpx.AsyncClient() as http:
        await put_quota(a.url, tokens, "alice", max_pending=2)
        first = [
            await http.post(s.url + "/v1/tasks", json=submit, headers=auth(tokens.alice))
            for s in (a, b)
        ]
        assert [r.status_code for r in first] == [201, 201]
        over = await http.post(b.url + "/v1/tasks", json=submit, headers=auth(tokens.alice))
        assert_rate_limited(over)
        assert "pending" in over.json()["error"]["message"]
        # Another token is not affected.
        other = await http.post(a.url + "/v1/tasks", json=submit, headers=auth(tokens.bob))
        assert other.status_code == 201
        bound = await http.post(
            a.url + "/v1/worker/sessions",
            json={"pools": [POOL], "capacity": 1},
            headers=auth(tokens.worker),
        )
        # FIFO: alice's first task is claimed, so she has room for one more.
        assert owners_of(dsn, [t["id"] for t in bound.json()["tasks"]]) == ["alice"]
        again = await http.post(a.url + "/v1/tasks", json=submit, headers=auth(tokens.alice))
        assert again.status_code == 201
        assert_rate_limited(
            await http.post(b.url + "/v1/tasks", json=submit, headers=auth(tokens.alice))
        )


async def complete_with_usage(
    http: httpx.AsyncClient, tokens: Tokens, prompt: int, completion: int
) -> None:
    """Bind a worker, take every pending task and complete each with this usage."""
    bound = (
        await http.post(
            "/v1/worker/sessions", json={"pools": [POOL], "capacity": 50},
            headers=auth(tokens.worker),
        )
    ).json()  # fmt: skip
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    items = [
        {"task_id": t["id"], "attempt": t["attempt"], "response": {"usage": usage}}
        for t in bound["tasks"]
    ]
    r = await http.post(
        f"/v1/worker/sessions/{bound['session_id']}/outcomes",
        json={"outcomes": items},
        headers=auth(tokens.worker),
    )
    assert [x["status_code"] for x in r.json()["results"]] == [200] * len(items)


@pytest.mark.parametrize("window", ["tokens_per_minute", "tokens_per_day"])
async def test_tokens_quota_counts_recorded_usage(
    settings: Settings, dsn: str, window: str
) -> None:
    tokens = await make_tokens(settings, dsn)
    submit = {"model": MODEL, "request": CHAT}
    async with serve_app(settings, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        await put_quota(server.url, tokens, "alice", **{window: 100})
        await early_in_a_minute(dsn, 15)  # the completion and the next submit share a minute
        first = await http.post("/v1/tasks", json=submit, headers=auth(tokens.alice))
        assert first.status_code == 201
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert first.headers["x-ratelimit-remaining-tokens"] == "100"
        await complete_with_usage(http, tokens, 60, 30)  # 90: still room
        second = await http.post("/v1/tasks", json=submit, headers=auth(tokens.alice))
        assert second.status_code == 201
        assert second.headers["x-ratelimit-remaining-tokens"] == "10"
        await complete_with_usage(http, tokens, 5, 5)  # 100: the quota is used up
        over = await http.post("/v1/tasks", json=submit, headers=auth(tokens.alice))
        bob = await http.post("/v1/tasks", json=submit, headers=auth(tokens.bob))
    assert_rate_limited(over)
    assert over.headers["x-ratelimit-limit-tokens"] == "100"
    assert over.headers["x-ratelimit-remaining-tokens"] == "0"
    if window == "tokens_per_minute":
        assert int(over.headers["Retry-After"]) <= 60
    else:  # the end of the UTC day
        assert over.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert bob.status_code == 201


async def test_max_running_holds_at_claim_time(settings: Settings, dsn: str, pool: Pool) -> None:
    tokens = await make_tokens(settings, dsn)
    submit = {"model": MODEL, "request": CHAT}
    async with replicas(settings, dsn, 2) as (a, b), httpx.AsyncClient() as http:
        await put_quota(a.url, tokens, "alice", max_running=2)
        for who, n in (("alice", 6), ("bob", 3)):
            for _ in range(n):
                r = await http.post(
                    a.url + "/v1/tasks", json=submit, headers=auth(getattr(tokens, who))
                )
                assert r.status_code == 201
        # A worker of capacity 10: two of alice's tasks, and all of bob's behind them.
        bound = (
            await http.post(
                a.url + "/v1/worker/sessions", json={"pools": [POOL], "capacity": 10},
                headers=auth(tokens.worker),
            )
        ).json()  # fmt: skip
        owners = owners_of(dsn, [t["id"] for t in bound["tasks"]])
        assert sorted(owners) == ["alice", "alice", "bob", "bob", "bob"]
        # Another worker, on the other replica, with room to spare: nothing of alice's.
        other = (
            await http.post(
                b.url + "/v1/worker/sessions", json={"pools": [POOL], "capacity": 10},
                headers=auth(tokens.worker),
            )
        ).json()  # fmt: skip
        assert other["tasks"] == []
        # One of alice's ends: exactly one more of hers is claimed.
        done = next(t for t in bound["tasks"] if owners_of(dsn, [t["id"]]) == ["alice"])
        r = await http.post(
            a.url + f"/v1/worker/sessions/{bound['session_id']}/outcomes",
            json={
                "outcomes": [{"task_id": done["id"], "attempt": 1, "response": {}}],
                "claim": 10,
            },
            headers=auth(tokens.worker),
        )
        assert owners_of(dsn, [t["id"] for t in r.json()["tasks"]]) == ["alice"]
    assert held(dsn, "alice") == 2


async def test_racing_claims_never_pass_max_running(
    settings: Settings, dsn: str, pool: Pool
) -> None:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        await put_quota(server.url, tokens, "alice", max_running=3)
        for _ in range(40):
            r = await http.post(
                "/v1/tasks", json={"model": MODEL, "request": CHAT}, headers=auth(tokens.alice)
            )
            assert r.status_code == 201
    repo, sessions = TaskRepository(pool), WorkerSessionRepository(pool)
    bound = [await sessions.bind("gpus", [POOL], 10, ttl_s=60) for _ in range(8)]
    for _ in range(3):
        await asyncio.gather(
            *(repo.claim(s.id, [POOL], limit=10, lease_s=60, bound=True) for s in bound)
        )
        assert held(dsn, "alice") == 3


def owners_of(dsn: str, ids: list[Any]) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT owner_id FROM inferq.task WHERE id = ANY(%s)",
            ([uuid.UUID(str(i)) for i in ids],),
        ).fetchall()
    return sorted(r[0] for r in rows)


def held(dsn: str, owner: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM inferq.task WHERE owner_id = %s "
            "AND status IN ('claimed', 'running')",
            (owner,),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_capped_owner_does_not_stall_the_others(
    settings: Settings, dsn: str, pool: Pool
) -> None:
    # Alice's 20 tasks are ahead of bob's 3 in the queue; once she holds her max running, a
    # claim steps over the rest of hers to bob's instead of finding nothing to take.
    tokens = await make_tokens(settings, dsn)
    await QuotaRepository(pool).put(tokens.ids["alice"], Quota(max_running=2))
    repo = TaskRepository(pool)
    for who, n in (("alice", 20), ("bob", 3)):
        for _ in range(n):
            await repo.enqueue(
                owner_id=who, pool_name=POOL, request_body=CHAT, token_id=tokens.ids[who]
            )
    # Bob has used the pool a lot lately, so fair share puts alice first: only the running
    # cap, not the share order, can send the second claim past her to bob.
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE inferq.fair_share SET usage = 100, usage_at = now() WHERE owner_id = 'bob'"
        )
    session = await WorkerSessionRepository(pool).bind("gpus", [POOL], 10, ttl_s=60)
    first = await repo.claim(session.id, [POOL], limit=5, lease_s=60, bound=True)
    second = await repo.claim(session.id, [POOL], limit=5, lease_s=60, bound=True)
    assert [t.owner_id for t in first] == ["alice", "alice"]
    assert [t.owner_id for t in second] == ["bob", "bob", "bob"]


async def test_the_sweep_drops_minute_rows_no_window_needs(pool: Pool) -> None:
    token = uuid.uuid4()
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO inferq.token_rate (token_id, minute, requests) VALUES "
            "(%s, date_trunc('minute', now()) - interval '2 hours', 5), "
            "(%s, date_trunc('minute', now()), 7)",
            (token, token),
        )
    assert await RatePruner(QuotaRepository(pool)).run_once() == 1
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT requests FROM inferq.token_rate WHERE token_id = %s", (token,)
        )
        assert await cur.fetchall() == [(7,)]


async def test_the_admin_quota_routes_refuse_what_they_cannot_store(
    settings: Settings, dsn: str
) -> None:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server, httpx.AsyncClient(base_url=server.url) as http:
        route = f"/v1/admin/tokens/{tokens.ids['alice']}/quota"
        too_many = await http.put(route, json={"max_running": 10**9}, headers=auth(tokens.admin))
        negative = await http.put(route, json={"tokens_per_day": -1}, headers=auth(tokens.admin))
        unknown = await http.put(
            f"/v1/admin/tokens/{uuid.uuid4()}/quota", json={}, headers=auth(tokens.admin)
        )
        client = await http.put(route, json={}, headers=auth(tokens.alice))
        read = await http.get(route, headers=auth(tokens.admin))
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "max_running"
    assert negative.status_code == 422
    assert unknown.status_code == 404
    assert client.status_code == 403
    assert read.json() == {
        "max_pending": None,
        "max_running": None,
        "requests_per_minute": None,
        "tokens_per_minute": None,
        "tokens_per_day": None,
        "discarded_per_hour": None,
    }


async def test_a_streamed_answer_carries_the_rate_limit_headers(
    settings: Settings, dsn: str
) -> None:
    tokens = await make_tokens(settings, dsn)
    async with (
        serve_app(settings, dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        running_worker(EchoWorker(server.url, tokens.worker)),
    ):
        await put_quota(server.url, tokens, "alice", requests_per_minute=1000)
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=auth(tokens.alice),
        ) as r:
            body = (await r.aread()).decode()
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(r.headers["x-ratelimit-remaining-requests"]) < 1000
    assert body.rstrip().endswith("data: [DONE]")
