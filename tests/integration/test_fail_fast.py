"""Fail fast and say why (issue #13, points 5 and 10): no silent hangs, no silent caps, and
expected conditions logged as such."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import structlog

from inferq.api.errors import log_failure
from inferq.errors import DatabaseError, NoWorkerAvailable, ShuttingDown, TaskFailed
from inferq.settings import Settings
from tests.api_helpers import (
    MODEL,
    POOL,
    Server,
    Tokens,
    auth,
    make_tokens,
    read_task,
    serve_app,
)

pytestmark = pytest.mark.db

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "anyone there?"}]}


@dataclass
class App:
    server: Server
    tokens: Tokens

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.server.url, headers=auth(self.tokens.alice), timeout=30
        )


@pytest.fixture
async def app(settings: Settings, dsn: str) -> AsyncIterator[App]:
    quick = settings.model_copy(update={"no_worker_wait_s": 0.3, "max_wait_s": 60})
    tokens = await make_tokens(quick, dsn)
    async with serve_app(quick, dsn) as server:
        yield App(server, tokens)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_call_for_a_pool_no_worker_serves_fails_fast_and_cancels_its_task(
    app: App, dsn: str, stream: bool
) -> None:
    async with app.http() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "no_worker_available")
    assert POOL in error["message"] and "INFERQ_NO_WORKER_WAIT_S" in error["message"]
    assert r.headers["retry-after"]
    assert read_task(dsn, r.headers["x-inferq-task-id"])["status"] == "cancelled"


async def test_a_native_task_keeps_waiting_and_says_it_waits_for_a_worker(app: App) -> None:
    async with app.http() as http:
        tid = (await http.post("/v1/tasks", json={"model": MODEL, "request": {}})).json()["id"]
        alone = (await http.get(f"/v1/tasks/{tid}")).json()
        worker = auth(app.tokens.worker)
        bound = await http.post(
            "/v1/worker/sessions", json={"pools": ["elsewhere"]}, headers=worker
        )
        assert bound.status_code == 201
        elsewhere = (await http.get(f"/v1/tasks/{tid}")).json()
        # A worker of this pool is bound (busy: it took another task at once).
        await http.post("/v1/tasks", json={"pool": POOL, "request": {}})
        r = await http.post(
            "/v1/worker/sessions", json={"pools": [POOL], "capacity": 1}, headers=worker
        )
        assert r.status_code == 201
        served = (await http.get(f"/v1/tasks/{tid}")).json()
    assert (alone["status"], alone["waiting_for_worker"]) == ("pending", True)
    assert elsewhere["waiting_for_worker"] is True
    assert (served["status"], served["waiting_for_worker"]) in {
        ("pending", False),
        ("claimed", False),
    }


async def test_a_wait_longer_than_allowed_is_refused_not_capped(app: App) -> None:
    async with app.http() as http:
        tid = (await http.post("/v1/tasks", json={"model": MODEL, "request": {}})).json()["id"]
        r = await http.get(f"/v1/tasks/{tid}/wait", params={"timeout": "1e9"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "timeout")
    assert "between 0 and 60" in error["message"]


async def test_a_stream_asking_for_several_choices_is_refused(app: App, dsn: str) -> None:
    async with app.http() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_request", "n")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM inferq.task").fetchone()
    assert row == (0,)  # refused before anything was written


@pytest.mark.parametrize(
    ("error", "level", "traceback"),
    [
        (ShuttingDown(), "warning", False),
        (NoWorkerAvailable(), "warning", False),
        (TaskFailed("the model ran out of memory"), "warning", False),
        (DatabaseError(), "error", True),
        (RuntimeError("a bug"), "error", True),
    ],
)
def test_expected_conditions_log_without_a_traceback(
    error: Exception, level: str, traceback: bool
) -> None:
    with structlog.testing.capture_logs() as logs:
        log_failure(error, "POST", "/v1/chat/completions")
    [entry] = logs
    assert entry["log_level"] == level
    assert ("exc_info" in entry) is traceback
