"""Fair share between owners inside a lane, and aging, as a saturated pool's worker sees them:
one worker of capacity 1 over HTTP, completions counted in the order it made them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest

from inferq.db.pool import Pool
from inferq.db.tasks import TaskRepository
from inferq.db.tokens import TokenRepository
from inferq.domain.lanes import LanePolicy
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    auth,
    make_tokens,
    running_worker,
    serve_app,
)

# Backstops only (each wait is for an event): a loaded 2-core machine is slow, not wrong.
pytestmark = [pytest.mark.db, pytest.mark.timeout(600)]

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@dataclass
class SlowLane:
    """One worker of capacity 1: claims a task, completes it, claims the next. ``done`` is the
    owners' completions in order; ``until(predicate)`` sets ``reached`` once it holds."""

    url: str
    token: str
    done: list[tuple[str, str]] = field(default_factory=list)  # (task id, owner)
    owners: dict[str, str] = field(default_factory=dict)  # task id -> owner, filled by tests
    until: Callable[[list[tuple[str, str]]], bool] = lambda done: False
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    after_each: Callable[[], Awaitable[None]] | None = None  # runs after each completion

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=auth(self.token)) as http:
            r = await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 1})
            sid = r.json()["session_id"]
            tasks = r.json()["tasks"]
            while True:
                if not tasks:
                    r = await http.post(
                        f"/v1/worker/sessions/{sid}/claim",
                        json={"max_tasks": 1, "wait_s": 5},
                        timeout=30,
                    )
                    r.raise_for_status()
                    tasks = r.json()["tasks"]
                    continue
                [task] = tasks
                # As the worker SDK does: the outcome, and the next task in the same call.
                outcome = {"task_id": task["id"], "attempt": task["attempt"], "response": {}}
                r = await http.post(
                    f"/v1/worker/sessions/{sid}/outcomes",
                    json={"outcomes": [outcome], "claim": 1},
                    timeout=30,
                )
                r.raise_for_status()
                assert r.json()["results"][0]["status_code"] == 200, r.text
                self.done.append((task["id"], self.owners.get(task["id"], "?")))
                if self.until(self.done):
                    self.reached.set()
                tasks = r.json()["tasks"]
                if self.after_each is not None:
                    await self.after_each()


async def submit_many(
    http: httpx.AsyncClient, secret: str, n: int, owner: str, into: dict[str, str]
) -> list[str]:
    """Submit ``n`` tasks over 8 connections; their ids, in no particular order."""
    ids: list[str] = []

    async def one() -> None:
        r = await http.post(
            "/v1/tasks", json={"model": MODEL, "request": CHAT}, headers=auth(secret)
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        into[r.json()["id"]] = owner

    for start in range(0, n, 8):
        await asyncio.gather(*[one() for _ in range(min(8, n - start))])
    return ids


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server:
        yield server, tokens


async def test_a_noisy_neighbour_does_not_hold_back_a_newcomer(
    app: tuple[Server, Tokens],
) -> None:
    server, tokens = app
    worker = SlowLane(server.url, tokens.worker)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        await submit_many(http, tokens.alice, 2000, "alice", worker.owners)
        worker.until = lambda done: len(done) >= 50
        async with running_worker(worker):
            await asyncio.wait_for(worker.reached.wait(), 240)  # alice's work is under way
            worker.reached.clear()
            worker.until = lambda done: sum(o == "bob" for _, o in done) == 20
            mark = len(worker.done)  # completions before bob's first submit
            bobs = await submit_many(http, tokens.bob, 20, "bob", worker.owners)
            await asyncio.wait_for(worker.reached.wait(), 240)
    after = [task_id for task_id, _ in worker.done[mark:]]
    positions = sorted(after.index(b) for b in bobs)
    assert positions[-1] < 60, f"bob's tasks finished at completions {positions}"


async def test_weights_3_to_1_share_completions_3_to_1(app: tuple[Server, Tokens]) -> None:
    server, tokens = app
    worker = SlowLane(server.url, tokens.worker)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        made = {}
        for owner, weight in (("heavy", 3), ("light", 1)):
            r = await http.post(
                "/v1/admin/tokens",
                json={"owner": owner, "weight": weight},
                headers=auth(tokens.admin),
            )
            made[owner] = r.json()["secret"]
        # Both saturate the lane: each has more queued than 400 completions can drain.
        for owner, secret in made.items():
            await submit_many(http, secret, 420, owner, worker.owners)
        worker.until = lambda done: len(done) >= 400
        async with running_worker(worker):
            await asyncio.wait_for(worker.reached.wait(), 240)
    share = sum(o == "heavy" for _, o in worker.done[:400]) / 400
    assert 0.70 <= share <= 0.80, share


async def test_claims_follow_the_weights_and_serve_an_idle_owner_at_once(pool: Pool) -> None:
    tokens, repo = TokenRepository(pool), TaskRepository(pool)
    await tokens.create("heavy", "client", policy=LanePolicy(weight=3))
    await tokens.create("light", "client", policy=LanePolicy(weight=1))
    async with pool.connection() as conn:  # both saturate the lane
        await conn.execute(
            "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
            "SELECT 'p1', '{}', o FROM unnest('{heavy,light}'::text[]) o, generate_series(1, 300)"
        )
    session = uuid.uuid4()

    async def claim_owners(n: int) -> list[str]:
        return [
            (await repo.claim(session, ["p1"], limit=1, lease_s=30))[0].owner_id for _ in range(n)
        ]

    served = await claim_owners(200)
    # 3:1, but for a tie the decay (in database time) may tip either way.
    assert abs(served.count("heavy") - 150) <= 2, served.count("heavy")
    # A newcomer that has used nothing lately goes first, until it has had its share.
    await repo.enqueue(owner_id="idle", pool_name="p1", request_body={})
    await repo.enqueue(owner_id="idle", pool_name="p1", request_body={})
    assert await claim_owners(2) == ["idle", "idle"]


async def test_an_aged_batch_task_goes_before_a_saturated_interactive_lane(pool: Pool) -> None:
    repo = TaskRepository(pool, aging_s=30)
    for _ in range(200):
        await repo.enqueue(owner_id="a", pool_name="p1", request_body={}, lane="interactive")
    old = (await repo.enqueue(owner_id="b", pool_name="p1", request_body={}, lane="batch")).task
    session = uuid.uuid4()
    [first] = await repo.claim(session, ["p1"], limit=1, lease_s=30)
    assert first.lane == "interactive"  # not aged yet: lanes in order
    async with pool.connection() as conn:  # 31 s pass for the batch task
        await conn.execute(
            "UPDATE inferq.task SET created_at = created_at - interval '31 seconds' WHERE id = %s",
            (old.id,),
        )
    [aged] = await repo.claim(session, ["p1"], limit=1, lease_s=30)
    assert aged.id == old.id
    [then] = await repo.claim(session, ["p1"], limit=1, lease_s=30)
    assert then.lane == "interactive"


async def test_a_batch_task_completes_within_the_aging_bound_under_saturation(
    settings: Settings, dsn: str
) -> None:
    aging_s = 2.0
    tokens = await make_tokens(settings, dsn)
    fast = settings.model_copy(update={"aging_s": aging_s})
    async with (
        serve_app(fast, dsn) as server,
        httpx.AsyncClient(base_url=server.url, timeout=60) as http,
    ):
        interactive = {"model": MODEL, "request": CHAT, "lane": "interactive"}

        async def feed() -> None:
            # The interactive lane never runs dry: each completion is replaced by a new task,
            # so a few young ones always wait there.
            r = await http.post("/v1/tasks", json=interactive, headers=auth(tokens.alice))
            assert r.status_code == 201

        for _ in range(5):
            await feed()
        worker = SlowLane(server.url, tokens.worker, after_each=feed)
        worker.until = lambda done: any(o == "bob" for _, o in done)
        r = await http.post(
            "/v1/tasks",
            json={"model": MODEL, "request": CHAT, "lane": "batch"},
            headers=auth(tokens.bob),
        )
        batch_id = r.json()["id"]
        worker.owners[batch_id] = "bob"
        async with running_worker(worker):
            await asyncio.wait_for(worker.reached.wait(), 240)
    with psycopg.connect(dsn) as conn:
        row: Any = conn.execute(
            "SELECT extract(epoch FROM b.claimed_at - b.created_at)::float8, "
            "(SELECT count(*) FROM inferq.task i WHERE i.lane = 'interactive' "
            " AND i.created_at < b.claimed_at "
            " AND (i.claimed_at IS NULL OR i.claimed_at > b.claimed_at)) "
            "FROM inferq.task b WHERE b.id = %s",
            (batch_id,),
        ).fetchone()
    waited_s, interactive_waiting = row
    assert interactive_waiting > 0  # the lane above still had work when it was claimed
    # Not before it aged (the lane above was never empty), and soon after: the claims after
    # that took it (the slack is for a loaded machine, not for the scheduler).
    assert aging_s <= waited_s < aging_s + 10, waited_s
