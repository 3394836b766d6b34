"""End to end: three replicas behind nginx, echo workers, load, and one fault per test.

Each test starts its own deployment (tests/e2e/harness.py), drives a mixed load through nginx
(tests/e2e/loadgen.py) while injecting a fault at a chosen point of progress, lets the system
settle, and checks every invariant over the history and the database (tests/e2e/checker.py).
Tests that inject several faults in one run give each an equal share of the load, in turn
(``in_turn``): a fault's progress points fall in its share, and the next share does not start
before it is done.

Profiles: INFERQ_E2E_TASKS logical operations per test (default 300: the whole file runs in a
few minutes on 2 cores); the all-faults test runs twice that. The long profile is
``INFERQ_E2E_TASKS=5000 pytest -m e2e tests/e2e``. Neither variable can quietly shrink a run
(tests/e2e/profiles.py says how). Figures land in the test's report.json and are printed
(``pytest -s`` shows them); speed figures are figures only, never verdicts.
"""

from __future__ import annotations

import asyncio
import functools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from inferq.bench.polling import wait_until
from inferq.db import channels
from tests.e2e.audit import most_held
from tests.e2e.checker import TERMINAL, Report, check, read_database
from tests.e2e.harness import Deployment
from tests.e2e.loadgen import History, LoadGenerator, Profile
from tests.e2e.profiles import from_env

# Refuses an environment that would shrink the run (tests/e2e/profiles.py).
PROFILE = from_env()
TASKS = PROFILE.tasks
# The long profile (INFERQ_E2E_TASKS=5000) needs more than the suite's default timeout.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(max(900, TASKS // 2))]


class Load(Protocol):
    """What a fault sees of the load: progress, and the task ids being streamed right now."""

    @property
    def streaming_now(self) -> set[str]: ...

    @property
    def out_of_work(self) -> bool: ...

    async def reached(self, fraction: float) -> None: ...


Fault = Callable[[Load, Deployment, dict[str, Any]], Awaitable[None]]
# What run_load drives beside the load: one Fault, or several (in_turn).
Injector = Callable[[LoadGenerator, Deployment, dict[str, Any]], Awaitable[None]]


def run_load(
    dep: Deployment,
    tmp_path: Path,
    fault: Injector | None = None,
    *,
    tasks: int = TASKS,
    profile: Profile | None = None,
) -> tuple[Report, dict[str, Any]]:
    """Drive the load with ``fault`` running beside it, settle, check; fail on any violation."""
    history = History(tmp_path / "history.jsonl")
    profile = profile or Profile(tasks=tasks, kinds=PROFILE.kinds)
    gen = LoadGenerator(dep.url, dep.tokens["client"], history, profile)
    notes: dict[str, Any] = {}

    async def main() -> None:
        load = asyncio.create_task(gen.run())
        try:
            if fault is not None:
                await fault(gen, dep, notes)
        finally:
            await load

    # A private loop: asyncio.run would replace the event loop pytest-asyncio keeps.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
        history.close()
    # Tasks whose OpenAI-style client retried elsewhere are cancelled or complete unobserved.
    wait_until(lambda: dep.unfinished_tasks() == 0, 90, "every task to reach a terminal state")
    tasks_rows, audit = read_database(dep)
    report = check(history.records, tasks_rows, audit, hang_slack_s=profile.hang_slack_s)
    # Exact, from the audit in commit order. A figure, not yet a verdict: these loads have
    # shown a session holding more tasks than its capacity (concurrent claims of one session
    # each count the same free room), a defect of the claim left for its own fix; until then
    # test_worker_echo asserts the limit on one worker's claims.
    peaks = most_held(t for trail in audit.values() for t in trail)
    report.figures["most_held_by_a_session"] = max(peaks.values(), default=0)
    report.figures["sessions_over_capacity"] = sum(n > dep.worker_capacity for n in peaks.values())
    report.figures["faults"] = notes
    report.figures["profile"] = PROFILE.describe()
    (tmp_path / "report.json").write_text(json.dumps(report.figures, indent=2, default=str))
    print(f"\n{report.summary()}")
    assert not report.violations, report.summary()
    assert report.figures["tasks_lost"] == 0
    return report, notes


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(func, *args)


# -- the faults --------------------------------------------------------------------------------


async def kill_replica(gen: Load, dep: Deployment, notes: dict[str, Any]) -> None:
    """SIGKILL a replica mid-load; clients resume through nginx; restart it later."""
    await gen.reached(0.25)
    # Kill it while clients are waiting on it, so the fault always hits someone.
    held: list[int] = []

    def clients_waiting() -> bool:
        held[:] = [dep.open_waits(0)]
        return held[0] > 0

    await in_thread(wait_until, clients_waiting, 30, "a client wait on replica0")
    await in_thread(dep.kill_replica, 0)
    notes["waits_open_at_kill"] = held[0]
    notes["replica_killed"] = 0
    await gen.reached(0.6)
    await in_thread(dep.restart_replica, 0)


async def terminate_replica(gen: Load, dep: Deployment, notes: dict[str, Any]) -> None:
    """SIGTERM a replica: it drains and exits 0 while nginx routes around it."""
    await gen.reached(0.25)
    notes["sigterm_exit_status"] = await in_thread(dep.terminate_replica, 1)
    await gen.reached(0.6)
    await in_thread(dep.restart_replica, 1)


async def cut_listeners(gen: Load, dep: Deployment, notes: dict[str, Any]) -> None:
    """pg_terminate_backend every replica's LISTEN connection; each reconnects, resyncs its
    waiters and receives notifications on its new connection."""
    await gen.reached(0.3)
    for i in range(dep.replicas):
        await in_thread(dep.wait_replica_ready, i)  # listening, so there is a connection to cut
    cut = await in_thread(dep.terminate_listeners)
    notes["listeners_terminated"] = len(cut)
    for i in range(dep.replicas):
        resynced = functools.partial(resynced_after_cut, dep, i, cut)
        await in_thread(wait_until, resynced, 30, f"replica{i} to reconnect and resync")
    notes["relistened_at"] = time.time()
    # A notification sent now reaches every replica's listener: it LISTENs again.
    received: list[float] = []
    for i in range(dep.replicas):
        count = functools.partial(dep.metric, i, NOTIFICATIONS)
        received.append(await in_thread(wait_until, count, 30, f"replica{i}'s {NOTIFICATIONS}"))
    await in_thread(dep.query, "SELECT pg_notify(%s, '[]')", (channels.TASK,))
    for i in range(dep.replicas):

        def notified(i: int = i) -> bool:
            return (dep.metric(i, NOTIFICATIONS) or 0) > received[i]

        await in_thread(wait_until, notified, 30, f"replica{i} to receive a NOTIFY")
    notes["replicas_listening_again"] = dep.replicas


NOTIFICATIONS = "inferq_listener_notifications"


def resynced_after_cut(dep: Deployment, index: int, cut: list[int]) -> bool:
    """Whether replica ``index`` logged, in this order: its LISTEN connection (one of the
    ``cut`` backends) lost, ``listener_reconnected`` and ``waiters_resynced``."""
    expected = iter(("listener_disconnected", "listener_reconnected", "waiters_resynced"))
    want = next(expected)
    for entry in dep.serve[index].events():
        if entry.get("event") != want:
            continue
        if want == "listener_disconnected" and entry.get("backend_pid") not in cut:
            continue
        want = next(expected, "")
        if not want:
            return True
    return False


async def restart_postgres(gen: Load, dep: Deployment, notes: dict[str, Any]) -> None:
    """`pg_ctl restart -m fast` mid-load: 503s while down, then full recovery."""
    await gen.reached(0.3)
    start = time.monotonic()
    await in_thread(dep.restart_database)
    notes["postgres_down_s"] = round(time.monotonic() - start, 2)


async def _victim(gen: Load, dep: Deployment) -> tuple[int, str]:
    """A worker running a streamed task that a native SSE client is reading right now."""
    found: list[tuple[int, str]] = []

    def holding() -> bool:
        hit = dep.worker_holding(set(gen.streaming_now))
        if hit:
            found.append(hit)
            return True
        if gen.out_of_work:
            # No stream runs now and none will start: waiting out the deadline cannot help.
            raise AssertionError("the load ran out before a worker ran a watched stream")
        return False

    await in_thread(wait_until, holding, 30, "a worker running a watched stream")
    return found[0]


async def _kill_worker_mid_stream(gen: Load, dep: Deployment) -> tuple[int, str]:
    """SIGKILL a worker while a watched stream runs on it. An outcome it sent just before it
    died may still land, so the database decides whether it died mid-stream: the task is
    rescued (back to pending, or re-claimed), or it ended at attempt 1, and then the kill came
    too late to count and another worker is tried."""
    for _ in range(20):
        worker, task_id = await _victim(gen, dep)
        await in_thread(dep.kill_worker, worker)
        decided = functools.partial(_fate, dep, task_id)
        fate = await in_thread(wait_until, decided, 60, f"task {task_id} to end or be rescued")
        if fate == "rescued":
            return worker, task_id
        await in_thread(dep.restart_worker, worker)
    raise AssertionError("no worker could be killed mid-stream")


def _fate(dep: Deployment, task_id: str) -> str | None:
    """'rescued', 'ended' (at its first attempt), or None while neither has happened."""
    status, attempt = dep.query(
        "SELECT status::text, attempt FROM inferq.task WHERE id = %s", (task_id,)
    )[0]
    if status == "pending" or attempt > 1:
        return "rescued"
    return "ended" if status in TERMINAL else None


async def kill_worker(gen: Load, dep: Deployment, notes: dict[str, Any]) -> None:
    """SIGKILL a worker mid-stream: the task re-runs elsewhere and its stream shows a reset."""
    await gen.reached(0.2)
    worker, task_id = await _kill_worker_mid_stream(gen, dep)
    notes.setdefault("worker_victims", []).append(task_id)
    await gen.reached(0.6)
    await in_thread(dep.restart_worker, worker)


async def kill_leader(gen: Load, dep: Deployment, notes: dict[str, Any]) -> None:
    """SIGKILL the maintenance leader, then a worker mid-stream: the worker's task can only be
    rescued by another replica taking over the maintenance."""
    await gen.reached(0.25)
    found: list[int] = []

    def has_leader() -> bool:
        leader = dep.leader_replica()
        if leader is not None:
            found.append(leader)
        return leader is not None

    await in_thread(wait_until, has_leader, 30, "a maintenance leader")
    leader = found[0]
    await in_thread(dep.kill_replica, leader)
    notes["leader_killed"] = leader
    worker, task_id = await _kill_worker_mid_stream(gen, dep)
    notes.setdefault("worker_victims", []).append(task_id)

    def new_leader() -> bool:
        other = dep.leader_replica()
        return other is not None and other != leader

    await in_thread(wait_until, new_leader, 30, "another replica to lead maintenance")
    notes["new_leader"] = dep.leader_replica()
    await gen.reached(0.7)
    await in_thread(dep.restart_replica, leader)
    await in_thread(dep.restart_worker, worker)


def assert_rerun_with_reset(dep: Deployment, tmp_path: Path, notes: dict[str, Any]) -> None:
    """Each victim task ran again (attempt > 1), completed, and its SSE reader saw a reset."""
    results = {
        r.get("task_id"): r
        for r in (json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines())
        if r["op"] == "result"
    }
    for task_id in notes["worker_victims"]:
        status, attempt = dep.query(
            "SELECT status::text, attempt FROM inferq.task WHERE id = %s", (task_id,)
        )[0]
        assert status == "completed"
        assert attempt > 1, f"task {task_id} was not re-run"
        assert results[task_id]["resets"], f"the stream of {task_id} showed no reset"


# -- the tests ---------------------------------------------------------------------------------


def test_load_without_faults(deployment: Deployment, tmp_path: Path) -> None:
    report, _ = run_load(deployment, tmp_path)
    assert report.figures["tasks_completed"] == report.figures["tasks_acknowledged"]


def test_kill_replica_mid_load(deployment: Deployment, tmp_path: Path) -> None:
    report, notes = run_load(deployment, tmp_path, kill_replica)
    # The replica held open waits when it died, and every one of them still got its result
    # (run_load checks I1-I5). Whether a client saw the failure depends on what it was doing:
    # nginx re-sends a GET long-poll that had no answer yet to another replica by itself
    # (proxy_next_upstream), so a killed wait can be invisible to its client; a POST or a
    # stream already answering comes back to the client, which retries or resumes.
    assert notes["waits_open_at_kill"] > 0
    assert report.figures["tasks_completed"] == report.figures["tasks_acknowledged"]


def test_sigterm_replica_drains(deployment: Deployment, tmp_path: Path) -> None:
    _, notes = run_load(deployment, tmp_path, terminate_replica)
    assert notes["sigterm_exit_status"] == 0


def test_listener_connections_cut(tmp_path: Path, failed: Callable[[], bool]) -> None:
    # A long safety poll: waiters after the cut are woken by NOTIFY or wait that long.
    safety_poll_s = 30.0
    with Deployment.running(
        failed, env_overrides={"INFERQ_SAFETY_POLL_S": str(safety_poll_s)}
    ) as dep:
        _report, notes = run_load(dep, tmp_path, cut_listeners)
        # Every replica's LISTEN connection was cut, and each logged its reconnect, resynced
        # its waiters and received a NOTIFY on its new connection (cut_listeners waits for
        # each in turn, so the run would have failed otherwise).
        assert notes["listeners_terminated"] >= dep.replicas
        assert notes["replicas_listening_again"] == dep.replicas
        history = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
        after = sorted(
            r["end"] - r["start"]
            for r in history
            if r["op"] == "result" and r["start"] > notes["relistened_at"]
        )
        assert after, "no operation started after the listeners came back"
        # A figure, not a verdict: speed is `inferq bench`'s to measure.
        print(f"median latency after the reconnect: {statistics.median_high(after):.3f}s")


def test_postgres_restart(deployment: Deployment, tmp_path: Path) -> None:
    run_load(deployment, tmp_path, restart_postgres)
    # Back to full service: every replica is ready again.
    for i in range(deployment.replicas):
        deployment.wait_replica_ready(i)


def test_worker_killed_mid_stream(deployment: Deployment, tmp_path: Path) -> None:
    _, notes = run_load(deployment, tmp_path, kill_worker)
    assert_rerun_with_reset(deployment, tmp_path, notes)


def test_maintenance_leader_killed(deployment: Deployment, tmp_path: Path) -> None:
    _, notes = run_load(deployment, tmp_path, kill_leader)
    assert notes["new_leader"] != notes["leader_killed"]
    assert_rerun_with_reset(deployment, tmp_path, notes)


def test_all_faults_in_one_run(deployment: Deployment, tmp_path: Path) -> None:
    all_faults = in_turn(
        kill_replica,
        kill_worker,
        restart_postgres,
        cut_listeners,
        terminate_replica,
        kill_leader,
    )
    report, notes = run_load(deployment, tmp_path, all_faults, tasks=TASKS * 2)
    assert_rerun_with_reset(deployment, tmp_path, notes)
    assert report.figures["tasks_lost"] == 0


def test_through_pgbouncer(tmp_path: Path, failed: Callable[[], bool]) -> None:
    with Deployment.running(failed, pgbouncer=True) as dep:
        run_load(dep, tmp_path, in_turn(kill_replica, cut_listeners))


# -- several faults in one run -----------------------------------------------------------------


def in_turn(*faults: Fault) -> Injector:
    """Run ``faults`` one after another beside one load, each in an equal share of it: fault i
    of n waits for progress points inside operations [i/n, (i+1)/n), and the operations past
    that share do not start until it is done (each share's progress is recorded in the notes).

    The hold is what makes the shares real. Faults take wall-clock time the load does not wait
    for (a replica restarting, a drain's grace, a rescue waiting out a lease), so without it a
    fault ran on into the next one's share, and the last fault, which needs a stream running
    while it acts, found the load already over."""

    async def run(gen: LoadGenerator, dep: Deployment, notes: dict[str, Any]) -> None:
        tasks, n = gen.profile.tasks, len(faults)
        shares = notes.setdefault("load_shares", {})
        try:
            for i, fault in enumerate(faults):
                await gen.admit_until((i + 1) / n)
                at_start = gen.done
                await fault(_Share(gen, i, n), dep, notes)
                shares[getattr(fault, "__name__", str(i))] = {
                    "operations": [tasks * i // n, tasks * (i + 1) // n],
                    "done_at_start": at_start,
                    "done_at_end": gen.done,
                }
        finally:
            await gen.admit_until(1.0)  # the load ends, whatever happened to the faults

    return run


class _Share:
    """The load as fault ``slot`` of ``n`` sees it: its progress points mapped into operations
    [slot/n, (slot+1)/n), the last tenth of that share left as a margin."""

    def __init__(self, gen: Load, slot: int, n: int) -> None:
        self._gen = gen
        self._slot = slot
        self._n = n

    @property
    def streaming_now(self) -> set[str]:
        return self._gen.streaming_now

    @property
    def out_of_work(self) -> bool:
        return self._gen.out_of_work

    async def reached(self, fraction: float) -> None:
        await self._gen.reached((self._slot + fraction * 0.9) / self._n)
