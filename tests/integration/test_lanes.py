"""Lanes as a client and an operator see them: a token's lanes and priority range (403 naming
what it may use), OpenAI's service_tier, interactive work ahead of a batch backlog, the admin
listing of tasks across owners, and `inferq status` per pool and lane."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
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
    running_worker,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server:
        yield server, tokens


async def new_token(http: httpx.AsyncClient, tokens: Tokens, **fields: Any) -> dict[str, Any]:
    r = await http.post("/v1/admin/tokens", json=fields, headers=auth(tokens.admin))
    assert r.status_code == 201, r.text
    made: dict[str, Any] = r.json()
    return made


async def test_a_lane_or_priority_the_token_may_not_use_is_403_naming_what_it_may(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url) as http:
        carol = await new_token(
            http, tokens, owner="carol", lanes=["default", "batch"], priority_min=0, priority_max=5
        )
        assert (carol["lanes"], carol["priority_min"], carol["priority_max"]) == (
            ["default", "batch"],
            0,
            5,
        )
        headers = auth(carol["secret"])
        submit = {"model": MODEL, "request": CHAT}
        lane = await http.post("/v1/tasks", json={**submit, "lane": "interactive"}, headers=headers)
        high = await http.post("/v1/tasks", json={**submit, "priority": 6}, headers=headers)
        openai = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, **CHAT, "service_tier": "priority"},
            headers=headers,
        )
        allowed = await http.post(
            "/v1/tasks", json={**submit, "lane": "batch", "priority": 5}, headers=headers
        )
        # Widened by an admin: the next request may use the interactive lane.
        r = await http.patch(
            f"/v1/admin/tokens/{carol['id']}",
            json={"lanes": ["interactive"]},
            headers=auth(tokens.admin),
        )
        assert r.status_code == 200 and r.json()["lanes"] == ["interactive"], r.text
        widened = await http.post(
            "/v1/tasks", json={**submit, "lane": "interactive"}, headers=headers
        )
        narrowed = await http.post("/v1/tasks", json={**submit, "lane": "batch"}, headers=headers)
    for refused in (lane, high, openai):
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]["message"]
        assert "default, batch" in message and "0 to 5" in message, message
    assert openai.json()["error"]["type"] == "permission_error"
    assert allowed.status_code == 201 and allowed.json()["lane"] == "batch"
    assert widened.status_code == 201 and widened.json()["lane"] == "interactive"
    assert narrowed.status_code == 403
    assert "lane(s) interactive" in narrowed.json()["error"]["message"]
    with psycopg.connect(dsn) as conn:
        owners = conn.execute("SELECT count(*) FROM inferq.task WHERE owner_id = 'carol'")
        assert owners.fetchone() == (2,)  # nothing refused was queued


@pytest.mark.parametrize(
    ("tier", "lane"),
    [(None, "default"), ("priority", "interactive"), ("auto", "default"), ("flex", "batch")],
)
async def test_openai_service_tier_picks_the_lane(
    app: tuple[Server, Tokens], tier: str | None, lane: str
) -> None:
    server, tokens = app
    body: dict[str, Any] = {"model": MODEL, **CHAT}
    if tier is not None:
        body["service_tier"] = tier
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        running_worker(EchoWorker(server.url, tokens.worker)),
    ):
        r = await http.post("/v1/chat/completions", json=body, headers=auth(tokens.alice))
        assert r.status_code == 200, r.text
        task = await http.get(
            f"/v1/tasks/{r.headers['x-inferq-task-id']}", headers=auth(tokens.alice)
        )
    assert task.json()["lane"] == lane


async def test_an_unknown_service_tier_is_400(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, **CHAT, "service_tier": "scale"},
            headers=auth(tokens.alice),
        )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "service_tier"


async def test_an_interactive_task_behind_1000_batch_tasks_is_claimed_next(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id, lane) "
            "SELECT %s, '{}', 'bob', 'batch' FROM generate_series(1, 1000)",
            (POOL,),
        )
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post(
            "/v1/tasks",
            json={"model": MODEL, "request": CHAT, "lane": "interactive"},
            headers=auth(tokens.alice),
        )
        assert r.status_code == 201
        interactive = r.json()["id"]
        bound = await http.post(
            "/v1/worker/sessions",
            json={"pools": [POOL], "capacity": 1},
            headers=auth(tokens.worker),
        )
    [first] = bound.json()["tasks"]
    assert first["id"] == interactive


async def test_admins_list_tasks_across_owners_with_filters(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    async with httpx.AsyncClient(base_url=server.url) as http:
        made: dict[tuple[str, str], list[str]] = {}
        for who, lane in [("alice", "default"), ("alice", "batch"), ("bob", "batch")] * 2:
            r = await http.post(
                "/v1/tasks",
                json={"model": MODEL, "request": CHAT, "lane": lane},
                headers=auth(getattr(tokens, who)),
            )
            made.setdefault((who, lane), []).append(r.json()["id"])
        other = await http.post(
            "/v1/tasks", json={"pool": "other", "request": CHAT}, headers=auth(tokens.bob)
        )
        cancelled = made[("bob", "batch")][0]
        await http.post(f"/v1/tasks/{cancelled}/cancel", headers=auth(tokens.bob))

        async def listed(**params: Any) -> list[dict[str, Any]]:
            r = await http.get("/v1/admin/tasks", params=params, headers=auth(tokens.admin))
            assert r.status_code == 200, r.text
            data: list[dict[str, Any]] = r.json()["data"]
            return data

        everything = await listed()
        batch = await listed(lane="batch")
        bobs_batch = await listed(owner="bob", lane="batch", status="pending")
        in_other = await listed(pool="other")
        page = await listed(limit=3)
        refused = await http.get("/v1/admin/tasks", headers=auth(tokens.alice))
    assert len(everything) == 7 and {t["owner"] for t in everything} == {"alice", "bob"}
    assert {t["id"] for t in batch} == {*made[("alice", "batch")], *made[("bob", "batch")]}
    assert [t["id"] for t in bobs_batch] == [made[("bob", "batch")][1]]
    assert [t["id"] for t in in_other] == [other.json()["id"]]
    assert [t["id"] for t in page] == [t["id"] for t in everything[:3]]  # newest first
    assert refused.status_code == 403


def test_status_and_tasks_commands_show_pools_and_lanes(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferq.cli import main

    monkeypatch.setenv("INFERQ_DATABASE_URL", dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id, lane, created_at) "
            "VALUES ('gpu', '{}', 'a', 'batch', now() - interval '90 seconds'), "
            "('gpu', '{}', 'a', 'batch', now()), ('gpu', '{}', 'b', 'interactive', now())"
        )
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "lane interactive" in out and "pending=1" in out
    [batch_line] = [line for line in out.splitlines() if "lane batch" in line]
    assert "pending=2" in batch_line
    oldest = float(batch_line.split("oldest=")[1].rstrip("s"))
    assert 90 <= oldest < 400
    assert "lane default" not in out  # nothing waits there
    assert main(["status", "--json"]) == 0
    lanes = json.loads(capsys.readouterr().out)["lanes"]
    assert lanes["gpu"]["batch"]["pending"] == 2 and lanes["gpu"]["interactive"]["pending"] == 1
    assert main(["tasks", "--lane", "batch", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["owner"], r["lane"]) for r in rows] == [("a", "batch")] * 2
    assert main(["tasks", "--owner", "b"]) == 0
    assert "lane=interactive" in capsys.readouterr().out


def test_token_commands_set_lanes_priorities_and_weight(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferq.cli import main

    monkeypatch.setenv("INFERQ_DATABASE_URL", dsn)
    args = ["--lanes", "batch", "--priority-min", "-5", "--priority-max", "5", "--weight", "4"]
    assert main(["token", "create", "--owner", "team", *args]) == 0
    capsys.readouterr()
    assert main(["token", "list"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert "lanes=batch priority=-5..5 weight=4" in line
    token_id = line.split()[0]
    assert main(["token", "update", token_id, "--weight", "2", "--lanes", "default", "batch"]) == 0
    assert "lanes=default,batch priority=-5..5 weight=2" in capsys.readouterr().out
    assert main(["token", "update", token_id, "--priority-min", "9"]) == 2  # above the max
    assert "priority_min" in capsys.readouterr().err
