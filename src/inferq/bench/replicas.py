"""The processes of the HTTP scenarios: a provisioned database and `inferq serve` replicas.

Everything is a real process started from the installed `inferq` command, as a user would
run it: `inferq migrate`, then `inferq serve` replicas on free loopback ports against the same
database. Tokens and the LLM entry are created through the repositories before the replicas
start. Each process logs to a temporary file, removed once the process is stopped.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inferq.bench.processes import Proc
from inferq.db.cluster import free_port
from inferq.db.llms import LlmRepository
from inferq.db.pool import create_pool
from inferq.db.tokens import TokenRepository
from inferq.runtime import run
from inferq.settings import Settings

READY_TIMEOUT_S = 60.0
WAIT_S = 3600.0  # longer than any run, so no wait ends while we measure
BODY = {"model": "", "messages": [{"role": "user", "content": "hello from the benchmark"}]}


@dataclass
class Setup:
    # An owner of its own: the per-owner pending limit must not count other scenarios' tasks.
    owner: str
    pool_name: str
    idle_pool: str
    model: str
    client_token: str
    worker_token: str


def setup(dsn: str, load: int) -> tuple[dict[str, str], Setup]:
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


def start_replicas(procs: list[Proc], count: int, env: dict[str, str]) -> list[str]:
    """Start ``count`` replicas (appended to ``procs``); their URLs, once all are ready."""
    urls = []
    for i in range(count):
        port = free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        procs.append(spawn(f"serve{i}", args, env))
        urls.append(f"http://127.0.0.1:{port}")
    for url, proc in zip(urls, procs[-count:], strict=True):
        proc.wait_http(url + "/readyz", READY_TIMEOUT_S)
    return urls


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """A list to append started processes to; each is stopped, last first, and its log
    removed on exit."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()
            proc.log.unlink(missing_ok=True)


def spawn(name: str, args: list[str], env: dict[str, str], *, raw: bool = False) -> Proc:
    """``python -m inferq ARGS`` (``python ARGS`` with ``raw``), logging to a temporary file.

    The child stays in the bench's session, so it ends with the bench's terminal.
    """
    fd, log = tempfile.mkstemp(prefix=f"inferq-bench-{name}-", suffix=".log")
    os.close(fd)
    argv = [sys.executable, *args] if raw else [sys.executable, "-m", "inferq", *args]
    return Proc(name, argv, env, Path(log)).start(new_session=False)


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


async def _prepare(dsn: str) -> Setup:
    """Tokens and the LLM entry of a run of its own."""
    suffix = uuid.uuid4().hex[:8]
    made = Setup(
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
        _, made.client_token = await tokens.create(made.owner, "client", label="inferq bench")
        _, made.worker_token = await tokens.create(
            made.owner, "worker", pools=[made.pool_name], label="inferq bench"
        )
        await LlmRepository(pool).put(made.model, made.pool_name)
        return made
    finally:
        await pool.close()
