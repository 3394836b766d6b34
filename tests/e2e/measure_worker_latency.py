"""Measure enqueue -> worker-handler-start latency (idle worker) and death -> rerun time.

Run by hand: ``python tests/e2e/measure_worker_latency.py [--tasks 200]``. Starts a private
PostgreSQL, one `inferq serve`, an in-process SDK worker whose handler records when it begins,
then submits tasks one at a time (the worker is idle at each submit). Prints p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from inferq.bench.stats import percentile
from inferq.db.cluster import PrivateCluster
from inferq.db.migrations import Migrator
from inferq.wire import JsonValue, WorkerTask
from inferq.worker import TaskContext, Worker, WorkerClient
from tests.e2e.procs import MODEL, Stack, words

SUBMIT_RTT: list[float] = []


async def enqueue_to_start(stack: Stack, n: int) -> list[float]:
    started: dict[str, float] = {}
    arrived = asyncio.Event()

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        started[str(task.id)] = time.perf_counter()
        arrived.set()
        return {"ok": True}

    lat: list[float] = []
    async with WorkerClient(stack.url, stack.worker_token) as client:
        worker = Worker(client, ["default"], handler, capacity=1)
        run = asyncio.create_task(worker.run())
        headers = {"Authorization": f"Bearer {stack.client_token}"}
        async with httpx.AsyncClient(base_url=stack.url, headers=headers) as http:
            body = {"model": MODEL, "request": {"messages": [{"role": "user", "content": "x"}]}}
            for i in range(n + 10):
                arrived.clear()
                t0 = time.perf_counter()
                resp = await http.post("/v1/tasks", json=body)
                task_id = resp.json()["id"]
                if i >= 10:
                    SUBMIT_RTT.append(time.perf_counter() - t0)
                await asyncio.wait_for(arrived.wait(), 30)
                if i >= 10:  # warm-up
                    lat.append(started[task_id] - t0)
                await http.get(f"/v1/tasks/{task_id}/wait", params={"timeout": 10})
        worker.stop()
        await run
    return lat


def death_to_rerun(stack: Stack, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        first = stack.worker("--backend", "echo", "--echo-delay", "0.1")
        first.wait_event("session_bound")
        task_id = stack.submit(words(100), streaming=True)["id"]
        first.wait_event("task_claimed", task_id=task_id)
        second = stack.worker("--backend", "echo")
        second.wait_event("session_bound")
        first.signal(signal.SIGKILL)
        killed = time.time()
        claim = second.wait_event("task_claimed", timeout_s=60, task_id=task_id)
        out.append(datetime.fromisoformat(claim["timestamp"]).timestamp() - killed)
        second.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--deaths", type=int, default=3)
    args = parser.parse_args()
    cluster = PrivateCluster(Path(tempfile.mkdtemp(prefix="inferq-measure-pg-")))
    cluster.start()
    try:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("CREATE DATABASE measure")
        dsn = cluster.dsn_for("measure")
        Migrator(dsn).migrate()
        stack = Stack(dsn, env_overrides={"INFERQ_LOG_LEVEL": "warning"}).start()
        try:
            lat = asyncio.run(enqueue_to_start(stack, args.tasks))
            ms: dict[str, Any] = {
                "p50": statistics.median(lat) * 1000,
                "p99": percentile(lat, 0.99) * 1000,
            }
            print(
                f"enqueue -> handler start, idle worker, n={len(lat)}: "
                f"p50 {ms['p50']:.1f} ms, p99 {ms['p99']:.1f} ms"
            )
            print(
                "  (of which the submit round trip: "
                f"p50 {statistics.median(SUBMIT_RTT) * 1000:.1f} ms)"
            )
            deaths = death_to_rerun(stack, args.deaths)
            print(
                "worker death -> task claimed elsewhere (lease 2 s, TTL 2 s, sweep 0.5 s): "
                + ", ".join(f"{d:.2f}s" for d in deaths)
            )
        finally:
            stack.stop()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main()
