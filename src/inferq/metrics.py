"""Prometheus metrics of one replica, in a registry of its own (tests build several apps).

Gauges that describe the database (tasks by pool and status, queue depth, sessions) are set
from ``QueueStats`` (inferq.db.stats), so every replica reports the same cluster-wide figures;
counters and histograms (requests, waits, claims, listener) are this replica's own.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inferq.domain.lanes import LANES
from inferq.domain.records import QueueStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# The distinct pools one replica labels its own series with; the rest share OTHER_POOLS, a
# name no pool can have (pool names start with a letter or digit). The database gauges are
# rebuilt from the task table on each scrape and need no cap.
MAX_POOL_LABELS = 100
OTHER_POOLS = "_other"


class Metrics:
    """The metric objects of one app, in their own registry (tests build several apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "inferq_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_seconds = Histogram(
            "inferq_http_request_seconds",
            "HTTP request duration (streams: until the end)",
            ["route"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.wait_seconds = Histogram(
            "inferq_wait_seconds",
            "Time a client waited for a task to end",
            ["kind"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.claim_seconds = Histogram(
            "inferq_claim_seconds",
            "Duration of a worker claim long-poll",
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.claim_latency_seconds = Histogram(
            "inferq_claim_latency_seconds",
            "Time from submit to claim, per claimed task",
            ["pool"],
            buckets=(*_LATENCY_BUCKETS, 60, 300, 3600),
            registry=r,
        )
        self.submitted = Counter(
            "inferq_tasks_submitted",
            "Tasks submitted through this replica",
            ["pool"],
            registry=r,
        )
        self.open_waits = Gauge(
            "inferq_open_waits", "Open client waits and streams on this replica", registry=r
        )
        self.parked_waiters = Gauge(
            "inferq_parked_waiters",
            "Client waits, streams and worker claim long-polls parked until a wake, now",
            registry=r,
        )
        self.tasks = Gauge(
            "inferq_tasks",
            "Tasks in the database by pool and status",
            ["pool", "status"],
            registry=r,
        )
        # What autoscaling and alerts read (README, "Autoscaling"): how much waits, and for
        # how long. Per pool and lane (inferq.domain.lanes): every lane of every pool that has
        # tasks, 0 when nothing waits there; `sum by (pool)` gives the pool's figure.
        self.queue_depth = Gauge(
            "inferq_queue_depth", "Pending tasks by pool and lane", ["pool", "lane"], registry=r
        )
        self.queue_oldest_age = Gauge(
            "inferq_queue_oldest_pending_age_seconds",
            "How long the oldest pending task of a pool and lane has waited",
            ["pool", "lane"],
            registry=r,
        )
        self.sessions = Gauge("inferq_worker_sessions", "Live worker sessions", registry=r)
        self.listener_reconnects = Gauge(
            "inferq_listener_reconnects",
            "Times the LISTEN connection was re-established",
            registry=r,
        )
        self.notifications = Gauge(
            "inferq_listener_notifications",
            "Notifications received by the listener",
            registry=r,
        )
        self.listener_up = Gauge(
            "inferq_listener_up", "1 while the LISTEN connection is healthy", registry=r
        )

        self._pool_labels: set[str] = set()

        # The labelled children of the per-request metrics, by label values: labels() checks
        # and locks on every call, a dict lookup is enough for the few routes and statuses.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def pool_label(self, pool: str) -> str:
        """``pool`` as a label value of this replica's counters and histograms, or
        OTHER_POOLS once MAX_POOL_LABELS other pools have one: clients name pools freely, and
        every label value is a series kept for the life of the process."""
        if pool in self._pool_labels:
            return pool
        if len(self._pool_labels) < MAX_POOL_LABELS:
            self._pool_labels.add(pool)
            return pool
        return OTHER_POOLS

    def record_request(self, method: str, route: str, status: int, elapsed_s: float) -> None:
        """Count one answered HTTP request and observe its duration."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            if len(self._request_children) > 10_000:
                self._request_children.clear()
            children = (
                self.http_requests.labels(method, route, str(status)),
                self.http_seconds.labels(route),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(elapsed_s)

    def set_queue(self, stats: QueueStats) -> None:
        """Replace the database-derived gauges with a fresh read."""
        self.tasks.clear()
        self.queue_depth.clear()
        self.queue_oldest_age.clear()
        for pool_name, counts in stats.tasks.items():
            for status, n in counts.items():
                self.tasks.labels(pool_name, status).set(n)
            lanes = stats.lanes.get(pool_name, {})
            for lane in LANES:
                n, age = lanes.get(lane, (0, 0.0))
                self.queue_depth.labels(pool_name, lane).set(n)
                self.queue_oldest_age.labels(pool_name, lane).set(age)
        self.sessions.set(stats.sessions)

    def set_listener(self, listener: Any) -> None:
        """Copy the listener's counters (its ``stats``; None in tests without a listener)."""
        if listener is None:
            return
        stats = getattr(listener, "stats", None)
        self.listener_reconnects.set(_number(stats, "reconnects"))
        self.notifications.set(_number(stats, "notifications"))
        self.listener_up.set(1 if getattr(listener, "healthy", False) else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _number(obj: Any, name: str) -> float:
    value = getattr(obj, name, 0)
    return float(value) if isinstance(value, int | float) else 0.0
