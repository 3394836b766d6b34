"""Wakeup benchmarks: cross-replica wake latency, chunk relay throughput, memory per waiter.

Each "replica" is a ``Stack`` (its own pool, hub, Listener and TaskService) inside one process;
the notifications still travel through PostgreSQL, exactly as between processes.
Run: ``python -m inferq.bench.wakeups --dsn postgresql://...`` (a migrated, disposable database;
the tasks it creates are left behind).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from inferq.db.listener import Listener
from inferq.db.pool import Pool, create_pool
from inferq.service import ChunkEvent, StatusEvent, TaskService
from inferq.settings import Settings
from inferq.wakeups import Hub


@dataclass
class Stack:
    """One replica's wakeup machinery: pool, hub, listener, service."""

    settings: Settings
    pool: Pool
    hub: Hub
    listener: Listener
    service: TaskService

    @classmethod
    async def open(cls, settings: Settings) -> Stack:
        """Open the pool and start listening (unless poll-only); close() undoes it."""
        pool = create_pool(settings)
        await pool.open(wait=True)
        hub = Hub()
        listener = Listener(settings, hub)
        await listener.start()
        return cls(settings, pool, hub, listener, TaskService(pool, settings, hub=hub))

    async def close(self) -> None:
        await self.service.stop()
        await self.listener.stop()
        await self.pool.close()


REQUEST = {"messages": [{"role": "user", "content": "hello"}]}
# A typical OpenAI chat chunk (~200 bytes), relayed untouched.
CHUNK = orjson.dumps(
    {
        "id": "chatcmpl-0123456789",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "meta-llama/Llama-3-8B-Instruct",
        "choices": [{"index": 0, "delta": {"content": " token"}, "finish_reason": None}],
    }
).decode()


@dataclass(frozen=True, slots=True)
class Latency:
    samples: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class RelayFigures:
    chunks: int
    chunks_per_s: float
    latency: Latency


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    waiters: int
    traced_bytes: int  # Python allocations held by the parked waiters (tracemalloc)
    per_waiter_bytes: float


def latency(samples_s: list[float]) -> Latency:
    """p50/p99 in milliseconds of ``samples_s`` (seconds)."""
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return Latency(len(ordered), statistics.median(ordered) * 1000, p99 * 1000)


async def _until(predicate: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Poll state that has no event (waiter counts) until ``predicate`` holds."""
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


def _settings(dsn: str, **overrides: Any) -> Settings:
    return Settings(database_url=dsn, pool_min_size=4, pool_max_size=8, **overrides)


async def _held_tasks(stack: Stack, n: int, *, streaming: bool) -> tuple[uuid.UUID, list[Any]]:
    """``n`` tasks of a fresh pool, claimed by one worker session (running when streaming)."""
    pool_name = f"bench-{uuid.uuid4().hex[:8]}"
    tasks = stack.service.tasks
    for _ in range(n):
        await tasks.enqueue(
            owner_id="bench", pool_name=pool_name, request_body=REQUEST, streaming=streaming
        )
    session = uuid.uuid4()
    held = await tasks.claim(session, [pool_name], limit=n, lease_s=3600)
    if streaming:
        held = [await tasks.start(t.id, session, t.attempt) for t in held]
    return session, held


async def measure_wake_latency(dsn: str, *, tasks: int = 2000) -> Latency:
    """Complete committed through replica B -> the waiter on replica A resumes.

    The clock starts before B's complete call (so it includes the UPDATE and its commit) and
    stops when A's ``wait_terminal`` returns. One completion at a time, with all ``tasks``
    waiters parked on A meanwhile.
    """
    a = await Stack.open(_settings(dsn))
    b = await Stack.open(_settings(dsn))
    try:
        session, held = await _held_tasks(b, tasks, streaming=False)
        resumed: dict[uuid.UUID, asyncio.Future[float]] = {}

        async def wait(task_id: uuid.UUID) -> None:
            await a.service.wait_terminal(task_id, 600)
            resumed[task_id].set_result(time.perf_counter())

        loop = asyncio.get_running_loop()
        for t in held:
            resumed[t.id] = loop.create_future()
        waiters = [asyncio.create_task(wait(t.id)) for t in held]
        await _until(lambda: a.hub.waiter_count >= tasks)
        await asyncio.sleep(1.0)  # let every waiter finish its first read and park
        samples = []
        for t in held:
            started = time.perf_counter()
            await b.service.tasks.complete(t.id, session, t.attempt, {"text": "ok"})
            samples.append(await asyncio.wait_for(resumed[t.id], 30) - started)
        await asyncio.gather(*waiters)
        return latency(samples)
    finally:
        await a.close()
        await b.close()


async def measure_relay(
    dsn: str, *, streams: int = 200, chunks_per_stream: int = 500, per_post: int = 8
) -> RelayFigures:
    """Chunks posted through replica B by ``streams`` concurrent workers, read on replica C.

    Each worker produces chunks as fast as its posts are acknowledged, up to ``per_post`` per
    post (a worker sends what its model produced while the previous post was in flight). A
    chunk's latency runs from its creation on the worker to its ChunkEvent on C.
    """
    b = await Stack.open(_settings(dsn))
    c = await Stack.open(_settings(dsn))
    try:
        session, held = await _held_tasks(b, streams, streaming=True)
        created: dict[tuple[uuid.UUID, int], float] = {}
        samples: list[float] = []
        delivered = 0

        async def read(task_id: uuid.UUID) -> None:
            nonlocal delivered
            async for event in c.service.events(task_id):
                if isinstance(event, ChunkEvent):
                    samples.append(time.perf_counter() - created[(task_id, event.seq)])
                    delivered += 1
                elif isinstance(event, StatusEvent) and event.task.terminal:
                    return

        async def write(task: Any) -> None:
            seq = 0
            while seq < chunks_per_stream:
                batch = []
                for _ in range(min(per_post, chunks_per_stream - seq)):
                    seq += 1
                    created[(task.id, seq)] = time.perf_counter()
                    batch.append((seq, CHUNK))
                await b.service.post_chunks(task.id, session, task.attempt, batch)

        readers = [asyncio.create_task(read(t.id)) for t in held]
        await _until(lambda: c.hub.waiter_count >= streams)
        await asyncio.sleep(0.5)  # let every reader park
        started = time.perf_counter()
        await asyncio.gather(*(write(t) for t in held))
        await _until(lambda: delivered >= streams * chunks_per_stream)
        elapsed = time.perf_counter() - started
        for t in held:
            await b.service.tasks.complete(t.id, session, t.attempt, {"text": "done"})
        await asyncio.wait_for(asyncio.gather(*readers), 60)
        return RelayFigures(delivered, delivered / elapsed, latency(samples))
    finally:
        await b.close()
        await c.close()


async def measure_waiter_memory(dsn: str, *, waiters: int = 10_000) -> MemoryFigures:
    """Python memory held by ``waiters`` parked ``wait_terminal`` calls (task, frame, waiter,
    hub entry), measured with tracemalloc after they all parked."""
    stack = await Stack.open(_settings(dsn, safety_poll_s=3600))
    try:
        async with stack.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO inferq.task (pool_name, request_body, owner_id) "
                "SELECT 'bench-memory', '{}', 'bench' FROM generate_series(1, %s) RETURNING id",
                (waiters,),
            )
            ids = [row[0] for row in await cur.fetchall()]
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        parked = [asyncio.create_task(stack.service.wait_terminal(i, 3600)) for i in ids]
        await _until(lambda: stack.hub.waiter_count >= waiters)
        await asyncio.sleep(2.0)  # let every waiter finish its first read and park
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        held = sum(s.size_diff for s in after.compare_to(before, "filename"))
        for p in parked:
            p.cancel()
        await asyncio.gather(*parked, return_exceptions=True)
        return MemoryFigures(waiters, held, held / waiters)
    finally:
        await stack.close()


async def run_all(dsn: str, *, tasks: int, streams: int, runs: int) -> dict[str, Any]:
    """Every measurement ``runs`` times; the median run of each figure."""
    wakes = [await measure_wake_latency(dsn, tasks=tasks) for _ in range(runs)]
    relays = [await measure_relay(dsn, streams=streams) for _ in range(runs)]
    memory = [await measure_waiter_memory(dsn) for _ in range(runs)]
    return {
        "wake_p50_ms": statistics.median(w.p50_ms for w in wakes),
        "wake_p99_ms": statistics.median(w.p99_ms for w in wakes),
        "relay_chunks_per_s": statistics.median(r.chunks_per_s for r in relays),
        "relay_p50_ms": statistics.median(r.latency.p50_ms for r in relays),
        "relay_p99_ms": statistics.median(r.latency.p99_ms for r in relays),
        "memory_per_10k_waiters_mb": statistics.median(m.traced_bytes for m in memory)
        / m_scale(memory[0].waiters),
        "memory_per_waiter_bytes": statistics.median(m.per_waiter_bytes for m in memory),
    }


def m_scale(waiters: int) -> float:
    """Divisor turning bytes for ``waiters`` into MB per 10,000 waiters."""
    return 1e6 * waiters / 10_000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m inferq.bench.wakeups")
    parser.add_argument("--dsn", help="a migrated database (default: a private cluster)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    cluster = None
    dsn = args.dsn
    if dsn is None:
        import tempfile
        from pathlib import Path

        from inferq.db.cluster import PrivateCluster
        from inferq.db.migrations import Migrator

        # synchronous_commit stays on (the default): every commit waits for its WAL flush.
        cluster = PrivateCluster(Path(tempfile.mkdtemp(prefix="inferq-bench-")))
        cluster.start()
        dsn = cluster.dsn
        Migrator(dsn).migrate()
    try:
        try:
            import uvloop

            runner: Any = uvloop.run
        except ImportError:
            runner = asyncio.run
        figures = runner(run_all(dsn, tasks=args.tasks, streams=args.streams, runs=args.runs))
    finally:
        if cluster is not None:
            cluster.destroy()
    for name, value in figures.items():
        print(f"{name:28} {value:12.2f}")


if __name__ == "__main__":
    main()
