"""Maintenance: runs each sweep's run_once() in a thin jittered loop while holding its lease.

Design decisions (after River's maintenance services): each sweep is a ``run_once()`` that tests
call directly with a fixed clock; the loop only adds leadership, jitter and error handling. Every
replica runs the loops, but a sweep runs only on the replica holding that sweep's lease row
(renewed each round, ``ttl_s`` = 3 intervals), so when the holder dies another replica takes
over within a few intervals. Errors are logged with the traceback and followed by an
exponential, jittered backoff; a loop only ends when it is stopped.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import structlog

from inferq.db.chunks import ChunkRepository
from inferq.db.leases import LeaseRepository
from inferq.db.sessions import WorkerSessionRepository
from inferq.db.tasks import TaskRepository
from inferq.maintenance.collector import Collector
from inferq.maintenance.leadership import Leadership
from inferq.maintenance.reaper import SessionReaper
from inferq.maintenance.rescuer import Rescuer
from inferq.settings import Settings

log = structlog.get_logger(__name__)

MAX_BACKOFF_S = 60.0


class Sweep(Protocol):
    name: str

    async def run_once(self, now: datetime | None = None) -> object: ...


def replica_name() -> str:
    """A holder name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SweepLoop:
    """Runs one sweep every ``interval_s`` (±20 %) while this replica leads it."""

    def __init__(self, sweep: Sweep, leadership: Leadership, interval_s: float) -> None:
        self.sweep = sweep
        self.leadership = leadership
        self.interval_s = interval_s
        self.runs = 0
        self.failures = 0

    async def run_round(self) -> bool:
        """Renew the lease and sweep once if held; True when this replica swept."""
        if not await self.leadership.acquire():
            return False
        await self.sweep.run_once()
        self.runs += 1
        return True

    async def run(self) -> None:
        """Loop until cancelled; never raises anything but CancelledError."""
        failures = 0
        while True:
            try:
                await self.run_round()
                failures = 0
                delay = self.interval_s * random.uniform(0.8, 1.2)
            except Exception:
                failures += 1
                self.failures += 1
                delay = min(MAX_BACKOFF_S, self.interval_s * 2**failures) * random.uniform(0.5, 1)
                log.exception(
                    "maintenance_failed",
                    sweep=self.sweep.name,
                    failures=failures,
                    retry_in_s=round(delay, 2),
                )
            await asyncio.sleep(delay)


class Maintenance:
    """The collector, rescuer and session reaper loops of one replica."""

    def __init__(
        self,
        *,
        tasks: TaskRepository,
        chunks: ChunkRepository,
        sessions: WorkerSessionRepository,
        leases: LeaseRepository,
        settings: Settings,
        holder: str | None = None,
        more: Sequence[tuple[Sweep, float]] = (),
    ) -> None:
        """The built-in sweeps, and ``more`` (sweep, interval) from other layers (the batch
        sweep of inferq.services.batches), each led by one replica at a time."""
        self.holder = holder or replica_name()
        interval_s = settings.maintenance_interval_s
        sweeps: list[Sweep] = [
            Collector(tasks, chunks, settings),
            Rescuer(tasks),
            SessionReaper(sessions),
            *(sweep for sweep, _ in more),
        ]
        # The rescuer also returns claims nobody acknowledged: it runs often enough for them.
        every = {s.name: interval_s for s in sweeps}
        every["rescuer"] = min(interval_s, settings.claim_ack_s / 2)
        every.update({sweep.name: every_s for sweep, every_s in more})
        self.loops = [
            SweepLoop(
                s,
                Leadership(leases, s.name, self.holder, ttl_s=3 * interval_s),
                every[s.name],
            )
            for s in sweeps
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start every loop in the background."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(loop.run(), name=f"inferq-{loop.sweep.name}")
                for loop in self.loops
            ]
            log.info("maintenance_started", holder=self.holder)

    async def stop(self) -> None:
        """Stop the loops and release the leases so another replica takes over at once."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for loop in self.loops:
            try:
                await loop.leadership.release()
            except Exception as exc:
                log.warning("lease_release_failed", sweep=loop.sweep.name, error=str(exc))
