"""A claimed task the worker never acknowledges goes back to the queue within
INFERQ_CLAIM_ACK_S, not a whole lease later (issue #13, point 11): a frozen worker's tasks move
on; a start, a heartbeat naming the task, or an outcome acknowledges it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from inferq.bench.polling import eventually
from inferq.db.tasks import TaskRepository
from inferq.maintenance import Rescuer
from inferq.settings import Settings
from inferq.wire import JsonValue, WorkerTask
from inferq.worker import TaskContext, Worker, WorkerClient
from tests.api_helpers import (
    POOL,
    Server,
    Tokens,
    auth,
    make_tokens,
    read_task,
    serve_app,
)

pytestmark = pytest.mark.db

ACK_S = 1.0
# For the tests whose verdict must not depend on how fast this machine is: the replica's own
# rescuer (every half second) cannot take a claim back before the test looks at it, and the
# worker's early heartbeat (at a third of it) has seconds to spare.
PATIENT_ACK_S = 3.0


async def _app(settings: Settings, dsn: str, ack_s: float) -> AsyncIterator[tuple[Server, Tokens]]:
    quick = settings.model_copy(update={"claim_ack_s": ack_s, "lease_s": 60, "heartbeat_s": 20})
    tokens = await make_tokens(quick, dsn)
    async with serve_app(quick, dsn) as server:
        yield server, tokens


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    async for made in _app(settings, dsn, ACK_S):
        yield made


@pytest.fixture
async def patient_app(settings: Settings, dsn: str) -> AsyncIterator[tuple[Server, Tokens]]:
    async for made in _app(settings, dsn, PATIENT_ACK_S):
        yield made


async def submit(http: httpx.AsyncClient, tokens: Tokens, n: int = 1) -> list[str]:
    return [
        (
            await http.post(
                "/v1/tasks", json={"pool": POOL, "request": {}}, headers=auth(tokens.alice)
            )
        ).json()["id"]
        for _ in range(n)
    ]


async def db_now(server: Server) -> Any:
    assert server.replica.pool is not None
    async with server.replica.pool.connection() as conn:
        row = await (await conn.execute("SELECT now()")).fetchone()
    assert row is not None
    return row[0]


async def test_only_the_acknowledged_claims_survive_their_first_lease(
    patient_app: tuple[Server, Tokens],
) -> None:
    server, tokens = patient_app
    worker = auth(tokens.worker)
    async with httpx.AsyncClient(base_url=server.url, headers=worker, timeout=30) as http:
        ignored, beaten, started = await submit(http, tokens, 3)
        bound = (
            await http.post("/v1/worker/sessions", json={"pools": [POOL], "capacity": 3})
        ).json()
        sid = bound["session_id"]
        held = {t["id"]: t for t in bound["tasks"]}
        assert set(held) == {ignored, beaten, started}
        assert bound["claim_ack_s"] == PATIENT_ACK_S
        beat = await http.post(f"/v1/worker/sessions/{sid}/heartbeat", json={"tasks": [beaten]})
        assert beat.status_code == 200
        start = await http.post(
            f"/v1/worker/tasks/{started}/start",
            json={"session_id": sid, "attempt": held[started]["attempt"]},
        )
        assert start.status_code == 200
    # Past the claim's first lease (database time; no waiting), the rescuer's sweep.
    assert server.replica.pool is not None
    rescued = await Rescuer(TaskRepository(server.replica.pool)).run_once(
        now=await db_now(server) + timedelta(seconds=PATIENT_ACK_S * 2)
    )
    assert [str(t.id) for t in rescued] == [ignored]
    assert rescued[0].status.value == "pending"


async def test_a_frozen_workers_claim_goes_to_another_worker_within_the_ack_time(
    app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = app
    async with httpx.AsyncClient(
        base_url=server.url, headers=auth(tokens.worker), timeout=30
    ) as http:
        frozen = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()
        poll = asyncio.create_task(
            http.post(f"/v1/worker/sessions/{frozen['session_id']}/claim", json={"wait_s": 20})
        )
        [task_id] = await submit(http, tokens)
        handed = (await poll).json()["tasks"]  # the answer a frozen worker would never read
        assert [t["id"] for t in handed] == [task_id]
        other = (await http.post("/v1/worker/sessions", json={"pools": [POOL]})).json()
        # The maintenance loop gives the task back; the other worker's long-poll takes it.
        again = await http.post(
            f"/v1/worker/sessions/{other['session_id']}/claim", json={"wait_s": 20}
        )
    [second] = again.json()["tasks"]
    assert (second["id"], second["attempt"]) == (task_id, 2)
    assert str(read_task(dsn, task_id)["claimed_by"]) == other["session_id"]


async def test_the_sdk_acknowledges_a_long_unstreamed_task_in_time(
    patient_app: tuple[Server, Tokens], dsn: str
) -> None:
    server, tokens = patient_app
    running = asyncio.Event()
    release = asyncio.Event()

    async def slow(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        running.set()
        await release.wait()
        return {"done": True}

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        WorkerClient(server.url, tokens.worker) as client,
    ):
        [task_id] = await submit(http, tokens)
        worker = Worker(client, [POOL], slow, capacity=1, claim_wait_s=5)
        run = asyncio.create_task(worker.run())
        await running.wait()

        async def lease_extended() -> bool:
            row = await asyncio.to_thread(read_task, dsn, task_id)
            return bool(row["lease_expires_at"] - row["claimed_at"] > timedelta(seconds=30))

        # The worker's early heartbeat names the task: its lease becomes the full one
        # (a deadline inside the claim's first lease; the regular heartbeat is 20 s away).
        await eventually(lease_extended, timeout_s=PATIENT_ACK_S * 0.9, period_s=0.05)
        release.set()
        worker.stop()
        await run
    row = read_task(dsn, task_id)
    assert (row["status"], row["attempt"]) == ("completed", 1)
