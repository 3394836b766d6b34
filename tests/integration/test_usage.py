"""Usage accounting: per task, totalled per owner, token, model and hour, counted once per task
whatever the workers lost on the way; GET /v1/usage, `inferq usage`, the counters."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from inferq.db.pool import Pool
from inferq.db.tasks import TaskRepository
from inferq.settings import Settings
from tests.api_helpers import MODEL, POOL, Tokens, auth, make_tokens, serve_app

pytestmark = pytest.mark.db

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def bind(http: httpx.AsyncClient, tokens: Tokens) -> tuple[str, list[dict[str, Any]]]:
    r = await http.post(
        "/v1/worker/sessions", json={"pools": [POOL], "capacity": 50}, headers=auth(tokens.worker)
    )
    assert r.status_code == 201, r.text
    return r.json()["session_id"], r.json()["tasks"]


async def post_outcomes(
    http: httpx.AsyncClient, tokens: Tokens, sid: str, done: dict[str, tuple[int, dict[str, int]]]
) -> list[int]:
    """Complete tasks: id -> (attempt, usage). The status code of each."""
    items = [
        {"task_id": i, "attempt": a, "response": {"model": "echo/1", "usage": u}}
        for i, (a, u) in done.items()
    ]
    r = await http.post(
        f"/v1/worker/sessions/{sid}/outcomes", json={"outcomes": items}, headers=auth(tokens.worker)
    )
    assert r.status_code == 200, r.text
    return [x["status_code"] for x in r.json()["results"]]


def usage_of(rng: random.Random) -> dict[str, int]:
    return {"prompt_tokens": rng.randint(1, 500), "completion_tokens": rng.randint(1, 900)}


async def kill_workers(pool: Pool) -> None:
    """What the rescuer does once the killed workers' leases ran out: their tasks go back."""
    await TaskRepository(pool).revert_expired(datetime.now(UTC) + timedelta(hours=1))


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """The sum of a counter's series whose labels contain ``labels`` (e.g. 'lane="batch"')."""
    found = re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
    return sum(float(v) for series, v in found if labels in series)


async def test_usage_counts_the_completing_attempt_once(
    settings: Settings, dsn: str, pool: Pool
) -> None:
    rng = random.Random(15)
    slow = settings.model_copy(update={"claim_ack_s": 300.0, "lease_s": 300.0})
    tokens = await make_tokens(slow, dsn)
    owner_of: dict[str, str] = {}
    expected: dict[str, dict[str, int]] = {}  # task -> the usage of the attempt that completed
    async with (
        serve_app(slow, dsn) as a,
        serve_app(slow, dsn) as b,
        httpx.AsyncClient(base_url=a.url) as ha,
        httpx.AsyncClient(base_url=b.url) as hb,
    ):
        for who, n in (("alice", 10), ("bob", 4)):
            for _ in range(n):
                lane = "batch" if who == "bob" else "default"  # the counters' lane label
                r = await ha.post(
                    "/v1/tasks",
                    json={"model": MODEL, "request": CHAT, "lane": lane},
                    headers=auth(getattr(tokens, who)),
                )
                owner_of[r.json()["id"]] = who
        # Worker 1 (replica A) takes all 14, completes 5, then is killed.
        sid1, got1 = await bind(ha, tokens)
        assert len(got1) == 14
        first = {t["id"]: (1, usage_of(rng)) for t in got1[:5]}
        assert await post_outcomes(ha, tokens, sid1, first) == [200] * 5
        expected |= {i: u for i, (_, u) in first.items()}
        await kill_workers(pool)
        # Worker 2 (replica B) re-runs the other 9 (attempt 2), completes 4, is killed too.
        sid2, got2 = await bind(hb, tokens)
        assert sorted(t["id"] for t in got2) == sorted(t["id"] for t in got1[5:])
        assert {t["attempt"] for t in got2} == {2}
        second = {t["id"]: (2, usage_of(rng)) for t in got2[:4]}
        assert await post_outcomes(hb, tokens, sid2, second) == [200] * 4
        expected |= {i: u for i, (_, u) in second.items()}
        # The first worker's late answers for the tasks it lost: refused, never counted.
        late = {t["id"]: (1, usage_of(rng)) for t in got1[5:]}
        assert await post_outcomes(ha, tokens, sid1, late) == [409] * 9
        await kill_workers(pool)
        sid3, got3 = await bind(ha, tokens)
        assert {t["attempt"] for t in got3} == {3} and len(got3) == 5
        third = {t["id"]: (3, usage_of(rng)) for t in got3}
        stale = {t["id"]: (2, usage_of(rng)) for t in got3}
        assert await post_outcomes(hb, tokens, sid2, stale) == [409] * 5
        assert await post_outcomes(ha, tokens, sid3, third) == [200] * 5
        expected |= {i: u for i, (_, u) in third.items()}
        # Repeating an accepted outcome is idempotent, and counts nothing more.
        assert await post_outcomes(ha, tokens, sid3, third) == [200] * 5

        own = (await ha.get("/v1/usage", headers=auth(tokens.alice))).json()["data"]
        everyone = (await hb.get("/v1/usage", headers=auth(tokens.admin))).json()["data"]
        bobs = await hb.get("/v1/usage", params={"owner": "bob"}, headers=auth(tokens.admin))
        prying = await ha.get("/v1/usage", params={"owner": "bob"}, headers=auth(tokens.alice))
        later = datetime.now(UTC) + timedelta(hours=2)
        window = {"from": later.isoformat(), "to": (later + timedelta(hours=3)).isoformat()}
        future = await ha.get("/v1/usage", params=window, headers=auth(tokens.alice))
        metrics = (await ha.get("/metrics")).text + (await hb.get("/metrics")).text

    assert len(expected) == 14

    def total(who: str, kind: str) -> int:
        return sum(u[kind] for i, u in expected.items() if owner_of[i] == who)

    # Per task, as stored.
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id::text, prompt_tokens, completion_tokens FROM inferq.task"
        ).fetchall()
    assert {r[0]: {"prompt_tokens": r[1], "completion_tokens": r[2]} for r in rows} == expected
    # The caller's own totals.
    assert {r["owner"] for r in own} == {"alice"}
    assert sum(r["prompt_tokens"] for r in own) == total("alice", "prompt_tokens")
    assert sum(r["completion_tokens"] for r in own) == total("alice", "completion_tokens")
    assert sum(r["requests"] for r in own) == 10
    assert all(r["model"] == MODEL and r["token_id"] == str(tokens.ids["alice"]) for r in own)
    assert all(r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"] for r in own)
    # An admin's: every owner, or one.
    for who in ("alice", "bob"):
        mine = [r for r in everyone if r["owner"] == who]
        assert sum(r["prompt_tokens"] for r in mine) == total(who, "prompt_tokens")
        assert sum(r["completion_tokens"] for r in mine) == total(who, "completion_tokens")
    assert bobs.status_code == 200
    assert {r["owner"] for r in bobs.json()["data"]} == {"bob"}
    assert prying.status_code == 403
    assert future.status_code == 200 and future.json()["data"] == []
    # The replicas' counters: what the two of them accepted, once each.
    prompt = sum(u["prompt_tokens"] for u in expected.values())
    completion = sum(u["completion_tokens"] for u in expected.values())
    assert metric_sum(metrics, "inferq_prompt_tokens_total") == prompt
    assert metric_sum(metrics, "inferq_completion_tokens_total") == completion
    assert 'model="echo/1"' in metrics and 'owner="' not in metrics
    # Per lane: bob's tasks ran in lane batch, alice's in default.
    for lane, who in (("batch", "bob"), ("default", "alice")):
        for name, kind in (
            ("inferq_prompt_tokens_total", "prompt_tokens"),
            ("inferq_completion_tokens_total", "completion_tokens"),
        ):
            assert metric_sum(metrics, name, f'lane="{lane}"') == total(who, kind), (lane, name)


def seed_usage(dsn: str, token_id: Any, owner: str, usage: list[tuple[int, int]]) -> None:
    """Tasks of ``owner`` completed straight in SQL, as a worker's statement would."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for prompt, completion in usage:
            body = json.dumps({"usage": {"prompt_tokens": prompt, "completion_tokens": completion}})
            row = conn.execute(
                "INSERT INTO inferq.task (pool_name, llm_name, request_body, owner_id, token_id)"
                " VALUES ('p', 'llama', '{}', %s, %s) RETURNING id",
                (owner, token_id),
            ).fetchone()
            assert row is not None
            conn.execute("UPDATE inferq.task SET status = 'claimed' WHERE id = %s", row)
            conn.execute(
                "UPDATE inferq.task SET status = 'completed', response_body = %s WHERE id = %s",
                (body, row[0]),
            )


def test_inferq_token_and_usage_commands(
    dsn: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from inferq.cli import main

    monkeypatch.setenv("INFERQ_DATABASE_URL", dsn)
    assert main(["token", "create", "--owner", "carol", "--rpm", "60", "--tpd", "100000"]) == 0
    made = capsys.readouterr()
    assert made.out.strip().startswith("iq_")
    token_id = re.search(r"token ([0-9a-f-]{36})", made.err)
    assert token_id is not None
    assert "requests_per_minute=60 tokens_per_day=100000" in made.err
    assert main(["token", "update", token_id.group(1), "--rpm", "none", "--max-running", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith("max_running=2 tokens_per_day=100000")
    seed_usage(dsn, token_id.group(1), "carol", [(10, 20), (5, 7)])
    seed_usage(dsn, None, "dave", [(1, 1)])
    assert main(["usage", "--owner", "carol"]) == 0
    out = capsys.readouterr().out
    hour = datetime.now(UTC).strftime("%Y-%m-%d %H:00")
    [line] = [x for x in out.splitlines() if x.startswith(hour)]
    assert line.split()[2:8] == ["carol", "llama", "2", "15", "27", "42"]
    assert out.splitlines()[-1].split() == ["total", "2", "15", "27", "42"]
    assert "dave" not in out
    assert main(["usage", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    assert {(r["owner"], r["total_tokens"]) for r in data} == {("carol", 42), ("dave", 2)}
