"""The failover drill: the primary crashes under load and its synchronous standby is promoted.

Three replicas behind nginx and four echo workers run over a primary and a synchronous
streaming standby (tests/e2e/standby.py), all connecting through one multi-host DSN with
``target_session_attrs=read-write``. The e2e load generator drives its mixed load through
nginx; at 30 % of it the primary is stopped as a crash stops it (``-m immediate``) and, once
every replica has noticed, the standby is promoted. Then, as for every e2e fault, the checker
verifies I1-I5 over the history and the database (run_load): nothing acknowledged is lost,
no task ends twice, every wait and stream ends with its outcome. Beyond that the drill checks:

- service restored: from the crash, a native submit through nginx is answered 2xx within
  RESTORE_BUDGET_S (probes sent every PROBE_INTERVAL_S, each timed to its answer), and one sent
  to each replica directly too; the figures are printed;
- every replica's listener reconnected (``listener_reconnected``) then resynced its waiters
  (``waiters_resynced``), and the backend it names LISTENs on the new primary: it is one of
  the new primary's ``inferq-listener`` backends, and a NOTIFY sent there reaches every replica.

Without ``target_session_attrs`` the replicas reach the standby while it is still in recovery:
its writes fail (a 500, not a retryable 503: the checker reports the failed operations) and
the listeners' LISTEN is refused "during recovery" (asserted below). Run with
``FailoverDeployment.target_session_attrs = None`` and the test fails on both counts.

The chunk table is made LOGGED first (tests/e2e/standby.py): UNLOGGED, it is not replicated,
and streams in flight across the failover would miss their earlier chunks (README, "Failover").
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferq.bench.polling import wait_until
from inferq.db import channels
from tests.e2e.harness import MODEL
from tests.e2e.standby import FailoverDeployment, FailoverTimes
from tests.e2e.test_faults import NOTIFICATIONS, Load, in_thread, run_load

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

RESTORE_BUDGET_S = 10.0
PROBE_INTERVAL_S = 0.1
# Failed listener reconnects of every replica before the standby is promoted (the listener
# backs off 0.05 s doubling: three failures take about half a second).
DETECTION_FAILURES = 3
# A failover manager's detection takes seconds (Patroni: up to its ttl, 30 s by default).
# INFERQ_E2E_FAILOVER_DETECTION_S holds the promotion back at least that long after the crash,
# to measure recovery after a longer outage; the default keeps the drill short.
DETECTION_S = float(os.environ.get("INFERQ_E2E_FAILOVER_DETECTION_S", "0"))


@dataclass
class Probe:
    """Native submits to one URL, one every PROBE_INTERVAL_S without waiting for the last
    answer, each recorded as (sent, answered, status); status 0 is a connection error."""

    url: str
    token: str
    answers: list[tuple[float, float, int]] = field(default_factory=list)

    def restored_at(self, since: float) -> float | None:
        """When the first submit sent at or after ``since`` was answered 2xx."""
        ok = [done for sent, done, status in self.answers if sent >= since and 0 < status < 300]
        return min(ok) if ok else None

    async def run(self, until: Callable[[], bool]) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0) as client:
            sent: list[asyncio.Task[None]] = []
            n = 0
            while not until():
                sent.append(asyncio.create_task(self._submit(client, n)))
                n += 1
                await asyncio.sleep(PROBE_INTERVAL_S)  # the probes' pace, not a wait for state
            await asyncio.gather(*sent)

    async def _submit(self, client: httpx.AsyncClient, n: int) -> None:
        body = {
            "model": MODEL,
            "request": {"model": MODEL, "messages": [{"role": "user", "content": f"probe {n}"}]},
        }
        headers = {"Authorization": f"Bearer {self.token}"}
        sent = time.monotonic()
        try:
            resp = await client.post("/v1/tasks", json=body, headers=headers)
            status = resp.status_code
        except httpx.HTTPError:
            status = 0
        self.answers.append((sent, time.monotonic(), status))


def connect_failures(dep: FailoverDeployment, index: int, mark: int) -> list[str]:
    """The errors of replica ``index``'s failed listener reconnects since ``mark``."""
    events = dep.serve[index].events()[mark:]
    return [str(e.get("error")) for e in events if e.get("event") == "listener_connect_failed"]


def noticed(dep: FailoverDeployment, marks: list[int]) -> bool:
    """Every replica has failed to reopen its LISTEN connection DETECTION_FAILURES times: the
    drill's stand-in for a failover manager's failed health checks before it promotes."""
    return all(
        len(connect_failures(dep, i, mark)) >= DETECTION_FAILURES for i, mark in enumerate(marks)
    )


def relistened(dep: FailoverDeployment, index: int, mark: int) -> dict[str, Any] | None:
    """Replica ``index``'s latest ``listener_reconnected`` after ``mark``, once
    ``waiters_resynced`` followed it."""
    events = dep.serve[index].events()[mark:]
    names = [e.get("event") for e in events]
    if "listener_reconnected" not in names:
        return None
    last = len(names) - 1 - names[::-1].index("listener_reconnected")
    return events[last] if "waiters_resynced" in names[last + 1 :] else None


async def fail_over(gen: Load, dep: Any, notes: dict[str, Any]) -> None:
    """At 30 % of the load: crash the primary, promote the standby once every replica has
    noticed, and measure how long until submits succeed again."""
    await gen.reached(0.3)
    marks = [len(proc.events()) for proc in dep.serve]
    token = dep.tokens["client"]
    probes = [Probe(dep.url, token)] + [Probe(dep.replica_url(i), token) for i in range(3)]
    timing: list[FailoverTimes] = []

    def finished() -> bool:
        return bool(timing) and all(p.restored_at(timing[0].primary_stopped) for p in probes)

    probing = [asyncio.create_task(p.run(finished)) for p in probes]
    try:
        crashed = time.monotonic()  # within milliseconds of the stop fail_over begins with

        def detected() -> bool:
            return noticed(dep, marks) and time.monotonic() - crashed >= DETECTION_S

        timing.append(await in_thread(dep.fail_over, detected))
        async with asyncio.timeout(60):
            await asyncio.gather(*probing)
    finally:
        for task in probing:
            task.cancel()
    times = timing[0]
    restored = [p.restored_at(times.primary_stopped) for p in probes]
    notes["primary_down_s"] = round(times.primary_down_s, 3)
    notes["detection_s"] = round(times.detected - times.stop_started, 3)
    notes["promote_s"] = round(times.promoted - times.detected, 3)
    notes["restored_s_via_nginx"] = round((restored[0] or 0) - times.stop_started, 3)
    notes["restored_s_per_replica"] = [
        round((r or 0) - times.stop_started, 3) for r in restored[1:]
    ]
    notes["restored_s_after_promote"] = round((restored[0] or 0) - times.promoted, 3)
    notes["probe_statuses"] = sorted({s for p in probes for _, _, s in p.answers})
    notes["listener_connect_errors"] = sorted(
        {e.split("\n")[0] for i, m in enumerate(marks) for e in connect_failures(dep, i, m)}
    )

    # Each replica's listener came back, resynced, and LISTENs on the new primary.
    backends = []
    for i in range(dep.replicas):
        entry = await in_thread(
            wait_until, functools.partial(relistened, dep, i, marks[i]), 30, f"replica{i} relisten"
        )
        backends.append(entry["backend_pid"])
    listeners = await in_thread(
        dep.query,
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'inferq-listener' "
        "AND datname = current_database()",
    )
    notes["listener_backends_on_new_primary"] = sorted(int(r[0]) for r in listeners)
    notes["replica_listener_backends"] = backends
    received = [await in_thread(dep.metric, i, NOTIFICATIONS) for i in range(dep.replicas)]
    await in_thread(dep.query, "SELECT pg_notify(%s, '[]')", (channels.TASK,))
    for i in range(dep.replicas):

        def notified(i: int = i) -> bool:
            return (dep.metric(i, NOTIFICATIONS) or 0) > (received[i] or 0)

        await in_thread(wait_until, notified, 30, f"replica{i} to receive a NOTIFY")
    notes["replicas_notified_on_new_primary"] = dep.replicas


def test_failover_to_synchronous_standby_under_load(
    tmp_path: Path, failed: Callable[[], bool]
) -> None:
    with FailoverDeployment.running(failed) as deployment:
        assert isinstance(deployment, FailoverDeployment)
        dep = deployment
        assert dep.sync_state() == "sync"
        report, notes = run_load(dep, tmp_path, fail_over)
        print(
            f"failover: primary down (crash -> standby promoted) {notes['primary_down_s']:.2f}s, "
            f"of which detection {notes['detection_s']:.2f}s and promotion "
            f"{notes['promote_s']:.2f}s; a submit through nginx answered 2xx "
            f"{notes['restored_s_via_nginx']:.2f}s after the crash "
            f"({notes['restored_s_after_promote']:.2f}s after the promotion); "
            f"per replica {notes['restored_s_per_replica']}"
        )
        # The old primary is gone and the standby took over (it accepts writes).
        assert dep.in_recovery(dep.standby_port) is False
        assert dep.in_recovery(dep.primary_port) is None
        # While the standby was in recovery, every failure a client or a listener met said
        # "retry": never a write refused by a read-only server (a 500), never a LISTEN
        # refused during recovery. Both mean a connection landed on the standby.
        assert set(notes["probe_statuses"]) <= {201, 502, 503, 504}
        assert not [e for e in notes["listener_connect_errors"] if "recovery" in e]
        # The budget runs from the crash; a longer detection (above) is the manager's time.
        budget_s = RESTORE_BUDGET_S + DETECTION_S
        assert 0 < notes["restored_s_via_nginx"] <= budget_s
        assert all(0 < s <= budget_s for s in notes["restored_s_per_replica"])
        assert set(notes["replica_listener_backends"]) <= set(
            notes["listener_backends_on_new_primary"]
        )
        assert report.figures["tasks_lost"] == 0
        assert report.figures["tasks_completed"] == report.figures["tasks_acknowledged"]
