"""Hub: the in-process fan-out of database hints to waiters keyed by task id and by pool.

Design decisions (imports no psycopg; the Listener feeds it, the TaskService consumes it):

- A ``Waiter`` is a flag, not a queue. A wake only says "re-read the database" (NOTIFY is a
  hint, never the message), so repeated wakes fold into one set of ``flags`` and one pending
  future. That is this module's answer to "bounded per-subscriber buffers": every subscriber's
  buffer is one integer. A slow waiter can never stall the dispatcher (waking is O(1) and never
  awaits) nor grow memory, and when it finally runs it re-reads the row and the chunks after the
  last seq it delivered, so it catches up from the database exactly like an overflowing
  subscriber would.
- A chunk wake also records the highest (attempt, last seq) announced for the task since the
  waiter's last ``take()``; a reader that already delivered that far skips its re-read. Under
  load a reader is often woken by a flush whose chunks its previous read (racing that
  flush's commit) already returned, and those reads were empty round trips.
- ``resync_all()`` wakes every waiter with every flag set; the Listener calls it after each
  (re)connect and re-LISTEN, because notifications sent while it was away are gone for good.
- ``Batcher`` coalesces the re-reads of all waiters woken in one window into one call of a batch
  function (one ``WHERE id = ANY(...)``). When no batch is in flight the next one starts on the
  next loop turn (every waiter woken by the same notification joins it); while batches are in
  flight new keys wait up to ``window_s`` so a storm of wakes becomes a few large statements
  instead of thousands of small ones. Each ``load`` awaits its own future, so a cancelled
  caller leaves the others of its key alone without ``asyncio.shield`` (half the futures and
  no done-callbacks on the hot read path).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, TypeVar
from uuid import UUID

import structlog

log = structlog.get_logger(__name__)

# What woke a waiter; a waiter re-reads only what its flags name.
TASK_CHANGED = 1  # the task row changed status (or the waiter must resync)
CHUNKS_ADDED = 2  # new chunks were stored for the task
POOL_WORK = 4  # a task became pending in one of the pools
EVERYTHING = TASK_CHANGED | CHUNKS_ADDED | POOL_WORK


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)


# Waiter.chunks_upto when no chunk notification came since the last take(), and when one came
# without a seq (so the reader must read).
NO_CHUNKS = (-1, -1)
UNKNOWN_CHUNKS = (2**63, 0)

# Status names as they arrive in notification payloads (no domain import: this module is
# plain asyncio).
TERMINAL_STATUSES = frozenset({"completed", "error", "cancelled"})


class Waiter:
    """A level-triggered wake flag for one waiting coroutine."""

    __slots__ = ("_fut", "chunks_upto", "flags", "key", "terminal_only")

    def __init__(self, key: object, *, terminal_only: bool = False) -> None:
        self.key = key
        self.flags = 0
        # The highest (attempt, last seq) of chunk notifications since the last take().
        self.chunks_upto = NO_CHUNKS
        # A waiter for the outcome only: claimed/running changes are not worth a re-read.
        self.terminal_only = terminal_only
        self._fut: asyncio.Future[bool] | None = None

    def wake(self, flags: int = EVERYTHING) -> None:
        """Record why the waiter must re-read and resume it; never blocks, never queues."""
        self.flags |= flags
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(True)

    async def wait(self, timeout_s: float) -> bool:
        """Sleep until woken or ``timeout_s``; True when woken (at once if flags are set)."""
        if self.flags:
            return True
        if timeout_s <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._fut = fut
        # call_later plus one future is lighter than asyncio.timeout() for 10,000 waiters.
        handle = loop.call_later(timeout_s, _expire, fut) if math.isfinite(timeout_s) else None
        try:
            return await fut
        finally:
            if handle is not None:
                handle.cancel()
            self._fut = None

    def take(self) -> int:
        """The flags accumulated since the last take, cleared (call before re-reading);
        ``chunks_upto`` is reset too (read it first)."""
        flags, self.flags = self.flags, 0
        self.chunks_upto = NO_CHUNKS
        return flags


class Hub:
    """Waiters keyed by task id and by pool name; the only mutable state of the fan-out."""

    def __init__(self) -> None:
        self._by_task: dict[UUID, set[Waiter]] = {}
        self._by_pool: dict[str, set[Waiter]] = {}
        self.wakes = 0  # waiters woken (a counter for /metrics)
        # Told the kind of every change ("tasks", "sessions", "batches"): the dashboard's feed.
        self._observers: list[Callable[[str], None]] = []

    def observe(self, observer: Callable[[str], None]) -> None:
        """Call ``observer(kind)`` on every change the listener hears of (never awaits: an
        observer only marks itself dirty)."""
        self._observers.append(observer)

    def noticed(self, kind: str) -> None:
        """Something of ``kind`` changed that no waiter keys on (worker sessions, batches)."""
        for observer in self._observers:
            observer(kind)

    @property
    def waiter_count(self) -> int:
        return sum(len(ws) for ws in self._by_task.values()) + sum(
            len(ws) for ws in self._by_pool.values()
        )

    @property
    def parked_count(self) -> int:
        """Waiters whose coroutine is asleep in ``wait()`` right now."""
        indexes = (self._by_task, self._by_pool)
        return sum(w._fut is not None for index in indexes for ws in index.values() for w in ws)

    @contextmanager
    def watch_task(self, task_id: UUID, *, terminal_only: bool = False) -> Iterator[Waiter]:
        """Register a waiter for ``task_id`` for the duration of the block; a ``terminal_only``
        waiter is not woken by changes to non-terminal statuses (nor by chunks)."""
        waiter = Waiter(task_id, terminal_only=terminal_only)
        self._by_task.setdefault(task_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            self._discard(self._by_task, task_id, waiter)

    @contextmanager
    def watch_pools(self, pools: Iterable[str]) -> Iterator[Waiter]:
        """Register one waiter woken when work becomes pending in any of ``pools``."""
        names = tuple(dict.fromkeys(pools))
        waiter = Waiter(names)
        for name in names:
            self._by_pool.setdefault(name, set()).add(waiter)
        try:
            yield waiter
        finally:
            for name in names:
                self._discard(self._by_pool, name, waiter)

    @staticmethod
    def _discard(
        index: dict[str, set[Waiter]] | dict[UUID, set[Waiter]], key: object, waiter: Waiter
    ) -> None:
        waiters = index.get(key)  # type: ignore[call-overload]
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del index[key]  # type: ignore[arg-type]

    def task_changed(self, task_id: UUID, status: str, pool: str | None) -> None:
        """A task's status changed: wake its waiters, and its pool's when it became pending."""
        if self._observers:
            self.noticed("tasks")
        waiters = self._by_task.get(task_id)
        if waiters and status not in TERMINAL_STATUSES:
            waiters = {w for w in waiters if not w.terminal_only}
        self._wake(waiters, TASK_CHANGED)
        if status == "pending" and pool is not None:
            self._wake(self._by_pool.get(pool), POOL_WORK)

    def chunks_added(self, task_id: UUID, attempt: int | None = None, last_seq: int = 0) -> None:
        """Chunks up to ``last_seq`` of ``attempt`` were stored for a task (unknown when
        ``attempt`` is None): wake its waiters that read chunks."""
        waiters = self._by_task.get(task_id)
        if not waiters:
            return
        upto = UNKNOWN_CHUNKS if attempt is None else (attempt, last_seq)
        for waiter in waiters:
            if not waiter.terminal_only:
                if upto > waiter.chunks_upto:
                    waiter.chunks_upto = upto
                self.wakes += 1
                waiter.wake(CHUNKS_ADDED)

    def resync_all(self) -> None:
        """Wake every waiter to re-read everything (after a reconnect or on demand)."""
        log.info("waiters_resynced", waiters=self.wake_all())
        self.noticed("resync")

    def wake_all(self) -> int:
        """Wake every waiter to re-read everything, quietly (the safety poll); how many."""
        count = 0
        for index in (self._by_task, self._by_pool):
            for waiters in list(index.values()):
                count += len(waiters)
                self._wake(waiters, EVERYTHING)
        return count

    def outcome_task_ids(self) -> list[UUID]:
        """The tasks that have at least one outcome-only waiter."""
        return [tid for tid, ws in self._by_task.items() if any(w.terminal_only for w in ws)]

    def sweep(self, finished: Iterable[UUID]) -> int:
        """The safety poll: wake every waiter, except the outcome-only waiters of tasks that
        are not in ``finished`` (their re-read could only show a non-terminal row). Returns
        how many waiters are registered."""
        done = set(finished)
        count = 0
        for task_id, waiters in list(self._by_task.items()):
            count += len(waiters)
            if task_id not in done:
                waiters = {w for w in waiters if not w.terminal_only}
            self._wake(waiters, EVERYTHING)
        for waiters in list(self._by_pool.values()):
            count += len(waiters)
            self._wake(waiters, EVERYTHING)
        return count

    def _wake(self, waiters: set[Waiter] | None, flags: int) -> None:
        if waiters:
            self.wakes += len(waiters)
            for waiter in waiters:
                waiter.wake(flags)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batcher(Generic[K, V]):
    """Coalesces ``load(key)`` calls into one ``fetch(keys)`` call per short window.

    ``fetch`` returns a mapping from key to value; a key it leaves out loads as None. A failing
    fetch fails every load of its batch.
    """

    def __init__(
        self,
        fetch: Callable[[Sequence[K]], Awaitable[dict[K, V]]],
        *,
        window_s: float,
        max_batch: int = 5000,
    ) -> None:
        self._fetch = fetch
        self._window_s = window_s
        self._max_batch = max_batch
        # Every caller of a key waits on its own future: cancelling one leaves the others.
        self._pending: dict[K, list[asyncio.Future[V | None]]] = {}
        self._scheduled: asyncio.Handle | None = None
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0

    async def load(self, key: K) -> V | None:
        """The value for ``key`` from the next batch (shared with concurrent loads of it)."""
        fut: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        waiting = self._pending.get(key)
        if waiting is None:
            self._pending[key] = [fut]
            self._schedule()
        else:
            waiting.append(fut)
        return await fut

    def _schedule(self) -> None:
        if self._scheduled is not None:
            return
        loop = asyncio.get_running_loop()
        if self._in_flight == 0 or len(self._pending) >= self._max_batch:
            self._scheduled = loop.call_soon(self._start)
        else:
            self._scheduled = loop.call_later(self._window_s, self._start)

    def _start(self) -> None:
        self._scheduled = None
        while self._pending:
            keys = list(self._pending)[: self._max_batch]
            batch = {k: self._pending.pop(k) for k in keys}
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[K, list[asyncio.Future[V | None]]]) -> None:
        self.batches += 1
        try:
            values = await self._fetch(list(batch))
        except BaseException as exc:
            for futs in batch.values():
                for fut in futs:
                    if fut.done():
                        continue
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                        fut.exception()  # retrieved here: the caller may be gone
                    else:
                        fut.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._in_flight -= 1
        for key, futs in batch.items():
            value = values.get(key)
            for fut in futs:
                if not fut.done():
                    fut.set_result(value)
