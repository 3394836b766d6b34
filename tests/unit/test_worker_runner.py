"""Worker runner against an in-memory stand-in for the worker routes (no database involved).

The stand-in (tests/unit/fake_worker_routes.py) answers exactly as docs/protocol.md says, over
real HTTP on a loopback port; the end-to-end tests run the same paths against a real daemon and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from inferq.wire import JsonValue, WorkerTask
from inferq.worker import OutcomeBatcher, TaskContext, Worker, WorkerClient
from inferq.worker.errors import BackendUnavailableError, WorkerApiError
from tests.unit.fake_worker_routes import FakeDaemon, error_response, serving


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


async def test_a_handler_that_fails_before_its_start_is_answered_still_fails_the_task(
    daemon: FakeDaemon, client: WorkerClient
) -> None:
    # A streamed task's start call is still on the wire when the backend refuses at once (an
    # upstream 4xx): the failure must wait for the start, not cancel it and post nothing.
    daemon.hold_starts = asyncio.Event()
    (task_id,) = daemon.add(streaming=True)
    failed = asyncio.Event()

    async def handler(task: WorkerTask, ctx: TaskContext) -> JsonValue:
        failed.set()
        raise ValueError("upstream returned HTTP 400: too many tokens")

    worker, run = await start(client, handler)
    await asyncio.wait_for(failed.wait(), 10)
    await asyncio.sleep(0)  # the runner reacts to the failure while the start is pending
    daemon.hold_starts.set()
    await daemon.until(lambda: task_id in daemon.outcomes)
    worker.stop()
    await run
    assert daemon.outcomes[task_id] == ("fail", "upstream returned HTTP 400: too many tokens")


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
            return error_response(404, "route_not_found")
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
