"""HealthService: whether this replica is ready for traffic, and its Prometheus metrics.

A scrape costs nothing: the queue figures come from one grouped statement over the task
table, read at most once per ``metrics_interval_s`` per replica whatever the scrape rate (the
scrapes in between, and those that arrive while a read is in flight, get the last figures).
The page can require a bearer token (INFERQ_METRICS_TOKEN, compared in constant time), and it
can move to a port of its own (INFERQ_METRICS_PORT, served by inferq.api.app.metrics_app);
the API port then has no /metrics at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferq.db.stats import StatsRepository
from inferq.errors import InferqError, RouteNotFound, Unauthorized
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
        *,
        interval_s: float = 5.0,
        token: str | None = None,
        own_port: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stats = stats
        self.metrics = metrics
        self.drain = drain
        self.hub = hub
        self.listener = listener  # anything with ``healthy`` and ``stats``; None: no listener
        self.interval_s = interval_s
        self.own_port = own_port  # /metrics is served on INFERQ_METRICS_PORT only
        self.clock = clock
        self._token = token.encode() if token else None
        self._queue_read_at: float | None = None
        self._queue_lock = asyncio.Lock()

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

    async def metrics_page(
        self, authorization: str | None = None, *, on_metrics_port: bool = False
    ) -> bytes:
        """The Prometheus text. Raises RouteNotFound on the API port when the page has a port
        of its own, Unauthorized without the metrics token when one is set. The queue figures
        are at most ``interval_s`` old, and left as they were while the database is away (the
        process metrics are still worth a scrape)."""
        if self.own_port and not on_metrics_port:
            raise RouteNotFound("GET /metrics: served on INFERQ_METRICS_PORT only")
        self._check_token(authorization)
        await self._refresh_queue()
        self.metrics.set_listener(self.listener)
        self.metrics.parked_waiters.set(self.hub.parked_count)
        return self.metrics.render()

    def _check_token(self, authorization: str | None) -> None:
        if self._token is None:
            return
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            secret.strip().encode(), self._token
        ):
            raise Unauthorized(
                "/metrics needs `Authorization: Bearer <token>` with INFERQ_METRICS_TOKEN"
            )

    async def _refresh_queue(self) -> None:
        # One read per interval: concurrent scrapes wait for the read in flight, then find
        # the figures fresh.
        async with self._queue_lock:
            read_at = self._queue_read_at
            if read_at is not None and self.clock() - read_at < self.interval_s:
                return
            try:
                with contextlib.suppress(InferqError):
                    self.metrics.set_queue(await self.stats.queue())
            finally:
                # A failed read waits its interval too: a database that is away is not asked
                # again by every scrape.
                self._queue_read_at = self.clock()
