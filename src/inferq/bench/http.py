"""HTTP end to end: two `inferq serve` replicas, echo workers, sync chat completions, memory.

Design decisions:

- Everything is a real process started from the installed `inferq` command, as a user would
  run it: `inferq migrate`, two `inferq serve` replicas on free loopback ports against the
  same database, and `inferq worker --backend echo` processes (no delay), one per replica.
  Tokens and the LLM entry are created through the repositories before the replicas start.
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
- Memory (``measure_wait_memory``, a replica of its own with no worker): its resident set
  (VmRSS from /proc) is read idle, then with ``open_waits`` native ``GET /v1/tasks/{id}/wait``
  long-polls parked on pending tasks of a pool no worker serves. The long-polls are raw
  sockets (a request written, the answer never read), so the load generator stays small; the
  replica's ``inferq_open_waits`` gauge says when all of them are parked. The difference
  divided by the count is the cost of one open wait: its socket, its ASGI request, its waiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from inferq.bench.queries import BenchTasks, NewTask
from inferq.db.cluster import free_port
from inferq.db.llms import LlmRepository
from inferq.db.pool import create_pool
from inferq.db.tokens import TokenRepository
from inferq.runtime import run
from inferq.settings import Settings

WORKER_CAPACITY = 32
WARMUP_PER_CLIENT = 5
READY_TIMEOUT_S = 60.0
PARK_TIMEOUT_S = 300.0
WAIT_S = 3600.0  # longer than any run, so no wait ends while we measure
BODY = {"model": "", "messages": [{"role": "user", "content": "hello from the benchmark"}]}


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Any = field(repr=False)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.log.close()

    def tail(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read()[-2000:].decode(errors="replace")


@dataclass
class _Setup:
    # An owner of its own: the per-owner pending limit must not count other scenarios' tasks.
    owner: str
    pool_name: str
    idle_pool: str
    model: str
    client_token: str
    worker_token: str


def measure_http(
    dsn: str, *, requests: int, clients: int, progress: Callable[[str], None]
) -> dict[str, float]:
    """One run of sync chat completions through two replicas and two echo workers.

    Starts and stops every process it needs; raises RuntimeError with a process's log tail
    when one does not come up.
    """
    env, setup = _setup(dsn, requests)
    with _processes() as procs:
        urls = _start_replicas(procs, 2, env)
        # The token travels in the environment, never in argv.
        worker_env = {**env, "INFERQ_WORKER_TOKEN": setup.worker_token}
        for i, url in enumerate(urls):
            procs.append(_spawn(f"worker{i}", _worker_args(url, setup, i), worker_env))
        progress(f"    2 replicas and 2 echo workers up; {clients} clients, {requests} requests")
        pids = [proc.popen.pid for proc in procs]
        # One client first: the latency of a request that does not queue behind others.
        alone = run(_load(urls, setup, requests=max(20, requests // 10), clients=1, pids=pids))
        figures: dict[str, float] = run(
            _load(urls, setup, requests=requests, clients=clients, pids=pids)
        )
    figures["http.p50_1_client_ms"] = alone["http.p50_ms"]
    loadgen_ms = figures["http.loadgen_cpu_ms_per_request"]
    progress(
        f"    {figures['http.tasks_per_s']:,.0f} tasks/s, p50 {figures['http.p50_ms']:.1f} ms; "
        f"one client alone: p50 {alone['http.p50_ms']:.1f} ms; load generator "
        f"{loadgen_ms:.2f} ms CPU per request"
    )
    return figures


def measure_wait_memory(
    dsn: str, *, open_waits: int, progress: Callable[[str], None]
) -> dict[str, float]:
    """Resident memory of one replica idle and with ``open_waits`` parked long-polls.

    The replica's safety poll is set to an hour: with the default (seconds), every parked wait
    re-reads its row each period, which keeps a replica with 10,000 waits busy (see
    the README's Performance section) and is a CPU cost, not a memory one.
    """
    env, setup = _setup(dsn, open_waits)
    env["INFERQ_SAFETY_POLL_S"] = "3600"
    with _processes() as procs:
        (url,) = _start_replicas(procs, 1, env)
        figures = dict(run(_memory(dsn, url, procs[0].popen.pid, setup, open_waits, progress)))
    figures["memory.uvicorn_floor_bytes_per_request"] = _uvicorn_floor(open_waits, progress)
    return figures


def _uvicorn_floor(open_waits: int, progress: Callable[[str], None]) -> float:
    """RSS per parked request of an app that holds nothing (inferq.bench.parked_app), on the
    uvicorn settings of `inferq serve`: the part of an open wait's cost that is the HTTP
    stack's own."""
    port = free_port()
    env = {**os.environ, "INFERQ_MAX_CONNECTIONS": str(open_waits + 1000)}
    with _processes() as procs:
        procs.append(_spawn("parked", ["-m", "inferq.bench.parked_app", str(port)], env, raw=True))
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, procs[0], path="/parked")
        return float(run(_floor(url, procs[0].popen.pid, open_waits, progress)))


async def _floor(url: str, pid: int, count: int, progress: Callable[[str], None]) -> float:
    await asyncio.sleep(1.0)
    idle = rss_bytes(pid)
    host, port = url.removeprefix("http://").split(":")
    ids = [str(uuid.uuid4()) for _ in range(count)]
    async with _open_waits(host, int(port), ids, "not-checked"), aiohttp.ClientSession() as http:
        deadline = time.monotonic() + PARK_TIMEOUT_S
        while int(await _get_text(http, url + "/parked")) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the bare app did not park {count} requests in time")
            await asyncio.sleep(0.5)
        loaded = rss_bytes(pid)
    progress(
        f"    bare uvicorn app: {count:,} parked requests; RSS {idle / 2**20:.1f} -> "
        f"{loaded / 2**20:.1f} MiB, {(loaded - idle) / count:,.0f} B each"
    )
    return (loaded - idle) / count


def _setup(dsn: str, load: int) -> tuple[dict[str, str], _Setup]:
    """The replicas' environment (limits above the load) and a migrated, provisioned database."""
    _raise_fd_limit(load + 1000)
    env = {
        **os.environ,
        "INFERQ_DATABASE_URL": dsn,
        "INFERQ_LOG_LEVEL": "warning",
        "INFERQ_MAX_WAITS_PER_TOKEN": str(load + 100),
        "INFERQ_MAX_PENDING_PER_TOKEN": str(load + 1000),
        "INFERQ_MAX_WAIT_S": str(WAIT_S),
        "INFERQ_MAX_CONNECTIONS": str(load + 1000),
    }
    _inferq(["migrate"], env)
    return env, run(_prepare(dsn))


def _start_replicas(procs: list[_Proc], count: int, env: dict[str, str]) -> list[str]:
    urls = []
    for i in range(count):
        port = free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        procs.append(_spawn(f"serve{i}", args, env))
        urls.append(f"http://127.0.0.1:{port}")
    for url, proc in zip(urls, procs[-count:], strict=True):
        _wait_ready(url, proc)
    return urls


def _worker_args(url: str, setup: _Setup, i: int) -> list[str]:
    return [
        "worker",
        "--url",
        url,
        "--pool",
        setup.pool_name,
        "--capacity",
        str(WORKER_CAPACITY),
        "--backend",
        "echo",
        "--name",
        f"bench-{i}",
    ]


# -- setup ----------------------------------------------------------------------------------


def _raise_fd_limit(wanted: int) -> None:
    """Each open wait is a socket at both ends; children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _inferq(args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "inferq", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"inferq {' '.join(args)} failed: {out.stderr[-1000:]}")
    return out.stdout


async def _prepare(dsn: str) -> _Setup:
    """Tokens, the LLM entry, and the pending tasks the open waits will park on."""
    suffix = uuid.uuid4().hex[:8]
    setup = _Setup(
        owner=f"bench-http-{suffix}",
        pool_name=f"bench-http-{suffix}",
        idle_pool=f"bench-idle-{suffix}",
        model=f"bench-echo-{suffix}",
        client_token="",
        worker_token="",
    )
    pool = create_pool(Settings(database_url=dsn, pool_min_size=1, pool_max_size=2))
    await pool.open(wait=True)
    try:
        tokens = TokenRepository(pool)
        _, setup.client_token = await tokens.create(setup.owner, "client", label="inferq bench")
        _, setup.worker_token = await tokens.create(
            setup.owner, "worker", pools=[setup.pool_name], label="inferq bench"
        )
        await LlmRepository(pool).put(setup.model, setup.pool_name)
        return setup
    finally:
        await pool.close()


@contextlib.contextmanager
def _processes() -> Iterator[list[_Proc]]:
    procs: list[_Proc] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()


def _spawn(name: str, args: list[str], env: dict[str, str], *, raw: bool = False) -> _Proc:
    """``python -m inferq ARGS`` (``python ARGS`` with ``raw``), logging to a temporary file."""
    import tempfile

    log = tempfile.NamedTemporaryFile(prefix=f"inferq-bench-{name}-", suffix=".log")  # noqa: SIM115
    popen = subprocess.Popen(
        [sys.executable, *args] if raw else [sys.executable, "-m", "inferq", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    return _Proc(name, popen, log)


def _wait_ready(url: str, proc: _Proc, path: str = "/readyz") -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.tail()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url + path, timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} was not ready in {READY_TIMEOUT_S:g}s: {proc.tail()}")


# -- throughput -----------------------------------------------------------------------------


async def _load(
    urls: list[str], setup: _Setup, *, requests: int, clients: int, pids: list[int]
) -> dict[str, float]:
    body = orjson.dumps({**BODY, "model": setup.model})
    samples: list[float] = []
    remaining = requests
    headers = {
        "Authorization": f"Bearer {setup.client_token}",
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
                await _post(http, url, body)
            await start.wait()
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                await _post(http, url, body)
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
    samples.sort()
    return {
        "http.server_cpu_ms_per_task": cpu / len(samples) * 1000,
        "http.loadgen_cpu_ms_per_request": own / len(samples) * 1000,
        "http.tasks_per_s": len(samples) / elapsed,
        "http.p50_ms": samples[len(samples) // 2] * 1000,
        "http.p99_ms": samples[min(len(samples) - 1, round(0.99 * (len(samples) - 1)))] * 1000,
    }


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with http.post(url, data=body) as resp:
        content = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {content[:300].decode(errors='replace')}")


async def _get_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return await resp.text()


async def _until_waiting(start: asyncio.Event, tasks: list[asyncio.Task[None]], n: int) -> None:
    """Return once every client task is parked on ``start`` (or one failed)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        failed = [t for t in tasks if t.done()]
        if failed:
            await failed[0]  # raises the client's error
        parked = sum(1 for t in tasks if _parked_on(t, start))
        if parked >= n:
            return
        await asyncio.sleep(0.01)
    raise RuntimeError("the HTTP clients did not warm up in 120 s")


def _parked_on(task: asyncio.Task[None], event: asyncio.Event) -> bool:
    waiter = getattr(task, "_fut_waiter", None)
    return waiter is not None and waiter in getattr(event, "_waiters", ())


# -- memory ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc/PID/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"VmRSS:\s+(\d+) kB", f.read())
    if match is None:
        raise RuntimeError(f"no VmRSS for process {pid}")
    return int(match.group(1)) * 1024


async def _memory(
    dsn: str,
    url: str,
    pid: int,
    setup: _Setup,
    open_waits: int,
    progress: Callable[[str], None],
) -> dict[str, float]:
    ids = await _pending_tasks(dsn, setup, open_waits)
    await asyncio.sleep(1.0)  # let the replica settle after the load phase
    idle = rss_bytes(pid)
    host, port = url.removeprefix("http://").split(":")
    async with _open_waits(host, int(port), ids, setup.client_token) as writers:
        await _until_parked(url, open_waits, progress)
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


async def _pending_tasks(dsn: str, setup: _Setup, count: int) -> list[str]:
    """``count`` pending tasks of a pool no worker serves, inserted in batches."""
    pool = create_pool(Settings(database_url=dsn, pool_min_size=1, pool_max_size=2))
    await pool.open(wait=True)
    try:
        repo = BenchTasks(pool)
        ids: list[str] = []
        item = NewTask(owner_id=setup.owner, pool_name=setup.idle_pool, request_body=BODY)
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


async def _until_parked(url: str, count: int, progress: Callable[[str], None]) -> None:
    """Poll the replica's open-waits gauge until ``count`` waits are parked.

    A replica busy accepting thousands of waits may answer /metrics slowly: a slow or failed
    scrape is retried until the deadline.
    """
    deadline = time.monotonic() + PARK_TIMEOUT_S
    parked = 0.0
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                text = await _get_text(http, url + "/metrics")
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.5)
                continue
            match = re.search(r"^inferq_open_waits(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
            parked = float(match.group(1)) if match else 0.0
            if parked >= count:
                return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"only {parked:.0f} of {count} open waits parked in {PARK_TIMEOUT_S:g} s")
