"""Wakeup benchmarks: cross-replica wake latency, chunk relay throughput, memory per waiter.

Each "replica" is a ``Stack`` (its own pool, hub, Listener and TaskService). The replica that
writes runs in this process; the one that waits or reads runs in a spawned process, so the two
do not share a CPU and everything between them travels through PostgreSQL as in production.
Times are ``time.perf_counter()`` (CLOCK_MONOTONIC, comparable across processes on Linux).
Run: ``python -m inferq.bench.wakeups [--dsn postgresql://...]`` (a migrated, disposable
database; the tasks it creates are left behind). Without --dsn it starts a private cluster with
the default ``synchronous_commit = on``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import statistics
import time
import tracemalloc
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from inferq.bench.polling import eventually
from inferq.bench.queries import BenchTasks
from inferq.bench.stats import percentile
from inferq.db.chunks import ChunkRepository
from inferq.db.listener import Listener
from inferq.db.pool import Pool, create_pool
from inferq.db.tasks import TaskRepository
from inferq.logs import configure_logging
from inferq.runtime import freeze_startup_heap, run
from inferq.services.relay import ChunkRelay
from inferq.services.waits import ChunkEvent, StatusEvent, WaitService
from inferq.settings import Settings
from inferq.wakeups import Hub


@dataclass
class Stack:
    """One replica's wakeup machinery: pool, repositories, hub, listener, waits, relay."""

    settings: Settings
    pool: Pool
    hub: Hub
    listener: Listener
    tasks: TaskRepository
    waits: WaitService
    relay: ChunkRelay
    bench: BenchTasks

    @classmethod
    async def open(cls, settings: Settings) -> Stack:
        """Open the pool and start listening (unless poll-only); close() undoes it."""
        pool = create_pool(settings)
        await pool.open(wait=True)
        hub = Hub()
        listener = Listener(settings, hub)
        await listener.start()
        tasks, chunks = TaskRepository(pool), ChunkRepository(pool)
        stack = cls(
            settings,
            pool,
            hub,
            listener,
            tasks,
            WaitService(tasks, chunks, settings, hub=hub),
            ChunkRelay(chunks, tasks, settings),
            BenchTasks(pool),
        )
        freeze_startup_heap()  # as `inferq serve` does once started
        return stack

    async def close(self) -> None:
        await self.waits.stop()
        await self.relay.stop()
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
    cpu_s_per_chunk: float  # Python CPU of the posting and the reading replica (not PostgreSQL)


@dataclass(frozen=True, slots=True)
class MemoryFigures:
    waiters: int
    traced_bytes: int  # Python allocations held by the parked waiters (tracemalloc)
    per_waiter_bytes: float


def latency(samples_s: list[float]) -> Latency:
    """p50/p99 in milliseconds of ``samples_s`` (seconds)."""
    p99 = percentile(samples_s, 0.99)
    return Latency(len(samples_s), statistics.median(samples_s) * 1000, p99 * 1000)


async def _parked(hub: Hub, count: int) -> None:
    """Return once ``hub`` holds ``count`` waiters (no event marks it, so it is polled)."""
    what = f"{count} waiters to park"
    await eventually(lambda: hub.waiter_count >= count, 120, what, period_s=0.002)


def _settings(dsn: str, **overrides: Any) -> Settings:
    return Settings(database_url=dsn, pool_min_size=4, pool_max_size=8, **overrides)


async def _held_tasks(stack: Stack, n: int, *, streaming: bool) -> tuple[uuid.UUID, list[Any]]:
    """``n`` tasks of a fresh pool, claimed by one worker session (running when streaming)."""
    pool_name = f"bench-{uuid.uuid4().hex[:8]}"
    tasks = stack.tasks
    for _ in range(n):
        await tasks.enqueue(
            owner_id="bench", pool_name=pool_name, request_body=REQUEST, streaming=streaming
        )
    session = uuid.uuid4()
    held = await tasks.claim(session, [pool_name], limit=n, lease_s=3600)
    if streaming:
        held = [await tasks.start(t.id, session, t.attempt) for t in held]
    # A live table has statistics (autovacuum analyzes it as it fills). Without them the planner
    # reads a guarded write (id, session, attempt) through the session's index, stepping over
    # every task the session holds (all n here) instead of one primary-key lookup. A checkpoint
    # (where the role may) keeps the previous scenario's writes from being flushed meanwhile.
    async with stack.pool.connection() as conn:
        await conn.execute("ANALYZE inferq.task")
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            await conn.execute("CHECKPOINT")
    return session, held


def spawn_replica(target: Callable[..., None], *args: Any) -> tuple[Any, Any]:
    """Run ``target(*args, pipe)`` in a fresh process: another replica, on its own CPU."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    return process, parent


def run_child(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` as a spawned replica process's whole life.

    A spawned child starts with structlog's defaults, which print to stdout, where the bench
    table goes: configure logging (stderr, warnings only) before anything logs.
    """
    configure_logging(level="warning")
    run(main)


def _waiting_replica(dsn: str, task_ids: list[uuid.UUID], pipe: Any) -> None:
    """Replica A: parks a wait_terminal per task; sends each one's resume time."""

    async def main() -> None:
        a = await Stack.open(_settings(dsn))
        resumed = [0.0] * len(task_ids)

        async def wait(i: int, task_id: uuid.UUID) -> None:
            await a.waits.wait_terminal(task_id, 600)
            resumed[i] = time.perf_counter()

        waits = [asyncio.create_task(wait(i, t)) for i, t in enumerate(task_ids)]
        await _parked(a.hub, len(task_ids))
        await asyncio.sleep(1.0)  # let every waiter finish its first read and park
        pipe.send("ready")
        await asyncio.gather(*waits)
        pipe.send(resumed)
        await a.close()

    run_child(main())


def _reading_replica(dsn: str, task_ids: list[uuid.UUID], pipe: Any) -> None:
    """Replica C: one events() reader per task; sends the delivery time of every chunk."""

    async def main() -> None:
        c = await Stack.open(_settings(dsn))
        delivered: list[list[float]] = [[] for _ in task_ids]
        disorder = 0

        async def read(i: int, task_id: uuid.UUID) -> None:
            nonlocal disorder
            async for event in c.waits.events(task_id):
                if isinstance(event, ChunkEvent):
                    delivered[i].append(time.perf_counter())
                    disorder += event.seq != len(delivered[i])
                elif isinstance(event, StatusEvent) and event.task.terminal:
                    return

        readers = [asyncio.create_task(read(i, t)) for i, t in enumerate(task_ids)]
        await _parked(c.hub, len(task_ids))
        await asyncio.sleep(0.5)  # let every reader park
        pipe.send("ready")
        cpu0 = time.process_time()
        await asyncio.gather(*readers)
        pipe.send((delivered, disorder, time.process_time() - cpu0))
        await c.close()

    run_child(main())


async def measure_wake_latency(
    dsn: str, *, tasks: int = 2000, interval_s: float = 0.005
) -> tuple[Latency, Latency]:
    """Complete committed through replica B -> the waiter on replica A (another process)
    resumes. Returns (from the start of B's complete call, from B's commit acknowledgement).

    All ``tasks`` waiters are parked on A; B completes one task every ``interval_s``.
    """
    b = await Stack.open(_settings(dsn))
    try:
        session, held = await _held_tasks(b, tasks, streaming=False)
        process, pipe = spawn_replica(_waiting_replica, dsn, [t.id for t in held])
        assert await asyncio.to_thread(pipe.recv) == "ready"
        starts, acks = [], []
        for t in held:
            starts.append(time.perf_counter())
            await b.tasks.complete(t.id, session, t.attempt, {"text": "ok"})
            acks.append(time.perf_counter())
            await asyncio.sleep(max(0.0, starts[-1] + interval_s - time.perf_counter()))
        resumed: list[float] = await asyncio.to_thread(pipe.recv)
        await asyncio.to_thread(process.join, 30)
        return (
            latency([r - s for r, s in zip(resumed, starts, strict=True)]),
            latency([r - a for r, a in zip(resumed, acks, strict=True)]),
        )
    finally:
        await b.close()


async def measure_relay(
    dsn: str,
    *,
    streams: int = 200,
    chunks_per_stream: int = 500,
    rate_per_stream: float | None = None,
    per_post: int = 8,
) -> RelayFigures:
    """Chunks posted through replica B by ``streams`` concurrent workers, read on replica C
    (another process).

    Without ``rate_per_stream`` each worker posts ``per_post`` new chunks as soon as its
    previous post is acknowledged (saturation: the throughput ceiling; the latency is then
    mostly queueing behind a saturated CPU).

    With ``rate_per_stream`` (chunks/s) each stream's model produces chunk ``n`` at a fixed
    time, ``start + phase + n / rate`` (the phases spread the streams evenly over one period,
    as independent generations would be), and the worker posts everything produced so far as
    soon as its previous post is acknowledged. This is an open loop: the offered load is
    ``streams * rate_per_stream`` whatever the relay does, and a chunk's latency runs from its
    scheduled production time, so a post delayed behind a slow one is counted, not hidden
    (no coordinated omission).

    A chunk's latency ends at its ChunkEvent on C. ``chunks_per_s`` is the chunks delivered
    over the time from the first production to the last delivery.
    """
    b = await Stack.open(_settings(dsn))
    held: list[Any] = []
    try:
        session, held = await _held_tasks(b, streams, streaming=True)
        produced = [[0.0] * chunks_per_stream for _ in held]
        process, pipe = spawn_replica(_reading_replica, dsn, [t.id for t in held])
        assert await asyncio.to_thread(pipe.recv) == "ready"

        async def write(i: int, task: Any, started: float) -> None:
            seq = 0
            # Chunk n of this stream is due at origin + n / rate.
            origin = started + (i / streams - 1) / rate_per_stream if rate_per_stream else 0.0
            while seq < chunks_per_stream:
                now = time.perf_counter()
                if rate_per_stream is None:
                    upto = min(chunks_per_stream, seq + per_post)
                else:
                    upto = min(chunks_per_stream, int((now - origin) * rate_per_stream))
                    if upto <= seq:
                        await asyncio.sleep(origin + (seq + 1) / rate_per_stream - now)
                        continue
                for n in range(seq + 1, upto + 1):
                    produced[i][n - 1] = (
                        now if rate_per_stream is None else origin + n / rate_per_stream
                    )
                batch = [(n, CHUNK) for n in range(seq + 1, upto + 1)]
                seq = upto
                await b.relay.post(task.id, session, task.attempt, batch)

        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(write(i, t, started) for i, t in enumerate(held)))
        cpu = time.process_time() - cpu0
        for t in held:
            await b.tasks.complete(t.id, session, t.attempt, {"text": "done"})
        delivered, disorder, reader_cpu = await asyncio.to_thread(pipe.recv)
        await asyncio.to_thread(process.join, 30)
        assert disorder == 0, f"{disorder} chunks out of order"
        samples = [
            d - p
            for ds, ps in zip(delivered, produced, strict=True)
            for d, p in zip(ds, ps, strict=True)
        ]
        total = streams * chunks_per_stream
        assert len(samples) == total, f"{total - len(samples)} chunks missing"
        elapsed = max(max(ds) for ds in delivered) - started
        return RelayFigures(total, total / elapsed, latency(samples), (cpu + reader_cpu) / total)
    finally:
        # What the collector would do after chunk_retention_s: left behind, the chunks of
        # earlier runs would bloat the table and slow every later run down.
        async with b.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM inferq.task_chunk WHERE task_id = ANY(%s)", ([t.id for t in held],)
            )
        await b.close()


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
        parked = [asyncio.create_task(stack.waits.wait_terminal(i, 3600)) for i in ids]
        await _parked(stack.hub, waiters)
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


async def run_all(dsn: str, *, tasks: int, streams: int, runs: int) -> dict[str, float]:
    """Every measurement ``runs`` times; the median over runs of each figure."""
    wakes = [await measure_wake_latency(dsn, tasks=tasks) for _ in range(runs)]
    ceilings = [await measure_relay(dsn, streams=streams) for _ in range(runs)]
    # 100 chunks/s per stream: the target load of 20,000 chunks/s over 200 streams.
    loaded = [await measure_relay(dsn, streams=streams, rate_per_stream=100.0) for _ in range(runs)]
    memory = [await measure_waiter_memory(dsn) for _ in range(runs)]

    def med(values: Any) -> float:
        return float(statistics.median(values))

    return {
        "wake_p50_ms (from complete call)": med(w[0].p50_ms for w in wakes),
        "wake_p99_ms (from complete call)": med(w[0].p99_ms for w in wakes),
        "wake_p50_ms (from commit ack)": med(w[1].p50_ms for w in wakes),
        "wake_p99_ms (from commit ack)": med(w[1].p99_ms for w in wakes),
        "relay_max_chunks_per_s": med(r.chunks_per_s for r in ceilings),
        "relay_max_p50_ms": med(r.latency.p50_ms for r in ceilings),
        "relay_max_p99_ms": med(r.latency.p99_ms for r in ceilings),
        "relay_at_load_chunks_per_s": med(r.chunks_per_s for r in loaded),
        "relay_at_load_p50_ms": med(r.latency.p50_ms for r in loaded),
        "relay_at_load_p99_ms": med(r.latency.p99_ms for r in loaded),
        "memory_per_10k_waiters_mb": med(m.per_waiter_bytes for m in memory) * 10_000 / 1e6,
        "memory_per_waiter_bytes": med(m.per_waiter_bytes for m in memory),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m inferq.bench.wakeups")
    parser.add_argument("--dsn", help="a migrated database (default: a private cluster)")
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    configure_logging(level="warning")
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
        figures = run(run_all(dsn, tasks=args.tasks, streams=args.streams, runs=args.runs))
    finally:
        if cluster is not None:
            cluster.destroy()
    for name, value in figures.items():
        print(f"{name:36} {value:12.2f}")


if __name__ == "__main__":
    main()
