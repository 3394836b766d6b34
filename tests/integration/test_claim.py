"""The claim: priority then FIFO, each task exactly once, within a session's capacity, and
never waiting on a row another transaction holds (FOR UPDATE SKIP LOCKED)."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest

from inferq.bench.polling import eventually
from inferq.db.pool import Pool
from inferq.db.rows import task_row
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.task_queries import CLAIM
from inferq.db.tasks import TaskRepository
from inferq.domain.task import TaskStatus
from tests.api_helpers import enqueue

pytestmark = pytest.mark.db

# Backends of this test's database that wait for a lock another transaction holds.
LOCK_WAITERS = """
SELECT pid, wait_event, left(ltrim(query), 40) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
"""


async def test_a_claim_skips_a_locked_row_instead_of_waiting_for_it(dsn: str, pool: Pool) -> None:
    repo = TaskRepository(pool)
    first = await enqueue(repo, priority=9)  # the row every claim would take first
    rest = {(await enqueue(repo)).id for _ in range(3)}
    async with (
        await psycopg.AsyncConnection.connect(dsn) as holder,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as watcher,
    ):
        # Another transaction (a claimer mid-statement, an operator in psql) holds `first`.
        await holder.execute("SELECT 1 FROM inferq.task WHERE id = %s FOR UPDATE", (first.id,))
        claim = asyncio.create_task(repo.claim(uuid.uuid4(), ["p1"], limit=10, lease_s=30))
        try:

            async def claim_returned_without_waiting() -> bool:
                waiting = await (await watcher.execute(LOCK_WAITERS)).fetchall()
                assert waiting == [], f"the claim waits for the locked row: {waiting}"
                return claim.done()

            await eventually(claim_returned_without_waiting)
        finally:
            await holder.rollback()  # lets a waiting claim through, so the task can end
            got = await claim
    assert {t.id for t in got} == rest
    # Once the lock is gone, the skipped task is claimable as usual.
    [again] = await repo.claim(uuid.uuid4(), ["p1"], limit=10, lease_s=30)
    assert again.id == first.id and again.status is TaskStatus.CLAIMED


async def test_claim_race_claims_every_task_exactly_once(dsn: str, pool: Pool) -> None:
    repo = TaskRepository(pool)
    ids = {(await enqueue(repo)).id for _ in range(200)}

    async def claimer() -> list[uuid.UUID]:
        session = uuid.uuid4()
        got: list[uuid.UUID] = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                cur = conn.cursor(row_factory=task_row)
                params = {"session": session, "pools": ["p1"], "limit": 3, "lease_s": 30}
                await cur.execute(CLAIM, {**params, "unbound": 3, **repo.scheduling})
                rows = await cur.fetchall()
                if not rows:
                    return got
                got += [t.id for t in rows]

    per_claimer = await asyncio.gather(*[claimer() for _ in range(10)])
    claimed_ids = [i for ids_ in per_claimer for i in ids_]
    assert len(claimed_ids) == len(set(claimed_ids)) == 200
    assert set(claimed_ids) == ids


async def test_claim_takes_priority_then_fifo_and_only_requested_pools(pool: Pool) -> None:
    repo = TaskRepository(pool)
    # Submitted in this order: FIFO alone would claim old_low first.
    old_low = await enqueue(repo)
    other = await enqueue(repo, "p2", priority=9)
    high = await enqueue(repo, priority=5)
    new_low = await enqueue(repo)
    high2 = await enqueue(repo, priority=5)
    session = uuid.uuid4()
    # One task per claim: the order a worker with one free slot gets them in.
    order = []
    for _ in range(5):
        got = await repo.claim(session, ["p1"], limit=1, lease_s=30)
        order.append([t.id for t in got])
    assert order == [[high.id], [high2.id], [old_low.id], [new_low.id], []]
    pending = await repo.find_pending(["p1", "p2"])
    assert [t.id for t in pending] == [other.id]
    held = await repo.held_by(session)
    assert {t.id for t in held} == {high.id, high2.id, old_low.id, new_low.id}
    for t in held:
        assert t.status is TaskStatus.CLAIMED and t.attempt == 1 and t.lease_expires_at


async def test_a_claim_of_fewer_than_pending_takes_the_highest_priority_first(pool: Pool) -> None:
    repo = TaskRepository(pool)
    lows = [await enqueue(repo) for _ in range(3)]
    highs = [await enqueue(repo, priority=1) for _ in range(2)]
    got = await repo.claim(uuid.uuid4(), ["p1"], limit=2, lease_s=30)
    # Which two is the contract; the order of rows inside one claim is not.
    assert {t.id for t in got} == {h.id for h in highs}
    assert [t.id for t in await repo.find_pending(["p1"])] == [t.id for t in lows]


async def test_find_pending_is_the_drain_order(pool: Pool) -> None:
    repo = TaskRepository(pool)
    a = await enqueue(repo)
    b = await enqueue(repo, priority=3)
    c = await enqueue(repo)
    assert [t.id for t in await repo.find_pending(["p1"])] == [b.id, a.id, c.id]


async def test_a_session_never_claims_past_its_capacity(pool: Pool) -> None:
    repo = TaskRepository(pool)
    for _ in range(5):
        await enqueue(repo)
    session = await WorkerSessionRepository(pool).bind("w", ["p1"], 2, ttl_s=30)
    assert len(await repo.claim(session.id, ["p1"], limit=10, lease_s=30)) == 2
    assert await repo.claim(session.id, ["p1"], limit=10, lease_s=30) == []
    [held, _] = await repo.held_by(session.id)
    await repo.complete(held.id, session.id, held.attempt, {})
    assert len(await repo.claim(session.id, ["p1"], limit=10, lease_s=30)) == 1


async def test_a_bound_claim_needs_a_live_session_row(pool: Pool) -> None:
    repo, sessions = TaskRepository(pool), WorkerSessionRepository(pool)
    task = await enqueue(repo)
    assert await repo.claim(uuid.uuid4(), ["p1"], limit=1, lease_s=30, bound=True) == []
    session = await sessions.bind("alice", ["p1"], 1, ttl_s=30)
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE inferq.worker_session SET expires_at = now() - interval '1 s' WHERE id = %s",
            (session.id,),
        )
    # Expired: nothing, bound or not.
    assert await repo.claim(session.id, ["p1"], limit=1, lease_s=30, bound=True) == []
    assert await repo.claim(session.id, ["p1"], limit=1, lease_s=30) == []
    live = await sessions.bind("alice", ["p1"], 1, ttl_s=30)
    [got] = await repo.claim(live.id, ["p1"], limit=5, lease_s=30, bound=True)
    assert got.id == task.id
