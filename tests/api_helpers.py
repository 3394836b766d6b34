"""Test helpers for the HTTP API: a real replica served by uvicorn on a free port, tokens, and
a worker loop that speaks the worker API over HTTP; and the repository-level enqueue the
integration tests share."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import httpx
import orjson
import psycopg
from psycopg import sql

from inferq.bench.polling import eventually
from inferq.daemon import DrainingServer, Replica, uvicorn_config
from inferq.db.llms import LlmRepository
from inferq.db.pool import create_pool
from inferq.db.tasks import TaskRepository
from inferq.db.tokens import TokenRepository
from inferq.domain.task import Task
from inferq.settings import Settings

POOL = "gpu-a"
MODEL = "echo-model"


@dataclass
class Server:
    """A running replica: its base URL, the replica and the uvicorn server."""

    url: str
    replica: Replica
    server: DrainingServer


class _QuietServer(DrainingServer):
    """Tests run several servers in one process: leave the process's signals alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@contextlib.asynccontextmanager
async def serve_app(
    settings: Settings, dsn: str, *, fast_path: bool = True
) -> AsyncIterator[Server]:
    """A Replica on ``dsn`` behind uvicorn (httptools) on a free port of 127.0.0.1; without
    ``fast_path`` every request goes through FastAPI's own routing."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    async with Replica(settings, dsn) as replica:
        config = uvicorn_config(replica.app(fast_path=fast_path), timeout_graceful_shutdown=2)
        server = _QuietServer(config, replica)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        await eventually(lambda: server.started or task.done())
        assert not task.done(), "the server did not start"
        try:
            yield Server(f"http://127.0.0.1:{port}", replica, server)
        finally:
            server.should_exit = True
            await task
            sock.close()


@dataclass
class Tokens:
    admin: str
    alice: str  # client, owner alice
    bob: str  # client, owner bob
    worker: str  # worker of every pool
    worker_other: str  # worker limited to pool "other"
    ids: dict[str, Any] = field(default_factory=dict)


async def make_tokens(settings: Settings, dsn: str) -> Tokens:
    """Tokens of every kind, and the registry entry MODEL -> POOL."""
    pool = create_pool(settings, dsn)
    await pool.open(wait=True)
    try:
        repo = TokenRepository(pool)
        made = {}
        ids = {}
        for name, owner, role, pools in [
            ("admin", "root", "admin", None),
            ("alice", "alice", "client", None),
            ("bob", "bob", "client", None),
            ("worker", "gpus", "worker", None),
            ("worker_other", "gpus", "worker", ["other"]),
        ]:
            token, secret = await repo.create(owner, role, pools=pools)  # type: ignore[arg-type]
            made[name] = secret
            ids[name] = token.id
        await LlmRepository(pool).put(MODEL, POOL, "echo/1")
    finally:
        await pool.close()
    return Tokens(ids=ids, **made)


BODY = {"messages": [{"role": "user", "content": "hi"}]}


async def enqueue(repo: TaskRepository, pool_name: str = "p1", **kw: Any) -> Task:
    """A pending task of owner alice with BODY, straight through the repository."""
    return (await repo.enqueue(owner_id="alice", pool_name=pool_name, request_body=BODY, **kw)).task


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def count_rows(dsn: str, table: str = "inferq.task") -> int:
    schema, _, name = table.partition(".")
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])


def read_task(dsn: str, task_id: Any) -> dict[str, Any]:
    """The task's row as stored (status as text), read past every API layer."""
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(
            "SELECT id, owner_id, status::text AS status, attempt, claimed_by, response_body, "
            "error_message, claimed_at, lease_expires_at, completed_at "
            "FROM inferq.task WHERE id = %s",
            (task_id,),
        )
        row = cur.fetchone()
        assert row is not None, f"task {task_id} is not in the database"
        assert cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))


async def read_events(
    lines: AsyncIterator[str],
    until: Callable[[dict[str, Any]], bool] | None = None,
    timeout_s: float = 30.0,
) -> list[dict[str, Any]]:
    """SSE frames from ``response.aiter_lines()``, comments skipped, ``data`` decoded when it is
    JSON (``[DONE]`` stays text): until the stream ends, or through the first frame for which
    ``until(frame)`` holds; the same ``lines`` can then be read on. Fails the test when that
    has not happened by the deadline (heartbeats would otherwise keep a stuck stream open)."""
    frames: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    try:
        async with asyncio.timeout(timeout_s):
            async for line in lines:
                if line.startswith(":"):
                    continue
                if not line:
                    if current:
                        frames.append(current)
                        if until is not None and until(current):
                            return frames
                        current = {}
                    continue
                field, _, value = line.partition(": ")
                if field == "data":
                    with contextlib.suppress(orjson.JSONDecodeError):
                        value = orjson.loads(value)
                current[field] = value
    except TimeoutError:
        raise AssertionError(f"the stream was still open at the deadline, after {frames}") from None
    return frames


async def allow_connections(pg_server: Any, dbname: str, allow: bool) -> None:
    """Let the database accept new sessions, or refuse them (open ones carry on)."""
    async with await psycopg.AsyncConnection.connect(pg_server.dsn, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(dbname), sql.Literal(allow)
            )
        )


def last_user_text(request: dict[str, Any]) -> str:
    if "messages" in request:
        return str(request["messages"][-1]["content"])
    return str(request.get("prompt", ""))


def chat_response(task: dict[str, Any], text: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{task['id']}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": task["model"] or MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chat_chunk(task: dict[str, Any], text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{task['id']}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": task["model"] or MODEL,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


@dataclass
class EchoWorker:
    """A worker loop over HTTP: echoes the last message; "FAIL: x" fails with "x".

    Streams one chunk per word, pausing ``gap_s`` before the last one.
    """

    url: str
    token: str
    pools: list[str] = field(default_factory=lambda: [POOL])
    gap_s: float = 0.0
    words_done: Callable[[str], None] | None = None
    handled: int = 0

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=auth(self.token)) as http:
            r = await http.post("/v1/worker/sessions", json={"pools": self.pools, "capacity": 8})
            r.raise_for_status()
            bound = r.json()
            sid = bound["session_id"]
            running: set[asyncio.Task[None]] = set()
            for task in bound["tasks"]:
                running.add(asyncio.create_task(self.handle(http, sid, task)))
            try:
                while True:
                    r = await http.post(
                        f"/v1/worker/sessions/{sid}/claim",
                        json={"max_tasks": 8, "wait_s": 5},
                        timeout=30,
                    )
                    r.raise_for_status()
                    for task in r.json()["tasks"]:
                        t = asyncio.create_task(self.handle(http, sid, task))
                        running.add(t)
                        t.add_done_callback(running.discard)
            finally:
                for t in running:
                    t.cancel()

    async def handle(self, http: httpx.AsyncClient, sid: str, task: dict[str, Any]) -> None:
        holder = {"session_id": sid, "attempt": task["attempt"]}
        text = last_user_text(task["request"])
        if text.startswith("FAIL: "):
            r = await http.post(
                f"/v1/worker/tasks/{task['id']}/fail", json={**holder, "message": text[6:]}
            )
            r.raise_for_status()
            self.handled += 1
            return
        answer = f"echo: {text}"
        if task["streaming"]:
            r = await http.post(f"/v1/worker/tasks/{task['id']}/start", json=holder)
            r.raise_for_status()
            words = answer.split(" ")
            for seq, word in enumerate(words, start=1):
                if seq == len(words) and self.gap_s:
                    await asyncio.sleep(self.gap_s)  # the idle gap the client must survive
                piece = word if seq == 1 else " " + word
                chunk = chat_chunk(task, piece, "stop" if seq == len(words) else None)
                r = await http.post(
                    f"/v1/worker/tasks/{task['id']}/chunks",
                    json={**holder, "chunks": [{"seq": seq, "data": chunk}]},
                )
                r.raise_for_status()
        r = await http.post(
            f"/v1/worker/tasks/{task['id']}/complete",
            json={**holder, "response": chat_response(task, answer)},
        )
        r.raise_for_status()
        self.handled += 1


class _Runs(Protocol):
    async def run(self) -> None: ...


_W = TypeVar("_W", bound=_Runs)


@contextlib.asynccontextmanager
async def running_worker(worker: _W) -> AsyncIterator[_W]:
    """Run ``worker.run()`` for the block; cancelled at its end."""
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task
