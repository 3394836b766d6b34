"""The worker SDK against a real daemon (tests/unit has the fake one): the fallback to the
single complete/fail routes on a daemon that answers 404 ``route_not_found`` for the outcomes
route, and the outcome batch limits of docs/protocol.md (256 outcomes and 512 KiB per call, at
most four calls in flight)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest
from aiohttp import web

from inferq.bench.polling import eventually
from inferq.bench.queries import BenchTasks, NewTask
from inferq.db.cluster import free_port
from inferq.settings import Settings
from inferq.wire import JsonValue, WorkerTask
from inferq.worker import OutcomeBatcher, TaskContext, Worker, WorkerClient
from tests.api_helpers import POOL, Server, Tokens, make_tokens, serve_app

pytestmark = pytest.mark.db

OUTCOMES = "/outcomes"
# What a call carries besides its outcomes: '{"outcomes":[' + commas + '],"claim":0}'.
ENVELOPE = len(b'{"outcomes":[],"claim":0}')


@dataclass
class Call:
    path: str
    outcomes: int = 0  # items in an outcomes call
    outcome_bytes: int = 0  # their encoded size
    status: int | None = None  # None while on the wire
    started: int = 0  # when it left and when its answer came, in events on the wire
    answered: int = 0


@dataclass
class Wire:
    """A reverse proxy between the SDK and the daemon, recording every call; with
    ``older_daemon`` the outcomes route is sent to a path the daemon does not know, so the
    daemon itself answers 404 ``route_not_found`` exactly as a daemon without that route
    would. ``url`` is where the SDK connects (after ``start``)."""

    target: str
    older_daemon: bool = False
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    events: int = 0
    url: str = ""

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        call = Call(request.path)
        path = request.path
        if path.endswith(OUTCOMES):
            count = len(orjson.loads(body)["outcomes"])
            call.outcomes, call.outcome_bytes = count, len(body) - ENVELOPE - count + 1
            if self.older_daemon:
                path += "-of-a-later-version"
        self.calls.append(call)
        self.events += 1
        call.started = self.events
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        try:
            async with self._session.request(
                request.method, self.target + path, data=body, headers=headers
            ) as answer:
                content = await answer.read()
                status, kind = answer.status, answer.content_type
        finally:
            self.in_flight -= 1
        self.events += 1
        call.status, call.answered = status, self.events
        return web.Response(body=content, status=status, content_type=kind)

    async def __aenter__(self) -> Wire:
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=16 << 20)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    def outcome_calls(self) -> list[Call]:
        return [c for c in self.calls if c.path.endswith(OUTCOMES)]


_HOP = {"host", "content-length", "transfer-encoding", "connection"}


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    tokens = await make_tokens(settings, dsn)
    async with serve_app(settings, dsn) as server:
        yield server, tokens


def stored(dsn: str) -> dict[str, tuple[str, Any, str | None]]:
    """Every task as the database has it: id -> (status, response, error message)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id::text, status::text, response_body, error_message FROM inferq.task"
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def enqueue(server: Server, n: int) -> list[str]:
    assert server.replica.pool is not None
    new = [NewTask("alice", POOL, {"messages": [{"role": "user", "content": "hi"}]})] * n
    return [str(t.id) for t in await BenchTasks(server.replica.pool).enqueue_many(new)]


async def test_the_sdk_falls_back_to_the_single_routes_on_a_daemon_without_outcomes(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    ids = await enqueue(server, 6)
    failing = ids[0]

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        if str(task.id) == failing:
            raise RuntimeError("the GPU fell off the bus")
        return {"echo": str(task.id)}

    async with (
        Wire(server.url, older_daemon=True) as wire,
        WorkerClient(wire.url, tokens.worker) as client,
    ):
        worker = Worker(client, [POOL], handler, capacity=6, claim_wait_s=1.0)
        run = asyncio.create_task(worker.run())

        async def all_ended() -> bool:
            return all(status in ("completed", "error") for status, _, _ in stored(dsn).values())

        await eventually(all_ended)
        worker.stop()
        await run
    expected: dict[str, tuple[str, Any, str | None]] = {
        i: ("completed", {"echo": i}, None) for i in ids
    }
    expected[failing] = ("error", None, "the GPU fell off the bus")
    assert stored(dsn) == expected
    tried = wire.outcome_calls()
    assert tried and all(c.status == 404 for c in tried)
    # The 404 is remembered: no outcomes call leaves after the first answer came back.
    first_answer = min(c.answered for c in tried)
    assert all(c.started < first_answer for c in tried)
    singles = [c for c in wire.calls if c.path.endswith(("/complete", "/fail"))]
    assert sorted(c.path.rsplit("/", 1)[1] for c in singles) == ["complete"] * 5 + ["fail"]
    assert all(c.status == 200 for c in singles)
    assert worker.outcomes.batched is False


async def bind_all(client: WorkerClient, n: int) -> tuple[Any, list[WorkerTask]]:
    bound = await client.bind([POOL], capacity=n)
    assert len(bound.tasks) == n
    return bound.session_id, bound.tasks


async def test_a_call_carries_at_most_256_outcomes_with_at_most_four_calls_in_flight(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    await enqueue(server, 1100)
    async with Wire(server.url) as wire, WorkerClient(wire.url, tokens.worker) as client:
        sid, tasks = await bind_all(client, 1100)
        batcher = OutcomeBatcher(client)
        # All finish in one tick: only the limits split them.
        await asyncio.gather(*(batcher.complete(t, sid, {"n": str(t.id)}) for t in tasks))
    calls = wire.outcome_calls()
    assert sorted(c.outcomes for c in calls) == [76, 256, 256, 256, 256]
    assert all(c.status == 200 for c in calls)
    assert wire.max_in_flight <= 4
    assert stored(dsn) == {str(t.id): ("completed", {"n": str(t.id)}, None) for t in tasks}


async def test_a_call_carries_at_most_512_kib_of_outcomes(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    await enqueue(server, 40)
    text = "x" * 30_000  # 40 of them (1.2 MB) would pass the daemon's 1 MiB body limit
    async with Wire(server.url) as wire, WorkerClient(wire.url, tokens.worker) as client:
        sid, tasks = await bind_all(client, 40)
        batcher = OutcomeBatcher(client)
        await asyncio.gather(*(batcher.complete(t, sid, {"text": text}) for t in tasks))
    calls = wire.outcome_calls()
    assert sum(c.outcomes for c in calls) == 40
    assert all(c.status == 200 and c.outcome_bytes <= 512 * 1024 for c in calls), calls
    assert not [c for c in wire.calls if c.path.endswith("/complete")]  # none refused
    assert stored(dsn) == {str(t.id): ("completed", {"text": text}, None) for t in tasks}
