"""Workers that die, stall or get cancelled: leases, rescue, fencing, max_attempts."""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Any

import pytest

from inferq.bench.polling import wait_until
from inferq.bench.processes import Proc
from tests.e2e.procs import Stack, words

pytestmark = pytest.mark.e2e


def log_time(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def echo_worker(stack: Stack, delay_s: float) -> Proc:
    worker = stack.worker("--backend", "echo", "--echo-delay", str(delay_s))
    worker.wait_event("session_bound")
    return worker


def late_post(stack: Stack, task_id: str, claim: dict[str, Any], action: str) -> Any:
    """Post as the worker that logged ``claim`` (its session, its attempt)."""
    holder = {"session_id": claim["session_id"], "attempt": claim["attempt"]}
    body = {
        "chunks": holder | {"chunks": [{"seq": 1, "data": {"late": True}}]},
        "complete": holder | {"response": {"late": True}},
    }[action]
    with stack.http(stack.worker_token) as http:
        return http.post(f"/v1/worker/tasks/{task_id}/{action}", json=body)


def test_a_killed_worker_s_task_reruns_elsewhere_and_the_stream_shows_a_reset(
    stack: Stack,
) -> None:
    first = echo_worker(stack, 0.1)
    text = words(30)
    task_id = stack.submit(text, streaming=True)["id"]
    seen: list[tuple[str, str | None, Any]] = []
    second: Proc | None = None
    killed_at = 0.0
    for event in stack.events(task_id):
        seen.append(event)
        if event[0] == "chunk" and second is None:
            second = echo_worker(stack, 0.0)
            first.signal(signal.SIGKILL)
            killed_at = time.time()
        if event[0] == "done":
            break
    assert second is not None
    kinds = [kind for kind, _, _ in seen]
    assert "reset" in kinds
    reset = seen[kinds.index("reset")][2]
    assert reset["attempt"] == 2
    retried = [(eid, data) for kind, eid, data in seen[kinds.index("reset") :] if kind == "chunk"]
    assert [eid for eid, _ in retried] == [f"2:{n}" for n in range(1, len(retried) + 1)]
    streamed = "".join(d["choices"][0]["delta"].get("content", "") for _, d in retried)
    assert streamed == text
    done = seen[-1][2]
    assert (done["status"], done["attempt"]) == ("completed", 2)
    assert done["response"]["choices"][0]["message"]["content"] == text  # attempt 2's only
    claim = second.wait_event("task_claimed", task_id=task_id, attempt=2)
    print(f"worker death -> task claimed elsewhere: {log_time(claim) - killed_at:.2f}s")


def test_a_stalled_worker_s_late_posts_are_refused_and_change_nothing(stack: Stack) -> None:
    first = echo_worker(stack, 0.1)
    text = words(40)
    task_id = stack.submit(text, streaming=True)["id"]
    stale = first.wait_event("task_claimed", task_id=task_id)
    events = stack.events(task_id)
    next(e for e in events if e[0] == "chunk")
    first.signal(signal.SIGSTOP)
    second = echo_worker(stack, 0.0)
    kinds = [kind for kind, _, _ in events]  # the rest of the stream, to its end
    assert "reset" in kinds
    second.wait_event("task_completed", task_id=task_id)
    before = stack.task(task_id)
    assert (before["status"], before["attempt"]) == ("completed", 2)

    first.signal(signal.SIGCONT)
    first.wait_event("task_lost", task_id=task_id)
    for action in ("chunks", "complete"):
        resp = late_post(stack, task_id, stale, action)
        assert resp.status_code == 409, resp.text
        assert resp.json()["error"]["code"] == "lease_lost"
    assert stack.task(task_id) == before
    assert first.events("task_completed", task_id=task_id) == []


def test_a_worker_paused_past_its_session_s_ttl_takes_work_once_it_resumes(
    stack: Stack,
) -> None:
    worker = stack.worker("--backend", "echo")
    session_id = worker.wait_event("session_bound")["session_id"]
    # Its claim long-poll is open: parked on the daemon, where nothing else waits.
    wait_until(lambda: (stack.metric("inferq_parked_waiters") or 0) >= 1, 30, "a parked claim")
    worker.signal(signal.SIGSTOP)
    # A stall (swapping, a debugger, an overloaded host) outlasting the session: the daemon
    # reaps it while the worker's long-poll on it is still open.
    wait_until(lambda: not session_alive(stack, session_id), 30, "the stalled session's reap")
    worker.signal(signal.SIGCONT)
    task_id = stack.submit(words(3))["id"]
    # Well before that long-poll's 30 s would end.
    worker.wait_event("task_completed", timeout_s=10.0, task_id=task_id)
    assert len(worker.events("session_bound")) == 2
    assert stack.task(task_id)["status"] == "completed"


def session_alive(stack: Stack, session_id: str) -> bool:
    return bool(stack.query("SELECT 1 FROM inferq.worker_session WHERE id = %s", (session_id,)))


OUTCOME_ROUTES = {
    "/v1/worker/sessions/{session_id}/outcomes",
    "/v1/worker/tasks/{task_id}/complete",
    "/v1/worker/tasks/{task_id}/fail",
}


def test_a_cancel_reaches_the_handler_by_heartbeat_before_it_ends(stack: Stack) -> None:
    serve = stack.procs[0]
    worker = echo_worker(stack, 0.1)
    # Not streamed: the worker posts nothing for it until its handler ends (100 words, 0.1 s
    # apart), so only a heartbeat can tell it of the cancel before then.
    task_id = stack.submit(words(100))["id"]
    claim = worker.wait_event("task_claimed", task_id=task_id)
    with stack.http() as http:
        cancelled_at = time.time()
        assert http.post(f"/v1/tasks/{task_id}/cancel").status_code == 200
    stopped = worker.wait_event("task_cancelled", task_id=task_id)
    print(f"cancel -> handler cancelled: {log_time(stopped) - cancelled_at:.3f}s")
    # Had the cancel not come by heartbeat, the handler would have run to its end and the
    # worker learnt of it from the 409 to its outcome. The request read here comes after
    # task_cancelled, so the daemon has logged any outcome request answered before it.
    assert stack.task(task_id)["status"] == "cancelled"
    posted = [e for e in serve.events("request_handled") if e["route"] in OUTCOME_ROUTES]
    assert posted == [], "the handler ran to its end: the cancel did not come by heartbeat"
    assert worker.events("task_completed", task_id=task_id) == []
    resp = late_post(stack, task_id, claim, "complete")
    assert resp.status_code == 409, resp.text
    assert stack.task(task_id)["status"] == "cancelled"


def test_a_task_whose_worker_keeps_dying_ends_in_error(stack: Stack) -> None:
    task_id = stack.submit(words(100), max_attempts=2)["id"]
    for attempt in (1, 2):
        worker = stack.worker("--backend", "echo", "--echo-delay", "0.2")
        worker.wait_event("task_claimed", task_id=task_id, attempt=attempt)
        worker.signal(signal.SIGKILL)
    done = stack.wait_task(task_id)
    assert done["status"] == "error"
    assert done["error"].startswith("the worker was lost 2 times (max_attempts=2)")


def test_sigterm_lets_short_tasks_finish_and_releases_long_ones(stack: Stack) -> None:
    worker = stack.worker(
        "--backend",
        "echo",
        "--echo-delay",
        "0.1",
        capacity=2,
        env={"INFERQ_SHUTDOWN_GRACE_S": "3"},
    )
    worker.wait_event("session_bound")
    short = stack.submit(words(5))["id"]
    long = stack.submit(words(300))["id"]
    worker.wait_event("task_claimed", task_id=short)
    worker.wait_event("task_claimed", task_id=long)
    worker.signal(signal.SIGTERM)
    assert worker.popen is not None and worker.popen.wait(30) == 0
    assert stack.task(short)["status"] == "completed"
    assert stack.task(long)["status"] == "pending"  # back in the queue, not lost
    worker.wait_event("task_released", task_id=long)
    worker.wait_event("session_unbound")

    echo_worker(stack, 0.0)
    assert stack.wait_task(long)["status"] == "completed"
