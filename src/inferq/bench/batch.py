"""The Batch API end to end: one large batch through two replicas and echo workers.

Design decisions:

- The processes are real ones (inferq.bench.replicas): two `inferq serve` replicas and one
  `inferq worker --backend echo` per replica, as the http scenario runs them. The batch sweep
  runs every second (INFERQ_BATCH_INTERVAL_S=1) so its period does not dominate the timings.
- The phases are timed as a client sees them, over HTTP: the upload (``POST /v1/files``,
  streamed from a file on disk), ingest (upload start → the batch is ``in_progress``: the
  file validated and every line a task), completion (``in_progress`` → ``completed``: the
  lines run and the output file written) and the download of the output file (streamed to
  disk, its lines counted: one per ``custom_id``).
- Each replica's resident set is sampled every 20 ms by a thread; the peak over the upload
  and over the download is the figure (the target: bounded memory whatever the file size).
- Interactive latency: sync chat completions from one client, one after another, first on
  the idle queue, then while the batch's lines are in the queue; the figure is the ratio of
  the two medians. Batch lines run in the ``batch`` lane, so an interactive request should not
  wait behind them.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from inferq.bench.http import post_completion, worker_args
from inferq.bench.processes import rss_bytes
from inferq.bench.replicas import BODY, Setup, processes, setup, spawn, start_replicas
from inferq.runtime import run

ENDPOINT = "/v1/chat/completions"
INTERACTIVE_REQUESTS = 50
POLL_S = 0.25
TIMEOUT_S = 1800.0
MIB = 2**20

Progress = Callable[[str], None]


def measure_batch(dsn: str, *, lines: int, progress: Progress) -> dict[str, float]:
    """One batch of ``lines`` requests, from upload to download; raises when a process does
    not come up, a call fails, or the output is not one line per request."""
    env, made = setup(dsn, lines)
    env = {**env, "INFERQ_BATCH_INTERVAL_S": "1", "INFERQ_MAX_BATCH_REQUESTS": str(lines)}
    with tempfile.TemporaryDirectory(prefix="inferq-bench-batch-") as tmp, processes() as procs:
        source = Path(tmp) / "input.jsonl"
        size = _write_input(source, made.model, lines)
        urls = start_replicas(procs, 2, env)
        worker_env = {**env, "INFERQ_WORKER_TOKEN": made.worker_token}
        for i, url in enumerate(urls):
            procs.append(spawn(f"worker{i}", worker_args(url, made, i), worker_env))
        progress(f"    2 replicas and 2 echo workers up; {lines:,} lines, {size / MIB:.1f} MiB")
        pids = [p.pid for p in procs[:2]]
        output = Path(tmp) / "output.jsonl"
        figures = run(_run(urls, made, (source, size), output, lines, pids, progress))
    figures["batch.input_mib"] = size / MIB
    return figures


async def _run(
    urls: list[str],
    made: Setup,
    upload: tuple[Path, int],
    target: Path,
    lines: int,
    pids: list[int],
    progress: Progress,
) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {made.client_token}"}
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        idle = await _interactive(http, urls[1], made, until=None)
        started = time.perf_counter()
        with _peak_rss(pids) as upload_peak:
            file_id = await _upload(http, urls[0], upload[0])
        uploaded = time.perf_counter()
        batch = await _post_json(
            http,
            urls[0] + "/v1/batches",
            {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"},
        )
        batch = await _until(http, urls[1], batch["id"], lambda b: b["status"] != "validating")
        if batch["status"] != "in_progress":
            raise RuntimeError(f"the batch did not start: {batch.get('errors')}")
        ingested = time.perf_counter()
        progress(
            f"    uploaded in {uploaded - started:.1f}s, in progress after "
            f"{ingested - started:.1f}s"
        )
        running = asyncio.Event()
        running.set()
        busy = asyncio.create_task(_interactive(http, urls[1], made, until=running))
        batch = await _until(http, urls[1], batch["id"], _ended, progress=progress)
        running.clear()
        finished = time.perf_counter()
        during = await busy
        if batch["status"] != "completed":
            raise RuntimeError(f"the batch ended {batch['status']}: {batch.get('errors')}")
        t0 = time.perf_counter()
        with _peak_rss(pids) as download_peak:
            got, size = await _download(http, urls[1], batch["output_file_id"], target)
        downloaded = time.perf_counter() - t0
    if got != lines:
        raise RuntimeError(f"the output file has {got} lines for {lines} requests")
    idle_p50 = statistics.median(idle)
    during_p50 = statistics.median(during) if during else float("nan")
    progress(
        f"    completed {ingested - started + finished - ingested:.1f}s after the upload "
        f"began; interactive p50 {idle_p50 * 1000:.1f} ms idle, {during_p50 * 1000:.1f} ms "
        f"during ({len(during)} requests)"
    )
    return {
        "batch.upload_mib_per_s": upload[1] / MIB / (uploaded - started),
        "batch.ingest_lines_per_s": lines / (ingested - started),
        "batch.completion_lines_per_s": lines / (finished - ingested),
        "batch.download_mib_per_s": size / MIB / downloaded,
        "batch.upload_peak_rss_mib": upload_peak() / MIB,
        "batch.download_peak_rss_mib": download_peak() / MIB,
        "batch.interactive_idle_p50_ms": idle_p50 * 1000,
        "batch.interactive_busy_p50_ms": during_p50 * 1000,
        "batch.interactive_p50_ratio": during_p50 / idle_p50,
    }


def _write_input(path: Path, model: str, lines: int) -> int:
    with path.open("wb") as f:
        for i in range(lines):
            body = {**BODY, "model": model, "messages": [{"role": "user", "content": f"line {i}"}]}
            line = {"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": body}
            f.write(orjson.dumps(line) + b"\n")
    return path.stat().st_size


async def _upload(http: aiohttp.ClientSession, url: str, source: Path) -> str:
    with source.open("rb") as f:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", f, filename=source.name, content_type="application/jsonl")
        async with http.post(url + "/v1/files", data=form) as resp:
            body = await _json(resp)
    return str(body["id"])


async def _download(
    http: aiohttp.ClientSession, url: str, file_id: str, target: Path
) -> tuple[int, int]:
    """Stream the file to ``target``; (its line count, its size)."""
    count = size = 0
    async with http.get(f"{url}/v1/files/{file_id}/content") as resp:
        if resp.status != 200:
            await _json(resp)
        with target.open("wb") as out:
            async for piece in resp.content.iter_chunked(1 << 16):
                out.write(piece)
                count += piece.count(b"\n")
                size += len(piece)
    return count, size


async def _interactive(
    http: aiohttp.ClientSession, url: str, made: Setup, *, until: asyncio.Event | None
) -> list[float]:
    """Latencies of sync chat completions sent one after another: INTERACTIVE_REQUESTS of
    them, or (given ``until``) as many as fit while it stays set, at most that many."""
    body = orjson.dumps({**BODY, "model": made.model})
    headers = {"Content-Type": "application/json"}
    samples: list[float] = []
    while len(samples) < INTERACTIVE_REQUESTS and (until is None or until.is_set()):
        t0 = time.perf_counter()
        await post_completion(http, url + "/v1/chat/completions", body, headers=headers)
        samples.append(time.perf_counter() - t0)
        if until is not None:
            await asyncio.sleep(0.1)  # spread over the batch's run, not all at its start
    return samples


def _ended(batch: dict[str, Any]) -> bool:
    return batch["status"] in ("completed", "failed", "expired", "cancelled")


async def _until(
    http: aiohttp.ClientSession,
    url: str,
    batch_id: str,
    done: Callable[[dict[str, Any]], bool],
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Poll the batch (as a client would) until ``done``; progress every 10 s."""
    deadline = time.monotonic() + TIMEOUT_S
    shown = time.monotonic()
    while True:
        async with http.get(f"{url}/v1/batches/{batch_id}") as resp:
            batch = await _json(resp)
        if done(batch):
            return batch
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still {batch['status']} after {TIMEOUT_S:g}s")
        if progress is not None and time.monotonic() - shown > 10:
            shown = time.monotonic()
            counts = batch["request_counts"]
            progress(f"    {batch['status']}: {counts['completed']:,} of {counts['total']:,}")
        await asyncio.sleep(POLL_S)


async def _post_json(http: aiohttp.ClientSession, url: str, body: Any) -> dict[str, Any]:
    async with http.post(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    ) as resp:
        return await _json(resp)


async def _json(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    content = await resp.read()
    if resp.status >= 400:
        raise RuntimeError(f"HTTP {resp.status} from {resp.url}: {content[:300]!r}")
    body: dict[str, Any] = orjson.loads(content)
    return body


@contextmanager
def _peak_rss(pids: list[int], period_s: float = 0.02) -> Iterator[Callable[[], int]]:
    """The highest resident set of any of ``pids`` seen while the block runs (sampled)."""
    peak = max(rss_bytes(pid) for pid in pids)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(period_s):
            peak = max(peak, *(rss_bytes(pid) for pid in pids))

    thread = threading.Thread(target=sample, name="inferq-bench-rss", daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()
