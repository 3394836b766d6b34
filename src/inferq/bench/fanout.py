"""Fan-out: every replica receives every notification; what that costs as replicas are added.

Each replica LISTENs on the same channels, so a status change or a chunk flush is delivered
to all of them, whichever holds the waiter. Three measurements, each replica a spawned
process with its own pool, hub and Listener (``inferq.bench.wakeups.Stack``), the writer in
this process with no listener of its own (``poll_only``), so exactly N replicas listen:

- ``measure_idle_cost``: the CPU a replica spends on one task notification that wakes
  nothing (read from the socket, parsed, looked up in the hub): the fan-out's price per
  replica. Notifications are sent one commit each, with the trigger's payload shape; the
  replica's idle CPU (event loop, pool) is measured first and subtracted. Twice: paced one
  every ``WAKE_INTERVAL_S``, as in the wake runs, where each one wakes the event loop on its
  own; and as fast as one connection commits them, where psycopg reads several per wake-up
  and each costs less.
- ``measure_wake``: N replicas hold one waiter per task between them (task i on replica
  i mod N); the writer completes one task every ``interval_s``. Wake latency from the start
  of the complete call to the waiter's return (as ``wake`` in ``inferq bench``), and each
  replica's CPU per notification received, its own waiters' wake-ups and re-reads included.
- ``measure_relay``: ``streams`` saturated streams posted through the writer, read on N
  replicas (stream i on replica i mod N); chunks delivered per second.

On a machine with fewer cores than replicas every replica's share of the CPU shrinks: the
figures show what N replicas cost on this machine, not what N machines would do.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from inferq.bench.polling import eventually
from inferq.bench.wakeups import (
    CHUNK,
    Latency,
    Stack,
    _held_tasks,
    _reading_replica,
    _settings,
    latency,
    run_child,
    spawn_replica,
)
from inferq.db import channels

REPLICA_COUNTS = (1, 2, 4, 8)
WAKE_INTERVAL_S = 0.005  # one completion (one notification) every 5 ms in the wake runs
IDLE_S = 1.0  # how long a replica's idle CPU is measured before the notifications
# Wakes and reads only: no safety sweep, whose re-reads would be counted against notifications.
QUIET = {"safety_poll_s": 3600.0}


@dataclass(frozen=True, slots=True)
class WakeFanOut:
    replicas: int
    wake: Latency
    cpu_s_per_notification: float  # median over the replicas, their waiters' work included


async def _settled(count: Callable[[], int], expected: int, timeout_s: float = 60.0) -> None:
    """Until ``count()`` reaches ``expected`` (a listener's counter has no event); polled
    slowly, since the poll's own CPU is part of what is measured."""
    async with asyncio.timeout(timeout_s):
        while count() < expected:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


class _Cpu:
    """This process's CPU time since ``start()``, less what it spends idle (event loop, pool
    and listener timers), measured for IDLE_S before."""

    async def measure_idle(self) -> None:
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(IDLE_S)  # the idle baseline's span, not a wait for an event
        self.idle_per_s = (time.process_time() - cpu0) / (time.perf_counter() - t0)

    def start(self) -> None:
        self.cpu0, self.t0 = time.process_time(), time.perf_counter()

    def busy_s(self) -> float:
        spent = time.process_time() - self.cpu0
        return max(0.0, spent - self.idle_per_s * (time.perf_counter() - self.t0))


def _bystander(dsn: str, expected: int, pipe: Any) -> None:
    """A replica with no waiter: its CPU above idle while ``expected`` notifications arrive."""

    async def main() -> None:
        stack = await Stack.open(_settings(dsn, **QUIET))
        stats = stack.listener.stats
        cpu = _Cpu()
        await cpu.measure_idle()
        before = stats.notifications
        pipe.send("ready")
        cpu.start()
        await _settled(lambda: stats.notifications - before, expected)
        pipe.send((cpu.busy_s(), stats.notifications - before))
        await stack.close()

    run_child(main())


def _waiting(dsn: str, task_ids: list[uuid.UUID], expected: int, pipe: Any) -> None:
    """A replica waiting on ``task_ids``: each one's resume time, then its CPU per
    notification once all ``expected`` notifications (every task's, not only its own) came."""

    async def main() -> None:
        stack = await Stack.open(_settings(dsn, **QUIET))
        stats = stack.listener.stats
        resumed: dict[str, float] = {}

        async def wait(task_id: uuid.UUID) -> None:
            await stack.waits.wait_terminal(task_id, 600)
            resumed[str(task_id)] = time.perf_counter()

        waits = [asyncio.create_task(wait(t)) for t in task_ids]
        await eventually(lambda: stack.hub.waiter_count >= len(task_ids), 120.0, period_s=0.002)
        await asyncio.sleep(0.5)  # let every waiter finish its first read and park
        cpu = _Cpu()
        await cpu.measure_idle()
        before = stats.notifications
        pipe.send("ready")
        cpu.start()
        await asyncio.gather(*waits)
        await _settled(lambda: stats.notifications - before, expected)
        pipe.send((resumed, cpu.busy_s() / (stats.notifications - before)))
        await stack.close()

    run_child(main())


async def _ready(pipes: list[Any]) -> None:
    for pipe in pipes:
        assert await asyncio.to_thread(pipe.recv) == "ready"


async def measure_idle_cost(
    dsn: str, *, notifications: int = 5000, interval_s: float = 0.0
) -> float:
    """CPU seconds one replica spends per task notification that wakes none of its waiters,
    the notifications sent one every ``interval_s`` (0: as fast as they commit)."""
    process, pipe = spawn_replica(_bystander, dsn, notifications)
    await _ready([pipe])

    def send() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            start = time.perf_counter()
            for n in range(notifications):
                payload = orjson.dumps([[str(uuid.uuid4()), "completed", "bench-idle", 1]])
                conn.execute("SELECT pg_notify(%s, %s)", (channels.TASK, payload.decode()))
                time.sleep(max(0.0, start + (n + 1) * interval_s - time.perf_counter()))

    await asyncio.to_thread(send)
    busy, received = await asyncio.to_thread(pipe.recv)
    await asyncio.to_thread(process.join, 30)
    return float(busy) / int(received)


async def measure_wake(
    dsn: str, *, replicas: int, tasks: int = 1000, interval_s: float = WAKE_INTERVAL_S
) -> WakeFanOut:
    """Wake latency and CPU per notification with the waiters spread over ``replicas``."""
    writer = await Stack.open(_settings(dsn, poll_only=True))
    try:
        session, held = await _held_tasks(writer, tasks, streaming=False)
        shares = [[t.id for t in held[i::replicas]] for i in range(replicas)]
        children = [spawn_replica(_waiting, dsn, share, tasks) for share in shares]
        await _ready([pipe for _, pipe in children])
        starts: dict[str, float] = {}
        for t in held:
            starts[str(t.id)] = time.perf_counter()
            await writer.tasks.complete(t.id, session, t.attempt, {"text": "ok"})
            await asyncio.sleep(max(0.0, starts[str(t.id)] + interval_s - time.perf_counter()))
        samples, cpu = [], []
        for process, pipe in children:
            resumed, cpu_per_notification = await asyncio.to_thread(pipe.recv)
            samples += [at - starts[task_id] for task_id, at in resumed.items()]
            cpu.append(cpu_per_notification)
            await asyncio.to_thread(process.join, 30)
        assert len(samples) == tasks, f"{tasks - len(samples)} waiters never resumed"
        return WakeFanOut(replicas, latency(samples), float(statistics.median(cpu)))
    finally:
        await writer.close()


async def measure_relay(
    dsn: str, *, replicas: int, streams: int = 100, chunks_per_stream: int = 200
) -> float:
    """Chunks per second delivered, saturated, with the readers spread over ``replicas``."""
    writer = await Stack.open(_settings(dsn, poll_only=True))
    held: list[Any] = []
    try:
        session, held = await _held_tasks(writer, streams, streaming=True)
        children = [
            spawn_replica(_reading_replica, dsn, [t.id for t in held[i::replicas]])
            for i in range(replicas)
        ]
        await _ready([pipe for _, pipe in children])

        async def write(task: Any) -> None:
            for first in range(1, chunks_per_stream + 1, 8):
                last = min(chunks_per_stream, first + 7)
                batch = [(n, CHUNK) for n in range(first, last + 1)]
                await writer.relay.post(task.id, session, task.attempt, batch)

        started = time.perf_counter()
        await asyncio.gather(*(write(t) for t in held))
        for t in held:
            await writer.tasks.complete(t.id, session, t.attempt, {"text": "done"})
        delivered, last = 0, started
        for process, pipe in children:
            times, disorder, _cpu = await asyncio.to_thread(pipe.recv)
            assert disorder == 0, f"{disorder} chunks out of order"
            delivered += sum(len(ts) for ts in times)
            last = max([last, *(max(ts) for ts in times if ts)])
            await asyncio.to_thread(process.join, 30)
        assert delivered == streams * chunks_per_stream, "chunks missing"
        return delivered / (last - started)
    finally:
        async with writer.pool.connection() as conn:
            await conn.execute(
                "DELETE FROM inferq.task_chunk WHERE task_id = ANY(%s)", ([t.id for t in held],)
            )
        await writer.close()


async def measure_fan_out(
    dsn: str,
    *,
    tasks: int,
    streams: int,
    chunks_per_stream: int,
    notifications: int,
    counts: tuple[int, ...] = REPLICA_COUNTS,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
    """Every measurement of the module docstring: {figure key: value} for inferq bench."""
    # Paced: a fifth as many (one every 5 ms: 1,000 take 5 s).
    paced = await measure_idle_cost(
        dsn, notifications=max(1, notifications // 5), interval_s=WAKE_INTERVAL_S
    )
    burst = await measure_idle_cost(dsn, notifications=notifications)
    figures = {
        "replicas.idle_cpu_us_per_notification": paced * 1e6,
        "replicas.idle_burst_cpu_us_per_notification": burst * 1e6,
    }
    progress(
        f"    one replica, no waiter: {paced * 1e6:.1f} us CPU per notification one every "
        f"{WAKE_INTERVAL_S * 1000:g} ms, {burst * 1e6:.1f} us as fast as they commit"
    )
    for n in counts:
        wake = await measure_wake(dsn, replicas=n, tasks=tasks)
        relay = await measure_relay(
            dsn, replicas=n, streams=streams, chunks_per_stream=chunks_per_stream
        )
        progress(
            f"    {n} replica(s): wake p50 {wake.wake.p50_ms:.2f} ms, p99 "
            f"{wake.wake.p99_ms:.2f} ms, {wake.cpu_s_per_notification * 1e6:.1f} us CPU per "
            f"notification per replica; relay {relay:,.0f} chunks/s"
        )
        figures[f"replicas.r{n}.wake_p50_ms"] = wake.wake.p50_ms
        figures[f"replicas.r{n}.wake_p99_ms"] = wake.wake.p99_ms
        figures[f"replicas.r{n}.cpu_us_per_notification"] = wake.cpu_s_per_notification * 1e6
        figures[f"replicas.r{n}.relay_chunks_per_s"] = relay
    return figures
