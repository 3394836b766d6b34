"""Feed: the dashboard's live pages, one shared, coalesced refresh per replica.

Design decisions:

- The Listener already hears every change (task status, worker sessions, batches, the
  rollup's samples: see inferq.db.channels); the Hub tells the Feed the kind of each
  (``Hub.observe``), and the Feed only marks the topics that kind affects dirty. Nothing
  here reads per page: one background task re-reads each dirty topic that has
  subscribers, once, and hands the same snapshot to every page watching it, on every
  replica alike. So an event committed through replica B
  reaches a page served by replica A as fast as A's listener hears it.
- Coalescing: a topic is read at most once per ``min_gap_s`` (the owners topic, an
  aggregate over a day of tasks, once per ``slow_gap_s`` for task changes; a revoked token
  shows at once); a storm of notifications costs one read per topic and gap, whatever the
  number of pages open.
- A subscriber is a latest-value slot (like the Hub's waiters): a slow page never holds the
  refresh back nor grows memory, it just skips to the newest snapshot.
- Every ``refresh_s`` each watched topic is re-read anyway: ages advance without an event,
  an expired session is noticed before the reaper deletes it, and a lost notification (the
  listener reconnecting) costs at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Any

import structlog

from inferq.wakeups import Hub

log = structlog.get_logger(__name__)

# Which topics (the first element of a topic key) each kind of change makes stale.
AFFECTS: dict[str, frozenset[str]] = {
    "tasks": frozenset({"overview", "workers", "owners", "batches", "tasks"}),
    "sessions": frozenset({"overview", "workers"}),
    "batches": frozenset({"batches"}),
    "rollup": frozenset({"overview"}),
    "tokens": frozenset({"owners"}),
}
SLOW_TOPICS = frozenset({"owners"})

Reader = Callable[[Hashable], Awaitable[Any]]


class Subscription:
    """A page's view of one topic: the newest snapshot, and a flag that it changed."""

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.snapshot: Any = None
        self.version = 0
        self._changed = asyncio.Event()

    def publish(self, snapshot: Any) -> None:
        self.snapshot = snapshot
        self.version += 1
        self._changed.set()

    async def next(self) -> Any:
        """The next snapshot (at once when one came since the last call)."""
        await self._changed.wait()
        self._changed.clear()
        return self.snapshot


class Feed:
    """Shared snapshots of the dashboard's topics for one replica."""

    def __init__(
        self,
        hub: Hub,
        read: Reader,
        *,
        min_gap_s: float = 0.2,
        slow_gap_s: float = 5.0,
        refresh_s: float = 10.0,
    ) -> None:
        self.read = read
        self.min_gap_s = min_gap_s
        self.slow_gap_s = slow_gap_s
        self.refresh_s = refresh_s
        self.reads = 0  # topic reads done, for tests
        self._subs: dict[Hashable, set[Subscription]] = {}
        self._dirty: set[Hashable] = set()
        # Dirty for a rare change (a token revoked, a session gone): never the slow gap.
        self._urgent: set[Hashable] = set()
        self._last_read: dict[Hashable, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        hub.observe(self.changed)

    def changed(self, kind: str) -> None:
        """A change of ``kind`` was committed somewhere (called by the Hub, never awaits)."""
        topics = AFFECTS.get(kind)
        for key in self._subs:
            if topics is None or _topic(key) in topics:
                self._dirty.add(key)
                if kind != "tasks":
                    self._urgent.add(key)
        if self._dirty:
            self._wake.set()

    @contextlib.asynccontextmanager
    async def subscribe(self, key: Hashable) -> AsyncIterator[Subscription]:
        """Watch ``key`` (a topic name, or a tuple led by one) for the block; the first
        snapshot is read at once."""
        sub = Subscription(key)
        subs = self._subs.setdefault(key, set())
        subs.add(sub)
        try:
            if len(subs) > 1 and key in self._last_read and not self._dirty & {key}:
                latest = next((s for s in subs if s.version), None)
                if latest is not None:
                    sub.publish(latest.snapshot)
            if not sub.version:
                self._dirty.add(key)
                self._last_read.pop(key, None)
                self._wake.set()
            self._ensure_running()
            yield sub
        finally:
            subs.discard(sub)
            if not subs:
                del self._subs[key]
                self._last_read.pop(key, None)
                self._dirty.discard(key)
                self._urgent.discard(key)
                if not self._subs:
                    self._wake.set()  # the loop ends now rather than at its next refresh

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="inferq-dashboard-feed")

    async def _run(self) -> None:
        while self._subs:
            now = time.monotonic()
            for key in self._subs:
                if now - self._last_read.get(key, 0.0) >= self.refresh_s:
                    self._dirty.add(key)
            due, wait_s = self._due(now)
            if not due:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(wait_s, self.refresh_s))
                continue
            for key in due:
                self._dirty.discard(key)
                self._urgent.discard(key)
                self._last_read[key] = time.monotonic()
                await self._refresh(key)

    def _due(self, now: float) -> tuple[list[Hashable], float]:
        """The dirty topics whose gap has passed, and how long until the next one is due."""
        due: list[Hashable] = []
        wait_s = self.refresh_s
        for key in list(self._dirty):
            if key not in self._subs:
                self._dirty.discard(key)
                continue
            slow = _topic(key) in SLOW_TOPICS and key not in self._urgent
            gap = self.slow_gap_s if slow else self.min_gap_s
            left = self._last_read.get(key, -gap) + gap - now
            if left <= 0:
                due.append(key)
            else:
                wait_s = min(wait_s, left)
        return due, wait_s

    async def _refresh(self, key: Hashable) -> None:
        try:
            snapshot = await self.read(key)
        except Exception as exc:
            # The next change or the periodic refresh tries again; the pages keep the last one.
            log.warning("dashboard_refresh_failed", topic=str(key), error=str(exc))
            return
        self.reads += 1
        for sub in list(self._subs.get(key, ())):
            sub.publish(snapshot)


def _topic(key: Hashable) -> str:
    return str(key[0] if isinstance(key, tuple) else key)
