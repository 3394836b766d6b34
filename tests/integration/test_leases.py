"""Leases: a heartbeat keeps a worker's tasks; only what it stops reporting is rescued."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from inferq.db.pool import Pool
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.task import TaskStatus

pytestmark = pytest.mark.db

BODY = {"messages": [{"role": "user", "content": "hi"}]}


async def _db_now(pool: Pool) -> datetime:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


async def test_a_heartbeat_carries_the_reported_tasks_past_their_first_lease(pool: Pool) -> None:
    tasks, sessions = TaskRepository(pool), WorkerSessionRepository(pool)
    session = await sessions.bind("gpu-box", ["p1"], 2, ttl_s=600)
    for _ in range(2):
        await tasks.enqueue(owner_id="alice", pool_name="p1", request_body=BODY)
    reported, forgotten = await tasks.claim(session.id, ["p1"], limit=2, lease_s=30)

    # The worker reports one task only (the other's claim answer never reached it), with a
    # lease of ten minutes.
    beat = await sessions.heartbeat(session.id, [reported.id], ttl_s=600, lease_s=600)
    assert beat.held == {reported.id: reported.attempt}

    # A minute later (database time, well past the 30 s claim lease) the rescuer runs.
    now = await _db_now(pool)
    rescued = await tasks.revert_expired(now=now + timedelta(seconds=60))

    assert [t.id for t in rescued] == [forgotten.id]
    kept = await tasks.get(reported.id)
    assert kept.status is TaskStatus.CLAIMED
    assert kept.claimed_by == session.id and kept.attempt == reported.attempt
    assert kept.lease_expires_at is not None
    assert kept.lease_expires_at > now + timedelta(seconds=300)


async def test_a_heartbeat_racing_the_workers_own_outcome_does_not_call_the_task_lost(
    pool: Pool,
) -> None:
    """A worker reports the tasks it holds while their outcomes are in flight: a task its own
    session just completed or failed is neither held nor lost (the worker would drop a task it
    finished, and never log it done); one another session finished, or that is gone, is lost."""
    tasks, sessions = TaskRepository(pool), WorkerSessionRepository(pool)
    mine = await sessions.bind("gpu-box", ["p1"], 4, ttl_s=600)
    other = await sessions.bind("gpu-box-2", ["p1"], 4, ttl_s=600)
    for _ in range(3):
        await tasks.enqueue(owner_id="alice", pool_name="p1", request_body=BODY)
    done, failed, taken = await tasks.claim(mine.id, ["p1"], limit=3, lease_s=30)
    await tasks.complete(done.id, mine.id, done.attempt, {"text": "ok"})
    await tasks.fail(failed.id, mine.id, failed.attempt, "CUDA out of memory")
    # `taken` went back to the queue (its lease lapsed) and another session finished it.
    now = await _db_now(pool)
    await tasks.revert_expired(now=now + timedelta(seconds=60))
    [again] = await tasks.claim(other.id, ["p1"], limit=1, lease_s=30)
    assert again.id == taken.id
    await tasks.complete(taken.id, other.id, again.attempt, {"text": "theirs"})

    beat = await sessions.heartbeat(mine.id, [done.id, failed.id, taken.id], ttl_s=600, lease_s=600)
    assert beat.held == {}
    assert beat.lost == [taken.id]
    assert beat.cancelled == []
