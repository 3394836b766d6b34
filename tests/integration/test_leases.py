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
