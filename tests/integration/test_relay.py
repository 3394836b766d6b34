"""ChunkRelay: one transaction per flush window for all tasks, LeaseLost, flush on stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from inferq.db.chunks import ChunkRepository
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.task import Task
from inferq.errors import LeaseLost
from inferq.relay import ChunkRelay
from inferq.settings import Settings

pytestmark = pytest.mark.db


@pytest.fixture
async def relay(pool: Any, settings: Settings) -> AsyncIterator[ChunkRelay]:
    r = ChunkRelay(pool, settings.model_copy(update={"chunk_flush_ms": 20}))
    yield r
    await r.stop()


async def held_tasks(pool: Any, n: int) -> tuple[Any, list[Task]]:
    tasks = TaskRepository(pool)
    for _ in range(n):
        await tasks.enqueue(owner_id="o", pool_name="p", request_body={})
    session = await WorkerSessionRepository(pool).bind("o", ["p"], n, ttl_s=30)
    return session.id, await tasks.claim(session.id, ["p"], limit=n, lease_s=30)


async def test_posts_of_many_tasks_share_one_flush(pool: Any, relay: ChunkRelay) -> None:
    sid, tasks = await held_tasks(pool, 5)
    posts = [
        relay.post(t.id, sid, t.attempt, [(seq, f'"{t.id}-{seq}"') for seq in (1, 2, 3)])
        for t in tasks
    ]
    assert await asyncio.gather(*posts) == [3] * 5
    assert relay.flushes == 1 and relay.chunks_stored == 15
    stored = await ChunkRepository(pool).read(tasks[0].id, tasks[0].attempt)
    assert [c.seq for c in stored] == [1, 2, 3]


async def test_a_stale_attempt_gets_lease_lost_and_others_still_land(
    pool: Any, relay: ChunkRelay
) -> None:
    sid, (good, stale) = await held_tasks(pool, 2)
    ok = relay.post(good.id, sid, good.attempt, [(1, "1")])
    bad = relay.post(stale.id, sid, stale.attempt + 1, [(1, "1")])
    results = await asyncio.gather(ok, bad, return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], LeaseLost)
    assert results[1].task is not None and results[1].task.id == stale.id


async def test_a_repeated_post_is_harmless(pool: Any, relay: ChunkRelay) -> None:
    sid, (task,) = await held_tasks(pool, 1)
    assert await relay.post(task.id, sid, task.attempt, [(1, '"a"'), (2, '"b"')]) == 2
    assert await relay.post(task.id, sid, task.attempt, [(1, '"a"'), (2, '"b"')]) == 2
    stored = await ChunkRepository(pool).read(task.id, task.attempt)
    assert [(c.seq, c.data) for c in stored] == [(1, '"a"'), (2, '"b"')]


async def test_stop_flushes_what_is_buffered(pool: Any, settings: Settings) -> None:
    # A window far longer than the test: only stop() can flush it.
    relay = ChunkRelay(pool, settings.model_copy(update={"chunk_flush_ms": 600_000}))
    sid, (task,) = await held_tasks(pool, 1)
    post = asyncio.create_task(relay.post(task.id, sid, task.attempt, [(1, '"x"')]))
    async with asyncio.timeout(10):
        while relay.buffered == 0:  # noqa: ASYNC110 (no event marks a buffered post)
            await asyncio.sleep(0.001)
    await relay.stop()
    assert await post == 1
    assert [c.data for c in await ChunkRepository(pool).read(task.id, task.attempt)] == ['"x"']
    # After stop, posts are written directly.
    assert await relay.post(task.id, sid, task.attempt, [(2, '"y"')]) == 2
