"""Workers whose backend breaks, and a worker whose daemon goes away: real processes throughout.

`inferq serve` on a fresh database, `inferq worker --backend URL` processes in front of
tests/fake_upstream.py processes that a test kills or starts late. What must hold: a task
whose upstream dies goes back to the queue (no attempt used, no error) and runs on a healthy
worker; a worker binds only while its upstream answers; an upstream's 4xx fails the task with
the upstream's own message and nothing of its address; SIGTERM ends a worker within its grace
period + 5 s even when inferq cannot be reached.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from inferq.db.cluster import free_port
from tests import fake_upstream
from tests.e2e.procs import REPO, Stack, words

pytestmark = pytest.mark.e2e

FAKE_UPSTREAM = str(REPO / "tests" / "fake_upstream.py")


def upstream_on(stack: Stack, port: int, mode: str = "ok", delay_s: float = 0.01) -> Proc:
    argv = [sys.executable, FAKE_UPSTREAM, "--port", str(port), "--mode", mode]
    proc = stack.spawn(f"upstream-{port}", [*argv, "--delay", str(delay_s)])
    wait_until(lambda: "ready" in proc.log_text(), 30, "the fake upstream")
    return proc


def statuses(stack: Stack, ids: list[str]) -> dict[str, str]:
    rows = stack.query("SELECT id::text, status FROM inferq.task WHERE id::text = ANY(%s)", (ids,))
    return dict(rows)


def test_tasks_whose_upstream_dies_complete_on_the_healthy_worker(stack: Stack) -> None:
    healthy_port, doomed_port = free_port(), free_port()
    upstream_on(stack, healthy_port, delay_s=0.01)
    # Slow enough that the doomed worker finishes nothing before its upstream is killed.
    doomed = upstream_on(stack, doomed_port, delay_s=1.0)
    good = stack.worker("--backend", f"http://127.0.0.1:{healthy_port}/v1", capacity=2)
    bad = stack.worker("--backend", f"http://127.0.0.1:{doomed_port}/v1", capacity=2)
    good.wait_event("session_bound")
    bad.wait_event("session_bound")
    ids = [stack.submit(f"task {i}", streaming=i % 2 == 0)["id"] for i in range(16)]
    bad.wait_event("task_claimed")
    doomed.signal(signal.SIGKILL)

    def all_ended() -> bool:
        return all(s in ("completed", "error", "cancelled") for s in statuses(stack, ids).values())

    wait_until(all_ended, 90, "every task to end")
    assert set(statuses(stack, ids).values()) == {"completed"}
    completed_by = {e["task_id"] for e in good.events("task_completed")}
    assert completed_by == set(ids)
    assert bad.events("task_completed") == []
    released = {e["task_id"] for e in bad.events("task_released")}
    assert released  # it had work in flight, and gave it back
    assert bad.events("task_failed") == []
    # It unbound and, its upstream being dead, never bound again.
    bad.wait_event("backend_unavailable")
    assert len(bad.events("session_bound")) == 1
    assert len(bad.events("session_unbound")) == 1
    rows = stack.query(
        "SELECT attempt - releases FROM inferq.task WHERE id::text = ANY(%s)", (list(released),)
    )
    assert {n for (n,) in rows} == {1}  # a release uses up no attempt


def test_a_worker_binds_only_once_its_upstream_answers(stack: Stack) -> None:
    port = free_port()  # nothing listens there yet
    worker = stack.worker("--backend", f"http://127.0.0.1:{port}/v1")
    worker.wait_event("backend_unavailable", checks=2)
    task_id = stack.submit(words(3))["id"]
    assert worker.events("session_bound") == []
    assert stack.query("SELECT count(*) FROM inferq.worker_session") == [(0,)]
    assert stack.task(task_id)["status"] == "pending"

    upstream_on(stack, port)
    worker.wait_event("backend_available")
    worker.wait_event("session_bound")
    done = stack.wait_task(task_id)
    assert done["status"] == "completed"
    assert done["response"]["choices"][0]["message"]["content"] == fake_upstream.REPLY


def test_an_upstream_4xx_fails_the_task_with_its_message_and_no_address(stack: Stack) -> None:
    port = free_port()
    upstream_on(stack, port, mode="reject")
    worker = stack.worker("--backend", f"http://127.0.0.1:{port}/v1")
    task_id = stack.submit(words(3), streaming=True)["id"]
    done = stack.wait_task(task_id)
    assert done["status"] == "error"
    assert done["error"] == f"upstream returned HTTP 400: {fake_upstream.REJECT_MESSAGE}"
    worker.wait_event("task_failed", task_id=task_id)
    assert str(port) not in done["error"]


def test_sigterm_ends_a_worker_within_its_grace_when_inferq_is_unreachable(
    stack: Stack,
) -> None:
    grace_s = 2.0
    worker = stack.worker(
        "--backend",
        "echo",
        "--echo-delay",
        "0.5",
        env={"INFERQ_SHUTDOWN_GRACE_S": str(grace_s)},
    )
    task_id = stack.submit(words(200))["id"]
    worker.wait_event("task_claimed", task_id=task_id)
    serve = stack.procs[0]
    serve.signal(signal.SIGKILL)
    serve.wait(10)
    worker.signal(signal.SIGTERM)
    try:
        worker.wait(grace_s + 5.0)  # the requirement itself: gone by grace + 5 s
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker was still running {grace_s + 5:g}s after SIGTERM")
    worker.wait_event("worker_stopped")
    assert worker.events("task_release_failed", task_id=task_id)
