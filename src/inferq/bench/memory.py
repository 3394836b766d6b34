"""Memory of open waits: one replica's resident set idle, then with parked long-polls.

Design decisions:

- The replica is a real `inferq serve` (inferq.bench.replicas) with no worker. Its resident
  set (VmRSS from /proc) is read idle, then with ``open_waits`` native
  ``GET /v1/tasks/{id}/wait`` long-polls parked on pending tasks of a pool no worker serves.
- The long-polls are raw sockets (a request written, the answer never read), so the load
  generator stays small; the replica's ``inferq_open_waits`` gauge says when all of them are
  parked. The difference divided by the count is the cost of one open wait: its socket, its
  ASGI request, its waiter.
- The same count parked on a bare uvicorn app (inferq.bench.parked_app) is the floor: the part
  of that cost which is the HTTP stack's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp

from inferq.bench.polling import eventually
from inferq.bench.processes import rss_bytes
from inferq.bench.queries import BenchTasks, NewTask
from inferq.bench.replicas import (
    BODY,
    READY_TIMEOUT_S,
    WAIT_S,
    Setup,
    processes,
    setup,
    spawn,
    start_replicas,
)
from inferq.db.cluster import free_port
from inferq.db.pool import create_pool
from inferq.runtime import run
from inferq.settings import Settings

PARK_TIMEOUT_S = 300.0


def measure_wait_memory(
    dsn: str, *, open_waits: int, progress: Callable[[str], None]
) -> dict[str, float]:
    """Resident memory of one replica idle and with ``open_waits`` parked long-polls.

    The replica's safety poll is set to an hour: with the default (seconds), every parked wait
    re-reads its row each period, which keeps a replica with 10,000 waits busy (see
    the README's Performance section) and is a CPU cost, not a memory one.
    """
    env, made = setup(dsn, open_waits)
    env["INFERQ_SAFETY_POLL_S"] = "3600"
    with processes() as procs:
        (url,) = start_replicas(procs, 1, env)
        figures = dict(run(_memory(dsn, url, procs[0].pid, made, open_waits, progress)))
    figures["memory.uvicorn_floor_bytes_per_request"] = _uvicorn_floor(open_waits, progress)
    return figures


def _uvicorn_floor(open_waits: int, progress: Callable[[str], None]) -> float:
    """RSS per parked request of an app that holds nothing (inferq.bench.parked_app), on the
    uvicorn settings of `inferq serve`: the part of an open wait's cost that is the HTTP
    stack's own."""
    port = free_port()
    env = {**os.environ, "INFERQ_MAX_CONNECTIONS": str(open_waits + 1000)}
    with processes() as procs:
        procs.append(spawn("parked", ["-m", "inferq.bench.parked_app", str(port)], env, raw=True))
        url = f"http://127.0.0.1:{port}"
        procs[0].wait_http(url + "/parked", READY_TIMEOUT_S)
        return float(run(_floor(url, procs[0].pid, open_waits, progress)))


async def _floor(url: str, pid: int, count: int, progress: Callable[[str], None]) -> float:
    await asyncio.sleep(1.0)
    idle = rss_bytes(pid)
    host, port = url.removeprefix("http://").split(":")
    ids = [str(uuid.uuid4()) for _ in range(count)]
    async with _open_waits(host, int(port), ids, "not-checked"), aiohttp.ClientSession() as http:

        async def all_parked() -> bool:
            return int(await _get_text(http, url + "/parked")) >= count

        what = f"the bare app to park {count} requests"
        await eventually(all_parked, PARK_TIMEOUT_S, what, period_s=0.5)
        loaded = rss_bytes(pid)
    progress(
        f"    bare uvicorn app: {count:,} parked requests; RSS {idle / 2**20:.1f} -> "
        f"{loaded / 2**20:.1f} MiB, {(loaded - idle) / count:,.0f} B each"
    )
    return (loaded - idle) / count


async def _memory(
    dsn: str,
    url: str,
    pid: int,
    made: Setup,
    open_waits: int,
    progress: Callable[[str], None],
) -> dict[str, float]:
    ids = await _pending_tasks(dsn, made, open_waits)
    await asyncio.sleep(1.0)  # let the replica settle after the load phase
    idle = rss_bytes(pid)
    host, port = url.removeprefix("http://").split(":")
    async with _open_waits(host, int(port), ids, made.client_token) as writers:
        await _until_parked(url, open_waits)
        loaded = rss_bytes(pid)
        progress(
            f"    {len(writers):,} open waits parked; RSS {idle / 2**20:.1f} -> "
            f"{loaded / 2**20:.1f} MiB"
        )
    return {
        "memory.rss_idle_mib": idle / 2**20,
        "memory.rss_waits_mib": loaded / 2**20,
        "memory.bytes_per_open_wait": (loaded - idle) / open_waits,
    }


async def _pending_tasks(dsn: str, made: Setup, count: int) -> list[str]:
    """``count`` pending tasks of a pool no worker serves, inserted in batches."""
    pool = create_pool(Settings(database_url=dsn, pool_min_size=1, pool_max_size=2))
    await pool.open(wait=True)
    try:
        repo = BenchTasks(pool)
        ids: list[str] = []
        item = NewTask(owner_id=made.owner, pool_name=made.idle_pool, request_body=BODY)
        while len(ids) < count:
            n = min(1000, count - len(ids))
            ids += [str(t.id) for t in await repo.enqueue_many([item] * n)]
        return ids
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _open_waits(
    host: str, port: int, ids: list[str], token: str
) -> AsyncIterator[list[asyncio.StreamWriter]]:
    writers: list[asyncio.StreamWriter] = []
    try:
        for chunk in range(0, len(ids), 500):
            opened = await asyncio.gather(
                *(_open_wait(host, port, i, token) for i in ids[chunk : chunk + 500])
            )
            writers += opened
        yield writers
    finally:
        for w in writers:
            w.close()


async def _open_wait(host: str, port: int, task_id: str, token: str) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection(host, port)
    writer.write(
        (
            f"GET /v1/tasks/{task_id}/wait?timeout={WAIT_S:g} HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    return writer


async def _until_parked(url: str, count: int) -> None:
    """Poll the replica's open-waits gauge until ``count`` waits are parked.

    A replica busy accepting thousands of waits may answer /metrics slowly: a slow or failed
    scrape is retried until the deadline.
    """
    parked = 0.0
    async with aiohttp.ClientSession() as http:

        async def all_parked() -> bool:
            nonlocal parked
            try:
                text = await _get_text(http, url + "/metrics")
            except (aiohttp.ClientError, TimeoutError):
                return False
            match = re.search(r"^inferq_open_waits(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
            parked = float(match.group(1)) if match else 0.0
            return parked >= count

        await eventually(
            all_parked,
            PARK_TIMEOUT_S,
            lambda: f"{count} open waits to park (only {parked:.0f} did)",
            period_s=0.5,
        )


async def _get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return await resp.text()
