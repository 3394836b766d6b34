"""Claim latency: from the enqueue call to an idle worker's claim returning the task.

Design decisions:

- The claimer is what the worker API runs for a long-poll: ``WaitService.pool_waiter`` is
  entered first, then ``TaskRepository.claim`` is tried, and only an empty claim sleeps on the
  waiter. Its wake comes from the Listener of the same process (the INSERT's notification).
- One task at a time, and the next enqueue only once the claimer is idle again, so every
  sample is the latency an idle worker sees, not a queueing delay.
- The clock starts before the enqueue call, so a sample includes the enqueue's own commit
  (a WAL flush under ``synchronous_commit = on``): the time a client's submit takes to reach a
  worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from inferq.bench.wakeups import Stack
from inferq.settings import Settings

REQUEST = {"messages": [{"role": "user", "content": "hello"}]}


@dataclass(frozen=True, slots=True)
class ClaimSample:
    """Seconds from the enqueue call to its return, and to the claim returning the task."""

    enqueued: float
    claimed: float


async def measure_claim_latency(dsn: str, *, tasks: int) -> list[ClaimSample]:
    """Enqueue and claim times of ``tasks`` tasks, one at a time, in order."""
    stack = await Stack.open(Settings(database_url=dsn, pool_min_size=4, pool_max_size=8))
    try:
        return await _run(stack, tasks)
    finally:
        await stack.close()


async def _run(stack: Stack, tasks: int) -> list[ClaimSample]:
    pool_name = f"bench-latency-{uuid.uuid4().hex[:8]}"
    session = uuid.uuid4()
    idle = asyncio.Event()
    claimed: asyncio.Queue[float] = asyncio.Queue()

    async def claimer() -> None:
        async with stack.waits.pool_waiter([pool_name]) as waiter:
            while True:
                got = await stack.tasks.claim(session, [pool_name], limit=1, lease_s=60)
                if got:
                    claimed.put_nowait(time.perf_counter())
                    continue
                idle.set()
                await waiter.wait(5.0)
                idle.clear()

    samples: list[ClaimSample] = []
    task = asyncio.create_task(claimer())
    try:
        for _ in range(tasks):
            await asyncio.wait_for(idle.wait(), 30)
            started = time.perf_counter()
            await stack.tasks.enqueue(owner_id="bench", pool_name=pool_name, request_body=REQUEST)
            enqueued_at = time.perf_counter()
            claimed_at = await asyncio.wait_for(claimed.get(), 30)
            samples.append(ClaimSample(enqueued_at - started, claimed_at - started))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return samples
