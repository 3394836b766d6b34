"""Worker runner against an in-memory stand-in for the worker routes (no database involved).

The stand-in answers exactly as docs/protocol.md says, over real HTTP on a loopback port
(``serving``); the end-to-end tests run the same paths against a real daemon and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiohttp import web

from inferq.bench.polling import eventually
from inferq.wire import JsonValue, WorkerTask
from inferq.worker import OutcomeBatcher, TaskContext, Worker, WorkerClient
from inferq.worker.errors import BackendUnavailableError, WorkerApiError


class FakeDaemon:
    """Worker routes over an in-memory queue; records every call."""

    def __init__(self, heartbeat_s: float = 0.05) -> None:
        self.heartbeat_s = heartbeat_s
        self.pending: list[dict[str, Any]] = []
        self.sessions: dict[str, int] = {}  # session id -> capacity
        self.held: dict[str, tuple[str, int]] = {}  # task id -> (session, attempt)
        self.chunks: dict[str, list[int]] = {}
        self.outcomes: dict[str, tuple[str, Any]] = {}
        self.cancelled: set[str] = set()
        self.calls: list[str] = []
        self.unavailable = 0  # answer this many next requests with 503
        # Refuse the outcomes route with this status; -1: never answer it.
        self.outcomes_route: int | None = None
        self.new_work = asyncio.Event()
        self.changed = asyncio.Event()

    def add(self, n: int = 1, *, streaming: bool = False) -> list[str]:
        ids = []
        for _ in range(n):
            task = {"id": str(uuid.uuid4()), "attempt": 1, "pool": "p", "streaming": streaming}
            self.pending.append({**task, "request": {"messages": []}})
            ids.append(task["id"])
        self.new_work.set()
        return ids

    def _take(self, sid: str, n: int) -> list[dict[str, Any]]:
        taken, self.pending = self.pending[:n], self.pending[n:]
        for t in taken:
            self.held[t["id"]] = (sid, t["attempt"])
        return taken

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}")
        parts = request.url.path.split("/")[3:]  # after /v1/worker
        self.calls.append(f"{request.method} {'/'.join(p if len(p) < 30 else '*' for p in parts)}")
        try:
            if self.unavailable:
                self.unavailable -= 1
                return httpx.Response(503, json={"error": {"message": "draining", "type": "x"}})
            return await self._route(request.method, parts, body)
        finally:
            self.changed.set()

    async def _route(self, method: str, parts: list[str], body: Any) -> httpx.Response:
        if parts == ["sessions"]:
            sid = str(uuid.uuid4())
            self.sessions[sid] = body["capacity"]
            tasks = self._take(sid, body["capacity"])
            return httpx.Response(
                201,
                json={
                    "session_id": sid,
                    "pools": body["pools"],
                    "capacity": body["capacity"],
                    "lease_s": 1.0,
                    "heartbeat_s": self.heartbeat_s,
                    "tasks": tasks,
                },
            )
        if parts[0] == "sessions":
            sid = parts[1]
            if sid not in self.sessions:
                return _error(404, "session_not_found")
            if method == "DELETE":
                mine = [t for t, (s, _) in self.held.items() if s == sid]
                for t in mine:
                    self.release(t)
                del self.sessions[sid]
                return httpx.Response(200, json={"released": len(mine)})
            if parts[2] == "outcomes" and self.outcomes_route == -1:
                await asyncio.Event().wait()  # a daemon that never answers
            if parts[2] == "outcomes" and self.outcomes_route == 404:
                return _error(404, "route_not_found")
            if parts[2] == "outcomes" and self.outcomes_route:
                return _error(self.outcomes_route, "invalid_body")
            if parts[2] == "outcomes":
                results = [self._finish(sid, o) for o in body["outcomes"]]
                tasks = self._take(sid, body["claim"])
                return httpx.Response(200, json={"results": results, "tasks": tasks})
            if parts[2] == "claim":
                # A session reaped during the long-poll claims nothing until the poll ends.
                while not self.pending or sid not in self.sessions:
                    self.new_work.clear()
                    try:
                        await asyncio.wait_for(self.new_work.wait(), body["wait_s"])
                    except TimeoutError:
                        break
                taken = self._take(sid, body["max_tasks"]) if sid in self.sessions else []
                return httpx.Response(200, json={"tasks": taken})
            # heartbeat
            mine = [t for t in body["tasks"] if self.held.get(t, ("",))[0] == sid]
            gone = [t for t in body["tasks"] if t not in mine and t not in self.cancelled]
            return httpx.Response(
                200,
                json={
                    "cancelled": [t for t in body["tasks"] if t in self.cancelled],
                    "lost": gone,
                    "lease_s": 1.0,
                    "heartbeat_s": self.heartbeat_s,
                },
            )
        task_id, action = parts[1], parts[2]
        if self.held.get(task_id) != (body["session_id"], body["attempt"]):
            return _error(409, "lease_lost")
        if action == "chunks":
            self.chunks.setdefault(task_id, []).extend(c["seq"] for c in body["chunks"])
            return httpx.Response(200, json={"last_seq": self.chunks[task_id][-1]})
        if action in ("complete", "fail"):
            del self.held[task_id]
            self.outcomes[task_id] = (action, body.get("response", body.get("message")))
        if action == "release":
            self.release(task_id)
        return httpx.Response(
            200,
            json={
                "id": task_id,
                "status": "running",
                "pool": "p",
                "created_at": "2024-01-01T00:00:00Z",
            },
        )

    def _finish(self, sid: str, item: dict[str, Any]) -> dict[str, Any]:
        task_id = item["task_id"]
        if self.held.get(task_id) != (sid, item["attempt"]):
            return {"id": task_id, "status_code": 409, "error": _error_body("lease_lost")}
        del self.held[task_id]
        if "error" in item:
            self.outcomes[task_id] = ("fail", item["error"])
        else:
            self.outcomes[task_id] = ("complete", item["response"])
        return {"id": task_id, "status_code": 200, "task": {"id": task_id, "status": "completed"}}

    def cancel(self, task_id: str) -> None:
        """The task's client cancelled it: the next heartbeat says so."""
        del self.held[task_id]
        self.cancelled.add(task_id)

    def release(self, task_id: str) -> None:
        del self.held[task_id]
        self.outcomes[task_id] = ("released", None)

    async def until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        """Re-check ``predicate`` on each change of the daemon's state, up to ``timeout_s``."""
        await eventually(predicate, timeout_s, changed=self.changed)


def _error_body(code: str) -> dict[str, Any]:
    return {"message": code, "type": "x", "code": code}


def _error(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"error": _error_body(code)})


Handle = Callable[[httpx.Request], Awaitable[httpx.Response]]


@contextlib.asynccontextmanager
async def serving(handle: Handle) -> AsyncIterator[str]:
    """``handle`` (httpx request in, httpx response out) behind a real HTTP server on a
    loopback port; yields its base URL."""

    async def on_request(request: web.Request) -> web.Response:
        body = await request.read()
        answer = await handle(httpx.Request(request.method, str(request.url), content=body))
        return web.Response(
            status=answer.status_code, body=answer.content, content_type="application/json"
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", on_request)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def daemon() -> FakeDaemon:
    return FakeDaemon()


@pytest.fixture
async def daemon_url(daemon: FakeDaemon) -> AsyncIterator[str]:
    async with serving(daemon.handle) as url:
        yield url


@pytest.fixture
async def client(daemon_url: str) -> AsyncIterator[WorkerClient]:
    c = WorkerClient(daemon_url, "t", backoff_max_s=0.01)
    yield c
    await c.aclose()


Handler = Callable[[WorkerTask, TaskContext], Awaitable[JsonValue]]


async def start(
    client: WorkerClient, handler: Handler, **kw: Any
) -> tuple[Worker, asyncio.Task[None]]:
    worker = Worker(client, ["p"], handler, claim_wait_s=5.0, **kw)
    return worker, asyncio.create_task(worker.run())


async def test_never_more_than_capacity_handlers_and_all_tasks_done(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    ids = daemon.add(7)
    live, peak = 0, 0

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await asyncio.sleep(0.01)
        live -= 1
        return {"ok": str(task.id)}

    worker, run = await start(client, handler, capacity=2)
    await daemon.until(lambda: len(daemon.outcomes) == 7)
    worker.stop()
    await run
    assert peak == 2
    assert [daemon.outcomes[i] for i in ids] == [("complete", {"ok": i}) for i in ids]
    assert daemon.calls.count("POST sessions") == 1
    assert daemon.calls[-1] == "DELETE sessions/*"


async def test_chunks_keep_their_order_and_precede_the_outcome(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    (task_id,) = daemon.add(streaming=True)

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        for n in range(200):
            ctx.emit({"n": n})
            if n % 50 == 0:
                await asyncio.sleep(0)
        return "done"

    worker, run = await start(client, handler)
    await daemon.until(lambda: task_id in daemon.outcomes)
    worker.stop()
    await run
    assert daemon.chunks[task_id] == list(range(1, 201))
    posts = daemon.calls.count("POST tasks/*/chunks")
    assert posts < 200  # batched
    order = [c for c in daemon.calls if c.startswith(("POST tasks", "POST sessions/*/outcomes"))]
    assert order[0] == "POST tasks/*/start" and order[-1] == "POST sessions/*/outcomes"


async def test_a_handler_exception_fails_the_task_with_its_message(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    (task_id,) = daemon.add()

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        raise ValueError("the GPU caught fire")

    worker, run = await start(client, handler)
    await daemon.until(lambda: task_id in daemon.outcomes)
    worker.stop()
    await run
    assert daemon.outcomes[task_id] == ("fail", "the GPU caught fire")


async def test_a_cancel_reported_by_the_heartbeat_cancels_the_handler(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    (task_id,) = daemon.add()
    began, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return None

    worker, run = await start(client, handler)
    await began.wait()
    daemon.cancel(task_id)
    await asyncio.wait_for(cancelled.wait(), 5)
    await daemon.until(lambda: worker.running == [])
    worker.stop()
    await run
    assert task_id not in daemon.outcomes  # nothing posted for a cancelled task


async def test_a_rejected_chunk_post_stops_the_handler_and_posts_nothing_more(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    (task_id,) = daemon.add(streaming=True)
    cancelled = asyncio.Event()

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        daemon.held[task_id] = ("someone-else", 2)  # the lease moved on
        try:
            while True:
                ctx.emit("tok")
                await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    worker, run = await start(client, handler)
    await asyncio.wait_for(cancelled.wait(), 5)
    worker.stop()
    await run
    assert task_id not in daemon.outcomes
    assert "POST sessions/*/outcomes" not in daemon.calls


async def test_stop_lets_quick_tasks_finish_and_releases_slow_ones(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    quick, slow = daemon.add(2)
    began = asyncio.Event()

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        if str(task.id) == slow:
            began.set()
            await asyncio.Event().wait()
        else:
            await began.wait()
            await asyncio.sleep(0.05)
        return "ok"

    worker, run = await start(client, handler, capacity=2, grace_s=0.5)
    await began.wait()
    worker.stop()
    await run
    assert daemon.outcomes[quick] == ("complete", "ok")
    assert daemon.outcomes[slow] == ("released", None)
    assert daemon.calls[-1] == "DELETE sessions/*"


async def test_a_draining_replica_is_retried_and_the_session_kept(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        return "ok"

    worker, run = await start(client, handler)
    await daemon.until(lambda: "POST sessions/*/claim" in daemon.calls)
    daemon.unavailable = 3
    (task_id,) = daemon.add()
    await daemon.until(lambda: task_id in daemon.outcomes)
    worker.stop()
    await run
    assert daemon.outcomes[task_id] == ("complete", "ok")
    assert daemon.calls.count("POST sessions") == 1


async def test_a_reaped_session_binds_again(daemon: FakeDaemon, client: WorkerClient) -> None:
    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        return "ok"

    worker, run = await start(client, handler)
    await daemon.until(lambda: worker.session_id is not None and daemon.sessions != {})
    first = worker.session_id
    daemon.sessions.clear()  # the reaper removed it
    daemon.new_work.set()
    await daemon.until(lambda: daemon.calls.count("POST sessions") == 2)
    (task_id,) = daemon.add()
    await daemon.until(lambda: task_id in daemon.outcomes)
    worker.stop()
    await run
    assert worker.session_id != first


async def test_a_claim_long_poll_on_a_reaped_session_is_cut_by_binding_again(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        return "ok"

    worker = Worker(client, ["p"], handler, claim_wait_s=30.0)
    run = asyncio.create_task(worker.run())
    await daemon.until(lambda: "POST sessions/*/claim" in daemon.calls)
    daemon.sessions.clear()  # reaped while the long-poll is open; the next heartbeat learns it
    await daemon.until(lambda: daemon.calls.count("POST sessions") == 2)
    (task_id,) = daemon.add()
    # Taken by the new session at once, not when the old session's 30 s long-poll ends.
    await daemon.until(lambda: task_id in daemon.outcomes, timeout_s=5.0)
    worker.stop()
    await run
    assert daemon.outcomes[task_id] == ("complete", "ok")


async def test_a_worker_started_before_the_daemon_binds_once_it_answers(
    daemon: FakeDaemon, daemon_url: str
) -> None:
    daemon.unavailable = 30
    async with WorkerClient(daemon_url, "t", retry_budget_s=0.02, backoff_max_s=0.001) as client:

        async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
            return "ok"

        worker, run = await start(client, handler)
        (task_id,) = daemon.add()
        await daemon.until(lambda: task_id in daemon.outcomes)
        worker.stop()
        await run
    assert daemon.calls.count("POST sessions") == 31  # 30 refused, then bound once


async def ok(task: WorkerTask, ctx: TaskContext) -> JsonValue:
    return {"echo": str(task.id)}


async def test_outcomes_that_finish_together_share_one_call(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    ids = daemon.add(6)
    worker, run = await start(client, ok, capacity=8)
    await daemon.until(lambda: len(daemon.outcomes) == 6)
    worker.stop()
    await run
    assert daemon.outcomes == {i: ("complete", {"echo": i}) for i in ids}
    assert daemon.calls.count("POST sessions/*/outcomes") == 1
    assert not [c for c in daemon.calls if c.startswith("POST tasks")]


async def test_a_full_worker_claims_its_next_tasks_with_its_outcomes(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    ids = daemon.add(6)
    worker, run = await start(client, ok, capacity=2)
    await daemon.until(lambda: len(daemon.outcomes) == 6)
    claims = daemon.calls.count("POST sessions/*/claim")
    worker.stop()
    await run
    assert set(daemon.outcomes) == set(ids)
    # Bound with two, then each call of two outcomes brought the next two: three calls, and
    # the claim long-poll only once the queue ran dry.
    assert daemon.calls.count("POST sessions/*/outcomes") == 3
    assert claims <= 1


async def test_a_lost_lease_fails_only_its_own_outcome(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    lost, kept = daemon.add(2)

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        if str(task.id) == lost:
            daemon.held[lost] = ("someone-else", 2)  # reverted and claimed elsewhere
        return "ok"

    worker, run = await start(client, handler, capacity=2)
    await daemon.until(lambda: kept in daemon.outcomes)
    await daemon.until(lambda: worker.running == [])
    worker.stop()
    await run
    assert daemon.outcomes == {kept: ("complete", "ok")}
    assert daemon.calls.count("POST sessions/*/outcomes") == 1


@pytest.mark.parametrize("refusal", [404, 422])
async def test_outcomes_fall_back_to_the_single_routes(
    daemon: FakeDaemon, client: WorkerClient, refusal: int
) -> None:
    """An older daemon without the route (404), or a batch refused as a whole (422)."""
    daemon.outcomes_route = refusal
    ids = daemon.add(3)
    worker, run = await start(client, ok, capacity=3)
    await daemon.until(lambda: len(daemon.outcomes) == 3)
    worker.stop()
    await run
    assert daemon.outcomes == {i: ("complete", {"echo": i}) for i in ids}
    assert daemon.calls.count("POST tasks/*/complete") == 3
    assert worker.outcomes.batched is (refusal != 404)


async def test_a_call_carries_at_most_max_bytes_of_outcomes(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    ids = daemon.add(4)

    async def big(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        return "x" * 100

    worker, run = await start(client, big, capacity=4)
    worker.outcomes.max_bytes = 150  # one outcome per call
    await daemon.until(lambda: len(daemon.outcomes) == 4)
    worker.stop()
    await run
    assert daemon.outcomes == {i: ("complete", "x" * 100) for i in ids}
    assert daemon.calls.count("POST sessions/*/outcomes") == 4


async def test_stop_does_not_wait_past_the_grace_for_an_unanswered_outcome(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    daemon.outcomes_route = -1
    (task_id,) = daemon.add()
    worker, run = await start(client, ok, grace_s=0.05)
    await daemon.until(lambda: "POST sessions/*/outcomes" in daemon.calls)
    worker.stop()
    await asyncio.wait_for(run, 10)  # a backstop: stop() must return, not hang on the call
    assert daemon.calls[-1] == "DELETE sessions/*"
    assert daemon.outcomes[task_id] == ("released", None)  # the unbind gave it back


async def test_a_retried_outcomes_call_claims_nothing_the_second_time() -> None:
    """The answer to an outcomes call may be lost after the daemon carried it out: the retry
    repeats the outcomes (idempotent) but not the claim, whose tasks nobody would run."""
    bodies: list[dict[str, Any]] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        if len(bodies) == 1:
            return httpx.Response(502, json={"error": {"message": "bad gateway", "type": "x"}})
        return httpx.Response(200, json={"results": [{"status_code": 200}], "tasks": []})

    item = {"task_id": str(uuid.uuid4()), "attempt": 1, "response": {"text": "ok"}}
    async with (
        serving(handle) as url,
        WorkerClient(url, "t", retry_budget_s=5, backoff_max_s=0.001) as client,
    ):
        results, tasks = await client.outcomes(uuid.uuid4(), [item], claim=4)
    assert [b["claim"] for b in bodies] == [4, 0]
    assert bodies[0]["outcomes"] == bodies[1]["outcomes"] == [item]
    assert results == [{"status_code": 200}] and tasks == []


@pytest.mark.parametrize("single_routes", [False, True])
async def test_a_malformed_answer_to_an_outcome_is_a_worker_api_error(single_routes: bool) -> None:
    """The runner handles WorkerApiError (it logs the task as abandoned and goes on); any other
    failure of an outcome call reaches each caller as one, never as a crash of its task."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/outcomes") and single_routes:
            return _error(404, "route_not_found")
        return httpx.Response(200, json={"unexpected": True})  # no results, no task fields

    task = WorkerTask.model_validate(
        {"id": str(uuid.uuid4()), "attempt": 1, "pool": "p", "streaming": False, "request": {}}
    )
    async with serving(handle) as url, WorkerClient(url, "t") as client:
        batcher = OutcomeBatcher(client)
        with pytest.raises(WorkerApiError, match="the outcome call failed"):
            await batcher.complete(task, uuid.uuid4(), {"text": "ok"})
        with pytest.raises(WorkerApiError, match="the outcome call failed"):
            await batcher.fail(task, uuid.uuid4(), "boom")
        await batcher.aclose()
    assert batcher.batched is not single_routes


async def test_a_backend_failure_releases_the_task_and_pauses_until_the_backend_is_back(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    (first,) = daemon.add()
    healthy = True
    checked = asyncio.Event()

    async def check() -> bool:
        checked.set()
        return healthy

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        nonlocal healthy
        if str(task.id) == first:
            healthy = False
            raise BackendUnavailableError("the upstream server is unreachable")
        return "ok"

    worker, run = await start(client, handler, backend_check=check, backoff_max_s=0.01)
    await daemon.until(lambda: "DELETE sessions/*" in daemon.calls)
    assert daemon.outcomes[first] == ("released", None)  # back to the queue, not failed
    (second,) = daemon.add()
    for _ in range(3):  # the backend stays down through several checks: no bind, no claim
        checked.clear()
        await asyncio.wait_for(checked.wait(), 10)
    assert daemon.calls.count("POST sessions") == 1
    assert second not in daemon.outcomes and len(daemon.pending) == 1
    healthy = True
    await daemon.until(lambda: second in daemon.outcomes)
    worker.stop()
    await run
    assert daemon.outcomes[second] == ("complete", "ok")
    assert daemon.calls.count("POST sessions") == 2
