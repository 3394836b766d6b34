"""ChunkRelay: one statement per flush for all tasks, LeaseLost, flush on stop, long runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from inferq.bench.polling import eventually
from inferq.db.chunks import MAX_RUN, ChunkRepository
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.domain.task import Task
from inferq.errors import LeaseLost
from inferq.services.relay import ChunkRelay
from inferq.settings import Settings

pytestmark = pytest.mark.db


@pytest.fixture
async def relay(pool: Any, settings: Settings) -> AsyncIterator[ChunkRelay]:
    r = ChunkRelay(
        ChunkRepository(pool),
        TaskRepository(pool),
        settings.model_copy(update={"chunk_flush_ms": 20}),
    )
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
    # Flushes at least ten minutes apart: after the first one, only stop() can flush.
    relay = ChunkRelay(
        ChunkRepository(pool),
        TaskRepository(pool),
        settings.model_copy(update={"chunk_flush_ms": 600_000}),
    )
    sid, (task,) = await held_tasks(pool, 1)
    # An idle relay flushes a post at once.
    assert await relay.post(task.id, sid, task.attempt, [(1, '"x"')]) == 1
    post = asyncio.create_task(relay.post(task.id, sid, task.attempt, [(2, '"y"')]))
    # No event marks a buffered post: poll for it.
    await eventually(lambda: relay.buffered > 0, 10, "a buffered post", period_s=0.001)
    await relay.stop()
    assert await post == 2
    stored = await ChunkRepository(pool).read(task.id, task.attempt)
    assert [c.data for c in stored] == ['"x"', '"y"']
    # After stop, posts are written directly.
    assert await relay.post(task.id, sid, task.attempt, [(3, '"z"')]) == 3


async def test_a_long_post_reads_back_whole_from_any_seq(pool: Any, relay: ChunkRelay) -> None:
    # Stored as several rows of at most MAX_RUN chunks; a reader may start inside any of them.
    sid, (task,) = await held_tasks(pool, 1)
    n = 3 * MAX_RUN + 5
    assert await relay.post(task.id, sid, task.attempt, [(s, str(s)) for s in range(1, n + 1)]) == n
    chunks = ChunkRepository(pool)
    for after in (0, 1, MAX_RUN - 1, MAX_RUN, MAX_RUN + 7, n - 1, n):
        stored = await chunks.read(task.id, task.attempt, after_seq=after)
        assert [(c.seq, c.data) for c in stored] == [(s, str(s)) for s in range(after + 1, n + 1)]
    # A page is a range of seqs.
    page = await chunks.read(task.id, task.attempt, after_seq=10, limit=MAX_RUN)
    assert [c.seq for c in page] == list(range(11, 11 + MAX_RUN))


async def test_a_retried_post_rebatched_differently_reads_once_per_seq(
    pool: Any, relay: ChunkRelay
) -> None:
    sid, (task,) = await held_tasks(pool, 1)
    n = MAX_RUN + 10
    assert await relay.post(task.id, sid, task.attempt, [(s, str(s)) for s in range(1, n + 1)]) == n
    # The worker did not see the answer and retries in other pieces, overlapping the stored rows.
    for first, last in ((5, 20), (MAX_RUN - 2, MAX_RUN + 3), (n - 1, n + 2)):
        posted = await relay.post(
            task.id, sid, task.attempt, [(s, str(s)) for s in range(first, last + 1)]
        )
        assert posted == last
    stored = await ChunkRepository(pool).read(task.id, task.attempt, after_seq=3)
    assert [(c.seq, c.data) for c in stored] == [(s, str(s)) for s in range(4, n + 3)]


async def test_rows_longer_than_max_run_from_an_earlier_version_read_whole(pool: Any) -> None:
    """Earlier versions stored a post as one row however long; such rows outlive an upgrade
    (and old replicas keep writing them during a rolling one). A reader resuming deep inside
    one, or paging through it, still gets every chunk once and in order."""
    _sid, (task,) = await held_tasks(pool, 1)
    rows = [(1, 40), (41, 43), (44, 100)]
    async with pool.connection() as conn:
        for first, last in rows:
            data = orjson.dumps(list(range(first, last + 1))).decode()  # chunk s is JSON `s`
            await conn.execute(
                "INSERT INTO inferq.task_chunk (task_id, attempt, first_seq, last_seq, data)"
                " VALUES (%s, %s, %s, %s, %s)",
                (task.id, task.attempt, first, last, data),
            )
    chunks = ChunkRepository(pool)
    for after in (0, 5, 30, 39, 40, 42, 60, 99):
        stored = await chunks.read(task.id, task.attempt, after_seq=after)
        assert [(c.seq, c.data) for c in stored] == [(s, str(s)) for s in range(after + 1, 101)]
    # Paging through with pages smaller than the rows: every seq once, in order.
    seen: list[int] = []
    while True:
        page = await chunks.read(task.id, task.attempt, after_seq=len(seen), limit=7)
        if not page:
            break
        seen += [c.seq for c in page]
    assert seen == list(range(1, 101))
