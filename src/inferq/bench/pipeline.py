"""Tasks/s through enqueue -> claim -> start -> complete, with every task's waiter woken.

Design decisions:

- No HTTP: producers call ``TaskRepository.enqueue_many``, workers ``claim`` (a batch),
  ``start_many`` and ``complete_many``, i.e. the batched statements a daemon groups requests
  into. Each statement is one notifying commit for a whole batch, which is what lets the rate
  pass the ~4,500 notifying commits/s ceiling of this machine.
- Every task has a waiter in a TaskService fed by a Listener, exactly as a sync HTTP call
  waits (``TaskService.wait_terminal``: register, read, sleep, batched re-read on wake). A task
  counts only when its waiter has seen it completed, so the figure includes the notification
  round trip and the batched re-reads, not just the writes.
- Producers enqueue ``BATCH`` tasks per statement; ``WORKERS`` workers each claim up to
  ``BATCH``. The clock runs from the first enqueue to the last waiter's return.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable

from inferq.db.listener import Listener
from inferq.db.pool import create_pool
from inferq.db.tasks import NewTask
from inferq.domain.task import Task, TaskStatus
from inferq.service import TaskService
from inferq.settings import Settings
from inferq.wakeups import Hub

BATCH = 100
WORKERS = 4
WAIT_S = 120.0
RESPONSE = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
REQUEST = {"messages": [{"role": "user", "content": "hello"}]}


async def measure_pipeline(dsn: str, *, producers: int, tasks: int) -> float:
    """Tasks/s for ``tasks`` tasks enqueued by ``producers`` concurrent producers.

    Raises RuntimeError when a task did not complete (the figure would be meaningless).
    """
    settings = Settings(
        database_url=dsn, pool_min_size=producers + WORKERS + 2, pool_max_size=producers + 16
    )
    pool = create_pool(settings)
    await pool.open(wait=True)
    hub = Hub()
    listener = Listener(settings, hub)
    await listener.start()
    service = TaskService(pool, settings, hub=hub)
    try:
        return await _run(service, producers=producers, tasks=tasks)
    finally:
        await service.stop()
        await listener.stop()
        await pool.close()


async def _run(service: TaskService, *, producers: int, tasks: int) -> float:
    pool_name = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    repo = service.tasks
    waits: list[asyncio.Task[Task]] = []
    done = asyncio.Event()
    completed = 0

    async def produce(count: int) -> None:
        while count > 0:
            n = min(BATCH, count)
            count -= n
            items = [NewTask(owner_id="bench", pool_name=pool_name, request_body=REQUEST)] * n
            for task in await repo.enqueue_many(items):
                waits.append(asyncio.create_task(service.wait_terminal(task.id, WAIT_S)))

    async def work() -> None:
        nonlocal completed
        session = uuid.uuid4()
        async with service.pool_waiter([pool_name]) as waiter:
            while not done.is_set():
                claimed = await repo.claim(session, [pool_name], limit=BATCH, lease_s=60)
                if not claimed:
                    await _first(waiter.wait(1.0), done.wait())
                    continue
                started = await repo.start_many([(t.id, session, t.attempt) for t in claimed])
                results = [(t.id, session, t.attempt, RESPONSE) for t in started]
                completed += len(await repo.complete_many(results))
                if completed >= tasks:
                    done.set()

    shares = [tasks // producers + (1 if i < tasks % producers else 0) for i in range(producers)]
    started_at = time.perf_counter()
    workers = [asyncio.create_task(work()) for _ in range(WORKERS)]
    await asyncio.gather(*(produce(n) for n in shares))
    finished = await asyncio.gather(*waits)
    elapsed = time.perf_counter() - started_at
    done.set()
    await asyncio.gather(*workers)
    bad = [t for t in finished if t.status is not TaskStatus.COMPLETED]
    if bad or len(finished) != tasks:
        raise RuntimeError(f"pipeline: {len(bad)} of {len(finished)} tasks did not complete")
    return tasks / elapsed


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of ``aws`` finishes; cancel the rest."""
    pending = [asyncio.ensure_future(a) for a in aws]
    _, rest = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    for t in rest:
        t.cancel()
