"""HealthService: whether this replica is ready for traffic, and its Prometheus metrics."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from inferq.db.stats import StatsRepository
from inferq.errors import InferqError
from inferq.metrics import Metrics
from inferq.services.drain import Drain
from inferq.wakeups import Hub


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    checks: dict[str, str]


class HealthService:
    """Readiness (database, listener, drain) and the metrics page of one replica."""

    def __init__(
        self,
        stats: StatsRepository,
        metrics: Metrics,
        drain: Drain,
        hub: Hub,
        listener: Any = None,
    ) -> None:
        self.stats = stats
        self.metrics = metrics
        self.drain = drain
        self.hub = hub
        self.listener = listener  # anything with ``healthy`` and ``stats``; None: no listener

    async def readiness(self) -> Readiness:
        checks = {"draining": "yes" if self.drain.draining else "no"}
        listener = self.listener
        checks["listener"] = "down" if listener is not None and not listener.healthy else "ok"
        try:
            await self.stats.ping(2.0)
            checks["database"] = "ok"
        except InferqError as exc:
            checks["database"] = f"down: {type(exc).__name__}"
        ready = (
            checks["database"] == "ok" and checks["listener"] == "ok" and not self.drain.draining
        )
        return Readiness(ready, checks)

    async def metrics_page(self) -> bytes:
        """The Prometheus text; the queue figures are left as they were when the database is
        away (the process metrics are still worth a scrape)."""
        with contextlib.suppress(InferqError):
            self.metrics.set_queue(await self.stats.queue())
        self.metrics.set_listener(self.listener)
        self.metrics.parked_waiters.set(self.hub.parked_count)
        return self.metrics.render()
