"""HTTP end to end: two `inferq serve` replicas, echo workers, sync chat completions.

Design decisions:

- The processes are real ones (inferq.bench.replicas): two `inferq serve` replicas on free
  loopback ports against the same database, and `inferq worker --backend echo` processes (no
  delay), one per replica.
- The load generator is this process: ``clients`` concurrent clients alternating between the
  replicas, each sending sync ``POST /v1/chat/completions`` one after another on its own
  keep-alive connection. With that many clients the p50 is mostly queueing (clients / rate),
  so one client alone is measured first: the latency of a request that waits behind nothing.
  A few requests per client warm the connections up before the clock starts.
- The clients are aiohttp sessions of one keep-alive connection each, not httpx: on two cores
  the load generator shares the CPUs with what it measures, and httpx cost about 1 ms of CPU
  per request here, as much as a worker spends on a task (aiohttp: under 0.1 ms). Its own CPU
  per request (this thread's CPU time over the load phase) is measured as
  ``http.loadgen_cpu_ms_per_request``, so a reader can check it stays small.
- The memory of open waits is measured by inferq.bench.memory, on replicas started the same
  way.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable

import aiohttp
import orjson

from inferq.bench.polling import eventually
from inferq.bench.processes import cpu_seconds
from inferq.bench.replicas import BODY, Setup, processes, setup, spawn, start_replicas
from inferq.bench.stats import percentile
from inferq.runtime import run

WORKER_CAPACITY = 32
WARMUP_PER_CLIENT = 5


def measure_http(
    dsn: str, *, requests: int, clients: int, progress: Callable[[str], None]
) -> dict[str, float]:
    """One run of sync chat completions through two replicas and two echo workers.

    Starts and stops every process it needs; raises ProcessExited or TimeoutError with a
    process's log tail when one does not come up.
    """
    env, made = setup(dsn, requests)
    with processes() as procs:
        urls = start_replicas(procs, 2, env)
        # The token travels in the environment, never in argv.
        worker_env = {**env, "INFERQ_WORKER_TOKEN": made.worker_token}
        for i, url in enumerate(urls):
            procs.append(spawn(f"worker{i}", worker_args(url, made, i), worker_env))
        progress(f"    2 replicas and 2 echo workers up; {clients} clients, {requests} requests")
        pids = [proc.pid for proc in procs]
        # One client first: the latency of a request that does not queue behind others.
        alone = run(_load(urls, made, requests=max(20, requests // 10), clients=1, pids=pids))
        figures: dict[str, float] = run(
            _load(urls, made, requests=requests, clients=clients, pids=pids)
        )
    figures["http.p50_1_client_ms"] = alone["http.p50_ms"]
    loadgen_ms = figures["http.loadgen_cpu_ms_per_request"]
    progress(
        f"    {figures['http.tasks_per_s']:,.0f} tasks/s, p50 {figures['http.p50_ms']:.1f} ms; "
        f"one client alone: p50 {alone['http.p50_ms']:.1f} ms; load generator "
        f"{loadgen_ms:.2f} ms CPU per request"
    )
    return figures


def worker_args(url: str, made: Setup, i: int) -> list[str]:
    return [
        "worker",
        "--url",
        url,
        "--pool",
        made.pool_name,
        "--capacity",
        str(WORKER_CAPACITY),
        "--backend",
        "echo",
        "--name",
        f"bench-{i}",
    ]


async def _load(
    urls: list[str], made: Setup, *, requests: int, clients: int, pids: list[int]
) -> dict[str, float]:
    body = orjson.dumps({**BODY, "model": made.model})
    samples: list[float] = []
    remaining = requests
    headers = {
        "Authorization": f"Bearer {made.client_token}",
        "Content-Type": "application/json",
    }

    async def client(i: int) -> None:
        nonlocal remaining
        url = urls[i % len(urls)] + "/v1/chat/completions"
        # One keep-alive connection per client, as a client application would hold; no
        # cookie jar and no decompression to run per request (the load generator's CPU is
        # taken from what it measures).
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1),
            headers=headers,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        ) as http:
            for _ in range(WARMUP_PER_CLIENT):
                await post_completion(http, url, body)
            await start.wait()
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                await post_completion(http, url, body)
                samples.append(time.perf_counter() - t0)

    start = asyncio.Event()
    tasks = [asyncio.create_task(client(i)) for i in range(clients)]
    # Every client has warmed up when the number of parked clients stops mattering: the
    # warm-up is part of each client task, so start the clock once they all reach start.
    await _until_waiting(start, tasks, clients)
    t0 = time.perf_counter()
    cpu0 = sum(cpu_seconds(pid) for pid in pids)
    own0 = time.thread_time()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    own = time.thread_time() - own0
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
    return {
        "http.server_cpu_ms_per_task": cpu / len(samples) * 1000,
        "http.loadgen_cpu_ms_per_request": own / len(samples) * 1000,
        "http.tasks_per_s": len(samples) / elapsed,
        "http.p50_ms": statistics.median_high(samples) * 1000,
        "http.p99_ms": percentile(samples, 0.99) * 1000,
    }


async def post_completion(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str] | None = None
) -> None:
    """POST one sync completion; raises RuntimeError with the answer when it is not 200."""
    async with http.post(url, data=body, headers=headers) as resp:
        content = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {content[:300].decode(errors='replace')}")


async def _until_waiting(start: asyncio.Event, tasks: list[asyncio.Task[None]], n: int) -> None:
    """Return once every client task is parked on ``start``; raises a client's error."""

    def parked() -> bool:
        for t in tasks:
            if t.done():
                t.result()  # raises the client's error
        return sum(1 for t in tasks if _parked_on(t, start)) >= n

    await eventually(parked, 120, "the HTTP clients to warm up")


def _parked_on(task: asyncio.Task[None], event: asyncio.Event) -> bool:
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and waiter in getattr(event, "_waiters", ())
