"""The in-process hub: keyed wakes, level-triggered flags, resync, batched re-reads."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from uuid import uuid4

import pytest

from inferq.wakeups import CHUNKS_ADDED, POOL_WORK, TASK_CHANGED, Batcher, Hub


async def test_a_wake_before_the_wait_is_not_lost() -> None:
    hub = Hub()
    task_id = uuid4()
    with hub.watch_task(task_id) as waiter:
        hub.task_changed(task_id, "completed", "p")  # e.g. between the read and the wait
        assert await waiter.wait(3600) is True
        assert waiter.take() == TASK_CHANGED
        assert await waiter.wait(0.01) is False


async def test_wakes_fold_into_flags_instead_of_queueing() -> None:
    hub = Hub()
    task_id = uuid4()
    with hub.watch_task(task_id) as waiter:
        for _ in range(10_000):
            hub.chunks_added(task_id)
        hub.task_changed(task_id, "running", "p")
        assert waiter.take() == CHUNKS_ADDED | TASK_CHANGED
        assert waiter.take() == 0


async def test_only_the_tasks_own_waiters_wake() -> None:
    hub = Hub()
    mine, other = uuid4(), uuid4()
    with hub.watch_task(mine) as a, hub.watch_task(mine) as b, hub.watch_task(other) as c:
        hub.task_changed(mine, "running", "p")
        assert (a.flags, b.flags, c.flags) == (TASK_CHANGED, TASK_CHANGED, 0)
    assert hub.waiter_count == 0


async def test_pool_waiters_wake_only_for_new_pending_work_in_their_pools() -> None:
    hub = Hub()
    with hub.watch_pools(["gpu-a", "gpu-b"]) as waiter:
        hub.task_changed(uuid4(), "completed", "gpu-a")
        hub.task_changed(uuid4(), "pending", "cpu")
        assert waiter.flags == 0
        hub.task_changed(uuid4(), "pending", "gpu-b")
        assert waiter.flags == POOL_WORK
    assert hub.waiter_count == 0


async def test_resync_wakes_every_waiter() -> None:
    hub = Hub()
    with hub.watch_task(uuid4()) as a, hub.watch_pools(["p"]) as b:
        waits = asyncio.gather(a.wait(3600), b.wait(3600))
        await asyncio.sleep(0)  # both are now parked on their futures
        hub.resync_all()
        assert list(await asyncio.wait_for(waits, 5)) == [True, True]


async def test_a_cancelled_wait_leaves_the_waiter_usable() -> None:
    hub = Hub()
    task_id = uuid4()
    with hub.watch_task(task_id) as waiter:
        pending = asyncio.create_task(waiter.wait(3600))
        await asyncio.sleep(0)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        hub.task_changed(task_id, "completed", None)
        assert await waiter.wait(3600) is True


async def test_loads_in_one_window_share_one_fetch() -> None:
    calls: list[list[int]] = []

    async def fetch(keys: Sequence[int]) -> dict[int, str]:
        calls.append(sorted(keys))
        return {k: str(k) for k in keys if k != 3}

    batcher: Batcher[int, str] = Batcher(fetch, window_s=0.001)
    results = await asyncio.gather(*(batcher.load(k) for k in [1, 2, 3, 2]))
    assert results == ["1", "2", None, "2"]
    assert calls == [[1, 2, 3]]


async def test_a_failing_fetch_fails_its_batch_only() -> None:
    async def fetch(keys: Sequence[int]) -> dict[int, int]:
        if 0 in keys:
            raise RuntimeError("boom")
        return {k: k for k in keys}

    batcher: Batcher[int, int] = Batcher(fetch, window_s=0.001)
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.load(0)
    assert await batcher.load(5) == 5


def test_an_outcome_waiter_is_woken_by_terminal_statuses_only() -> None:
    hub = Hub()
    task_id = uuid4()
    with (
        hub.watch_task(task_id, terminal_only=True) as outcome,
        hub.watch_task(task_id) as stream,
    ):
        hub.task_changed(task_id, "running", "p")
        hub.chunks_added(task_id)
        assert outcome.take() == 0
        assert stream.take() != 0
        hub.task_changed(task_id, "completed", "p")
        assert outcome.take() != 0


def test_the_safety_sweep_skips_outcome_waiters_of_unfinished_tasks() -> None:
    hub = Hub()
    running, done = uuid4(), uuid4()
    with (
        hub.watch_task(running, terminal_only=True) as idle,
        hub.watch_task(done, terminal_only=True) as finished,
        hub.watch_task(running) as stream,
        hub.watch_pools(["p"]) as claimer,
    ):
        assert set(hub.outcome_task_ids()) == {running, done}
        assert hub.sweep({done}) == 4
        assert idle.take() == 0
        assert finished.take() and stream.take() and claimer.take()


async def test_a_cancelled_load_leaves_the_other_loads_of_its_key() -> None:
    release = asyncio.Event()

    async def fetch(keys: Sequence[int]) -> dict[int, int]:
        await release.wait()
        return {k: k * 10 for k in keys}

    batcher: Batcher[int, int] = Batcher(fetch, window_s=0.001)
    gone = asyncio.create_task(batcher.load(1))
    kept = asyncio.create_task(batcher.load(1))
    await asyncio.sleep(0)
    gone.cancel()
    release.set()
    assert await kept == 10
    with pytest.raises(asyncio.CancelledError):
        await gone


def test_a_chunk_wake_tells_how_far_the_announced_chunks_go() -> None:
    # A reader compares this with what it delivered and skips a re-read that cannot show more.
    hub = Hub()
    task_id = uuid4()
    with hub.watch_task(task_id) as reader:
        hub.chunks_added(task_id, 2, 40)
        hub.chunks_added(task_id, 2, 35)  # flushes of two replicas may announce out of order
        assert reader.chunks_upto == (2, 40)
        hub.chunks_added(task_id, 3, 1)  # a new attempt is always further
        assert reader.chunks_upto == (3, 1)
        assert reader.take() == CHUNKS_ADDED
        assert reader.chunks_upto < (0, 0)  # nothing announced since the take
        hub.chunks_added(task_id)  # announced without a seq: always worth a read
        assert reader.chunks_upto > (3, 10**9)
