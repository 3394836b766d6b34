"""Tasks/s through enqueue -> claim -> start -> complete, with every task's waiter woken.

Design decisions:

- No HTTP: producers call ``BenchTasks.enqueue_many`` (inferq.bench.queries), workers
  ``claim`` (a batch), ``start_many`` and ``complete_many``, i.e. the batched statements a
  daemon groups requests into. Each statement is one notifying commit for a whole batch,
  which is what lets the rate pass the ~4,500 notifying commits/s ceiling of this machine.
- Every task has a waiter in a WaitService fed by a Listener, exactly as a sync HTTP call
  waits (``WaitService.wait_terminal``: register, read, sleep, batched re-read on wake). A task
  counts only when its waiter has seen it completed, so the figure includes the notification
  round trip and the batched re-reads, not just the writes.
- Producers enqueue ``BATCH`` tasks per statement; ``WORKERS`` workers each claim up to
  ``BATCH``. The clock runs from the first enqueue to the last waiter's return.
- Two processes, as in a deployment: producers and waiters in this one (a replica serving
  sync clients), the workers in a spawned child with its own pool and listener (worker
  traffic). Both report their CPU time, so the figure also tells the Python CPU per task,
  which is what bounds the rate on a machine as small as this one.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection

from inferq.bench.queries import NewTask
from inferq.bench.wakeups import Stack, run_child, spawn_replica
from inferq.domain.task import Task, TaskStatus
from inferq.settings import Settings

BATCH = 100
WORKERS = 4
WAIT_S = 120.0
RESPONSE = {"choices": [{"message": {"role": "assistant", "content": "ok"}}]}
REQUEST = {"messages": [{"role": "user", "content": "hello"}]}


@dataclass(frozen=True, slots=True)
class PipelineResult:
    tasks_per_s: float
    cpu_s_per_task: float  # Python CPU of both processes (not PostgreSQL's) per task


async def measure_pipeline(dsn: str, *, producers: int, tasks: int) -> PipelineResult:
    """Tasks/s for ``tasks`` tasks enqueued by ``producers`` concurrent producers.

    Raises RuntimeError when a task did not complete (the figure would be meaningless).
    """
    pool_name = f"bench-pipeline-{uuid.uuid4().hex[:8]}"
    worker, parent_end = spawn_replica(_worker_process, dsn, pool_name, tasks)
    try:
        if not await asyncio.to_thread(parent_end.poll, 60) or parent_end.recv() != "ready":
            raise RuntimeError("pipeline: the worker process did not start")
        async with _stack(dsn, producers + 2) as stack:
            cpu0 = time.process_time()
            rate = await _produce_and_wait(stack, pool_name, producers=producers, tasks=tasks)
            cpu = time.process_time() - cpu0
        if not await asyncio.to_thread(parent_end.poll, 60):
            raise RuntimeError("pipeline: the worker process did not finish")
        worker_cpu = float(parent_end.recv())
        return PipelineResult(rate, (cpu + worker_cpu) / tasks)
    finally:
        worker.join(10)
        if worker.is_alive():
            worker.kill()
            worker.join()


@asynccontextmanager
async def _stack(dsn: str, connections: int) -> AsyncIterator[Stack]:
    """A replica's wakeup machinery: pool, hub, Listener, WaitService."""
    stack = await Stack.open(
        Settings(database_url=dsn, pool_min_size=connections, pool_max_size=connections + 4)
    )
    try:
        yield stack
    finally:
        await stack.close()


async def _produce_and_wait(stack: Stack, pool_name: str, *, producers: int, tasks: int) -> float:
    repo = stack.bench
    waits: list[asyncio.Task[Task]] = []

    async def produce(count: int) -> None:
        while count > 0:
            n = min(BATCH, count)
            count -= n
            items = [NewTask(owner_id="bench", pool_name=pool_name, request_body=REQUEST)] * n
            for task in await repo.enqueue_many(items):
                waits.append(asyncio.create_task(stack.waits.wait_terminal(task.id, WAIT_S)))

    shares = [tasks // producers + (1 if i < tasks % producers else 0) for i in range(producers)]
    started_at = time.perf_counter()
    await asyncio.gather(*(produce(n) for n in shares))
    finished = await asyncio.gather(*waits)
    elapsed = time.perf_counter() - started_at
    bad = [t for t in finished if t.status is not TaskStatus.COMPLETED]
    if bad or len(finished) != tasks:
        raise RuntimeError(f"pipeline: {len(bad)} of {len(finished)} tasks did not complete")
    return tasks / elapsed


def _worker_process(dsn: str, pool_name: str, tasks: int, conn: Connection) -> None:
    """The worker side in its own process: claim, start and complete ``tasks`` tasks."""
    run_child(_work(dsn, pool_name, tasks, conn))


async def _work(dsn: str, pool_name: str, tasks: int, conn: Connection) -> None:
    completed = 0
    done = asyncio.Event()

    async def work(stack: Stack) -> None:
        nonlocal completed
        repo, bench = stack.tasks, stack.bench
        session = uuid.uuid4()
        async with stack.waits.pool_waiter([pool_name]) as waiter:
            while not done.is_set():
                claimed = await repo.claim(session, [pool_name], limit=BATCH, lease_s=60)
                if not claimed:
                    await _first(waiter.wait(1.0), done.wait())
                    continue
                started = await bench.start_many([(t.id, session, t.attempt) for t in claimed])
                results = [(t.id, session, t.attempt, RESPONSE) for t in started]
                # Read the counter after the await: `completed += len(await ...)` would load it
                # before and lose the other workers' updates.
                done_now = await bench.complete_many(results)
                completed += len(done_now)
                if completed >= tasks:
                    done.set()

    async with _stack(dsn, WORKERS + 1) as stack:
        workers = [asyncio.create_task(work(stack)) for _ in range(WORKERS)]
        conn.send("ready")
        cpu0 = time.process_time()
        await asyncio.wait_for(done.wait(), WAIT_S)
        cpu = time.process_time() - cpu0
        await asyncio.gather(*workers)
    conn.send(str(cpu))


async def _first(*aws: Awaitable[object]) -> None:
    """Wait until the first of ``aws`` finishes; cancel the rest."""
    pending = [asyncio.ensure_future(a) for a in aws]
    _, rest = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    for t in rest:
        t.cancel()
