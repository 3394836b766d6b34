"""WaitService and the relay against a real PostgreSQL: transitions, waits, event streams,
two replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from uuid import UUID

import pytest

from inferq.bench.polling import eventually
from inferq.bench.wakeups import Stack
from inferq.db.sessions import WorkerSessionRepository
from inferq.domain.task import Task, TaskStatus
from inferq.errors import (
    InvalidTransition,
    LeaseLost,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    WaitTimeout,
)
from inferq.services.waits import ChunkEvent, Event, ResetEvent, StatusEvent
from inferq.settings import Settings

pytestmark = pytest.mark.db

OWNER = "alice"
POOL = "gpu"


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    s = await Stack.open(settings)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def make_stack(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Stack]]]:
    opened: list[Stack] = []

    async def make(**overrides: Any) -> Stack:
        s = await Stack.open(settings.model_copy(update=overrides))
        opened.append(s)
        return s

    yield make
    for s in opened:
        await s.close()


async def submit(stack: Stack, **kw: Any) -> Task:
    result = await stack.tasks.enqueue(
        owner_id=OWNER, pool_name=POOL, request_body={"prompt": "hi"}, **kw
    )
    return result.task


async def claim_one(stack: Stack, task_id: UUID | None = None) -> tuple[UUID, Task]:
    """Bind a worker session and claim one task (the given one when it is the only pending)."""
    session = await WorkerSessionRepository(stack.pool).bind(OWNER, [POOL], 1, ttl_s=30)
    claimed = await stack.tasks.claim(session.id, [POOL], limit=1, lease_s=30)
    assert len(claimed) == 1
    if task_id is not None:
        assert claimed[0].id == task_id
    return session.id, claimed[0]


async def collect(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


def chunks_of(events: list[Event]) -> list[tuple[int, int, str]]:
    return [(e.attempt, e.seq, e.data) for e in events if isinstance(e, ChunkEvent)]


# -- the seed's service checks ----------------------------------------------------------------


async def test_enqueue_creates_a_pending_task(stack: Stack) -> None:
    task = await submit(stack, priority=3)
    fetched = await stack.tasks.get(task.id, OWNER)
    assert fetched.status is TaskStatus.PENDING
    assert (fetched.pool_name, fetched.priority, fetched.attempt) == (POOL, 3, 0)


async def test_racing_claimers_never_take_the_same_task(stack: Stack) -> None:
    ids = {(await submit(stack)).id for _ in range(20)}
    sessions = WorkerSessionRepository(stack.pool)
    workers = [await sessions.bind(OWNER, [POOL], 5, ttl_s=30) for _ in range(8)]
    results = await asyncio.gather(
        *(stack.tasks.claim(w.id, [POOL], limit=5, lease_s=30) for w in workers)
    )
    claimed = [t.id for batch in results for t in batch]
    assert len(claimed) == len(set(claimed)) == 20
    assert set(claimed) == ids


async def test_complete_fail_and_cancel_end_tasks(stack: Stack) -> None:
    tasks = stack.tasks
    a, b, c = [await submit(stack) for _ in range(3)]
    sid, ta = await claim_one(stack, a.id)
    done = await tasks.complete(a.id, sid, ta.attempt, {"text": "ok"})
    sid, tb = await claim_one(stack, b.id)
    failed = await tasks.fail(b.id, sid, tb.attempt, "CUDA out of memory")
    cancelled = await tasks.cancel(c.id, OWNER)
    assert (done.status, done.response_body) == (TaskStatus.COMPLETED, {"text": "ok"})
    assert (failed.status, failed.error_message) == (TaskStatus.ERROR, "CUDA out of memory")
    assert cancelled.status is TaskStatus.CANCELLED


async def test_terminal_transitions_are_idempotent(stack: Stack) -> None:
    tasks = stack.tasks
    task = await submit(stack)
    sid, held = await claim_one(stack, task.id)
    first = await tasks.complete(task.id, sid, held.attempt, {"text": "ok"})
    again = await tasks.complete(task.id, sid, held.attempt, {"text": "ok"})
    assert again == first
    with pytest.raises(InvalidTransition):
        await tasks.complete(task.id, sid, held.attempt, {"text": "different"})
    with pytest.raises(InvalidTransition):
        await tasks.cancel(task.id, OWNER)
    other = await submit(stack)
    assert (await tasks.cancel(other.id, OWNER)) == (await tasks.cancel(other.id, OWNER))


async def test_disconnect_reverts_the_sessions_tasks(stack: Stack) -> None:
    task = await submit(stack)
    sid, held = await claim_one(stack, task.id)
    reverted = await stack.tasks.revert_session(sid)
    assert [t.status for t in reverted] == [TaskStatus.PENDING]
    with pytest.raises(LeaseLost):
        await stack.tasks.complete(task.id, sid, held.attempt, {})
    _, again = await claim_one(stack, task.id)
    assert again.attempt == held.attempt + 1


# -- wait_for ---------------------------------------------------------------------------------


async def test_wait_for_a_terminal_task_returns_at_once(stack: Stack) -> None:
    task = await submit(stack)
    sid, held = await claim_one(stack, task.id)
    await stack.tasks.complete(task.id, sid, held.attempt, {"text": "ok"})
    got = await asyncio.wait_for(stack.waits.wait_for(task.id, 3600), 5)
    assert got.response_body == {"text": "ok"}


async def test_wait_for_wakes_on_completion(stack: Stack) -> None:
    task = await submit(stack)
    waiting = asyncio.create_task(stack.waits.wait_for(task.id, 60, owner_id=OWNER))
    await eventually(lambda: stack.hub.waiter_count == 1)
    sid, held = await claim_one(stack, task.id)
    await stack.tasks.complete(task.id, sid, held.attempt, {"text": "done"})
    got = await asyncio.wait_for(waiting, 5)
    assert got.status is TaskStatus.COMPLETED
    assert got.response_body == {"text": "done"}


async def test_wait_for_raises_on_cancel(stack: Stack) -> None:
    task = await submit(stack)
    waiting = asyncio.create_task(stack.waits.wait_for(task.id, 60))
    await eventually(lambda: stack.hub.waiter_count == 1)
    await stack.tasks.cancel(task.id, OWNER, reason="user pressed stop")
    with pytest.raises(TaskCancelled, match="user pressed stop"):
        await asyncio.wait_for(waiting, 5)


async def test_wait_for_raises_the_workers_message(stack: Stack) -> None:
    task = await submit(stack)
    waiting = asyncio.create_task(stack.waits.wait_for(task.id, 60))
    await eventually(lambda: stack.hub.waiter_count == 1)
    sid, held = await claim_one(stack, task.id)
    await stack.tasks.fail(task.id, sid, held.attempt, "model exploded")
    with pytest.raises(TaskFailed, match="model exploded") as exc:
        await asyncio.wait_for(waiting, 5)
    assert exc.value.task is not None and exc.value.task.id == task.id


async def test_wait_for_times_out_with_the_current_state(stack: Stack) -> None:
    task = await submit(stack)
    with pytest.raises(WaitTimeout) as exc:
        await stack.waits.wait_for(task.id, 0.05)
    assert exc.value.task is not None and exc.value.task.status is TaskStatus.PENDING
    current = await stack.waits.wait_terminal(task.id, 0.05)
    assert current.status is TaskStatus.PENDING
    assert stack.hub.waiter_count == 0


async def test_waits_on_another_owners_task_are_not_found(stack: Stack) -> None:
    task = await submit(stack)
    with pytest.raises(TaskNotFound):
        await stack.waits.wait_for(task.id, 1, owner_id="mallory")
    with pytest.raises(TaskNotFound):
        await anext(aiter(stack.waits.events(task.id, owner_id="mallory")))


# -- events -----------------------------------------------------------------------------------


async def test_events_stream_chunks_in_order_then_the_result(stack: Stack) -> None:
    task = await submit(stack, streaming=True)
    reader = asyncio.create_task(collect(stack.waits.events(task.id, owner_id=OWNER)))
    await eventually(lambda: stack.hub.waiter_count == 1)
    sid, held = await claim_one(stack, task.id)
    await stack.tasks.start(task.id, sid, held.attempt)
    for seq in range(1, 31, 3):
        batch = [(s, f'{{"t":{s}}}') for s in range(seq, seq + 3)]
        assert await stack.relay.post(task.id, sid, held.attempt, batch) == seq + 2
    await stack.tasks.complete(task.id, sid, held.attempt, {"text": "all"})
    events = await asyncio.wait_for(reader, 10)
    assert chunks_of(events) == [(1, s, f'{{"t":{s}}}') for s in range(1, 31)]
    assert isinstance(events[0], StatusEvent) and events[0].task.status is TaskStatus.PENDING
    last = events[-1]
    assert isinstance(last, StatusEvent) and last.task.status is TaskStatus.COMPLETED
    assert sum(isinstance(e, StatusEvent) and e.task.terminal for e in events) == 1


async def test_events_resume_after_a_seq_for_a_finished_task(stack: Stack) -> None:
    task = await submit(stack, streaming=True)
    sid, held = await claim_one(stack, task.id)
    await stack.relay.post(task.id, sid, held.attempt, [(s, str(s)) for s in range(1, 11)])
    await stack.tasks.complete(task.id, sid, held.attempt, {})
    events = await collect(stack.waits.events(task.id, after=(held.attempt, 7)))
    assert [c[1] for c in chunks_of(events)] == [8, 9, 10]
    assert isinstance(events[-1], StatusEvent) and events[-1].task.terminal


async def test_chunks_of_a_lost_lease_are_refused(stack: Stack) -> None:
    task = await submit(stack)
    sid, held = await claim_one(stack, task.id)
    with pytest.raises(LeaseLost):
        await stack.relay.post(task.id, sid, held.attempt + 1, [(1, "{}")])


async def test_reader_sees_a_reset_when_the_task_is_reverted_and_reclaimed(stack: Stack) -> None:
    task = await submit(stack, streaming=True)
    events: list[Event] = []
    seen = asyncio.Event()

    async def read() -> None:
        async for event in stack.waits.events(task.id):
            events.append(event)
            if isinstance(event, ChunkEvent) and event.seq == 2:
                seen.set()

    reader = asyncio.create_task(read())
    sid, first = await claim_one(stack, task.id)
    await stack.relay.post(task.id, sid, first.attempt, [(1, '"a1"'), (2, '"a2"')])
    await asyncio.wait_for(seen.wait(), 10)
    await stack.tasks.revert_session(sid, "worker lost")
    sid2, second = await claim_one(stack, task.id)
    await stack.relay.post(task.id, sid2, second.attempt, [(1, '"b1"')])
    await stack.tasks.complete(task.id, sid2, second.attempt, {"text": "b"})
    await asyncio.wait_for(reader, 10)
    resets = [i for i, e in enumerate(events) if isinstance(e, ResetEvent)]
    assert len(resets) == 1
    reset = events[resets[0]]
    assert isinstance(reset, ResetEvent) and reset.attempt == second.attempt
    before, after = events[: resets[0]], events[resets[0] :]
    assert chunks_of(before) == [(first.attempt, 1, '"a1"'), (first.attempt, 2, '"a2"')]
    assert chunks_of(after) == [(second.attempt, 1, '"b1"')]


# -- across replicas --------------------------------------------------------------------------


async def test_completion_through_b_wakes_a_waiter_on_a(
    make_stack: Callable[..., Awaitable[Stack]],
) -> None:
    # A long safety poll: only the notification can wake the waiter in time.
    a = await make_stack(safety_poll_s=3600)
    b = await make_stack(safety_poll_s=3600)
    task = await submit(b)
    waiting = asyncio.create_task(a.waits.wait_for(task.id, 60))
    await eventually(lambda: a.hub.waiter_count == 1)
    sid, held = await claim_one(b, task.id)
    await b.tasks.complete(task.id, sid, held.attempt, {"text": "from b"})
    got = await asyncio.wait_for(waiting, 10)
    assert got.response_body == {"text": "from b"}
    assert a.listener.stats.notifications >= 1


async def test_chunks_posted_alternately_through_two_replicas_reach_a_third_in_order(
    make_stack: Callable[..., Awaitable[Stack]],
) -> None:
    a, b, c = [await make_stack(safety_poll_s=3600) for _ in range(3)]
    task = await submit(a, streaming=True)
    reader = asyncio.create_task(collect(c.waits.events(task.id)))
    await eventually(lambda: c.hub.waiter_count == 1)
    sid, held = await claim_one(a, task.id)
    # Posts alternate between A and B without waiting for each other, so flushes race.
    posts = []
    for seq in range(1, 101):
        via = a if seq % 2 else b
        posts.append(via.relay.post(task.id, sid, held.attempt, [(seq, str(seq))]))
        if seq % 10 == 0:
            await asyncio.gather(*posts)
            posts = []
    await a.tasks.complete(task.id, sid, held.attempt, {"n": 100})
    events = await asyncio.wait_for(reader, 20)
    assert chunks_of(events) == [(held.attempt, s, str(s)) for s in range(1, 101)]
    assert isinstance(events[-1], StatusEvent) and events[-1].task.status is TaskStatus.COMPLETED


async def test_a_reader_holds_a_chunk_back_until_the_gap_before_it_is_filled(
    make_stack: Callable[..., Awaitable[Stack]],
) -> None:
    # Chunk 3 is stored (its replica flushed first) while chunk 2 is still in flight on
    # another replica: a reader that starts now must deliver 1, stop, and go on with 2, 3.
    a, b = [await make_stack(safety_poll_s=3600) for _ in range(2)]
    task = await submit(a, streaming=True)
    sid, held = await claim_one(a, task.id)
    assert await a.relay.post(task.id, sid, held.attempt, [(1, '"one"')]) == 1
    await b.relay.post(task.id, sid, held.attempt, [(3, '"three"')])
    reader = aiter(a.waits.events(task.id))
    first = await anext(reader)
    assert isinstance(first, StatusEvent) and first.task.status is TaskStatus.CLAIMED
    assert chunks_of([await anext(reader)]) == [(held.attempt, 1, '"one"')]
    # Only now does chunk 2 land; the reader, parked on the gap, must pick it up in order.
    await b.relay.post(task.id, sid, held.attempt, [(2, '"two"')])
    await a.tasks.complete(task.id, sid, held.attempt, {"text": "one two three"})
    rest = await asyncio.wait_for(collect(reader), 10)
    assert chunks_of(rest) == [(held.attempt, 2, '"two"'), (held.attempt, 3, '"three"')]
    assert isinstance(rest[-1], StatusEvent) and rest[-1].task.status is TaskStatus.COMPLETED


async def test_poll_only_mode_resolves_waiters_without_listen(
    make_stack: Callable[..., Awaitable[Stack]], dsn: str
) -> None:
    import psycopg

    a = await make_stack(poll_only=True, safety_poll_s=0.05)
    task = await submit(a)
    waiting = asyncio.create_task(a.waits.wait_for(task.id, 30))
    await eventually(lambda: a.hub.waiter_count == 1)
    sid, held = await claim_one(a, task.id)
    await a.tasks.complete(task.id, sid, held.attempt, {"text": "polled"})
    assert (await asyncio.wait_for(waiting, 10)).response_body == {"text": "polled"}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND query ILIKE 'LISTEN%%'"
        )
        assert await cur.fetchone() == (0,)
    assert a.listener.healthy and a.listener.stats.notifications == 0


async def test_new_work_wakes_a_claim_long_poll_on_another_replica(
    make_stack: Callable[..., Awaitable[Stack]],
) -> None:
    a = await make_stack(safety_poll_s=3600)
    b = await make_stack(safety_poll_s=3600)
    async with a.waits.pool_waiter([POOL, "other"]) as waiter:
        woken = asyncio.create_task(waiter.wait(60))
        await submit(b)
        assert await asyncio.wait_for(woken, 10) is True
        assert await waiter.wait(0.01) is False  # nothing new since
    assert a.hub.waiter_count == 0
