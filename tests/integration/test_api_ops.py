"""Operations: health, readiness, metrics, OpenAPI, request ids, and the drain switch."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.metrics import MAX_POOL_LABELS, OTHER_POOLS
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    allow_connections,
    auth,
    make_tokens,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    fast = settings.model_copy(update={"sse_heartbeat_s": 0.2})
    tokens = await make_tokens(fast, dsn)
    async with serve_app(fast, dsn) as server:
        yield server, tokens


async def test_health_ready_metrics_openapi(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url) as http:
        await http.post(
            "/v1/tasks", json={"model": MODEL, "request": CHAT}, headers=auth(tokens.alice)
        )
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        metrics = (await http.get("/metrics")).text
        spec = (await http.get("/openapi.json")).json()
        tagged = await http.get("/healthz", headers={"X-Request-Id": "req-123"})
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"draining": "no", "listener": "ok", "database": "ok"}
    assert 'inferq_tasks{pool="gpu-a",status="pending"} 1.0' in metrics
    assert 'inferq_queue_depth{lane="default",pool="gpu-a"} 1.0' in metrics
    assert 'inferq_queue_depth{lane="batch",pool="gpu-a"} 0.0' in metrics
    for name in (
        "inferq_wait_seconds",
        "inferq_claim_seconds",
        "inferq_claim_latency_seconds",
        "inferq_listener_reconnects",
        "inferq_listener_notifications",
        "inferq_http_requests_total",
    ):
        assert name in metrics
    for path in ("/v1/chat/completions", "/v1/tasks/{task_id}/events", "/v1/worker/sessions"):
        assert path in spec["paths"]
    assert tagged.headers["x-request-id"] == "req-123"


async def test_ready_is_red_and_listener_up_is_zero_while_the_listener_is_down(
    app: tuple[Server, Tokens], dsn: str, pg_server: Any
) -> None:
    server, _ = app
    listener = server.replica.listener
    assert listener is not None and listener.healthy
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    async with (
        httpx.AsyncClient(base_url=server.url) as http,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin,
    ):

        async def ready() -> tuple[httpx.Response, str]:
            return await http.get("/readyz"), (await http.get("/metrics")).text

        before = await ready()
        # Hold the listener down: it cannot reconnect while the database refuses new sessions
        # (the replica's pool keeps the connections it has).
        await allow_connections(pg_server, str(dbname), False)
        try:
            await admin.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
            await eventually(lambda: not listener.healthy)
            down = await ready()
        finally:
            await allow_connections(pg_server, str(dbname), True)

        async def ready_again() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(ready_again)
        after = await ready()
    assert before[0].status_code == 200 and "inferq_listener_up 1.0" in before[1]
    assert down[0].status_code == 503 and down[0].headers["retry-after"]
    assert down[0].json() == {
        "status": "unavailable",
        "checks": {"draining": "no", "listener": "down", "database": "ok"},
    }
    assert "inferq_listener_up 0.0" in down[1]
    assert after[0].json()["checks"]["listener"] == "ok"
    assert "inferq_listener_up 1.0" in after[1]
    assert "inferq_listener_reconnects 1.0" in after[1]


async def test_client_chosen_pools_cannot_grow_the_metrics_without_bound(
    app: tuple[Server, Tokens],
) -> None:
    """Every label value is a series a replica keeps for its life, and a client names any
    pool it likes: past MAX_POOL_LABELS pools, the rest are counted together as `_other`."""
    server, tokens = app
    extra = 7
    async with httpx.AsyncClient(base_url=server.url, headers=auth(tokens.alice)) as http:
        for i in range(MAX_POOL_LABELS + extra):
            r = await http.post("/v1/tasks", json={"pool": f"p{i}", "request": CHAT})
            assert r.status_code == 201, r.text
        metrics = (await http.get("/metrics")).text
    submitted = re.findall(r'^inferq_tasks_submitted_total\{pool="([^"]+)"\} (\S+)$', metrics, re.M)
    labels = dict(submitted)
    assert len(labels) == MAX_POOL_LABELS + 1
    assert labels[OTHER_POOLS] == f"{extra:.1f}"
    assert labels["p0"] == "1.0"
    # The database gauges still show every pool.
    last = f"p{MAX_POOL_LABELS + extra - 1}"
    assert f'inferq_queue_depth{{lane="default",pool="{last}"}} 1.0' in metrics


async def test_hot_routes_answer_count_and_refuse_like_every_route(
    app: tuple[Server, Tokens],
) -> None:
    # The wait and the completions are served without FastAPI's routing (inferq.api.direct):
    # a user sees the same ids, errors and metrics as on any other route.
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        tid = (
            await http.post(
                "/v1/tasks", json={"model": MODEL, "request": CHAT}, headers=auth(tokens.alice)
            )
        ).json()["id"]
        url = f"/v1/tasks/{tid}/wait"
        waited = await http.get(
            url + "?timeout=0", headers={**auth(tokens.alice), "X-Request-Id": "w-1"}
        )
        default = await http.get(url + "?timeout=0.0", headers=auth(tokens.alice))
        bad = await http.get(url + "?timeout=soon", headers=auth(tokens.alice))
        negative = await http.get(url, params={"timeout": -1}, headers=auth(tokens.alice))
        anonymous = await http.get(url + "?timeout=0")
        worker = await http.get(url + "?timeout=0", headers=auth(tokens.worker))
        foreign = await http.get(url + "?timeout=0", headers=auth(tokens.bob))
        # docs/protocol.md: bodies are JSON (Content-Type: application/json); a body without
        # that type is 415 unsupported_media_type, a typed one that does not parse 400.
        untyped = await http.post("/v1/chat/completions", content=b"{", headers=auth(tokens.alice))
        malformed = await http.post(
            "/v1/chat/completions",
            content=b"{",
            headers={**auth(tokens.alice), "Content-Type": "application/json"},
        )
        metrics = (await http.get("/metrics")).text
    assert waited.status_code == 200 and waited.headers["x-inferq-wait"] == "timeout"
    assert waited.json()["id"] == tid and waited.headers["x-request-id"] == "w-1"
    assert default.status_code == 200
    for refused in (bad, negative):
        assert refused.status_code == 422
        assert refused.json()["error"]["param"] == "timeout"
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"]
    assert worker.status_code == 403
    assert foreign.status_code == 404
    assert foreign.json()["error"]["code"] == "task_not_found"
    assert untyped.status_code == 415
    assert untyped.json()["error"]["code"] == "unsupported_media_type"
    assert malformed.status_code == 400
    assert malformed.json()["error"]["code"] == "invalid_json"
    assert untyped.headers["x-request-id"] and malformed.headers["x-request-id"]
    route = 'route="/v1/tasks/{task_id}/wait"'
    for status in ("200", "401", "403", "404", "422"):
        assert f'method="GET",{route},status="{status}"}} ' in metrics, status
    for status in ("400", "415"):
        assert f'method="POST",route="/v1/chat/completions",status="{status}"}} ' in metrics


async def test_drain_turns_ready_red_and_ends_waits_and_streams(
    app: tuple[Server, Tokens],
) -> None:
    server, tokens = app
    svc = server.replica.services
    assert svc is not None
    async with httpx.AsyncClient(
        base_url=server.url, headers=auth(tokens.alice), timeout=30
    ) as http:
        # A worker serves the pool but takes nothing: the calls wait for it.
        bound = await http.post(
            "/v1/worker/sessions", json={"pools": [POOL]}, headers=auth(tokens.worker)
        )
        assert bound.status_code == 201
        tid = (await http.post("/v1/tasks", json={"model": MODEL, "request": CHAT})).json()["id"]
        wait = asyncio.create_task(http.get(f"/v1/tasks/{tid}/wait", params={"timeout": 20}))
        sync = asyncio.create_task(http.post("/v1/chat/completions", json={"model": MODEL, **CHAT}))
        async with http.stream(
            "POST", "/v1/chat/completions", json={"model": MODEL, "stream": True, **CHAT}
        ) as stream:
            await eventually(lambda: svc.metrics.open_waits._value.get() == 3)
            svc.drain.start(grace_s=0)
            body = (await stream.aread()).decode()
        waited, synced = await wait, await sync
        ready = await http.get("/readyz")
        refused = await http.post("/v1/tasks", json={"model": MODEL, "request": CHAT})
        listed = await http.get("/v1/tasks")
    assert ready.status_code == 503
    assert waited.status_code == 503 and waited.headers["retry-after"]
    assert waited.json()["error"]["code"] == "shutting_down"
    assert synced.status_code == 503
    assert '"code":"shutting_down"' in body
    assert "[DONE]" not in body
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert listed.status_code == 200  # reads still work while draining
    # The abandoned OpenAI calls were cancelled; the native task was left for its client.
    statuses = {t["status"] for t in listed.json()["data"] if t["id"] != tid}
    assert statuses == {"cancelled"}


async def test_a_guarded_wait_ends_on_drain_and_leaves_other_cancellations_alone(
    app: tuple[Server, Tokens],
) -> None:
    # Drain.guarded() runs the wait in the caller's own task and cancels that task on drain.
    from inferq.errors import ShuttingDown

    server, _ = app
    svc = server.replica.services
    assert svc is not None
    parked = asyncio.Event()

    async def forever() -> None:
        parked.set()
        await asyncio.sleep(3600)

    # A cancellation that is not the drain's (a server stopping) stays a cancellation.
    stopped = asyncio.create_task(svc.drain.guarded(forever()))
    await parked.wait()
    stopped.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopped

    async def drained_then_more() -> str:
        with pytest.raises(ShuttingDown):
            await svc.drain.guarded(forever())
        # No cancellation is left on the task: what runs next in it (the error answer) is
        # not cut short, and timeouts and task groups in it still tell theirs apart.
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0
        await asyncio.sleep(0.01)
        return "carried on"

    parked.clear()
    task = asyncio.create_task(drained_then_more())
    await parked.wait()
    svc.drain.start(grace_s=0)
    assert await task == "carried on"


async def test_startup_refuses_a_database_that_is_behind(
    settings: Settings, empty_dsn: str
) -> None:
    from inferq.daemon import Replica
    from inferq.errors import DatabaseBehind

    with pytest.raises(DatabaseBehind, match="inferq migrate"):
        async with Replica(settings, empty_dsn):
            pass


# What seed_queue() writes, counted by hand: tasks per pool and status, and the live sessions
# (the expired one counts for nothing).
SEEDED_STATS = {
    "pools": {"gpu-a": {"pending": 2, "claimed": 1, "completed": 1}, "gpu-b": {"cancelled": 1}},
    "sessions": {"live": 2, "capacity": 5},
}


def seeded_lanes(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` without its per-lane figures, once they are checked: gpu-a's 2 pending tasks,
    in the default lane, queued a moment ago."""
    stats = dict(stats)
    lanes = stats.pop("lanes")
    assert list(lanes) == ["gpu-a"] and list(lanes["gpu-a"]) == ["default"]
    assert lanes["gpu-a"]["default"]["pending"] == 2
    assert 0 <= lanes["gpu-a"]["default"]["oldest_pending_s"] < 300
    return stats


def seed_queue(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [
            row[0]
            for row in conn.execute(
                "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
                "SELECT p, '{}', 'alice' FROM unnest(%s::text[]) AS p RETURNING id",
                (["gpu-a"] * 4 + ["gpu-b"],),
            ).fetchall()
        ]
        paths = (["claimed"], ["claimed", "completed"], ["cancelled"])
        for task_id, steps in zip(ids[2:], paths, strict=True):
            for status in steps:
                conn.execute("UPDATE inferq.task SET status = %s WHERE id = %s", (status, task_id))
        conn.execute(
            "INSERT INTO inferq.worker_session (owner_id, pools, capacity, expires_at) VALUES "
            "('gpus', '{gpu-a}', 4, now() + interval '1 hour'), "
            "('gpus', '{gpu-b}', 1, now() + interval '1 hour'), "
            "('gpus', '{gpu-a}', 9, now() - interval '1 second')"
        )


async def test_admin_stats_count_tasks_per_pool_and_status_and_live_sessions(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    seed_queue(dsn)
    async with httpx.AsyncClient(base_url=server.url) as http:
        stats = await http.get("/v1/admin/stats", headers=auth(tokens.admin))
        refused = await http.get("/v1/admin/stats", headers=auth(tokens.alice))
    assert stats.status_code == 200
    assert seeded_lanes(stats.json()) == SEEDED_STATS
    assert refused.status_code == 403


def test_admin_cli(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferq.cli import main

    monkeypatch.setenv("INFERQ_DATABASE_URL", dsn)
    assert main(["token", "create", "--owner", "ops", "--role", "worker", "--pools", "gpu-a"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("iq_")
    assert main(["token", "list"]) == 0
    listed = capsys.readouterr().out
    assert "ops" in listed and "gpu-a" in listed and secret not in listed
    assert main(["llm", "add", "llama3", "--pool", "gpu-a", "--model", "meta/llama3"]) == 0
    assert main(["llm", "list"]) == 0
    assert "meta/llama3" in capsys.readouterr().out
    seed_queue(dsn)
    # No replica runs: no session can be live, whatever time its row has left.
    assert main(["status", "--json"]) == 0
    stopped = {**SEEDED_STATS, "sessions": {"live": 0, "capacity": 0}, "replicas_listening": 0}
    assert seeded_lanes(json.loads(capsys.readouterr().out)) == stopped
    assert main(["status"]) == 0
    assert "no replica is running" in capsys.readouterr().out
    # A replica's LISTEN connection (what inferq.db.listener opens) makes them count.
    with psycopg.connect(dsn, autocommit=True, application_name="inferq-listener") as listening:
        listening.execute("LISTEN inferq_task")
        assert main(["status", "--json"]) == 0
        running = json.loads(capsys.readouterr().out)
    assert seeded_lanes(running) == {**SEEDED_STATS, "replicas_listening": 1}
    token_id = listed.split()[0]
    assert main(["token", "revoke", token_id]) == 0
    assert main(["token", "revoke", token_id]) == 1
    assert main(["llm", "remove", "llama3"]) == 0


def test_token_create_with_an_empty_pool_list_is_refused_not_widened(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferq.cli import main

    monkeypatch.setenv("INFERQ_DATABASE_URL", dsn)
    assert main(["token", "create", "--owner", "ops", "--role", "worker", "--pools"]) == 2
    assert "at least one pool" in capsys.readouterr().err
    assert main(["token", "list"]) == 0
    assert capsys.readouterr().out.strip() == ""  # nothing was written
