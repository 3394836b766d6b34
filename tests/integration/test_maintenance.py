"""Maintenance sweeps with a fixed clock, leadership handover, and the loop runner."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest

from inferq.bench.polling import eventually
from inferq.db.chunks import ChunkIn, ChunkRepository
from inferq.db.leases import LeaseRepository
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.task import Task, TaskStatus
from inferq.errors import TaskNotFound
from inferq.maintenance import Collector, Leadership, Rescuer, SessionReaper, SweepLoop
from inferq.settings import Settings

pytestmark = pytest.mark.db


async def db_now(pool: Any) -> datetime:
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT now()")
        row = await cur.fetchone()
        return row[0]  # type: ignore[no-any-return]


async def claimed(pool: Any, *, max_attempts: int = 3, ttl_s: float = 30) -> tuple[Any, Task]:
    tasks = TaskRepository(pool)
    await tasks.enqueue(owner_id="o", pool_name="p", request_body={}, max_attempts=max_attempts)
    session = await WorkerSessionRepository(pool).bind("o", ["p"], 1, ttl_s=ttl_s)
    (task,) = await tasks.claim(session.id, ["p"], limit=1, lease_s=30)
    return session.id, task


async def test_leadership_passes_to_another_replica_when_the_holder_stops(pool: Any) -> None:
    t0 = await db_now(pool)
    a = Leadership(LeaseRepository(pool), "collector", "replica-a", ttl_s=15)
    b = Leadership(LeaseRepository(pool), "collector", "replica-b", ttl_s=15)
    assert await a.acquire(now=t0)
    assert not await b.acquire(now=t0 + timedelta(seconds=1))
    assert await a.acquire(now=t0 + timedelta(seconds=10))  # renewed until t0 + 25 s
    assert not await b.acquire(now=t0 + timedelta(seconds=20))
    # A stops renewing: once its lease ran out, B takes over and A cannot come back.
    assert await b.acquire(now=t0 + timedelta(seconds=26))
    assert await b.current_holder() == "replica-b"
    assert not await a.acquire(now=t0 + timedelta(seconds=27))
    await b.release()
    assert await a.acquire(now=t0 + timedelta(seconds=28))


async def test_only_the_leader_sweeps(pool: Any, settings: Settings) -> None:
    sweeps = [
        SweepLoop(
            Rescuer(TaskRepository(pool)),
            Leadership(LeaseRepository(pool), "rescuer", name, ttl_s=60),
            1.0,
        )
        for name in ("a", "b")
    ]
    assert [await s.run_round() for s in sweeps] == [True, False]
    assert [s.runs for s in sweeps] == [1, 0]


async def test_rescuer_reverts_an_expired_lease_and_the_next_claim_is_a_new_attempt(
    pool: Any,
) -> None:
    _, task = await claimed(pool)
    assert task.lease_expires_at is not None
    assert (
        await Rescuer(TaskRepository(pool)).run_once(
            now=task.lease_expires_at - timedelta(seconds=1)
        )
        == []
    )
    (reverted,) = await Rescuer(TaskRepository(pool)).run_once(
        now=task.lease_expires_at + timedelta(seconds=1)
    )
    assert reverted.status is TaskStatus.PENDING and reverted.claimed_by is None
    session = await WorkerSessionRepository(pool).bind("o", ["p"], 1, ttl_s=30)
    (again,) = await TaskRepository(pool).claim(session.id, ["p"], limit=1, lease_s=30)
    assert again.id == task.id and again.attempt == task.attempt + 1


async def test_rescuer_fails_a_task_after_max_attempts_with_a_message(pool: Any) -> None:
    _, task = await claimed(pool, max_attempts=1)
    assert task.lease_expires_at is not None
    (failed,) = await Rescuer(TaskRepository(pool)).run_once(
        now=task.lease_expires_at + timedelta(seconds=1)
    )
    assert failed.status is TaskStatus.ERROR
    assert failed.error_message is not None
    assert "max_attempts=1" in failed.error_message and "lease expired" in failed.error_message


async def test_reaper_reverts_the_tasks_of_a_dead_session(pool: Any) -> None:
    _, task = await claimed(pool, ttl_s=30)
    reaper = SessionReaper(WorkerSessionRepository(pool))
    assert await reaper.run_once(now=await db_now(pool)) == []
    (reverted,) = await reaper.run_once(now=await db_now(pool) + timedelta(seconds=60))
    assert reverted.id == task.id and reverted.status is TaskStatus.PENDING
    assert (await TaskRepository(pool).get(task.id)).status is TaskStatus.PENDING


async def test_collector_expires_stale_pending_and_deletes_old_terminal_rows(
    pool: Any, settings: Settings
) -> None:
    tasks = TaskRepository(pool)
    sid, done = await claimed(pool)
    stale = (await tasks.enqueue(owner_id="o", pool_name="p", request_body={})).task
    await ChunkRepository(pool).append([ChunkIn(done.id, sid, done.attempt, 1, "x")])
    finished = await tasks.complete(done.id, sid, done.attempt, {"ok": True})
    assert finished.completed_at is not None
    collector = Collector(TaskRepository(pool), ChunkRepository(pool), settings)

    now = stale.created_at + timedelta(seconds=settings.pending_timeout_s + 1)
    result = await collector.run_once(now=now)
    # Chunks of the finished task are past their (much shorter) retention; its row is not.
    assert (result.expired_pending, result.deleted_chunks) == (1, 1)
    expired = await tasks.get(stale.id)
    assert expired.status is TaskStatus.ERROR
    assert expired.error_message is not None and "pending_timeout" in expired.error_message.lower()
    assert (await tasks.get(done.id)).status is TaskStatus.COMPLETED  # within retention

    later = now + timedelta(seconds=settings.retention_s + 1)
    result = await collector.run_once(now=later)
    assert result.deleted_tasks == 2
    with pytest.raises(TaskNotFound):
        await tasks.get(done.id)


class FlakySweep:
    """Fails its first run, then counts runs."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def run_once(self, now: datetime | None = None) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("database hiccup")


async def test_the_loop_survives_a_failing_sweep(pool: Any) -> None:
    sweep = FlakySweep()
    loop = SweepLoop(
        sweep, Leadership(LeaseRepository(pool), "flaky", "me", ttl_s=60), interval_s=0.01
    )
    runner = asyncio.create_task(loop.run())
    try:
        await eventually(lambda: loop.runs >= 2, 10, "a second run of the loop")
        assert not runner.done()  # the failure did not end the loop
    finally:
        runner.cancel()
    assert loop.failures == 1 and sweep.calls >= 3
