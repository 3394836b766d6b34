"""TaskRepository: guarded transitions, fencing, listings and GC (the claim: test_claim.py)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inferq.db.chunks import ChunkIn, ChunkRepository
from inferq.db.pool import Pool
from inferq.db.tasks import TaskRepository
from inferq.domain.task import TaskStatus
from inferq.errors import (
    IdempotencyConflict,
    InvalidTransition,
    InvalidValue,
    LeaseLost,
    TaskNotFound,
)
from tests.api_helpers import BODY, enqueue

pytestmark = pytest.mark.db


async def claimed(repo: TaskRepository, **kw: Any) -> tuple[Any, uuid.UUID]:
    task = await enqueue(repo, **kw)
    session = uuid.uuid4()
    [got] = await repo.claim(session, [task.pool_name], limit=1, lease_s=30)
    assert got.id == task.id
    return got, session


async def test_enqueue_with_the_same_idempotency_key_returns_the_first_task(pool: Pool) -> None:
    repo = TaskRepository(pool)
    first = await repo.enqueue(
        owner_id="alice", pool_name="p1", request_body=BODY, idempotency_key="k"
    )
    again = await repo.enqueue(
        owner_id="alice", pool_name="p1", request_body=BODY, idempotency_key="k"
    )
    other_owner = await repo.enqueue(
        owner_id="bob", pool_name="p1", request_body=BODY, idempotency_key="k"
    )
    assert first.created and not again.created and other_owner.created
    assert again.task.id == first.task.id != other_owner.task.id
    with pytest.raises(IdempotencyConflict):
        await repo.enqueue(
            owner_id="alice", pool_name="p1", request_body={"other": 1}, idempotency_key="k"
        )


async def test_concurrent_submits_with_one_key_create_one_task(pool: Pool) -> None:
    repo = TaskRepository(pool)
    results = await asyncio.gather(
        *[
            repo.enqueue(
                owner_id="alice", pool_name="p1", request_body=BODY, idempotency_key="race"
            )
            for _ in range(10)
        ]
    )
    assert len({r.task.id for r in results}) == 1
    assert sum(r.created for r in results) == 1


async def test_full_lifecycle_and_idempotent_complete(pool: Pool) -> None:
    repo = TaskRepository(pool)
    task, session = await claimed(repo)
    running = await repo.start(task.id, session, task.attempt)
    assert running.status is TaskStatus.RUNNING and running.stream_started_at
    assert (await repo.start(task.id, session, task.attempt)).status is TaskStatus.RUNNING
    done = await repo.complete(task.id, session, task.attempt, {"text": "ok"})
    assert (
        done.status is TaskStatus.COMPLETED
        and done.completed_at
        and done.response_body == {"text": "ok"}
    )
    again = await repo.complete(task.id, session, task.attempt, {"text": "ok"})
    assert again == done
    with pytest.raises(InvalidTransition) as exc:
        await repo.complete(task.id, session, task.attempt, {"text": "different"})
    assert exc.value.task is not None and exc.value.task.status is TaskStatus.COMPLETED
    with pytest.raises(InvalidTransition):
        await repo.fail(task.id, session, task.attempt, "late")


async def test_fail_is_idempotent_with_the_same_message(pool: Pool) -> None:
    repo = TaskRepository(pool)
    task, session = await claimed(repo)
    failed = await repo.fail(task.id, session, task.attempt, "CUDA out of memory")
    assert failed.status is TaskStatus.ERROR and failed.error_message == "CUDA out of memory"
    assert await repo.fail(task.id, session, task.attempt, "CUDA out of memory") == failed


async def test_stale_attempt_is_rejected_for_complete_fail_and_chunks(pool: Pool) -> None:
    repo, chunks = TaskRepository(pool), ChunkRepository(pool)
    task, old_session = await claimed(repo)
    await repo.revert_session(old_session, graceful=False)
    new_session = uuid.uuid4()
    [again] = await repo.claim(new_session, ["p1"], limit=1, lease_s=30)
    assert again.attempt == task.attempt + 1
    with pytest.raises(LeaseLost) as exc:
        await repo.complete(task.id, old_session, task.attempt, {"late": True})
    assert exc.value.task is not None and exc.value.task.attempt == again.attempt
    with pytest.raises(LeaseLost):
        await repo.fail(task.id, old_session, task.attempt, "late")
    # The same session with an old attempt number is stale too.
    with pytest.raises(LeaseLost):
        await repo.complete(task.id, new_session, task.attempt, {"late": True})
    # A stale post and a live one of the same task in one flush: each gets its own answer.
    result = await chunks.append(
        [
            ChunkIn(task.id, old_session, task.attempt, 1, '"stale"'),
            ChunkIn(task.id, new_session, again.attempt, 1, '"live"'),
        ]
    )
    assert result.last_seq == {(task.id, again.attempt): 1}
    assert result.rejected == {(task.id, task.attempt)}
    assert await chunks.read(task.id, task.attempt) == []
    current = await repo.get(task.id)
    assert current.status is TaskStatus.CLAIMED and current.claimed_by == new_session


async def test_chunks_of_the_holder_are_stored_once_in_order(pool: Pool) -> None:
    repo, chunks = TaskRepository(pool), ChunkRepository(pool)
    task, session = await claimed(repo)
    batch = [ChunkIn(task.id, session, task.attempt, s, f'{{"n":{s}}}') for s in (1, 2, 3)]
    key = (task.id, task.attempt)
    assert (await chunks.append(batch)).last_seq == {key: 3}
    assert (await chunks.append(batch[1:])).last_seq == {key: 3}  # a retried post
    assert [c.seq for c in await chunks.read(task.id, task.attempt)] == [1, 2, 3]
    assert [c.data for c in await chunks.read(task.id, task.attempt, after_seq=2)] == ['{"n":3}']


async def test_cancel_pending_and_running_tasks_idempotently(pool: Pool) -> None:
    repo = TaskRepository(pool)
    pending = await enqueue(repo)
    cancelled = await repo.cancel(pending.id, "alice")
    assert cancelled.status is TaskStatus.CANCELLED
    assert (await repo.cancel(pending.id, "alice")).status is TaskStatus.CANCELLED
    task, session = await claimed(repo)
    await repo.start(task.id, session, task.attempt)
    assert (await repo.cancel(task.id, "alice")).status is TaskStatus.CANCELLED
    with pytest.raises(InvalidTransition):
        await repo.complete(task.id, session, task.attempt, {"late": True})
    done, s2 = await claimed(repo)
    await repo.complete(done.id, s2, done.attempt, {})
    with pytest.raises(InvalidTransition):
        await repo.cancel(done.id, "alice")


async def test_another_owner_sees_nothing(pool: Pool) -> None:
    repo = TaskRepository(pool)
    task = await enqueue(repo)
    with pytest.raises(TaskNotFound):
        await repo.get(task.id, "mallory")
    with pytest.raises(TaskNotFound):
        await repo.cancel(task.id, "mallory")
    assert (await repo.list_tasks("mallory")).tasks == []
    assert (await repo.get(task.id)).status is TaskStatus.PENDING


async def test_list_filters_and_cursor_pagination(pool: Pool) -> None:
    repo = TaskRepository(pool)
    made = [await enqueue(repo, agent_id="a1" if i % 2 else None) for i in range(7)]
    other = await enqueue(repo, "p2")
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page = await repo.list_tasks("alice", pool_name="p1", limit=3, cursor=cursor)
        seen += [t.id for t in page.tasks]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [t.id for t in reversed(made)]
    agent = await repo.list_tasks("alice", agent_id="a1")
    assert {t.id for t in agent.tasks} == {t.id for t in made[1::2]}
    by_status = await repo.list_tasks("alice", statuses=[TaskStatus.PENDING], pool_name="p2")
    assert [t.id for t in by_status.tasks] == [other.id]
    with pytest.raises(ValueError):
        await repo.list_tasks("alice", cursor="not-a-cursor")


async def test_revert_session_gives_back_held_tasks(pool: Pool) -> None:
    repo = TaskRepository(pool)
    t1, session = await claimed(repo)
    t2 = await enqueue(repo)
    await repo.claim(session, ["p1"], limit=1, lease_s=30)
    await repo.start(t1.id, session, t1.attempt)
    untouched, other = await claimed(repo)
    reverted = await repo.revert_session(session)
    assert {t.id for t in reverted} == {t1.id, t2.id}
    for t in reverted:
        assert t.status is TaskStatus.PENDING and t.claimed_by is None
    assert (await repo.get(untouched.id)).claimed_by == other
    assert await repo.held_by(session) == []


async def test_revert_expired_uses_the_clock_and_ends_in_error_after_max_attempts(
    pool: Pool,
) -> None:
    repo = TaskRepository(pool)
    await claimed(repo, max_attempts=2)
    assert await repo.revert_expired(now=datetime.now(UTC)) == []
    later = datetime.now(UTC) + timedelta(minutes=5)
    [back] = await repo.revert_expired(now=later)
    assert back.status is TaskStatus.PENDING
    [second] = await repo.claim(uuid.uuid4(), ["p1"], limit=1, lease_s=30)
    assert second.attempt == 2
    [dead] = await repo.revert_expired(now=later)
    assert dead.status is TaskStatus.ERROR
    assert dead.error_message is not None
    assert "worker was lost 2 times (max_attempts=2)" in dead.error_message


async def test_a_graceful_release_does_not_use_up_an_attempt(pool: Pool) -> None:
    repo = TaskRepository(pool)
    task, session = await claimed(repo, max_attempts=1)
    released = await repo.release(task.id, session, task.attempt)
    assert released.status is TaskStatus.PENDING and released.releases == 1
    [again] = await repo.claim(uuid.uuid4(), ["p1"], limit=1, lease_s=30)
    assert again.attempt == 2
    [lost] = await repo.revert_expired(now=datetime.now(UTC) + timedelta(minutes=5))
    assert lost.status is TaskStatus.ERROR
    assert lost.error_message is not None
    assert "the worker was lost 1 times (max_attempts=1)" in lost.error_message


async def test_gc_with_a_fixed_clock(pool: Pool) -> None:
    repo = TaskRepository(pool)
    stale = await enqueue(repo)
    done, session = await claimed(repo, pool_name="p2")
    await repo.complete(done.id, session, done.attempt, {})
    now = datetime.now(UTC)
    nothing = await repo.gc(pending_timeout_s=3600, retention_s=7 * 86400, now=now)
    assert nothing.expired_pending == [] and nothing.deleted == 0

    result = await repo.gc(
        pending_timeout_s=3600, retention_s=7 * 86400, now=now + timedelta(hours=2)
    )
    [expired] = result.expired_pending
    assert expired.id == stale.id and expired.status is TaskStatus.ERROR
    assert expired.error_message is not None and "3600" in expired.error_message
    assert "p1" in expired.error_message
    assert result.deleted == 0

    fresh = await enqueue(repo)
    result = await repo.gc(
        pending_timeout_s=3600, retention_s=7 * 86400, now=now + timedelta(days=8)
    )
    assert result.deleted == 2  # the completed task and the expired one
    assert {t.id for t in result.expired_pending} == {fresh.id}
    with pytest.raises(TaskNotFound):
        await repo.get(done.id)


async def test_the_benchmarks_batched_enqueue_start_and_complete(pool: Pool) -> None:
    from inferq.bench.queries import BenchTasks, NewTask

    repo, bench = TaskRepository(pool), BenchTasks(pool)
    made = await bench.enqueue_many(
        [NewTask("alice", "p1", {"n": i}, agent_id=None if i % 2 else "a") for i in range(20)]
    )
    assert len(made) == 20 and {t.status for t in made} == {TaskStatus.PENDING}
    session = uuid.uuid4()
    got = await repo.claim(session, ["p1"], limit=20, lease_s=30)
    assert [t.request_body["n"] for t in got] == list(range(20))  # FIFO
    stale = got[0]
    started = await bench.start_many([(t.id, session, t.attempt) for t in got[1:]])
    assert len(started) == 19 and {t.status for t in started} == {TaskStatus.RUNNING}
    results = [(t.id, session, t.attempt, {"echo": t.request_body}) for t in got]
    results[0] = (stale.id, session, stale.attempt + 7, {"stale": True})  # a wrong attempt
    done = await bench.complete_many(results)
    assert {t.id for t in done} == {t.id for t in got[1:]}
    assert all(t.response_body == {"echo": t.request_body} for t in done)
    assert (await repo.get(stale.id)).status is TaskStatus.CLAIMED


async def test_chunk_runs_survive_any_rebatching_of_a_retried_post(pool: Pool) -> None:
    repo, chunks = TaskRepository(pool), ChunkRepository(pool)
    task, session = await claimed(repo)

    def run(*seqs: int) -> list[ChunkIn]:
        return [ChunkIn(task.id, session, task.attempt, s, f'{{"n": {s}}}') for s in seqs]

    await chunks.append(run(1, 2))
    await chunks.append(run(1, 2, 3))  # the retry of a post that grew meanwhile
    await chunks.append(run(3, 4, 6))  # overlaps, and a gap before 6
    stored = await chunks.read(task.id, task.attempt)
    assert [c.seq for c in stored] == [1, 2, 3, 4, 6]
    assert [c.data for c in stored][:2] == ['{"n": 1}', '{"n": 2}']
    assert [c.seq for c in await chunks.read(task.id, task.attempt, after_seq=3)] == [4, 6]


async def test_heartbeat_reports_cancelled_only_for_the_sessions_own_tasks(pool: Pool) -> None:
    from inferq.db.sessions import WorkerSessionRepository

    repo, sessions = TaskRepository(pool), WorkerSessionRepository(pool)
    mine = await sessions.bind("w", ["p1"], 5, ttl_s=30)
    other = await sessions.bind("w", ["p1"], 5, ttl_s=30)
    a = await enqueue(repo)
    [held] = await repo.claim(mine.id, ["p1"], limit=1, lease_s=30)
    await enqueue(repo)
    [foreign] = await repo.claim(other.id, ["p1"], limit=1, lease_s=30)
    await repo.cancel(a.id, "alice")
    await repo.cancel(foreign.id, "alice")
    beat = await sessions.heartbeat(mine.id, [held.id, foreign.id], ttl_s=30, lease_s=30)
    assert beat.cancelled == [held.id]
    assert beat.lost == [foreign.id]


async def test_finish_many_answers_each_outcome_like_complete_or_fail_alone(pool: Pool) -> None:
    from inferq.domain.records import Finished, Outcome

    repo = TaskRepository(pool)
    for _ in range(5):
        await enqueue(repo)
    session = uuid.uuid4()
    a, b, c, d, e = await repo.claim(session, ["p1"], limit=5, lease_s=30)
    await repo.start(b.id, session, b.attempt)
    await repo.complete(d.id, session, d.attempt, {"first": True})
    results = await repo.finish_many(
        session,
        [
            Outcome(a.id, a.attempt, response={"text": "a"}),
            Outcome(b.id, b.attempt, error="CUDA out of memory"),
            Outcome(c.id, c.attempt + 1, response={"stale": True}),  # not this attempt
            Outcome(d.id, d.attempt, response={"second": True}),  # already completed otherwise
            Outcome(uuid.uuid4(), 1, response=None),  # no such task
            Outcome(a.id, a.attempt, response={"text": "a"}),  # a repeat in the same call
            Outcome(e.id, e.attempt, response=None),
        ],
    )
    assert results[0] == Finished(a.id, TaskStatus.COMPLETED, a.attempt)
    assert results[1] == Finished(b.id, TaskStatus.ERROR, b.attempt)
    assert isinstance(results[2], LeaseLost) and results[2].task is not None
    assert results[2].task.status is TaskStatus.CLAIMED
    assert isinstance(results[3], InvalidTransition)
    assert isinstance(results[4], TaskNotFound)
    # The repeat ends the task the same way, and says it made no new completion.
    assert results[5] == Finished(a.id, TaskStatus.COMPLETED, a.attempt, fresh=False)
    assert results[6] == Finished(e.id, TaskStatus.COMPLETED, e.attempt)
    assert (await repo.get(a.id)).response_body == {"text": "a"}
    failed = await repo.get(b.id)
    assert failed.error_message == "CUDA out of memory" and failed.response_body is None
    assert (await repo.get(c.id)).status is TaskStatus.CLAIMED
    assert (await repo.get(d.id)).response_body == {"first": True}


async def test_finish_many_of_only_fails_or_only_completes(pool: Pool) -> None:
    from inferq.domain.records import Finished, Outcome

    repo = TaskRepository(pool)
    for _ in range(4):
        await enqueue(repo)
    session = uuid.uuid4()
    a, b, c, d = await repo.claim(session, ["p1"], limit=4, lease_s=30)
    fails = await repo.finish_many(session, [Outcome(t.id, t.attempt, error="x") for t in (a, b)])
    assert fails == [Finished(t.id, TaskStatus.ERROR, t.attempt) for t in (a, b)]
    done = await repo.finish_many(session, [Outcome(t.id, t.attempt, {"n": 1}) for t in (c, d)])
    assert done == [Finished(t.id, TaskStatus.COMPLETED, t.attempt) for t in (c, d)]


async def test_finish_many_a_refused_value_fails_only_its_own_item(pool: Pool) -> None:
    from inferq.domain.records import Finished, Outcome

    repo = TaskRepository(pool)
    for _ in range(2):
        await enqueue(repo)
    session = uuid.uuid4()
    a, b = await repo.claim(session, ["p1"], limit=2, lease_s=30)
    results = await repo.finish_many(
        session,
        [Outcome(a.id, a.attempt, response={"ok": 1}), Outcome(b.id, b.attempt, error="nul\x00")],
    )
    assert results[0] == Finished(a.id, TaskStatus.COMPLETED, a.attempt)
    assert isinstance(results[1], InvalidValue)  # a psycopg error never leaves inferq.db
    assert (await repo.get(b.id)).status is TaskStatus.CLAIMED  # nothing written for it


async def test_finish_many_stores_responses_exactly(pool: Pool) -> None:
    from inferq.domain.records import Finished, Outcome

    repo = TaskRepository(pool)
    for _ in range(3):
        await enqueue(repo)
    session = uuid.uuid4()
    a, b, c = await repo.claim(session, ["p1"], limit=3, lease_s=30)
    big = {"n": 2**70, "f": 0.1, "s": "é ✓", "nested": [None, True, {"k": -1.5}]}
    results = await repo.finish_many(
        session,
        [
            Outcome(a.id, a.attempt, response=big),
            Outcome(b.id, b.attempt, response=None),
            Outcome(c.id, c.attempt, response="just text"),
        ],
    )
    assert all(isinstance(r, Finished) for r in results)
    assert (await repo.get(a.id)).response_body == big
    assert (await repo.get(b.id)).response_body is None
    assert (await repo.get(c.id)).response_body == "just text"
    # A repeat on the single route is idempotent: the stored body is the one sent.
    assert (await repo.complete(a.id, session, a.attempt, big)).response_body == big
    assert (await repo.complete(b.id, session, b.attempt, None)).status is TaskStatus.COMPLETED
